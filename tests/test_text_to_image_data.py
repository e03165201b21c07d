"""TextToImageDataModule: the three text-to-image layouts on real images, the batch contract of the diffusion
model (prompt tokens, pixel values, per-row noise seeds), bad rows named when the data is prepared, resume.

The model side is a diffusers pipeline folder; only its ``tokenizer/`` matters here, so the fixture is a folder
with ``model_index.json`` and the tiny test tokenizer (``model_max_length`` 16).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import lightning.pytorch as pl
import pytest
import torch
from PIL import Image

from aa_lightning.batch import STEP_CHOSEN_LABEL_TOKENS, STEP_LABEL_TOKENS
from aa_lightning.data import DataFormatError, DataSpec, TextToImageDataModule, get_formatter
from aa_lightning.data.text_to_image_collator import image_tensor
from aa_lightning.testing.tiny_common import build_tiny_tokenizer

T2I = Path(__file__).resolve().parent.parent / "configs" / "data" / "media" / "text_to_image"
RES = 32
LENGTH = 16
FIXTURES = {  # template -> (file, kind, rows kept)
    "T2I-Prompt-Image": ("prompt_image.json", "supervised", 8),
    "Pick-a-Pic": ("pick_a_pic.json", "preference", 6),
    "AA_T2I": ("aa_t2i.json", "preference", 6),
}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("pipeline")
    (folder / "model_index.json").write_text("{}")
    tokenizer = build_tiny_tokenizer()
    tokenizer.model_max_length = LENGTH
    tokenizer.save_pretrained(folder / "tokenizer")
    return str(folder)


def datamodule(model: str, path: str | Path, template: str, kind: str, **kwargs) -> TextToImageDataModule:
    kwargs = {"resolution": RES, "batch_size": 3, "shuffle": False, **kwargs}
    return TextToImageDataModule(model, train=DataSpec(str(path), template), kind=kind, **kwargs)


def fixture_module(pipeline: str, template: str, **kwargs) -> TextToImageDataModule:
    name, kind, _ = FIXTURES[template]
    dm = datamodule(pipeline, T2I / name, template, kwargs.pop("kind", kind), **kwargs)
    dm.setup("fit")
    return dm


def write_rows(tmp_path: Path, rows: list[dict], name: str = "rows.json") -> Path:
    """Rows in ``tmp_path`` whose image paths point at the fixture images."""
    for row in rows:
        for key, value in row.items():
            if isinstance(value, str) and value.endswith(".jpg") and not Path(value).is_absolute():
                row[key] = str((T2I / value).resolve()) if (T2I / value).exists() else value
    path = tmp_path / name
    path.write_text(json.dumps(rows))
    return path


def fixture_rows(template: str) -> list[dict]:
    return json.loads((T2I / FIXTURES[template][0]).read_text())


# -- the three layouts --------------------------------------------------------------------------------------
@pytest.mark.parametrize("template", sorted(FIXTURES))
def test_each_layout_gives_the_batches_of_its_kind(pipeline, template):
    _, kind, kept = FIXTURES[template]
    dm = fixture_module(pipeline, template)
    assert len(dm.datasets["train"]) == kept
    batch = next(iter(dm.train_dataloader()))
    rows = 3 if kind == "supervised" else 6
    assert "labels" not in batch
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (rows, LENGTH)
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long
    assert batch["pixel_values"].shape == (rows, 3, RES, RES) and batch["pixel_values"].dtype == torch.float32
    assert -1.0 <= batch["pixel_values"].min() < 0 < batch["pixel_values"].max() <= 1.0
    assert batch["noise_seed"].shape == (rows,) and batch["noise_seed"].dtype == torch.int64
    assert batch["extra"]["sample_index"].tolist() == [0, 1, 2]
    meta = batch["meta"][0]
    assert isinstance(meta["prompt"], str) and meta["prompt"]
    for key in ("image",) if kind == "supervised" else ("chosen_image", "rejected_image"):
        assert Path(meta[key]).is_file()
    ids, mask = batch["input_ids"][0], batch["attention_mask"][0]
    tokenizer = dm.tokenizer
    expected = tokenizer(meta["prompt"], padding="max_length", truncation=True, max_length=LENGTH)
    assert ids.tolist() == expected["input_ids"] and mask.tolist() == expected["attention_mask"]


def test_the_preferred_image_is_the_chosen_one(pipeline):
    images = {
        "Pick-a-Pic": [
            r[f"image_{0 if r['label_0'] == 1 else 1}"]
            for r in fixture_rows("Pick-a-Pic")
            if r["label_0"] != 0.5
        ],
        "AA_T2I": [r[f"image_{r['overall_image']}"] for r in fixture_rows("AA_T2I")],
    }
    for template, expected in images.items():
        dm = fixture_module(pipeline, template, batch_size=8)
        metas = next(iter(dm.train_dataloader()))["meta"]
        assert [m["chosen_image"] for m in metas] == [str((T2I / p).resolve()) for p in expected]
        assert all(m["chosen_image"] != m["rejected_image"] for m in metas)
    supervised = fixture_module(pipeline, "Pick-a-Pic", kind="supervised", batch_size=8)
    metas = next(iter(supervised.train_dataloader()))["meta"]
    assert [m["image"] for m in metas] == [str((T2I / p).resolve()) for p in images["Pick-a-Pic"]]


def test_pick_a_pic_ties_are_left_out_and_counted(pipeline, caplog):
    with caplog.at_level("WARNING", logger="aa_lightning.data.datamodule"):
        dm = fixture_module(pipeline, "Pick-a-Pic")
    report = dm.reports["train"][0]
    assert report.left_out == [(3, "ties (label_0 is 0.5)")] and report.bad == []
    assert (
        "6 of 7 rows kept; 1 rows left out by their template: 1 ties (label_0 is 0.5) (rows 3)" in caplog.text
    )


def test_pick_a_pic_parquet_with_image_bytes(pipeline, tmp_path):
    """The released Pick-a-Pic files hold the images as bytes in jpg_0 / jpg_1."""
    rows = [
        {
            "caption": r["caption"],
            "jpg_0": (T2I / r["image_0"]).read_bytes(),
            "jpg_1": (T2I / r["image_1"]).read_bytes(),
            "label_0": float(r["label_0"]),
        }
        for r in fixture_rows("Pick-a-Pic")
    ]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "pickapic.parquet"))
    dm = datamodule(pipeline, tmp_path / "pickapic.parquet", "Pick-a-Pic", "preference")
    dm.setup("fit")
    from_paths = fixture_module(pipeline, "Pick-a-Pic")
    batch, reference = next(iter(dm.train_dataloader())), next(iter(from_paths.train_dataloader()))
    torch.testing.assert_close(batch["pixel_values"], reference["pixel_values"])
    assert batch["meta"][0]["chosen_image"].endswith("bytes in the row>")


# -- pairs, seeds, preprocessing ----------------------------------------------------------------------------
def test_preference_pairs_share_prompt_tokens_and_seed_but_not_images(pipeline):
    batch = next(iter(fixture_module(pipeline, "AA_T2I").train_dataloader()))
    chosen, rejected = batch["input_ids"][:3], batch["input_ids"][3:]
    assert torch.equal(chosen, rejected) and torch.equal(
        batch["attention_mask"][:3], batch["attention_mask"][3:]
    )
    assert torch.equal(batch["noise_seed"][:3], batch["noise_seed"][3:])
    assert len(set(batch["noise_seed"][:3].tolist())) == 3
    pixels = batch["pixel_values"]
    assert all(not torch.equal(pixels[i], pixels[i + 3]) for i in range(3))


def test_noise_seeds_follow_seed_everything_and_differ_across_batches(pipeline):
    dm = fixture_module(pipeline, "T2I-Prompt-Image")

    def seeds() -> list[list[int]]:
        return [batch["noise_seed"].tolist() for batch in dm.train_dataloader()]

    pl.seed_everything(3)
    first = seeds()
    pl.seed_everything(3)
    assert seeds() == first
    flat = [seed for batch in first for seed in batch]
    assert len(first) == 3 and len(set(flat)) == len(flat) and all(0 <= s < 2**62 for s in flat)
    pl.seed_everything(4)
    assert seeds() != first


def test_images_are_resized_by_the_shorter_side_and_center_cropped():
    image = Image.new("RGB", (96, 32), (255, 0, 0))  # red | green | blue thirds, 32 px each
    image.paste((0, 255, 0), (32, 0, 64, 32))
    image.paste((0, 0, 255), (64, 0, 96, 32))
    pixels = image_tensor(image, 16)
    assert pixels.shape == (3, 16, 16) and pixels.dtype == torch.float32
    green = torch.tensor([-1.0, 1.0, -1.0])
    torch.testing.assert_close(pixels[:, 8, 8], green)  # the crop is the middle third
    torch.testing.assert_close(pixels[:, 0, 1], green)
    torch.testing.assert_close(image_tensor(image, 16, flip=True), pixels.flip(-1))
    grey = image_tensor(Image.new("L", (20, 40), 0), 8)  # greyscale becomes 3 channels
    assert grey.shape == (3, 8, 8) and torch.all(grey == -1.0)


def test_random_flip_flips_both_images_of_a_pair_and_only_in_training(pipeline):
    plain = next(iter(fixture_module(pipeline, "AA_T2I", batch_size=6).train_dataloader()))["pixel_values"]
    dm = fixture_module(
        pipeline, "AA_T2I", batch_size=6, random_flip=True, val=DataSpec(str(T2I / "aa_t2i.json"), "AA_T2I")
    )
    dm.setup("fit")
    torch.manual_seed(0)
    flipped = next(iter(dm.train_dataloader()))["pixel_values"]
    flips = [torch.equal(flipped[i], plain[i].flip(-1)) for i in range(12)]
    assert [torch.equal(flipped[i], plain[i]) for i in range(12)] == [not f for f in flips]
    assert flips[:6] == flips[6:] and 0 < sum(flips[:6]) < 6
    torch.testing.assert_close(next(iter(dm.val_dataloader()))["pixel_values"], plain)


# -- bad rows -------------------------------------------------------------------------------------------------
def test_bad_rows_name_file_row_and_column(pipeline, tmp_path):
    (tmp_path / "garbage.jpg").write_bytes(b"this is not a jpeg" * 10)
    good = {"prompt": "a bus", "image": "images/bus.jpg"}
    cases = {
        "missing image file": (
            {"prompt": "a cat", "image": "images/no_such.jpg"},
            "'image'",
            "image file not found",
        ),
        "corrupt image": (
            {"prompt": "a cat", "image": str(tmp_path / "garbage.jpg")},
            "'image'",
            "cannot decode image",
        ),
        "missing prompt": ({"image": "images/bus.jpg"}, "'prompt'", "non-empty string, got None"),
        "empty prompt": ({"prompt": " ", "image": "images/bus.jpg"}, "'prompt'", "non-empty string"),
        "no image column": ({"prompt": "a cat"}, "'image'", "missing image"),
    }
    for name, (row, field, reason) in cases.items():
        path = write_rows(tmp_path, [dict(good), dict(row)], f"{name.replace(' ', '_')}.json")
        with pytest.raises(DataFormatError) as info:
            datamodule(pipeline, path, "T2I-Prompt-Image", "supervised").setup("fit")
        message = str(info.value)
        assert path.name in message and "row 1" in message and field in message and reason in message, name
        assert "on_bad_row skip" in message


def test_bad_preference_labels_are_errors(pipeline, tmp_path):
    pair = {"caption": "a bus", "image_0": "images/bus.jpg", "image_1": "images/steak.jpg"}
    for label, field in [
        ({"label_0": 2}, "'label_0'"),
        ({"label_0": "1"}, "'label_0'"),
        ({"label_0": 1, "label_1": 1}, "'label_1'"),
    ]:
        path = write_rows(tmp_path, [{**pair, **label}])
        with pytest.raises(DataFormatError, match=f"rows.json, row 0, field {field}"):
            datamodule(pipeline, path, "Pick-a-Pic", "preference").setup("fit")
    aa = {"prompt": "a bus", "image_1": "images/bus.jpg", "image_2": "images/steak.jpg", "overall_image": 3}
    with pytest.raises(DataFormatError, match="field 'overall_image': expected 1 or 2"):
        datamodule(pipeline, write_rows(tmp_path, [aa], "aa.json"), "AA_T2I", "preference").setup("fit")


def test_skip_mode_drops_and_counts_bad_rows(pipeline, tmp_path):
    (tmp_path / "garbage.jpg").write_bytes(b"\xff\xd8\xff garbage")
    rows = fixture_rows("AA_T2I")
    rows[1]["image_2"] = str(tmp_path / "garbage.jpg")
    del rows[4]["prompt"]
    dm = datamodule(pipeline, write_rows(tmp_path, rows), "AA_T2I", "preference", on_bad_row="skip")
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 4
    assert [row for row, _ in dm.reports["train"][0].bad] == [1, 4]
    assert "cannot decode image" in dm.reports["train"][0].bad[0][1]


def test_an_image_broken_after_preparing_is_named_in_the_collator(pipeline, tmp_path):
    shutil.copy(T2I / "images" / "bus.jpg", tmp_path / "bus.jpg")
    path = write_rows(tmp_path, [{"prompt": "a bus", "image": "bus.jpg"}])
    dm = datamodule(pipeline, path, "T2I-Prompt-Image", "supervised")
    dm.setup("fit")
    (tmp_path / "bus.jpg").write_bytes(b"gone")
    with pytest.raises(
        DataFormatError, match=r"rows.json, row 0, field 'image': cannot decode image .*bus.jpg"
    ):
        next(iter(dm.train_dataloader()))


def test_a_text_template_is_refused_with_the_text_to_image_ones_named(pipeline, tmp_path):
    path = write_rows(tmp_path, [{"instruction": "Say hi", "input": "", "output": "Hi!"}])
    with pytest.raises(
        DataFormatError, match="use a text-to-image template: T2I-Prompt-Image, Pick-a-Pic, AA_T2I"
    ):
        datamodule(pipeline, path, "Alpaca", "supervised").setup("fit")


def test_formatters_keep_the_conversation_contract():
    conversation, meta = get_formatter("T2I-Prompt-Image").format_supervised_sample(
        {"prompt": "a cat", "image": "c.jpg"}
    )
    assert conversation == [
        {"role": "user", "content": "a cat"},
        {"role": "assistant", "content": [{"type": "image", "image": {"value": "c.jpg", "field": "image"}}]},
    ]
    assert meta == {}
    prompt, _ = get_formatter("Pick-a-Pic").format_prompt_only_sample({"caption": "a dog"})
    assert prompt == [{"role": "user", "content": "a dog"}]
    row = {"prompt": "x", "image_1": "a.jpg", "image_2": "b.jpg", "overall_image": "2", "margin": 0.5}
    chosen, rejected, meta = get_formatter("AA_T2I").format_preference_sample(row)
    assert (
        chosen[1]["content"][0]["image"]["field"] == "image_2"
        and rejected[1]["content"][0]["image"]["field"] == "image_1"
    )
    assert meta == {"margin": 0.5}


# -- loaders, tokenizer folders, configuration ----------------------------------------------------------------
def test_training_batches_count_one_unit_per_image_and_resume(pipeline):
    dm = fixture_module(pipeline, "AA_T2I", batch_size=2, shuffle=True)
    loader = dm.train_dataloader()
    loader.schedule_fn = lambda: (2, float("inf"))  # two micro-batches per optimizer step
    full = list(loader)
    assert [b["extra"][STEP_LABEL_TOKENS].tolist() for b in full] == [[8, 8], [8, 8], [4, 4]]
    assert [b["extra"][STEP_CHOSEN_LABEL_TOKENS].tolist() for b in full] == [[4, 4], [4, 4], [2, 2]]
    loader.load_state_dict({"epoch": 0, "batches": 1})
    resumed = list(loader)
    order = [b["extra"]["sample_index"].tolist() for b in full]
    assert [b["extra"]["sample_index"].tolist() for b in resumed] == order[1:]
    assert [b["extra"][STEP_LABEL_TOKENS].tolist() for b in resumed] == [[4, 4], [4, 4]]
    supervised = fixture_module(pipeline, "T2I-Prompt-Image", batch_size=4)
    loader = supervised.train_dataloader()
    loader.schedule_fn = lambda: (1, float("inf"))
    assert [b["extra"][STEP_LABEL_TOKENS].tolist() for b in loader] == [[4] * 4, [4] * 4]
    assert STEP_CHOSEN_LABEL_TOKENS not in next(iter(loader))["extra"]


def test_predict_batches_are_prompts(pipeline):
    dm = TextToImageDataModule(
        pipeline,
        predict=DataSpec(str(T2I / "prompt_image.json"), "T2I-Prompt-Image"),
        kind="supervised",
        resolution=RES,
    )
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "extra", "meta"}
    assert batch["input_ids"].shape == (4, LENGTH) and batch["meta"][0]["prompt"].startswith(
        "a photo of a pizza"
    )


def test_a_plain_tokenizer_folder_works_and_one_without_a_length_needs_max_length(pipeline, tmp_path):
    plain = fixture_module(str(Path(pipeline) / "tokenizer"), "T2I-Prompt-Image")
    assert plain.max_length == LENGTH
    build_tiny_tokenizer().save_pretrained(tmp_path / "unbounded")
    with pytest.raises(ValueError, match="states no model_max_length .* set data.max_length"):
        datamodule(
            str(tmp_path / "unbounded"), T2I / "prompt_image.json", "T2I-Prompt-Image", "supervised"
        ).setup("fit")
    dm = datamodule(
        str(tmp_path / "unbounded"), T2I / "prompt_image.json", "T2I-Prompt-Image", "supervised", max_length=8
    )
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))["input_ids"].shape == (3, 8)
    too_long = datamodule(
        pipeline, T2I / "prompt_image.json", "T2I-Prompt-Image", "supervised", max_length=17
    )
    with pytest.raises(ValueError, match="the text encoder takes at most 16 tokens"):
        too_long.setup("fit")


def test_the_datamodule_is_configured_from_a_yaml_dict_and_rebuilt_from_its_hyperparameters(pipeline):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(pl.LightningDataModule, "data")
    config = {
        "data": {
            "class_path": "aa_lightning.data.TextToImageDataModule",
            "init_args": {
                "model_name_or_path": pipeline,
                "train": {"path": str(T2I / "pick_a_pic.json"), "template": "Pick-a-Pic"},
                "kind": "preference",
                "resolution": RES,
                "random_flip": True,
                "on_bad_row": "skip",
            },
        }
    }
    dm = parser.instantiate_classes(parser.parse_object(config)).data
    assert isinstance(dm, TextToImageDataModule) and dm.hparams.random_flip and dm.hparams.resolution == RES
    assert dm.specs["train"] == [DataSpec(str(T2I / "pick_a_pic.json"), "Pick-a-Pic")]
    rebuilt = TextToImageDataModule(**dm.hparams)  # what load_from_checkpoint does with the saved ones
    assert dict(rebuilt.hparams) == dict(dm.hparams)
    with pytest.raises(
        TypeError, match="train_on: chat-data settings that TextToImageDataModule does not take"
    ):
        TextToImageDataModule(pipeline, train_on="last_assistant")
    with pytest.raises(Exception, match="resolutio"):
        parser.parse_object({"data": {**config["data"], "init_args": {"resolutio": 32}}})
