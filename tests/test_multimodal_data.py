"""Image, audio and video data on the tiny LLaVA / Qwen2-VL / Qwen2-Audio models with their real processors.

Label masks around media tokens, preference and prompt-only batches, the score model and ``generate`` on
multimodal batches, SFT learning, the tiny configs through the CLI, media loaders, formatters on real
rows (configs/data/media, see its README) and bad-media errors.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from typing import Any

import numpy as np
import pytest
import torch

from aa_lightning.algorithms import SFTModule
from aa_lightning.batch import model_inputs
from aa_lightning.data import (
    DataFormatError,
    DataSpec,
    TextAudioToTextDataModule,
    TextImageToTextDataModule,
    TextVideoToTextDataModule,
    get_formatter,
)
from aa_lightning.data.media import (
    load_audio,
    load_image,
    load_video,
    media_item,
    resolve_media,
    sample_indices,
)
from aa_lightning.data.multimodal import AlignmentError, align_to_processor
from aa_lightning.models import ScoreModel, load_pretrained_models

MEDIA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "data", "media")
END = "<|im_end|>"  # the ChatML end of turn, trained on so the model learns to stop (not the "\n" after it)

# family -> (datamodule class, model alias, extra datamodule args)
FAMILIES: dict[str, tuple[type, str, dict[str, Any]]] = {
    "llava-image": (TextImageToTextDataModule, "tiny-llava", {}),
    "qwen2-vl-image": (TextImageToTextDataModule, "tiny-qwen2-vl", {}),
    "qwen2-audio": (TextAudioToTextDataModule, "tiny-qwen2-audio", {}),
    "qwen2-vl-video": (TextVideoToTextDataModule, "tiny-qwen2-vl", {"num_frames": 4}),
}
SUPERVISED = {
    "llava-image": ("image/mllm_demo.json", "LLaVA-Instruct"),
    "qwen2-vl-image": ("image/mllm_demo.json", "MLLM-Messages"),
    "qwen2-audio": ("audio/mllm_audio_demo.json", "MLLM-Audio"),
    "qwen2-vl-video": ("video/mllm_video_demo.json", "MLLM-Video"),
}
PREFERENCE = {
    "llava-image": ("image/aa_ti2t.json", "AA_TI2T"),
    "qwen2-vl-image": ("image/aa_ti2t.json", "AA_TI2T"),
    "qwen2-audio": ("audio/aa_ta2t.json", "AA_TA2T"),
    "qwen2-vl-video": ("video/aa_tv2t.json", "AA_TV2T"),
}
PROMPTS = {
    "llava-image": ("image/rlaif_v/detail_test_3_input.jsonl", "RLAIF-V"),
    "qwen2-vl-image": ("image/mllm_demo.json", "MLLM-Messages"),
    "qwen2-audio": ("audio/speech_asr.json", "Speech-ASR"),
    "qwen2-vl-video": ("video/mllm_video_demo.json", "MLLM-Video"),
}
_MODELS: dict[tuple[str, bool], torch.nn.Module] = {}


def rows(rel: str) -> list[dict[str, Any]]:
    with open(os.path.join(MEDIA, rel), encoding="utf-8") as f:
        if rel.endswith(".jsonl"):
            return [json.loads(line) for line in f if line.strip()]
        return json.load(f)


def datamodule(family: str, path: str, template: str, kind: str, **kwargs: Any):
    cls, model, extra = FAMILIES[family]
    full = path if os.path.isabs(path) else os.path.join(MEDIA, path)
    dm = cls(
        model,
        train=DataSpec(full, template),
        kind=kind,
        shuffle=False,
        **{"batch_size": 8, **extra, **kwargs},
    )
    dm.setup("fit")
    return dm


def first_batch(dm) -> dict[str, Any]:
    return next(iter(dm.train_dataloader()))


def model(family: str, score: bool = False) -> torch.nn.Module:
    """Loaded once per test session (each load is cheap, but not free)."""
    name = FAMILIES[family][1]
    if (name, score) not in _MODELS:
        _MODELS[name, score] = load_pretrained_models(name, score_model=score, new_score_head=score)[0].eval()
    return _MODELS[name, score]


def labelled_text(dm, batch: dict[str, Any], row: int) -> str:
    ids, labels = batch["input_ids"][row], batch["labels"][row]
    return dm.tokenizer.decode(ids[labels != -100])


def assert_no_media_token_labelled(dm, batch: dict[str, Any]) -> None:
    media = torch.tensor(sorted(dm.info.media_token_ids))
    is_media = torch.isin(batch["input_ids"], media)
    assert is_media.any(), "the batch should hold expanded media tokens"
    assert (batch["labels"][is_media] == -100).all()
    trained = batch["labels"] != -100
    assert torch.equal(batch["labels"][trained], batch["input_ids"][trained])


# ------------------------------------------------------------------------------------------ label masks
@pytest.mark.parametrize("family", list(FAMILIES))
def test_labels_are_exactly_the_assistant_text_around_media_tokens(family):
    path, template = SUPERVISED[family]
    dm = datamodule(family, path, template, "supervised")
    batch = first_batch(dm)
    raw = rows(path)
    assert batch["input_ids"].shape[0] == len(raw)
    for i, row in enumerate(raw):
        expected = "".join(m["content"] + END for m in row["messages"] if m["role"] == "assistant")
        assert labelled_text(dm, batch, i) == expected
    assert_no_media_token_labelled(dm, batch)
    assert batch["attention_mask"][:, 0].all()  # right padded
    # the real model checks that the expanded placeholders match the media features one to one
    with torch.no_grad():
        out = model(family)(**model_inputs(batch), labels=batch["labels"])
    assert torch.isfinite(out.loss)


def test_media_whose_placeholder_is_cut_by_max_length_are_left_out():
    # row 0 has two images; token 54 is the second one's placeholder, in the third turn
    dm = datamodule("qwen2-vl-image", "image/mllm_demo.json", "MLLM-Messages", "supervised", max_length=54)
    batch = first_batch(dm)
    texts = [dm.datasets["train"][i]["text"] for i in range(len(dm.datasets["train"]))]
    assert texts[0].endswith("<|vision_start|>")  # the stored text covers exactly the kept tokens
    assert sum(t.count("<|image_pad|>") for t in texts) == 6 == batch["image_grid_thw"].shape[0]  # of 7
    assert batch["input_ids"].shape[1] > 54  # the placeholders were expanded after the cut
    assert labelled_text(dm, batch, 0) == rows("image/mllm_demo.json")[0]["messages"][1]["content"] + END
    with torch.no_grad():
        assert torch.isfinite(model("qwen2-vl-image")(**model_inputs(batch), labels=batch["labels"]).loss)


def test_alignment_expands_placeholder_runs_and_rejects_disagreeing_tokens():
    ids, labels = [5, 9, 9, 6, 7], [-100, -100, -100, 6, 7]
    out_ids, out_labels, source = align_to_processor(ids, labels, [5, 9, 9, 9, 9, 6, 7, 0], {9})
    assert out_ids == [5, 9, 9, 9, 9, 6, 7]
    assert out_labels == [-100, -100, -100, -100, -100, 6, 7]
    assert source == list(range(7))
    with pytest.raises(AlignmentError, match="token mismatch at position 3"):
        align_to_processor(ids, labels, [5, 9, 9, 8, 7], {9})
    with pytest.raises(AlignmentError, match="not expanded"):
        align_to_processor(ids, labels, [5, 6, 7], {9})
    ids, out_labels, source = align_to_processor([1, 5, 9], None, [5, 9, 9], {9}, bos_token_id=1)
    assert ids == [1, 5, 9, 9] and source == [-1, 0, 1, 2] and out_labels == [-100] * 4


# ------------------------------------------------------------------------------------------ preference + score
@pytest.mark.parametrize("family", list(FAMILIES))
def test_preference_batches_hold_chosen_then_rejected_with_media_twice_and_score(family):
    path, template = PREFERENCE[family]
    dm = datamodule(family, path, template, "preference", batch_size=2)
    batch = first_batch(dm)
    raw = rows(path)[:2]
    b = len(raw)
    assert batch["input_ids"].shape[0] == 2 * b
    for i, row in enumerate(raw):
        better = row["overall_response"]
        assert labelled_text(dm, batch, i) == row[f"response_{better}"] + END
        assert labelled_text(dm, batch, b + i) == row[f"response_{3 - better}"] + END
    assert_no_media_token_labelled(dm, batch)
    # one media entry per row, chosen media then rejected (Qwen2-VL's pixel_values are flat patches)
    for key in ("image_grid_thw", "video_grid_thw", "input_features", "feature_attention_mask"):
        if key in batch:
            assert batch[key].shape[0] == 2 * b, key
    if family == "llava-image":
        assert batch["pixel_values"].shape[0] == 2 * b
        torch.testing.assert_close(batch["pixel_values"][:b], batch["pixel_values"][b:])
    scorer = model(family, score=True)
    assert isinstance(scorer, ScoreModel)
    with torch.no_grad():
        out = scorer(**model_inputs(batch))
        alone = scorer(**model_inputs(dm.build_collator("preference")([dm.datasets["train"][1]])))
    assert out.end_scores.shape == (2 * b,) and torch.isfinite(out.end_scores).all()
    assert torch.equal(out.end_index, batch["attention_mask"].sum(-1) - 1)
    # sample 1 scored alone matches its rows in the batch: each row was paired with its own media
    torch.testing.assert_close(alone.end_scores, out.end_scores[[1, b + 1]], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------ prompt-only + generate
@pytest.mark.parametrize("family", list(FAMILIES))
def test_prompt_only_batches_are_left_padded_and_generate(family):
    path, template = PROMPTS[family]
    dm = datamodule(family, path, template, "prompt_only", batch_size=2)
    batch = first_batch(dm)
    assert "labels" not in batch and batch["attention_mask"][:, -1].all()
    assert dm.tokenizer.decode(batch["input_ids"][0][-6:]).endswith("<|im_start|>assistant\n")
    assert all(meta["prompt"][-1]["role"] == "user" for meta in batch["meta"])
    inputs = model_inputs(batch)
    with torch.no_grad():
        generated = model(family).generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape == (2, batch["input_ids"].shape[1] + 4)
    assert torch.equal(generated[:, : batch["input_ids"].shape[1]], batch["input_ids"])


# ------------------------------------------------------------------------------------------ learning + CLI
@pytest.mark.parametrize(
    "family", ["llava-image", "qwen2-audio", "qwen2-vl-video"], ids=["ti2t", "ta2t", "tv2t"]
)
def test_sft_lowers_the_loss_on_a_fixed_multimodal_batch(family):
    torch.manual_seed(0)
    path, template = SUPERVISED[family]
    dm = datamodule(family, path, template, "supervised", batch_size=2)
    batch = first_batch(dm)
    module = SFTModule(FAMILIES[family][1])
    module.configure_model()
    optimizer = torch.optim.AdamW(module.model.parameters(), lr=1e-2)
    losses = []
    for _ in range(4):
        nll, tokens = module.token_nll(batch)
        loss = nll / tokens
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses


@pytest.mark.parametrize("name", ["ti2t", "ta2t", "tv2t"])
def test_tiny_configs_run_through_the_cli(name, tmp_path, repo_path, monkeypatch):
    from aa_lightning.cli import build_cli

    monkeypatch.chdir(repo_path())
    cli = build_cli(
        [
            "fit",
            "--config",
            f"configs/tiny/sft_{name}.yaml",
            "--trainer.max_steps",
            "2",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    assert cli.trainer.global_step == 2
    assert os.path.exists(tmp_path / "checkpoints" / "last.ckpt")


# ------------------------------------------------------------------------------------------ bad media
def write_rows(tmp_path, rows_: list[dict[str, Any]], name: str = "rows.json") -> str:
    for image in ("1.jpg", "2.jpg"):
        shutil.copy(os.path.join(MEDIA, "image", "mllm_demo_data", image), tmp_path / image)
    path = tmp_path / name
    path.write_text(json.dumps(rows_))
    return str(path)


def chat(image: str, answer: str = "A photo.") -> dict[str, Any]:
    return {
        "messages": [
            {"role": "user", "content": "<image>What is this?"},
            {"role": "assistant", "content": answer},
        ],
        "images": [image],
    }


def test_missing_media_file_names_data_file_row_and_column(tmp_path):
    path = write_rows(tmp_path, [chat("1.jpg"), chat("missing.jpg"), chat("2.jpg")], "my_chats.json")
    with pytest.raises(DataFormatError) as info:
        datamodule("llava-image", path, "LLaVA-Instruct", "supervised")
    message = str(info.value)
    assert "my_chats.json" in message and "row 1" in message and "'images[0]'" in message
    assert "missing.jpg" in message
    dm = datamodule("llava-image", path, "LLaVA-Instruct", "supervised", on_bad_row="skip")
    assert len(dm.datasets["train"]) == 2 and [row for row, _ in dm.reports["train"][0].bad] == [1]


def test_corrupt_media_is_reported_when_the_data_is_prepared_with_its_row(tmp_path):
    path = write_rows(tmp_path, [chat("1.jpg"), chat("2.jpg"), chat("broken.jpg")], "chats.json")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(DataFormatError) as info:
        datamodule("llava-image", path, "LLaVA-Instruct", "supervised")  # setup: no batch is built
    message = str(info.value)
    assert (
        "chats.json" in message
        and "row 2" in message
        and "'images[0]'" in message
        and "broken.jpg" in message
    )
    dm = datamodule("llava-image", path, "LLaVA-Instruct", "supervised", on_bad_row="skip")
    assert [row for row, _ in dm.reports["train"][0].bad] == [2]
    batch = first_batch(dm)
    assert batch["input_ids"].shape[0] == 2 and batch["pixel_values"].shape[0] == 2
    assert dm.skipped_media == []  # dropped when prepared: nothing is left for the collator to skip


def test_audio_longer_than_the_limit_is_reported_not_cut():
    # mllm_audio_demo clips last 4.0 s, 2.9 s and 5.9 s
    with pytest.raises(DataFormatError) as info:
        datamodule(
            "qwen2-audio", "audio/mllm_audio_demo.json", "MLLM-Audio", "supervised", max_audio_seconds=3.0
        )
    message = str(info.value)
    assert "mllm_audio_demo.json" in message and "row 0" in message and "'audios[0]'" in message
    assert "1.mp3" in message and "4.0 s" in message
    dm = datamodule(
        "qwen2-audio",
        "audio/mllm_audio_demo.json",
        "MLLM-Audio",
        "supervised",
        max_audio_seconds=3.0,
        on_bad_row="skip",
    )
    assert [row for row, _ in dm.reports["train"][0].bad] == [0, 2]
    assert dm.info.max_audio_seconds == 30.0  # the Whisper feature extractor's window is the default


def test_pil_images_in_a_datasets_column_are_encoded(tmp_path):
    import datasets
    from PIL import Image

    image = Image.new("RGBA", (40, 30), (255, 0, 0, 0))  # fully transparent red: must load as white RGB
    data = datasets.Dataset.from_dict(
        {
            "question": ["What colour?", "And now?"],
            "image": [image, Image.open(os.path.join(MEDIA, "image", "pizza.jpg"))],
            "response_1": ["White.", "Pizza."],
            "response_2": ["Red.", "Soup."],
            "overall_response": [1, 1],
        }
    ).cast_column("image", datasets.Image())
    data.save_to_disk(str(tmp_path / "ds"))
    dm = datamodule("qwen2-vl-image", str(tmp_path / "ds"), "AA_TI2T", "preference")
    meta = json.loads(dm.datasets["train"][0]["meta"])
    assert "bytes" in meta["images"][0] and meta["images"][0]["field"] == "image"
    assert np.asarray(load_image(meta["images"][0])).min() == 255
    batch = first_batch(dm)
    assert batch["image_grid_thw"].shape[0] == 4


# ------------------------------------------------------------------------------------------ loaders
def test_audio_is_mixed_to_mono_and_resampled():
    mp3 = resolve_media("mllm_demo_data/1.mp3", "audios[0]", os.path.join(MEDIA, "audio"), "audio")
    samples = load_audio(mp3, 16000)  # 48 kHz stereo in the file
    assert samples.ndim == 1 and samples.dtype == np.float32
    assert abs(len(samples) - 4.032 * 16000) < 160
    digit = {"field": "audio", "path": os.path.join(MEDIA, "audio", "speech_asr", "3_jackson_0.wav")}
    import soundfile as sf

    assert len(load_audio(digit, 16000)) == 2 * sf.info(digit["path"]).frames  # 8 kHz -> 16 kHz
    bytes_ref = resolve_media({"array": np.zeros(800, dtype=np.float32), "sampling_rate": 8000}, "audio")
    assert len(load_audio(bytes_ref, 16000)) == 1600


def test_video_frames_are_sampled_uniformly_by_count_or_fps():
    assert sample_indices(41, 4).tolist() == [0, 13, 27, 40]
    mp4 = {
        "field": "videos[0]",
        "path": os.path.join(MEDIA, "video", "mllm_demo_data", "1.mp4"),
    }  # 4.1 s, 10 fps
    assert load_video(mp4, num_frames=3).shape == (3, 90, 160, 3)
    assert load_video(mp4, fps=2.0).shape[0] == 8
    assert load_video(mp4, fps=10.0, max_frames=5).shape[0] == 5
    avi = {"field": "videos[0]", "path": os.path.join(MEDIA, "video", "mllm_demo_data", "2.avi")}
    frames = load_video(avi, num_frames=4)
    assert frames.shape == (4, 120, 160, 3) and frames.dtype == np.uint8
    assert not np.array_equal(frames[0], frames[-1])  # first and last frame really differ
    with pytest.raises(DataFormatError, match="cannot decode video"):
        load_video({"field": "videos[0]", "bytes": "bm90IGEgdmlkZW8="}, num_frames=2)


def test_image_bytes_and_paths_load_as_rgb(tmp_path):
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (8, 6), 128).save(buffer, format="PNG")
    ref = resolve_media(buffer.getvalue(), "image")
    image = load_image(ref)
    assert image.mode == "RGB" and image.size == (8, 6)
    with pytest.raises(DataFormatError, match="file not found"):
        resolve_media("nope.png", "images[0]", str(tmp_path))
    with pytest.raises(DataFormatError, match="remote image"):
        resolve_media("https://example.com/a.png", "images[0]")


# ------------------------------------------------------------------------------------------ formatters
def test_llava_style_rows_become_parts_with_images_in_marker_order():
    row = rows("image/mllm_demo.json")[0]
    conversation, meta = get_formatter("LLaVA-Instruct").format_supervised_sample(row)
    assert conversation[0]["content"] == [{"type": "image"}, {"type": "text", "text": "Who are they?"}]
    assert conversation[2]["content"] == [{"type": "text", "text": "What are they doing?"}, {"type": "image"}]
    assert conversation[3] == {"role": "assistant", "content": "They are celebrating on the soccer field."}
    assert meta == {
        "images": [
            media_item("mllm_demo_data/1.jpg", "images[0]"),
            media_item("mllm_demo_data/1.jpg", "images[1]"),
        ]
    }
    llava150k = {
        "image": "coco/0001.jpg",
        "conversations": [
            {"from": "human", "value": "What is shown?\n<image>"},
            {"from": "gpt", "value": "A bus."},
        ],
    }
    conversation, meta = get_formatter("LLaVA-Instruct").format_supervised_sample(llava150k)
    assert conversation[0]["content"][-1] == {"type": "image"} and meta["images"][0]["field"] == "image"
    no_marker = {
        "messages": [{"role": "user", "content": "Describe."}, {"role": "assistant", "content": "Ok."}],
        "images": ["a.jpg"],
    }
    conversation, _ = get_formatter("MLLM-Messages").format_supervised_sample(no_marker)
    assert conversation[0]["content"] == [{"type": "image"}, {"type": "text", "text": "Describe."}]
    with pytest.raises(DataFormatError, match="2 <image> marker") as info:
        get_formatter("LLaVA-Instruct").format_supervised_sample({**row, "images": ["x.jpg"]})
    assert info.value.field == "images"
    with pytest.raises(DataFormatError, match="takes image input"):
        get_formatter("LLaVA-Instruct").format_supervised_sample(rows("audio/mllm_audio_demo.json")[0])
    with pytest.raises(DataFormatError, match="takes image input") as info:
        get_formatter("LLaVA-Instruct").format_supervised_sample({**no_marker, "videos": ["v.mp4"]})
    assert info.value.field == "videos"


def test_audio_video_rlaif_and_asr_rows():
    conversation, meta = get_formatter("MLLM-Audio").format_prompt_only_sample(
        rows("audio/mllm_audio_demo.json")[2]
    )
    assert conversation == [
        {
            "role": "user",
            "content": [{"type": "audio"}, {"type": "text", "text": "What does the person say?"}],
        }
    ]
    assert (
        meta["reference"].startswith("Mister Quiller")
        and meta["audios"][0]["value"] == "mllm_demo_data/3.flac"
    )
    _, meta = get_formatter("MLLM-Video").format_supervised_sample(rows("video/mllm_video_demo.json")[1])
    assert meta == {"videos": [media_item("mllm_demo_data/2.avi", "videos[0]")]}
    rlaif = rows("image/rlaif_v/detail_test_3_input.jsonl")
    conversation, meta = get_formatter("RLAIF-V").format_prompt_only_sample(rlaif[1])
    assert conversation[0]["content"][1]["text"] == "Offer a comprehensive description of this landmark."
    assert (
        meta["reference"] == "Landmark Name: Leptis Magna Libya"
        and meta["images"][0]["field"] == "image_path"
    )
    assert "reference" not in get_formatter("RLAIF-V").format_prompt_only_sample(rlaif[0])[1]
    conversation, meta = get_formatter("Speech-ASR").format_supervised_sample(
        rows("audio/speech_asr.json")[0]
    )
    assert conversation[1]["content"] == "THE CHILD ALMOST HURT THE SMALL DOG"
    assert meta["audios"][0]["value"] == "speech_asr/spk1_snt1.wav"  # speechbrain's {data_root}/ removed


def test_align_anything_layouts():
    row = rows("image/aa_ti2t.json")[1]  # overall_response 2
    chosen, rejected, meta = get_formatter("AA_TI2T").format_preference_sample(row)
    assert chosen[-1]["content"] == row["response_2"] and rejected[-1]["content"] == row["response_1"]
    assert chosen[0]["content"] == [{"type": "image"}, {"type": "text", "text": row["question"]}]
    assert meta == {"images": [media_item("bathroom.jpg", "image")]}
    conversation, _ = get_formatter("AA_TI2T").format_supervised_sample(
        {"prompt": "Q?", "image": "a.jpg", "response": "A."}
    )
    assert conversation[-1]["content"] == "A."
    conversation, meta = get_formatter("AA_TV2T").format_prompt_only_sample(rows("video/aa_tv2t.json")[0])
    assert conversation[0]["content"][1]["text"] == "Why is this video funny?"  # <video> marker removed
    assert meta["videos"][0]["field"] == "video_path"
    _, meta = get_formatter("AA_TA2T").format_supervised_sample(rows("audio/aa_ta2t.json")[2])
    assert meta["audios"][0]["value"] == "speech_asr/3_jackson_0.wav"
    with pytest.raises(DataFormatError) as info:
        get_formatter("AA_TA2T").format_preference_sample(
            {**rows("audio/aa_ta2t.json")[0], "overall_response": 3}
        )
    assert info.value.field == "overall_response"
