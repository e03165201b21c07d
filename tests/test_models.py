"""Model layer: registry, loading, score model, tiny aliases."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, Qwen2ForCausalLM

from aa_lightning.models import ScoreModel, load_pretrained_models, register_model, resolve_model_path
from aa_lightning.models.registry import MODEL_REGISTRY, load_config, resolve_model_class
from aa_lightning.models.score_model import last_token_index


def test_tiny_alias_builds_a_real_checkpoint():
    path = resolve_model_path("tiny-qwen2")
    model = AutoModelForCausalLM.from_pretrained(path)
    assert isinstance(model, Qwen2ForCausalLM)
    model2, tokenizer, processor = load_pretrained_models("tiny-qwen2")
    assert processor is None
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.chat_template
    ids = torch.tensor([[5, 6, 7]])
    assert torch.equal(model(ids).logits, model2(ids).logits)


def test_registry_prefers_the_registered_class():
    config = load_config(resolve_model_path("tiny-qwen2"))
    assert resolve_model_class(config) is AutoModelForCausalLM

    @register_model("qwen2", override=True)
    class AccustomedQwen2(Qwen2ForCausalLM):
        pass

    try:
        assert resolve_model_class(config) is AccustomedQwen2
        model, _, _ = load_pretrained_models("tiny-qwen2")
        assert type(model) is AccustomedQwen2
    finally:
        MODEL_REGISTRY.pop("qwen2")


def test_register_twice_needs_override():
    @register_model("some-new-type")
    class A(Qwen2ForCausalLM):
        pass

    try:
        try:
            register_model("some-new-type")(type("B", (Qwen2ForCausalLM,), {}))
        except ValueError as err:
            assert "already registered" in str(err)
        else:
            raise AssertionError("expected a ValueError")
    finally:
        MODEL_REGISTRY.pop("some-new-type")


def test_last_token_index_both_padding_sides():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(right).tolist() == [2, 4]
    assert last_token_index(left).tolist() == [4, 4]


def test_score_model_end_score_is_last_non_pad_token(tmp_path):
    model, tokenizer, _ = load_pretrained_models("tiny-llama", score_model=True, new_score_head=True)
    assert isinstance(model, ScoreModel)
    texts = ["a short one", "a much longer sentence than the first one"]
    scores = {}
    for side in ("left", "right"):
        tokenizer.padding_side = side
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        out = model(**batch)
        # the end score equals the per-token score at the last real token
        for row in range(2):
            last = batch["attention_mask"][row].nonzero().max()
            assert torch.allclose(out.end_scores[row], out.scores[row, last])
        scores[side] = out.end_scores
    assert torch.allclose(scores["left"], scores["right"], atol=1e-5)
    # save -> load keeps the head
    model.save_pretrained(str(tmp_path))
    tokenizer.save_pretrained(str(tmp_path))
    again, _, _ = load_pretrained_models(str(tmp_path), score_model=True)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    assert torch.allclose(again(**batch).end_scores, model(**batch).end_scores, atol=1e-6)
