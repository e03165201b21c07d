"""Rollouts for online RL (PPO, GRPO, Safe-RLHF): sampling, scoring, token log-probs, logging.

:class:`OnlineRLModule` holds what every on-policy algorithm shares, so the algorithm modules only add
their advantages and losses:

* **generation** - one batched, KV-cached ``generate`` call per rollout with every model input of the
  prompt batch (all top-level tensors except ``labels``, so media inputs flow through untouched); the
  response mask keeps tokens up to and including the first EOS. Per-token inputs of the prompt (integer
  tensors of its ``(N, L)`` shape, e.g. ``mm_token_type_ids``) are extended with zeros over the response
  (:func:`extend_per_token_inputs`), so the training forwards see what ``generate`` saw. Sampling is
  seeded per rollout from ``(rollout_seed, rollout index, rank)`` inside ``torch.random.fork_rng``, so a
  resumed run samples exactly what the uninterrupted run would have, and the global RNG is left alone.
* **ZeRO-3** - the actor's shards are gathered once per rollout (``GatheredParameters`` with the ZeRO-3
  module hooks lifted while ``generate`` runs) instead of once per decoded token. This needs the full actor
  in memory on every rank for the duration of ``generate``: fine for models that fit one device, and the
  way to keep generation fast. Set ``zero3_gather_for_generation=False`` for actors that do not fit; then
  every decoding step all-gathers layer by layer (slow but lean). With more than one process under ZeRO-3
  ``generate`` runs with ``synced_gpus=True`` so ranks that finished early keep stepping with the others.
* **scoring** - a frozen reward model (end score of a :class:`ScoreModel`) and/or registered reward
  functions (:mod:`aa_lightning.rewards`), summed with weights.
* **log-probs** in chunks of ``forward_batch_size`` sequences, from logits divided by the sampling
  temperature (the distribution the tokens were drawn from).
* **optimization plumbing** - separate actor/critic optimizers (each with its own lr and its own gradient
  clipping) or, under DeepSpeed (one optimizer per engine), one optimizer with an actor and a critic
  parameter group. ``trainer.global_step`` counts *actor* optimizer updates in both cases, so
  ``max_steps`` means the same thing whatever the strategy.
* **metrics** that are exact over all ranks: sums and counts are reduced in one collective per rollout, and
  samples are written to TensorBoard as a markdown table every ``sample_log_interval`` rollouts, each
  sample's media next to its own text (:mod:`aa_lightning.callbacks.media_logging`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DeepSpeedStrategy
from torch import nn

from aa_lightning.algorithms.base import AlignModule, model_inputs, unwrap
from aa_lightning.algorithms.config import GenerationConfig, as_config
from aa_lightning.algorithms.eval_metrics import UniqueSampleSums, sample_indices
from aa_lightning.algorithms.logprobs import entropy_from_logits, masked_mean, selective_log_softmax
from aa_lightning.algorithms.optim import build_optimizer, param_groups
from aa_lightning.models.aliases import resolve_model_path
from aa_lightning.models.score_model import has_score_head
from aa_lightning.models.turns import end_of_turn_token_ids
from aa_lightning.rewards import RewardSpec, WeightedRewards

__all__ = [
    "MetricAccumulator",
    "OnlineRLModule",
    "Rollout",
    "RunningMoments",
    "explained_variance",
    "extend_per_token_inputs",
    "position_ids_from_mask",
    "repeat_batch_inputs",
    "response_mask_from_eos",
    "samples_markdown",
    "zero3_generation_context",
]

TEXT_KEYS = ("input_ids", "attention_mask")


# --------------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------------


def response_mask_from_eos(
    response_ids: torch.Tensor, eos_token_ids: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask (N, R) bool, has_eos (N,) bool)``: tokens up to and including the first EOS are kept.

    Everything after the first EOS (padding, or a second EOS when pad == eos) is masked; a response
    without EOS (cut at ``max_new_tokens``) keeps all its tokens and has ``has_eos == False``.
    """
    eos = torch.as_tensor(list(eos_token_ids), device=response_ids.device, dtype=response_ids.dtype)
    is_eos = torch.isin(response_ids, eos)
    eos_before = is_eos.long().cumsum(dim=1) - is_eos.long()  # EOS tokens strictly before each position
    return eos_before == 0, is_eos.any(dim=1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding (what ``generate`` uses): ``cumsum(mask) - 1`` clamped at 0."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def repeat_batch_inputs(
    inputs: dict[str, torch.Tensor], repeats: int, batch_size: int
) -> dict[str, torch.Tensor]:
    """Each prompt ``repeats`` times in a row (GRPO groups): batch-first tensors are ``repeat_interleave``-d.

    Tensors whose first dimension is not the batch size (media patches flattened over the batch, as some
    processors return) cannot be split per sample without knowing the model. With ONE prompt in the batch
    every row belongs to it, so each tensor is tiled ``repeats`` times along dim 0, which is right for any
    layout; with several prompts such inputs are refused with a clear message.
    """
    if repeats == 1:
        return dict(inputs)
    flat = [k for k, v in inputs.items() if v.dim() == 0 or v.shape[0] != batch_size]
    if not flat:
        return {key: value.repeat_interleave(repeats, dim=0) for key, value in inputs.items()}
    if batch_size == 1:
        return {
            key: value.repeat(repeats, *[1] * (value.dim() - 1)) if value.dim() > 0 else value
            for key, value in inputs.items()
        }
    key = flat[0]
    raise ValueError(
        f"cannot repeat model input {key!r} of shape {tuple(inputs[key].shape)} per sample (batch size "
        f"{batch_size}): its rows are not one per prompt; use batch_size 1 (per device) for this processor, "
        "or one sample per prompt"
    )


