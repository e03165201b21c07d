"""DPO family and KTO: each method learns a small preference task; precomputed = live reference; tiny CLI runs.

The task: prompts ask about a topic; preferred replies share one fixed phrasing, dispreferred replies
another. Training pairs and held-out pairs use disjoint topics, so the held-out check needs the policy to
generalise the phrasing, not memorise rows.
"""

from __future__ import annotations

import glob
import json
import math
import os

import lightning.pytorch as pl
import pytest
import synthetic_preferences
import torch

from aa_lightning.algorithms import (
    DPOModule,
    KTOModule,
    LoraConfig,
    OptimConfig,
    ORPOModule,
    ReferenceFreeModule,
    SimPOModule,
)
from aa_lightning.algorithms.base import AlignModule
from aa_lightning.algorithms.kto import mismatched_pairs
from aa_lightning.algorithms.logprobs import sequence_log_probs
from aa_lightning.cli import build_cli
from aa_lightning.data import TextToTextDataModule
from aa_lightning.models import load_pretrained_models

GOOD = "{t} are lovely. Sure, I am happy to help!"
BAD = "{t} are awful. No, go away now."


def topics() -> list[str]:
    return synthetic_preferences.topics(seed=0)


def hh_rows(names: list[str]) -> list[dict]:
    return synthetic_preferences.hh_rows(names, GOOD, BAD, question="Tell me something about {t}, please.")


def kto_rows(names: list[str]) -> list[dict]:
    """Unpaired rows: each topic appears once, alternately with the good or the bad reply."""
    rows = []
    for i, t in enumerate(names):
        desirable = i % 2 == 0
        reply = (GOOD if desirable else BAD).format(t=t.capitalize())
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"Tell me something about {t}, please."},
                    {"role": "assistant", "content": reply},
                ],
                "label": desirable,
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


@pytest.fixture
def pair_files(tmp_path) -> dict[str, str]:
    names = topics()
    return {
        "train": write(tmp_path / "train.jsonl", hh_rows(names[:32])),
        "val": write(tmp_path / "val.jsonl", hh_rows(names[32:48])),
        "kto_train": write(tmp_path / "kto_train.json", kto_rows(names[:48])),
    }


def datamodule(
    train: str, val: str | None = None, template: str = "HH-RLHF", **kwargs
) -> TextToTextDataModule:
    return TextToTextDataModule(
        "tiny-qwen2",
        train={"path": train, "template": template},
        val={"path": val, "template": template} if val else None,
        max_length=64,
        batch_size=kwargs.pop("batch_size", 4),
        **kwargs,
    )


def trainer(tmp_path, max_steps: int, callbacks=(), **kwargs) -> pl.Trainer:
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
        callbacks=list(callbacks),
        **kwargs,
    )


@torch.no_grad()
def held_out_log_ratio(model: torch.nn.Module, val_file: str) -> torch.Tensor:
    """Per held-out pair: ``log p(chosen) - log p(rejected)`` (summed over reply tokens) under ``model``."""
    dm = datamodule(val_file, kind="preference")
    dm.setup("fit")
    model.eval()
    out = []
    for batch in dm.train_dataloader():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logps = sequence_log_probs(logits, batch["labels"]).sum
        half = logps.shape[0] // 2
        out.append(logps[:half] - logps[half:])
    return torch.cat(out)


