"""Online RL on image outputs (Emu3 image tokens) with the UNCHANGED GRPO / PPO modules.

The family supplies what is not text about its outputs (:mod:`aa_lightning.models.token_outputs`): rollouts
of image prompts are sampled under the token-grid constraint and decoded by the model's own VQ-VAE, so the
reward functions receive ``PIL`` images, the reward model scores the token sequence, and TensorBoard shows the
generated image. The reward for learning is ``image_color`` (closeness to pure red) on the decoded image.
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from image_token_data import first_batch, image_token_datamodule
from lightning.pytorch.loggers import TensorBoardLogger
from test_rl_modules import Recorder

from aa_lightning.algorithms import GenerationConfig, GRPOModule, OptimConfig, PPOModule
from aa_lightning.callbacks.media_logging import RolloutMediaLogger
from aa_lightning.callbacks.predictions import JsonlPredictionWriter
from aa_lightning.data import TextToImageTokensDataModule
from aa_lightning.models.unwrap import unwrap
from aa_lightning.rewards import RewardSpec, image_color
from aa_lightning.testing.tiny_image_generation import TINY_EMU3_RESOLUTION as RES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T2I = os.path.join(REPO, "configs", "data", "media", "text_to_image")
GRID = RES // 8  # 4 x 4 codes
RED = [RewardSpec("image_color", kwargs={"color": [255, 0, 0]})]


def prompts(batch_size: int = 2, split: str = "train") -> TextToImageTokensDataModule:
    """The Pick-a-Pic prompts as image prompts (RL reads them from the train split)."""
    return image_token_datamodule(
        "tiny-emu3", "pick_a_pic.json", "Pick-a-Pic", "prompt_only", batch_size, split
    )


def grpo(lr: float = 3e-2, **kwargs: Any) -> GRPOModule:
    defaults: dict[str, Any] = dict(
        reward_functions=RED,
        num_generations=4,
        beta=0.0,
        generation=GenerationConfig(max_new_tokens=8),  # the image grid overrides it (23 tokens)
        sample_log_interval=0,
        optim=OptimConfig(lr=lr, warmup_steps=0, scheduler="constant"),
    )
    return GRPOModule("tiny-emu3", **{**defaults, **kwargs})


def fit(module: pl.LightningModule, dm: pl.LightningDataModule, rollouts: int, *callbacks: Any, **kw: Any):
    trainer = pl.Trainer(
        max_steps=rollouts * module.updates_per_rollout(),
        accelerator="cpu",
        devices=1,
        logger=kw.pop("logger", False),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=list(callbacks),
        **kw,
    )
    trainer.fit(module, dm)
    return trainer


def test_rollouts_are_token_grids_decoded_to_images_for_the_rewards():
    pl.seed_everything(0)
    module = grpo()
    module.configure_model()
    batch = first_batch(prompts())
    rollout = module.generate_rollout(batch, num_samples=module.num_generations)
    tok = module.tokenizer
    ends = tok.convert_tokens_to_ids([tok.eof_token, tok.eoi_token, tok.eos_token])
    model = unwrap(module.model).eval()  # as during the rollout (dropout in the VQ decoder is off)
    visual = set(model.vocabulary_mapping.image_tokens)
    grid = GRID * (GRID + 1)
    assert rollout.response_length == grid + 3  # the grid, not max_new_tokens (8), sets the length
    assert rollout.has_eos.all() and rollout.response_mask.all()
    for row, image in zip(rollout.response_ids, rollout.responses):
        lines = row[:grid].view(GRID, GRID + 1)
        assert all(t in visual for t in lines[:, :-1].flatten().tolist())
        assert (lines[:, -1] == tok.convert_tokens_to_ids("<|extra_200|>")).all()  # end of each line
        assert row[grid:].tolist() == ends
        # the response the rewards get is the model's own decoding of those tokens
        with torch.no_grad():
            pixels = model.decode_image_tokens(image_tokens=row[None], height=GRID, width=GRID)
        expected = module.processor.postprocess(pixels, return_tensors="PIL.Image.Image")["pixel_values"][0]
        assert image.size == (RES, RES) and np.array_equal(np.asarray(image), np.asarray(expected))
    scores, parts = module.compute_scores(rollout)
    by_hand = [
        1 - np.abs(np.asarray(img.convert("RGB"), np.float32) - [255, 0, 0]).sum(-1).mean() / 765
        for img in rollout.responses
    ]
    np.testing.assert_allclose(parts["image_color"].numpy(), by_hand, rtol=1e-6)
    torch.testing.assert_close(scores, parts["image_color"])


def test_grpo_raises_the_reward_of_the_decoded_images():
    """Measured (seed 0, lr 3e-2, 4 images a prompt, 2 prompts a rollout): mean ``image_color`` 0.421 at the
    first rollout -> 0.4458 from rollout ~12 on (the policy settles on its reddest grid); about 3 s."""
    pl.seed_everything(0)
    module = grpo()
    rec = Recorder()
    fit(module, prompts(), 20, rec)
    scores = rec.series("rollout/score")
    first, last = np.mean(scores[:3]), np.mean(scores[-3:])
    assert last > first + 0.01 and last > max(scores[:3]), scores
    assert rec.rows[-1]["rollout/eos_fraction"] == 1.0  # every image closed by its end tokens


def test_ppo_trains_critic_and_actor_on_image_rollouts():
    pl.seed_everything(0)
    module = PPOModule(
        "tiny-emu3",
        reward_functions=RED,
        generation=GenerationConfig(max_new_tokens=8),
        sample_log_interval=0,
        optim=OptimConfig(lr=1e-2, warmup_steps=0, scheduler="constant"),
    )
    rec = Recorder()
    fit(module, prompts(), 3, rec)
    row = rec.rows[-1]
    for key in ("train/policy_loss", "train/value_loss", "rollout/score", "rollout/kl", "rollout/value"):
        assert key in row and np.isfinite(row[key]), key
    assert rec.rows[0]["rollout/kl"] == 0.0 and row["rollout/kl"] != 0.0  # the actor moved off the reference
    assert row["rollout/value"] != 0.0  # the critic learned (its head starts at zero)
    assert row["rollout/response_length"] == GRID * (GRID + 1) + 3


def test_a_reward_model_scores_image_rollouts_as_whole_token_sequences():
    """The same vocabulary: the sampled ids go into the Emu3-backbone score model as they are; each score
    equals that model's end score on the unpadded sequence alone."""
    pl.seed_everything(0)
    module = grpo(reward_functions=None, reward_model_name_or_path="tiny-emu3-score", reward_model_weight=1.0)
    module.configure_model()
    rollout = module.generate_rollout(first_batch(prompts()), num_samples=2)
    scores, parts = module.compute_scores(rollout)
    torch.testing.assert_close(scores, parts["reward_model"])
    assert parts["reward_model"].std() > 0  # different images, different scores
    for i in range(len(rollout)):
        seq = rollout.sequences[i][rollout.attention_mask[i].bool()][None]
        with torch.no_grad():
            alone = module.reward_model(input_ids=seq).end_scores[0]
        torch.testing.assert_close(parts["reward_model"][i], alone, rtol=1e-4, atol=1e-4)