def extend_per_token_inputs(
    inputs: dict[str, torch.Tensor], prompt_ids: torch.Tensor, num_new_tokens: int
) -> dict[str, torch.Tensor]:
    """Extend the per-token model inputs of a prompt batch over ``num_new_tokens`` generated tokens.

    Rule (the batch contract of :mod:`aa_lightning.data.collators`): a per-token input is a non-float
    tensor with exactly the ``(N, prompt_len)`` shape of ``prompt_ids`` (e.g. ``mm_token_type_ids``,
    ``token_type_ids``); generated tokens are text, so it is padded with zeros, as ``generate`` itself
    does. Everything else (media tensors, float features) passes unchanged. ``input_ids`` and
    ``attention_mask`` are not expected here (the rollout builds them itself). A media tensor that is an
    integer ``(N, prompt_len)`` tensor by coincidence would be extended too (and then fail loudly in the
    model); no processor in use returns one.
    """
    if num_new_tokens <= 0:
        return dict(inputs)
    out = {}
    for key, value in inputs.items():
        if value.shape == prompt_ids.shape and not value.is_floating_point() and not value.is_complex():
            value = torch.cat([value, value.new_zeros(value.shape[0], num_new_tokens)], dim=1)
        out[key] = value
    return out


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - Var(returns - values) / Var(returns)`` over masked tokens (1 = perfect critic, <= 0 = useless)."""
    m = mask.bool()
    ret_mean = masked_mean(returns, m)
    var_ret = masked_mean((returns - ret_mean) ** 2, m)
    diff = returns - values
    var_diff = masked_mean((diff - masked_mean(diff, m)) ** 2, m)
    return 1.0 - var_diff / var_ret.clamp(min=1e-8)


class RunningMoments:
    """Running mean / std of all scores seen so far (parallel Welford merge, float64, CPU).

    Kept out of the module's buffers on purpose: DeepSpeed bf16 and ``bf16-true`` precision cast floating
    buffers to bf16 (3 significant digits). The state travels in the checkpoint through
    ``on_save_checkpoint`` instead.
    """

    def __init__(self) -> None:
        self.mean = torch.zeros((), dtype=torch.float64)
        self.var = torch.ones((), dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.float64)

    @torch.no_grad()
    def update(self, values: torch.Tensor) -> None:
        x = values.detach().to("cpu", torch.float64).flatten()
        n = x.numel()
        if n == 0:
            return
        batch_mean = x.mean()
        batch_var = x.var(correction=0)
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean = self.mean + delta * n / total
        self.var = m2 / total
        self.count = total

    @property
    def std(self) -> torch.Tensor:
        """Unbiased std (population std times ``sqrt(n / (n - 1))``), 1 before any update."""
        if self.count <= 1:
            return torch.ones((), dtype=torch.float64)
        return (self.var * self.count / (self.count - 1)).sqrt()

    def normalize(self, values: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        mean = self.mean.to(values.device, values.dtype)
        std = self.std.to(values.device, values.dtype)
        return (values - mean) / (std + eps)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean.clone(), "var": self.var.clone(), "count": self.count.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.mean = state["mean"].to(torch.float64)
        self.var = state["var"].to(torch.float64)
        self.count = state["count"].to(torch.float64)


class MetricAccumulator:
    """Sums and counts of metrics, reduced over ranks in ONE collective, then divided.

    ``add_mean(name, values, mask)`` adds the masked sum and count (global means weigh every element the
    same on every rank), ``add_std`` also tracks sums of squares. Nothing is moved to the host here.
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}
        self.squares: dict[str, torch.Tensor] = {}

    def add(self, name: str, total: torch.Tensor, count: torch.Tensor | float) -> None:
        total = total.detach().double()
        count = torch.as_tensor(count, dtype=torch.float64, device=total.device)
        self.sums[name] = self.sums[name] + total if name in self.sums else total
        self.counts[name] = self.counts[name] + count if name in self.counts else count

    def add_mean(self, name: str, values: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        values = values.detach().double()
        if mask is None:
            self.add(name, values.sum(), values.numel())
        else:
            m = mask.bool()
            self.add(name, torch.where(m, values, torch.zeros_like(values)).sum(), m.sum())

    def add_std(self, name: str, values: torch.Tensor) -> None:
        """Track mean and std of ``values`` (``name`` and ``name + '_std'``)."""
        values = values.detach().double().flatten()
        self.add_mean(name, values)
        square = (values**2).sum()
        self.squares[name] = self.squares[name] + square if name in self.squares else square

    def compute(self, reduce: Any = None) -> dict[str, torch.Tensor]:
        """Means (and stds) over everything added, summed over ranks with ``reduce(tensor)`` first."""
        names = list(self.sums)
        if not names:
            return {}
        sq_names = list(self.squares)
        stacked = torch.stack(
            [self.sums[n] for n in names]
            + [self.counts[n] for n in names]
            + [self.squares[n] for n in sq_names]
        )
        if reduce is not None:
            stacked = reduce(stacked)
        k = len(names)
        sums, counts, squares = stacked[:k], stacked[k : 2 * k], stacked[2 * k :]
        out = {n: (sums[i] / counts[i].clamp(min=1)).float() for i, n in enumerate(names)}
        for j, n in enumerate(sq_names):
            i = names.index(n)
            c = counts[i]
            var = (squares[j] - sums[i] ** 2 / c.clamp(min=1)) / (c - 1).clamp(min=1)
            out[f"{n}_std"] = var.clamp(min=0).sqrt().float()
        return out


def samples_markdown(
    prompts: Sequence[str],
    responses: Sequence[str],
    columns: dict[str, Sequence[float]],
    max_chars: int = 400,
) -> str:
    """A markdown table (TensorBoard ``add_text`` renders it) of prompts, responses and numbers."""

    def cell(text: str) -> str:
        text = text if len(text) <= max_chars else text[: max_chars - 3] + "..."
        return text.replace("|", "\\|").replace("\r", " ").replace("\n", "<br>")

    header = "| # | prompt | response | " + " | ".join(columns) + " |"
    rule = "|---|---|---|" + "---|" * len(columns)
    rows = [
        f"| {i} | {cell(p)} | {cell(r)} | " + " | ".join(f"{columns[c][i]:.4g}" for c in columns) + " |"
        for i, (p, r) in enumerate(zip(prompts, responses))
    ]
    return "\n".join([header, rule, *rows])


@contextlib.contextmanager
def zero3_generation_context(engine: Any, model: nn.Module) -> Iterator[None]:
    """Gather ``model``'s ZeRO-3 shards ONCE and lift the per-module fetch/release hooks while inside.

    Without this, every decoding step of ``generate`` would all-gather each layer again (the post-forward
    hooks release the parameters after each layer). The hooks are registered again on exit and the
    parameters re-partitioned by ``GatheredParameters``.
    """
    import deepspeed

    offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)
    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        if offload is None:
            yield
            return
        for param in params:
            param.ds_active_sub_modules.clear()
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            offload._register_deepspeed_module(offload.module)


