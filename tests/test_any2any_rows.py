"""Any2Any rows (align-anything's mixed layout): image understanding (TU) and generation (TG) in one file.

A TU row's input image is encoded into VQ tokens when the data is prepared and written into ``input_ids``
where ``Emu3Processor`` puts its placeholders, so the ids are what ``Emu3Model.forward(pixel_values=...)``
embeds (checked against the real processor and tiny model, down to the logits); its labels are the answer
and EOS only. TG rows stay the ``T2I-Prompt-Image`` encoding. A mixed batch is a plain token batch, so the
unchanged SFTModule lowers the loss of both kinds. Bad rows name the file, the row and the column.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from PIL import Image
from quick_training import quiet_trainer as trainer

from aa_lightning.algorithms import OptimConfig, SFTModule
from aa_lightning.batch import IGNORE_INDEX
from aa_lightning.data import DataFormatError, DataSpec, TextToImageTokensDataModule, get_formatter
from aa_lightning.models import resolve_model_path
from aa_lightning.testing.tiny_image_generation import TINY_EMU3_RESOLUTION as RES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANY2ANY = os.path.join(REPO, "configs", "data", "media", "any2any", "any2any.json")
IMAGES = os.path.join(REPO, "configs", "data", "media", "text_to_image", "images")
OPTIM = OptimConfig(lr=3e-3, warmup_steps=0, scheduler="constant")
SYSTEM = "You are a helpful assistant."  # the Any2Any formatter's default (Emu3-Chat's)


def datamodule(path: str, template: str = "Any2Any", batch_size: int = 6, **kwargs: Any):
    return TextToImageTokensDataModule(
        "tiny-emu3",
        kind="supervised",
        resolution=RES,
        batch_size=batch_size,
        shuffle=False,
        train=DataSpec(path, template),
        **kwargs,
    )


def first_batch(dm: TextToImageTokensDataModule) -> dict[str, Any]:
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


@pytest.fixture(scope="module")
def emu3():
    """The tiny Emu3 and its processor, loaded the plain transformers way (the reference)."""
    from transformers import AutoProcessor, Emu3ForConditionalGeneration

    path = resolve_model_path("tiny-emu3")
    return Emu3ForConditionalGeneration.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)


@pytest.fixture(scope="module")
def mixed() -> dict[str, Any]:
    return first_batch(datamodule(ANY2ANY))


def rows_of(batch: dict[str, Any], mode: str) -> list[int]:
    return [i for i, meta in enumerate(batch["meta"]) if meta["mode"] == mode]


def sub_batch(batch: dict[str, Any], rows: list[int]) -> dict[str, Any]:
    index = torch.tensor(rows)
    out = {k: batch[k][index] for k in ("input_ids", "attention_mask", "labels")}
    return {**out, "meta": [batch["meta"][i] for i in rows], "extra": {}}


def test_the_formatter_gives_an_understanding_or_a_text_to_image_conversation_by_mode():
    fmt = get_formatter("Any2Any")
    assert fmt.supported_kinds() == ("supervised",)  # a TU prompt-only row would need its image: not offered
    tu = {"mode": "TU", "input_text": "What is it?", "input_image": "a.jpg", "output_text": "A bus."}
    conversation, meta = fmt.format_supervised_sample(tu)
    image = {"type": "image", "image": {"value": "a.jpg", "field": "input_image"}}
    assert meta == {"mode": "TU"} and conversation == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": [image, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A bus."},
    ]
    tg = {"mode": "TG", "input_text": "Draw a bus.", "output_image": "a.jpg"}
    plain = get_formatter("T2I-Prompt-Image").format_supervised_sample(
        {"prompt": "Draw a bus.", "image": "a.jpg"}
    )
    conversation, meta = fmt.format_supervised_sample(tg)
    assert meta == {"mode": "TG"}
    assert json.dumps(conversation).replace("output_image", "image") == json.dumps(plain[0])


def test_a_mixed_file_gives_one_token_batch_with_both_kinds(mixed):
    assert set(mixed) >= {"input_ids", "attention_mask", "labels", "meta"}
    assert not any(k.startswith("pixel") for k in mixed)  # images are already tokens
    assert rows_of(mixed, "TU") == [0, 2, 4] and rows_of(mixed, "TG") == [1, 3, 5]


def test_understanding_rows_are_what_the_processor_and_forward_give_and_label_the_answer_alone(emu3, mixed):
    model, processor = emu3
    tok = processor.tokenizer
    with open(ANY2ANY) as f:
        rows = json.load(f)
    for row in rows_of(mixed, "TU"):
        raw = rows[row]
        image = Image.open(os.path.join(os.path.dirname(ANY2ANY), raw["input_image"])).convert("RGB")
        text = f"{SYSTEM} USER: {processor.image_token}{raw['input_text']} ASSISTANT:"
        inputs = processor(text=[text], images=[image], return_tensors="pt")
        with torch.no_grad():
            image_ids = model.model.get_image_tokens(inputs["pixel_values"], inputs["image_sizes"])
        placeholders = inputs["input_ids"][0] == processor.image_token_id
        assert int(placeholders.sum()) == len(image_ids) > 0
        prompt = inputs["input_ids"][0].clone()
        prompt[placeholders] = image_ids.to(prompt.dtype)
        answer = tok(f" {raw['output_text']}", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        length = int(mixed["attention_mask"][row].sum())
        ids, labels = mixed["input_ids"][row], mixed["labels"][row]
        assert ids[:length].tolist() == prompt.tolist() + answer
        expected = [IGNORE_INDEX] * len(prompt) + answer + [IGNORE_INDEX] * (ids.shape[0] - length)
        assert labels.tolist() == expected  # prompt, image tokens and padding -100
        assert tok.decode(answer[:-1]) == f" {raw['output_text']}"
        # tokenizing prompt and answer apart splits nowhere: the joint text gives the same ids
        joint = processor(text=[f"{text} {raw['output_text']}"], images=[image])["input_ids"][0]
        assert joint == inputs["input_ids"][0].tolist() + answer[:-1]
        # the pre-encoded ids ARE the model's input: the same logits as the processor's ids + pixel_values
        with torch.no_grad():
            reference = model(**inputs).logits[0]
            ours = model(input_ids=ids[None, : len(prompt)]).logits[0]
        torch.testing.assert_close(ours, reference)


def test_generation_rows_are_unchanged_from_prompt_image_rows(mixed, tmp_path):
    with open(ANY2ANY) as f:
        rows = json.load(f)
    root = os.path.dirname(ANY2ANY)
    tg = [r for r in rows if r["mode"] == "TG"]
    plain = [{"prompt": r["input_text"], "image": os.path.join(root, r["output_image"])} for r in tg]
    path = tmp_path / "prompt_image.json"
    path.write_text(json.dumps(plain))
    today = first_batch(datamodule(str(path), "T2I-Prompt-Image"))
    for mine, theirs in zip(rows_of(mixed, "TG"), range(len(plain))):
        n = int(mixed["attention_mask"][mine].sum())
        assert n == int(today["attention_mask"][theirs].sum())
        assert mixed["input_ids"][mine, :n].tolist() == today["input_ids"][theirs, :n].tolist()
        assert mixed["labels"][mine, :n].tolist() == today["labels"][theirs, :n].tolist()
        assert (mixed["labels"][mine, :n] != IGNORE_INDEX).sum() == (RES // 8) * (RES // 8 + 1) + 3


def test_sft_lowers_the_loss_of_both_kinds_on_a_mixed_batch():
    """Measured (tiny-emu3, the 6 rows as one batch, lr 3e-3, 10 steps): token NLL of the TU answers
    7.66 -> 4.93, of the TG image and end tokens 7.64 -> 4.85 (``pytest tests/test_any2any_rows.py -k sft``
    with a print of ``before, after``)."""
    pl.seed_everything(0)
    module = SFTModule("tiny-emu3", optim=OPTIM)
    module.configure_model()
    dm = datamodule(ANY2ANY)
    batch = first_batch(dm)

    def losses() -> tuple[float, float]:
        values = []
        for mode in ("TU", "TG"):
            with torch.no_grad():
                nll, count = module.token_nll(sub_batch(batch, rows_of(batch, mode)))
            values.append(float(nll / count))
        return values[0], values[1]

    before = losses()
    trainer(10).fit(module, dm)
    after = losses()
    assert all(math.isfinite(v) for v in before + after)
    assert after[0] < 0.8 * before[0] and after[1] < 0.8 * before[1], (before, after)


BAD_ROWS = [
    ({"mode": "TX", "input_text": "hi", "output_text": "x"}, "mode", "unknown mode"),
    ({"input_text": "hi", "output_image": "bus.jpg"}, "mode", "got None"),
    ({"mode": "TU", "input_text": "What is it?", "output_text": "A bus."}, "input_image", "missing image"),
    (
        {"mode": "TU", "input_text": "What is it?", "input_image": "bus.jpg"},
        "output_text",
        "missing required key",
    ),
    (
        {"mode": "TU", "input_text": " ", "input_image": "bus.jpg", "output_text": "A bus."},
        "input_text",
        "empty",
    ),
    ({"mode": "TG", "input_text": "Draw a bus."}, "output_image", "missing image"),
    ({"mode": "TG", "output_image": "bus.jpg"}, "input_text", "got None"),
    (
        {"mode": "TU", "input_text": "?", "input_image": "nope.jpg", "output_text": "A."},
        "input_image",
        "not found",
    ),
]


@pytest.mark.parametrize(("bad", "field", "reason"), BAD_ROWS)
def test_a_bad_row_names_the_file_the_row_and_the_field(bad, field, reason, tmp_path):
    good = {"mode": "TG", "input_text": "Draw a bus.", "output_image": os.path.join(IMAGES, "bus.jpg")}
    bad = {k: os.path.join(IMAGES, v) if k.endswith("image") else v for k, v in bad.items()}
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps([good, good, bad]))
    dm = datamodule(str(path), batch_size=2)
    with pytest.raises(DataFormatError) as info:
        dm.setup("fit")
    err = info.value
    assert (err.source, err.row, err.field) == ("mixed.json", 2, field), repr(err)
    assert str(err).startswith(f"mixed.json, row 2, field '{field}': ") and reason in str(err), str(err)


def test_bad_rows_are_skipped_and_counted_when_asked(tmp_path):
    good = {"mode": "TU", "input_text": "What is it?", "input_image": os.path.join(IMAGES, "bus.jpg")}
    good["output_text"] = "A bus."
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps([good, {"mode": "TG", "input_text": "Draw a bus."}, good]))
    dm = datamodule(str(path), batch_size=2, on_bad_row="skip")
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 2 and [row for row, _ in dm.reports["train"][0].bad] == [1]


def test_an_understanding_row_over_max_length_is_dropped_and_counted_not_cut(mixed):
    lengths = mixed["attention_mask"].sum(1).tolist()
    limit = max(lengths[i] for i in rows_of(mixed, "TG"))
    over = [i for i in rows_of(mixed, "TU") if lengths[i] > limit]
    assert over  # the fixture's TU rows with long answers are longer than every TG row
    dm = datamodule(ANY2ANY, max_length=limit)
    dm.setup("fit")
    assert dm.reports["train"][0].truncated == over
    assert len(dm.datasets["train"]) == 6 - len(over)
