"""Every documented knob works from YAML and the command line, reaching the modules as the typed objects.

Each test drives the `aa` LightningCLI (``build_cli``) on the tiny configs and checks where the knob acts: the
optimizer and its schedule, the LoRA adapters and what the export writes, the ``generate`` settings of
rollouts, which rows the data specs select, and a formatter named ``module:Class`` in the config.
"""

from __future__ import annotations

import json
import os
import re
import sys

import pytest
import torch
from safetensors.torch import load_file

from aa_lightning.algorithms import GenerationConfig, LoraConfig, OptimConfig, SFTModule
from aa_lightning.cli import build_cli
from aa_lightning.data.sources import DataSpec, load_rows

QUICK = ["--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false"]


def cli_args(repo_path, config: str, root, *extra: str) -> list[str]:
    return [
        "--config",
        repo_path("configs", "tiny", config),
        "--trainer.default_root_dir",
        str(root),
        *extra,
    ]


def fit(repo_path, config: str, root, *extra: str):
    return build_cli(["fit", *cli_args(repo_path, config, root, *QUICK, *extra)])


def parse(repo_path, config: str, root, *extra: str):
    return build_cli(cli_args(repo_path, config, root, *extra), run=False)


# -- optim ---------------------------------------------------------------------------------------------------
def test_optim_knobs_from_the_command_line_reach_the_optimizer(repo_path, tmp_path):
    """lr, betas, eps, weight_decay, warmup (``warmup_steps null`` -> warmup_ratio), scheduler, min_lr_ratio."""
    cli = fit(
        repo_path,
        "sft_t2t.yaml",
        tmp_path,
        "--trainer.max_steps",
        "4",
        "--model.init_args.optim.lr",
        "0.01",
        "--model.init_args.optim.betas",
        "[0.8, 0.9]",
        "--model.init_args.optim.eps",
        "1e-6",
        "--model.init_args.optim.weight_decay",
        "0.1",
        "--model.init_args.optim.warmup_steps",
        "null",  # else the YAML's 3 steps
        "--model.init_args.optim.warmup_ratio",
        "0.25",
        "--model.init_args.optim.scheduler",
        "linear",
        "--model.init_args.optim.min_lr_ratio",
        "0.25",
    )
    optim = cli.model.optim
    assert optim == OptimConfig(
        lr=0.01,
        betas=(0.8, 0.9),
        eps=1e-6,
        weight_decay=0.1,
        warmup_steps=None,
        warmup_ratio=0.25,
        scheduler="linear",
        min_lr_ratio=0.25,
    )
    optimizer = cli.trainer.optimizers[0]
    assert tuple(optimizer.defaults["betas"]) == (0.8, 0.9) and optimizer.defaults["eps"] == 1e-6
    decays = sorted(g["weight_decay"] for g in optimizer.param_groups)
    assert decays[0] == 0.0 and decays[-1] == 0.1  # biases/norms undecayed, matrices decayed
    # 4 steps, warm-up int(0.25 * 4) = 1 step (factor 1/2), then linear from 1 down to min_lr_ratio at step 4
    # (cosine would give 0.8125 at step 2; the YAML's warmup_steps 3 would give 1/4 at step 0)
    factor = cli.trainer.lr_scheduler_configs[0].scheduler.lr_lambdas[0]
    assert [factor(step) for step in range(5)] == pytest.approx([0.5, 1.0, 0.75, 0.5, 0.25])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 0.25)  # the schedule ran 4 steps


def test_nested_null_is_accepted_and_keeps_the_yaml_values(repo_path, tmp_path):
    cli = parse(
        repo_path,
        "sft_t2t.yaml",
        tmp_path,
        "--model.init_args.optim.warmup_steps",
        "null",
        "--data.init_args.train.size",
        "null",
    )
    assert cli.model.optim.warmup_steps is None
    assert cli.model.optim.lr == 3.0e-3 and cli.model.optim.scheduler == "cosine"  # from the YAML
    assert cli.datamodule.specs["train"][0].size is None
    assert cli.datamodule.specs["train"][0].template == "Alpaca"


# -- lora ----------------------------------------------------------------------------------------------------
LORA_CLI = [
    "--model.init_args.lora.r",
    "4",
    "--model.init_args.lora.alpha",
    "8",
    "--model.init_args.lora.dropout",
    "0.0",
    "--model.init_args.lora.target_modules",
    "[q_proj, v_proj]",
]