def init_score_head(head: nn.Linear, std: float) -> None:
    """Draw a new score head ``N(0, std)`` (zero bias), also when ZeRO-3 has already partitioned it.

    ``ScoreModel`` initialises its head inside ``__init__``; under ``deepspeed.zero.Init`` the weights are
    already sharded by then, so that init writes nothing. Gathering with ``modifier_rank=0`` makes the
    draw land in the shards (rank 0's values are broadcast).
    """
    params = list(head.parameters())
    sharded = any(hasattr(p, "ds_id") for p in params)
    context: contextlib.AbstractContextManager = contextlib.nullcontext()
    if sharded:
        import deepspeed

        context = deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    with context, torch.no_grad():
        if std > 0:
            nn.init.normal_(head.weight, std=std)
        else:
            nn.init.zeros_(head.weight)
        if head.bias is not None:
            nn.init.zeros_(head.bias)


def disable_dropout(model: nn.Module) -> None:
    """Zero every dropout: RL ratios and KL terms must compare the same function at rollout and update."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout_rate"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    config = getattr(unwrap(model), "config", None)
    for name in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)


# --------------------------------------------------------------------------------------------------
# Rollout container
# --------------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """One batch of generated episodes. All tensors are batch-first with ``N`` rows (sequences).

    ``sequences`` = left-padded prompt (``prompt_length`` columns) + response (``R`` columns, padded after
    EOS). ``data`` holds per-sequence results the algorithms add (``old_logprobs`` (N, R), ``values``,
    ``scores`` (N,) ...).
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    has_eos: torch.Tensor
    prompt_length: int
    extra_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    prompts: list[str] = field(default_factory=list)
    responses: list[str] = field(default_factory=list)
    metas: list[dict[str, Any]] = field(default_factory=list)
    data: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.sequences.shape[0]

    @property
    def response_ids(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_length :]

    @property
    def response_length(self) -> int:
        return self.sequences.shape[1] - self.prompt_length

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.data[key]

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        self.data[key] = value

    def model_inputs(self, with_position_ids: bool = True) -> dict[str, torch.Tensor]:
        """Forward inputs for prompt + response: the sequences plus every extra (media) input."""
        inputs = {**self.extra_inputs, "input_ids": self.sequences, "attention_mask": self.attention_mask}
        if with_position_ids and "position_ids" not in self.extra_inputs:
            inputs["position_ids"] = position_ids_from_mask(self.attention_mask)
        return inputs

    def select(self, index: torch.Tensor) -> Rollout:
        """The rows ``index`` (a minibatch); batch-first extras are sliced, others passed whole."""
        n = len(self)
        idx_list = index.tolist()

        def take(t: torch.Tensor) -> torch.Tensor:
            return t[index.to(t.device)] if t.dim() > 0 and t.shape[0] == n else t

        return Rollout(
            sequences=take(self.sequences),
            attention_mask=take(self.attention_mask),
            response_mask=take(self.response_mask),
            has_eos=take(self.has_eos),
            prompt_length=self.prompt_length,
            extra_inputs={k: take(v) for k, v in self.extra_inputs.items()},
            prompts=[self.prompts[i] for i in idx_list] if self.prompts else [],
            responses=[self.responses[i] for i in idx_list] if self.responses else [],
            metas=[self.metas[i] for i in idx_list] if self.metas else [],
            data={k: take(v) for k, v in self.data.items()},
        )


# --------------------------------------------------------------------------------------------------
# Shared LightningModule
# --------------------------------------------------------------------------------------------------


