"""The strategy matrix: every algorithm under every training strategy, on the tiny models (issue 10, section 2).

Rows: SFT, reward model, cost model, DPO (live reference and precomputed reference log-probs), SimPO, ORPO,
KTO, PPO (frozen reward model, critic started from it), GRPO, Safe-RLHF (frozen cost model); DPO and PPO on
tiny-llava (image) and tiny-qwen2-audio (audio); SFT and DPO on text-to-image diffusion (tiny-sd) and on
autoregressive image tokens (tiny-emu3, also with LoRA). Columns (``strategy_matrix/cells.py``): one process, bf16-mixed,
DDP on 2 processes, ZeRO-2, ZeRO-3 on 1 and on 2 processes (every tensor sharded), LoRA, LoRA + ZeRO-3; and the
tiny twins of the shipped ZeRO-3 configs through the ``aa`` CLI.

Each column runs ONCE per session, all its cells in one process (2-process columns: one launched pair of
ranks), through a session-scoped cache; the tests below only read its per-cell JSON records. What each cell must
show, and against what:

1. It ran: 2 optimizer steps on every rank, every logged number finite; or, when the combination is declared
   unsupported (``cells.UNSUPPORTED``), it was refused before the first step with ONE line matching the pattern.
2. Its first step equals the reference column's (``single`` for full weights, ``lora`` for LoRA):
   * the loss: the mean over ranks of the loss each rank back-propagated (DDP and ZeRO average the ranks'
     gradients, so that mean is the objective the step descends; the global batch is the same rows as the
     reference's, each rank holding half): ``rel 1e-4 + abs 1e-5``;
   * the gradient norm: the module's ``train/grad_norm`` (global, before clipping), else the harness's own
     measurement: ``rel 1e-3``. Where both exist they must agree (``rel 1e-4``);
   * one-process columns also compare every other ``train/*`` and ``rollout/*`` scalar of step 1 (same rows,
     same sampling seeds, hence the same rollouts): ``rel 1e-3 + abs 1e-4``;
   * bf16-mixed runs its matmuls with 8-bit mantissas: the same checks with every tolerance x30 (measured: up
     to 4e-3 relative on gradient norms, 1.4e-2 on PPO's explained variance);
   * RL on 2 processes: each rank generates for its half of the prompts from a seed that includes its rank, so
     no one-process run samples the same rollouts and there is nothing to compare with. Instead every logged
     number must be identical on both ranks (they are reduced over ranks) and finite.
3. Ranks agree: on 2 processes the trained model gives the same outputs on every rank. And at the first step
   the policy is its own reference (same weights and dtype, also under bf16, ZeRO-3 and LoRA's adapters-off
   reference): DPO's implicit rewards, KTO's rewards and KL, the RL rollouts' KL are 0 (``abs 1e-6``).
4. Training moved the weights (the trained model's outputs differ from those at the start of training), and the
   HF export (``HFExportCallback``) has no empty and no non-finite tensor, reloads with ``from_pretrained``
   (``ScoreModel.from_pretrained`` for score models; these also through ``AutoModelForSequenceClassification``,
   whose per-row scores must equal the trained end scores) with no missing key (unexpected keys: one test per
   column), and gives the trained model's logits (scores) on the probe rows: ``abs 1e-4 + rel 1e-4`` of the
   largest output (``rel 2e-2`` when the weights are bf16, as in the shipped configs: other kernels round bf16
   differently). Under ZeRO-3 the trained outputs come from the sharded model itself (every layer gathered by
   its forward).

Set ``AA_MATRIX_COLUMNS=single,zero3`` to run some columns only. ``AA_MATRIX_OUT=<dir>`` keeps the records
(and reuses the ones already there).
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import pytest
from strategy_matrix.cells import ALGORITHMS, COLUMNS, UNSUPPORTED, column_cells
from strategy_matrix.driver import ColumnRun, ColumnScheduler

SELECTED = [c for c in os.environ.get("AA_MATRIX_COLUMNS", "").split(",") if c]
MATRIX_COLUMNS = [c for c in COLUMNS.values() if c.kind == "matrix" and (not SELECTED or c.name in SELECTED)]
CELLS = [(column.name, cell) for column in MATRIX_COLUMNS for cell in column_cells(column)]
CONFIG_CELLS = [
    cell
    for column in COLUMNS.values()
    if column.kind == "configs" and (not SELECTED or column.name in SELECTED)
    for cell in column_cells(column)
]
NOT_COMPARED = ("train/lr", "train/tokens_per_s", "train/grad_norm", "train/skipped_steps")


class Matrix:
    """Every selected column, run once per session in the background (side by side on the free cores), in the
    order the tests need them; prints the time each column took and the matrix's wall time."""

    def __init__(self, out: str, write_line: Any, needed: list[str]) -> None:
        self.out = out
        self.write_line = write_line
        self.needed = needed
        self.scheduler: ColumnScheduler | None = None
        self.reported: set[str] = set()

    def column(self, name: str) -> ColumnRun:
        if self.scheduler is None:
            cores = int(os.environ["AA_MATRIX_CORES"]) if os.environ.get("AA_MATRIX_CORES") else None
            self.scheduler = ColumnScheduler(self.needed or [name], self.out, cores)
        run = self.scheduler.result(name)
        if name not in self.reported:
            self.reported.add(name)
            failed = sum(
                any(r.get("status") != "ok" for r in recs) or not recs for recs in run.records.values()
            )
            self.write_line(
                f"strategy matrix: column {name}: {run.seconds:.0f} s for {len(run.records)} cells "
                f"({run.launches} process launch(es), {failed} cell(s) with an error)"
            )
        return run

    def records(self, column: str, cell: str) -> list[dict[str, Any]]:
        records = self.column(column).records.get(cell) or []
        assert records, f"{column}/{cell}: no record was written"
        return records


