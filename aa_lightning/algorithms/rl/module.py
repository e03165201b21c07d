"""The base LightningModule of the on-policy RL algorithms (PPO, GRPO, Safe-RLHF).

:class:`OnlineRLModule` composes what every on-policy algorithm shares, one job per mixin, so the algorithm
modules only add their advantages and losses:

* sampling (:mod:`.generation`), token log-probs and values (:mod:`.forwards`), reward scoring
  (:mod:`.scoring`), the optimizer plumbing (:mod:`.engine`, DeepSpeed behind :mod:`.deepspeed_adapter`) and
  the one minibatch update loop (:mod:`.update`);
  metric and sample logging (:mod:`.rollout_logging`);
* here: the models (actor, frozen reward model and reference, critics), validation on held-out prompts, and
  the RL state of checkpoints.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from aa_lightning.algorithms.base import AlignModule
from aa_lightning.algorithms.config import GenerationConfig, as_config
from aa_lightning.algorithms.eval_metrics import UniqueSampleSums, sample_indices
from aa_lightning.algorithms.logprobs import explains_its_outputs
from aa_lightning.algorithms.rl.engine import RLEngineMixin
from aa_lightning.algorithms.rl.forwards import ForwardsMixin
from aa_lightning.algorithms.rl.generation import GenerationMixin
from aa_lightning.algorithms.rl.multi_turn import MultiTurnMixin
from aa_lightning.algorithms.rl.rollout_engines import build_rollout_engine, rollout_engine_names
from aa_lightning.algorithms.rl.rollout_logging import RolloutLoggingMixin
from aa_lightning.algorithms.rl.sampling_correction import SamplingCorrectionMixin, check_tis_truncation
from aa_lightning.algorithms.rl.scoring import ScoringMixin
from aa_lightning.algorithms.rl.update import MinibatchUpdatesMixin
from aa_lightning.batch import PROMPT_STREAM, PTX_STREAM
from aa_lightning.config_coercion import as_config_list
from aa_lightning.environments import Environment, EnvironmentSpec, build_environment
from aa_lightning.models.aliases import resolve_model_path
from aa_lightning.models.score_model import has_score_head, init_score_head
from aa_lightning.models.trajectories import trajectory_family
from aa_lightning.models.unwrap import unwrap
from aa_lightning.rewards import RewardSpec, WeightedRewards

__all__ = ["OnlineRLModule", "disable_dropout"]


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


class OnlineRLModule(
    MultiTurnMixin,
    GenerationMixin,
    ForwardsMixin,
    ScoringMixin,
    SamplingCorrectionMixin,
    MinibatchUpdatesMixin,
    RolloutLoggingMixin,
    RLEngineMixin,
    AlignModule,
):
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
        zero3_gather_for_generation: under ZeRO-3 gather the whole actor once per rollout for ``generate``.
        eval_do_sample: sample (True) or decode greedily (False) on validation prompts.
        sample_log_interval: write a table of samples to TensorBoard every this many rollouts (0: never);
            samples with media also get their media logged next to their text.
        num_logged_samples: rows of that table.
        environment: multi-turn rollouts (:mod:`.multi_turn`): a registered environment name, ``{name,
            kwargs}`` or ``package.module:Class`` (:mod:`aa_lightning.environments`); None: one policy turn.
        max_turns: policy turns per episode at most (with an environment).
        max_observation_tokens: an environment answer longer than this (in tokens) ends the episode instead.
        end_on_cut_turn: a policy turn cut at ``max_new_tokens`` ends its episode (False: the environment
            answers it too).
        rollout_engine: what samples the rollouts (:mod:`.rollout_engines`): ``hf`` (the policy's own KV-cached
            ``generate``) or ``vllm`` (a colocated vLLM fed the trained weights after every update; the
            ``vllm`` extra); algorithms never name one.
        rollout_engine_args: keyword options of that engine (e.g. ``{gpu_memory_utilization: 0.3}`` for vllm).
        tis_cap: truncated importance sampling (Yao et al. 2025): the policy loss of each token is weighted by
            ``min(pi_trainer / pi_engine, tis_cap)`` (detached), correcting the gap between the engine's
            sampling distribution and the trainer's; needs an engine that reports its log-probs. None: off.
            Refused with top-p/top-k sampling (:func:`~.sampling_correction.check_tis_truncation`).
        tis_with_truncated_sampling: allow ``tis_cap`` with ``top_p < 1`` or ``top_k > 0`` anyway (the engine's
            log-probs are then of the truncated distribution, the trainer's of the full one: the weights < 1).
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
        zero3_gather_for_generation: bool = True,
        eval_do_sample: bool = False,
        sample_log_interval: int = 10,
        num_logged_samples: int = 4,
        environment: str | dict[str, Any] | EnvironmentSpec | None = None,
        max_turns: int = 4,
        max_observation_tokens: int = 256,
        end_on_cut_turn: bool = True,
        rollout_engine: str = "hf",
        rollout_engine_args: dict[str, Any] | None = None,
        tis_cap: float | None = None,
        tis_with_truncated_sampling: bool = False,
        **kwargs: Any,
    ) -> None:
        if "position_ids_from_mask" in kwargs:  # removed: read from the model (models/positions.py)
            kwargs.pop("position_ids_from_mask")
            warnings.warn(
                "position_ids_from_mask is ignored and will be refused in a later release: the RL modules now "
                "leave positions to every model that computes its own (e.g. Qwen2-VL's M-RoPE)",
                DeprecationWarning,
                stacklevel=2,
            )
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
        self.reward_fns = WeightedRewards(as_config_list(RewardSpec, reward_functions, "reward_functions"))
        if reward_model_name_or_path is None and not len(self.reward_fns):
            raise ValueError("give a reward_model_name_or_path and/or reward_functions")
        self.reward_model_name_or_path = reward_model_name_or_path
        self.reward_model_weight = reward_model_weight
        self.num_mini_batches = num_mini_batches
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.forward_batch_size = forward_batch_size
        self.max_grad_norm = max_grad_norm
        self.missing_eos_penalty = missing_eos_penalty
        self.disable_dropout = disable_dropout
        self.zero3_gather_for_generation = zero3_gather_for_generation
        self.eval_do_sample = eval_do_sample
        self.sample_log_interval = sample_log_interval
        self.num_logged_samples = num_logged_samples
        if max_turns < 1 or max_observation_tokens < 1:
            raise ValueError("max_turns and max_observation_tokens must be >= 1")
        # a name or an Environment instance is built as is; a spec (or its dict) is kept, typed, beside it
        self.environment_spec = (
            None
            if environment is None or isinstance(environment, (str, Environment))
            else as_config(EnvironmentSpec, environment, "environment")
        )
        self.environment = (
            build_environment(self.environment_spec or environment) if environment is not None else None
        )
        self.max_turns = max_turns
        self.max_observation_tokens = max_observation_tokens
        self.end_on_cut_turn = end_on_cut_turn
        if rollout_engine not in rollout_engine_names():
            build_rollout_engine(rollout_engine)  # raises: the unknown name with the known ones
        if tis_cap is not None and not tis_cap >= 1.0:
            raise ValueError(f"tis_cap must be >= 1 (a cap on pi_trainer / pi_engine), got {tis_cap}")
        check_tis_truncation(tis_cap, self.generation, tis_with_truncated_sampling)
        self.rollout_engine_name = rollout_engine
        self.rollout_engine_args = dict(rollout_engine_args or {})
        self.tis_cap = tis_cap
        self.tis_with_truncated_sampling = tis_with_truncated_sampling
        self._rollout_index = 0
        self._base_seed: int | None = rollout_seed
        self._val_sums: dict[str, UniqueSampleSums] = {}  # the current validation epoch's table

    def max_policy_tokens(self) -> int:
        """The most policy tokens one episode can hold: the ``constant`` loss normaliser's ``L``.

        One turn: ``max_new_tokens``; with an environment every one of up to ``max_turns`` policy turns may use
        ``max_new_tokens`` (environment tokens are masked out, so they do not count)."""
        turns = self.max_turns if self.environment is not None else 1
        return turns * self.generation.max_new_tokens

    # -- models ----------------------------------------------------------------------------------------
    def build_actor(self) -> None:
        """Actor (``self.model``), tokenizer/processor, and the frozen reward model."""
        model, self.tokenizer, self.processor = self.load_model()
        if self.disable_dropout:
            disable_dropout(model)
        self.model = self.prepare_trainable(model)
        if explains_its_outputs(model) and trajectory_family(model) is None:
            raise ValueError(
                f"{self.model_name_or_path!r}: this model family scores whole outputs itself (explain_outputs) "
                "and samples no step-by-step trajectories, so online RL has no per-step log-probs to train on; "
                "use SFT / DPO / KTO with it"
            )
        if self.environment is not None and trajectory_family(model) is not None:
            raise ValueError(
                f"environment: {self.model_name_or_path!r} samples trajectories (decoded media), not text turns "
                "an environment could answer; multi-turn rollouts need a text-generating model"
            )
        if self.reward_model_name_or_path and trajectory_family(model) is not None:
            raise ValueError(
                f"reward_model_name_or_path {self.reward_model_name_or_path!r}: a score model reads token "
                f"sequences, but {self.model_name_or_path!r} samples trajectories whose outputs are decoded "
                "media; score them with reward_functions instead"
            )
        if self.reward_model_name_or_path:
            self.load_frozen("reward", self.reward_model_name_or_path, score_model=True)

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
        # a critic may start from the actor (no head): a new value head, with a bias (a value baseline)
        model, tokenizer, _ = self.load_model(
            path,
            score_model=True,
            score_head_init_std=head_init_std,
            new_score_head=True,
            score_head_bias=True,
        )
        if not self._same_tokenizer(tokenizer):
            raise ValueError(
                f"critic {path!r} has a different tokenizer than the actor; critics score the actor's "
                "token ids, so start them from a checkpoint with the same vocabulary"
            )
        if head_init_std is not None and not has_score_head(resolve_model_path(path)):
            init_score_head(model.score_head, head_init_std)
        if self.disable_dropout:
            disable_dropout(model)
        if self.lora is not None:  # critics train fully: LoRA is applied to the actor only
            model.train()
            return model
        return self.prepare_trainable(model)

    # -- fit ---------------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            raise ValueError(
                "fp16 mixed precision (GradScaler) is not supported by the RL modules; use bf16-mixed"
            )
        if self._base_seed is None:
            self._base_seed = int(torch.initial_seed()) % (2**31)
        self.check_sampling_correction()

    def on_fit_end(self) -> None:
        super().on_fit_end()
        self.close_rollout_engine()

    # -- training loop glue ----------------------------------------------------------------------------
    def split_batch(self, batch: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """``(prompt batch, ptx batch | None)``: a dict of loaders ``{"prompt": ..., "ptx": ...}`` gives both."""
        if isinstance(batch, dict) and PROMPT_STREAM in batch and isinstance(batch[PROMPT_STREAM], dict):
            return batch[PROMPT_STREAM], batch.get(PTX_STREAM)
        return batch, None

    # -- validation: score the policy on held-out prompts ----------------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        prompts = self.split_batch(batch)[0]
        rollout = self.generate_rollout(
            prompts, do_sample=self.eval_do_sample, seed_offset=1_000_000 + batch_idx
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
