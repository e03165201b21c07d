"""What preparing one data set did to its rows, for the log: nothing is dropped, cut or useless silently.

Encoding notes each row (``datasets.map`` runs in worker processes, so a note travels as a column and
the report is filled from it afterwards):

- dropped: a bad row skipped with ``on_bad_row: skip`` (its media included: they are decoded when the
  data is prepared), a row whose response ``max_length`` would cut away entirely, or a row its formatter
  leaves out by the data set's own rule (:class:`~aa_lightning.data.errors.LeftOutRow`, e.g. a tie);
- kept but cut short: ``max_length`` removed the end of the response (its end-of-turn token with it, so
  the model is not taught to stop there);
- kept but useless: a preference pair whose chosen and rejected sequences are the same token ids, which
  gives every pairwise loss a zero gradient.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Sequence
from typing import Any

__all__ = ["CUT", "SAME", "CutDetector", "DataReport", "identical_pair", "row_notes"]

CUT = "cut"
SAME = "same"


class DataReport:
    """Counts of the rows of one data set that were dropped, cut short or carry no signal.

    A datamodule whose samples are not chat responses words the two notes for its own samples by overriding
    ``cut_short_note`` and ``identical_note``.
    """

    cut_short_note = "their responses lose their ends, end-of-turn token included"
    identical_note = "preference pairs have identical chosen and rejected responses and carry no signal"

    def __init__(self, source: str, total: int, max_length: int | None = None) -> None:
        self.source, self.total, self.max_length = source, total, max_length
        self.bad: list[tuple[int, str]] = []  # (row, why): skipped bad rows
        self.left_out: list[tuple[int, str]] = []  # (row, why): left out by the formatter's rule (ties)
        self.truncated: list[int] = []  # dropped: max_length leaves no response token
        self.cut_short: list[int] = []  # kept: max_length cut the response short
        self.identical_pairs: list[int] = []  # kept: chosen and rejected are the same sequence

    def add_note(self, row: int, note: str) -> None:
        """Record the encoding note of ``row`` (``CUT`` and/or ``SAME``, space-separated)."""
        words = note.split()
        if CUT in words:
            self.cut_short.append(row)
        if SAME in words:
            self.identical_pairs.append(row)

    @property
    def worth_a_warning(self) -> bool:
        return bool(self.bad or self.left_out or self.truncated or self.cut_short or self.identical_pairs)

    def summary(self, kept: int) -> str:
        parts = [f"{self.source}: {kept} of {self.total} rows kept"]
        if self.bad:
            parts.append(
                f"{len(self.bad)} bad rows skipped (rows {_rows(r for r, _ in self.bad)}; "
                f"first: {self.bad[0][1]})"
            )
        if self.left_out:
            reasons = ", ".join(f"{n} {why}" for why, n in Counter(why for _, why in self.left_out).items())
            parts.append(
                f"{len(self.left_out)} rows left out by their template: {reasons} "
                f"(rows {_rows(r for r, _ in self.left_out)})"
            )
        if self.truncated:
            parts.append(
                f"{len(self.truncated)} rows dropped because max_length leaves no response token "
                f"(rows {_rows(self.truncated)})"
            )
        if self.cut_short:
            limit = f"={self.max_length}" if self.max_length is not None else ""
            parts.append(
                f"{len(self.cut_short)} kept rows cut short by max_length{limit}: {self.cut_short_note} "
                f"(rows {_rows(self.cut_short)})"
            )
        if self.identical_pairs:
            parts.append(
                f"{len(self.identical_pairs)} {self.identical_note} (rows {_rows(self.identical_pairs)})"
            )
        return "; ".join(parts)


def _rows(rows: Any, shown: int = 10) -> str:
    rows = list(rows)
    return ", ".join(str(r) for r in rows[:shown]) + (" ..." if len(rows) > shown else "")


def sequence_lengths(sample: dict[str, Any], kind: str) -> list[int]:
    if kind == "preference":
        return [len(sample["chosen_input_ids"]), len(sample["rejected_input_ids"])]
    return [len(sample["input_ids"])]


def identical_pair(sample: dict[str, Any]) -> bool:
    """Chosen and rejected are the same token ids: every pairwise loss has a zero gradient on the pair."""
    return list(sample["chosen_input_ids"]) == list(sample["rejected_input_ids"])


class CutDetector:
    """Whether ``max_length`` cut an encoded sample short.

    A sample shorter than ``max_length`` was not cut. One that fills it exactly is encoded once more with
    room for one more token: it was cut if it then grows. So only rows at the limit cost a second encoding,
    and the encoder needs no bookkeeping of its own.
    """

    def __init__(self, encoder: Any) -> None:
        self.max_length: int = encoder.max_length
        self.roomier = copy.copy(encoder)
        self.roomier.max_length = encoder.max_length + 1

    def __call__(self, kind: str, sample: dict[str, Any], formatted: Sequence[Any]) -> bool:
        if kind == "prompt_only" or max(sequence_lengths(sample, kind)) < self.max_length:
            return False  # a prompt longer than max_length is dropped, never cut
        again = getattr(self.roomier, kind)(*formatted)
        return max(sequence_lengths(again, kind)) > self.max_length


def row_notes(kind: str, sample: dict[str, Any], formatted: Sequence[Any], cut: CutDetector) -> str:
    """The encoding note of a kept sample: ``CUT`` and/or ``SAME``, or ``""``."""
    notes = []
    if cut(kind, sample, formatted):
        notes.append(CUT)
    if kind == "preference" and identical_pair(sample):
        notes.append(SAME)
    return " ".join(notes)