def needed_columns(items: list[pytest.Item]) -> list[str]:
    """The columns the selected tests read (with their reference columns), in the order of the columns table."""
    needed = set()
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        module = getattr(item, "module", None)
        if module is not None and module.__name__ == __name__:
            if "column" in params:
                needed.add(params["column"])
                reference = COLUMNS[params["column"]].reference
                if reference is not None:
                    needed.add(reference)
            elif "config" in params:
                needed.add("zero3_configs")
    return [name for name in COLUMNS if name in needed]


@pytest.fixture(scope="session")
def matrix(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Matrix:
    out = os.environ.get("AA_MATRIX_OUT") or str(tmp_path_factory.mktemp("strategy_matrix"))
    capture = request.config.pluginmanager.getplugin("capturemanager")

    def write_line(line: str) -> None:
        """Straight to the terminal: the timings are wanted in every CI log, not only for failing tests."""
        if capture is None:
            print(f"\n{line}", flush=True)
            return
        with capture.global_and_fixture_disabled():
            print(f"\n{line}", flush=True)  # the progress dots leave the cursor mid-line

    result = Matrix(out, write_line, needed_columns(request.session.items))
    yield result
    if result.scheduler is not None:
        scheduler = result.scheduler
        write_line(
            f"strategy matrix: {len(result.reported)} columns in {scheduler.wall_seconds():.0f} s wall time on "
            f"{scheduler.cores} core(s) (records in {out})"
        )


# ------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------


def failure_text(records: list[dict[str, Any]]) -> str:
    lines = []
    for r in records:
        export = r.get("export") or {}
        if r.get("status") != "ok" and "n_tensors" in export:  # the scan ran before the reload failed
            lines.append(
                f"rank {r.get('rank')} export: {export['n_tensors']} tensors, {export['n_empty']} empty "
                f"(e.g. {export['empty']}), {export['n_nonfinite']} non-finite"
            )
        if r.get("status") != "ok":
            lines.append(
                f"rank {r.get('rank')} failed in phase {r.get('phase')!r}: {r.get('error_type')}: {r.get('error')}"
            )
            frames = [f for f in r.get("repo_frames", []) if not f.startswith("tests/strategy_matrix")]
            if frames:
                lines.append("  in this repository: " + " -> ".join(frames))
            lines.append("  " + "\n  ".join(str(r.get("traceback", "")).splitlines()[-12:]))
    return "\n".join(lines)


def close(a: float, b: float, rtol: float, atol: float) -> bool:
    return abs(a - b) <= atol + rtol * abs(b)


def grad_norm(step: dict[str, Any]) -> float | None:
    logged = step.get("grad_norm_logged")
    return logged if logged is not None else step.get("grad_norm_measured")


def finite_metrics(records: list[dict[str, Any]]) -> None:
    for r in records:
        for i, step in enumerate(r["steps"]):
            bad = {k: v for k, v in step["metrics"].items() if not math.isfinite(v)}
            assert not bad, f"rank {r['rank']} step {i + 1}: non-finite metrics {bad}"
            for key in ("loss", "grad_norm_logged", "grad_norm_measured"):
                value = step.get(key)
                assert value is None or math.isfinite(value), (
                    f"rank {r['rank']} step {i + 1}: {key} = {value}"
                )


def check_ran(records: list[dict[str, Any]], steps: int) -> None:
    assert all(r.get("status") == "ok" for r in records), failure_text(records)
    for r in records:
        assert r["global_step"] == steps and len(r["steps"]) == steps, (
            r["rank"],
            r["global_step"],
            len(r["steps"]),
        )
    finite_metrics(records)


def check_export(records: list[dict[str, Any]], require_change: bool = True) -> None:
    export = records[0]["export"]
    assert export["exists"] and export["n_tensors"] > 0, f"nothing exported: {export}"
    assert export["n_empty"] == 0, f"{export['n_empty']} empty tensors in the export, e.g. {export['empty']}"
    assert export["n_nonfinite"] == 0, (
        f"{export['n_nonfinite']} non-finite tensors, e.g. {export['nonfinite']}"
    )
    assert not export["missing_keys"], f"the reloaded model misses {export['missing_keys']}"
    assert not export["mismatched_keys"], f"shape mismatches on reload: {export['mismatched_keys']}"
    # bf16 weights (a config with dtype bfloat16 under DeepSpeed bf16) carry 8 mantissa bits: other kernels round
    # differently by up to an ulp or two
    half = "bfloat16" in (export.get("dtype"), export.get("trained_dtype"))
    limit = 1e-4 + (2e-2 if half else 1e-4) * export["max_abs_trained"]
    assert export["max_abs_diff"] <= limit, (
        f"the reloaded export ({export['reload_class']}) differs from the trained weights by "
        f"{export['max_abs_diff']:.3g} (> {limit:.3g})"
    )
    if "seqcls_max_abs_diff" in export:  # a score model: plain transformers reads the same end scores
        seqcls_limit = 1e-4 + (2e-2 if half else 1e-4) * export["seqcls_max_abs_trained"]
        assert export["seqcls_max_abs_diff"] <= seqcls_limit, (
            f"AutoModelForSequenceClassification ({export['seqcls_class']}) on the export differs from the trained "
            f"end scores by {export['seqcls_max_abs_diff']:.3g} (> {seqcls_limit:.3g})"
        )
    if require_change:
        moved = records[0].get("initial_vs_trained")
        assert moved is not None and moved > 1e-6, f"training did not change the model's outputs ({moved})"


def check_ranks_agree(records: list[dict[str, Any]], rl: bool) -> None:
    if len(records) < 2:
        return
    first = records[0]
    for other in records[1:]:
        for key in ("sum", "abs_sum"):
            a, b = first["digest"][key], other["digest"][key]
            assert close(b, a, 1e-6, 1e-6), (
                f"the trained model differs between ranks 0 and {other['rank']}: {key} {a} vs {b}"
            )
        if rl:
            for i, (s0, s1) in enumerate(zip(first["steps"], other["steps"])):
                differ = {
                    k: (v, s1["metrics"].get(k))
                    for k, v in s0["metrics"].items()
                    if s1["metrics"].get(k) is None or not close(s1["metrics"][k], v, 1e-6, 1e-7)
                }
                assert not differ, (
                    f"step {i + 1}: logged RL metrics differ between ranks (not reduced?): {differ}"
                )


def check_grad_norm_consistent(records: list[dict[str, Any]]) -> None:
    """The module's ``train/grad_norm`` is the norm of the step's gradients (the harness measured them too)."""
    for r in records:
        for i, step in enumerate(r["steps"]):
            logged, measured = step.get("grad_norm_logged"), step.get("grad_norm_measured")
            if logged is not None and measured is not None:
                assert close(logged, measured, 1e-4, 1e-6), (
                    f"rank {r['rank']} step {i + 1}: train/grad_norm {logged} but the gradients' norm is {measured}"
                )


def compare_first_step(
    records: list[dict[str, Any]], reference: list[dict[str, Any]], scale: float, rl: bool
) -> None:
    ref_step = reference[0]["steps"][0]
    steps = [r["steps"][0] for r in records]
    problems = []
    if not rl:
        losses = [s["loss"] for s in steps]
        assert None not in losses and ref_step["loss"] is not None, "no back-propagated loss recorded"
        loss = sum(losses) / len(losses)
        if not close(loss, ref_step["loss"], 1e-4 * scale, 1e-5 * scale):
            problems.append(f"loss {loss!r} (ranks: {losses}) vs reference {ref_step['loss']!r}")
    norm, ref_norm = grad_norm(steps[0]), grad_norm(ref_step)
    assert norm is not None and ref_norm is not None, "no gradient norm recorded"
    if not close(norm, ref_norm, 1e-3 * scale, 1e-6):
        problems.append(f"grad norm {norm!r} vs reference {ref_norm!r}")
    if len(records) == 1:
        for key, ref_value in ref_step["metrics"].items():
            value = steps[0]["metrics"].get(key)
            if key.startswith(NOT_COMPARED) or key.endswith("_grad_norm") or value is None:
                continue
            if not close(value, ref_value, 1e-3 * scale, 1e-4 * scale):
                problems.append(f"{key} {value!r} vs reference {ref_value!r}")
    assert not problems, "first step differs from the reference column:\n  " + "\n  ".join(problems)


def check_zero_at_start(records: list[dict[str, Any]], keys: tuple[str, ...]) -> None:
    """At step 1 the policy IS its reference (same weights, same dtype): every policy/reference comparison is 0."""
    if not keys:
        return
    for r in records:
        metrics = r["steps"][0]["metrics"]
        present = {k: metrics[k] for k in keys if k in metrics}
        assert present, f"rank {r['rank']}: none of {keys} logged at step 1"
        nonzero = {k: v for k, v in present.items() if abs(v) > 1e-6}
        assert not nonzero, f"rank {r['rank']}: policy and reference differ at the first step: {nonzero}"


def check_refused_at_start(records: list[dict[str, Any]], pattern: str) -> None:
    for r in records:
        assert r.get("status") != "ok", (
            f"declared unsupported, but rank {r['rank']} trained without complaint"
        )
        assert not r.get("steps"), f"refused only after {len(r['steps'])} step(s): must fail at start-up"
        message = str(r.get("error", ""))
        assert "\n" not in message.strip(), f"the refusal is not one line: {message!r}"
        assert re.search(pattern, message), f"refusal {message!r} does not match {pattern!r}"


# ------------------------------------------------------------------------------------------------------
# the tests
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("column", "cell"), CELLS, ids=[f"{c}-{a}" for c, a in CELLS])
def test_cell(matrix: Matrix, column: str, cell: str) -> None:
    spec = COLUMNS[column]
    records = matrix.records(column, cell)
    if (column, cell) in UNSUPPORTED:
        check_refused_at_start(records, UNSUPPORTED[(column, cell)])
        return
    rl = ALGORITHMS[cell].rl
    check_ran(records, steps=2)
    assert len(records) == spec.devices
    check_grad_norm_consistent(records)
    check_ranks_agree(records, rl)
    check_zero_at_start(records, ALGORITHMS[cell].zero_at_start)
    if spec.reference is not None and not (rl and spec.devices > 1):
        reference = matrix.records(spec.reference, cell)
        assert all(r.get("status") == "ok" for r in reference), (
            f"cannot compare: the reference cell {spec.reference}/{cell} failed:\n{failure_text(reference)}"
        )
        compare_first_step(records, reference, spec.tolerance, rl)
    check_export(records)


