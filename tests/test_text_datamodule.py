"""TextToTextDataModule: specs, kinds, padding sides, bad rows, truncation reports."""

from __future__ import annotations

import json

import pytest

from aa_lightning.data import DataFormatError, DataSpec, TextToTextDataModule

ROWS = [
    {"instruction": "Say hi", "input": "", "output": "Hi!"},
    {"instruction": "Count to three", "input": "", "output": "One, two, three."},
    {"instruction": "Name a fruit", "input": "", "output": None},
    {"instruction": "Spell cat", "input": "", "output": "C-A-T."},
]


def write(tmp_path, rows, name="rows.json"):
    path = tmp_path / name
    path.write_text(json.dumps(rows))
    return str(path)


def datamodule(path, **kwargs):
    return TextToTextDataModule("tiny-qwen2", train=DataSpec(path, "Alpaca"), **kwargs)


def test_bad_row_error_names_file_row_and_field(tmp_path):
    dm = datamodule(write(tmp_path, ROWS, "my_data.json"), kind="supervised")
    with pytest.raises(DataFormatError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert "my_data.json" in message and "row 2" in message and "'output'" in message


def test_bad_rows_can_be_skipped_and_are_counted(tmp_path):
    dm = datamodule(write(tmp_path, ROWS), kind="supervised", on_bad_row="skip", batch_size=8)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 3
    report = dm.reports["train"][0]
    assert [row for row, _ in report.bad] == [2]
    assert "1 bad rows skipped" in report.summary(3)


def test_truncated_rows_are_reported(tmp_path):
    rows = [dict(r) for r in ROWS if r["output"]]
    rows[1]["instruction"] = "word " * 200  # the prompt alone fills max_length
    dm = datamodule(write(tmp_path, rows), kind="supervised", max_length=48)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 2
    assert dm.reports["train"][0].truncated == [1]
    with pytest.raises(ValueError, match="row 1"):
        datamodule(
            write(tmp_path, rows, "again.json"), kind="supervised", max_length=48, on_truncated="error"
        ).setup("fit")


def test_supervised_batches_are_right_padded_and_prompt_only_left_padded(tmp_path):
    path = write(tmp_path, [r for r in ROWS if r["output"]])
    dm = datamodule(path, kind="supervised", batch_size=3, shuffle=False)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["attention_mask"][:, 0].all()  # right padding: every row starts with a real token
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    pad = dm.tokenizer.pad_token_id
    dm = datamodule(path, kind="prompt_only", batch_size=3, shuffle=False)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["attention_mask"][:, -1].all()  # left padding: generation continues every row
    assert (batch["input_ids"][batch["attention_mask"] == 0] == pad).all()
    assert "labels" not in batch
    assert batch["meta"][0]["reference"] == "Hi!"
    assert dm.tokenizer.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()]).endswith(
        "<|im_start|>assistant\n"
    )


def test_preference_batches_put_chosen_first(repo_path):
    spec = DataSpec(repo_path("tests", "fixtures", "text", "hh_rlhf_harmless.jsonl"), "HH-RLHF", size=2)
    dm = TextToTextDataModule("tiny-qwen2", train=spec, kind="preference", batch_size=2, shuffle=False)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 4
    sample = dm.datasets["train"][0]
    chosen = batch["input_ids"][0][: len(sample["chosen_input_ids"])].tolist()
    rejected = batch["input_ids"][2][: len(sample["rejected_input_ids"])].tolist()
    assert chosen == sample["chosen_input_ids"] and rejected == sample["rejected_input_ids"]
    assert batch["extra"]["sample_index"].tolist() == [0, 1]


def test_kind_auto_needs_a_module(tmp_path):
    dm = datamodule(write(tmp_path, ROWS[:2]))
    with pytest.raises(ValueError, match="data_kind"):
        dm.setup("fit")
