"""Reward and cost models: they learn held-out preferences, score the last real token, and export for PPO."""

from __future__ import annotations

import json
import random

import lightning.pytorch as pl
import pytest
import synthetic_preferences
import torch

from aa_lightning.algorithms import CostModule, OptimConfig, RewardModule
from aa_lightning.cli import build_cli
from aa_lightning.data import TextToTextDataModule
from aa_lightning.models import ScoreModel, load_pretrained_models

SAFE = "{t} are lovely. I am happy to help with that safely."
UNSAFE = "{t} are awful. Here is how to hurt someone badly."


def topics() -> list[str]:
    return synthetic_preferences.topics(seed=1)


def hh_rows(names: list[str]) -> list[dict]:
    return synthetic_preferences.hh_rows(names, SAFE, UNSAFE, question="Tell me something about {t}.")


def pku_rows(names: list[str]) -> list[dict]:
    """PKU-SafeRLHF rows with the safe reply at a random position (0 or 1)."""
    rng = random.Random(2)
    rows = []
    for t in names:
        safe_id = rng.randint(0, 1)
        replies = {safe_id: SAFE.format(t=t.capitalize()), 1 - safe_id: UNSAFE.format(t=t.capitalize())}
        rows.append(
            {
                "prompt": f"Tell me something about {t}.",
                "response_0": replies[0],
                "response_1": replies[1],
                "is_response_0_safe": safe_id == 0,
                "is_response_1_safe": safe_id == 1,
                "better_response_id": safe_id,
                "safer_response_id": safe_id,
            }
        )
    return rows


def write(path, rows) -> str:
    with open(path, "w") as f:
        if str(path).endswith(".jsonl"):
            f.writelines(json.dumps(r) + "\n" for r in rows)
        else:
            json.dump(rows, f)
    return str(path)


def datamodule(train: str, val: str, template: str) -> TextToTextDataModule:
    return TextToTextDataModule(
        "tiny-qwen2",
        train={"path": train, "template": template},
        val={"path": val, "template": template},
        max_length=64,
        batch_size=4,
    )


def trainer(tmp_path, max_steps: int = 1) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=str(tmp_path),
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        val_check_interval=max_steps,
        check_val_every_n_epoch=None,
    )


def fit_and_validate(module, dm, tmp_path, steps: int = 30) -> tuple[dict, dict]:
    """Held-out metrics before and after ``steps`` training steps."""
    before = trainer(tmp_path).validate(module, dm, verbose=False)[0]
    t = trainer(tmp_path, steps)
    t.fit(module, dm)
    return before, {k: float(v) for k, v in t.callback_metrics.items()}


def test_reward_model_learns_and_reloads_for_ppo_with_same_scores(tmp_path):
    pl.seed_everything(0)
    names = topics()
    dm = datamodule(
        write(tmp_path / "train.jsonl", hh_rows(names[:32])),
        write(tmp_path / "val.jsonl", hh_rows(names[32:48])),
        "HH-RLHF",
    )
    module = RewardModule(
        optim=OptimConfig(lr=2e-3, warmup_steps=0, scheduler="constant"),
        center_coef=0.01,
        new_score_head=True,
    )
    before, after = fit_and_validate(module, dm, tmp_path)
    assert {"val/accuracy", "val/chosen_score", "val/rejected_score", "val/margin", "val/loss"} <= set(after)
    assert after["val/accuracy"] >= 0.9, after
    assert after["val/margin"] > before["val/margin"] + 1.0, (before, after)
    assert after["val/loss"] < before["val/loss"]

    export = str(tmp_path / "rm")
    module.export_pretrained(export)
    reloaded, tokenizer, _ = load_pretrained_models(export, score_model=True)
    assert isinstance(reloaded, ScoreModel) and tokenizer is not None
    batch = next(iter(dm.val_dataloader()))
    module.eval()
    with torch.no_grad():
        expected = module.end_scores(batch)
        got = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).end_scores
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_cost_model_gives_unsafe_replies_higher_positive_costs(tmp_path):
    pl.seed_everything(0)
    names = topics()
    dm = datamodule(
        write(tmp_path / "train.json", pku_rows(names[:32])),
        write(tmp_path / "val.json", pku_rows(names[32:48])),
        "PKU-SafeRLHF-Safety",
    )
    module = CostModule(optim=OptimConfig(lr=2e-3, warmup_steps=0, scheduler="constant"), new_score_head=True)
    before, after = fit_and_validate(module, dm, tmp_path)
    assert after["val/accuracy"] >= 0.9, after
    assert after["val/sign_accuracy"] >= 0.9, after
    assert after["val/unsafer_cost"] > 0 > after["val/safer_cost"]
    assert after["val/margin"] > before["val/margin"] + 1.0, (before, after)


