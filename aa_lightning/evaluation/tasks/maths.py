"""Exact-answer maths: GSM8K (the final number) and MATH-style answers (checked with ``math-verify``).

GSM8K references end with ``#### N``; a reply's answer is the number after its last ``####``, else its last
number (``1,080`` and ``$18.00`` read as 1080 and 18), compared as numbers. MATH-style answers (``\\frac{25}{13}``,
``x+11``) are compared by ``math-verify`` (the checker TRL and open-r1 use): the reply's ``\\boxed{}`` or last
expression against the reference, symbolically, so ``25/13`` and ``\\frac{25}{13}`` agree.
"""

from __future__ import annotations

import re
from typing import Any

from aa_lightning.evaluation.registry import register_task
from aa_lightning.evaluation.task import EvalContext, EvalRow, RowResult
from aa_lightning.evaluation.tasks.generative import GenerativeTask
from aa_lightning.evaluation.tasks.prompts import prompt_text

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def final_number(text: str) -> float | None:
    """The answer of a GSM8K-style reply: the number after the last ``####``, else the last number in it."""
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    found = NUMBER.findall(tail)
    if not found:
        return None
    value = found[0] if "####" in text else found[-1]
    try:
        return float(value.replace(",", ""))
    except ValueError:
        return None


def gsm8k_reference(row: EvalRow, field: str) -> float:
    answer = row.get(field, str)
    if "####" not in answer:
        raise row.error("expected the answer to end with '#### <final answer>'", field)
    value = final_number(answer)
    if value is None:
        raise row.error("no number after '####'", field)
    return value


def math_verify_equal(reference: str, reply: str) -> bool:
    """Whether ``reply`` states ``reference`` (both parsed by math-verify; the reference as LaTeX)."""
    try:
        from math_verify import parse, verify
    except ImportError:
        raise ImportError(
            "the `math` evaluation task checks answers with math-verify: pip install 'aa-lightning[eval]' "
            "(or pip install math-verify)"
        ) from None
    gold = parse(reference if "$" in reference or "\\boxed" in reference else f"${reference}$")
    answer = parse(reply)
    return bool(gold) and bool(answer) and bool(verify(gold, answer))


@register_task("gsm8k")
class GSM8KTask(GenerativeTask):
    """GSM8K-style word problems: accuracy of the final number of the reply (see module doc).

    Args:
        answer_field: the reference solution, ending with ``#### N``.
        (and those of GenerativeTask / EvalTask: data, prompt_format, template, responses_field, ...)
    """

    metrics = ("accuracy",)
    default_prompt_format = "{question}\nSolve it step by step, then give the final number after '####'."

    def __init__(self, data: Any, answer_field: str = "answer", **kwargs: Any) -> None:
        super().__init__(data, **kwargs)
        self.answer_field = answer_field

    def evaluate_batch(self, rows: list[EvalRow], context: EvalContext) -> list[RowResult]:
        references = [gsm8k_reference(row, self.answer_field) for row in rows]
        prompts, metas = self.ask(rows)
        replies = self.replies(rows, prompts, metas, context)
        out = []
        for prompt, reply, reference in zip(prompts, replies, references):
            predicted = final_number(reply)
            correct = predicted is not None and abs(predicted - reference) < 1e-6
            record = {"prompt": prompt_text(prompt), "reply": reply, "predicted": predicted}
            out.append(RowResult({"accuracy": float(correct)}, {**record, "reference": reference}))
        return out


@register_task("math")
class MathTask(GenerativeTask):
    """MATH-style problems: accuracy of the reply's final expression, checked with math-verify.

    Args:
        answer_field: the reference answer (LaTeX, e.g. ``\\frac{25}{13}``).
    """

    metrics = ("accuracy",)
    default_prompt_format = "{problem}\nPut the final answer within \\boxed{{}}."

    def __init__(self, data: Any, answer_field: str = "answer", **kwargs: Any) -> None:
        super().__init__(data, **kwargs)
        self.answer_field = answer_field

    def evaluate_batch(self, rows: list[EvalRow], context: EvalContext) -> list[RowResult]:
        references = [str(row.get(self.answer_field, (str, int, float))) for row in rows]
        prompts, metas = self.ask(rows)
        replies = self.replies(rows, prompts, metas, context)
        return [
            RowResult(
                {"accuracy": float(math_verify_equal(reference, reply))},
                {"prompt": prompt_text(prompt), "reply": reply, "reference": reference},
            )
            for prompt, reply, reference in zip(prompts, replies, references)
        ]
