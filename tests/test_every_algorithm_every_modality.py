"""Every algorithm on every modality: SFT, RM, DPO, SimPO, ORPO, PPO (rule reward or a multimodal reward
model) and GRPO train on text+image, text+audio and text+video with the tiny LLaVA / Qwen2-VL / Qwen2-Audio.

The algorithm modules are used unchanged: the datamodule builds the batch, every tensor of it reaches the
model, and RL generation passes the media with the prompt. Each run makes two optimizer steps and shows
finite losses and changed weights in the language model AND in the media encoder of every trained model
(so the media really entered the loss). Further: rollout log-probs equal the log-probs ``generate`` sampled
from (Qwen2-VL's M-RoPE positions and ``mm_token_type_ids`` included), the sampled responses are logged to
TensorBoard next to their image / audio / video frames, and the tiny PPO ta2t config runs through ``aa``.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from aa_lightning.algorithms import (
    DPOModule,
    GenerationConfig,
    GRPOModule,
    OptimConfig,
    ORPOModule,
    PPOModule,
    RewardModule,
    SFTModule,
    SimPOModule,
)
from aa_lightning.batch import (
    extend_per_token_inputs,
    model_inputs,
    repeat_batch_inputs,
)
from aa_lightning.callbacks import RolloutMediaLogger
from aa_lightning.data import (
    DataSpec,
    TextAudioToTextDataModule,
    TextImageToTextDataModule,
    TextVideoToTextDataModule,
)
from aa_lightning.data.media import load_audio, load_image, load_video
from aa_lightning.rewards import RewardSpec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEDIA = os.path.join(REPO, "configs", "data", "media")
E_SHARE = [RewardSpec("target_token_share", kwargs={"target": "e"})]


@dataclass(frozen=True)
class Family:
    """A modality on one tiny model family, with the data of each sample kind."""

    datamodule: type
    model: str
    media_module: str  # name part of the media encoder's parameters
    media_input: str  # the batch key that carries the media features
    data: dict[str, tuple[str, str]]  # sample kind -> (file under configs/data/media, template)
    extra: dict[str, Any] = field(default_factory=dict)


FAMILIES: dict[str, Family] = {
    "ti2t-llava": Family(
        TextImageToTextDataModule,
        "tiny-llava",
        "vision_tower",
        "pixel_values",
        {
            "supervised": ("image/mllm_demo.json", "LLaVA-Instruct"),
            "preference": ("image/aa_ti2t.json", "AA_TI2T"),
            "prompt_only": ("image/rlaif_v/detail_test_3_input.jsonl", "RLAIF-V"),
        },
    ),
    "ti2t-qwen2-vl": Family(
        TextImageToTextDataModule,
        "tiny-qwen2-vl",
        "visual",
        "pixel_values",
        {
            "supervised": ("image/mllm_demo.json", "MLLM-Messages"),
            "preference": ("image/aa_ti2t.json", "AA_TI2T"),
            "prompt_only": ("image/aa_ti2t.json", "AA_TI2T"),
        },
    ),
    "ta2t-qwen2-audio": Family(
        TextAudioToTextDataModule,
        "tiny-qwen2-audio",
        "audio_tower",
        "input_features",
        {
            "supervised": ("audio/mllm_audio_demo.json", "MLLM-Audio"),
            "preference": ("audio/aa_ta2t.json", "AA_TA2T"),
            "prompt_only": ("audio/speech_asr.json", "Speech-ASR"),
        },
    ),
    "tv2t-qwen2-vl": Family(
        TextVideoToTextDataModule,
        "tiny-qwen2-vl",
        "visual",
        "pixel_values_videos",
        {
            "supervised": ("video/mllm_video_demo.json", "MLLM-Video"),
            "preference": ("video/aa_tv2t.json", "AA_TV2T"),
            "prompt_only": ("video/mllm_video_demo.json", "MLLM-Video"),
        },
        extra={"num_frames": 4},
    ),
}
ALGORITHMS = ("sft", "rm", "dpo", "simpo", "orpo", "ppo", "ppo_reward_model", "grpo")
OPTIM = OptimConfig(lr=1e-2, warmup_steps=0, scheduler="constant")


def build_module(algorithm: str, family: Family, **overrides: Any) -> pl.LightningModule:
    """The algorithm on the family's tiny model, configured only through its documented arguments."""
    name = family.model
    rl: dict[str, Any] = dict(
        reward_functions=E_SHARE,
        generation=GenerationConfig(max_new_tokens=6),
        sample_log_interval=0,
        optim=OPTIM,
    )
    rl.update(overrides)
    if algorithm == "sft":
        return SFTModule(name, optim=OPTIM)
    if algorithm == "rm":
        return RewardModule(name, optim=OPTIM, new_score_head=True)
    if algorithm == "dpo":
        return DPOModule(name, loss_type="sigmoid", optim=OPTIM)
    if algorithm == "simpo":
        return SimPOModule(name, optim=OPTIM)
    if algorithm == "orpo":
        return ORPOModule(name, optim=OPTIM)
    if algorithm == "ppo":  # rule reward; the critic starts from the actor's weights + a new value head
        return PPOModule(name, kl_coef=0.05, **rl)
    if algorithm == "ppo_reward_model":  # the family's tiny ScoreModel scores prompt + media + response
        rl.update(reward_functions=None, reward_model_name_or_path=f"{name}-score")
        return PPOModule(name, kl_coef=0.05, **rl)
    if algorithm == "grpo":
        return GRPOModule(name, num_generations=2, beta=0.04, **rl)
    raise ValueError(algorithm)