EXPORT_COLUMNS = [c.name for c in MATRIX_COLUMNS] + (["zero3_configs"] if CONFIG_CELLS else [])


@pytest.mark.parametrize("column", EXPORT_COLUMNS)
def test_exports_hold_only_what_the_model_loads(matrix: Matrix, column: str) -> None:
    """No export of the column carries tensors ``from_pretrained`` reports as UNEXPECTED (e.g. non-persistent
    buffers such as rotary ``inv_freq``): checked per column, so one such defect is one failure per column."""
    stray = {}
    for cell, records in matrix.column(column).records.items():
        export = (records[0].get("export") or {}) if records else {}
        if export.get("unexpected_keys"):
            stray[cell] = export["unexpected_keys"]
    assert not stray, f"exports with tensors the reloaded model does not load: {stray}"


@pytest.mark.parametrize("config", CONFIG_CELLS)
def test_shipped_zero3_config_twin_starts(matrix: Matrix, config: str) -> None:
    """``configs/tiny/<config>.yaml`` with the shipped config's code-path knobs (precision, clipping, accumulation,
    gradient checkpointing, precomputed reference, ...) runs one step through the ``aa`` CLI under
    ``deepspeed_cpu_stage_3`` and exports a model that reloads with the trained weights' outputs."""
    records = matrix.records("zero3_configs", config)
    assert all(r.get("status") == "ok" for r in records), failure_text(records)
    record = records[0]
    # PPO's mirrored num_mini_batches=2 makes 2 actor updates in its first (and only) rollout
    assert record["strategy"] == "CPUDeepSpeedStrategy" and record["global_step"] >= 1, record
    finite_metrics(records)
    check_export(records, require_change=False)


