"""Image-to-text question answering by exact match (VQA style).

Rows are multimodal chats (``MLLM-Messages``: ``{messages, images}`` with ``<image>`` markers, the last
assistant turn the reference answer) or ``prompt_format`` rows with an ``images`` column and ``answer_field``.
Reply and reference are normalised as VQA does (lower case, punctuation and the articles a/an/the removed,
spaces collapsed) before comparison; ``contains`` also counts a reply that contains the reference.
"""

from __future__ import annotations

import re
import string
from typing import Any

from aa_lightning.evaluation.registry import register_task
from aa_lightning.evaluation.task import EvalContext, EvalRow, RowResult
from aa_lightning.evaluation.tasks.generative import GenerativeTask
from aa_lightning.evaluation.tasks.prompts import prompt_text

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalise_answer(text: str) -> str:
    text = _PUNCT.sub(" ", text.lower())
    return " ".join(word for word in text.split() if word not in {"a", "an", "the"})


@register_task("vqa")
class VQAExactMatch(GenerativeTask):
    """Visual question answering: exact match of the normalised reply and reference (see module doc).

    Args:
        answer_field: the reference when the rows are not chats (their template gives none).
    """

    metrics = ("exact_match", "contains")
    default_template = "MLLM-Messages"

    def __init__(self, data: Any, answer_field: str = "answer", **kwargs: Any) -> None:
        super().__init__(data, **kwargs)
        self.answer_field = answer_field

    def evaluate_batch(self, rows: list[EvalRow], context: EvalContext) -> list[RowResult]:
        prompts, metas = self.ask(rows)
        references = [
            str(meta.get("reference") or row.get(self.answer_field, (str, int, float)))
            for row, meta in zip(rows, metas)
        ]
        replies = self.replies(rows, prompts, metas, context)
        out = []
        for prompt, reply, reference in zip(prompts, replies, references):
            got, want = normalise_answer(reply), normalise_answer(reference)
            metrics = {"exact_match": float(got == want), "contains": float(bool(want) and want in got)}
            out.append(
                RowResult(metrics, {"prompt": prompt_text(prompt), "reply": reply, "reference": reference})
            )
        return out
