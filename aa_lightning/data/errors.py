"""Errors for malformed dataset rows.

A formatter only sees one raw row, so it can name the offending *field* but not the file or row number.
The dataset layer catches the error and adds that location with :func:`with_location`, so the final
message points at the exact place to fix, e.g.
``alpaca.json, row 17, field 'output': expected a non-empty string, got None``.

An error raised because ``on_bad_row`` is ``error`` carries :data:`SKIP_BAD_ROWS_HINT`, so the message also
says how to skip such rows instead.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SKIP_BAD_ROWS_HINT", "DataFormatError", "LeftOutRow", "with_location"]

SKIP_BAD_ROWS_HINT = (
    "to skip such rows and count them, set `on_bad_row: skip` under `data.init_args` in the YAML config, "
    "or pass `--data.init_args.on_bad_row skip`"
)
"""How to skip bad rows, in the spelling of the ``aa`` YAML config and command line."""


class DataFormatError(ValueError):
    """A raw sample does not have the layout its formatter expects.

    Subclasses ``ValueError`` so generic ``except ValueError`` handlers still catch it. The constructor
    accepts the reason as its only positional argument so that code re-raising an exception type from a
    message string (e.g. PyTorch's DataLoader worker re-raise) still works.
    """

    def __init__(
        self,
        reason: str,
        *,
        field: str | None = None,
        source: str | None = None,
        row: int | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason: str = reason
        self.field: str | None = field
        self.source: str | None = source
        self.row: int | None = row
        self.hint: str | None = hint  # what the user can do about it, appended to the message

    @property
    def location(self) -> str:
        """``"file, row N, field 'x'"`` with the unknown parts left out (may be empty)."""
        parts: list[str] = []
        if self.source is not None:
            parts.append(str(self.source))
        if self.row is not None:
            parts.append(f"row {self.row}")
        if self.field is not None:
            parts.append(f"field {self.field!r}")
        return ", ".join(parts)

    def __str__(self) -> str:
        location = self.location
        message = f"{location}: {self.reason}" if location else self.reason
        return f"{message} ({self.hint})" if self.hint else message

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.reason!r}, field={self.field!r}, "
            f"source={self.source!r}, row={self.row!r}, hint={self.hint!r})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep the location across pickling (multiprocessing workers, datasets.map with num_proc).
        return (_rebuild, (type(self), self.reason, self.field, self.source, self.row, self.hint))

    def with_location(self, source: str | None = None, row: int | None = None) -> DataFormatError:
        """Fill in the file and row (only those not already set) and return ``self`` for ``raise``.

        An inner layer that already knew the location wins, so wrapping twice never hides the
        more precise information.
        """
        if self.source is None and source is not None:
            self.source = str(source)
        if self.row is None and row is not None:
            self.row = row
        return self


class LeftOutRow(Exception):
    """A well-formed row that its formatter leaves out by the data set's own rule (a tie in a preference set:
    no side is preferred). Not an error whatever ``on_bad_row`` says: the row is dropped and the data report
    counts it by its reason (the message, e.g. ``"ties (label_0 is 0.5)"``), so nothing goes silently."""


def _rebuild(
    cls: type[DataFormatError],
    reason: str,
    field: str | None,
    source: str | None,
    row: int | None,
    hint: str | None = None,
) -> DataFormatError:
    return cls(reason, field=field, source=source, row=row, hint=hint)


def with_location(err: DataFormatError, source: str | None = None, row: int | None = None) -> DataFormatError:
    """Function form of :meth:`DataFormatError.with_location`, for ``raise with_location(e, path, i) from None``."""
    return err.with_location(source=source, row=row)
