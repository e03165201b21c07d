"""One side of one workload in a fresh process: ``python -m benchmarks.worker CONFIG.json RESULT.json``.

``benchmarks.run`` starts it; it sets the thread count and seeds before importing either framework, runs the
workload and writes the result record (steady-state rate, peak memory) as JSON.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings


def runners(side: str) -> dict:
    """The workload functions of one side (imported only when asked: each side's memory is its own)."""
    if side == "trl":
        from benchmarks.trl_side import RUNNERS
    else:
        from benchmarks.aa_side import RUNNERS
    return RUNNERS


def run_in_process(config) -> dict:  # noqa: ANN001 - a BenchConfig
    """One side in THIS process (``benchmarks.run --in-process``, the smoke test): same code path, no fresh
    interpreter, so its memory and speed figures are not that side's own."""
    import traceback

    from benchmarks.common import setup_process

    setup_process(config)
    try:
        return runners(config.side)[config.workload](config)
    except Exception:
        return {"workload": config.workload, "side": config.side, "error": traceback.format_exc()}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    config_path, result_path = argv
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)

    from benchmarks.common import BenchConfig, setup_process, write_result

    with open(config_path) as f:
        config = BenchConfig.from_json(f.read())
    setup_process(config)
    RUNNERS = runners(config.side)
    profile_path = config.extra.get("profile")
    if not profile_path:
        write_result(result_path, RUNNERS[config.workload](config))
        return
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = RUNNERS[config.workload](config)
    write_result(result_path, result)
    with open(profile_path, "w") as f:
        f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))


if __name__ == "__main__":
    main()
