"""Side-by-side benchmarks: every workload runs twice, in fresh processes, once with TRL and once with
aa-lightning, on the same model files, rows, batch size, lengths, dtype and number of steps.

    python -m benchmarks.run                                   # every workload, 20 steps per side
    python -m benchmarks.run --workloads sft,dpo,rm,grpo --steps 20 --repeats 3

Prints one table row per workload: each side's steady-state rate (the first step is excluded), their ratio
and each side's peak resident memory. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.common import AA_ONLY, DATA_DIR, WORKLOADS, BenchConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
UNITS = {
    "sft": "samples/s",
    "dpo": "samples/s",
    "dpo_precomputed": "samples/s",
    "dpo_sparse_head": "samples/s",
    "rm": "samples/s",
    "grpo": "completions/s",
    "gspo": "completions/s",
    "ppo": "completions/s",
}


# --------------------------------------------------------------------------------------------------
# Data: rendered once here with aa-lightning's formatters, so both sides see the same conversations
# --------------------------------------------------------------------------------------------------


def _encode_report(model_path: str, path: str, template: str, kind: str, max_length: int) -> Any:
    from aa_lightning.data import TextToTextDataModule

    dm = TextToTextDataModule(
        model_name_or_path=model_path,
        train={"path": path, "template": template},
        kind=kind,
        max_length=max_length,
        train_on="last_assistant",
        on_bad_row="skip",
    )
    dm.setup("fit")
    return dm


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def prepare_data(
    workload: str, model_path: str, work_dir: Path, rows: int, max_length: int
) -> tuple[str, str, str]:
    """``(aa_file, trl_file, template)``: the same rows, raw for aa-lightning and formatted for TRL.

    Rows that either framework would drop are removed up front (aa-lightning drops rows whose prompt fills
    ``max_length``; TRL's reward trainer drops pairs longer than ``max_length``), so both train on the same
    rows in the same order.
    """
    from aa_lightning.data.formatters import get_formatter

    work_dir.mkdir(parents=True, exist_ok=True)
    if workload == "sft":
        template, source, kind = "Alpaca", DATA_DIR / "alpaca_256.json", "supervised"
        raw = json.loads(source.read_text())[:rows]
    elif workload in ("dpo", "dpo_precomputed", "dpo_sparse_head", "rm"):
        template, source, kind = "HH-RLHF", DATA_DIR / "hh_rlhf_256.jsonl", "preference"
        raw = [json.loads(line) for line in source.read_text().splitlines() if line.strip()][:rows]
    else:
        template, source, kind = "GSM8K", DATA_DIR / "gsm8k_128.jsonl", "prompt_only"
        raw = [json.loads(line) for line in source.read_text().splitlines() if line.strip()][:rows]
    staged = _write_jsonl(work_dir / f"{workload}_staged.jsonl", raw)
    # the reward workload keeps only pairs that fit untruncated (TRL filters longer pairs out)
    limit = 10**6 if workload == "rm" else max_length
    dm = _encode_report(model_path, staged, template, kind, limit)
    report = dm.reports["train"][0]
    dropped = set(report.truncated) | {row for row, _ in report.bad}
    if workload == "rm":
        data = dm.datasets["train"]
        encoded_rows = [i for i in range(len(raw)) if i not in dropped]  # the encoded rows, in order
        for i, (c, r) in zip(encoded_rows, zip(data["chosen_input_ids"], data["rejected_input_ids"])):
            if max(len(c), len(r)) > max_length:
                dropped.add(i)
    kept = [row for i, row in enumerate(raw) if i not in dropped]
    formatter = get_formatter(template)
    trl_rows = []
    for row in kept:
        if kind == "supervised":
            conversation, _ = formatter.format_supervised_sample(row)
            trl_rows.append({"prompt": conversation[:-1], "completion": conversation[-1:]})
        elif kind == "preference":
            chosen, rejected, _ = formatter.format_preference_sample(row)
            trl_rows.append({"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]})
        else:
            conversation, meta = formatter.format_prompt_only_sample(row)
            trl_rows.append({"prompt": conversation, "reference_answer": meta["reference_answer"]})
    aa_file = _write_jsonl(work_dir / f"{workload}_aa.jsonl", kept)
    trl_file = _write_jsonl(work_dir / f"{workload}_trl.jsonl", trl_rows)
    return aa_file, trl_file, template


# --------------------------------------------------------------------------------------------------
# Running the two sides
# --------------------------------------------------------------------------------------------------


def run_side(config: BenchConfig, timeout: float | None = None) -> dict[str, Any]:
    """Run one side in a fresh interpreter; its result record, or ``{"error": ...}``."""
    work = Path(config.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    config_path = work / f"{config.workload}-{config.side}.config.json"
    result_path = work / f"{config.workload}-{config.side}.result.json"
    config_path.write_text(config.to_json())
    if result_path.exists():
        result_path.unlink()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.worker", str(config_path), str(result_path)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0 or not result_path.exists():
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-15:]
        return {"workload": config.workload, "side": config.side, "error": "\n".join(tail), "wall_s": wall}
    result = json.loads(result_path.read_text())
    result["wall_s"] = wall
    return result


def profile_extra(folder: str | None, workload: str, side: str) -> dict[str, str]:
    if not folder:
        return {}
    os.makedirs(folder, exist_ok=True)
    return {"profile": os.path.abspath(os.path.join(folder, f"{workload}-{side}.txt"))}


def median_result(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median rate (a real run, so its memory and details stay consistent)."""
    ok = [r for r in results if "error" not in r]
    if not ok:
        return results[-1]
    ordered = sorted(ok, key=lambda r: r["rate"])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["all_rates"] = [r["rate"] for r in ok]
    return chosen


def fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(rows: list[dict[str, Any]], config: BenchConfig) -> str:
    """Markdown table of the side-by-side figures."""
    lines = [
        "| workload | unit | TRL | aa-lightning | ratio aa/TRL | TRL peak RSS MB | aa peak RSS MB | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        trl, aa = row.get("trl"), row.get("aa")
        trl_rate = trl.get("rate") if trl and "error" not in trl else None
        aa_rate = aa.get("rate") if aa and "error" not in aa else None
        baseline = trl_rate if trl_rate is not None else row.get("baseline_rate")
        ratio = aa_rate / baseline if aa_rate and baseline else None
        notes = list(row.get("notes", []))
        for side, rec in (("TRL", trl), ("aa", aa)):
            if rec and "error" in rec:
                notes.append(f"{side} failed: {rec['error'].splitlines()[-1][:120]}")
            elif rec and rec.get("tokens_per_s"):
                notes.append(f"{side} {rec['tokens_per_s']:.0f} tok/s")
        lines.append(
            "| "
            + " | ".join(
                [
                    row["workload"],
                    UNITS.get(row["workload"], ""),
                    fmt(trl_rate),
                    fmt(aa_rate),
                    f"{ratio:.2f}x" if ratio else "-",
                    fmt(trl.get("peak_rss_mb"), 0) if trl and "error" not in trl else "-",
                    fmt(aa.get("peak_rss_mb"), 0) if aa and "error" not in aa else "-",
                    "; ".join(notes),
                ]
            )
            + " |"
        )
    lines.append("")
    lines.append(
        f"Steady state only: the first optimizer step (warm-up) is excluded; rates are over steps 2..{config.steps}. "
        f"batch {config.batch_size}, max length {config.max_length}, {'bf16 mixed' if config.bf16 else 'fp32'}, "
        f"device {config.device}, {config.threads} torch threads."
    )
    return "\n".join(lines)


def machine_summary() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = f"{names[0]} x{len(names)}" if names else cpu
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}; {gpu}; torch {torch.__version__}; python {platform.python_version()}; load avg {load:.2f}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="TRL vs aa-lightning, side by side")
    parser.add_argument(
        "--workloads",
        default="sft,dpo,dpo_precomputed,dpo_sparse_head,rm,grpo,gspo,ppo",
        help=f"comma-separated, from {','.join(WORKLOADS)}",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimizer steps per side, the first not timed (default 20; smoke 3)",
    )
    parser.add_argument("--batch-size", type=int, default=None, help="default 8 (smoke 2)")
    parser.add_argument("--max-length", type=int, default=None, help="default 256 (smoke 96)")
    parser.add_argument(
        "--rows", type=int, default=None, help="data rows, the first N of each file (default 256; smoke 16)"
    )
    parser.add_argument(
        "--model",
        default="bench",
        help="'bench' (the ~5M Qwen2 built by benchmarks.build_model), an alias such as "
        "smollm2-135m-instruct, or a local folder",
    )
    parser.add_argument(
        "--smollm2", action="store_true", help="shortcut for --model smollm2-135m-instruct (slow)"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision on both sides")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads on both sides (default: 1 on CPU, where a busy shared machine makes "
        "multi-threaded timings swing several-fold; all cores on GPU machines)",
    )
    parser.add_argument(
        "--exact-memory",
        action="store_true",
        help="children use MALLOC_MMAP_THRESHOLD_=131072, so peak RSS measures live tensors rather "
        "than glibc's cached heap (deterministic memory figures, a little slower on both sides)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run each side this many times (alternating which goes first); report the median",
    )
    parser.add_argument("--sides", default="trl,aa", help="trl,aa (default) or just one of them")
    parser.add_argument(
        "--max-new-tokens", type=int, default=None, help="GRPO/PPO completion length (default 64; smoke 8)"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes (3 steps, 16 rows, length 96, batch 2, 8 new tokens) unless given: checks it runs",
    )
    parser.add_argument("--json", default=None, help="also write all result records here")
    parser.add_argument("--work-dir", default=None, help="keep prepared data and logs here")
    parser.add_argument(
        "--profile",
        default=None,
        help="write a torch.profiler table per side into this folder (slows the run down)",
    )
    parser.add_argument("--timeout", type=float, default=None, help="seconds allowed per side")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    defaults = (
        dict(steps=3, rows=16, max_length=96, batch_size=2, max_new_tokens=8)
        if args.smoke
        else dict(steps=20, rows=256, max_length=256, batch_size=8, max_new_tokens=64)
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = sorted(set(workloads) - set(WORKLOADS))
    if unknown:
        raise SystemExit(f"unknown workloads {unknown}; choose from {WORKLOADS}")
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if args.threads is None:
        args.threads = 1 if args.device == "cpu" else (os.cpu_count() or 1)
    if args.exact_memory:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"  # inherited by the children
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

    from benchmarks.build_model import model_path as bench_model_path

    model = "smollm2-135m-instruct" if args.smollm2 else args.model
    if model == "bench":
        path = bench_model_path()
    else:
        from aa_lightning.models import resolve_model_path

        path = resolve_model_path(model)
    work_root = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="aa-bench-"))
    base = BenchConfig(
        workload="sft",
        side="trl",
        model_path=path,
        work_dir=str(work_root),
        steps=args.steps,
        batch_size=args.batch_size,
        max_length=args.max_length,
        device=args.device,
        bf16=args.bf16,
        threads=args.threads,
        max_new_tokens=args.max_new_tokens,
        prompts_per_step=max(1, args.batch_size // 4) if args.smoke else 2,
        num_generations=2 if args.smoke else 4,
    )
    print(f"# model {model} ({path})\n# {machine_summary()}", flush=True)
    rows: list[dict[str, Any]] = []
    by_name: dict[str, dict[str, Any]] = {}
    try:
        for workload in workloads:
            aa_file, trl_file, template = prepare_data(
                workload, path, work_root / "data", args.rows, args.max_length
            )
            row: dict[str, Any] = {"workload": workload, "notes": []}
            runs: dict[str, list[dict[str, Any]]] = {"trl": [], "aa": []}
            order = [s for s in ("trl", "aa") if s in sides and not (s == "trl" and workload in AA_ONLY)]
            for repeat in range(args.repeats):
                for side in order if repeat % 2 == 0 else order[::-1]:
                    config = replace(
                        base,
                        workload=workload,
                        side=side,
                        data_file=trl_file if side == "trl" else aa_file,
                        work_dir=str(work_root / workload / f"{side}-{repeat}"),
                        extra={"template": template, **profile_extra(args.profile, workload, side)},
                    )
                    result = run_side(config, args.timeout)
                    runs[side].append(result)
                    status = result.get("error", "").splitlines()[-1:] or [
                        f"{result['rate']:.3f} {UNITS[workload]}"
                    ]
                    print(f"# {workload:16s} {side:3s} run {repeat + 1}: {status[0]}", flush=True)
            for side in ("trl", "aa"):
                if runs[side]:
                    row[side] = median_result(runs[side])
            if workload.startswith("dpo_") and "dpo" in by_name and by_name["dpo"].get("trl"):
                row["baseline_rate"] = by_name["dpo"]["trl"].get("rate")
                row["notes"].append("ratio vs TRL dpo (live reference)")
            if workload == "dpo_precomputed":
                row["notes"].append("reference pass before step 1 not timed")
            if workload == "dpo_sparse_head":
                row["notes"].append("proposed DPOModule change, measured via a benchmark subclass")
            if workload == "ppo":
                row["notes"].append("TRL has no PPO trainer: see the PPO breakdown below")
            rows.append(row)
            by_name[workload] = row
    finally:
        if not args.work_dir:
            shutil.rmtree(work_root, ignore_errors=True)
    print()
    print(table(rows, base))
    extras = [row["aa"].get("breakdown") for row in rows if row.get("aa") and row["aa"].get("breakdown")]
    for breakdown in extras:
        print()
        print(breakdown)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_summary(), "model": model, "rows": rows}, f, indent=1, default=str)
    return rows


if __name__ == "__main__":
    main()
