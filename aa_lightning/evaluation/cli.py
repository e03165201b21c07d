"""``aa eval``: score a trained run or any model on a suite of tasks from a YAML config.

aa eval --config configs/eval/tiny_suite.yaml
aa eval --config configs/eval/tiny_suite.yaml --model runs/sft --limit 20 --output_dir runs/sft/eval
torchrun --nproc_per_node 2 -m aa_lightning.cli eval --config configs/eval/tiny_suite.yaml   # rows shared
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml

from aa_lightning.data.errors import DataFormatError

__all__ = ["main", "parse"]


def parse(argv: list[str] | None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="aa eval", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--config", help="YAML with model, tasks, generation, ... (aa_lightning.evaluation.EvalConfig)"
    )
    parser.add_argument("--model", help="run folder, model folder, hub name or alias (overrides the config)")
    parser.add_argument("--tasks", help="comma-separated task names: run only these of the config")
    parser.add_argument("--output_dir", help="where results.json, <task>.jsonl and tensorboard/ go")
    parser.add_argument("--limit", type=int, help="at most this many rows per task")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", help="auto, float32, bfloat16, float16")
    parser.add_argument("--max_new_tokens", type=int, help="generation length of every task")
    parser.add_argument("--step", type=int, help="TensorBoard step of the scalars")
    parser.add_argument("--no_tensorboard", action="store_true", help="write no TensorBoard scalars")
    args = parser.parse_args(argv)
    config: dict[str, Any] = {}
    if args.config:
        with open(args.config, encoding="utf-8") as handle:
            config = yaml.safe_load(handle) or {}
        if not isinstance(config, dict):
            parser.error(f"{args.config}: expected a mapping (model:, tasks:, ...)")
    for key in ("model", "output_dir", "limit", "device", "dtype", "step"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    if args.max_new_tokens is not None:
        config["generation"] = {**config.get("generation", {}), "max_new_tokens": args.max_new_tokens}
    if args.no_tensorboard:
        config["tensorboard"] = False
    if args.tasks:
        wanted = [t.strip() for t in args.tasks.split(",") if t.strip()]
        known = {entry.get("name") or entry.get("task"): entry for entry in config.get("tasks", [])}
        unknown = [t for t in wanted if t not in known]
        if unknown:
            parser.error(
                f"--tasks {','.join(unknown)}: not in the config (it has {', '.join(map(str, known))})"
            )
        config["tasks"] = [known[t] for t in wanted]
    return config


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``aa eval``; a mistake in the config, data or model path is one line and status 2."""
    config = parse(argv)
    from aa_lightning.evaluation.runner import evaluate

    try:
        evaluate(config)
    except (ValueError, FileNotFoundError, ImportError, DataFormatError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
