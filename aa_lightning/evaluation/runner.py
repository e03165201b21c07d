"""Run a suite of evaluation tasks: rows shared over ranks, scores reduced, results written three ways.

The same call runs on one process or under ``torchrun``: each rank scores rows ``rank, rank + world, ...`` of
every task and the per-metric sums and row counts are summed with ``torch.distributed`` (gloo, so CPU runs
work too); rank 0 prints the table and writes ``results.json``, one ``<task>.jsonl`` of per-row records and
TensorBoard scalars ``eval/<task>/<metric>``. Every metric is a mean over rows, so the reduced score is the
one a single process computes.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

import torch

from aa_lightning.chat.loading import EXPORT_DIR
from aa_lightning.chat.session import GenerationSettings
from aa_lightning.config_coercion import as_config
from aa_lightning.evaluation.models import ModelPool
from aa_lightning.evaluation.registry import resolve_task
from aa_lightning.evaluation.task import EvalContext, EvalTask, RowResult

__all__ = ["EvalConfig", "EvalResults", "build_task", "evaluate"]


@dataclass
class EvalConfig:
    """What ``aa eval --config`` reads (every field is also a flag).

    Args:
        model: the evaluated model: a run folder (its ``hf_model`` export), a model folder, a hub name or an
            alias (``smollm2-135m-instruct``, ``tiny-qwen2``).
        tasks: one mapping per task: ``task: NAME`` (registered, ``aa list eval``) or ``task: module:Class``,
            the other keys its arguments (``data``, ``batch_size``, task options).
        generation: generation settings of every task (``max_new_tokens``, ``do_sample``, ``temperature``...).
        output_dir: where results go; default ``<run folder>/eval`` for a run folder, else ``eval_results``.
        limit: at most this many rows per task (quick checks).
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda:0``...
        dtype: model dtype (``auto``, ``float32``, ``bfloat16``).
        tensorboard: also write TensorBoard scalars.
        step: the TensorBoard step of the scalars (e.g. the training step of the checkpoint).
        progress_every_seconds: how often progress lines are printed when output is not a terminal.
        seed: torch's seed at the start of every task (sampled generations repeat; add ``rank`` per process).
    """

    model: str | None = None
    tasks: list[dict[str, Any]] = field(default_factory=list)
    generation: dict[str, Any] = field(default_factory=dict)
    output_dir: str | None = None
    limit: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    tensorboard: bool = True
    step: int = 0
    progress_every_seconds: float = 30.0
    seed: int = 0


@dataclass
class EvalResults:
    """Scores by task and metric, the per-row records (rank 0 holds all of them) and where they were written."""

    scores: dict[str, dict[str, float]]
    rows: dict[str, int]
    records: dict[str, list[dict[str, Any]]]
    output_dir: str | None
    seconds: dict[str, float]

    def flat(self) -> dict[str, float]:
        """``{"task/metric": value}``."""
        return {f"{t}/{m}": v for t, metrics in self.scores.items() for m, v in metrics.items()}


def build_task(entry: Mapping[str, Any] | EvalTask, limit: int | None = None) -> EvalTask:
    """A task from its config mapping (``task:`` plus arguments); ``limit`` caps its rows."""
    if isinstance(entry, EvalTask):
        task = entry
    else:
        entry = dict(entry)
        name = entry.pop("task", None)
        if not name:
            raise ValueError(f"an evaluation task entry needs `task: NAME` (got keys {sorted(entry)})")
        cls = resolve_task(str(name))
        try:
            task = cls(**entry)
        except TypeError as err:
            raise ValueError(f"task {name}: {err}") from None
    if limit is not None and getattr(task, "data", None) is not None:
        task.data.size = min(limit, task.data.size or limit)
    if limit is not None and hasattr(task, "limit") and task.whole_run:
        task.limit = min(limit, task.limit or limit)
    return task


# -- processes -------------------------------------------------------------------------------------------
def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size; joins the ``torchrun`` group (gloo) on first use."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("gloo")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def reduce_sums(sums: list[float], world: int) -> list[float]:
    if world == 1:
        return sums
    import torch.distributed as dist

    tensor = torch.tensor(sums, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.tolist()


def metric_names(task: EvalTask, results: list[tuple[int, RowResult]], world: int) -> list[str]:
    """The task's declared metrics, else the union of the rows' over all ranks: every rank must all_reduce a
    tensor of the same length, also a rank that got no rows."""
    if task.metrics:
        return list(task.metrics)
    mine = sorted({m for _, r in results for m in r.metrics})
    if world == 1:
        return mine
    import torch.distributed as dist

    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, mine)
    return sorted({m for part in parts for m in part})


def gather_records(records: list[dict[str, Any]], world: int) -> list[dict[str, Any]]:
    if world == 1:
        return records
    import torch.distributed as dist

    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, records)
    return sorted((r for part in parts for r in part), key=lambda r: r["row"])


def broadcast(value: Any, world: int) -> Any:
    if world == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# -- progress --------------------------------------------------------------------------------------------
class Progress:
    """A tqdm bar in a terminal; elsewhere (logs, CI) a line every ``every`` seconds and one at the end."""

    def __init__(self, name: str, total: int, every: float, enabled: bool, stream: TextIO | None = None):
        from aa_lightning.callbacks.progress import format_duration

        self.name, self.total, self.every, self.enabled = name, total, every, enabled
        self.stream = stream or sys.stdout
        self.format_duration = format_duration
        self.done, self.start, self.last = 0, time.monotonic(), -math.inf
        self.bar = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"eval {name}", file=self.stream, leave=False)

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        percent = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        parts = [f"eval {self.name}: {self.done}/{self.total} rows{percent}", f"{rate:.2f} rows/s"]
        parts.append(f"{self.format_duration(elapsed)} elapsed")
        if rate > 0 and self.done < self.total:
            parts.append(f"ETA {self.format_duration((self.total - self.done) / rate)}")
        return " | ".join(parts)

    def update(self, count: int) -> None:
        self.done += count
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(count)
        elif time.monotonic() - self.last >= self.every and self.done < self.total:
            self.last = time.monotonic()
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.enabled:
            print(self.line(), file=self.stream, flush=True)


# -- one task --------------------------------------------------------------------------------------------
def run_task(
    task: EvalTask, context: EvalContext, rank: int, world: int, every: float
) -> tuple[dict[str, float], int, list[dict[str, Any]]]:
    """``(scores, rows, records)`` of one task over all ranks."""
    if task.whole_run:
        scores = task.run_whole(context) if rank == 0 else None
        return broadcast(scores, world), -1, []  # -1: lm-eval counts its own documents
    rows = task.rows()
    mine = rows[rank::world]
    progress = Progress(task.name, len(rows), every, enabled=rank == 0)
    results: list[tuple[int, RowResult]] = []
    for start in range(0, len(mine), task.batch_size):
        batch = mine[start : start + task.batch_size]
        got = task.evaluate_batch(batch, context)
        if len(got) != len(batch):
            raise RuntimeError(f"task {task.name} returned {len(got)} results for {len(batch)} rows")
        results += [(row.number, result) for row, result in zip(batch, got)]
        progress.update(len(batch) * world)
    progress.done = len(rows)
    progress.close()
    names = metric_names(task, results, world)
    for number, result in results:
        missing = set(names) - set(result.metrics)
        if missing:
            raise RuntimeError(f"task {task.name}: row {number} has no value for {sorted(missing)}")
    sums = [sum(r.metrics[m] for _, r in results) for m in names] + [float(len(results))]
    sums = reduce_sums(sums, world)
    count = int(sums[-1])
    scores = {m: (s / count if count else float("nan")) for m, s in zip(names, sums)}
    records = [{"row": number, **result.record, **result.metrics} for number, result in results]
    return scores, count, gather_records(records, world)


# -- outputs ---------------------------------------------------------------------------------------------
def default_output_dir(model: str | None) -> str:
    if model and os.path.isdir(os.path.join(os.path.expanduser(model), EXPORT_DIR)):
        return os.path.join(os.path.expanduser(model), "eval")
    return "eval_results"


def table(results: EvalResults) -> str:
    """The results as an aligned text table: task, metric, value, rows."""
    lines = [("task", "metric", "value", "rows")]
    for task, metrics in results.scores.items():
        for metric, value in metrics.items():
            rows = results.rows.get(task, -1)
            lines.append((task, metric, f"{value:.4f}", str(rows) if rows >= 0 else "-"))
    widths = [max(len(line[i]) for line in lines) for i in range(4)]
    out = []
    for index, line in enumerate(lines):
        out.append(
            "  ".join(
                cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))
            )
        )
        if index == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def write_outputs(results: EvalResults, config: EvalConfig, tasks: Sequence[EvalTask]) -> None:
    assert results.output_dir is not None
    os.makedirs(results.output_dir, exist_ok=True)
    summary = {
        "model": config.model,
        "scores": results.scores,
        "rows": results.rows,
        "seconds": results.seconds,
        "tasks": {task.name: task.describe() for task in tasks},
        "config": asdict(config),
    }
    with open(os.path.join(results.output_dir, "results.json"), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=1, default=str)
    for name, records in results.records.items():
        with open(os.path.join(results.output_dir, f"{name}.jsonl"), "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, default=str) + "\n")
    if config.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(results.output_dir, "tensorboard"))
        for key, value in results.flat().items():
            writer.add_scalar(f"eval/{key}", value, global_step=config.step)
        writer.close()


def evaluate(
    config: EvalConfig | Mapping[str, Any] | None = None,
    *,
    pool: ModelPool | None = None,
    out: TextIO | None = None,
    **overrides: Any,
) -> EvalResults:
    """Run every task of ``config`` (an :class:`EvalConfig`, or a mapping / keyword arguments of its fields)
    and return the scores; rank 0 prints the table to ``out`` (default stdout) and writes the output files.

    ``pool`` reuses already loaded models across calls (a notebook evaluating before and after training); it
    loads a path once, so after training into the same folder again, pass a fresh ``ModelPool``.
    """
    merged = {**(asdict(config) if isinstance(config, EvalConfig) else dict(config or {})), **overrides}
    task_objects = [t for t in merged.get("tasks", []) if isinstance(t, EvalTask)]
    merged["tasks"] = [t for t in merged.get("tasks", []) if not isinstance(t, EvalTask)]
    cfg = as_config(EvalConfig, merged, "eval config")
    tasks = [build_task(entry, cfg.limit) for entry in cfg.tasks] + [
        build_task(t, cfg.limit) for t in task_objects
    ]
    if not tasks:
        raise ValueError("no evaluation tasks: list them under `tasks:` in the config")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"two tasks share a name ({names}); give one a `name:`")
    generation = as_config(GenerationSettings, cfg.generation, "generation")
    rank, world = rank_and_world()
    context = EvalContext(pool or ModelPool(cfg.device, cfg.dtype), cfg.model, generation, cfg.seed)
    results = EvalResults({}, {}, {}, None, {})
    for task in tasks:
        start = time.monotonic()
        torch.manual_seed(cfg.seed + rank)
        scores, count, records = run_task(task, context, rank, world, cfg.progress_every_seconds)
        results.scores[task.name], results.rows[task.name] = scores, count
        results.records[task.name], results.seconds[task.name] = records, round(time.monotonic() - start, 3)
    if rank == 0:
        results.output_dir = cfg.output_dir or default_output_dir(cfg.model)
        write_outputs(results, cfg, tasks)
        stream = out or sys.stdout
        print(table(results), file=stream)
        print(f"results: {os.path.join(results.output_dir, 'results.json')}", file=stream, flush=True)
    return results
