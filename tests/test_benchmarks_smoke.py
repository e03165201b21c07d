"""The side-by-side benchmark command keeps working (no timing is asserted: only that it runs and reports).

With TRL installed (``pip install -e .[bench]``) both sides run; without it (CI installs ``.[dev]``) the
aa-lightning side runs alone, so the benchmark never rots either way.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # the benchmarks folder is not part of the installed package
    sys.path.insert(0, REPO)

from benchmarks.common import BenchConfig, CountingCollator, StepTimer  # noqa: E402
from benchmarks.run import table  # noqa: E402

HAS_TRL = importlib.util.find_spec("trl") is not None


def _run(tmp_path, sides: str) -> dict:
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.run",
        "--workloads",
        "sft",
        "--smoke",
        "--steps",
        "2",
        "--threads",
        "1",
        "--sides",
        sides,
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        "| sft | samples/s |" in proc.stdout and "first optimizer step (warm-up) is excluded" in proc.stdout
    )
    return json.loads(out.read_text())


def _check_side(record: dict) -> None:
    assert "error" not in record, record.get("error")
    assert record["timed_steps"] == 1  # 2 steps, the first is the excluded warm-up
    assert record["rate"] > 0 and math.isfinite(record["rate"])
    assert record["peak_rss_mb"] > 0 and record["tokens"] > 0


@pytest.mark.skipif(
    not HAS_TRL, reason="TRL is not installed (pip install -e .[bench]); the aa-only smoke test runs"
)
def test_benchmark_smoke_both_sides(tmp_path) -> None:
    row = _run(tmp_path, "trl,aa")["rows"][0]
    _check_side(row["trl"])
    _check_side(row["aa"])
    # both sides trained on exactly the same tokens (same rows, batches, lengths)
    assert row["trl"]["tokens"] == row["aa"]["tokens"]


@pytest.mark.skipif(
    HAS_TRL, reason="TRL is installed: test_benchmark_smoke_both_sides covers the aa side too"
)
def test_benchmark_smoke_aa_side_alone(tmp_path) -> None:
    row = _run(tmp_path, "aa")["rows"][0]
    assert "trl" not in row
    _check_side(row["aa"])


def test_table_ratio_and_failures() -> None:
    config = BenchConfig(workload="sft", side="aa", model_path="m", work_dir="w", steps=5)
    rows = [
        {
            "workload": "sft",
            "trl": {"rate": 2.0, "peak_rss_mb": 100.0},
            "aa": {"rate": 3.0, "peak_rss_mb": 90.0},
        },
        {"workload": "dpo_precomputed", "aa": {"rate": 4.0, "peak_rss_mb": 80.0}, "baseline_rate": 2.0},
        {
            "workload": "rm",
            "trl": {"error": "boom\nValueError: bad"},
            "aa": {"rate": 1.0, "peak_rss_mb": 1.0},
        },
    ]
    text = table(rows, config)
    assert "| sft | samples/s | 2.00 | 3.00 | 1.50x | 100 | 90 |" in text
    assert "| dpo_precomputed | samples/s | - | 4.00 | 2.00x |" in text
    assert "TRL failed: ValueError: bad" in text
    assert "steps 2..5" in text


def test_step_timer_and_token_counter() -> None:
    timer = StepTimer()
    assert timer.timed_steps == 0 and math.isnan(timer.seconds)
    for _ in range(3):
        timer.step_end()
    assert timer.timed_steps == 2 and timer.seconds >= 0

    import torch

    counter = CountingCollator(lambda rows: {"attention_mask": torch.tensor(rows)})
    counter([[1, 1, 0]])
    counter([[1, 0, 0], [1, 1, 1]])
    assert counter.counts == [2, 4]
