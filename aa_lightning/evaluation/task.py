"""What an evaluation task is: where its rows come from, how a row becomes prompts, and how it is scored.

A task turns a batch of rows into one :class:`RowResult` per row: metric values (means over rows are the
task's scores, so results from several processes combine by summing) and a record for the JSON file (the
prompt, the answer, the reference). Subclasses implement :meth:`EvalTask.evaluate_batch` and name their
``metrics``; everything else (sharding rows over ranks, batching, progress, reduction, output) is the runner's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aa_lightning.chat.session import GenerationSettings
from aa_lightning.config_coercion import as_config
from aa_lightning.data.errors import DataFormatError
from aa_lightning.data.sources import DataSpec, load_rows

__all__ = ["EvalContext", "EvalData", "EvalRow", "EvalTask", "RowResult"]


@dataclass
class EvalData:
    """A task's rows: ``path`` is a local json/jsonl/parquet/csv file, a ``save_to_disk`` folder, a data folder
    or a hub name where a hub is reachable (read by :func:`aa_lightning.data.sources.load_rows`).

    Args:
        path: file, folder or hub name; a relative path is read from the working directory.
        split: split to read (hub names, folders).
        name: subset / configuration (hub names).
        size: keep the first ``size`` rows (after shuffling when ``shuffle_seed`` is set).
        shuffle_seed: shuffle before taking ``size``.
    """

    path: str
    split: str = "train"
    name: str | None = None
    size: int | None = None
    shuffle_seed: int | None = None


@dataclass
class EvalRow:
    """One raw row with where it came from, so that a bad field is reported as ``file, row N, field 'x'``."""

    data: dict[str, Any]
    source: str
    number: int

    def get(self, key: str, kind: type | tuple[type, ...] = object, default: Any = ...) -> Any:
        if key not in self.data or self.data[key] is None:
            if default is not ...:
                return default
            raise DataFormatError(
                f"missing field (row keys: {', '.join(self.data)})",
                field=key,
                source=self.source,
                row=self.number,
            )
        value = self.data[key]
        if not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise DataFormatError(
                f"expected {names}, got {type(value).__name__} {str(value)[:60]!r}",
                field=key,
                source=self.source,
                row=self.number,
            )
        return value

    def error(self, reason: str, key: str | None = None) -> DataFormatError:
        return DataFormatError(reason, field=key, source=self.source, row=self.number)


@dataclass
class RowResult:
    """The metric values of one row (averaged over rows) and what the JSON file records about it."""

    metrics: dict[str, float]
    record: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalContext:
    """What a task gets from the runner: the model pool, the evaluated model, the generation settings."""

    pool: Any  # aa_lightning.evaluation.models.ModelPool
    model: str | None
    generation: GenerationSettings
    seed: int = 0


class EvalTask:
    """Base class of evaluation tasks (see the module doc). ``__init__`` arguments are the config keys.

    Args:
        data: the rows (:class:`EvalData` or a dict of its fields).
        name: the task's name in tables, JSON and TensorBoard (default: the registered name).
        batch_size: rows per model call.
        model: the evaluated model, when this task evaluates another than the run's ``model``.
        max_new_tokens: generation length for this task (default: the run's ``generation``).
    """

    task_name = "task"
    metrics: tuple[str, ...] = ()
    whole_run = False  # True: the task scores itself in ``run_whole`` (on rank 0), not row by row

    def __init__(
        self,
        data: EvalData | Mapping[str, Any] | str,
        name: str | None = None,
        batch_size: int = 8,
        model: str | None = None,
        max_new_tokens: int | None = None,
    ) -> None:
        self.data = as_config(EvalData, {"path": data} if isinstance(data, str) else data, "data")
        self.name = name or self.task_name
        if batch_size < 1:
            raise ValueError(f"task {self.name}: batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.model = model
        self.max_new_tokens = max_new_tokens

    def spec(self) -> DataSpec:
        """``data`` as the data layer's :class:`DataSpec` (rows are formatted by the task, not a template)."""
        return DataSpec(
            path=self.data.path,
            template="",
            split=self.data.split,
            name=self.data.name,
            size=self.data.size,
            shuffle_seed=self.data.shuffle_seed,
        )

    def rows(self) -> list[EvalRow]:
        """All rows of ``data`` (the runner gives each rank its share)."""
        loaded = load_rows(self.spec())
        return [
            EvalRow(dict(row), loaded.source, number) for row, number in zip(loaded.rows, loaded.row_numbers)
        ]

    def model_path(self, context: EvalContext) -> str:
        path = self.model or context.model
        if not path:
            raise ValueError(
                f"task {self.name}: no model to evaluate (set `model:` in the config or --model)"
            )
        return path

    def settings(self, context: EvalContext) -> GenerationSettings:
        if self.max_new_tokens is None:
            return context.generation
        base = context.generation
        return GenerationSettings(
            max_new_tokens=self.max_new_tokens,
            do_sample=base.do_sample,
            temperature=base.temperature,
            top_p=base.top_p,
            top_k=base.top_k,
        )

    def evaluate_batch(self, rows: list[EvalRow], context: EvalContext) -> list[RowResult]:
        """One :class:`RowResult` per row, in order (the part every row-by-row task implements)."""
        raise NotImplementedError

    def run_whole(self, context: EvalContext) -> dict[str, float]:
        """The task's scores at once, for ``whole_run`` tasks (wrappers of another harness)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What the JSON file says about the task's setup."""
        return {"task": self.task_name, "data": self.data.path, "model": self.model}
