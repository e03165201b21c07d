"""``aa eval``'s model pool: each rank's device, and which score-model folders it refuses (tiny real models)."""

from __future__ import annotations

import pytest
import torch

import aa_lightning.evaluation.models as eval_models
from aa_lightning.evaluation.models import ModelPool
from aa_lightning.models.aliases import resolve_model_path


@pytest.fixture
def four_gpus(monkeypatch):
    """A torchrun rank on a 4-GPU node, seen from a CPU machine (only the device arithmetic is checked)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)


def test_auto_is_the_ranks_own_gpu(four_gpus, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert ModelPool("auto").target() == torch.device("cuda", 3)
    monkeypatch.setenv("LOCAL_RANK", "6")  # more ranks than GPUs on the node: they share round-robin
    assert ModelPool("auto").target() == torch.device("cuda", 2)
    monkeypatch.delenv("LOCAL_RANK")
    assert ModelPool("auto").target() == torch.device("cuda", 0)


def test_explicit_devices_and_no_gpu(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert ModelPool("cpu").target() == torch.device("cpu")
    assert ModelPool("cuda:1").target() == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ModelPool("auto").target() == torch.device("cpu")


def test_language_models_load_on_the_ranks_device(four_gpus, monkeypatch):
    """``lm`` hands load_chat_model this rank's device, not ``auto`` (which would be GPU 0 on every rank)."""
    asked = []
    real = eval_models.load_chat_model

    def record(name_or_path, device, **kwargs):
        asked.append(device)
        return real(name_or_path, device="cpu", **kwargs)  # this machine has no GPU: load on the CPU

    monkeypatch.setattr(eval_models, "load_chat_model", record)
    monkeypatch.setenv("LOCAL_RANK", "2")
    ModelPool("auto").lm("tiny-qwen2")
    assert asked == ["cuda:2"]


def test_a_two_label_classifier_is_refused_as_a_score_model(tmp_path):
    """Its first logit is no score: ModelPool.score must refuse it instead of reading ``logits[:, 0]``."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForSequenceClassification

    torch.set_num_threads(1)
    path = resolve_model_path("tiny-qwen2")
    Qwen2ForSequenceClassification(Qwen2Config.from_pretrained(path, num_labels=2)).save_pretrained(
        tmp_path / "two"
    )
    AutoTokenizer.from_pretrained(path).save_pretrained(tmp_path / "two")
    with pytest.raises(ValueError, match="num_labels=2"):
        ModelPool("cpu").score(str(tmp_path / "two"))
