"""Every shipped config parses with ``aa fit --config X --print_config`` and is consistent with its name.

Parsing runs LightningCLI's full type check of every ``init_args`` key (a typo or a wrong type exits with
code 2) without loading a model. On top: the file name's algorithm and modality match the module and
datamodule classes, every data template is a registered formatter, the tiny configs' data files exist, and a
config that loads ``runs/<name>/hf_model`` (a PPO reward model, a Safe-RLHF cost model) has a sibling config
that writes exactly that export.
"""

from __future__ import annotations

import glob
import os
import re
from typing import Any

import pytest
import yaml

from aa_lightning.cli import build_cli
from aa_lightning.data import available_templates

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(
    os.path.relpath(p, REPO)
    for p in glob.glob(os.path.join(REPO, "configs", "*.yaml"))
    + glob.glob(os.path.join(REPO, "configs", "tiny", "*.yaml"))
)
MODULES = {
    "sft": "SFTModule",
    "rm": "RewardModule",
    "cost": "CostModule",
    "dpo": "DPOModule",
    "simpo": "SimPOModule",
    "orpo": "ORPOModule",
    "cpo": "CPOModule",
    "kto": "KTOModule",
    "ppo": "PPOModule",
    "grpo": "GRPOModule",
    "grpo_remote": "GRPOModule",  # GRPO scored by the `remote` reward (an HTTP endpoint)
    "grpo_tools": "GRPOModule",  # multi-turn tool rollouts (environment: tools)
    "online_dpo": "OnlineDPOModule",
    "best_of_n": "BestOfNModule",
    "safe_rlhf": "SafeRLHFModule",
}
DATAMODULES = {
    "t2t": "TextToTextDataModule",
    "ti2t": "TextImageToTextDataModule",
    "ta2t": "TextAudioToTextDataModule",
    "tv2t": "TextVideoToTextDataModule",
    "t2i": "TextToImageDataModule",
    "t2itok": "TextToImageTokensDataModule",
    "any2any": "TextToImageTokensDataModule",  # Emu3 understanding + generation rows (Any2Any)
    "t2ijanus": "TextToImageTokensDataModule",
    "t2v": "TextToVideoDataModule",
    "t2a": "TextToAudioDataModule",
}
EXPORT = re.compile(r"^runs/([^/]+)/hf_model$")


def print_config(path: str, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    with pytest.raises(SystemExit) as info:
        build_cli(["fit", "--config", path, "--print_config"])
    out = capsys.readouterr()
    assert info.value.code in (0, None), f"{path} does not parse:\n{out.err[-3000:]}"
    return yaml.safe_load(out.out)


def data_specs(config: dict[str, Any]) -> list[dict[str, Any]]:
    init = config["data"]["init_args"]
    specs = []
    for split in ("train", "val", "test", "predict", "ptx"):
        value = init.get(split)
        specs.extend(value if isinstance(value, list) else [value] if value else [])
    return specs


def test_configs_are_found() -> None:
    names = {os.path.basename(p) for p in CONFIGS}
    for algo in ("rm", "dpo", "ppo"):
        for modality in ("ti2t", "ta2t", "tv2t"):
            assert f"{algo}_{modality}.yaml" in names
            assert os.path.join("configs", "tiny", f"{algo}_{modality}.yaml") in CONFIGS


@pytest.mark.parametrize("path", CONFIGS)
def test_config_parses_and_matches_its_name(
    path: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    config = print_config(path, capsys)
    algo, modality = os.path.basename(path)[: -len(".yaml")].rsplit("_", 1)
    assert config["model"]["class_path"].rsplit(".", 1)[-1] == MODULES[algo]
    assert config["data"]["class_path"].rsplit(".", 1)[-1] == DATAMODULES[modality]
    specs = data_specs(config)
    assert specs, "no data"
    templates = set(available_templates())
    for spec in specs:
        assert spec["template"] in templates, spec
        if path.startswith(os.path.join("configs", "tiny")):
            assert os.path.exists(spec["path"]), spec  # tiny configs run offline on the repo's data
    folder = os.path.dirname(path)
    for key, value in config["model"]["init_args"].items():
        match = EXPORT.match(value) if key.endswith("_name_or_path") and isinstance(value, str) else None
        if match:  # the export of a sibling config: it must exist and write exactly there
            producer = os.path.join(folder, f"{match.group(1)}.yaml")
            assert os.path.exists(producer), f"{key}: {value} is written by no config ({producer})"
            with open(producer) as f:
                assert yaml.safe_load(f)["trainer"]["default_root_dir"] == f"runs/{match.group(1)}"
