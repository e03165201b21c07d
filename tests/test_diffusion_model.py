"""Text-to-image diffusion model: the per-row score, what trains, sampling, and the pipeline folder round trip."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from aa_lightning.models import OutputScores, TextToImageDiffusion, load_pretrained_models
from aa_lightning.models.loading import load_tokenizer_and_processor
from aa_lightning.testing.tiny_diffusion import TINY_SD_RESOLUTION, build_tiny_sd

PROMPTS = ["a red cat", "a blue dog on the grass", "a red cat", "an empty room"]


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture
def model(sd_folder: str) -> TextToImageDiffusion:
    return TextToImageDiffusion.from_pretrained(sd_folder)


def make_batch(
    model: TextToImageDiffusion, seeds: list[int], prompts: list[str] = PROMPTS, image_seed: int = 0
) -> dict[str, Any]:
    """A batch as the text-to-image collator writes it (rows 0 and 2: same prompt and image)."""
    tokens = model.tokenizer(
        prompts[: len(seeds)],
        padding="max_length",
        max_length=model.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    generator = torch.Generator().manual_seed(image_seed)
    pixels = torch.rand(len(seeds), 3, TINY_SD_RESOLUTION, TINY_SD_RESOLUTION, generator=generator) * 2 - 1
    if len(seeds) > 2:
        pixels[2] = pixels[0]
    return {
        "input_ids": tokens.input_ids,
        "attention_mask": tokens.attention_mask,
        "pixel_values": pixels,
        "noise_seed": torch.tensor(seeds, dtype=torch.long),
        "meta": [{"prompt": p} for p in prompts[: len(seeds)]],
    }


def inputs(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


def test_scores_are_deterministic_per_seed_and_differ_across_seeds(model: TextToImageDiffusion) -> None:
    batch = make_batch(model, [11, 12, 11, 13])
    with torch.no_grad():
        first = model.explain_outputs(**inputs(batch))
        again = model(**inputs(batch))  # forward is explain_outputs
        other = model(**inputs({**batch, "noise_seed": torch.tensor([21, 22, 23, 24])}))
    assert isinstance(first, OutputScores)
    assert first.sum.dtype == torch.float32 and first.sum.shape == (4,)
    assert first.count.dtype == torch.int64 and first.count.tolist() == [1, 1, 1, 1]
    assert bool((first.sum < 0).all())
    assert torch.equal(first.sum, again.sum)
    assert not torch.allclose(first.sum, other.sum)
    # rows 0 and 2: same prompt, same image, same seed -> same score (as a pair's shared noise needs)
    torch.testing.assert_close(first.sum[0], first.sum[2], rtol=1e-5, atol=1e-6)
    assert not torch.isclose(first.sum[0], first.sum[1])


def test_a_row_scores_the_same_alone_as_in_a_batch(model: TextToImageDiffusion) -> None:
    batch = make_batch(model, [11, 12, 11, 13])
    alone = {k: v[1:2] for k, v in inputs(batch).items()}
    with torch.no_grad():
        together = model(**inputs(batch)).sum[1]
        single = model(**alone).sum[0]
    torch.testing.assert_close(together, single, rtol=1e-5, atol=1e-6)


def test_policy_and_a_second_instance_score_alike(sd_folder: str, model: TextToImageDiffusion) -> None:
    """The frozen-reference property: a reference loaded from the same folder gives the same scores."""
    reference = TextToImageDiffusion.from_pretrained(sd_folder).eval().requires_grad_(False)
    model.train()
    batch = make_batch(model, [5, 6, 5, 7])
    policy_scores = model(**inputs(batch)).sum
    with torch.no_grad():
        reference_scores = reference(**inputs(batch)).sum
    torch.testing.assert_close(policy_scores.detach(), reference_scores, rtol=0, atol=0)


def test_only_the_unet_trains(model: TextToImageDiffusion) -> None:
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("unet.") for n in trainable)
    assert len(trainable) == len(list(model.unet.parameters()))
    model.requires_grad_(True)  # what generic code may call: the frozen parts stay frozen
    assert all(n.startswith("unet.") for n, p in model.named_parameters() if p.requires_grad)
    model.train()
    assert not model.vae.training and not model.text_encoder.training
    # no active dropout: the UNet stays in eval mode (its train mode would only change memory layouts, and
    # so the rounding against an eval-mode reference); with dropout it trains in train mode
    assert not model.unet.training
    model.unet.down_blocks[0].resnets[0].dropout.p = 0.1
    model.train()
    assert model.unet.training
    model.unet.down_blocks[0].resnets[0].dropout.p = 0.0
    model.config.use_cache = False  # prepare_trainable sets it
    assert model.config.model_type == "stable-diffusion"

    model(**inputs(make_batch(model, [1, 2]))).sum.sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(n.startswith("unet.") for n in with_grad)
    assert all(p.grad is None for p in [*model.vae.parameters(), *model.text_encoder.parameters()])
    assert any(float(p.grad.abs().sum()) > 0 for p in model.unet.parameters() if p.grad is not None)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_score_is_minus_half_the_mse_of_diffusers_primitives(
    prediction_type: str, tmp_path: Path, sd_folder: str
) -> None:
    """One row recomputed by hand as diffusers' training script would, from a generator seeded ``seed``:
    posterior sample, then timestep, then noise."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = (
        sd_folder
        if prediction_type == "epsilon"
        else build_tiny_sd(tmp_path, prediction_type=prediction_type)
    )
    model = TextToImageDiffusion.from_pretrained(folder)
    batch = make_batch(model, [3, 987654321])
    with torch.no_grad():
        scores = model(**inputs(batch)).sum

    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    noise_scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    assert noise_scheduler.config.prediction_type == prediction_type
    row = 1
    with torch.no_grad():
        generator = torch.Generator().manual_seed(987654321)
        pixels = batch["pixel_values"][row : row + 1]
        latents = vae.encode(pixels).latent_dist.sample(generator) * vae.config.scaling_factor
        timestep = torch.randint(0, noise_scheduler.config.num_train_timesteps, (1,), generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        noisy = noise_scheduler.add_noise(latents, noise, timestep)
        hidden = text_encoder(batch["input_ids"][row : row + 1])[0]
        prediction = unet(noisy, timestep, encoder_hidden_states=hidden).sample
        target = (
            noise if prediction_type == "epsilon" else noise_scheduler.get_velocity(latents, noise, timestep)
        )
        expected = -0.5 * torch.nn.functional.mse_loss(prediction, target)
    torch.testing.assert_close(scores[row], expected, rtol=1e-5, atol=1e-6)


def test_a_few_adam_steps_lower_the_denoising_loss(model: TextToImageDiffusion) -> None:
    """SFT's loss is 0.5 * MSE = -score: on a fixed batch (fixed noise) Adam must lower it."""
    torch.manual_seed(0)
    model.train()
    batch = inputs(make_batch(model, [1, 2, 3, 4]))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(6):
        loss = -model(**batch).sum.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        final = float(-model(**batch).sum.mean())
    assert final < 0.8 * losses[0], losses + [final]


def test_gradient_checkpointing_gives_the_same_scores_and_gradients(sd_folder: str) -> None:
    plain, checkpointed = (TextToImageDiffusion.from_pretrained(sd_folder).train() for _ in range(2))
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert checkpointed.unet.is_gradient_checkpointing
    batch = inputs(make_batch(plain, [8, 9]))
    for m in (plain, checkpointed):
        m(**batch).sum.sum().backward()
    torch.testing.assert_close(
        plain.unet.conv_in.weight.grad, checkpointed.unet.conv_in.weight.grad, rtol=1e-4, atol=1e-6
    )


def test_generate_returns_decodable_images_of_the_requested_size(model: TextToImageDiffusion) -> None:
    model.train()
    model.unet.train()  # as with active dropout: the UNet in train mode
    unet_mode = model.unet.training
    images = model.generate(
        ["a red cat", "a blue dog"],
        num_inference_steps=3,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0),
        height=32,
        width=48,
    )
    assert len(images) == 2
    for image in images:
        assert image.size == (48, 32) and image.mode == "RGB"
        pixels = np.asarray(image).astype(np.float32)
        assert np.isfinite(pixels).all() and pixels.std() > 0
    assert model.unet.training == unet_mode  # sampling ran in eval mode and put the mode back
    again = model.generate(["a red cat"], num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    assert again[0].size == (TINY_SD_RESOLUTION, TINY_SD_RESOLUTION)


def test_save_pretrained_is_a_diffusers_pipeline_folder(model: TextToImageDiffusion, tmp_path: Path) -> None:
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["unet.conv_in.bias"] += 1.0  # a trained weight that must reach the folder
    live_bias = model.unet.conv_in.bias.detach().clone()
    model.save_pretrained(tmp_path / "export", state_dict=state)
    assert torch.equal(model.unet.conv_in.bias, live_bias)  # as transformers: the live model is not changed
    for part in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tmp_path / "export" / part).exists(), part

    pipe = DiffusionPipeline.from_pretrained(tmp_path / "export")
    assert isinstance(pipe, StableDiffusionPipeline) and pipe.safety_checker is None
    torch.testing.assert_close(pipe.unet.conv_in.bias, live_bias + 1.0)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (TINY_SD_RESOLUTION, TINY_SD_RESOLUTION)

    reloaded = TextToImageDiffusion.from_pretrained(tmp_path / "export")
    for key, value in state.items():
        torch.testing.assert_close(reloaded.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_save_pretrained_checks_the_state_dict(model: TextToImageDiffusion, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="outside"):
        model.save_pretrained(tmp_path / "a", state_dict={"score_head.weight": torch.zeros(1)})
    unet_only = {k: v for k, v in model.state_dict().items() if k.startswith("unet.")}
    del unet_only["unet.conv_in.bias"]
    with pytest.raises(ValueError, match="missing.*conv_in.bias"):
        model.save_pretrained(tmp_path / "b", state_dict=unet_only)


def test_load_pretrained_models_gives_the_wrapper_and_its_tokenizer(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AA_LIGHTNING_CACHE", str(tmp_path))  # built from this checkout, not an older cache
    model, tokenizer, processor = load_pretrained_models("tiny-sd")
    assert isinstance(model, TextToImageDiffusion) and processor is None
    assert tokenizer is model.tokenizer and tokenizer.model_max_length == 16
    assert tokenizer.padding_side == "right" and tokenizer.pad_token is not None
    assert model.unet.dtype == torch.float32
    same_tokenizer, none = load_tokenizer_and_processor("tiny-sd")
    assert none is None and same_tokenizer("a red cat").input_ids == tokenizer("a red cat").input_ids

    bf16, _, _ = load_pretrained_models("tiny-sd", dtype="bfloat16")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    scores = bf16(**inputs(make_batch(bf16, [1, 2]))).sum
    assert scores.dtype == torch.float32 and bool(torch.isfinite(scores).all())
    with pytest.raises(ValueError, match="no score"):
        load_pretrained_models("tiny-sd", score_model=True)


def test_lora_on_the_unet_trains_and_exports_merged(model: TextToImageDiffusion, tmp_path: Path) -> None:
    """peft on the wrapper: a target pattern under ``unet.`` keeps the frozen parts adapter-free (a bare
    ``to_q`` would also match the VAE's attention); the merged export scores like the adapted policy."""
    from peft import LoraConfig, get_peft_model

    from aa_lightning.algorithms.export import merged_lora_state_dict

    policy = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=r"unet\..*\.(to_q|to_k|to_v|to_out\.0)")
    )
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all(".unet." in n and "lora_" in n for n in trainable)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.add_(0.1)  # a trained adapter
    batch = inputs(make_batch(model, [4, 5]))
    with torch.no_grad():
        adapted = policy(**batch).sum
        with policy.disable_adapter():
            base = policy(**batch).sum
    assert not torch.allclose(adapted, base)
    policy.get_base_model().save_pretrained(tmp_path / "merged", state_dict=merged_lora_state_dict(policy))
    with torch.no_grad():
        exported = TextToImageDiffusion.from_pretrained(tmp_path / "merged")(**batch).sum
    torch.testing.assert_close(exported, adapted, rtol=1e-5, atol=1e-6)
