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
from pathlib import Path

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # the benchmarks folder is not part of the installed package
    sys.path.insert(0, REPO)

from benchmarks.common import AA_ONLY, GENERATING, WORKLOADS, BenchConfig, CountingCollator, StepTimer  # noqa: E402
from benchmarks.run import median_result, table, thread_counts, update_readme  # noqa: E402

HAS_TRL = importlib.util.find_spec("trl") is not None


def _run(
    tmp_path, sides: str, workloads: str = "sft", timeout: float = 300, in_process: bool = False
) -> dict:
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.run",
        "--workloads",
        workloads,
        "--smoke",
        "--steps",
        "2",
        "--threads",
        "1",
        "--sides",
        sides,
        "--json",
        str(out),
        *(["--in-process"] if in_process else []),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = workloads.split(",")[0]
    assert f"| {first} | 1 |" in proc.stdout and "first optimizer step (warm-up) is excluded" in proc.stdout
    return json.loads(out.read_text())


def _check_side(record: dict, tokens: bool = True) -> None:
    assert "error" not in record, record.get("error")
    assert record["timed_steps"] == 1  # 2 steps, the first is the excluded warm-up
    assert record["rate"] > 0 and math.isfinite(record["rate"])
    assert record["peak_rss_mb"] > 0
    assert record["slowest_over_median"] == 1.0  # one timed step: it is its own median
    if tokens:
        assert record["tokens"] > 0
    if record["workload"] in GENERATING:  # sampling is timed apart from the rest of the step
        assert 0 < record["generate_s"] <= record["seconds"]
    else:
        assert record["generate_s"] == 0


@pytest.mark.skipif(
    not HAS_TRL, reason="TRL is not installed (pip install -e .[bench]); the aa-only smoke test runs"
)
def test_benchmark_smoke_both_sides(tmp_path) -> None:
    row = _run(tmp_path, "trl,aa")["rows"][0]
    _check_side(row["trl"])
    _check_side(row["aa"])
    # both sides trained on the same rows and batches; TRL's prompt-completion encoding keeps the chat
    # template's newline after <|im_end|> on rows that were not truncated (aa-lightning ends a row at the
    # end-of-turn token), so TRL may count one token more per row of the timed batch (2 rows here)
    assert 0 <= row["trl"]["tokens"] - row["aa"]["tokens"] <= 2


def test_every_workload_runs_on_the_aa_side(tmp_path) -> None:
    """Every workload of the table (the aa-lightning side: the TRL side of each is checked where TRL is
    installed, below) still runs and reports; one invocation, 2 steps each, in one process (``--in-process``:
    the frameworks are imported once; the subprocess path is the sft test above)."""
    rows = _run(tmp_path, "aa", ",".join(WORKLOADS), timeout=900, in_process=True)["rows"]
    assert [r["workload"] for r in rows] == list(WORKLOADS)
    for row in rows:
        assert "trl" not in row
        _check_side(row["aa"], tokens=row["workload"] in ("sft", "dpo", "rm"))


@pytest.mark.skipif(not HAS_TRL, reason="TRL is not installed (pip install -e .[bench])")
def test_every_trl_workload_runs(tmp_path) -> None:
    """The TRL side of every workload that has one (the aa side is covered above)."""
    names = [w for w in WORKLOADS if w not in AA_ONLY and w != "sft"]
    rows = _run(tmp_path, "trl", ",".join(names), timeout=900, in_process=True)["rows"]
    for row in rows:
        _check_side(row["trl"], tokens=row["workload"] in ("dpo", "rm"))


def test_kto_rows_skip_the_pairs_the_formatter_refuses(tmp_path) -> None:
    """The full-size KTO rows reach HH-RLHF pair 86 (an empty chosen reply), which the DPO/RM workloads skip
    as a bad row: KTO's unpairing skips it too instead of stopping the whole benchmark run."""
    from benchmarks.build_model import resolve
    from benchmarks.run import prepare_kto_data

    aa_file, trl_file, template = prepare_kto_data(resolve("bench"), tmp_path, rows=256, max_length=256)
    aa_rows = [json.loads(line) for line in Path(aa_file).read_text().splitlines()]
    trl_rows = [json.loads(line) for line in Path(trl_file).read_text().splitlines()]
    assert template == "KTO" and len(aa_rows) == len(trl_rows) > 200
    assert all(row["messages"][-1]["content"].strip() for row in aa_rows)


def test_table_ratio_and_failures() -> None:
    config = BenchConfig(workload="sft", side="aa", model_path="m", work_dir="w", steps=5, threads=1)
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
    assert "| sft | 1 | samples/s | 2.00 | 3.00 | **1.50x** | 100 | 90 | - | - |" in text
    assert "| dpo_precomputed | 1 | samples/s | - | 4.00 | **2.00x** |" in text
    assert "TRL failed: ValueError: bad" in text
    assert "steps 2..5" in text


