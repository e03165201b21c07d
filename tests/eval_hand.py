"""Hand computations for the evaluation tests: log-likelihoods and score-model scores computed directly from
the tokenizer's chat template and a plain forward, independently of aa_lightning's encoder and score model."""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

END = "<|im_end|>"


def chat_text(tokenizer, conversation, generation_prompt=False):
    text = tokenizer.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=generation_prompt
    )
    return text if generation_prompt else text.rstrip("\n")  # rows end at the end-of-turn token


def answer_log_likelihood(model, tokenizer, prompt, answer, processor=None, images=None):
    """sum log p(answer + end-of-turn | prompt) with the prompt templated by the tokenizer."""
    prompt_text = chat_text(tokenizer, prompt, generation_prompt=True)
    answer_ids = tokenizer(answer + END, add_special_tokens=False).input_ids
    if processor is None:
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False).input_ids
        full = tokenizer(prompt_text + answer + END, add_special_tokens=False).input_ids
        assert full == prompt_ids + answer_ids  # the answer's tokens do not merge with the prompt's
        inputs = {"input_ids": torch.tensor([full])}
    else:
        inputs = processor(text=[prompt_text + answer + END], images=images, return_tensors="pt")
        assert inputs["input_ids"][0, -len(answer_ids) :].tolist() == answer_ids
    with torch.no_grad():
        logits = model(**inputs).logits[0].float()
    ids = inputs["input_ids"][0]
    logp = torch.log_softmax(logits[:-1], dim=-1).gather(1, ids[1:, None])[:, 0]
    return float(logp[-len(answer_ids) :].sum())


class DirectScorer:
    """A score model's end score from its backbone and head files: ``w . h_last + b``."""

    def __init__(self, path):
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.backbone = AutoModel.from_pretrained(path).eval()
        head = load_file(os.path.join(path, "score_head.safetensors"))
        self.weight, self.bias = head["weight"][0], head.get("bias", torch.zeros(1))[0]

    def __call__(self, conversation):
        text = chat_text(self.tokenizer, conversation)
        ids = torch.tensor([self.tokenizer(text, add_special_tokens=False).input_ids])
        with torch.no_grad():
            hidden = self.backbone(input_ids=ids).last_hidden_state[0, -1]
        return float(hidden @ self.weight + self.bias)


class SeqClsScorer(DirectScorer):
    """A ``*ForSequenceClassification`` export's end score from its files: the base model's last hidden state
    times ``score.weight`` (no bias: transformers' heads have none), read from the safetensors by hand."""

    def __init__(self, path):
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.backbone = AutoModel.from_pretrained(path).eval()
        tensors = {}
        for name in sorted(os.listdir(path)):
            if name.endswith(".safetensors"):
                tensors.update(load_file(os.path.join(path, name)))
        assert "score.weight" in tensors and "score.bias" not in tensors, sorted(tensors)[:5]
        self.weight, self.bias = tensors["score.weight"][0], torch.zeros(())


def causal_lm(path):
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
