"""Text-to-audio (AudioLDM-style) diffusion with the SAME SFTModule and DPOModule.

The model family (``TextToAudioDiffusion``: UNet conditioned on the CLAP text projection through its class
embedding, a 1-channel VAE on log-mels, a HiFi-GAN vocoder) answers "how well does this model explain this
clip" with -0.5 * MSE of the predicted noise at a per-row seeded noise and timestep; the algorithms are the
chat ones. Tiny pipeline ``tiny-audioldm``, 0.64 s clips of spoken digits (configs/data/media/text_to_audio).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from quick_training import fixed_batch
from quick_training import quiet_trainer as trainer

from aa_lightning.algorithms import DPOModule, OptimConfig, SFTModule
from aa_lightning.batch import model_inputs
from aa_lightning.data import DataSpec, TextToAudioDataModule
from aa_lightning.data.audio_mel import MelSettings, log_mel_spectrogram
from aa_lightning.data.errors import DataFormatError
from aa_lightning.models import TextToAudioDiffusion, load_pretrained_models
from aa_lightning.models.diffusion import draw_row_noise

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T2A = os.path.join(REPO, "configs", "data", "media", "text_to_audio")
OPTIM = OptimConfig(lr=1e-3, warmup_steps=0, scheduler="constant")


def datamodule(path: str, template: str, kind: str, batch_size: int = 2) -> TextToAudioDataModule:
    return TextToAudioDataModule(
        "tiny-audioldm", train=DataSpec(path, template), kind=kind, batch_size=batch_size, shuffle=False
    )


@pytest.fixture(scope="module")
def model() -> TextToAudioDiffusion:
    loaded, _, processor = load_pretrained_models("tiny-audioldm")
    assert isinstance(loaded, TextToAudioDiffusion) and processor is None
    return loaded


@pytest.fixture(scope="module")
def pair_batch() -> dict[str, Any]:
    return fixed_batch(datamodule(os.path.join(T2A, "aa_t2a.json"), "AA_T2A", "preference"))


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------


def test_preference_batches_hold_log_mels_in_the_vocoders_layout(pair_batch: dict[str, Any]) -> None:
    batch = pair_batch
    assert set(model_inputs(batch)) == {"input_ids", "attention_mask", "audio_mels", "noise_seed"}
    assert batch["input_ids"].shape == (4, 16) and batch["audio_mels"].shape == (4, 1, 64, 64)
    assert torch.equal(batch["noise_seed"][:2], batch["noise_seed"][2:])  # a pair shares its noise
    assert torch.equal(batch["input_ids"][:2], batch["input_ids"][2:])
    first = batch["meta"][0]
    assert first["prompt"] == "a man says two"
    assert first["chosen_audio"].endswith("2_george_0.wav") and first["rejected_audio"].endswith(
        "9_george_0.wav"
    )
    # the second row prefers audio_2 (overall_audio 2)
    assert batch["meta"][1]["chosen_audio"].endswith("4_jackson_0.wav")
    mels = batch["audio_mels"]
    assert torch.isfinite(mels).all() and float(mels.min()) >= math.log(1e-5) - 1e-4
    # 8 kHz clips resampled to 16 kHz hold nothing above 4 kHz: the top mel bins sit at the log floor
    assert float(mels[..., -8:].mean()) < float(mels[..., :24].mean()) - 3


def test_log_mel_of_a_tone_peaks_in_its_mel_bin() -> None:
    """A 1 kHz sine: the strongest of the 64 Slaney mel bins (0-8 kHz) is the one whose centre is nearest 1 kHz."""
    import torchaudio

    settings = MelSettings(duration=0.32)
    t = np.arange(settings.samples) / settings.sampling_rate
    mel = log_mel_spectrogram(np.sin(2 * np.pi * 1000.0 * t), settings)
    assert mel.shape == (1, 32, 64)
    centres = torchaudio.functional.melscale_fbanks(
        513, 0.0, 8000.0, 64, 16000, norm="slaney", mel_scale="slaney"
    ).argmax(dim=0) * (8000.0 / 512)
    assert int(mel[0, 10:20].mean(0).argmax()) == int((centres - 1000.0).abs().argmin())
    with pytest.raises(ValueError, match="multiple of 4"):
        MelSettings(duration=0.33, frame_multiple=4)


@pytest.mark.parametrize("problem", ["missing", "corrupt"])
def test_a_bad_clip_is_named_by_file_row_and_field_when_prepared(tmp_path: Path, problem: str) -> None:
    clips = tmp_path / "clips"
    shutil.copytree(os.path.join(T2A, "clips"), clips)
    rows = json.load(open(os.path.join(T2A, "aa_t2a.json")))
    if problem == "missing":
        rows[2]["audio_2"] = "clips/nope.wav"
    else:
        (clips / "bad.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio")
        rows[2]["audio_2"] = "clips/bad.wav"
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps(rows))
    with pytest.raises(DataFormatError) as info:
        datamodule(str(data), "AA_T2A", "preference").setup("fit")
    message = str(info.value)
    assert "pairs.json" in message and "row 2" in message and "audio_2" in message, message
    assert ("nope.wav" if problem == "missing" else "bad.wav") in message


# --------------------------------------------------------------------------------------------------
# the score
# --------------------------------------------------------------------------------------------------


def test_scores_are_deterministic_per_seed_and_equal_minus_half_the_mse(
    model: TextToAudioDiffusion, pair_batch: dict[str, Any]
) -> None:
    inputs = model_inputs(pair_batch)
    with torch.no_grad():
        first = model.explain_outputs(**inputs)
        again = model(**inputs)
        other = model(**{**inputs, "noise_seed": inputs["noise_seed"] + 1})
        alone = model(**{k: v[1:2] for k, v in inputs.items()})
    assert first.sum.dtype == torch.float32 and first.count.tolist() == [1, 1, 1, 1]
    assert torch.equal(first.sum, again.sum) and not torch.allclose(first.sum, other.sum)
    torch.testing.assert_close(alone.sum[0], first.sum[1], rtol=1e-5, atol=1e-6)

    # row 1 by hand: VAE posterior sample, DDPM noising, CLAP projection as the class embedding
    row, seed = 1, int(inputs["noise_seed"][1])
    with torch.no_grad():
        posterior = model.vae.encode(inputs["audio_mels"][row : row + 1]).latent_dist
        draw, t, eps = draw_row_noise(seed, posterior.mean.shape[1:], 1000)
        latent = (posterior.mean + posterior.std * draw) * model.vae.config.scaling_factor
        abar = model.noise_scheduler.alphas_cumprod[t]
        x_t = abar.sqrt() * latent + (1 - abar).sqrt() * eps
        text = model.text_encoder(
            inputs["input_ids"][row : row + 1], attention_mask=inputs["attention_mask"][row : row + 1]
        ).text_embeds
        text = text / text.norm(dim=-1, keepdim=True)
        eps_hat = model.unet(x_t, t.reshape(1), encoder_hidden_states=None, class_labels=text).sample
        by_hand = -0.5 * float((eps_hat - eps).pow(2).mean())
    assert abs(float(first.sum[row]) - by_hand) < 1e-5 * max(1.0, abs(by_hand))


def test_only_the_unet_trains(model: TextToAudioDiffusion) -> None:
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"unet"}
    model.train()
    assert not model.vocoder.training and not model.vae.training
    assert not model.unet.training  # no active dropout: kept in eval (see LatentDiffusion.train)


# --------------------------------------------------------------------------------------------------
# learning with the unchanged algorithm modules
# --------------------------------------------------------------------------------------------------


def test_sft_lowers_the_denoising_loss_on_a_fixed_batch() -> None:
    pl.seed_everything(0)
    module = SFTModule("tiny-audioldm", optim=OPTIM)
    dm = datamodule(os.path.join(T2A, "prompt_audio.json"), "T2A-Prompt-Audio", "supervised", batch_size=4)
    module.configure_model()
    batch = fixed_batch(dm)

    def loss() -> float:
        with torch.no_grad():
            nll, count = module.token_nll(batch)
        return float(nll / count)

    before = loss()
    trainer(10).fit(module, dm)
    after = loss()
    assert math.isfinite(before) and after < 0.9 * before, (before, after)


def pair_margin(module: DPOModule, dm: TextToAudioDataModule, passes: int) -> tuple[float, float]:
    """Mean reward margin of ``dm``'s pairs over ``passes`` fixed noise draws, and the share that is positive."""
    margins = []
    dm.setup("fit")
    with torch.no_grad():
        for draw in range(passes):
            pl.seed_everything(100 + draw)
            for batch in dm.train_dataloader():
                margins.append(module.compute_loss(batch, "val")[1]["rewards/margins"])
    values = torch.cat(margins)
    return float(values.mean()), float((values > 0).float().mean())


