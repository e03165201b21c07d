"""SampleGenerationCallback writes each family's generated output to TensorBoard at fit start, at the end of
validation runs and at fit end: images, audio clips (at the family's sampling rate), video frame strips and
text answers, read back from the event files.

Every run: 2 steps, a validation run after each (one batch), a sanity check before (which must log nothing),
1 prompt, 1 inference step.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image

from aa_lightning.algorithms import GenerationConfig, OptimConfig, SFTModule
from aa_lightning.callbacks import SampleGenerationCallback
from aa_lightning.callbacks.media_logging import frame_strip
from aa_lightning.data import (
    DataSpec,
    TextToAudioDataModule,
    TextToImageDataModule,
    TextToImageTokensDataModule,
    TextToTextDataModule,
    TextToVideoDataModule,
)
from aa_lightning.testing.tiny_diffusion import TINY_T2V_FRAMES, TINY_T2V_RESOLUTION

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEDIA = os.path.join(REPO, "configs", "data", "media")
OPTIM = OptimConfig(lr=1e-3, warmup_steps=0, scheduler="constant")
ONE_STEP = GenerationConfig(num_inference_steps=1, guidance_scale=1.0, seed=0)


def spec(folder: str, file: str, template: str) -> DataSpec:
    return DataSpec(os.path.join(MEDIA, folder, file), template)


def image_data() -> pl.LightningDataModule:
    rows = spec("text_to_image", "prompt_image.json", "T2I-Prompt-Image")
    return TextToImageDataModule("tiny-sd", train=rows, val=rows, resolution=32, batch_size=2, shuffle=False)


def audio_data() -> pl.LightningDataModule:
    rows = spec("text_to_audio", "prompt_audio.json", "T2A-Prompt-Audio")
    return TextToAudioDataModule("tiny-audioldm", train=rows, val=rows, batch_size=2, shuffle=False)


def video_data() -> pl.LightningDataModule:
    rows = spec("text_to_video", "prompt_video.json", "T2V-Prompt-Video")
    return TextToVideoDataModule(
        "tiny-t2v",
        train=rows,
        val=rows,
        num_frames=TINY_T2V_FRAMES,
        resolution=TINY_T2V_RESOLUTION,
        batch_size=2,
        shuffle=False,
    )


def fit_and_read(
    tmp_path: Path, model: str, data: pl.LightningDataModule, callback: SampleGenerationCallback
) -> Any:
    """Fit 2 steps with a validation run after each, then the run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pl.seed_everything(0)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = pl.Trainer(
        max_steps=2,
        val_check_interval=1,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        num_sanity_val_steps=1,
        log_every_n_steps=1,
        accelerator="cpu",
        devices=1,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    trainer.fit(SFTModule(model, optim=OPTIM, generation=ONE_STEP), data)
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "audio": 0, "tensors": 0})
    events.Reload()
    return events


def steps(entries: list[Any]) -> list[int]:
    return [e.step for e in entries]


def decoded(entry: Any) -> np.ndarray:
    import io

    return np.asarray(Image.open(io.BytesIO(entry.encoded_image_string)).convert("RGB"))


def test_images_are_logged_before_at_every_validation_and_after(tmp_path: Path) -> None:
    callback = SampleGenerationCallback(prompts=["a red bus"], print_samples=False)
    events = fit_and_read(tmp_path, "tiny-sd", image_data(), callback)
    tags = set(events.Tags()["images"])
    assert tags == {"samples/before/0", "samples/val/0", "samples/after/0"}
    assert steps(events.Images("samples/before/0")) == [0]
    assert steps(events.Images("samples/val/0")) == [1, 2]  # not at the sanity check (step 0)
    assert steps(events.Images("samples/after/0")) == [2]
    pixels = decoded(events.Images("samples/val/0")[-1])
    assert pixels.shape == (32, 32, 3) and pixels.std() > 0
    # the end-of-fit image is the same sample as the last validation's (same weights, same seed)
    assert np.array_equal(pixels, decoded(events.Images("samples/after/0")[0]))


