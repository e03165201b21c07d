"""Autoregressive image outputs (Emu3: images as discrete VQ tokens in the LM vocabulary) with the UNCHANGED
SFTModule and DPOModule: the batches of TextToImageTokensDataModule are prompt + the target image encoded
by the model's own VQ-VAE, labelled on the image and end tokens only; SFT lowers their loss, DPO raises the
chosen-minus-rejected margin, and image-mode generation decodes to an image of the trained size.

The fixture data are the text-to-image files of the diffusion tests (same formatters, same JSON).
"""

from __future__ import annotations

import math
import os
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from image_token_data import first_batch, image_token_datamodule
from PIL import Image
from quick_training import quiet_trainer as trainer
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF  # noqa: N812

from aa_lightning.algorithms import DPOModule, OptimConfig, RewardModule, SFTModule
from aa_lightning.batch import IGNORE_INDEX
from aa_lightning.data import DataSpec, TextToImageTokensDataModule
from aa_lightning.models import resolve_model_path
from aa_lightning.models.image_tokens import ImageGridConstraint
from aa_lightning.models.unwrap import unwrap
from aa_lightning.testing.tiny_image_generation import TINY_EMU3_RESOLUTION as RES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T2I = os.path.join(REPO, "configs", "data", "media", "text_to_image")
OPTIM = OptimConfig(lr=3e-3, warmup_steps=0, scheduler="constant")
GRID = RES // 8  # 4 x 4 codes -> 4 * (4 + 1) image tokens


def datamodule(name: str, template: str, kind: str, batch_size: int = 3, **kwargs: Any):
    return image_token_datamodule("tiny-emu3", name, template, kind, batch_size, resolution=RES, **kwargs)


@pytest.fixture(scope="module")
def emu3():
    """The tiny Emu3 and its processor, loaded the plain transformers way (the reference for the data side)."""
    from transformers import AutoProcessor, Emu3ForConditionalGeneration

    path = resolve_model_path("tiny-emu3")
    return Emu3ForConditionalGeneration.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)


def reference_tokens(emu3, image_path: str) -> list[int]:
    """The image's tokens by ``Emu3Model.get_image_tokens`` on the processor's pixels, + eof, eoi, eos."""
    model, processor = emu3
    image = TF.center_crop(
        TF.resize(Image.open(image_path).convert("RGB"), RES, InterpolationMode.BICUBIC), RES
    )
    pixels = processor.image_processor([image], return_tensors="pt")
    with torch.no_grad():
        ids = model.model.get_image_tokens(pixels["pixel_values"], pixels["image_sizes"]).tolist()
    tok = processor.tokenizer
    return ids + tok.convert_tokens_to_ids([tok.eof_token, tok.eoi_token, tok.eos_token])


def prompt_tokens(emu3, prompt: str) -> list[int]:
    """What the processor prompts image generation with (``return_for_image_generation``)."""
    _, processor = emu3
    inputs = processor(text=[prompt], return_for_image_generation=True, image_area=RES * RES)
    return inputs["input_ids"][0]


def test_emu3_loads_as_the_conditional_generation_model_with_a_frozen_vq_vae():
    """transformers' causal-LM auto mapping would load the text-only Emu3ForCausalLM (VQ-VAE left out)."""
    from transformers import Emu3ForConditionalGeneration

    from aa_lightning.models import load_pretrained_models

    model, tokenizer, processor = load_pretrained_models("tiny-emu3")
    assert type(model) is Emu3ForConditionalGeneration and processor is not None
    assert not any(p.requires_grad for p in model.model.vqmodel.parameters())
    assert all(p.requires_grad for p in model.model.text_model.parameters())


# -- the data side ------------------------------------------------------------------------------------------
def test_supervised_rows_are_the_generation_prompt_then_the_vq_tokens_labelled_alone(emu3):
    batch = first_batch(datamodule("prompt_image.json", "T2I-Prompt-Image", "supervised"))
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape[0] == 3 and labels.shape == ids.shape
    for row, meta in enumerate(batch["meta"]):
        prompt = prompt_tokens(emu3, meta["prompt"])
        target = reference_tokens(emu3, meta["image"])
        assert len(target) == GRID * (GRID + 1) + 3
        length = int(mask[row].sum())
        assert ids[row, :length].tolist() == prompt + target
        expected = [IGNORE_INDEX] * len(prompt) + target + [IGNORE_INDEX] * (ids.shape[1] - length)
        assert labels[row].tolist() == expected  # prompt and padding -100, image + end tokens labelled