def noisy_pairs(out: Path) -> str:
    """AA_T2A pairs of a spoken digit (chosen) and the same clip buried in white noise (rejected), the
    better one alternately in ``audio_1`` and ``audio_2``."""
    import soundfile as sf

    rows = json.load(open(os.path.join(T2A, "prompt_audio.json")))[:6]
    rng = np.random.default_rng(0)
    pairs = []
    for i, row in enumerate(rows):
        clean = os.path.join(T2A, row["audio"])
        wav, rate = sf.read(clean, dtype="float32")
        worse = out / f"noisy_{i}.wav"
        sf.write(worse, (wav + rng.normal(0, 2 * wav.std(), wav.shape)).astype(np.float32), rate)
        first, second, better = (clean, str(worse), 1) if i % 2 == 0 else (str(worse), clean, 2)
        pairs.append({"prompt": row["prompt"], "audio_1": first, "audio_2": second, "overall_audio": better})
    path = out / "pairs.json"
    path.write_text(json.dumps(pairs))
    return str(path)


def test_dpo_raises_the_chosen_minus_rejected_margin_on_its_training_pairs(tmp_path: Path) -> None:
    """Trained on 6 (clean clip, noisy clip) pairs, the mean margin over 3 noise draws goes from 0 to > 1.

    Measured (12 steps, lr 1e-3, beta 2500): margin 5.9, all 18 (pair, draw) margins positive."""
    pairs = noisy_pairs(tmp_path)
    pl.seed_everything(0)
    module = DPOModule("tiny-audioldm", beta=2500.0, optim=OPTIM)
    module.configure_model()
    before, _ = pair_margin(module, datamodule(pairs, "AA_T2A", "preference", batch_size=3), passes=1)
    assert abs(before) < 1e-3  # policy == reference (up to float rounding)
    trainer(12).fit(module, datamodule(pairs, "AA_T2A", "preference", batch_size=2))
    after, positive = pair_margin(module, datamodule(pairs, "AA_T2A", "preference", batch_size=3), passes=3)
    assert after > 1.0 and positive > 0.6, (after, positive)