def test_median_run_spread_and_steadiness() -> None:
    """Three runs: the median one is reported, with the min-max of the rates and the median step ratio."""
    runs = [
        {"rate": 3.0, "peak_rss_mb": 300.0, "slowest_over_median": 1.1},
        {"rate": 1.0, "peak_rss_mb": 100.0, "slowest_over_median": 2.0},
        {"rate": 2.0, "peak_rss_mb": 200.0, "slowest_over_median": 1.2},
        {"error": "boom"},
    ]
    med = median_result(runs)
    assert med["rate"] == 2.0 and (med["rate_min"], med["rate_max"]) == (1.0, 3.0)
    assert med["peak_rss_mb_median"] == 200.0 and med["slowest_over_median_median"] == 1.2
    assert med["failed_runs"] == 1
    config = BenchConfig(workload="rm", side="aa", model_path="m", work_dir="w", steps=5)
    text = table([{"workload": "rm", "threads": 2, "trl": med, "aa": med}], config)
    assert (
        "| rm | 2 | samples/s | 2.00 (1.00-3.00) | 2.00 (1.00-3.00) | **1.00x** | 200 | 200 | 1.20 | 1.20 |"
        in text
    )
    assert thread_counts("2,1,2", "cpu") == [2, 1]
    assert thread_counts(None, "cpu")[-1] == 1


def test_readme_table_is_replaced_between_markers(tmp_path) -> None:
    from benchmarks.run import TABLE_END, TABLE_START

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{TABLE_START}\nold table\n{TABLE_END}\noutro\n")
    update_readme("| new |", readme)
    assert readme.read_text() == f"intro\n{TABLE_START}\n| new |\n{TABLE_END}\noutro\n"


def test_step_timer_and_token_counter() -> None:
    timer = StepTimer()
    assert timer.timed_steps == 0 and math.isnan(timer.seconds)
    for _ in range(3):
        timer.step_end()
    assert timer.timed_steps == 2 and timer.seconds >= 0
    assert len(timer.step_times) == 2 and abs(sum(timer.step_times) - timer.seconds) < 1e-9

    import torch

    counter = CountingCollator(lambda rows: {"attention_mask": torch.tensor(rows)})
    counter([[1, 1, 0]])
    counter([[1, 0, 0], [1, 1, 1]])
    assert counter.counts == [2, 4]
    assert counter.square_sums == [2**2, 1**2 + 3**2]
    packed = CountingCollator(
        lambda rows: {"input_ids": torch.ones(1, 6), "position_ids": torch.tensor(rows)}
    )
    packed([[0, 1, 2, 0, 0, 1]])  # a padding-free batch: rows of 3, 1 and 2 tokens
    assert packed.counts == [6] and packed.square_sums == [9 + 1 + 4]


def test_padding_free_sft_has_a_trl_side_only_under_varlen_attention() -> None:
    """TRL's padding_free batches attend across rows unless the kernel takes sequence boundaries."""
    from benchmarks.common import has_trl_side
    from benchmarks.trl_side import RUNNERS

    assert not has_trl_side("sft_padding_free", "sdpa") and has_trl_side(
        "sft_padding_free", "flash_attention_2"
    )
    assert has_trl_side("sft", "sdpa") and not has_trl_side("rm_padding_free", "flash_attention_2")
    config = BenchConfig(workload="sft_padding_free", side="trl", model_path="unused", work_dir="unused")
    with pytest.raises(SystemExit, match="needs flash-attention"):
        RUNNERS["sft_padding_free"](config)


def test_model_flops_per_token_by_hand() -> None:
    """1 layer, hidden 4, 2 heads of 2 (1 KV head), MLP 8, vocab 10, rows of 1 and 3 tokens:
    matmul params = q 4*4 + k,v 2*(4*2) + o 4*4 + MLP 3*4*8 = 144, + head 4*10 = 184;
    attention length sum(len^2)/sum(len) = (1 + 9) / 4 = 2.5 (the mean length 2 would undercount);
    FLOPs/token = 6*184 + 6 * 1 layer * 4 * 2.5 = 1164."""
    from transformers import Qwen2Config

    from benchmarks.mfu import model_flops_per_token

    config = Qwen2Config(
        hidden_size=4,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=8,
        vocab_size=10,
    )
    flops = model_flops_per_token(config, attention_length=(1**2 + 3**2) / (1 + 3))
    assert flops == {"matmul_params": 184.0, "nominal": 1164.0}


def test_update_readme_checks_the_markers_before_running(tmp_path, monkeypatch) -> None:
    """--update-readme against a README without markers fails at once, before any model is built."""
    import benchmarks.run as run

    readme = tmp_path / "README.md"
    readme.write_text("no markers here\n")
    monkeypatch.setattr(run, "README", readme)
    with pytest.raises(SystemExit, match="marker lines"):
        run.main(["--update-readme", "--workloads", "sft", "--model", str(tmp_path / "never-built")])
    assert not (tmp_path / "never-built").exists()
