"""`aa list` names everything the registries hold; `aa fit --help` shows the way to an algorithm's arguments."""

from __future__ import annotations

import inspect
import re
import sys

import lightning.pytorch as pl
import pytest
from lightning.pytorch.strategies import StrategyRegistry

import aa_lightning.algorithms as algorithms
import aa_lightning.data as data
from aa_lightning import cli, listing
from aa_lightning.data import available_templates
from aa_lightning.models.embedded import EMBEDDED_MODELS
from aa_lightning.models.registry import MODEL_REGISTRY
from aa_lightning.rewards import available_rewards, register_reward
from aa_lightning.rewards.registry import _REGISTRY as REWARDS
from aa_lightning.testing.tiny_builders import TINY_BUILDERS


def run_aa(monkeypatch, capsys, *args: str) -> str:
    """``aa ARGS`` through the console script's entry point; its standard output."""
    monkeypatch.setattr(sys, "argv", ["aa", *args])
    try:
        cli.main()
    except SystemExit as stop:
        assert stop.code in (0, None), capsys.readouterr()
    return capsys.readouterr().out


def listed(out: str) -> dict[str, set[str]]:
    """Section name -> the names listed under it."""
    found: dict[str, set[str]] = {}
    section = ""
    for line in out.splitlines():
        if line and not line.startswith(" "):
            section = line.split(" (")[0]
            found[section] = set()
        elif line.strip():
            found[section].add(line.split()[0])
    return found


def classes(module, base) -> set[str]:
    return {
        n
        for n in module.__all__
        if inspect.isclass(getattr(module, n)) and issubclass(getattr(module, n), base)
    }


def test_aa_list_names_every_registered_name(monkeypatch, capsys):
    @register_reward("aa_list_probe")
    def probe(prompt: str, response: str, meta: dict) -> float:
        """A reward made by this test."""
        return 0.0

    try:
        found = listed(run_aa(monkeypatch, capsys, "list"))
    finally:
        REWARDS.pop("aa_list_probe")
    assert found["algorithms"] == classes(algorithms, pl.LightningModule) - {"AlignModule"}
    assert {"SFTModule", "DPOModule", "GRPOModule", "PPOModule"} <= found["algorithms"]
    assert found["datamodules"] == classes(data, pl.LightningDataModule)
    assert found["templates"] == set(available_templates()) and "Alpaca" in found["templates"]
    assert found["rewards"] == {*available_rewards(), "aa_list_probe"}  # registered now, listed now
    assert found["strategies"] == set(StrategyRegistry.available_strategies())
    assert {"ddp", "deepspeed_stage_3", "deepspeed_cpu_stage_3"} <= found["strategies"]
    assert found["models"] == {*TINY_BUILDERS, *EMBEDDED_MODELS}
    assert found["model-types"] == set(MODEL_REGISTRY.names())
    assert {"hf", "vllm"} <= found["rollout-engines"]


def test_aa_list_shows_first_docstring_lines(monkeypatch, capsys):
    @register_reward("aa_list_probe")
    def probe(prompt: str, response: str, meta: dict) -> float:
        """A reward made by ``this`` test,
        over two lines.

        Not this paragraph."""
        return 0.0

    try:
        out = run_aa(monkeypatch, capsys, "list", "rew")
    finally:
        REWARDS.pop("aa_list_probe")
    assert out.startswith("rewards (")
    # the name column is as wide as the longest registered name (other tests in this process may add some)
    assert re.search(r"\n  aa_list_probe +A reward made by this test, over two lines\.\n", out), out
    assert "Not this paragraph" not in out and "algorithms" not in out
    with pytest.raises(SystemExit):
        listing.main(["nosuch"])
    assert "unknown section 'nosuch'" in capsys.readouterr().err


def test_fit_help_names_the_class_help(monkeypatch, capsys):
    out = run_aa(monkeypatch, capsys, "fit", "--help")
    assert "--model.help SFTModule" in out.replace("\n", " ")
    assert "aa list" in out


def test_model_help_by_short_name_lists_the_algorithm_arguments(monkeypatch, capsys):
    out = run_aa(monkeypatch, capsys, "fit", "--model.help", "GRPOModule")
    assert "--model.num_generations" in out and "--model.advantage_estimator" in out
    out = run_aa(monkeypatch, capsys, "fit", "--data.help", "TextToTextDataModule")
    assert "--data.max_length" in out