def test_preference_rows_are_chosen_then_rejected_image_tokens_of_one_prompt(emu3):
    batch = first_batch(datamodule("pick_a_pic.json", "Pick-a-Pic", "preference", batch_size=2))
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape[0] == 4  # 2B rows: chosen [:B], rejected [B:]
    for i, meta in enumerate(batch["meta"]):
        prompt = prompt_tokens(emu3, meta["prompt"])
        for row, side in ((i, "chosen_image"), (i + 2, "rejected_image")):
            length = int(mask[row].sum())
            assert ids[row, :length].tolist() == prompt + reference_tokens(emu3, meta[side])
            assert (labels[row, : len(prompt)] == IGNORE_INDEX).all()
            assert (labels[row, len(prompt) : length] == ids[row, len(prompt) : length]).all()
        assert labels[i].tolist() != labels[i + 2].tolist()


def test_prompt_only_rows_are_left_padded_generation_prompts(emu3):
    dm = datamodule("pick_a_pic.json", "Pick-a-Pic", "prompt_only", batch_size=2)
    batch = first_batch(dm, "predict")
    assert "labels" not in batch
    for row, meta in enumerate(batch["meta"]):
        length = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, -length:].tolist() == prompt_tokens(emu3, meta["prompt"])
        assert (meta["height"], meta["width"]) == (GRID, GRID)


def test_encodings_are_cached_and_follow_the_vq_weights():
    first = datamodule("prompt_image.json", "T2I-Prompt-Image", "supervised")
    first.setup("fit")
    again = datamodule("prompt_image.json", "T2I-Prompt-Image", "supervised")
    again.setup("fit")
    assert again.datasets["train"]["input_ids"] == first.datasets["train"]["input_ids"]
    # the same cache key: the datasets cache answers instead of the VQ-VAE
    assert again.datasets["train"].cache_files == first.datasets["train"].cache_files
    other = datamodule("prompt_image.json", "T2I-Prompt-Image", "supervised")
    other.load_processing()
    with torch.no_grad():
        other.image_tokenizer.vqmodel.quantize.embedding.weight.mul_(-1.0)  # another codebook
    other.setup("fit")
    assert other.datasets["train"].cache_files != first.datasets["train"].cache_files


def test_random_flip_is_refused():
    with pytest.raises(ValueError, match="random_flip"):
        datamodule("prompt_image.json", "T2I-Prompt-Image", "supervised", random_flip=True)


# -- training with the unchanged algorithms ------------------------------------------------------------------
def test_sft_lowers_the_image_token_loss_on_a_fixed_batch():
    """Measured: token NLL of the batch 7.71 -> 4.80 in 10 steps (lr 3e-3); the VQ-VAE stays as loaded."""
    pl.seed_everything(0)
    module = SFTModule("tiny-emu3", optim=OPTIM)
    module.configure_model()
    dm = datamodule("prompt_image.json", "T2I-Prompt-Image", "supervised", batch_size=4)
    batch = first_batch(dm)

    def loss() -> float:
        with torch.no_grad():
            nll, count = module.token_nll(batch)
        return float(nll / count)

    vqmodel = unwrap(module.model).model.vqmodel
    assert not any(p.requires_grad for p in vqmodel.parameters())  # frozen: tokens, not pixels, reach the LM
    frozen = {k: v.clone() for k, v in vqmodel.state_dict().items()}
    before = loss()
    trainer(10).fit(module, dm)
    after = loss()
    assert all(torch.equal(v, vqmodel.state_dict()[k]) for k, v in frozen.items())
    assert math.isfinite(before) and after < 0.8 * before, (before, after)


def margins(module: DPOModule, dm: TextToImageTokensDataModule) -> tuple[float, float]:
    losses, values = [], []
    with torch.no_grad():
        for batch in dm.train_dataloader():
            loss, stats = module.compute_loss(batch, "val")
            losses.append(float(loss))
            values.append(stats["rewards/margins"])
    return sum(losses) / len(losses), float(torch.cat(values).mean())


