"""The `aa` LightningCLI: subcommands, --print_config, overrides, resume with --ckpt_path last."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import yaml

from aa_lightning.cli import build_cli


def tiny_args(repo_path, root, *extra):
    return [
        "--config",
        repo_path("configs", "tiny", "sft_t2t.yaml"),
        "--trainer.default_root_dir",
        root,
        "--trainer.val_check_interval",
        "2",
        *extra,
    ]


def test_print_config_resolves_links_and_overrides(repo_path, tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "aa_lightning.cli",
            "fit",
            *tiny_args(repo_path, str(tmp_path)),
            "--model.init_args.optim.lr",
            "0.123",
            "--print_config",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=repo_path(),
    ).stdout
    config = yaml.safe_load(out)
    assert config["model"]["init_args"]["optim"]["lr"] == 0.123
    assert config["checkpoint"]["save_last"] is True


def test_fit_then_resume_from_last_then_validate(repo_path, tmp_path):
    root = str(tmp_path / "run")
    cli = build_cli(["fit", *tiny_args(repo_path, root, "--trainer.max_steps", "2")])
    assert cli.trainer.global_step == 2
    assert cli.datamodule.hparams.model_name_or_path == "tiny-qwen2"  # linked from the model's
    assert os.path.exists(os.path.join(root, "checkpoints", "last.ckpt"))
    assert glob.glob(os.path.join(root, "tensorboard", "**", "events.out.tfevents.*"), recursive=True)
    cli = build_cli(["fit", *tiny_args(repo_path, root, "--trainer.max_steps", "4"), "--ckpt_path", "last"])
    assert cli.trainer.global_step == 4
    cli = build_cli(["validate", *tiny_args(repo_path, root)])
    assert "val/perplexity" in cli.trainer.callback_metrics
    export = os.path.join(root, "hf_model")
    build_cli(
        [
            "predict",
            *tiny_args(
                repo_path,
                root,
                "--model.init_args.model_name_or_path",
                export,
                "--data.init_args.predict.path",
                repo_path("configs", "data", "alpaca_val_32.json"),
                "--data.init_args.predict.template",
                "Alpaca",
                "--data.init_args.predict.size",
                "3",
            ),
        ]
    )
    with open(os.path.join(root, "predictions.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 3 and all(isinstance(r["response"], str) for r in rows)
    assert rows[0]["prompt"].endswith("assistant\n")