# --------------------------------------------------------------------------------------------------
# sampling and export
# --------------------------------------------------------------------------------------------------


def test_generation_gives_a_finite_audible_waveform(model: TextToAudioDiffusion) -> None:
    model.train()
    model.unet.train()  # as with active dropout: the UNet in train mode
    unet_mode = model.unet.training
    waves = model.generate(
        ["a man says seven", "a man says two"],
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
    )
    assert len(waves) == 2 and all(w.shape == (10240,) for w in waves)  # 0.64 s at 16 kHz
    assert all(np.isfinite(w).all() and w.std() > 1e-3 for w in waves)
    assert model.unet.training == unet_mode  # sampled in eval mode, the mode restored


def test_the_export_is_an_audioldm_pipeline_that_loads_and_generates(tmp_path: Path) -> None:
    from diffusers import AudioLDMPipeline, DiffusionPipeline

    pl.seed_everything(0)
    module = SFTModule("tiny-audioldm", optim=OPTIM)
    trainer(1).fit(
        module, datamodule(os.path.join(T2A, "prompt_audio.json"), "T2A-Prompt-Audio", "supervised")
    )
    folder = tmp_path / "hf_model"
    module.export_pretrained(str(folder))
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "AudioLDMPipeline"
    assert (folder / "vocoder").is_dir() and not (folder / "tokenizer_config.json").exists()
    pipeline = DiffusionPipeline.from_pretrained(str(folder))
    assert isinstance(pipeline, AudioLDMPipeline)
    trained = dict(module.model.unet.named_parameters())
    for name, value in pipeline.unet.named_parameters():
        assert torch.equal(value, trained[name].detach()), name
    pipeline.set_progress_bar_config(disable=True)
    audio = pipeline(
        "a man says seven",
        num_inference_steps=2,
        audio_length_in_s=0.64,
        generator=torch.Generator().manual_seed(0),
    ).audios[0]
    assert audio.shape == (10240,) and np.isfinite(audio).all() and audio.std() > 1e-3
    reloaded, _, _ = load_pretrained_models(str(folder))
    assert isinstance(reloaded, TextToAudioDiffusion)


def test_image_settings_are_refused_unless_left_at_their_defaults() -> None:
    """The CLI hands every datamodule the parent's defaults (``resolution: 512``): those pass, a changed one not."""
    spec = DataSpec(os.path.join(T2A, "prompt_audio.json"), "T2A-Prompt-Audio")
    TextToAudioDataModule("tiny-audioldm", train=spec, resolution=512, random_flip=False)
    with pytest.raises(TypeError, match="resolution"):
        TextToAudioDataModule("tiny-audioldm", train=spec, resolution=64)