METHODS = {
    "dpo": lambda: DPOModule(beta=0.1, optim=OptimConfig(lr=2e-3, warmup_steps=0, scheduler="constant")),
    "ipo": lambda: DPOModule(
        beta=0.1, loss_type="ipo", optim=OptimConfig(lr=2e-3, warmup_steps=0, scheduler="constant")
    ),
    "hinge": lambda: DPOModule(
        beta=0.1, loss_type="hinge", optim=OptimConfig(lr=2e-3, warmup_steps=0, scheduler="constant")
    ),
    "cdpo": lambda: DPOModule(
        beta=0.1, label_smoothing=0.1, optim=OptimConfig(lr=2e-3, warmup_steps=0, scheduler="constant")
    ),
    "simpo": lambda: SimPOModule(optim=OptimConfig(lr=2e-3, warmup_steps=0, scheduler="constant")),
    "orpo": lambda: ORPOModule(
        orpo_lambda=1.0, optim=OptimConfig(lr=2e-3, warmup_steps=0, scheduler="constant")
    ),
    "kto": lambda: KTOModule(beta=0.1, optim=OptimConfig(lr=2e-3, warmup_steps=0, scheduler="constant")),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_method_learns_held_out_preference(method, pair_files, tmp_path):
    """After 30 steps the policy prefers held-out chosen replies far more than the initial model did."""
    pl.seed_everything(0)
    module = METHODS[method]()
    if method == "kto":
        dm = datamodule(pair_files["kto_train"], template="KTO", train_on="last_assistant")
    else:
        dm = datamodule(pair_files["train"], pair_files["val"])
    initial, _, _ = load_pretrained_models("tiny-qwen2")
    before = held_out_log_ratio(initial, pair_files["val"])
    validation = {} if method == "kto" else {"val_check_interval": 30, "check_val_every_n_epoch": None}
    t = trainer(tmp_path, 30, **validation)
    t.fit(module, dm)
    after = held_out_log_ratio(module.model, pair_files["val"])
    gain = after - before
    assert gain.mean() > 2.0, f"{method}: held-out log-ratio gain only {gain.mean():.2f} nats"
    assert (gain > 0).float().mean() >= 0.9, (
        f"{method}: gain positive on {(gain > 0).float().mean():.0%} of pairs"
    )
    if method in ("dpo", "ipo", "hinge", "cdpo"):
        # the module's own held-out metrics (implicit rewards vs the reference) say the same
        assert t.callback_metrics["val/rewards/accuracies"] >= 0.9
        assert t.callback_metrics["val/rewards/margins"] > 0
    if method in ("simpo", "orpo"):
        assert {"val/rewards/margins", "val/logps/chosen", "val/loss"} <= set(t.callback_metrics)
    if method == "orpo":
        assert "val/log_odds_ratio" in t.callback_metrics
    if method == "kto":
        assert t.callback_metrics["train/rewards/margins"] > 0


class StepLosses(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.reference_loaded: list[bool] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        self.reference_loaded.append(pl_module.reference_model is not None)


def test_precomputed_reference_log_probs_match_live_reference(pair_files, tmp_path, monkeypatch):
    """Same losses with a live reference and with cached reference log-probs; a restart reuses the disk cache."""
    cache_dir = str(tmp_path / "ref_cache")

    def run(precompute: bool) -> StepLosses:
        pl.seed_everything(0)
        module = DPOModule(
            beta=0.5,
            precompute_ref_log_probs=precompute,
            ref_cache_dir=cache_dir,
            optim=OptimConfig(lr=2e-3, warmup_steps=0, scheduler="constant"),
        )
        recorder = StepLosses()
        trainer(tmp_path, 6, [recorder], val_check_interval=3).fit(
            module, datamodule(pair_files["train"], pair_files["val"])
        )
        assert {"val/rewards/accuracies", "val/loss"} <= set(trainer_metrics(module))
        return recorder

    live = run(False)
    assert all(live.reference_loaded)
    cached = run(True)
    assert not any(cached.reference_loaded), "the reference model stayed in memory during training"
    assert abs(live.losses[-1] - math.log(2)) > 1e-2  # the policy has moved: the comparison is not trivial
    torch.testing.assert_close(torch.tensor(cached.losses), torch.tensor(live.losses), atol=1e-4, rtol=1e-4)
    assert sorted(os.listdir(cache_dir)) and all(name.endswith(".pt") for name in os.listdir(cache_dir))

    loads: list[str | None] = []
    original = AlignModule.load_model

    def counting_load(self, name_or_path=None, **kwargs):
        loads.append(name_or_path)
        return original(self, name_or_path, **kwargs)

    monkeypatch.setattr(AlignModule, "load_model", counting_load)
    restarted = run(True)
    assert len(loads) == 1, "the restart reloaded a reference model instead of reading the cached log-probs"
    torch.testing.assert_close(
        torch.tensor(restarted.losses), torch.tensor(live.losses), atol=1e-4, rtol=1e-4
    )


def trainer_metrics(module: pl.LightningModule) -> dict:
    return dict(module.trainer.callback_metrics)


def test_dpo_scores_chosen_and_rejected_in_one_policy_forward(pair_files):
    module = DPOModule()
    module.configure_model()
    calls = []
    module.model.register_forward_hook(lambda *_: calls.append(1))
    dm = datamodule(pair_files["train"], kind="preference")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    loss, stats = module.compute_loss(batch, "train")
    assert len(calls) == 1
    assert loss.requires_grad
    assert math.isclose(float(loss), math.log(2), abs_tol=1e-5)  # policy == reference at the start
    assert stats["rewards/chosen"].shape == (4,)


def test_separate_reference_model_is_used(pair_files):
    """``ref_model_name_or_path`` loads another checkpoint: the initial DPO loss is no longer log 2."""
    module = DPOModule(ref_model_name_or_path="tiny-llama")
    module.configure_model()
    dm = datamodule(pair_files["train"], kind="preference")
    dm.setup("fit")
    loss, _ = module.compute_loss(next(iter(dm.train_dataloader())), "train")
    assert abs(float(loss) - math.log(2)) > 1e-3
    assert type(module.reference_model).__name__.startswith("Llama")


def test_mismatched_pairs_join_each_prompt_with_the_next_response():
    ids = torch.tensor([[1, 2, 3, 4, 0, 0], [5, 6, 7, 8, 9, 0], [10, 11, 12, 0, 0, 0]])
    mask = (ids != 0).long()
    labels = torch.tensor(
        [[-100, -100, 3, 4, -100, -100], [-100, 6, 7, 8, 9, -100], [-100, -100, 12, -100, -100, -100]]
    )
    pixel_values = torch.randn(3, 2)
    out = mismatched_pairs(
        {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixel_values}
    )
    assert out["input_ids"].tolist() == [[1, 2, 6, 7, 8, 9], [5, 12, 0, 0, 0, 0], [10, 11, 3, 4, 0, 0]]
    assert out["labels"].tolist() == [
        [-100, -100, 6, 7, 8, 9],
        [-100, 12, -100, -100, -100, -100],
        [-100, -100, 3, 4, -100, -100],
    ]
    assert out["attention_mask"].sum(-1).tolist() == [6, 2, 4]
    assert out["pixel_values"] is pixel_values  # media stay with their prompts
    with pytest.raises(ValueError, match="token_type_ids"):
        mismatched_pairs({"input_ids": ids, "attention_mask": mask, "labels": labels, "token_type_ids": ids})


def test_dpo_rejects_inconsistent_options():
    with pytest.raises(ValueError, match="label_smoothing"):
        DPOModule(loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="loss_type"):
        ReferenceFreeModule(loss_type="dpo")  # type: ignore[arg-type]


def test_reference_free_module_is_a_deprecated_alias_of_the_named_modules():
    """Configs and code written for ``ReferenceFreeModule(loss_type=...)`` get SimPO / ORPO with their args."""
    with pytest.warns(DeprecationWarning, match="SimPOModule"):
        simpo = ReferenceFreeModule(loss_type="simpo", beta=3.0, orpo_lambda=0.5)
    assert type(simpo) is SimPOModule and simpo.beta == 3.0 and simpo.gamma == 1.0
    with pytest.warns(DeprecationWarning, match="ORPOModule"):
        orpo = ReferenceFreeModule(loss_type="orpo", orpo_lambda=0.5, beta=3.0)
    assert type(orpo) is ORPOModule and orpo.orpo_lambda == 0.5


TINY_CONFIGS = ["rm", "cost", "dpo", "simpo", "orpo", "kto"]


@pytest.mark.parametrize("name", TINY_CONFIGS)
def test_tiny_config_runs_via_cli_and_logs_tensorboard(name, repo_path, tmp_path, monkeypatch):
    monkeypatch.chdir(repo_path())  # the configs name their data relative to the repository
    root = str(tmp_path / "run")
    cli = build_cli(
        [
            "fit",
            "--config",
            repo_path("configs", "tiny", f"{name}_t2t.yaml"),
            "--trainer.max_steps",
            "3",
            "--trainer.default_root_dir",
            root,
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    assert cli.trainer.global_step == 3
    assert glob.glob(os.path.join(root, "**", "events.out.tfevents.*"), recursive=True)
    assert any(key.startswith("train/") for key in cli.trainer.callback_metrics)
    assert os.path.exists(os.path.join(root, "hf_model", "config.json"))


def test_lora_reference_is_the_policy_with_adapters_off(pair_files):
    """With LoRA no second model is loaded: the reference is the base model under the adapters."""
    module = DPOModule(lora=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    module.configure_model()
    assert module.reference_model is None
    dm = datamodule(pair_files["train"], kind="preference")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    for name, param in module.model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.05)  # move the policy away from the base
    loss, _ = module.compute_loss(batch, "train")
    assert abs(float(loss) - math.log(2)) > 1e-4
    base, _, _ = load_pretrained_models("tiny-qwen2")
    with torch.no_grad():
        logits = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = sequence_log_probs(logits, batch["labels"]).sum
    torch.testing.assert_close(module.reference_log_probs_live(batch).sum, expected, atol=1e-4, rtol=1e-4)


def test_configs_naming_reference_free_module_still_parse(repo_path, tmp_path, capsys):
    """A config written for the deprecated class (class_path + loss_type) still parses on the command line."""
    from aa_lightning.cli import build_cli

    text = open(repo_path("configs", "tiny", "orpo_t2t.yaml")).read()
    old = text.replace("aa_lightning.algorithms.ORPOModule", "aa_lightning.algorithms.ReferenceFreeModule")
    old = old.replace("    orpo_lambda: 0.1\n", "    loss_type: orpo\n    orpo_lambda: 0.1\n")
    path = tmp_path / "old_orpo.yaml"
    path.write_text(old)
    with pytest.raises(SystemExit) as info:
        build_cli(["fit", "--config", str(path), "--print_config"])
    assert info.value.code in (0, None), capsys.readouterr().err[-2000:]
    assert "loss_type: orpo" in capsys.readouterr().out
