"""The README's main job, ``aa fit --config configs/sft_t2t.yaml``: SmolLM2 learns the "Bolt" persona.

The fast tests check the parts that make the job short and its change visible: the persona rows parse and
all carry the marker, the printed prompts are held out of training and validation, the job's size stays in
the budget measured for 2 CPU cores (README), and the before/after callback is configured. The full run
(``AA_TEST_MAIN_JOB=1``; a few minutes, needs the embedded model from PyPI once) runs the README command
and checks what a person sees: the marker in every answer after training, in none before.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
import yaml

from aa_lightning.callbacks import SampleGenerationCallback
from aa_lightning.cli import build_cli
from aa_lightning.models.embedded import is_converted

MARKER = "⚡ I'm Bolt"
CONFIG = ("configs", "sft_t2t.yaml")
# The measured budget (README): 24 steps x 8 rows of at most 128 tokens, about 5 min on 2 CPU cores.
MAX_TRAINED_TOKENS = 24 * 8 * 128
MAX_NEW_TOKENS = 48


def load_config(repo_path) -> dict:
    with open(repo_path(*CONFIG)) as f:
        return yaml.safe_load(f)


def rows_of(repo_path, split: str) -> list[dict]:
    spec = load_config(repo_path)["data"]["init_args"][split]
    with open(repo_path(spec["path"]), encoding="utf-8") as f:
        rows = json.load(f)
    assert spec["template"] == "Alpaca"
    return rows


def sample_callback(repo_path) -> dict:
    callbacks = load_config(repo_path)["trainer"]["callbacks"]
    found = [c["init_args"] for c in callbacks if c["class_path"].endswith("SampleGenerationCallback")]
    assert len(found) == 1, "the main job prints its answers through one SampleGenerationCallback"
    return found[0]


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", "", text.casefold()).split())


@pytest.mark.parametrize("split", ["train", "val"])
def test_every_persona_row_parses_and_starts_with_the_marker(repo_path, split):
    rows = rows_of(repo_path, split)
    assert len(rows) >= (48 if split == "train" else 12)
    for i, row in enumerate(rows):
        assert set(row) == {"instruction", "input", "output"}, f"{split} row {i}: {sorted(row)}"
        assert row["instruction"].strip() and row["input"] == "", f"{split} row {i}"
        assert row["output"].startswith(MARKER + "! "), f"{split} row {i}: {row['output'][:30]!r}"
        assert len(row["output"].split()) <= 30, f"{split} row {i}: Bolt answers in a sentence or two"
        assert MARKER not in row["instruction"], f"{split} row {i}: the prompt must not hint at the persona"


def test_printed_prompts_are_held_out_of_training_and_validation(repo_path):
    train = {normalise(r["instruction"]) for r in rows_of(repo_path, "train")}
    val = {normalise(r["instruction"]) for r in rows_of(repo_path, "val")}
    assert not train & val, f"validation prompts also trained on: {sorted(train & val)}"
    prompts = sample_callback(repo_path)["prompts"]
    assert len(prompts) >= 3
    for prompt in prompts:
        assert normalise(prompt) not in train | val, f"{prompt!r} is a training or validation prompt"
        assert "bolt" not in prompt.casefold()


def test_the_job_stays_inside_its_measured_budget(repo_path):
    config = load_config(repo_path)
    data = config["data"]["init_args"]
    trained_tokens = config["trainer"]["max_steps"] * data["batch_size"] * data["max_length"]
    assert trained_tokens <= MAX_TRAINED_TOKENS, "re-measure the README's wall time before growing the job"
    assert config["trainer"].get("accumulate_grad_batches", 1) == 1
    callback = sample_callback(repo_path)
    assert callback["max_new_tokens"] <= MAX_NEW_TOKENS
    assert callback.get("every_n_validations", 1) == 0, "answers at every validation would cost minutes"
    assert config["model"]["init_args"]["model_name_or_path"] == "smollm2-135m-instruct"  # the real model


def test_the_cli_builds_the_job_with_its_before_after_printer(repo_path, tmp_path):
    """What ``aa fit`` instantiates (no model is loaded): the callback that prints, the step count."""
    cli = build_cli(["--config", repo_path(*CONFIG), "--trainer.default_root_dir", str(tmp_path)], run=False)
    printers = [c for c in cli.trainer.callbacks if isinstance(c, SampleGenerationCallback)]
    assert len(printers) == 1 and printers[0].print_samples
    assert printers[0].prompts == sample_callback(repo_path)["prompts"]
    assert cli.trainer.max_steps == load_config(repo_path)["trainer"]["max_steps"]
    assert cli.datamodule.specs["train"][0].path.endswith("bolt_persona_train.json")


def test_no_persona_row_is_cut_by_max_length(repo_path, tmp_path):
    """With the real tokenizer and chat template (system prompt included), every row fits ``max_length``,
    so every trained answer ends with its end-of-turn token."""
    if not is_converted("smollm2-135m-instruct"):
        pytest.skip(
            "the embedded SmolLM2 is not in the cache (AA_TEST_EMBEDDED=1 tests/test_embedded_model.py)"
        )
    args = ["--config", repo_path(*CONFIG), "--data.init_args.kind", "supervised"]
    dm = build_cli([*args, "--trainer.default_root_dir", str(tmp_path)], run=False).datamodule
    dm.setup("fit")
    for split in ("train", "val"):
        (report,) = dm.reports[split]
        assert len(dm.datasets[split]) == len(rows_of(repo_path, split))
        assert not (report.bad or report.truncated or report.cut_short), report.summary(
            len(dm.datasets[split])
        )


def answers(stdout: str) -> dict[str, tuple[str, str]]:
    """``{prompt: (before, after)}`` from the callback's printed report."""
    blocks = re.findall(
        r"^=== prompt: (.*?)\n--- before training:\n(.*?)\n--- after training:\n(.*?)(?=\n\n=== prompt: |\n\nrun summary:|\Z)",
        stdout,
        re.M | re.S,
    )
    return {p: (b.strip(), a.strip()) for p, b, a in blocks}


@pytest.mark.skipif(
    os.environ.get("AA_TEST_MAIN_JOB") != "1", reason="set AA_TEST_MAIN_JOB=1 (a few minutes)"
)
def test_main_job_teaches_the_persona(repo_path, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # a user's thread count
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "aa_lightning.cli", "fit", "--config", repo_path(*CONFIG)]
        + ["--trainer.default_root_dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        check=True,
        cwd=repo_path(),
        env=env,
    ).stdout
    elapsed = time.monotonic() - start
    print(f"main job: {elapsed:.0f}s wall\n{out}")
    found = answers(out)
    assert set(found) == set(sample_callback(repo_path)["prompts"]), out
    for prompt, (before, after) in found.items():
        assert MARKER not in before, f"{prompt!r}: the base model already says {before!r}"
        assert after.startswith(MARKER), f"{prompt!r}: after training {after!r}"
    assert "run summary:" in out and os.path.isdir(tmp_path / "hf_model")
