"""Evaluation: ``aa eval`` and its Python API (:func:`evaluate`), over registered tasks (``@register_task``).

from aa_lightning.evaluation import evaluate
evaluate(model="runs/sft", tasks=[{"task": "gsm8k", "data": {"path": "gsm8k.jsonl", "size": 50}}])
"""

from aa_lightning.evaluation.registry import available_tasks, register_task, resolve_task
from aa_lightning.evaluation.runner import EvalConfig, EvalResults, build_task, evaluate
from aa_lightning.evaluation.task import EvalContext, EvalData, EvalRow, EvalTask, RowResult


def main(argv: list[str] | None = None) -> None:
    """``aa eval`` (see :mod:`aa_lightning.evaluation.cli`)."""
    from aa_lightning.evaluation.cli import main as cli_main

    cli_main(argv)


__all__ = [
    "EvalConfig",
    "EvalContext",
    "EvalData",
    "EvalResults",
    "EvalRow",
    "EvalTask",
    "RowResult",
    "available_tasks",
    "build_task",
    "evaluate",
    "main",
    "register_task",
    "resolve_task",
]
