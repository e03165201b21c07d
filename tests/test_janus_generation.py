"""Janus image generation (codes OUTSIDE the vocabulary: own embedding, aligner and head) with the UNCHANGED
SFTModule and DPOModule, through the family's ``explain_outputs``.

The data side is checked against the tiny model's own processor and VQ-VAE loaded the plain transformers way;
the score against a hand-written incremental decode (KV cache, one code at a time, as image-mode ``generate``
runs); the export against plain ``JanusForConditionalGeneration``. The fixture data are the text-to-image
files of the diffusion and Emu3 tests.
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

from aa_lightning.algorithms import DPOModule, GenerationConfig, OptimConfig, SFTModule
from aa_lightning.algorithms.logprobs import deterministic_scores, explains_its_outputs, output_log_probs
from aa_lightning.batch import IGNORE_INDEX, IMAGE_CODES, PER_TOKEN_KEYS
from aa_lightning.data import TextToImageTokensDataModule
from aa_lightning.models import load_pretrained_models, resolve_model_path
from aa_lightning.models.janus_generation import JanusImageGeneration
from aa_lightning.models.unwrap import unwrap
from aa_lightning.testing.tiny_janus import TINY_JANUS_CODES as CODES
from aa_lightning.testing.tiny_janus import TINY_JANUS_RESOLUTION as RES

torch.set_num_threads(1)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T2I = os.path.join(REPO, "configs", "data", "media", "text_to_image")
# the codes of a random VQ-VAE are close to random: memorising them wants a higher lr than Emu3's tests (whose
# loss falls mostly on its predictable end-of-line and end tokens)
OPTIM = OptimConfig(lr=1e-2, warmup_steps=0, scheduler="constant")


def datamodule(name: str, template: str, kind: str, batch_size: int = 3, **kwargs: Any):
    return image_token_datamodule("tiny-janus", name, template, kind, batch_size, resolution=RES, **kwargs)


@pytest.fixture(scope="module")
def janus():
    """The tiny Janus and its processor, loaded the plain transformers way (the reference for every check)."""
    from transformers import AutoProcessor, JanusForConditionalGeneration

    path = resolve_model_path("tiny-janus")
    return JanusForConditionalGeneration.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)


def reference_codes(janus, image_path: str) -> list[int]:
    """``JanusVQVAE.encode(...).image_tokens`` of the processor's pixels for the resized, cropped image."""
    model, processor = janus
    image = TF.center_crop(
        TF.resize(Image.open(image_path).convert("RGB"), RES, InterpolationMode.BICUBIC), RES
    )
    pixels = processor.image_processor([image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return model.model.vqmodel.encode(pixels).image_tokens.tolist()


def prompt_ids(janus, prompt: str) -> list[int]:
    """The prompt of transformers' documented recipe: chat template, then ``generation_mode="image"``."""
    _, processor = janus
    turn = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(turn, add_generation_prompt=True)
    return processor(text=[text], generation_mode="image")["input_ids"][0].tolist()


def test_janus_loads_as_the_image_generation_family_with_the_understanding_path_frozen():
    model, _, processor = load_pretrained_models("tiny-janus")
    assert type(model) is JanusImageGeneration and processor is not None
    assert explains_its_outputs(model) and deterministic_scores(model)
    for frozen in (model.model.vqmodel, model.model.vision_model, model.model.aligner):
        assert not any(p.requires_grad for p in frozen.parameters())
    for trained in (
        model.model.language_model,
        model.model.generation_embeddings,
        model.model.generation_aligner,
        model.model.generation_head,
    ):
        assert all(p.requires_grad for p in trained.parameters())


# -- the data side ------------------------------------------------------------------------------------------
def test_supervised_rows_are_the_generation_prompt_then_one_placeholder_per_vq_code(janus):
    model, processor = janus
    batch = first_batch(datamodule("prompt_image.json", "T2I-Prompt-Image", "supervised"))
    ids, labels, codes, mask = (
        batch["input_ids"],
        batch["labels"],
        batch[IMAGE_CODES],
        batch["attention_mask"],
    )
    assert batch[PER_TOKEN_KEYS] == [IMAGE_CODES] and codes.shape == labels.shape == ids.shape
    placeholder = model.config.image_token_id
    for row, meta in enumerate(batch["meta"]):
        prompt = prompt_ids(janus, meta["prompt"])
        target = reference_codes(janus, meta["image"])
        assert len(target) == CODES and prompt[0] == processor.tokenizer.bos_token_id
        length = int(mask[row].sum())
        assert ids[row, :length].tolist() == prompt + [placeholder] * CODES
        expected = [IGNORE_INDEX] * len(prompt) + target + [IGNORE_INDEX] * (ids.shape[1] - length)
        assert labels[row].tolist() == expected and codes[row].tolist() == expected


def test_preference_rows_are_chosen_then_rejected_codes_of_one_prompt(janus):
    batch = first_batch(datamodule("pick_a_pic.json", "Pick-a-Pic", "preference", batch_size=2))
    codes, mask = batch[IMAGE_CODES], batch["attention_mask"]
    assert codes.shape[0] == 4  # 2B rows: chosen [:B], rejected [B:]
    for i, meta in enumerate(batch["meta"]):
        prompt = prompt_ids(janus, meta["prompt"])
        for row, side in ((i, "chosen_image"), (i + 2, "rejected_image")):
            length = int(mask[row].sum())
            assert codes[row, :length].tolist() == [IGNORE_INDEX] * len(prompt) + reference_codes(
                janus, meta[side]
            )
        assert codes[i].tolist() != codes[i + 2].tolist()


def test_prompt_only_rows_are_left_padded_generation_prompts_without_codes(janus):
    batch = first_batch(datamodule("pick_a_pic.json", "Pick-a-Pic", "prompt_only", batch_size=2), "predict")
    assert "labels" not in batch and IMAGE_CODES not in batch
    for row, meta in enumerate(batch["meta"]):
        length = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, -length:].tolist() == prompt_ids(janus, meta["prompt"])


def test_a_processor_whose_images_do_not_give_the_models_code_grid_is_refused_before_any_row():
    from transformers import AutoProcessor

    from aa_lightning.data.text_to_image_tokens import JanusCodeEncoder
    from aa_lightning.models.image_tokens import JanusImageTokenizer

    path = resolve_model_path("tiny-janus")
    processor = AutoProcessor.from_pretrained(path)
    processor.image_processor.size = {
        "height": 2 * RES,
        "width": 2 * RES,
    }  # 8 x 8 codes; the model makes 4 x 4
    with pytest.raises(ValueError, match="64x64 images, 8x8 codes, but the VQ-VAE decodes .* 4x4 grid"):
        JanusCodeEncoder(processor, JanusImageTokenizer.from_pretrained(path), RES, 512)


# -- the score ------------------------------------------------------------------------------------------------
def incremental_log_probs(model, prompt: list[int], codes: list[int]) -> float:
    """Sum of log p(code_i | prompt, codes_<i): the prompt through the LM once, then each code fed back through
    generation_embeddings -> generation_aligner with the KV cache, scored by generation_head (generate's loop)."""
    from transformers import DynamicCache

    lm, cache, total = model.model.language_model, DynamicCache(), 0.0
    embeds = model.get_input_embeddings()(torch.tensor([prompt]))
    for code in codes:
        hidden = lm(inputs_embeds=embeds, cache=cache, use_cache=True).last_hidden_state[:, -1]
        total += float(model.model.generation_head(hidden).log_softmax(-1)[0, code])
        embeds = model.prepare_embeddings_for_image_generation(torch.tensor([[code]]))
    return total


def test_explain_outputs_is_the_teacher_forced_code_log_likelihood_of_generate(janus):
    """Padded rows scored at once equal each row decoded alone (max abs difference measured: ~4e-6 of ~66)."""
    model, _ = janus
    family = JanusImageGeneration.from_pretrained(resolve_model_path("tiny-janus")).eval()
    batch = first_batch(datamodule("prompt_image.json", "T2I-Prompt-Image", "supervised"))
    with torch.no_grad():
        scores = output_log_probs(family, batch)
        expected = []
        for row in range(batch["input_ids"].shape[0]):
            keep = batch["attention_mask"][row].bool()
            codes = batch[IMAGE_CODES][row][keep]
            is_code = codes != IGNORE_INDEX
            expected.append(
                incremental_log_probs(
                    model, batch["input_ids"][row][keep][~is_code].tolist(), codes[is_code].tolist()
                )
            )
    assert scores.token_count.tolist() == [CODES] * 3
    assert torch.allclose(scores.sum, torch.tensor(expected), atol=1e-4), (scores.sum, expected)
    assert all(-70 < value < -60 for value in expected)  # a random head: near 16 * log(1/64) = -66.5


# -- training with the unchanged algorithms ------------------------------------------------------------------
def test_sft_lowers_the_image_code_loss_on_a_fixed_batch():
    """Measured: code NLL of the batch 4.155 (log 64 = 4.159) -> 2.68 per code in 40 steps (lr 1e-2; 3.40 after
    10 steps at lr 3e-3, 0.89 after 100 at 1e-2); the VQ-VAE unchanged, the generation head trained."""
    pl.seed_everything(0)
    module = SFTModule("tiny-janus", optim=OPTIM)
    module.configure_model()
    dm = datamodule("prompt_image.json", "T2I-Prompt-Image", "supervised", batch_size=4)
    batch = first_batch(dm)

    def loss() -> float:
        with torch.no_grad():
            nll, count = module.token_nll(batch)
        return float(nll / count)

    inner = unwrap(module.model).model
    frozen = {k: v.clone() for k, v in inner.vqmodel.state_dict().items()}
    head = inner.generation_head.vision_head.weight.clone()
    before = loss()
    trainer(40).fit(module, dm)
    after = loss()
    assert all(torch.equal(v, inner.vqmodel.state_dict()[k]) for k, v in frozen.items())
    assert not torch.equal(head, inner.generation_head.vision_head.weight)  # the image head trained
    assert math.isclose(before, math.log(64), rel_tol=0.02) and after < 0.75 * before, (before, after)


def margins(module: DPOModule, dm: TextToImageTokensDataModule) -> tuple[float, float]:
    losses, values = [], []
    with torch.no_grad():
        for batch in dm.train_dataloader():
            loss, stats = module.compute_loss(batch, "val")
            losses.append(float(loss))
            values.append(stats["rewards/margins"])
    return sum(losses) / len(losses), float(torch.cat(values).mean())


def test_dpo_raises_the_margin_of_chosen_over_rejected_codes():
    """Measured on the 6 Pick-a-Pic training pairs: loss log 2 -> 0.253, margin 0 -> 2.57 in 8 steps (lr 1e-2;
    at lr 3e-3: 0.575 and 0.26 after 8 steps, 0.179 and 1.91 after 16)."""
    pl.seed_everything(0)
    module = DPOModule("tiny-janus", beta=0.1, optim=OPTIM)
    module.configure_model()
    dm = datamodule("pick_a_pic.json", "Pick-a-Pic", "preference", batch_size=3)
    dm.setup("fit")
    loss_before, before = margins(module, dm)
    assert before == 0.0 and math.isclose(loss_before, math.log(2), rel_tol=1e-6)  # policy == reference
    trainer(8).fit(module, dm)
    loss_after, after = margins(module, dm)
    assert math.isfinite(loss_after) and loss_after < 0.5 and after > 1.0, (loss_after, after)


# -- generation and export ------------------------------------------------------------------------------------
def plain_images(
    model, processor, input_ids: torch.Tensor, mask: torch.Tensor, seed: int
) -> list[Image.Image]:
    """transformers' documented recipe, row by row: generate(generation_mode="image"), decode, postprocess."""
    out = []
    for row in range(input_ids.shape[0]):
        ids = input_ids[row][mask[row].bool()][None]
        torch.manual_seed(seed + row)
        codes = model.generate(
            inputs=ids,
            attention_mask=torch.ones_like(ids),
            generation_mode="image",
            do_sample=True,
            guidance_scale=5.0,
        )
        pixels = list(model.decode_image_tokens(codes).permute(0, 3, 1, 2).float())
        # uint8 tensors; its return_tensors="PIL.Image.Image" (the documented call) fails in transformers 5.24
        out += [TF.to_pil_image(image) for image in processor.postprocess(pixels)["pixel_values"]]
    return out


def test_generate_outputs_are_the_documented_image_mode_recipe_at_the_trained_size(janus):
    model, processor = janus
    family = JanusImageGeneration.from_pretrained(resolve_model_path("tiny-janus")).train()
    batch = first_batch(datamodule("pick_a_pic.json", "Pick-a-Pic", "prompt_only", batch_size=2), "predict")
    # top_k 50: what transformers applies when generate is given none (aa's default 0 means no top-k)
    generation = GenerationConfig(do_sample=True, guidance_scale=5.0, seed=7, top_k=50)
    images = family.generate_outputs(batch["input_ids"], batch["attention_mask"], generation=generation)
    assert [image.size for image in images] == [(RES, RES)] * 2
    assert family.training and not family.model.vqmodel.training  # sampled in eval mode, mode restored
    expected = plain_images(model, processor, batch["input_ids"], batch["attention_mask"], seed=7)
    for got, want in zip(images, expected):
        diff = (torch.tensor(list(got.getdata())) - torch.tensor(list(want.getdata()))).abs().max()
        assert int(diff) <= 1, diff  # same codes; float rounding may move a pixel by one level


def test_the_export_reloads_with_plain_transformers_and_generates(tmp_path):
    from transformers import AutoProcessor, JanusForConditionalGeneration

    pl.seed_everything(0)
    module = SFTModule("tiny-janus", optim=OPTIM)
    module.configure_model()
    trainer(2).fit(module, datamodule("prompt_image.json", "T2I-Prompt-Image", "supervised", batch_size=4))
    module.export_pretrained(str(tmp_path))
    plain = JanusForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    assert plain.config.architectures == ["JanusForConditionalGeneration"]
    trained = unwrap(module.model).state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in plain.state_dict().items())
    processor = AutoProcessor.from_pretrained(str(tmp_path))
    ids = torch.tensor([prompt_ids((plain, processor), "a red apple")])
    codes = plain.generate(
        inputs=ids, attention_mask=torch.ones_like(ids), generation_mode="image", do_sample=True
    )
    assert codes.shape == (1, CODES) and plain.decode_image_tokens(codes).shape == (1, RES, RES, 3)


def test_online_rl_on_janus_is_refused_with_the_reason():
    """Janus's family scores whole outputs (its forward is explain_outputs): no per-token log-probs for RL."""
    from aa_lightning.algorithms import GRPOModule
    from aa_lightning.rewards import RewardSpec

    module = GRPOModule("tiny-janus", reward_functions=[RewardSpec("image_color")])
    with pytest.raises(ValueError, match="scores whole outputs itself"):
        module.configure_model()
