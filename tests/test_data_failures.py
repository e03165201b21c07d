"""Failures of the data and model paths surface when the data is prepared, in one clear line.

Real corrupt files made in ``tmp_path`` (a truncated JPEG, PNG, WAV and MP4, a truncated JSON file) go
through the real multimodal datamodules with the tiny LLaVA / Qwen2-VL / Qwen2-Audio processors; text
data goes through ``TextToTextDataModule`` on ``tiny-qwen2``.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import datasets
import pytest
from PIL import Image

from aa_lightning.data import (
    DataFormatError,
    DataSpec,
    TextAudioToTextDataModule,
    TextImageToTextDataModule,
    TextToTextDataModule,
    TextVideoToTextDataModule,
)
from aa_lightning.models import load_pretrained_models

MEDIA = Path(__file__).resolve().parent.parent / "configs" / "data" / "media"
SKIP_HINT = "--data.init_args.on_bad_row skip"
DATA_LOG = "aa_lightning.data.datamodule"


def truncated_copy(source: Path, target: Path, keep: float = 0.5) -> Path:
    """``target``: the first ``keep`` share of ``source``'s bytes, as an interrupted download leaves it."""
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * keep)])
    return target


def truncated_png(tmp_path: Path) -> Path:
    Image.open(MEDIA / "image" / "mllm_demo_data" / "1.jpg").save(tmp_path / "whole.png")
    return truncated_copy(tmp_path / "whole.png", tmp_path / "broken.png", keep=0.6)


# family -> datamodule class, model, template, media key, placeholder, good media file, extra arguments
FAMILIES: dict[str, tuple[type, str, str, str, str, Path, dict[str, Any]]] = {
    "llava-jpeg": (
        TextImageToTextDataModule,
        "tiny-llava",
        "LLaVA-Instruct",
        "images",
        "<image>",
        MEDIA / "image" / "mllm_demo_data" / "1.jpg",
        {},
    ),
    "qwen2-vl-png": (
        TextImageToTextDataModule,
        "tiny-qwen2-vl",
        "MLLM-Messages",
        "images",
        "<image>",
        MEDIA / "image" / "mllm_demo_data" / "2.jpg",
        {},
    ),
    "qwen2-audio-wav": (
        TextAudioToTextDataModule,
        "tiny-qwen2-audio",
        "MLLM-Audio",
        "audios",
        "<audio>",
        MEDIA / "audio" / "mllm_demo_data" / "2.wav",
        {},
    ),
    "qwen2-vl-mp4": (
        TextVideoToTextDataModule,
        "tiny-qwen2-vl",
        "MLLM-Video",
        "videos",
        "<video>",
        MEDIA / "video" / "mllm_demo_data" / "1.mp4",
        {"num_frames": 2},
    ),
}


def broken_media(family: str, tmp_path: Path) -> Path:
    good = FAMILIES[family][5]
    if family == "qwen2-vl-png":
        return truncated_png(tmp_path)
    return truncated_copy(good, tmp_path / f"broken{good.suffix}")


def media_rows(family: str, media: list[str], answers: list[str] | None = None) -> list[dict[str, Any]]:
    key, marker = FAMILIES[family][3], FAMILIES[family][4]
    answers = answers or [f"Answer {i}." for i in range(len(media))]
    return [
        {
            "messages": [
                {"role": "user", "content": f"{marker}What is this?"},
                {"role": "assistant", "content": answer},
            ],
            key: [name],
        }
        for name, answer in zip(media, answers)
    ]


def media_datamodule(family: str, path: Path, **kwargs: Any):
    cls, model, template, *_, extra = FAMILIES[family]
    dm = cls(
        model,
        train=DataSpec(str(path), template),
        kind="supervised",
        shuffle=False,
        batch_size=8,
        **{**extra, **kwargs},
    )
    dm.setup("fit")
    return dm


def write_json(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps(rows))
    return path