# ------------------------------------------------------------------------------------------------------
# the checks themselves catch what they are meant to (synthetic records, no training)
# ------------------------------------------------------------------------------------------------------


def _record(rank: int = 0, **overrides: Any) -> dict[str, Any]:
    step = {"loss": 0.7, "grad_norm_logged": 2.0, "grad_norm_measured": 2.0, "metrics": {"train/loss": 0.7}}
    record = {
        "rank": rank,
        "status": "ok",
        "global_step": 2,
        "steps": [dict(step), dict(step)],
        "digest": {"sum": 1.0, "abs_sum": 3.0},
        "initial_vs_trained": 0.5,
        "export": {
            "exists": True,
            "n_tensors": 29,
            "n_empty": 0,
            "empty": [],
            "n_nonfinite": 0,
            "nonfinite": [],
            "missing_keys": [],
            "mismatched_keys": [],
            "max_abs_trained": 1.0,
            "max_abs_diff": 0.0,
            "reload_class": "Qwen2ForCausalLM",
            "dtype": "float32",
        },
    }
    record.update(overrides)
    return record


@pytest.mark.parametrize(
    "export",
    [
        {"n_empty": 29, "empty": ["model.embed_tokens.weight"]},  # a ZeRO-3 shard written as the weights
        {"n_nonfinite": 29, "nonfinite": ["lm_head.weight"]},
        {"missing_keys": ["model.norm.weight"]},
        {"max_abs_diff": 0.01},
        {"n_tensors": 0},
        # a score model whose plain-transformers reload reads another token (or a random head)
        {
            "seqcls_class": "Qwen2ForSequenceClassification",
            "seqcls_max_abs_trained": 1.0,
            "seqcls_max_abs_diff": 0.3,
        },
    ],
)
def test_export_check_rejects_broken_exports(export: dict[str, Any]) -> None:
    check_export([_record()])
    with pytest.raises(AssertionError):
        check_export([_record(export={**_record()["export"], **export})])


