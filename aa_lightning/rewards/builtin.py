"""Built-in rule-based rewards: GSM8K final-answer check, answer format, target share, length."""

from __future__ import annotations

import re
from typing import Any

from aa_lightning.rewards.registry import register_reward

__all__ = [
    "extract_final_answer",
    "format_reward",
    "gsm8k_answer",
    "normalize_number",
    "response_length",
    "target_token_share",
]

_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+"
_NUMBER_RE = re.compile(_NUMBER)
_HASH_RE = re.compile(r"####\s*(" + _NUMBER + r")")
_ANSWER_IS_RE = re.compile(r"answer\s+is\s*:?\s*(" + _NUMBER + r")", re.IGNORECASE)
GSM8K_FORMAT = r"####\s*(?:" + _NUMBER + r")\s*\.?\s*$"


def _boxed_contents(text: str) -> list[str]:
    """Contents of every ``\\boxed{...}`` (balanced braces, so ``\\boxed{\\frac{1}{2}}`` works)."""
    out: list[str] = []
    start = 0
    while (pos := text.find("\\boxed{", start)) != -1:
        depth, i = 1, pos + len("\\boxed{")
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            out.append(text[pos + len("\\boxed{") : i - 1])
        start = i
    return out


def normalize_number(text: str) -> str:
    """``"$1,080.00"`` -> ``"1080"``; non-numbers are stripped and lower-cased."""
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".").strip()
    try:
        value = float(cleaned)
    except ValueError:
        return cleaned.lower()
    if value.is_integer():
        return str(int(value))
    return repr(value)


def extract_final_answer(text: str) -> str | None:
    """The final answer of a worked solution, normalised with :func:`normalize_number`.

    Looks, in order, for the last ``\\boxed{...}``, the last ``#### N``, the last "the answer is N", and
    finally the last number anywhere in the text. None when the text holds no candidate.
    """
    boxed = _boxed_contents(text)
    if boxed:
        inner = boxed[-1]
        numbers = _NUMBER_RE.findall(inner)
        return normalize_number(numbers[-1] if len(numbers) == 1 else inner)
    for pattern in (_HASH_RE, _ANSWER_IS_RE):
        hits = pattern.findall(text)
        if hits:
            return normalize_number(hits[-1])
    numbers = _NUMBER_RE.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


@register_reward("gsm8k_answer")
def gsm8k_answer(
    prompt: str, response: str, meta: dict[str, Any], correct: float = 1.0, incorrect: float = 0.0
) -> float:
    """``correct`` when the response's final answer equals ``meta["reference_answer"]``, else ``incorrect``.

    Numbers are compared numerically after normalisation (``"1,080"`` == ``"1080.0"``).
    """
    if "reference_answer" not in meta:
        raise KeyError("gsm8k_answer needs meta['reference_answer'] (use the GSM8K template for the prompts)")
    predicted = extract_final_answer(response)
    return (
        correct
        if predicted is not None and predicted == normalize_number(str(meta["reference_answer"]))
        else incorrect
    )


@register_reward("format")
def format_reward(
    prompt: str,
    response: str,
    meta: dict[str, Any],
    pattern: str = GSM8K_FORMAT,
    mode: str = "search",
    matched: float = 1.0,
    unmatched: float = 0.0,
) -> float:
    """``matched`` when the response has the expected format: the regex ``pattern`` found (``mode=search``)
    or matching the whole stripped response (``mode=fullmatch``). The default asks for a GSM8K-style final
    line ``#### <number>`` at the very end (the response ends cleanly after the answer)."""
    flags = re.DOTALL | re.MULTILINE
    if mode == "search":
        hit = re.search(pattern, response.strip(), flags)
    elif mode == "fullmatch":
        hit = re.fullmatch(pattern, response.strip(), flags)
    else:
        raise ValueError(f"format reward: unknown mode {mode!r}; use 'search' or 'fullmatch'")
    return matched if hit else unmatched


@register_reward("target_token_share")
def target_token_share(prompt: str, response: str, meta: dict[str, Any], target: str = " the") -> float:
    """Share of the response's characters covered by (non-overlapping) occurrences of ``target``.

    In ``[0, 1]``; a response made only of repetitions of ``target`` scores 1. With a single-token ``target``
    it tracks the share of that token among the generated tokens, which makes it a dense, easily learnt
    signal for tests and demos.
    """
    if not target:
        raise ValueError("target_token_share needs a non-empty target")
    if not response:
        return 0.0
    return response.count(target) * len(target) / len(response)


@register_reward("response_length")
def response_length(prompt: str, response: str, meta: dict[str, Any], scale: float = 1.0) -> float:
    """Number of characters of the response divided by ``scale`` (a simple cost for length control)."""
    return len(response) / scale