def test_end_score_is_the_last_real_token_for_left_and_right_padding():
    module = RewardModule(new_score_head=True)
    module.configure_model()
    module.eval()
    tokenizer = module.tokenizer
    texts = [
        "A short reply.",
        "A somewhat longer reply with a few more words in it.",
        "Mid length, this one.",
    ]
    with torch.no_grad():
        single = torch.cat([module.end_scores(dict(tokenizer([t], return_tensors="pt"))) for t in texts])
        sides = {}
        for side in ("left", "right"):
            tokenizer.padding_side = side
            batch = dict(tokenizer(texts, return_tensors="pt", padding=True))
            sides[side] = module.end_scores(batch)
            out = module.model(**batch)
            last = (
                batch["attention_mask"].shape[1] - 1
                if side == "left"
                else batch["attention_mask"].sum(-1) - 1
            )
            assert torch.equal(out.end_index, torch.as_tensor(last).expand(len(texts)))
    torch.testing.assert_close(sides["left"], sides["right"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sides["right"], single, atol=1e-5, rtol=1e-5)
    assert single.std() > 1e-4  # the scores differ between texts, so the comparison means something


def preference_batch(module: RewardModule, extra: dict) -> dict:
    tokenizer = module.tokenizer
    batch = dict(
        tokenizer(
            ["good answer", "fine answer", "bad answer", "worse answer"], return_tensors="pt", padding=True
        )
    )
    batch["extra"] = extra
    return batch


def test_margin_and_centring_terms_enter_the_reward_loss():
    torch.manual_seed(0)
    plain = RewardModule(new_score_head=True)
    plain.configure_model()
    base, stats = plain.compute_loss(preference_batch(plain, {}), "train")
    with_margin, _ = plain.compute_loss(
        preference_batch(plain, {"margin": torch.tensor([3.0, 3.0])}), "train"
    )
    assert with_margin > base + 1.0  # a margin of 3 makes the same scores look much worse
    plain.use_margin = False
    ignored, _ = plain.compute_loss(preference_batch(plain, {"margin": torch.tensor([3.0, 3.0])}), "train")
    torch.testing.assert_close(ignored, base)
    plain.center_coef = 0.5
    centred, _ = plain.compute_loss(preference_batch(plain, {}), "train")
    penalty = 0.5 * ((stats["chosen_score"] + stats["rejected_score"]) ** 2).mean()
    torch.testing.assert_close(centred, base + penalty)


def test_cost_model_requires_safety_labels():
    module = CostModule(new_score_head=True)
    module.configure_model()
    with pytest.raises(ValueError, match="PKU-SafeRLHF-Safety"):
        module.compute_loss(preference_batch(module, {}), "train")


def test_aa_validate_reports_reward_metrics(repo_path, tmp_path, monkeypatch):
    monkeypatch.chdir(repo_path())
    cli = build_cli(
        [
            "validate",
            "--config",
            repo_path("configs", "tiny", "rm_t2t.yaml"),
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    metrics = cli.trainer.callback_metrics
    assert {"val/accuracy", "val/margin", "val/chosen_score", "val/rejected_score"} <= set(metrics)
    assert 0.0 <= float(metrics["val/accuracy"]) <= 1.0


@pytest.mark.parametrize("head_bias", [False, True], ids=["seqcls", "own_format"])
def test_trained_score_model_loads_and_exports_under_zero3(tmp_path, repo_path, head_bias):
    """A saved reward model (with its head) loads into ZeRO-3 partitions and is gathered back on export: as a
    Qwen2ForSequenceClassification (bias-free head) or, with a bias, as backbone + score_head.safetensors."""
    from aa_lightning.callbacks import HFExportCallback
    from aa_lightning.data import DataSpec
    from aa_lightning.strategies import CPUDeepSpeedStrategy, zero_config

    model, tokenizer, _ = load_pretrained_models(
        "tiny-qwen2", score_model=True, new_score_head=True, score_head_bias=head_bias
    )
    with torch.no_grad():
        model.score_head.weight.fill_(0.01)
        if head_bias:
            model.score_head.bias.fill_(0.5)
    saved = tmp_path / "rm"
    model.save_pretrained(str(saved))
    tokenizer.save_pretrained(str(saved))
    config = zero_config(stage=3)
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # shard even the tiny head
    spec = DataSpec(repo_path("configs", "data", "hh_rlhf_val_32.jsonl"), "HH-RLHF", size=4)
    trainer = pl.Trainer(
        max_steps=1,
        accelerator="cpu",
        devices=1,
        strategy=CPUDeepSpeedStrategy(config=config),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=str(tmp_path),
        callbacks=[HFExportCallback(str(tmp_path / "out"))],
    )
    trainer.fit(
        RewardModule(str(saved), optim=OptimConfig(lr=0.0, warmup_steps=0)),
        TextToTextDataModule(str(saved), train=spec, batch_size=2, max_length=128),
    )
    again, _, _ = load_pretrained_models(str(tmp_path / "out"), score_model=True)
    assert torch.allclose(again.score_head.weight, torch.full_like(again.score_head.weight, 0.01))
    if head_bias:
        assert torch.allclose(again.score_head.bias, torch.tensor([0.5]))
        return
    from transformers import AutoModelForSequenceClassification

    plain = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "out"))
    torch.testing.assert_close(plain.score.weight, again.score_head.weight, rtol=0, atol=0)