# ------------------------------------------------------------------------------ media, when prepared
@pytest.mark.parametrize("family", list(FAMILIES))
def test_truncated_media_are_bad_rows_when_the_data_is_prepared(family, tmp_path, caplog):
    """The broken file is in the LAST row: it fails at setup, not when a batch first touches it."""
    good = FAMILIES[family][5]
    shutil.copy(good, tmp_path / good.name)
    broken = broken_media(family, tmp_path)
    path = write_json(tmp_path / "rows.json", media_rows(family, [good.name, good.name, broken.name]))
    key = FAMILIES[family][3]

    with pytest.raises(DataFormatError) as info:
        media_datamodule(family, path)  # setup only: no batch is built
    message = str(info.value)
    assert "rows.json" in message and "row 2" in message and f"'{key}[0]'" in message
    assert broken.name in message
    assert SKIP_HINT in message and "on_bad_row: skip" in message

    with caplog.at_level(logging.WARNING, logger=DATA_LOG):
        dm = media_datamodule(family, path, on_bad_row="skip")
    report = dm.reports["train"][0]
    assert [row for row, _ in report.bad] == [2] and broken.name in report.bad[0][1]
    assert len(dm.datasets["train"]) == 2
    assert "rows.json: 2 of 3 rows kept; 1 bad rows skipped (rows 2;" in caplog.text
    assert SKIP_HINT not in caplog.text  # the hint is for the error, not for rows already skipped
    batches = list(dm.train_dataloader())
    assert sum(len(b["meta"]) for b in batches) == 2 and dm.skipped_media == []


def test_a_truncated_wav_is_bad_although_libsndfile_reads_it(tmp_path):
    """libsndfile decodes what is left of a cut WAV without complaint: the clip would lose its end."""
    from aa_lightning.data.media import load_audio

    whole = MEDIA / "audio" / "mllm_demo_data" / "2.wav"
    assert load_audio({"path": str(whole), "field": "audios[0]"}, 16000).shape[0] > 0
    broken = truncated_copy(whole, tmp_path / "cut.wav", keep=0.5)
    with pytest.raises(DataFormatError, match=r"cut\.wav is truncated: its header declares \d+ bytes"):
        load_audio({"path": str(broken), "field": "audios[0]"}, 16000)


def test_media_broken_after_preparing_are_skipped_in_the_collator_and_counted(tmp_path, caplog):
    family = "llava-jpeg"
    for name in ("a.jpg", "b.jpg"):
        shutil.copy(FAMILIES[family][5], tmp_path / name)
    path = write_json(tmp_path / "rows.json", media_rows(family, ["a.jpg", "b.jpg"]))
    dm = media_datamodule(family, path, on_bad_row="skip")
    strict = media_datamodule(family, path)
    truncated_copy(FAMILIES[family][5], tmp_path / "b.jpg")  # changed after the data was prepared
    with caplog.at_level(logging.WARNING, logger="aa_lightning.data.multimodal"):
        batch = next(iter(dm.train_dataloader()))
    assert len(batch["meta"]) == 1 and len(dm.skipped_media) == 1
    assert "(1 so far)" in caplog.text and "b.jpg" in caplog.text
    with pytest.raises(DataFormatError, match="row 1") as info:
        next(iter(strict.train_dataloader()))
    assert SKIP_HINT in str(info.value)


