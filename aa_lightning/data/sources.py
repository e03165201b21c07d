"""Where rows come from: a :class:`DataSpec` loaded through ``datasets``."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch

from aa_lightning.config_coercion import as_config_list
from aa_lightning.data.errors import DataFormatError
from aa_lightning.data.file_diagnosis import why_unreadable

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


@dataclass
class DataSpec:
    """One data set: ``path`` is a local file (json/jsonl/parquet/csv), a folder (``save_to_disk`` output
    or data files), or a hub name where a hub is reachable.

    Args:
        path: file, folder or hub name.
        template: the formatter that turns a row into conversations: a name registered with
            ``@register_template``, or ``package.module:ClassName`` (imported; no registration needed).
        split: split to read (hub names and data folders).
        name: subset / configuration name (hub names).
        size: keep only the first ``size`` rows (after shuffling, when ``shuffle_seed`` is set).
        shuffle_seed: shuffle the rows with this seed before taking ``size``.
    """

    path: str
    template: str
    split: str = "train"
    name: str | None = None
    size: int | None = None
    shuffle_seed: int | None = None


@dataclass
class LoadedRows:
    rows: datasets.Dataset
    source: str  # a readable name for error messages (the file name)
    row_numbers: list[int]  # row_numbers[i] = row index in the source of rows[i]


def load_local(path: str, load: Callable[[], datasets.Dataset]) -> datasets.Dataset:
    """``load()`` for the local file or folder ``path``; a file it cannot read is a one-line
    :class:`DataFormatError` naming the file and what is wrong with it (not a ``datasets`` traceback)."""
    try:
        return load()
    except MemoryError:
        raise
    except Exception as err:
        if os.path.isdir(path):
            reason = f"cannot read the data folder: {why_unreadable(path, err)}"
        else:
            reason = f"cannot read the data file: {why_unreadable(path, err)}"
        raise DataFormatError(reason, source=path) from None


def load_rows(spec: DataSpec) -> LoadedRows:
    """Load the rows of ``spec`` (no formatting yet)."""
    path = os.path.expanduser(spec.path)
    ext = os.path.splitext(path)[1].lower()
    if os.path.isfile(path):
        if ext not in _FILE_BUILDERS:
            raise ValueError(
                f"{path}: unsupported data file type {ext!r}; use one of {sorted(_FILE_BUILDERS)}"
            )
        rows = load_local(
            path, lambda: datasets.load_dataset(_FILE_BUILDERS[ext], data_files=path, split="train")
        )
    elif os.path.isdir(path):
        if os.path.exists(os.path.join(path, "state.json")) or os.path.exists(
            os.path.join(path, "dataset_dict.json")
        ):
            loaded = datasets.load_from_disk(path)
            rows = loaded[spec.split] if isinstance(loaded, datasets.DatasetDict) else loaded
        else:
            rows = load_local(path, lambda: datasets.load_dataset(path, name=spec.name, split=spec.split))
    else:
        try:
            rows = datasets.load_dataset(path, name=spec.name, split=spec.split)
        except Exception as err:  # the hub may be out of reach: say what was tried
            raise FileNotFoundError(
                f"data path {spec.path!r} is neither a local file/folder nor a loadable hub dataset ({err})"
            ) from err
    numbers = np.arange(len(rows))
    if spec.shuffle_seed is not None:
        numbers = np.random.default_rng(spec.shuffle_seed).permutation(len(rows))
    if spec.size is not None:
        numbers = numbers[: spec.size]
    if spec.shuffle_seed is not None or spec.size is not None:
        rows = rows.select(numbers.tolist())
    return LoadedRows(rows=rows, source=source_name(path), row_numbers=numbers.tolist())


def source_name(path: str) -> str:
    """How messages name a data set: its file or folder name."""
    return os.path.basename(path.rstrip("/")) or path


def media_root(spec: DataSpec, override: str | None = None) -> str:
    """The folder that relative media paths of ``spec``'s rows resolve against: ``override`` when set, else
    the data file's folder (the data folder itself; the working directory for a hub name)."""
    if override:
        return os.path.abspath(os.path.expanduser(override))
    path = os.path.abspath(os.path.expanduser(spec.path))
    return os.path.dirname(path) if os.path.isfile(path) else path if os.path.isdir(path) else os.getcwd()


def as_specs(
    value: DataSpec | list[DataSpec] | dict[str, Any] | None, name: str = "data spec"
) -> list[DataSpec]:
    """One split's specs as typed :class:`DataSpec` objects (YAML gives dicts; a misspelt key fails here)."""
    return as_config_list(DataSpec, value, name)


torch.serialization.add_safe_globals([DataSpec])  # saved in datamodule hyper-parameters of checkpoints
