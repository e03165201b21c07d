"""Media rows: the collator says which rows of each media tensor belong to which sequence, so RL code can
repeat prompts (GRPO groups), split rollouts (PPO minibatches, chunked forwards) and leave positions to
models that compute their own, without any algorithm setting that depends on the modality.

The references are independent: a batch split by sequence must hold exactly what the collator gives each
sample alone, and a minibatch's log-probs must equal its rows of the whole rollout's.
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from aa_lightning.algorithms import GenerationConfig, GRPOModule, OptimConfig, PPOModule
from aa_lightning.batch import (
    MEDIA_ROWS,
    PER_TOKEN_KEYS,
    model_inputs,
    repeat_batch_inputs,
    select_media_rows,
    select_sequences,
)
from aa_lightning.data import (
    DataSpec,
    TextAudioToTextDataModule,
    TextImageToTextDataModule,
    TextVideoToTextDataModule,
)
from aa_lightning.models.loading import load_pretrained_models
from aa_lightning.models.positions import computes_own_positions
from aa_lightning.rewards import RewardSpec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEDIA = os.path.join(REPO, "configs", "data", "media")
TEXT_KEYS = ("input_ids", "attention_mask")

# (datamodule, model, data file, template, extra args); the image file has rows with 2 images and with 1
CASES = {
    "image-qwen2-vl": (
        TextImageToTextDataModule,
        "tiny-qwen2-vl",
        "image/mllm_demo.json",
        "MLLM-Messages",
        {},
    ),
    "image-llava": (TextImageToTextDataModule, "tiny-llava", "image/mllm_demo.json", "LLaVA-Instruct", {}),
    "video-qwen2-vl": (
        TextVideoToTextDataModule,
        "tiny-qwen2-vl",
        "video/mllm_video_demo.json",
        "MLLM-Video",
        {"num_frames": 4},
    ),
    "audio-qwen2-audio": (
        TextAudioToTextDataModule,
        "tiny-qwen2-audio",
        "audio/speech_asr.json",
        "Speech-ASR",
        {},
    ),
}


def datamodule(case: str, kind: str = "prompt_only", batch_size: int = 4) -> pl.LightningDataModule:
    cls, model, path, template, extra = CASES[case]
    dm = cls(
        model,
        train=DataSpec(os.path.join(MEDIA, path), template),
        kind=kind,
        max_length=256,
        batch_size=batch_size,
        shuffle=False,
        **extra,
    )
    dm.setup("fit")
    return dm


def media_inputs(batch: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model_inputs(batch).items() if k not in TEXT_KEYS}


def unpadded(batch: dict, i: int, key: str) -> torch.Tensor:
    """Row ``i`` of a per-token input without its (left or right) padding."""
    return batch[key][i][batch["attention_mask"][i].bool()]


@pytest.mark.parametrize("kind", ["prompt_only", "supervised"])
@pytest.mark.parametrize("case", list(CASES))
def test_each_sequence_gets_exactly_the_media_rows_it_has_alone(case: str, kind: str) -> None:
    dm = datamodule(case, kind)
    data = dm._split("train")
    n = min(4, len(data))
    samples = [data[i] for i in range(n)]
    collate = dm.build_collator(kind)
    together = collate(samples)
    inputs = media_inputs(together)
    rows = together.get(MEDIA_ROWS, {})
    assert inputs, "no media input: the case tests nothing"
    for i, sample in enumerate(samples):
        alone = collate([sample])
        picked = select_sequences(inputs, torch.tensor([i]), n, rows)
        for key, expected in media_inputs(alone).items():
            if key in together.get(PER_TOKEN_KEYS, ()):  # padded differently: compare the real tokens
                assert torch.equal(unpadded(together, i, key), unpadded(alone, 0, key)), key
            else:
                assert torch.equal(picked[key], expected), (case, key, i)
    if case == "image-qwen2-vl":  # patches stacked over a batch with 2-image and 1-image rows
        assert set(rows) >= {"pixel_values", "image_grid_thw"}
        assert rows["image_grid_thw"].tolist()[:n] == [2, 1, 1, 2][:n]  # images per row of mllm_demo.json
        assert int(rows["pixel_values"].sum()) == inputs["pixel_values"].shape[0]
        assert PER_TOKEN_KEYS in together and "mm_token_type_ids" in together[PER_TOKEN_KEYS]


def test_repeating_a_batch_repeats_each_prompt_with_its_own_media_rows() -> None:
    dm = datamodule("image-qwen2-vl", batch_size=3)
    collate = dm.build_collator("prompt_only")
    data = dm._split("train")
    batch = collate([data[i] for i in range(3)])
    inputs, rows = model_inputs(batch), batch[MEDIA_ROWS]
    repeated = repeat_batch_inputs(inputs, 2, 3, rows)
    repeated_rows = select_media_rows(rows, torch.arange(3).repeat_interleave(2))
    for j in range(6):
        copy = select_sequences(repeated, torch.tensor([j]), 6, repeated_rows)
        original = select_sequences(inputs, torch.tensor([j // 2]), 3, rows)
        for key in original:
            assert torch.equal(copy[key], original[key]), (key, j)


def test_splitting_media_the_batch_does_not_describe_is_refused() -> None:
    inputs = {"input_ids": torch.ones(3, 4, dtype=torch.long), "pixel_values": torch.ones(7, 2)}
    with pytest.raises(ValueError, match="pixel_values"):
        select_sequences(inputs, torch.tensor([0, 2]), 3)
    whole = select_sequences(inputs, torch.arange(3), 3)  # the whole batch in order: nothing to split
    assert whole["pixel_values"] is inputs["pixel_values"]


@pytest.mark.parametrize(
    "name, expected",
    [("tiny-qwen2-vl", True), ("tiny-llava", False), ("tiny-qwen2-audio", False), ("tiny-qwen2", False)],
)
def test_models_that_compute_their_own_positions_are_told_apart(name: str, expected: bool) -> None:
    for score_model in (False, True):  # the policy, and a reward model / critic of the same family
        model = load_pretrained_models(name, score_model=score_model, new_score_head=score_model)[0]
        assert computes_own_positions(model) is expected, (name, score_model)


@pytest.mark.parametrize("case", ["image-qwen2-vl", "video-qwen2-vl", "image-llava"])
def test_a_minibatch_of_a_rollout_has_the_log_probs_of_its_rows_of_the_whole(case: str) -> None:
    pl.seed_everything(0)
    module = PPOModule(
        CASES[case][1],
        reward_functions=[RewardSpec("target_token_share", kwargs={"target": "e"})],
        generation=GenerationConfig(max_new_tokens=5),
        sample_log_interval=0,
    )
    module.configure_model()
    dm = datamodule(case, batch_size=3)
    batch = next(iter(dm.train_dataloader()))
    rollout = module.generate_rollout(batch, num_samples=2)
    n = len(rollout)
    assert n == 2 * batch["input_ids"].shape[0] >= 4
    with torch.no_grad():
        whole, _ = module.response_log_probs(module.model, rollout)
        for index in (torch.tensor([1]), torch.tensor([n - 1, 0]), torch.tensor([2, 1, n - 1])):
            part, _ = module.response_log_probs(module.model, rollout.select(index))
            mask = rollout.response_mask[index]
            torch.testing.assert_close(part[mask], whole[index][mask], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_qwen2_vl_rl_trains_with_several_prompts_and_minibatches(algorithm: str) -> None:
    """Two prompts a batch, rollouts split into 2 minibatches and 1-sequence forwards, Qwen2-VL images."""
    pl.seed_everything(0)
    common = dict(
        reward_functions=[RewardSpec("target_token_share", kwargs={"target": "e"})],
        generation=GenerationConfig(max_new_tokens=5),
        sample_log_interval=0,
        num_mini_batches=2,
        forward_batch_size=1,
        optim=OptimConfig(lr=1e-2, warmup_steps=0, scheduler="constant"),
    )
    if algorithm == "ppo":
        module = PPOModule("tiny-qwen2-vl", kl_coef=0.05, **common)
    else:
        module = GRPOModule("tiny-qwen2-vl", num_generations=2, beta=0.04, **common)
    dm = datamodule("image-qwen2-vl", batch_size=2)
    module.configure_model()
    before = {k: p.detach().clone() for k, p in module.model.named_parameters() if "visual" in k}
    trainer = pl.Trainer(
        max_steps=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, dm)
    assert trainer.global_step == 2
    changed = [k for k, p in module.model.named_parameters() if k in before and not torch.equal(p, before[k])]
    assert changed, "the vision tower did not train: the media did not reach the minibatch losses"
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values()), metrics


@pytest.mark.parametrize("model_name", ["tiny-qwen2-vl", "tiny-llava"])
def test_sequences_without_media_split_off_a_mixed_batch(model_name: str, tmp_path: Any) -> None:
    """A prompt with an image next to a text-only prompt: the text-only row alone gets no media input at all,
    and its log-probs equal its row of the whole rollout."""
    import json

    image = os.path.join(MEDIA, "image", "baking.jpg")
    rows = [
        {"messages": [{"role": "user", "content": "<image>What is in the picture?"}], "images": [image]},
        {"messages": [{"role": "user", "content": "What is two plus two?"}]},
    ]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(rows))
    template = "MLLM-Messages" if model_name == "tiny-qwen2-vl" else "LLaVA-Instruct"
    dm = TextImageToTextDataModule(
        model_name,
        train=DataSpec(str(path), template),
        kind="prompt_only",
        max_length=256,
        batch_size=2,
        shuffle=False,
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch[MEDIA_ROWS]["pixel_values"][1] == 0  # the text-only row owns no patch / image
    text_only = select_sequences(model_inputs(batch), torch.tensor([1]), 2, batch[MEDIA_ROWS])
    assert "pixel_values" not in text_only
    pl.seed_everything(0)
    module = PPOModule(
        model_name,
        reward_functions=[RewardSpec("target_token_share", kwargs={"target": "e"})],
        generation=GenerationConfig(max_new_tokens=4),
        sample_log_interval=0,
    )
    module.configure_model()
    rollout = module.generate_rollout(batch, num_samples=2)
    with torch.no_grad():
        whole, _ = module.response_log_probs(module.model, rollout)
        for index in (torch.tensor([2, 3]), torch.tensor([0, 3])):
            part, _ = module.response_log_probs(module.model, rollout.select(index))
            mask = rollout.response_mask[index]
            torch.testing.assert_close(part[mask], whole[index][mask], rtol=1e-4, atol=1e-4)


def test_kto_mismatched_pairs_on_qwen2_vl_repair_the_per_token_inputs_and_train() -> None:
    """KTO's KL reference point pairs prompt ``i`` with response ``i+1``: the per-token inputs
    (``mm_token_type_ids``) follow the ids, and KTO with its default ``kl_estimate`` runs on Qwen2-VL."""
    from aa_lightning.algorithms import KTOModule
    from aa_lightning.algorithms.kto import mismatched_pairs
    from aa_lightning.batch import DESIRABLE, EXTRA, LABELS

    dm = datamodule("image-qwen2-vl", kind="supervised", batch_size=3)
    batch = next(iter(dm.train_dataloader()))
    pairs = mismatched_pairs(batch, pad_token_id=0)
    assert "mm_token_type_ids" in batch[PER_TOKEN_KEYS]
    ids, types = batch["input_ids"], batch["mm_token_type_ids"]
    for i in range(3):
        j = (i + 1) % 3
        start_i = int((batch[LABELS][i] != -100).nonzero()[0])
        start_j = int((batch[LABELS][j] != -100).nonzero()[0])
        length = int(pairs["attention_mask"][i].sum())
        expected_ids = torch.cat([ids[i][:start_i], ids[j][start_j : int(batch["attention_mask"][j].sum())]])
        expected_types = torch.cat(
            [types[i][:start_i], types[j][start_j : int(batch["attention_mask"][j].sum())]]
        )
        assert torch.equal(pairs["input_ids"][i][:length], expected_ids)
        assert torch.equal(pairs["mm_token_type_ids"][i][:length], expected_types)
    pl.seed_everything(0)
    module = KTOModule("tiny-qwen2-vl", beta=0.1)
    module.configure_model()
    batch[EXTRA][DESIRABLE] = torch.tensor([True, False, True])
    with torch.no_grad():
        loss, _ = module.compute_loss(batch, "train")
    assert torch.isfinite(loss)
