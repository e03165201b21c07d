"""Small synthetic preference tasks a tiny model can learn: the preferred reply has a fixed phrasing."""

from __future__ import annotations

import itertools
import random

ADJECTIVES = ["red", "blue", "green", "small", "big", "old", "new", "fast"]
NOUNS = ["apples", "rivers", "cars", "books", "songs", "trees", "cats", "clouds"]


def topics(seed: int) -> list[str]:
    """64 distinct topics ("red apples", ...) in a seeded order, so train and held-out topics differ."""
    names = [f"{a} {n}" for a, n in itertools.product(ADJECTIVES, NOUNS)]
    random.Random(seed).shuffle(names)
    return names


def hh_rows(names: list[str], good: str, bad: str, question: str) -> list[dict]:
    """HH-RLHF transcripts: ``question``/``good``/``bad`` are templates over ``{t}`` (the topic)."""
    rows = []
    for t in names:
        prompt = f"\n\nHuman: {question.format(t=t)}"
        rows.append(
            {
                "chosen": f"{prompt}\n\nAssistant: {good.format(t=t.capitalize())}",
                "rejected": f"{prompt}\n\nAssistant: {bad.format(t=t.capitalize())}",
            }
        )
    return rows
