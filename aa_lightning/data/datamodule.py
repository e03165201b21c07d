"""The modality-agnostic DataModule: specs -> formatter -> chat template -> tokens -> batches.

Modality DataModules subclass :class:`ConversationDataModule` and change only what differs: how media
is loaded and handed to the processor (``build_collator``). Which kind of sample to build (supervised,
preference or prompt-only) is read from the LightningModule's ``data_kind`` attribute unless set here,
so the datamodule never names an algorithm.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal

import datasets
import lightning.pytorch as pl
import numpy as np
from torch.utils.data import DataLoader

from aa_lightning.batch import PROMPT_STREAM, PTX_STREAM, SAMPLE_INDEX, SAMPLE_KINDS
from aa_lightning.data.auxiliary import WithAuxiliaryStream
from aa_lightning.data.collators import TextCollator
from aa_lightning.data.encoding import EMPTY_SAMPLES, PromptTooLongError, SampleEncoder
from aa_lightning.data.errors import SKIP_BAD_ROWS_HINT, DataFormatError, LeftOutRow
from aa_lightning.data.formatters import get_formatter
from aa_lightning.data.loader import (
    LengthGroupedSampler,
    ResumableDataLoader,
    ResumableSampler,
    step_token_counts,
)
from aa_lightning.data.reports import CutDetector, DataReport, row_notes
from aa_lightning.data.sources import DataSpec, as_specs, load_rows
from aa_lightning.data.templating import ChatRenderer
from aa_lightning.models.aliases import resolve_model_path
from aa_lightning.models.loading import load_tokenizer_and_processor
from aa_lightning.models.registry import MODEL_REGISTRY, load_config

log = logging.getLogger(__name__)

Kind = Literal["auto", "supervised", "preference", "prompt_only"]
SPLITS = ("train", "val", "test", "predict")
PTX = PTX_STREAM  # the auxiliary supervised stream of prompt-only training (a split name too)


class ConversationDataModule(pl.LightningDataModule):
    """Formatter-driven data for any algorithm.

    Args:
        model_name_or_path: the model whose tokenizer/processor and chat template encode the data
            (linked to the model's path by the ``aa`` CLI).
        train, val, test, predict: data specs (``path`` + ``template`` + optional split/size/seed).
        kind: ``auto`` asks the LightningModule (its ``data_kind``); or force one kind.
        max_length: tokens per sequence; longer rows are cut from the right and counted in the log. Rows
            whose response would be cut away entirely are dropped and reported (``on_truncated: error``
            raises instead). Preference pairs whose chosen and rejected are identical are counted too.
        train_on: ``all_assistant`` turns or only the ``last_assistant`` turn get labels.
        batch_size / eval_batch_size: per device. Preference batches hold 2 x batch_size sequences.
        on_bad_row: ``error`` raises naming file, row and field (and how to skip); ``skip`` drops the row
            and counts it. Bad rows are found when the data is prepared, media included (decoded once).
        seed: shuffling seed (the order depends only on seed and epoch, so resume is exact).
        group_by_length: build training batches of similar lengths (shuffled, then sorted inside mega-batches
            of 50 batches): much less padding, hence faster steps, at the price of batches that are less
            random. Evaluation loaders keep the data order.
        ptx: specs of an auxiliary SUPERVISED stream for prompt-only training (the pre-training mix of
            InstructGPT-style RLHF). The train loader then yields ``{"prompt": prompt_batch, "ptx":
            supervised_batch}``; the prompts set the epoch and the supervised stream cycles through its own
            shuffled epochs (see :class:`~aa_lightning.data.auxiliary.WithAuxiliaryStream`).
        ptx_batch_size: rows per device of each ``ptx`` batch (default: ``batch_size``).
        tools: names of tools (:mod:`aa_lightning.environments.tools`) whose schemas the chat template
            renders into the prompts (``tools=`` of ``apply_chat_template``), for multi-turn tool rollouts.
    """

    def __init__(
        self,
        model_name_or_path: str = "",
        train: DataSpec | list[DataSpec] | None = None,
        val: DataSpec | list[DataSpec] | None = None,
        test: DataSpec | list[DataSpec] | None = None,
        predict: DataSpec | list[DataSpec] | None = None,
        kind: Kind = "auto",
        max_length: int = 512,
        train_on: Literal["all_assistant", "last_assistant"] = "all_assistant",
        batch_size: int = 4,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle: bool = True,
        seed: int = 42,
        on_bad_row: Literal["error", "skip"] = "error",
        on_truncated: Literal["drop", "error"] = "drop",
        pad_to_multiple_of: int | None = None,
        trust_remote_code: bool = False,
        num_proc: int | None = None,
        group_by_length: bool = False,
        ptx: DataSpec | list[DataSpec] | None = None,
        ptx_batch_size: int | None = None,
        tools: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.specs = {split: as_specs(v, split) for split, v in zip(SPLITS, (train, val, test, predict))}
        self.specs[PTX] = as_specs(ptx, PTX)
        self.datasets: dict[str, datasets.Dataset] = {}
        self.reports: dict[str, list[DataReport]] = {}
        self.tokenizer: Any = None
        self.processor: Any = None

    # -- what kind of samples ------------------------------------------------------------------------
    def resolve_kind(self) -> str:
        kind = self.hparams.kind
        if kind == "auto":
            module = self.trainer.lightning_module if self.trainer is not None else None
            kind = getattr(module, "data_kind", None)
            if kind is None:
                raise ValueError(
                    "data.kind is 'auto' but no LightningModule with a `data_kind` is attached; "
                    f"set data.kind to one of {SAMPLE_KINDS}"
                )
        if kind not in SAMPLE_KINDS:
            raise ValueError(f"unknown data kind {kind!r}; use one of {SAMPLE_KINDS}")
        return kind

    def split_kind(self, split: str) -> str:
        """Predictions are generations, so the predict split is always prompt-only; ``ptx`` is supervised."""
        if split == PTX:
            return "supervised"
        return "prompt_only" if split == "predict" else self.kind

    # -- tokenizer, processor, template ----------------------------------------------------------------
    def load_processing(self) -> None:
        if self.tokenizer is not None:
            return
        if not self.hparams.model_name_or_path:
            raise ValueError("data.model_name_or_path is empty: set it (the aa CLI links it to the model's)")
        path = resolve_model_path(self.hparams.model_name_or_path)
        self.tokenizer, self.processor = load_tokenizer_and_processor(
            path, trust_remote_code=self.hparams.trust_remote_code
        )
        config = load_config(path, trust_remote_code=self.hparams.trust_remote_code)
        self.renderer = ChatRenderer(
            self.tokenizer, self.processor, MODEL_REGISTRY.get(config.model_type, None), self.tool_schemas()
        )
        log.info("chat template from the %s", self.renderer.source)

    def tool_schemas(self) -> list[dict[str, Any]] | None:
        names = self.hparams.get("tools")
        if not names:
            return None
        from aa_lightning.environments.tools import tool_schemas

        return tool_schemas(list(names))

    def build_encoder(self) -> SampleEncoder:
        return SampleEncoder(self.tokenizer, self.renderer, self.hparams.max_length, self.hparams.train_on)

    def sample_check(self) -> Callable[[dict[str, Any]], None] | None:
        """What checks an encoded sample beyond its tokens when the data is prepared, raising a
        :class:`DataFormatError` for a bad row (the media datamodules decode its media); None: nothing."""
        return None

    def build_collator(self, kind: str) -> Callable[[list[dict]], dict]:
        return TextCollator(self.tokenizer.pad_token_id, kind, self.hparams.pad_to_multiple_of)

    # -- what a datamodule with other samples changes (text-to-image: prompts and images, no labels) -----
    def empty_sample(self, kind: str) -> dict[str, Any]:
        """The columns of a dropped row (every row of a ``datasets.map`` needs the same columns)."""
        return EMPTY_SAMPLES[kind]

    def new_report(self, source: str, total: int) -> DataReport:
        return DataReport(source, total, self.hparams.max_length)

    def row_noter(self, encoder: Any) -> Callable[[str, dict[str, Any], Sequence[Any]], str]:
        """What notes a kept row for the report (cut short, identical pair), from its encoding and formatting."""
        return functools.partial(row_notes, cut=CutDetector(encoder))

    def step_tokens(self, data: datasets.Dataset) -> dict[str, np.ndarray]:
        """Per-sample counts behind the step-token keys of training batches (see :mod:`aa_lightning.batch`)."""
        return step_token_counts(data, self.kind)

    # -- encoding --------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        self.load_processing()
        self.kind = self.resolve_kind()
        if self.specs[PTX] and self.kind != "prompt_only":
            raise ValueError(
                f"data.ptx is a supervised stream yielded next to prompt-only batches, but this run's data kind "
                f"is {self.kind!r}; remove data.ptx (or train an algorithm that reads prompts)"
            )
        for split, specs in self.specs.items():
            if specs and split not in self.datasets:
                parts, reports = zip(*(self.encode_spec(spec, self.split_kind(split)) for spec in specs))
                data = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(list(parts))
                self.datasets[split] = data.add_column(SAMPLE_INDEX, list(range(len(data))))
                self.reports[split] = list(reports)

    def encode_spec(self, spec: DataSpec, kind: str) -> tuple[datasets.Dataset, DataReport]:
        loaded = load_rows(spec)
        formatter = get_formatter(spec.template)
        encoder = self.build_encoder()
        report = self.new_report(loaded.source, len(loaded.rows))
        skip_bad = self.hparams.on_bad_row == "skip"
        drop_truncated = self.hparams.get("on_truncated", "drop") == "drop"  # a subclass may not take it
        check = self.sample_check()
        notes_of = self.row_noter(encoder)
        empty = self.empty_sample(kind)

        def encode(row: dict[str, Any], index: int) -> dict[str, Any]:
            row_number = loaded.row_numbers[index]
            dropped = {**empty, "_row": row_number, "_note": ""}
            try:
                if kind == "supervised":
                    formatted = formatter.format_supervised_sample(row)
                elif kind == "preference":
                    formatted = formatter.format_preference_sample(row)
                else:
                    formatted = formatter.format_prompt_only_sample(row)
                out = getattr(encoder, kind)(*formatted)
                if check is not None:
                    check(out)
                note = notes_of(kind, out, formatted)
                return {**out, "_row": row_number, "_drop": "", "_note": note}
            except LeftOutRow as why:
                return {**dropped, "_drop": "out:" + str(why)}
            except DataFormatError as err:
                err.with_location(source=loaded.source, row=row_number)
                if not skip_bad:
                    err.hint = err.hint or SKIP_BAD_ROWS_HINT
                    raise
                return {**dropped, "_drop": "bad:" + str(err)}
            except PromptTooLongError as err:
                if not drop_truncated:
                    raise ValueError(
                        f"{loaded.source}, row {row_number}: {err} (raise max_length, or drop and count such "
                        "rows with `on_truncated: drop` under `data.init_args`)"
                    ) from None
                return {**dropped, "_drop": "truncated"}

        fingerprint = self._fingerprint(loaded.rows, spec, kind, formatter)
        encoded = loaded.rows.map(
            encode,
            with_indices=True,
            remove_columns=loaded.rows.column_names,
            new_fingerprint=fingerprint,
            num_proc=self.hparams.num_proc,
            desc=f"Encoding {loaded.source} ({kind})",
        )
        drops, notes = encoded["_drop"], encoded["_note"]
        if any(drops) or any(notes):
            for row, why, note in zip(encoded["_row"], drops, notes):
                if why == "truncated":
                    report.truncated.append(row)
                elif why.startswith("out:"):
                    report.left_out.append((row, why[4:]))
                elif why:
                    report.bad.append((row, why[4:]))
                elif note:
                    report.add_note(row, note)
        if any(drops):
            encoded = encoded.filter(lambda d: not d, input_columns="_drop", desc="Dropping reported rows")
        (log.warning if report.worth_a_warning else log.info)(report.summary(len(encoded)))
        return encoded.remove_columns(["_drop", "_note"]), report

    def _fingerprint(self, rows: datasets.Dataset, spec: DataSpec, kind: str, formatter: Any) -> str:
        parts = {
            "rows": rows._fingerprint,
            "spec": spec.__dict__,
            "kind": kind,
            "formatter": formatter_source(formatter),
            "system_prompt": getattr(formatter, "system_prompt", ""),
            "max_length": self.hparams.max_length,
            "on_bad_row": self.hparams.on_bad_row,  # a cached 'skip' encoding must not answer an 'error' run
            "on_truncated": self.hparams.on_truncated,
            "train_on": self.hparams.train_on,
            **({"tools": self.tool_schemas()} if self.hparams.get("tools") else {}),  # old caches stay valid
            "tokenizer": [self.tokenizer.name_or_path, len(self.tokenizer), self.tokenizer.chat_template],
            "template_source": self.renderer.source,
            "encoder": inspect.getsource(SampleEncoder),
            "renderer": inspect.getsource(ChatRenderer),  # where spans and texts end
            "version": 2,  # 2: rows carry an encoding note (cut short / identical pair)
        }
        return fingerprint_of(parts)

    # -- loaders ---------------------------------------------------------------------------------------
    def _progress(self) -> tuple[int, int]:
        loop = self.trainer.fit_loop
        return loop.epoch_progress.current.processed, loop.epoch_loop.batch_progress.current.processed

    def _step_schedule(self) -> tuple[int, float]:
        """Micro-batches per optimizer step and trained batches per epoch (the loader's window plan)."""
        return self.trainer.accumulate_grad_batches, self.trainer.num_training_batches

    def train_dataloader(self) -> DataLoader:
        data = self._split("train")
        if self.hparams.get("group_by_length"):
            sampler: ResumableSampler = LengthGroupedSampler(
                data,
                sample_lengths(data, self.kind),
                batch_size=self.hparams.batch_size,
                shuffle=self.hparams.shuffle,
                seed=self.hparams.seed,
            )
        else:
            sampler = ResumableSampler(data, shuffle=self.hparams.shuffle, seed=self.hparams.seed)
        loader = ResumableDataLoader(
            data,
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            collate_fn=self.build_collator(self.kind),
            num_workers=self.hparams.num_workers,
            progress_fn=self._progress if self.trainer is not None else None,
            step_tokens=self.step_tokens(data),
            schedule_fn=self._step_schedule if self.trainer is not None else None,
        )
        if PTX not in self.datasets:
            return loader
        ptx = self.datasets[PTX]
        ptx_loader = ResumableDataLoader(
            ptx,
            batch_size=self.hparams.get("ptx_batch_size") or self.hparams.batch_size,
            sampler=ResumableSampler(ptx, shuffle=self.hparams.shuffle, seed=self.hparams.seed),
            collate_fn=self.build_collator(self.split_kind(PTX)),
            num_workers=self.hparams.num_workers,
        )
        return WithAuxiliaryStream(loader, ptx_loader, main_key=PROMPT_STREAM, auxiliary_key=PTX)  # type: ignore[return-value]

    def _eval_loader(self, split: str) -> DataLoader:
        return DataLoader(
            self._split(split),
            batch_size=self.hparams.eval_batch_size or self.hparams.batch_size,
            shuffle=False,
            collate_fn=self.build_collator(self.split_kind(split)),
            num_workers=self.hparams.num_workers,
        )

    def val_dataloader(self) -> DataLoader | list:
        return self._eval_loader("val") if "val" in self.datasets else []

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("predict")

    def _split(self, split: str) -> datasets.Dataset:
        if split not in self.datasets:
            raise ValueError(f"no `{split}` data: set data.{split} (a path and a template)")
        return self.datasets[split]


def formatter_source(formatter: Any) -> str:
    """The code of a formatter's class, for cache fingerprints (an edited formatter re-encodes its data)."""
    try:
        return inspect.getsource(type(formatter))
    except (OSError, TypeError):
        return type(formatter).__qualname__


def fingerprint_of(parts: dict[str, Any]) -> str:
    """A ``datasets`` cache fingerprint for everything an encoding depends on (JSON-able ``parts``)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def sample_lengths(data: datasets.Dataset, kind: str) -> list[int]:
    """Token count of every encoded sample (a preference pair counts its longer side: it sets the padding)."""
    if kind == "preference":
        return [max(len(c), len(r)) for c, r in zip(data["chosen_input_ids"], data["rejected_input_ids"])]
    return [len(ids) for ids in data["input_ids"]]


class TextToTextDataModule(ConversationDataModule):
    """Text in, text out (t2t): the tokenizer and its chat template are all it needs."""
