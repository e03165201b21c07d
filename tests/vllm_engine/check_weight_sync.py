"""The vLLM engine's weight sync, checked end to end (run in the vLLM environment, see .ci/run).

A tiny Qwen2 (built here from a config, the repo's tiny tokenizer) trains with GRPO for ``--updates``
optimizer updates, sampling with ``rollout_engine: vllm``. Every rollout logs
``rollout/engine_logprob_gap``: the mean ``|log p_vLLM - log p_policy|`` of the sampled tokens, vLLM's own
sampling log-probs against the trained policy's recomputed ones. After each update vLLM must serve the
updated policy, so the gap of every rollout after the first (after 1, 2, ... updates) must be float noise,
for plain and LoRA training. The same run with the sync switched off must fail that check (the gap is then
the size of the updates): the check can tell a broken sync. A sync with one module (or one packed part, k_proj
of qkv_proj) left out must raise PartialWeightSyncError naming the vLLM parameter it left stale. The plain
run trains with TIS on (``tis_cap: 2``): with a complete sync every weight ``pi_trainer / pi_vLLM`` must be 1;
so must they at temperature 0.7 (vLLM's processed log-probs and the trainer's both divide the logits by it).

    python tests/vllm_engine/check_weight_sync.py            # exits 1 if any case disagrees

The engine spawns nothing here (colocated, in-process), but vLLM may: the entry point is guarded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[2]
# a broken sync shows gaps of ~0.1-1 nats; float32 noise between vLLM's kernels and transformers' is ~1e-6
TOLERANCE = 1e-3


def build_policy(target: Path) -> str:
    """A 2-layer random Qwen2 with head size 32 (vLLM's CPU attention does not take the tests' 16)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from aa_lightning.testing.tiny_common import build_tiny_tokenizer, save_tiny_model, text_config_kwargs

    tokenizer = build_tiny_tokenizer()
    config = text_config_kwargs(len(tokenizer), tokenizer)
    config.update(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    return save_tiny_model(Qwen2ForCausalLM, Qwen2Config(**config), tokenizer, target, seed=0)


def run_case(
    model_dir: str,
    lora: bool,
    updates: int,
    engine_args: dict[str, Any],
    tis_cap: float | None = None,
    temperature: float = 1.0,
) -> dict[str, Any]:
    """GRPO for ``updates`` updates with the vLLM engine; the gap of every rollout and the engine's timings."""
    import lightning.pytorch as pl

    from aa_lightning.algorithms import GenerationConfig, GRPOModule, LoraConfig, OptimConfig
    from aa_lightning.data import TextToTextDataModule
    from aa_lightning.rewards import RewardSpec

    class Record(pl.Callback):
        def __init__(self) -> None:
            self.gaps: list[float] = []
            self.tis_weights: list[float] = []
            self.engine: Any = None

        def on_train_batch_end(self, trainer: pl.Trainer, module: Any, *args: Any) -> None:
            metrics = trainer.callback_metrics
            self.gaps.append(float(metrics["rollout/engine_logprob_gap"]))
            if "train/tis_weight" in metrics:
                self.tis_weights.append(float(metrics["train/tis_weight"]))
            self.engine = module.rollout_engine()

    pl.seed_everything(0)
    module = GRPOModule(
        model_name_or_path=model_dir,
        reward_functions=[RewardSpec("target_token_share", kwargs={"target": "e"})],
        num_generations=4,
        beta=0.0,
        generation=GenerationConfig(max_new_tokens=8, temperature=temperature),
        optim=OptimConfig(lr=2e-2, warmup_steps=0, scheduler="constant"),
        lora=LoraConfig(r=8, alpha=16, dropout=0.0) if lora else None,
        sample_log_interval=0,
        rollout_engine="vllm",
        rollout_engine_args={"max_model_len": 256, **engine_args},
        tis_cap=tis_cap,
    )
    data = TextToTextDataModule(
        model_name_or_path=model_dir,
        train={"path": str(REPO / "configs/data/alpaca_200.json"), "template": "Alpaca", "size": 32},
        max_length=64,
        batch_size=4,
    )
    record = Record()
    trainer = pl.Trainer(
        max_steps=updates + 1,  # rollout k (k = 0 .. updates) samples after k updates
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[record],
    )
    try:
        trainer.fit(module, data)
    finally:
        module.close_rollout_engine()  # also when the sync refused (fit then stops before on_fit_end)
    return {
        "gaps": record.gaps,
        "tis_weights": record.tis_weights,
        "engine_start_s": record.engine.start_seconds,
        "sync_s": record.engine.sync_seconds,
    }


CASES: list[tuple[str, bool, dict[str, Any], str]] = [
    # name, LoRA, engine args, expectation: "synced" (the gaps after updates are float noise), "stale" (they
    # are not), or the vLLM parameter the sync must name in its PartialWeightSyncError (raised at the first sync)
    ("plain, with TIS", False, {}, "synced"),
    ("plain, temperature 0.7, with TIS", False, {}, "synced"),  # temperature is applied on both sides
    ("plain, no sync", False, {"sync_weights": False}, "stale"),
    (
        "plain, one module left out",
        False,
        {"skip_sync_modules": ["model.layers.1.mlp.down_proj.*"]},
        "model.layers.1.mlp.down_proj.weight",
    ),
    (
        "plain, one packed part left out",
        False,
        {"skip_sync_modules": ["model.layers.0.self_attn.k_proj.*"]},
        "model.layers.0.self_attn.qkv_proj.weight (2 of its 3 packed parts",
    ),
    ("lora (merged)", True, {}, "synced"),
    (
        "lora, one adapted module left out",
        True,
        {"skip_sync_modules": ["model.layers.0.self_attn.o_proj.*"]},
        "model.layers.0.self_attn.o_proj.weight",
    ),
]


def judge(result: dict[str, Any], expect: str, tis: bool) -> bool:
    """Whether a case's run shows what it must (see CASES)."""
    if expect not in ("synced", "stale"):  # a partial sync: refused, naming what it left out
        return expect in result.get("sync_error", "")
    if "sync_error" in result:
        return False
    after_updates = max(result["gaps"][1:])
    # the first rollout precedes every update: engine and trainer hold the same (initial) weights
    ok = result["gaps"][0] < TOLERANCE and (after_updates < TOLERANCE) == (expect == "synced")
    if tis:  # synced: pi_trainer / pi_vLLM is 1 up to float noise, so is every weight
        ok = ok and len(result["tis_weights"]) == len(result["gaps"])
        ok = ok and all(abs(w - 1.0) < TOLERANCE for w in result["tis_weights"])
    return ok


def main() -> int:
    from aa_lightning.algorithms.rl.rollout_engines.vllm_engine import PartialWeightSyncError

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=3)
    parser.add_argument("--only", default=None, help="run the cases whose name contains this")
    args = parser.parse_args()
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_policy(Path(tmp) / "policy")
        for name, lora, engine_args, expect in CASES:
            if args.only and args.only not in name:
                continue
            began = time.perf_counter()
            tis_cap = 2.0 if "TIS" in name else None
            temperature = 0.7 if "temperature 0.7" in name else 1.0
            try:
                result = run_case(model_dir, lora, args.updates, engine_args, tis_cap, temperature)
            except PartialWeightSyncError as err:
                result = {"sync_error": str(err)}
            ok = judge(result, expect, tis_cap is not None)
            result.update(case=name, ok=ok, expect=expect)
            result["wall_s"] = round(time.perf_counter() - began, 1)
            print(json.dumps(result), flush=True)
            if not ok:
                failures.append(name)
    if failures:
        print(f"FAILED: {failures} (tolerance {TOLERANCE})", file=sys.stderr)
        return 1
    print(f"vLLM weight sync: every case as expected (tolerance {TOLERANCE})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