def logits_of(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def base_model():
    from transformers import AutoModelForCausalLM

    from aa_lightning.models.aliases import resolve_model_path

    return AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny-qwen2"), dtype=torch.float32)


def assert_adapter_only_export(cli, export: str) -> None:
    from peft import PeftModel

    files = set(os.listdir(export))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert "model.safetensors" not in files
    adapter = json.loads(open(os.path.join(export, "adapter_config.json")).read())
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 8 and adapter["lora_dropout"] == 0.0
    assert set(adapter["target_modules"]) == {"q_proj", "v_proj"}
    weights = load_file(os.path.join(export, "adapter_model.safetensors"))
    assert weights and all("lora_" in k for k in weights)
    assert {k.split(".")[-3] for k in weights} == {"q_proj", "v_proj"}
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in weights.items())  # trained
    reloaded = PeftModel.from_pretrained(base_model(), export).eval()
    torch.testing.assert_close(logits_of(reloaded), logits_of(cli.model.model.eval()))


def test_lora_merge_on_export_false_from_the_command_line(repo_path, tmp_path):
    cli = fit(
        repo_path,
        "sft_t2t.yaml",
        tmp_path,
        "--trainer.max_steps",
        "1",
        *LORA_CLI,
        "--model.init_args.lora.merge_on_export",
        "false",
    )
    assert_adapter_only_export(cli, os.path.join(tmp_path, "hf_model"))
    assert cli.model.lora == LoraConfig(
        r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"], merge_on_export=False
    )
    assert isinstance(cli.model.hparams["lora"], dict)  # what LightningCLI stores; the module reads .lora


def test_lora_merge_on_export_false_from_yaml(repo_path, tmp_path):
    override = tmp_path / "lora.yaml"
    override.write_text(
        "model:\n  init_args:\n    lora:\n      r: 4\n      alpha: 8\n      dropout: 0.0\n"
        "      target_modules: [q_proj, v_proj]\n      merge_on_export: false\n"
    )
    cli = fit(repo_path, "sft_t2t.yaml", tmp_path, "--config", str(override), "--trainer.max_steps", "1")
    assert_adapter_only_export(cli, os.path.join(tmp_path, "hf_model"))
    assert cli.model.lora.merge_on_export is False


def test_lora_merge_on_export_true_writes_merged_weights(repo_path, tmp_path):
    from transformers import AutoModelForCausalLM

    cli = fit(
        repo_path,
        "sft_t2t.yaml",
        tmp_path,
        "--trainer.max_steps",
        "1",
        *LORA_CLI,
        "--model.init_args.lora.merge_on_export",
        "true",
    )
    export = os.path.join(tmp_path, "hf_model")
    files = set(os.listdir(export))
    assert "model.safetensors" in files and "adapter_config.json" not in files
    assert not any(
        "lora_" in k or "base_layer" in k for k in load_file(os.path.join(export, "model.safetensors"))
    )
    merged = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    trained = logits_of(cli.model.model.eval())
    torch.testing.assert_close(logits_of(merged), trained)
    assert not torch.allclose(logits_of(base_model().eval()), trained)  # the adapters did change the model


def test_config_sections_from_python_dicts_are_typed_and_checked():
    from aa_lightning.algorithms.config import as_config

    module = SFTModule(optim={"lr": 0.5, "warmup_steps": None}, lora={"r": 2, "merge_on_export": False})
    assert module.optim == OptimConfig(lr=0.5, warmup_steps=None)
    assert module.lora == LoraConfig(r=2, merge_on_export=False)
    assert SFTModule().lora is None and SFTModule().optim == OptimConfig()
    with pytest.raises(ValueError, match=r"lora: unknown field\(s\) 'rank'; LoraConfig accepts r, alpha"):
        SFTModule(lora={"rank": 2})
    with pytest.raises(ValueError, match=r"train\[1\]: missing required field\(s\) 'template'"):
        from aa_lightning.data.sources import as_specs

        as_specs([{"path": "a.json", "template": "Alpaca"}, {"path": "b.json"}], "train")
    assert as_config(GenerationConfig, {"top_k": 3}) == GenerationConfig(top_k=3)


# -- generation ----------------------------------------------------------------------------------------------
def test_generation_knobs_reach_generate(repo_path, tmp_path):
    cli = fit(
        repo_path,
        "grpo_t2t.yaml",
        tmp_path,
        "--trainer.max_steps",
        "1",
        "--data.init_args.train.size",
        "2",
        "--model.init_args.num_generations",
        "2",
        "--model.init_args.generation.max_new_tokens",
        "3",
        "--model.init_args.generation.temperature",
        "0.7",
        "--model.init_args.generation.top_p",
        "0.9",
        "--model.init_args.generation.top_k",
        "5",
        "--model.init_args.generation.do_sample",
        "true",
    )
    module = cli.model
    assert module.generation == GenerationConfig(
        max_new_tokens=3, temperature=0.7, top_p=0.9, top_k=5, do_sample=True
    )
    config = module.generation_kwargs()["generation_config"]
    assert (config.max_new_tokens, config.temperature, config.top_p, config.top_k, config.do_sample) == (
        3,
        0.7,
        0.9,
        5,
        True,
    )
    assert 0 < cli.trainer.callback_metrics["rollout/response_length"] <= 3
    greedy = parse(repo_path, "grpo_t2t.yaml", tmp_path, "--model.init_args.generation.do_sample", "false")
    assert greedy.model.generation.do_sample is False and greedy.model.generation.max_new_tokens == 8  # YAML


