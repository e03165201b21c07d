"""Text-to-video diffusion (TextToVideoSD style: UNet3DConditionModel over a per-frame image VAE + CLIP) with
the SAME SFTModule and DPOModule as text and text-to-image: the score is -0.5 * MSE of the predicted noise over
(channels, frames, pixels) at a per-row seeded VAE draw, timestep and noise; the data side decodes clips into
``pixel_values_videos`` (N, F, 3, H, W); the export is a ``TextToVideoSDPipeline`` folder.

Everything runs on ``tiny-t2v`` (4 frames of 32x32, ~1.3M UNet parameters) and the 4 fixture clips of
configs/data/media/text_to_video/.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from quick_training import fixed_batch
from quick_training import quiet_trainer as trainer

from aa_lightning.algorithms import DPOModule, OptimConfig, SFTModule
from aa_lightning.batch import STEP_CHOSEN_LABEL_TOKENS, STEP_LABEL_TOKENS, model_inputs
from aa_lightning.data import DataFormatError, DataSpec, TextToVideoDataModule, get_formatter
from aa_lightning.models import TextToImageDiffusion, TextToVideoDiffusion, load_pretrained_models
from aa_lightning.models.aliases import resolve_model_path
from aa_lightning.testing.tiny_diffusion import TINY_T2V_FRAMES, TINY_T2V_RESOLUTION

REPO = Path(__file__).resolve().parent.parent
T2V = REPO / "configs" / "data" / "media" / "text_to_video"
FRAMES, RES = TINY_T2V_FRAMES, TINY_T2V_RESOLUTION
OPTIM = OptimConfig(lr=1e-3, warmup_steps=0, scheduler="constant")


def datamodule(path: str | Path, template: str, kind: str, batch_size: int = 2) -> TextToVideoDataModule:
    return TextToVideoDataModule(
        "tiny-t2v",
        train=DataSpec(str(path), template),
        kind=kind,
        num_frames=FRAMES,
        resolution=RES,
        batch_size=batch_size,
        shuffle=False,
    )


@pytest.fixture(scope="module")
def model() -> TextToVideoDiffusion:
    loaded, _, processor = load_pretrained_models("tiny-t2v")
    assert isinstance(loaded, TextToVideoDiffusion) and processor is None
    return loaded


@pytest.fixture(scope="module")
def sft_batch() -> dict[str, Any]:
    return fixed_batch(datamodule(T2V / "prompt_video.json", "T2V-Prompt-Video", "supervised", batch_size=4))


# -- the model --------------------------------------------------------------------------------------------------
def test_loading_picks_the_class_from_the_pipeline_name(model: TextToVideoDiffusion) -> None:
    assert model.config.model_type == "text-to-video-sd" and model.media_key == "pixel_values_videos"
    image_model, _, _ = load_pretrained_models("tiny-sd")
    assert type(image_model) is TextToImageDiffusion  # the text-to-image class is unchanged
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        f"unet.{n}" for n, _ in model.unet.named_parameters()
    ]
    with pytest.raises(ValueError, match="no checkpointed blocks"):
        model.gradient_checkpointing_enable()


def test_scores_are_deterministic_per_seed(model: TextToVideoDiffusion, sft_batch: dict[str, Any]) -> None:
    inputs = model_inputs(sft_batch)
    assert inputs["pixel_values_videos"].shape == (4, FRAMES, 3, RES, RES) and "pixel_values" not in inputs
    seeds = torch.tensor([5, 6, 5, 7])
    with torch.no_grad():
        first = model(**{**inputs, "noise_seed": seeds})
        again = model(**{**inputs, "noise_seed": seeds})
        other = model(**{**inputs, "noise_seed": seeds + 100})
        alone = model(**{k: v[1:2] for k, v in {**inputs, "noise_seed": seeds}.items()})
    assert first.sum.shape == (4,) and first.sum.dtype == torch.float32 and first.count.tolist() == [1] * 4
    assert torch.equal(first.sum, again.sum) and bool((first.sum < 0).all())
    assert not torch.allclose(first.sum, other.sum)
    torch.testing.assert_close(alone.sum[0], first.sum[1], rtol=1e-5, atol=1e-6)  # batch-independent


def test_score_is_minus_half_the_mse_recomputed_by_hand(model: TextToVideoDiffusion) -> None:
    """One row from diffusers' primitives: every frame through the VAE, latents laid out (1, c, F, h, w) as
    TextToVideoSDPipeline has them, then from one generator seeded ``seed``: the posterior draw (in that
    layout), the timestep, the noise."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet3DConditionModel
    from transformers import CLIPTextModel

    folder = resolve_model_path("tiny-t2v")
    torch.manual_seed(0)
    videos = torch.rand(2, FRAMES, 3, RES, RES) * 2 - 1
    ids = model.tokenizer(
        ["a cat", "a dog on a bed"], padding="max_length", truncation=True, return_tensors="pt"
    )
    seed = 987654321
    with torch.no_grad():
        scores = model(
            input_ids=ids.input_ids,
            attention_mask=ids.attention_mask,
            pixel_values_videos=videos,
            noise_seed=torch.tensor([3, seed]),
        ).sum
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
        unet = UNet3DConditionModel.from_pretrained(folder, subfolder="unet")
        text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
        noise_scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
        posterior = vae.encode(videos[1]).latent_dist  # the row's F frames as an image batch
        mean = posterior.mean[None].permute(0, 2, 1, 3, 4)
        std = posterior.std[None].permute(0, 2, 1, 3, 4)
        generator = torch.Generator().manual_seed(seed)
        latents = (mean + std * torch.randn(mean.shape, generator=generator)) * vae.config.scaling_factor
        timestep = torch.randint(0, noise_scheduler.config.num_train_timesteps, (1,), generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        noisy = noise_scheduler.add_noise(latents, noise, timestep)
        hidden = text_encoder(ids.input_ids[1:2])[0]
        prediction = unet(noisy, timestep, encoder_hidden_states=hidden).sample
        assert prediction.shape == (1, 4, FRAMES, RES // 2, RES // 2)
        expected = -0.5 * torch.nn.functional.mse_loss(prediction, noise)
    torch.testing.assert_close(scores[1], expected, rtol=1e-5, atol=1e-6)


def test_generate_returns_decodable_frames(model: TextToVideoDiffusion) -> None:
    videos = model.generate(
        ["a toddler reading"],
        num_frames=FRAMES,
        num_inference_steps=2,
        height=RES,
        width=RES,
        generator=torch.Generator().manual_seed(0),
    )
    assert len(videos) == 1 and len(videos[0]) == FRAMES
    for frame in videos[0]:
        pixels = np.asarray(frame)
        assert frame.mode == "RGB" and pixels.shape == (RES, RES, 3) and pixels.std() > 0
    assert model.unet.training  # sampling ran in eval mode and put the mode back


# -- the algorithms ---------------------------------------------------------------------------------------------
def test_sft_lowers_the_denoising_loss_on_a_fixed_batch(sft_batch: dict[str, Any]) -> None:
    """Measured (8 steps, lr 1e-3, 4 clips a step): 0.525 -> 0.209."""
    pl.seed_everything(0)
    module = SFTModule("tiny-t2v", optim=OPTIM)
    module.configure_model()

    def loss() -> float:  # 0.5 * MSE averaged over the batch's clips, at the batch's fixed seeds
        with torch.no_grad():
            nll, count = module.token_nll(sft_batch)
        return float(nll / count)

    before = loss()
    trainer(8).fit(module, datamodule(T2V / "prompt_video.json", "T2V-Prompt-Video", "supervised", 4))
    after = loss()
    assert math.isfinite(before) and after < 0.9 * before, (before, after)


def mean_margin(module: DPOModule, dm: TextToVideoDataModule, passes: int) -> tuple[float, float]:
    """Mean reward margin over the pairs and ``passes`` fixed noise draws, and the share that is positive."""
    margins = []
    dm.setup("fit")
    with torch.no_grad():
        for draw in range(passes):
            pl.seed_everything(100 + draw)
            for batch in dm.train_dataloader():
                margins.append(module.compute_loss(batch, "val")[1]["rewards/margins"])
    values = torch.cat(margins)
    return float(values.mean()), float((values > 0).float().mean())


def corrupted_clip(clip: Path, out: Path) -> str:
    """The clip with its colours inverted and half of each frame's pixels replaced by noise (a clearly worse
    clip of the same motion), written as an mp4 of ``FRAMES`` frames at ``RES`` x ``RES``."""
    import av

    from aa_lightning.data.media import load_video

    frames = load_video({"path": str(clip), "field": "video"}, num_frames=FRAMES)
    rng = np.random.default_rng(len(clip.name))
    target = out / f"worse_{clip.name}"
    with av.open(str(target), "w") as container:
        stream = container.add_stream("libx264", rate=4)
        stream.width, stream.height, stream.pix_fmt = RES, RES, "yuv420p"
        for frame in frames:
            small = np.asarray(
                av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(RES, RES).to_ndarray()
            )
            noise = rng.uniform(0, 255, small.shape)
            mask = rng.uniform(size=small.shape[:2])[..., None] < 0.5
            worse = np.where(mask, noise, 255 - small.astype(np.float64)).clip(0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(worse, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(target)


def test_dpo_raises_the_chosen_minus_rejected_margin_on_its_training_pairs(tmp_path: Path) -> None:
    """Diffusion-DPO (beta 2500) on 4 pairs of a fixture clip (chosen) and a corrupted copy (rejected, first
    or second at random): the margin starts at exactly 0 (policy == reference) and grows, averaged over
    several noise draws (one draw is one timestep per pair: too noisy to judge by).

    Measured (12 steps, lr 1e-3, 2 pairs a step): margin 1.90 with 92% of (pair, draw) values positive.

    (On aa_t2v.json itself, where every clip is chosen for one prompt and rejected for another, 12 steps
    learn nothing measurable: the tiny random text encoder barely separates the prompts.)"""
    rows = []
    for i, clip in enumerate(sorted((T2V / "clips").glob("*.mp4"))):
        good, bad = str(clip), corrupted_clip(clip, tmp_path)
        first, second, better = (good, bad, 1) if i % 2 == 0 else (bad, good, 2)
        rows.append({"prompt": f"clip {i}", "video_1": first, "video_2": second, "overall_video": better})
    path = write_rows(tmp_path, rows)
    pl.seed_everything(0)
    module = DPOModule("tiny-t2v", beta=2500.0, optim=OPTIM, precompute_ref_log_probs=False)
    module.configure_model()
    pairs = datamodule(path, "AA_T2V", "preference", batch_size=2)
    before, _ = mean_margin(module, pairs, passes=1)
    assert abs(before) < 1e-3  # policy == reference: 0 up to float rounding of two separate instances
    trainer(12).fit(module, datamodule(path, "AA_T2V", "preference", batch_size=2))
    after, positive = mean_margin(module, pairs, passes=3)
    assert after > 1.0 and positive > 0.6, (after, positive)


def test_the_export_is_a_text_to_video_pipeline_that_loads_and_generates(tmp_path: Path) -> None:
    from diffusers import DiffusionPipeline, TextToVideoSDPipeline

    pl.seed_everything(0)
    module = SFTModule("tiny-t2v", optim=OPTIM)
    trainer(1).fit(module, datamodule(T2V / "prompt_video.json", "T2V-Prompt-Video", "supervised"))
    folder = tmp_path / "hf_model"
    module.export_pretrained(str(folder))
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "TextToVideoSDPipeline"
    pipeline = DiffusionPipeline.from_pretrained(str(folder))
    assert isinstance(pipeline, TextToVideoSDPipeline)
    trained = dict(module.model.unet.named_parameters())
    for name, value in pipeline.unet.named_parameters():
        assert torch.equal(value, trained[name].detach()), name
    frames = pipeline(
        "a toddler reading",
        num_frames=FRAMES,
        num_inference_steps=2,
        height=RES,
        width=RES,
        generator=torch.Generator().manual_seed(0),
    ).frames
    assert frames.shape == (1, FRAMES, RES, RES, 3) and np.isfinite(frames).all() and frames.std() > 0
    reloaded, _, _ = load_pretrained_models(str(folder))
    assert isinstance(reloaded, TextToVideoDiffusion)


# -- the data ---------------------------------------------------------------------------------------------------
def test_each_layout_gives_the_batches_of_its_kind() -> None:
    supervised = datamodule(T2V / "prompt_video.json", "T2V-Prompt-Video", "supervised", batch_size=4)
    batch = fixed_batch(supervised)
    videos = batch["pixel_values_videos"]
    assert videos.shape == (4, FRAMES, 3, RES, RES) and videos.dtype == torch.float32
    assert -1.0 <= float(videos.min()) < float(videos.max()) <= 1.0
    assert batch["meta"][0]["video"].endswith("clips/baby_reading.mp4")
    assert not torch.equal(videos[0, 0], videos[0, -1])  # frames spread over the clip

    preference = datamodule(T2V / "aa_t2v.json", "AA_T2V", "preference", batch_size=2)
    pairs = fixed_batch(preference)
    assert pairs["pixel_values_videos"].shape == (4, FRAMES, 3, RES, RES)
    assert torch.equal(pairs["noise_seed"][:2], pairs["noise_seed"][2:])
    assert torch.equal(pairs["input_ids"][:2], pairs["input_ids"][2:])
    assert pairs["meta"][1]["chosen_video"].endswith("cooking_pan.mp4")  # overall_video 2
    assert pairs["meta"][1]["rejected_video"].endswith("baby_waving.mp4")
    steps = preference.step_tokens(preference.datasets["train"])
    assert (
        steps[STEP_LABEL_TOKENS].tolist() == [2] * 4 and steps[STEP_CHOSEN_LABEL_TOKENS].tolist() == [1] * 4
    )


def write_rows(tmp_path: Path, rows: list[dict]) -> Path:
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    return path


def test_bad_rows_name_file_row_and_field(tmp_path: Path) -> None:
    clip = str(T2V / "clips" / "baby_reading.mp4")
    path = write_rows(
        tmp_path, [{"prompt": "a toddler", "video": clip}, {"prompt": "a cook", "video": "nowhere.mp4"}]
    )
    with pytest.raises(
        DataFormatError, match=r"rows.json, row 1, field 'video': video file not found: .*nowhere"
    ):
        datamodule(path, "T2V-Prompt-Video", "supervised").setup("fit")
    path = write_rows(tmp_path, [{"prompt": "a toddler", "video_1": clip, "overall_video": 1}])
    with pytest.raises(DataFormatError, match=r"rows.json, row 0, field 'video_2': missing video"):
        datamodule(path, "AA_T2V", "preference").setup("fit")
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    path = write_rows(tmp_path, [{"prompt": "a toddler", "video": "broken.mp4"}])
    with pytest.raises(DataFormatError, match=r"row 0, field 'video': cannot decode video .*broken.mp4"):
        datamodule(path, "T2V-Prompt-Video", "supervised").setup("fit")
    short = TextToVideoDataModule(
        "tiny-t2v",
        train=DataSpec(str(T2V / "prompt_video.json"), "T2V-Prompt-Video"),
        kind="supervised",
        num_frames=9,
        resolution=RES,
    )
    with pytest.raises(
        DataFormatError, match=r"row 0, field 'video': .* has 8 frame\(s\), fewer than num_frames=9"
    ):
        short.setup("fit")


def test_a_pair_of_one_clip_twice_is_reported(tmp_path: Path) -> None:
    clip = str(T2V / "clips" / "cooking_pan.mp4")
    row = {"prompt": "a pan", "video_1": clip, "video_2": clip, "overall_video": 1}
    dm = datamodule(write_rows(tmp_path, [row]), "AA_T2V", "preference")
    dm.setup("fit")
    report = dm.reports["train"][0]
    assert report.identical_pairs == [0] and "same chosen and rejected clip" in report.summary(1)


def test_formatters_keep_the_conversation_contract(tmp_path: Path) -> None:
    conversation, _ = get_formatter("T2V-Prompt-Video").format_supervised_sample(
        {"prompt": "a cat", "video": "c.mp4"}
    )
    assert conversation == [
        {"role": "user", "content": "a cat"},
        {"role": "assistant", "content": [{"type": "video", "video": {"value": "c.mp4", "field": "video"}}]},
    ]
    row = {"prompt": "x", "video_1": "a.mp4", "video_2": "b.mp4", "overall_video": "2"}
    chosen, rejected, _ = get_formatter("AA_T2V").format_preference_sample(row)
    assert chosen[1]["content"][0]["video"]["field"] == "video_2"
    assert rejected[1]["content"][0]["video"]["field"] == "video_1"
    image_rows = write_rows(tmp_path, [{"prompt": "a cat", "image": str(T2V / "clips" / "baby_reading.mp4")}])
    with pytest.raises(DataFormatError, match="use a text-to-video template: T2V-Prompt-Video, AA_T2V"):
        datamodule(image_rows, "T2I-Prompt-Image", "supervised").setup("fit")
