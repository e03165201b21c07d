"""Why a data file cannot be read, in one line a user can act on.

``datasets`` reports a malformed file as ``DatasetGenerationError: An error occurred while generating the
dataset`` over a chain of pyarrow / pandas errors (``Unmatched '"' when when decoding 'string' at position
59``). :func:`why_unreadable` reads the file once more with the standard library to say what is wrong and
where (``not valid JSON: Unterminated string starting at line 3, column 14; the file ends there, so it
looks truncated``), and falls back to the innermost cause that ``datasets`` wrapped.
"""

from __future__ import annotations

import json
import os

__all__ = ["why_unreadable"]

# Wrappers that say nothing about the file itself; the useful message is in their cause.
_WRAPPERS = ("DatasetGenerationError", "DatasetBuildError", "DatasetsError")


def why_unreadable(path: str, error: BaseException) -> str:
    """What is wrong with the data file ``path`` that ``datasets`` failed to load with ``error``."""
    try:
        if os.path.getsize(path) == 0:
            return "the file is empty"
    except OSError as err:
        return f"{type(err).__name__}: {err}"
    if os.path.splitext(path)[1].lower() in (".json", ".jsonl"):
        problem = json_problem(path)
        if problem is not None:
            return problem
    return innermost_cause(error)


def innermost_cause(error: BaseException) -> str:
    """``Type: message`` (first line) of the first error in the chain that is not a ``datasets`` wrapper."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if type(current).__name__ not in _WRAPPERS:
            text = str(current).strip().splitlines()
            return f"{type(current).__name__}: {text[0]}" if text else type(current).__name__
        current = current.__cause__ or current.__context__
    return f"{type(error).__name__}: {error}"


def json_problem(path: str) -> str | None:
    """What makes ``path`` unusable as JSON rows (a list of objects, or JSON Lines), or None if it is fine."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as err:
        return f"not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start})"
    if not text.strip():
        return "the file holds only white space"
    try:
        document = json.loads(text)
    except json.JSONDecodeError as whole:
        return _json_lines_problem(text) if _looks_like_json_lines(text) else _syntax(whole, text)
    if isinstance(document, list):
        if not document:
            return "the file holds an empty list: no rows"
        for index, row in enumerate(document):
            if not isinstance(row, dict):
                return f"row {index} is a {_json_type(row)}, not an object (one object per row)"
        return None
    if isinstance(document, dict):
        return None  # a mapping of columns: let datasets' own message stand
    return f"expected a list of objects (one per row) or JSON Lines, got a {_json_type(document)}"


def _looks_like_json_lines(text: str) -> bool:
    """Several non-empty lines of which the first is a JSON object on its own."""
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) < 2:
        return False
    try:
        return isinstance(json.loads(lines[0]), dict)
    except json.JSONDecodeError:
        return False


def _json_lines_problem(text: str) -> str | None:
    lines = [(number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    for number, line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            last = " (the last line, so the file looks truncated)" if number == lines[-1][0] else ""
            return f"line {number} is not valid JSON: {err.msg} at column {err.colno}{last}"
        if not isinstance(row, dict):
            return f"line {number} is a {_json_type(row)}, not an object (one object per line)"
    return None


def _syntax(error: json.JSONDecodeError, text: str) -> str:
    at = " " if error.msg.endswith(" at") else " at "  # "Unterminated string starting at"
    where = f"{error.msg}{at}line {error.lineno}, column {error.colno}"
    if not text[error.pos :].strip() or error.msg.startswith("Unterminated"):
        return f"not valid JSON: {where}; the document stops before it is complete, so it looks truncated"
    return f"not valid JSON: {where}"


def _json_type(value: object) -> str:
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "list", type(None): "null"}
    return names.get(type(value), type(value).__name__)