# -- data specs ----------------------------------------------------------------------------------------------
def test_data_spec_knobs_select_the_rows(repo_path, tmp_path):
    data = repo_path("configs", "data", "alpaca_200.json")
    cli = parse(
        repo_path,
        "sft_t2t.yaml",
        tmp_path,
        "--data.init_args.kind",
        "supervised",
        "--data.init_args.train.path",
        data,
        "--data.init_args.train.size",
        "5",
        "--data.init_args.train.shuffle_seed",
        "7",
        "--data.init_args.train.split",
        "train",
        "--data.init_args.train.name",
        "null",
        "--data.init_args.val",
        "null",
    )
    spec = cli.datamodule.specs["train"][0]
    assert spec == DataSpec(path=data, template="Alpaca", split="train", name=None, size=5, shuffle_seed=7)
    assert cli.datamodule.specs["val"] == []
    cli.datamodule.setup("fit")
    encoded = cli.datamodule.datasets["train"]
    rows = load_rows(spec)
    assert len(encoded) == 5 and rows.row_numbers != [0, 1, 2, 3, 4]  # shuffled, then cut to 5
    instructions = [r["instruction"] for r in rows.rows]
    assert all(instr.strip()[:20] in text for instr, text in zip(instructions, encoded["text"]))


# -- a formatter named module:Class --------------------------------------------------------------------------
def readme_formatter_source(repo_path) -> str:
    """The user formatter shown in the README (so the README's example is the one tested)."""
    readme = open(repo_path("README.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    (source,) = [b for b in blocks if "class MyQA(BaseFormatter)" in b and "register_template(" not in b]
    return source


ROWS = [
    {"question": "Name a primary colour.", "good": "Red is one.", "bad": "Potato."},
    {"question": "What is two plus two?", "good": "It is four.", "bad": "Seven, maybe."},
]


@pytest.mark.parametrize(
    ("config", "kind"),
    [("sft_t2t.yaml", "supervised"), ("dpo_t2t.yaml", "preference"), ("grpo_t2t.yaml", "prompt_only")],
)
def test_template_module_colon_class_from_the_command_line(repo_path, tmp_path, monkeypatch, config, kind):
    package = tmp_path / "my_pkg_h3"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "formatters.py").write_text(readme_formatter_source(repo_path))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_pkg_h3.formatters", None)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cli = parse(
        repo_path,
        config,
        tmp_path,
        "--data.init_args.kind",
        kind,
        "--data.init_args.train",
        json.dumps({"path": str(data), "template": "my_pkg_h3.formatters:MyQA"}),
        "--data.init_args.val",
        "null",
    )
    assert "my_pkg_h3.formatters" not in sys.modules  # nothing registered it before the data is prepared
    cli.datamodule.setup("fit")
    encoded = cli.datamodule.datasets["train"]
    assert len(encoded) == len(ROWS)
    for row, sample in zip(ROWS, encoded):
        if kind == "supervised":
            assert row["question"] in sample["text"] and row["good"] in sample["text"]
        elif kind == "preference":
            assert row["good"] in sample["chosen_text"] and row["bad"] in sample["rejected_text"]
            assert row["bad"] not in sample["chosen_text"]
        else:
            assert row["question"] in sample["prompt_text"] and row["good"] not in sample["prompt_text"]
            assert json.loads(sample["meta"])["reference_answer"] == row["good"]


def test_template_module_colon_class_errors_are_clear(tmp_path, monkeypatch):
    from aa_lightning.data.formatters import get_formatter_class
    from aa_lightning.data.formatters.registry import UnknownTemplateError

    (tmp_path / "not_formatters_h3.py").write_text("class Plain:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UnknownTemplateError, match="no module named 'nowhere_h3'"):
        get_formatter_class("nowhere_h3.formats:X")
    with pytest.raises(UnknownTemplateError, match="has no attribute 'Missing'"):
        get_formatter_class("not_formatters_h3:Missing")
    with pytest.raises(TypeError, match="not a BaseFormatter subclass"):
        get_formatter_class("not_formatters_h3:Plain")
    with pytest.raises(UnknownTemplateError, match="package.module:ClassName"):
        get_formatter_class("Alpacca")