def test_an_image_rule_refuses_a_text_response_and_a_bad_colour():
    with pytest.raises(TypeError, match="image_color.*scores generated images.*str"):
        image_color("a prompt", "a text answer", {})
    from PIL import Image

    with pytest.raises(ValueError, match="three RGB values in"):
        image_color("a prompt", Image.new("RGB", (4, 4)), {}, color=(300, 0, 0))


def test_generated_images_reach_tensorboard_next_to_the_sample_text(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pl.seed_everything(0)
    module = grpo(sample_log_interval=1, num_logged_samples=2)
    logger = TensorBoardLogger(str(tmp_path), name="run", version=0)
    fit(module, prompts(), 1, RolloutMediaLogger(), logger=logger)
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    images = events.Tags()["images"]
    assert {"rollout/sample_0/output", "rollout/sample_1/output"} <= set(images), images
    picture = events.Images("rollout/sample_0/output")[0]
    assert (picture.width, picture.height) == (RES, RES)
    texts = [t for t in events.Tags()["tensors"] if t.startswith("rollout/samples")]
    assert texts  # the table names the image by its size
    table = events.Tensors(texts[0])[0].tensor_proto.string_val[0].decode()
    assert f"(image {RES}x{RES})" in table


def test_aa_predict_writes_the_generated_images_as_png(tmp_path):
    from PIL import Image

    from aa_lightning.algorithms import SFTModule

    module = SFTModule("tiny-emu3", generation=GenerationConfig(do_sample=True, max_new_tokens=8))
    writer = JsonlPredictionWriter(str(tmp_path))
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, callbacks=[writer], enable_progress_bar=False
    )
    trainer.predict(module, datamodule=prompts(split="predict"))
    rows = [line for line in (tmp_path / "predictions.jsonl").read_text().splitlines() if line]
    assert len(rows) == 7
    files = sorted(tmp_path.glob("**/*.png"))
    assert len(files) == 7 and all(Image.open(f).size == (RES, RES) for f in files)


def test_the_trained_export_reloads_with_transformers_and_generates_images(tmp_path):
    """GRPO-trained Emu3 -> ``export_pretrained`` -> plain ``Emu3ForConditionalGeneration`` + processor:
    the same logits, and image-mode generation decodes to a 32x32 image."""
    from transformers import AutoProcessor, Emu3ForConditionalGeneration

    from aa_lightning.models.image_tokens import ImageGridConstraint

    pl.seed_everything(0)
    module = grpo()
    fit(module, prompts(), 2)
    module.export_pretrained(str(tmp_path))
    model = Emu3ForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    processor = AutoProcessor.from_pretrained(str(tmp_path))
    batch = first_batch(prompts())
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    trained = unwrap(module.model).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, trained(**inputs).logits)
        out = model.generate(
            **inputs,
            max_new_tokens=GRID * (GRID + 1) + 3,
            do_sample=True,
            prefix_allowed_tokens_fn=ImageGridConstraint(processor.tokenizer, GRID, GRID),
        )
        pixels = model.decode_image_tokens(
            image_tokens=out[:, inputs["input_ids"].shape[1] :], height=GRID, width=GRID
        )
    images = processor.post_process_multimodal_output(pixels, generation_mode="image")
    assert [image.size for image in images] == [(RES, RES)] * 2