def test_first_step_comparison_uses_the_mean_loss_over_ranks_and_the_gradient_norm() -> None:
    reference = [_record()]
    halves = [_record(0), _record(1)]
    halves[0]["steps"][0] = {**halves[0]["steps"][0], "loss": 0.6}
    halves[1]["steps"][0] = {**halves[1]["steps"][0], "loss": 0.8}
    compare_first_step(halves, reference, 1.0, rl=False)  # mean of the ranks' losses = 0.7
    halves[1]["steps"][0]["loss"] = 0.9
    with pytest.raises(AssertionError, match="loss"):
        compare_first_step(halves, reference, 1.0, rl=False)
    other_norm = [_record()]
    other_norm[0]["steps"][0] = {**other_norm[0]["steps"][0], "grad_norm_logged": 2.1}
    with pytest.raises(AssertionError, match="grad norm"):
        compare_first_step(other_norm, reference, 1.0, rl=True)


def test_rank_and_refusal_checks() -> None:
    check_ranks_agree([_record(0), _record(1)], rl=True)
    with pytest.raises(AssertionError, match="differs between ranks"):
        check_ranks_agree([_record(0), _record(1, digest={"sum": 1.5, "abs_sum": 3.0})], rl=False)
    diverged = _record(1)
    diverged["steps"] = [{**s, "metrics": {"train/loss": 0.9}} for s in diverged["steps"]]
    with pytest.raises(AssertionError, match="not reduced"):
        check_ranks_agree([_record(0), diverged], rl=True)
    refused = {"rank": 0, "status": "error", "steps": [], "error": "on_nonfinite: skip is not supported here"}
    check_refused_at_start([refused], "not supported")
    for bad in ({"steps": [{}]}, {"error": "not supported\nsecond line"}, {"status": "ok"}):
        with pytest.raises(AssertionError):
            check_refused_at_start([{**refused, **bad}], "not supported")