# ------------------------------------------------------------------------------ malformed data files
def test_truncated_json_is_one_line_naming_the_file_and_the_place(tmp_path):
    rows = [{"instruction": f"Say {i}", "input": "", "output": f"{i}!"} for i in range(3)]
    whole = json.dumps(rows, indent=1)
    path = tmp_path / "alpaca.json"
    path.write_text(whole[: len(whole) - 25])
    dm = TextToTextDataModule("tiny-qwen2", train=DataSpec(str(path), "Alpaca"), kind="supervised")
    with pytest.raises(DataFormatError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert message.startswith(f"{path}: cannot read the data file: not valid JSON")
    assert "line " in message and "column " in message and "truncated" in message
    assert "\n" not in message
    assert info.value.__suppress_context__  # no datasets traceback chained above it


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        (
            "rows.jsonl",
            '{"instruction": "a", "output": "b"}\n{"instruction": "c", "out',
            "line 2 is not valid",
        ),
        ("rows.jsonl", '{"instruction": "a", "output": "b"}\n[1, 2]\n', "line 2 is a list, not an object"),
        ("rows.json", "", "the file is empty"),
        ("rows.json", "[]", "empty list: no rows"),
        ("rows.json", "3", "got a number"),
    ],
)
def test_malformed_data_files_say_what_is_wrong(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_text(content)
    dm = TextToTextDataModule("tiny-qwen2", train=DataSpec(str(path), "Alpaca"), kind="supervised")
    with pytest.raises(DataFormatError, match=expected) as info:
        dm.setup("fit")
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_a_truncated_parquet_file_names_the_file(tmp_path):
    datasets.Dataset.from_dict({"instruction": ["a"] * 50, "output": ["b"] * 50}).to_parquet(
        str(tmp_path / "whole.parquet")
    )
    path = truncated_copy(tmp_path / "whole.parquet", tmp_path / "rows.parquet")
    dm = TextToTextDataModule("tiny-qwen2", train=DataSpec(str(path), "Alpaca"), kind="supervised")
    with pytest.raises(DataFormatError, match="rows.parquet: cannot read the data file: ArrowInvalid"):
        dm.setup("fit")


# ------------------------------------------------------------------------------ model paths
def test_a_local_model_path_that_does_not_exist_says_so(tmp_path, monkeypatch):
    missing = str(tmp_path / "checkpoints" / "my-sft")
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        load_pretrained_models(missing)
    assert missing in str(info.value) and "Repo id must be" not in str(info.value)
    dm = TextToTextDataModule(missing, train=DataSpec(str(tmp_path / "x.json"), "Alpaca"), kind="supervised")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dm.setup("fit")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained_models("./my-sft")


def test_a_relative_model_path_offline_says_there_is_no_such_folder(tmp_path, monkeypatch):
    """``outputs/sft`` could be a hub id; offline and not cached, it can only have meant a folder."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    with pytest.raises(FileNotFoundError, match="no local folder of that name") as info:
        load_pretrained_models("outputs/sft")
    assert os.path.join(str(tmp_path), "outputs", "sft") in str(info.value)


def test_an_existing_model_folder_and_a_home_relative_path_load(tmp_path, monkeypatch):
    from aa_lightning.models import resolve_model_path

    folder = Path(resolve_model_path("tiny-qwen2"))
    assert resolve_model_path(str(folder)) == str(folder)
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(folder, tmp_path / "tiny")
    assert resolve_model_path("~/tiny") == str(tmp_path / "tiny")  # transformers does not expand ~


# ------------------------------------------------------------------------------ bad rows
ALPACA = [
    {"instruction": "Say hi", "input": "", "output": "Hi!"},
    {"instruction": "Name a fruit", "input": "", "output": None},
]


def test_a_bad_row_error_says_how_to_skip_such_rows(tmp_path):
    path = write_json(tmp_path / "alpaca.json", ALPACA)
    dm = TextToTextDataModule("tiny-qwen2", train=DataSpec(str(path), "Alpaca"), kind="supervised")
    with pytest.raises(DataFormatError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert message.startswith("alpaca.json, row 1, field 'output': ")
    assert "set `on_bad_row: skip` under `data.init_args`" in message and SKIP_HINT in message
    assert str(pickle.loads(pickle.dumps(info.value))) == message  # as a DataLoader worker re-raises it
    dm = TextToTextDataModule(
        "tiny-qwen2", train=DataSpec(str(path), "Alpaca"), kind="supervised", on_bad_row="skip"
    )
    dm.setup("fit")
    assert SKIP_HINT not in dm.reports["train"][0].bad[0][1]


def test_the_skip_hint_is_spelled_as_the_cli_takes_it(repo_path):
    from aa_lightning.cli import build_cli
    from aa_lightning.data.errors import SKIP_BAD_ROWS_HINT

    flag, value = SKIP_HINT.split()
    assert SKIP_HINT in SKIP_BAD_ROWS_HINT
    cli = build_cli(["--config", repo_path("configs", "tiny", "sft_t2t.yaml"), flag, value], run=False)
    assert cli.datamodule.hparams.on_bad_row == "skip"


# ------------------------------------------------------------------------------ identical pairs, cut rows
def sharegpt_pair(prompt: str, chosen: str, rejected: str) -> dict[str, Any]:
    return {
        "conversations": [{"from": "human", "value": prompt}],
        "chosen": {"from": "gpt", "value": chosen},
        "rejected": {"from": "gpt", "value": rejected},
    }


def test_identical_preference_pairs_are_counted_and_logged(tmp_path, caplog):
    rows = [
        sharegpt_pair("2 + 2?", "4", "5"),
        sharegpt_pair("Capital of France?", "Paris.", "Paris."),
        sharegpt_pair("Colour of the sky?", "Blue.", "Green."),
        sharegpt_pair("3 + 3?", "6", "6"),
    ]
    path = write_json(tmp_path / "pairs.json", rows)
    dm = TextToTextDataModule("tiny-qwen2", train=DataSpec(str(path), "ShareGPT"), kind="preference")
    with caplog.at_level(logging.WARNING, logger=DATA_LOG):
        dm.setup("fit")
    assert dm.reports["train"][0].identical_pairs == [1, 3]
    assert len(dm.datasets["train"]) == 4  # warned about, not dropped
    assert (
        "2 preference pairs have identical chosen and rejected responses and carry no signal" in caplog.text
    )


def test_identical_image_preference_pairs_are_counted(tmp_path):
    shutil.copy(MEDIA / "image" / "pizza.jpg", tmp_path / "pizza.jpg")
    rows = [
        {"question": q, "image": "pizza.jpg", "response_1": a, "response_2": b, "overall_response": 1}
        for q, a, b in [("What is it?", "A pizza.", "A pizza."), ("Is it food?", "Yes.", "No.")]
    ]
    path = write_json(tmp_path / "ti2t.json", rows)
    dm = TextImageToTextDataModule("tiny-llava", train=DataSpec(str(path), "AA_TI2T"), kind="preference")
    dm.setup("fit")
    assert dm.reports["train"][0].identical_pairs == [0]


def test_rows_whose_response_max_length_cuts_short_are_counted(tmp_path, caplog):
    short = {"instruction": "Say hi", "input": "", "output": "Hi there, friend!"}
    long = {"instruction": "Say hi", "input": "", "output": "Hi there, friend! " * 20}
    path = write_json(tmp_path / "alpaca.json", [short, long])
    full = TextToTextDataModule("tiny-qwen2", train=DataSpec(str(path), "Alpaca"), kind="supervised")
    full.setup("fit")
    length = len(full.datasets["train"][0]["input_ids"])  # the short row, uncut
    assert full.reports["train"][0].cut_short == []
    dm = TextToTextDataModule(
        "tiny-qwen2", train=DataSpec(str(path), "Alpaca"), kind="supervised", max_length=length
    )
    with caplog.at_level(logging.WARNING, logger=DATA_LOG):
        dm.setup("fit")
    report = dm.reports["train"][0]
    # the short row fills max_length exactly and is whole; the long one is kept but cut
    assert report.cut_short == [1] and report.truncated == [] and len(dm.datasets["train"]) == 2
    assert [len(ids) for ids in dm.datasets["train"]["input_ids"]] == [length, length]
    assert f"1 kept rows cut short by max_length={length}" in caplog.text


def test_preference_pairs_with_a_cut_side_are_counted(tmp_path):
    rows = [sharegpt_pair("Hi?", "Hello! " * 40, "Hey."), sharegpt_pair("Hi?", "Hello.", "Hey.")]
    path = write_json(tmp_path / "pairs.json", rows)
    dm = TextToTextDataModule(
        "tiny-qwen2", train=DataSpec(str(path), "ShareGPT"), kind="preference", max_length=40
    )
    dm.setup("fit")
    assert dm.reports["train"][0].cut_short == [0] and len(dm.datasets["train"]) == 2