class OnlineRLModule(AlignModule):
    """Base of the on-policy RL modules (manual optimization, prompt-only data).

    Args:
        reward_model_name_or_path: frozen reward model (a :class:`ScoreModel` folder); optional when
            ``reward_functions`` are given.
        reward_model_weight: weight of the reward model's end score in the summed score.
        reward_functions: registered reward functions with weights and kwargs (:class:`RewardSpec`).
        generation: sampling settings of the rollouts (``max_new_tokens``, ``temperature``, ``top_p``,
            ``top_k`` (0 = off), ``do_sample``).
        num_mini_batches: minibatches each rollout is split into for the updates (one forward/backward each).
        gradient_accumulation_steps: minibatches whose gradients are summed into one optimizer step; must
            divide ``num_mini_batches``.
        forward_batch_size: sequences per no-grad forward while scoring a rollout (None: all at once).
        max_grad_norm: clip the gradient norm of each optimizer (actor and critic separately; under DeepSpeed
            the one optimizer's global norm). None or 0 turns clipping off.
        missing_eos_penalty: subtracted from the score of responses that reached ``max_new_tokens`` without EOS.
        rollout_seed: seed of the sampling; rollout ``k`` on rank ``r`` draws from a seed derived from
            ``(rollout_seed, k, r)``. None uses ``torch.initial_seed()`` (set by ``seed_everything``).
        disable_dropout: set every dropout of the trained models to 0 (the usual choice for RL fine-tuning).
        position_ids_from_mask: pass ``position_ids`` that skip left padding in training forwards (as
            ``generate`` does). Turn off for models that compute their own positions (e.g. M-RoPE VLMs).
        zero3_gather_for_generation: under ZeRO-3 gather the whole actor once per rollout for ``generate``.
        eval_do_sample: sample (True) or decode greedily (False) on validation prompts.
        sample_log_interval: write a table of samples to TensorBoard every this many rollouts (0: never);
            samples with media also get their media logged next to their text.
        num_logged_samples: rows of that table.
    """

    data_kind = "prompt_only"

    def __init__(
        self,
        *args: Any,
        reward_model_name_or_path: str | None = None,
        reward_model_weight: float = 1.0,
        reward_functions: list[RewardSpec] | None = None,
        generation: GenerationConfig | None = None,
        num_mini_batches: int = 1,
        gradient_accumulation_steps: int = 1,
        forward_batch_size: int | None = None,
        max_grad_norm: float | None = 1.0,
        missing_eos_penalty: float = 0.0,
        rollout_seed: int | None = None,
        disable_dropout: bool = True,
        position_ids_from_mask: bool = True,
        zero3_gather_for_generation: bool = True,
        eval_do_sample: bool = False,
        sample_log_interval: int = 10,
        num_logged_samples: int = 4,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False
        if num_mini_batches < 1 or gradient_accumulation_steps < 1:
            raise ValueError("num_mini_batches and gradient_accumulation_steps must be >= 1")
        if num_mini_batches % gradient_accumulation_steps:
            raise ValueError(
                f"gradient_accumulation_steps={gradient_accumulation_steps} must divide "
                f"num_mini_batches={num_mini_batches}"
            )
        self.generation: GenerationConfig = as_config(GenerationConfig, generation, "generation")
        self.reward_fns = WeightedRewards(reward_functions)
        if reward_model_name_or_path is None and not len(self.reward_fns):
            raise ValueError("give a reward_model_name_or_path and/or reward_functions")
        self._rollout_index = 0
        self._base_seed: int | None = rollout_seed
        self._val_sums: dict[str, UniqueSampleSums] = {}  # the current validation epoch's table

    # -- models ----------------------------------------------------------------------------------------
    def build_actor(self) -> None:
        """Actor (``self.model``), tokenizer/processor, and the frozen reward model."""
        hp = self.hparams
        model, self.tokenizer, self.processor = self.load_model()
        if hp.get("disable_dropout", True):
            disable_dropout(model)
        self.model = self.prepare_trainable(model)
        if hp.get("reward_model_name_or_path"):
            self.load_frozen("reward", hp.reward_model_name_or_path, score_model=True)

    def build_reference(self) -> None:
        """The frozen initial actor (loaded again from its path, so sharded like the actor under ZeRO-3; with
        LoRA the actor with its adapters off)."""
        self.setup_reference()

    # frozen models by role (they live in ``self.frozen``, see :mod:`aa_lightning.algorithms.frozen`)
    @property
    def ref_model(self) -> nn.Module | None:
        return self.frozen.get("reference")

    @property
    def reward_model(self) -> nn.Module | None:
        return self.frozen.get("reward")

    @property
    def reward_tokenizer(self) -> Any:
        return self.frozen.tokenizer("reward")

    def critic_init_path(self, explicit: str | None, score_model: nn.Module | None, tokenizer: Any) -> str:
        """Where a critic starts: ``explicit``, else the matching frozen score model (when it reads the actor's
        token ids, i.e. shares its vocabulary), else the actor."""
        if explicit:
            return explicit
        if score_model is not None and self._same_tokenizer(tokenizer):
            for role in ("reward", "cost"):
                if self.frozen.get(role) is score_model:
                    return self.frozen.path(role)
        return self.model_name_or_path

    def load_trainable_score_model(self, path: str, head_init_std: float | None = None) -> nn.Module:
        """A critic: a score model from ``path`` (its trained head when it has one, else a new head with
        weights drawn with ``head_init_std``). It reads the actor's token ids, so it must share its vocabulary."""
        model, tokenizer, _ = self.load_model(path, score_model=True, score_head_init_std=head_init_std)
        if not self._same_tokenizer(tokenizer):
            raise ValueError(
                f"critic {path!r} has a different tokenizer than the actor; critics score the actor's "
                "token ids, so start them from a checkpoint with the same vocabulary"
            )
        if head_init_std is not None and not has_score_head(resolve_model_path(path)):
            init_score_head(model.score_head, head_init_std)
        if self.hparams.get("disable_dropout", True):
            disable_dropout(model)
        if self.lora is not None:  # critics train fully: LoRA is applied to the actor only
            model.train()
            return model
        return self.prepare_trainable(model)

    def critic_modules(self) -> list[nn.Module]:
        """Trained models other than the actor (their optimizer / parameter group uses ``critic_lr``)."""
        return []

    def critic_lr(self) -> float:
        return self.optim.lr

    def trained_modules(self) -> list[nn.Module]:
        return [self.model, *self.critic_modules()]

    # -- strategy helpers ------------------------------------------------------------------------------
    def uses_deepspeed(self) -> bool:
        return self._trainer is not None and isinstance(self.trainer.strategy, DeepSpeedStrategy)

    def zero_stage(self) -> int:
        engine = self.deepspeed_engine()
        return int(engine.zero_optimization_stage()) if engine is not None else 0

    def tokens_per_rank(self, local_tokens: torch.Tensor) -> torch.Tensor:
        """The step's token count over every rank divided by the world size: normalising each rank's token sum
        by it makes the ranks' averaged gradient a token mean over ALL ranks' tokens (not a mean of means)."""
        world = self.trainer.world_size if self._trainer is not None else 1
        return (self.reduce_sum(local_tokens.float()) / world).clamp(min=1)

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._trainer is None or self.trainer.world_size == 1:
            return tensor
        return self.trainer.strategy.reduce(tensor, reduce_op="sum")

    # -- optimization ----------------------------------------------------------------------------------
    def updates_per_rollout(self) -> int:
        """Optimizer steps each rollout makes (overridden by algorithms with several passes)."""
        return self.hparams.num_mini_batches // self.hparams.gradient_accumulation_steps

    def total_optimizer_steps(self) -> int:
        if self._trainer is None:
            return 1000
        if self.trainer.max_steps and self.trainer.max_steps > 0:
            return int(self.trainer.max_steps)
        try:
            return int(self.trainer.estimated_stepping_batches) * self.updates_per_rollout()
        except Exception:  # an infinite loader
            return 1000

    def configure_optimizers(self) -> Any:
        wd = self.optim.weight_decay
        total = self.total_optimizer_steps()
        critics = self.critic_modules()
        if self.uses_deepspeed():
            # DeepSpeed drives one optimizer per engine: actor and critics become parameter groups with
            # their own learning rates; the schedule scales each group's own peak lr.
            groups = [{**g, "role": "actor"} for g in param_groups([self.model], wd, lr=self.optim.lr)]
            groups += [{**g, "role": "critic"} for g in param_groups(critics, wd, lr=self.critic_lr())]
            optimizer, scheduler = build_optimizer(groups, self.optim, total)
            max_norm = self.hparams.get("max_grad_norm")
            self.trainer.strategy.config["gradient_clipping"] = float(max_norm or 0.0)
            return {"optimizer": optimizer, "lr_scheduler": scheduler}
        actor_opt, actor_sched = build_optimizer(param_groups([self.model], wd), self.optim, total)
        if not critics:
            return {"optimizer": actor_opt, "lr_scheduler": actor_sched}
        critic_opt, critic_sched = build_optimizer(
            param_groups(critics, wd, lr=self.critic_lr()), self.optim, total
        )
        return [
            {"optimizer": actor_opt, "lr_scheduler": actor_sched},
            {"optimizer": critic_opt, "lr_scheduler": critic_sched},
        ]

    def log_learning_rates(self) -> None:
        """``train/lr`` (actor) and ``train/lr_critic``, whether they live in two optimizers or in two
        parameter groups of one (DeepSpeed)."""
        if self._trainer is None or not self.trainer.optimizers:
            return
        seen: dict[str, float] = {}
        for i, opt in enumerate(self.trainer.optimizers):
            for group in opt.param_groups:
                name = group.get("role", "actor" if i == 0 else "critic")
                seen.setdefault(name, float(group["lr"]))
        for name, lr in seen.items():
            self.log("train/lr" if name == "actor" else f"train/lr_{name}", lr, batch_size=1)

    def on_fit_start(self) -> None:
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            raise ValueError(
                "fp16 mixed precision (GradScaler) is not supported by the RL modules; use bf16-mixed"
            )
        if self._base_seed is None:
            self._base_seed = int(torch.initial_seed()) % (2**31)

    def start_minibatch(self) -> None:
        """Call before the forwards of each minibatch: what ``DeepSpeedEngine.forward`` would do.

        Lightning runs the whole ``training_step`` inside ONE engine forward, so without this ZeRO never
        learns that a new micro-batch started: ZeRO-3 keeps ``micro_step_id == 0`` and *overwrites* the
        gradient partitions of earlier minibatches instead of accumulating them.
        """
        engine = self.deepspeed_engine()
        clear = getattr(getattr(engine, "optimizer", None), "clear_backward_seen_flag", None)
        if callable(clear):
            clear()

    def backward_minibatch(self, loss: torch.Tensor, last_in_group: bool) -> None:
        """Backward of one minibatch; under DeepSpeed mark whether it closes the accumulation group."""
        engine = self.deepspeed_engine()
        if engine is not None:
            engine.set_gradient_accumulation_boundary(last_in_group)
        self.manual_backward(loss)

    def optimizer_update(self, stats: MetricAccumulator) -> None:
        """Clip, step every optimizer, zero grads, step the schedules. Counts ONE global step.

        ``train/grad_norm`` is the global norm over every trained model before clipping (actor and critics
        together, as DeepSpeed's one optimizer reports it), so it reads the same under every strategy; a
        non-finite norm stops the run before any weight changes (outside DeepSpeed) or right after the step.
        """
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        max_norm = self.hparams.get("max_grad_norm") or 0.0
        engine = self.deepspeed_engine()
        if engine is None:
            norms = []
            for name, opt in zip(("actor", "critic"), optimizers):
                params = [p for g in opt.optimizer.param_groups for p in g["params"] if p.grad is not None]
                if not params:
                    continue
                norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
                stats.add(f"train/{name}_grad_norm", norm, 1)
                norms.append(norm)
            if norms:
                total = torch.stack(norms).float().square().sum().sqrt()
                stats.add("train/grad_norm", total, 1)
                if not torch.isfinite(total):
                    self.handle_nonfinite("gradient norm", total)  # raises unless on_nonfinite: skip
                    for opt in optimizers:  # skip: this update's gradients are dropped, nothing steps
                        opt.zero_grad(set_to_none=True)
                    self.skipped_steps += 1
                    stats.add(
                        "train/skipped_steps", torch.tensor(float(self.skipped_steps), device=self.device), 1
                    )
                    return
        optimizers[0].step()
        for opt in optimizers[1:]:
            # critic optimizers step through the strategy directly, so Lightning's step counter (global_step)
            # counts actor updates only: max_steps then means the same with one or two optimizers
            self.trainer.strategy.optimizer_step(opt.optimizer, closure=_no_closure)
        if engine is not None:
            norm = engine.get_global_grad_norm()
            if norm is not None:  # a tensor stays on its device (no host sync); DeepSpeed may give a float
                norm = torch.as_tensor(norm, device=self.device, dtype=torch.float32)
                stats.add("train/grad_norm", norm, 1)
                if not torch.isfinite(norm):
                    self.handle_nonfinite("gradient norm", norm)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        schedulers = self.lr_schedulers()
        if schedulers is not None:
            for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
                scheduler.step()

    def minibatch_groups(self, n: int, seed_offset: int) -> list[list[torch.Tensor]]:
        """A seeded shuffle of ``range(n)`` split into ``num_mini_batches`` minibatches, grouped for accumulation."""
        num_mb = self.hparams.num_mini_batches
        if n < num_mb:
            raise ValueError(f"a rollout of {n} sequences cannot be split into num_mini_batches={num_mb}")
        generator = torch.Generator().manual_seed(self.rollout_seed(seed_offset))
        perm = torch.randperm(n, generator=generator) if num_mb > 1 else torch.arange(n)
        chunks = list(perm.tensor_split(num_mb))
        accum = self.hparams.gradient_accumulation_steps
        return [chunks[i : i + accum] for i in range(0, num_mb, accum)]

    # -- RNG -------------------------------------------------------------------------------------------
    def rollout_seed(self, offset: int = 0) -> int:
        base = self._base_seed if self._base_seed is not None else int(torch.initial_seed()) % (2**31)
        rank = self.global_rank if self._trainer is not None else 0
        return (base * 1_000_003 + self._rollout_index * 10_007 + rank * 101 + offset) % (2**63 - 1)

    @contextlib.contextmanager
    def seeded(self, offset: int = 0) -> Iterator[None]:
        """Run with the torch RNG seeded for this rollout; the global RNG state is restored afterwards."""
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.rollout_seed(offset))
            yield

    # -- generation ------------------------------------------------------------------------------------
    def eos_token_ids(self) -> list[int]:
        ids: set[int] = set()
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        gen_eos = getattr(getattr(unwrap(self.model), "generation_config", None), "eos_token_id", None)
        if isinstance(gen_eos, int):
            ids.add(gen_eos)
        elif isinstance(gen_eos, (list, tuple)):
            ids.update(int(i) for i in gen_eos)
        if "_turn_end_ids" not in self.__dict__:  # where trained rows end (read once from the chat template)
            self.__dict__["_turn_end_ids"] = end_of_turn_token_ids(self.tokenizer, self.processor)
        ids.update(self.__dict__["_turn_end_ids"])
        if not ids:
            raise ValueError("the tokenizer has no EOS token: responses could never end")
        return sorted(ids)

    def generation_kwargs(self, do_sample: bool | None = None) -> dict[str, Any]:
        """``generate`` arguments: a fresh ``GenerationConfig`` with exactly the configured sampling settings.

        The checkpoint's own generation config (repetition penalties, default top-k ...) is deliberately
        not used: the log-probs of the update must describe the distribution the tokens were drawn from.
        (``top_p``/``top_k`` truncation is the one usual exception, ignored in the log-probs as in most RLHF
        systems.)
        """
        from transformers import GenerationConfig as HFGenerationConfig

        cfg = self.generation
        sample = cfg.do_sample if do_sample is None else do_sample
        config = HFGenerationConfig(
            max_new_tokens=cfg.max_new_tokens,
            do_sample=sample,
            temperature=cfg.temperature if sample else None,
            # explicit values: None would let transformers fill in its defaults (top_k=50), so the tokens would
            # come from a truncated distribution the log-probs do not describe
            top_p=cfg.top_p if sample else None,
            top_k=cfg.top_k if sample else None,
            eos_token_id=self.eos_token_ids(),
            pad_token_id=self.tokenizer.pad_token_id,
            use_cache=True,
        )
        kwargs: dict[str, Any] = {"generation_config": config}
        if self.zero_stage() == 3 and self.trainer.world_size > 1:
            kwargs["synced_gpus"] = True
        return kwargs

    def generation_context(self) -> contextlib.AbstractContextManager:
        engine = self.deepspeed_engine()
        if (
            engine is not None
            and self.zero_stage() == 3
            and self.hparams.get("zero3_gather_for_generation", True)
        ):
            return zero3_generation_context(engine, self.model)
        return contextlib.nullcontext()

    @torch.no_grad()
    def generate_rollout(
        self, batch: dict[str, Any], num_samples: int = 1, do_sample: bool | None = None, seed_offset: int = 0
    ) -> Rollout:
        """Sample ``num_samples`` responses per prompt (groups are contiguous) in ONE ``generate`` call."""
        inputs = model_inputs(batch, self.model)
        for key in TEXT_KEYS:
            if key not in inputs:
                raise ValueError(f"a prompt-only batch needs {key!r}")
        batch_size = inputs["input_ids"].shape[0]
        metas = list(batch.get("meta") or [{} for _ in range(batch_size)])
        prompt_texts = self.tokenizer.batch_decode(inputs["input_ids"], skip_special_tokens=True)
        inputs = repeat_batch_inputs(inputs, num_samples, batch_size)
        prompt_length = inputs["input_ids"].shape[1]
        actor = self.model
        was_training = actor.training
        actor.eval()
        try:
            with self.seeded(seed_offset), self.generation_context():
                sequences = actor.generate(**inputs, **self.generation_kwargs(do_sample))
        finally:
            actor.train(was_training)
        response = sequences[:, prompt_length:]
        mask, has_eos = response_mask_from_eos(response, self.eos_token_ids())
        response = torch.where(mask, response, torch.full_like(response, self.tokenizer.pad_token_id))
        sequences = torch.cat([sequences[:, :prompt_length], response], dim=1)
        attention_mask = torch.cat([inputs["attention_mask"], mask.to(inputs["attention_mask"].dtype)], dim=1)
        extras = extend_per_token_inputs(
            {k: v for k, v in inputs.items() if k not in TEXT_KEYS}, inputs["input_ids"], response.shape[1]
        )
        return Rollout(
            sequences=sequences,
            attention_mask=attention_mask,
            response_mask=mask,
            has_eos=has_eos,
            prompt_length=prompt_length,
            extra_inputs=extras,
            prompts=[p for p in prompt_texts for _ in range(num_samples)],
            responses=self.tokenizer.batch_decode(response, skip_special_tokens=True),
            metas=[m for m in metas for _ in range(num_samples)],
        )

    # -- forwards --------------------------------------------------------------------------------------
    def chunks(self, n: int) -> list[torch.Tensor]:
        size = self.hparams.get("forward_batch_size") or n
        return list(torch.arange(n).split(size))

    def _supports_logits_to_keep(self, model: nn.Module) -> bool:
        import inspect

        target = unwrap(model)
        base = target.get_base_model() if hasattr(target, "get_base_model") else target
        try:
            return "logits_to_keep" in inspect.signature(base.forward).parameters
        except (TypeError, ValueError):
            return False

    def policy_logprobs(
        self, model: nn.Module, rollout: Rollout, with_entropy: bool = False, entropy_grad: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(log p(response token) (N, R), entropy (N, R) | None)`` from temperature-scaled logits.

        The entropy is detached unless ``entropy_grad`` (an entropy bonus needs its gradient).
        """
        inputs = rollout.model_inputs(self.hparams.get("position_ids_from_mask", True))
        r = rollout.response_length
        kwargs: dict[str, Any] = {"use_cache": False}
        if self._supports_logits_to_keep(model):
            kwargs["logits_to_keep"] = r + 1
        logits = model(**inputs, **kwargs).logits
        logits = logits[:, -(r + 1) : -1]
        temperature = self.generation.temperature if self.generation.do_sample else 1.0
        # float32 results, the division by the temperature included (done per chunk, after the upcast)
        logprobs = selective_log_softmax(logits, rollout.response_ids, temperature=temperature)
        entropy = None
        if entropy_grad:
            entropy = entropy_from_logits(logits, temperature=temperature).float()
        elif with_entropy:
            with torch.no_grad():
                entropy = entropy_from_logits(logits.detach(), temperature=temperature).float()
        return logprobs, entropy

    def value_forward(self, critic: nn.Module, rollout: Rollout) -> torch.Tensor:
        """Critic values ``(N, R)``: the value of the state *before* each response token."""
        inputs = rollout.model_inputs(self.hparams.get("position_ids_from_mask", True))
        scores = critic(**inputs).scores
        r = rollout.response_length
        return scores[:, -(r + 1) : -1].float()

    @torch.no_grad()
    def chunked(self, fn: Any, rollout: Rollout) -> Any:
        """Apply ``fn(sub_rollout)`` to chunks of ``forward_batch_size`` and concatenate the outputs."""
        outs = [fn(rollout.select(idx)) for idx in self.chunks(len(rollout))]
        if isinstance(outs[0], tuple):
            return tuple(None if parts[0] is None else torch.cat(parts) for parts in zip(*outs))
        return torch.cat(outs)

    def reference_logprobs(self, rollout: Rollout) -> torch.Tensor:
        with self.frozen.running("reference", self.model) as ref:
            return self.chunked(lambda ro: self.policy_logprobs(ref, ro)[0], rollout)

    # -- scoring ---------------------------------------------------------------------------------------
    def _same_tokenizer(self, tokenizer: Any) -> bool:
        if tokenizer is None or tokenizer is self.tokenizer:
            return True
        cache = self.__dict__.setdefault("_same_tokenizer_cache", {})
        key = id(tokenizer)
        if key not in cache:
            cache[key] = tokenizer.get_vocab() == self.tokenizer.get_vocab()
        return cache[key]

    @torch.no_grad()
    def score_with_model(self, model: nn.Module, tokenizer: Any, rollout: Rollout) -> torch.Tensor:
        """End scores ``(N,)`` of prompt + response under a frozen score model.

        Same vocabulary as the actor: the token ids (and media inputs) go straight in. A different
        tokenizer gets the decoded text re-tokenized (text only).
        """
        use_pos = self.hparams.get("position_ids_from_mask", True)
        if self._same_tokenizer(tokenizer):
            return self.chunked(lambda ro: model(**ro.model_inputs(use_pos)).end_scores.float(), rollout)
        texts = [
            self.tokenizer.decode(seq[mask.bool()], skip_special_tokens=False)
            for seq, mask in zip(rollout.sequences, rollout.attention_mask)
        ]
        scores = []
        for idx in self.chunks(len(rollout)):
            enc = tokenizer(
                [texts[i] for i in idx.tolist()], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(self.device)
            scores.append(model(**enc).end_scores.float())
        return torch.cat(scores)

    def compute_scores(self, rollout: Rollout) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted sum of the reward model's end score and the reward functions: ``(total (N,), parts)``."""
        total = torch.zeros(len(rollout), device=self.device)
        parts: dict[str, torch.Tensor] = {}
        if self.reward_model is not None:
            rm = self.score_with_model(self.reward_model, self.reward_tokenizer, rollout)
            parts["reward_model"] = rm
            total = total + self.hparams.reward_model_weight * rm
        if len(self.reward_fns):
            fn_total, fn_parts = self.reward_fns(rollout.prompts, rollout.responses, rollout.metas)
            total = total + fn_total.to(self.device)
            parts.update({k: v.to(self.device) for k, v in fn_parts.items()})
        return total, parts

    # -- training loop glue ----------------------------------------------------------------------------
    def split_batch(self, batch: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """``(prompt batch, ptx batch | None)``: a dict of loaders ``{"prompt": ..., "ptx": ...}`` gives both."""
        if isinstance(batch, dict) and "prompt" in batch and isinstance(batch["prompt"], dict):
            return batch["prompt"], batch.get("ptx")
        return batch, None

    def log_metrics(
        self,
        stats: MetricAccumulator,
        rollout: Rollout | None = None,
        columns: dict[str, torch.Tensor] | None = None,
    ) -> None:
        metrics = stats.compute(self.reduce_sum)
        self.log_dict(
            metrics,
            on_step=True,
            on_epoch=False,
            prog_bar=False,
            sync_dist=False,
            batch_size=len(rollout) if rollout is not None else None,
        )
        interval = self.hparams.get("sample_log_interval", 0)
        if rollout is not None and interval and self._rollout_index % interval == 0:
            self.log_samples(rollout, columns or {})

    def log_samples(self, rollout: Rollout, columns: dict[str, torch.Tensor]) -> None:
        if not self.trainer.is_global_zero:
            return
        n = min(self.hparams.get("num_logged_samples", 4), len(rollout))
        table = samples_markdown(
            rollout.prompts[:n], rollout.responses[:n], {k: v[:n].tolist() for k, v in columns.items()}
        )
        loggers = [lg for lg in self.trainer.loggers if isinstance(lg, TensorBoardLogger)]
        for logger in loggers:
            logger.experiment.add_text("rollout/samples", table, self.trainer.global_step)
        metas = rollout.metas[:n]
        if loggers and any(metas):
            # the media each response answered, next to its own text; the helper reads the data layer's
            # media references from the metas, so nothing here names a modality
            from aa_lightning.callbacks.media_logging import log_sample_media

            texts = [
                samples_markdown(
                    [rollout.prompts[i]],
                    [rollout.responses[i]],
                    {k: [float(v[i])] for k, v in columns.items()},
                )
                for i in range(n)
            ]
            for logger in loggers:
                log_sample_media(
                    logger.experiment,
                    "rollout",
                    metas,
                    self.trainer.global_step,
                    texts=texts,
                    processor=getattr(self, "processor", None),
                )

    def rollout_stats(
        self, stats: MetricAccumulator, rollout: Rollout, scores: torch.Tensor, parts: dict[str, torch.Tensor]
    ) -> None:
        """Score, per-term scores, response length and EOS share of a rollout."""
        stats.add_std("rollout/score", scores)
        for name, values in parts.items():
            stats.add_mean(f"rollout/score/{name}", values)
        stats.add_mean("rollout/response_length", rollout.response_mask.sum(dim=1).float())
        stats.add_mean("rollout/eos_fraction", rollout.has_eos.float())

    # -- validation: score the policy on held-out prompts ----------------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        prompts = self.split_batch(batch)[0]
        rollout = self.generate_rollout(
            prompts, do_sample=self.hparams.get("eval_do_sample", False), seed_offset=1_000_000 + batch_idx
        )
        scores, parts = self.compute_scores(rollout)
        columns = {
            "val/score": scores,
            **{f"val/score/{name}": values for name, values in parts.items()},
            "val/response_length": rollout.response_mask.sum(dim=1).float(),
        }
        if "val" not in self._val_sums:  # a plain dict: the metric is not registered as a submodule
            self._val_sums["val"] = UniqueSampleSums(list(columns)).to(self.device)
        self._val_sums["val"].update(sample_indices(prompts, len(rollout)), columns)

    def on_validation_epoch_end(self) -> None:
        """Means over the distinct validation prompts of all ranks (a prompt handed out twice counts once)."""
        table = self._val_sums.pop("val", None)
        if table is None:
            return
        sums = table.compute()
        rows = sums.pop("rows").clamp(min=1)
        self.log_dict({k: (v / rows).float() for k, v in sums.items()}, sync_dist=False, prog_bar=False)

    # -- checkpoint state ------------------------------------------------------------------------------
    def rl_state_dict(self) -> dict[str, Any]:
        return {"rollout_index": self._rollout_index, "base_seed": self._base_seed}

    def load_rl_state_dict(self, state: dict[str, Any]) -> None:
        self._rollout_index = int(state["rollout_index"])
        self._base_seed = state.get("base_seed", self._base_seed)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["aa_rl_state"] = self.rl_state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if "aa_rl_state" in checkpoint:
            self.load_rl_state_dict(checkpoint["aa_rl_state"])


def _no_closure() -> None:
    return None


def rollout_mean_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence KL estimate ``sum_t (log p - log p_ref)`` over response tokens ``(N,)``."""
    return torch.where(mask, logprobs - ref_logprobs, torch.zeros_like(logprobs)).sum(dim=1)
