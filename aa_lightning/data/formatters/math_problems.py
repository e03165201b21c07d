"""Formatters for math word problems whose final answer a rule reward can check exactly (GSM8K)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aa_lightning.data.errors import DataFormatError
from aa_lightning.data.formatters.base import BaseFormatter, Conversation, Meta
from aa_lightning.data.formatters.registry import register_template

__all__ = ["GSM8K"]


@register_template("GSM8K")
class GSM8K(BaseFormatter):
    """GSM8K rows ``{question, answer}`` whose answer ends with ``#### N``.

    Meta: prompt-only ``{"reference_answer": N, "solution": answer}`` where N is the text after the last
    ``####`` with thousands separators removed (``"1,080"`` -> ``"1080"``), as a string so rewards can
    compare exactly; supervised ``{}`` (trains on the full worked answer, calculator marks included).
    """

    def reference_answer(self, answer: str) -> str:
        if "####" not in answer:
            raise DataFormatError("expected the answer to end with '#### <final answer>'", field="answer")
        final = answer.rsplit("####", 1)[1].replace(",", "").strip()
        if not final:
            raise DataFormatError("the final answer after '####' is empty", field="answer")
        return final

    def format_supervised_sample(self, raw_sample: Mapping[str, Any]) -> tuple[Conversation, Meta]:
        question = self.field(raw_sample, "question")
        answer = self.field(raw_sample, "answer")
        return self.with_system(
            [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        ), {}

    def format_prompt_only_sample(self, raw_sample: Mapping[str, Any]) -> tuple[Conversation, Meta]:
        question = self.field(raw_sample, "question")
        answer = self.field(raw_sample, "answer")
        meta: Meta = {"reference_answer": self.reference_answer(answer), "solution": answer}
        return self.with_system([{"role": "user", "content": question}]), meta
