"""GRPO with the two rollout engines on the same model: ``hf`` (the policy's own ``generate``) against
``vllm`` (colocated, weights synced after every update). Run it in an environment with vLLM (on CPU the one
``.ci/run`` builds); both sides run in that same environment, one fresh process each:

    python -m benchmarks.grpo_vllm --steps 10                      # CPU, the ~5M bench model
    python -m benchmarks.grpo_vllm --steps 20 --device cuda --bf16 --model smollm2-135m-instruct

The workload is ``grpo`` of ``benchmarks.run`` (2 GSM8K prompts x G=4, 64 new tokens, temperature 1, beta
0.04, one update per rollout); steady state only (step 1, with the engine's start, is not timed). The table
shows completions/s, the time spent sampling per step (for vLLM: with the weight sync), the engine start, the
mean weight-sync time and the last rollout's engine-trainer log-prob gap.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import BenchConfig
from benchmarks.run import machine_summary, prepare_data, run_side


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default 1 on CPU)")
    parser.add_argument("--model", default="bench", help="bench (the ~5M model), an alias or a folder")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    parser.add_argument("--sleep-mode", action="store_true", help="vLLM sleep mode during updates (GPU)")
    parser.add_argument("--timeout", type=float, default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    threads = args.threads or (1 if args.device == "cpu" else (os.cpu_count() or 1))
    if args.model == "bench":
        from benchmarks.build_model import model_path

        path = model_path()
    else:
        from aa_lightning.models import resolve_model_path

        path = resolve_model_path(args.model)
    work = Path(tempfile.mkdtemp(prefix="aa-bench-vllm-"))
    engine_args: dict[str, Any] = {"max_model_len": 1024}
    if args.device.startswith("cuda"):
        engine_args.update(gpu_memory_utilization=args.gpu_memory_utilization, sleep_mode=args.sleep_mode)
    print(f"# model {args.model} ({path})\n# {machine_summary()}", flush=True)
    results = []
    try:
        aa_file, _, template = prepare_data("grpo", path, work / "data", args.rows, 256)
        for engine in ("hf", "vllm"):
            config = BenchConfig(
                workload="grpo_vllm",
                side="aa",
                model_path=path,
                work_dir=str(work / engine),
                data_file=aa_file,
                steps=args.steps,
                max_length=256,
                device=args.device,
                bf16=args.bf16,
                threads=threads,
                max_new_tokens=args.max_new_tokens,
                extra={
                    "template": template,
                    "engine": engine,
                    "engine_args": engine_args if engine != "hf" else {},
                },
            )
            result = run_side(config, args.timeout)
            result.setdefault("engine", engine)
            results.append(result)
            print(
                f"# {engine}: {result.get('error', '').splitlines()[-1:] or round(result['rate'], 3)}",
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(table(results, args.steps))
    return results


def table(results: list[dict[str, Any]], steps: int) -> str:
    def fmt(value: Any, digits: int = 3) -> str:
        return "-" if value is None or value != value else f"{value:.{digits}g}"

    lines = [
        "| engine | completions/s | sampling s/step | sampling share | engine start s | mean sync s | "
        "last gap | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['engine']} | failed: {r['error'].splitlines()[-1][:100]} |  |  |  |  |  |  |")
            continue
        syncs = r.get("engine_sync_s") or []
        lines.append(
            f"| {r['engine']} | {fmt(r['rate'])} | {fmt(r['sampling_s_per_step'])} | {fmt(r['sampling_share'], 2)} "
            f"| {fmt(r.get('engine_start_s'))} | {fmt(sum(syncs) / len(syncs) if syncs else None)} "
            f"| {fmt(r.get('engine_gap') if r['engine'] != 'hf' else None)} | {fmt(r['peak_rss_mb'], 4)} |"
        )
    lines.append(f"\nSteady state: steps 2..{steps} (step 1 holds the engine start and is not timed).")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