def test_image_token_models_log_the_images_they_generate(tmp_path: Path) -> None:
    """Emu3 (images as tokens): the callback asks the family's token-output codec for image prompts, samples
    the token grid and logs the decoded 32x32 image, not text."""
    rows = spec("text_to_image", "prompt_image.json", "T2I-Prompt-Image")
    data = TextToImageTokensDataModule(
        "tiny-emu3", train=rows, val=rows, resolution=32, batch_size=2, shuffle=False
    )
    callback = SampleGenerationCallback(prompts=["a red bus"], print_samples=False)
    events = fit_and_read(tmp_path, "tiny-emu3", data, callback)
    assert set(events.Tags()["images"]) == {"samples/before/0", "samples/val/0", "samples/after/0"}
    assert steps(events.Images("samples/val/0")) == [1, 2]
    pixels = decoded(events.Images("samples/after/0")[0])
    assert pixels.shape == (32, 32, 3) and pixels.std() > 0
    # seeded sampling: the same weights give the same image (last validation and fit end)
    assert np.array_equal(pixels, decoded(events.Images("samples/val/0")[-1]))


def test_audio_is_logged_at_its_sampling_rate(tmp_path: Path) -> None:
    callback = SampleGenerationCallback(prompts=["a man says two"], print_samples=False)
    events = fit_and_read(tmp_path, "tiny-audioldm", audio_data(), callback)
    assert {"samples/before/0", "samples/val/0", "samples/after/0"} <= set(events.Tags()["audio"])
    clips = events.Audio("samples/val/0")
    assert steps(clips) == [1, 2]
    for clip in clips:
        assert clip.sample_rate == 16000 and clip.content_type == "audio/wav" and clip.length_frames > 1000


def test_video_is_logged_as_a_strip_of_frames(tmp_path: Path) -> None:
    callback = SampleGenerationCallback(prompts=["a ball rolls"], print_samples=False, num_frames=3)
    events = fit_and_read(tmp_path, "tiny-t2v", video_data(), callback)
    assert steps(events.Images("samples/val/0")) == [1, 2]
    strip = decoded(events.Images("samples/val/0")[0])
    height = strip.shape[0]
    assert strip.shape == (height, 3 * height, 3) and strip.std() > 0  # 3 square frames side by side


def test_text_answers_every_second_validation(tmp_path: Path) -> None:
    callback = SampleGenerationCallback(
        prompts=["Say hi."], max_new_tokens=4, print_samples=False, every_n_validations=2
    )
    rows = DataSpec(os.path.join(REPO, "configs", "data", "alpaca_200.json"), "Alpaca", size=4)
    data = TextToTextDataModule("tiny-qwen2", train=rows, val=rows, max_length=64, batch_size=2)
    events = fit_and_read(tmp_path, "tiny-qwen2", data, callback)
    tags = set(events.Tags()["tensors"])
    assert {"samples/val/text_summary", "samples/before_after/text_summary"} <= tags
    assert steps(events.Tensors("samples/val/text_summary")) == [2]  # validations 1 and 2: only the 2nd
    text = events.Tensors("samples/val/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "### Prompt\nSay hi." in text and "### Answer" in text


def test_every_n_validations_zero_logs_only_before_and_after(tmp_path: Path) -> None:
    callback = SampleGenerationCallback(prompts=["a red bus"], print_samples=False, every_n_validations=0)
    events = fit_and_read(tmp_path, "tiny-sd", image_data(), callback)
    assert set(events.Tags()["images"]) == {"samples/before/0", "samples/after/0"}
    with pytest.raises(ValueError, match="every_n_validations"):
        SampleGenerationCallback(every_n_validations=-1)


def test_frame_strip_samples_frames_uniformly_and_shrinks_them() -> None:
    frames = [Image.new("RGB", (64, 32), (i * 20, 0, 0)) for i in range(10)]
    strip = frame_strip(frames, num_frames=4, max_side=32)
    assert strip.shape == (16, 4 * 32, 3)
    assert [int(strip[0, 32 * k, 0]) for k in range(4)] == [0, 60, 120, 180]  # frames 0, 3, 6, 9
    assert frame_strip(frames).shape == (32, 10 * 64, 3)