def build_datamodule(family: Family, kind: str, batch_size: int = 2) -> pl.LightningDataModule:
    path, template = family.data[kind]
    return family.datamodule(
        family.model,
        train=DataSpec(os.path.join(MEDIA, path), template),
        kind=kind,
        max_length=256,
        batch_size=batch_size,
        shuffle=False,
        **family.extra,
    )


class Recorder(pl.Callback):
    """Logged metrics after every training batch, and the input names of every ``generate`` call."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self.generate_inputs: list[set[str]] = []

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        model = getattr(module, "model", None)
        if model is None or not hasattr(model, "generate"):
            return
        generate = model.generate

        def recorded(*args: Any, **kwargs: Any) -> Any:
            self.generate_inputs.append({k for k, v in kwargs.items() if isinstance(v, torch.Tensor)})
            return generate(*args, **kwargs)

        model.generate = recorded

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def fit(
    module: pl.LightningModule, dm: pl.LightningDataModule, *callbacks: pl.Callback, **kwargs: Any
) -> Any:
    trainer = pl.Trainer(
        max_steps=2,
        accelerator="cpu",
        devices=1,
        logger=kwargs.pop("logger", False),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=list(callbacks),
        **kwargs,
    )
    trainer.fit(module, dm)
    return trainer


# --------------------------------------------------------------------------------------------------
# the matrix
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family_name", list(FAMILIES))
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_algorithm_trains_on_modality(algorithm: str, family_name: str) -> None:
    family = FAMILIES[family_name]
    pl.seed_everything(0)
    module = build_module(algorithm, family)
    # two prompts a batch everywhere: GRPO repeats each with its own media rows (flattened patches included)
    dm = build_datamodule(family, module.data_kind, batch_size=2)
    module.configure_model()
    before = {k: p.detach().clone() for k, p in module.named_parameters() if p.requires_grad}
    assert before, "nothing to train"
    recorder = Recorder()
    trainer = fit(module, dm, recorder)
    assert trainer.global_step == 2

    losses = {k: v for k, v in recorder.rows[-1].items() if "loss" in k}
    assert losses, recorder.rows[-1]
    for row in recorder.rows:
        for key, value in row.items():
            assert math.isfinite(value), (key, value)

    after = dict(module.named_parameters())
    changed = {k for k, v in before.items() if not torch.equal(v, after[k].detach())}
    for k in changed:
        assert torch.isfinite(after[k]).all(), k
    trained_models = {k.split(".")[0] for k in before}  # model (actor / policy / score model), critic
    for prefix in trained_models:
        ours = [k for k in changed if k.startswith(prefix + ".")]
        media = [k for k in ours if f".{family.media_module}." in k]
        assert media, f"{prefix}: no media-encoder weight changed: the media did not reach the loss"
        assert len(ours) > len(media), f"{prefix}: no language-model weight changed"
    if module.data_kind == "prompt_only":
        assert len(recorder.generate_inputs) == 2  # one generate per rollout, with the media inputs
        assert all(family.media_input in keys for keys in recorder.generate_inputs), recorder.generate_inputs
        assert math.isfinite(recorder.rows[-1]["rollout/score"])
        if algorithm == "ppo_reward_model":
            assert "rollout/score/reward_model" in recorder.rows[-1]


# --------------------------------------------------------------------------------------------------
# correctness of multimodal rollouts
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family_name", list(FAMILIES))
def test_rollout_logprobs_equal_the_logprobs_generate_sampled_from(family_name: str) -> None:
    """Left-padded prompts with media + generated tokens: the training forward reproduces generate's logits.

    Covers the per-token inputs extended over the response (Qwen2-VL's ``mm_token_type_ids``) and the
    positions (1D from the mask for LLaVA / Qwen2-Audio, M-RoPE computed by Qwen2-VL itself).
    """
    family = FAMILIES[family_name]
    pl.seed_everything(0)
    module = build_module("ppo", family, generation=GenerationConfig(max_new_tokens=6, do_sample=False))
    module.configure_model()
    dm = build_datamodule(family, "prompt_only")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["attention_mask"][:, 0].min() == 0, "the test needs prompts of different lengths"
    rollout = module.generate_rollout(batch)
    prompt_length = batch["input_ids"].shape[1]
    for key, value in rollout.extra_inputs.items():  # per-token inputs now cover prompt + response
        if key in batch and batch[key].shape == batch["input_ids"].shape:
            assert value.shape == rollout.sequences.shape, key
            assert torch.equal(value[:, :prompt_length], batch[key]) and not value[:, prompt_length:].any()
    with torch.no_grad():
        logprobs, _ = module.response_log_probs(module.model, rollout)
        out = module.model.generate(
            **model_inputs(batch),
            **module.generation_kwargs(),
            output_logits=True,
            return_dict_in_generate=True,
        )
    assert torch.equal(
        out.sequences[:, prompt_length:][rollout.response_mask], rollout.response_ids[rollout.response_mask]
    )
    steps = torch.stack(out.logits, dim=1).float().log_softmax(-1)
    expected = steps.gather(-1, out.sequences[:, prompt_length:, None]).squeeze(-1)
    mask = rollout.response_mask
    torch.testing.assert_close(logprobs[mask], expected[mask], rtol=1e-4, atol=1e-4)


def test_per_token_inputs_are_extended_with_zeros_and_media_left_alone() -> None:
    ids = torch.ones(2, 5, dtype=torch.long)
    inputs = {
        "mm_token_type_ids": torch.tensor([[0, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.int32),
        "pixel_values": torch.randn(2, 5),  # float: a media tensor, even with the prompt's shape
        "image_grid_thw": torch.tensor([[1, 2, 2], [1, 2, 2]]),
        "feature_attention_mask": torch.ones(2, 30, dtype=torch.long),
    }
    out = extend_per_token_inputs(inputs, ids, 3)
    assert out["mm_token_type_ids"].tolist() == [[0, 1, 1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0]]
    assert out["mm_token_type_ids"].dtype == torch.int32
    for key in ("pixel_values", "image_grid_thw", "feature_attention_mask"):
        assert out[key] is inputs[key], key


def test_group_repeat_interleaves_batch_first_inputs_and_tiles_a_single_prompt() -> None:
    batch_first = {"input_ids": torch.tensor([[1, 2], [3, 4]]), "pixel_values": torch.tensor([[0.5], [0.25]])}
    out = repeat_batch_inputs(batch_first, 2, 2)
    assert out["input_ids"].tolist() == [[1, 2], [1, 2], [3, 4], [3, 4]]
    assert out["pixel_values"].flatten().tolist() == [0.5, 0.5, 0.25, 0.25]
    flat = {"input_ids": torch.tensor([[1, 2]]), "pixel_values": torch.arange(6.0).view(3, 2)}
    out = repeat_batch_inputs(flat, 2, 1)  # one prompt: all 3 patch rows are its own
    assert out["input_ids"].shape == (2, 2) and out["pixel_values"][:, 0].tolist() == [0, 2, 4, 0, 2, 4]
    with pytest.raises(ValueError, match="batch_size 1"):
        repeat_batch_inputs({"input_ids": torch.ones(2, 2), "pixel_values": torch.ones(5, 2)}, 2, 2)


# --------------------------------------------------------------------------------------------------
# TensorBoard: media next to the sampled responses
# --------------------------------------------------------------------------------------------------


def event_accumulator(logdir: str) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(logdir, size_guidance={"images": 0, "audio": 0, "tensors": 0, "scalars": 0})
    acc.Reload()
    return acc


@pytest.mark.parametrize(
    "family_name, algorithm, kind",
    [
        ("ti2t-llava", "ppo", "image"),
        ("ta2t-qwen2-audio", "grpo", "audio"),
        ("tv2t-qwen2-vl", "ppo", "video"),
    ],
)
def test_sampled_responses_are_logged_next_to_their_media(
    family_name: str, algorithm: str, kind: str, tmp_path: Any
) -> None:
    family = FAMILIES[family_name]
    pl.seed_everything(0)
    module = build_module(algorithm, family, sample_log_interval=1, num_logged_samples=2)
    dm = build_datamodule(family, "prompt_only")
    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    fit(module, dm, RolloutMediaLogger(), logger=logger)  # the callback the `aa` command adds to every run
    logger.experiment.flush()
    acc = event_accumulator(logger.log_dir)
    tags = acc.Tags()
    media_tags = tags["audio"] if kind == "audio" else tags["images"]
    assert f"rollout/sample_0/{kind}" in media_tags and f"rollout/sample_1/{kind}" in media_tags, tags
    text_tag = "rollout/sample_0/text/text_summary"  # add_text appends /text_summary
    assert text_tag in tags["tensors"] and "rollout/samples/text_summary" in tags["tensors"]

    dm.setup("fit")
    ref = next(iter(dm.train_dataloader()))["meta"][0][f"{kind}s"][0]  # the first prompt's media
    if kind == "audio":
        events = acc.Audio("rollout/sample_0/audio")
        expected = load_audio(ref, 16000)
        assert events[0].sample_rate == 16000 and events[0].length_frames == len(expected)
        assert len(events) == 2  # one per rollout
    else:
        from PIL import Image

        events = acc.Images(f"rollout/sample_0/{kind}")
        shown = np.asarray(Image.open(io.BytesIO(events[0].encoded_image_string)))
        if kind == "image":
            source = np.asarray(load_image(ref))
            assert shown.shape == source.shape  # 128 px fixtures: logged at full size
            assert (
                np.abs(shown.astype(int) - source.astype(int)).mean() < 3
            )  # PNG is lossless; colour = source
        else:  # the sampled frames, side by side in one image
            frames = load_video(ref, num_frames=4)
            assert (events[0].height, events[0].width) == (frames.shape[1], 4 * frames.shape[2])
            assert np.abs(shown[:, : frames.shape[2]].astype(int) - frames[0].astype(int)).mean() < 3
    text = acc.Tensors(text_tag)[0].tensor_proto.string_val[0].decode()
    assert "response" in text and "score" in text


# --------------------------------------------------------------------------------------------------
# the tiny PPO ta2t config through ``aa``
# --------------------------------------------------------------------------------------------------


def test_tiny_ppo_ta2t_config_logs_the_reward_and_the_audio(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aa_lightning.cli import build_cli

    monkeypatch.chdir(REPO)  # the config's data paths are relative to the repository
    cli = build_cli(
        [
            "fit",
            "--config",
            "configs/tiny/ppo_ta2t.yaml",
            "--trainer.max_steps",
            "2",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    assert cli.trainer.global_step == 2
    cli.trainer.logger.experiment.flush()
    acc = event_accumulator(cli.trainer.logger.log_dir)
    tags = acc.Tags()
    for key in ("rollout/score", "rollout/reward", "rollout/score/target_token_share", "train/policy_loss"):
        assert key in tags["scalars"], key
    scores = [event.value for event in acc.Scalars("rollout/score")]
    assert len(scores) == 2 and all(math.isfinite(s) and 0 <= s <= 1 for s in scores)  # a share of characters
    assert "rollout/sample_0/audio" in tags["audio"]  # sample_log_interval: 2 -> the first rollout
    assert os.path.exists(tmp_path / "hf_model" / "config.json")
