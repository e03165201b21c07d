"""lm-evaluation-harness benchmarks on an exported model, through its Python API (optional extra).

Why not re-implement them: lm-eval already carries hundreds of text benchmarks with their prompts, few-shot
sets and metrics. This task hands it the model (a run's ``hf_model`` export, any folder or hub name;
``trust_remote_code`` off), loaded on this rank's device, and its task names, with ``include_path`` for task
YAMLs of one's own (e.g. a task over a local jsonl file, as the test does). Installed by ``pip install 'aa-lightning[eval]'``.
"""

from __future__ import annotations

from typing import Any

from aa_lightning.evaluation.registry import register_task
from aa_lightning.evaluation.task import EvalContext, EvalTask

MISSING = (
    "the lm_eval task needs lm-evaluation-harness, which is not installed: pip install 'aa-lightning[eval]' "
    "(the `eval` extra; or pip install lm-eval)"
)


def import_lm_eval() -> Any:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError:
        raise ImportError(MISSING) from None
    return lm_eval


def flatten_results(results: dict[str, Any]) -> dict[str, float]:
    """``{task: {"acc,none": x, "acc_stderr,none": s, "alias": ...}}`` -> ``{"task/acc": x}``."""
    out: dict[str, float] = {}
    for task, values in results.items():
        for key, value in values.items():
            metric, _, filt = key.partition(",")
            if "stderr" in metric or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            out[f"{task}/{metric}" + (f"_{filt}" if filt and filt != "none" else "")] = float(value)
    return out


@register_task("lm_eval")
class LMEvalHarness(EvalTask):
    """lm-evaluation-harness tasks on the model (see module doc); the run's rank 0 runs them.

    Args:
        tasks: lm-eval task names (``arc_easy``, or the ``task:`` name of a YAML under ``include_path``).
        include_path: a folder of extra task YAMLs.
        num_fewshot: few-shot examples (default: each task's own).
        limit: at most this many documents per task.
        batch_size: lm-eval's batch size.
    """

    whole_run = True  # lm-eval batches and scores its own documents: the runner calls run_whole on rank 0

    def __init__(
        self,
        tasks: list[str],
        include_path: str | None = None,
        num_fewshot: int | None = None,
        limit: int | None = None,
        name: str | None = None,
        batch_size: int = 8,
        model: str | None = None,
    ) -> None:
        self.tasks, self.include_path, self.num_fewshot, self.limit = (
            list(tasks),
            include_path,
            num_fewshot,
            limit,
        )
        self.name, self.batch_size, self.model = name or self.task_name, batch_size, model
        self.data = None
        self.metrics = ()

    def run_whole(self, context: EvalContext) -> dict[str, float]:
        lm_eval = import_lm_eval()
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
        from transformers import AutoTokenizer

        # a loaded model, not a path: given a path under a multi-GPU torchrun, lm-eval starts an Accelerator
        # (world_size > 1) and waits in gathers the other ranks never join; a model object is one process
        loaded = context.pool.lm(self.model_path(context))  # on this rank's device, shared with other tasks
        tokenizer = AutoTokenizer.from_pretrained(
            loaded.path, trust_remote_code=False
        )  # lm-eval's own padding
        lm = HFLM(pretrained=loaded.model, tokenizer=tokenizer, batch_size=self.batch_size)
        if lm.world_size != 1:
            raise RuntimeError(
                f"task {self.name}: lm-eval set up {lm.world_size} processes; rank 0 runs it alone"
            )
        manager = TaskManager(include_path=self.include_path) if self.include_path else TaskManager()
        output = lm_eval.simple_evaluate(
            model=lm,
            tasks=self.tasks,
            num_fewshot=self.num_fewshot,
            limit=self.limit,
            task_manager=manager,
            log_samples=False,
        )
        return flatten_results(output["results"])

    def describe(self) -> dict[str, Any]:
        return {"task": self.task_name, "lm_eval_tasks": self.tasks, "include_path": self.include_path}