def test_dpo_raises_the_margin_of_chosen_over_rejected_image_tokens():
    """Measured on the 6 Pick-a-Pic training pairs: loss log 2 -> 0.095, margin 0 -> 2.36 in 8 steps."""
    pl.seed_everything(0)
    module = DPOModule("tiny-emu3", beta=0.1, optim=OPTIM)
    module.configure_model()
    dm = datamodule("pick_a_pic.json", "Pick-a-Pic", "preference", batch_size=3)
    dm.setup("fit")
    loss_before, before = margins(module, dm)
    assert before == 0.0 and math.isclose(loss_before, math.log(2), rel_tol=1e-5)  # policy == reference
    trainer(8).fit(module, dm)
    loss_after, after = margins(module, dm)
    assert math.isfinite(loss_after) and loss_after < loss_before and after > 1.0, (loss_after, after)


def test_a_reward_model_on_the_emu3_backbone_learns_to_rank_image_tokens():
    """RewardModule unchanged: a score head on Emu3Model (text model + frozen VQ-VAE) scores the image rows."""
    pl.seed_everything(0)
    module = RewardModule("tiny-emu3", optim=OPTIM, new_score_head=True)
    module.configure_model()
    dm = datamodule("pick_a_pic.json", "Pick-a-Pic", "preference", batch_size=3)
    dm.setup("fit")

    def mean_margin() -> float:
        with torch.no_grad():
            values = [module.compute_loss(batch, "val")[1]["margin"] for batch in dm.train_dataloader()]
        return float(torch.cat(values).mean())

    before = mean_margin()
    trainer(8).fit(module, dm)
    after = mean_margin()
    assert math.isfinite(after) and after > before + 0.5, (before, after)


# -- generation in image mode ---------------------------------------------------------------------------------
def test_image_mode_generation_decodes_to_an_image_of_the_trained_size(emu3):
    model, processor = emu3
    batch = first_batch(datamodule("pick_a_pic.json", "Pick-a-Pic", "prompt_only", batch_size=2), "predict")
    height, width = batch["meta"][0]["height"], batch["meta"][0]["width"]
    grid = height * (width + 1)
    torch.manual_seed(0)
    out = model.generate(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        max_new_tokens=grid + 3,
        do_sample=True,
        prefix_allowed_tokens_fn=ImageGridConstraint(processor.tokenizer, height, width),
    )
    new = out[:, batch["input_ids"].shape[1] :]
    tok = processor.tokenizer
    assert (
        new[:, -3:].tolist() == [tok.convert_tokens_to_ids([tok.eof_token, tok.eoi_token, tok.eos_token])] * 2
    )
    visual = set(model.vocabulary_mapping.image_tokens)
    assert all(t in visual for t in new[:, :grid].reshape(-1, width + 1)[:, :-1].flatten().tolist())
    pixels = model.decode_image_tokens(image_tokens=new, height=height, width=width)
    assert pixels.shape == (2, 3, RES, RES) and torch.isfinite(pixels).all()
    images = processor.post_process_multimodal_output(pixels, generation_mode="image")
    assert [image.size for image in images] == [(RES, RES)] * 2


def test_dpo_raises_the_margin_on_held_out_pairs(tmp_path):
    """Pairs of a photo and a corrupted copy (colours inverted, half the pixels noise) as image tokens: trained
    on 6, the margin grows on 3 pairs it never saw (the diffusion family's held-out test, same files).

    Measured (12 steps, lr 3e-3, beta 0.1): held-out loss log 2 -> 0.452, margin 0 -> 0.79; the 6 trained
    pairs 3.77."""
    from test_diffusion_alignment import PHOTOS, preference_file

    train = preference_file(PHOTOS[:6], tmp_path, "train.json")
    held = preference_file(PHOTOS[6:], tmp_path, "held_out.json")

    def rows(path: str, batch_size: int) -> TextToImageTokensDataModule:
        spec = DataSpec(path, "AA_T2I")
        return TextToImageTokensDataModule(
            "tiny-emu3", kind="preference", resolution=RES, batch_size=batch_size, shuffle=False, train=spec
        )

    pl.seed_everything(0)
    module = DPOModule("tiny-emu3", beta=0.1, optim=OPTIM)
    module.configure_model()
    held_dm = rows(held, 3)
    held_dm.setup("fit")
    _, before = margins(module, held_dm)
    assert before == 0.0  # policy == reference
    trainer(12).fit(module, rows(train, 2))
    _, after = margins(module, held_dm)
    assert after > 0.5, after
