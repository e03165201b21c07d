"""A score model in the format plain transformers loads: the family's ``*ForSequenceClassification``.

``AutoModelForSequenceClassification.from_pretrained(export)`` must give the scores our
:class:`~aa_lightning.models.ScoreModel` gives, so a trained reward or cost model works in the tools users
already have (TRL, vLLM's classify task, a notebook). That holds exactly when

* the family has a sequence-classification class whose base model is our backbone's class, with the same
  tensor names (``<base_model_prefix>.<backbone key>`` plus ``score.weight``);
* the head has no bias (transformers' heads are ``nn.Linear(hidden, num_labels, bias=False)``, and a bias
  cannot be folded into weights that read a normalised hidden state with no constant feature);
* ``config.pad_token_id`` (of the text config) is the id the tokenizer pads with and never the last real
  token of a row: transformers reads the score at the last token whose id is not the pad id, we read it at
  the last token whose attention mask is 1.

When any of these fails, :func:`seqcls_layout` says why and the score model is written in our own format
(backbone + ``score_head.safetensors``) instead.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, PretrainedConfig, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

SEQCLS_HEAD_KEY = "score.weight"


@dataclass(frozen=True)
class SeqClsLayout:
    """How our tensors map onto the family's ``*ForSequenceClassification`` (or why they do not)."""

    model_class: type | None
    base_model_prefix: str = "model"
    problem: str | None = None


def seqcls_class(config: PretrainedConfig) -> type | None:
    """The transformers sequence-classification class of ``config``'s family, or None."""
    mapping = AutoModelForSequenceClassification._model_mapping
    try:
        return mapping[type(config)]
    except KeyError:
        return None


def seqcls_config(config: PretrainedConfig, model_class: type, pad_token_id: int | None) -> PretrainedConfig:
    """A copy of the backbone's ``config`` for ``model_class``: one label, the pad id set where transformers reads it."""
    out = copy.deepcopy(config)
    out.architectures = [model_class.__name__]
    out.num_labels = 1
    out.problem_type = "regression"  # one real-valued score (transformers' MSE loss if labels are given)
    if pad_token_id is not None:
        out.get_text_config().pad_token_id = pad_token_id
        if hasattr(out, "pad_token_id"):
            out.pad_token_id = pad_token_id
    return out


@contextlib.contextmanager
def without_transformers_zero3() -> Iterator[None]:
    """transformers' own ZeRO-3 mode off inside the block (restored after).

    Under a ZeRO-3 run transformers builds every model partitioned and initialises it through gathers; the
    meta-device model used to check and write the export must be a plain one (it holds no data at all).
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def meta_seqcls_model(model_class: type, config: PretrainedConfig) -> torch.nn.Module:
    """``model_class(config)`` on the meta device: names and shapes only, no memory."""
    with without_transformers_zero3(), torch.device("meta"):
        return model_class(config)


def seqcls_layout(backbone: torch.nn.Module, backbone_keys: set[str], head_bias: bool) -> SeqClsLayout:
    """Check, on the meta device (no memory), that ``backbone`` + a bias-free head is the family's seqcls model."""
    config = backbone.config
    model_class = seqcls_class(config)
    if model_class is None:
        return SeqClsLayout(
            None, problem=f"transformers has no ForSequenceClassification class for {config.model_type!r}"
        )
    if head_bias:
        return SeqClsLayout(
            model_class,
            problem=f"the score head has a bias, which {model_class.__name__}'s head (bias=False) cannot hold",
        )
    probe = meta_seqcls_model(model_class, seqcls_config(config, model_class, None))
    prefix = probe.base_model_prefix
    base = getattr(probe, prefix, None)
    if type(base) is not type(backbone):
        return SeqClsLayout(
            model_class,
            prefix,
            f"{model_class.__name__}.{prefix} is a {type(base).__name__}, our backbone a {type(backbone).__name__}",
        )
    expected = set(probe.state_dict())
    ours = {f"{prefix}.{k}" for k in backbone_keys} | {SEQCLS_HEAD_KEY}
    if expected != ours:
        diff = sorted(expected ^ ours)[:5]
        return SeqClsLayout(
            model_class, prefix, f"tensor names differ from {model_class.__name__}'s, e.g. {diff}"
        )
    return SeqClsLayout(model_class, prefix)


def export_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """The tokenizer to export with a score model: its pad token must never be a row's last real token.

    Rows end at the end-of-turn token; a tokenizer that pads with it (SmolLM2 pads with ``<|im_end|>``) would
    make transformers score the token before it. Such a tokenizer is copied and given another special token
    that no chat turn uses (the unknown token first) as its pad token; the training tokenizer is untouched.
    """
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    if pad is None or pad != eos:
        return tokenizer
    template = str(getattr(tokenizer, "chat_template", None) or "")
    used = {eos, tokenizer.bos_token_id}
    candidates = [tokenizer.unk_token] + [
        t.content for t in tokenizer.added_tokens_decoder.values() if getattr(t, "special", False)
    ]
    for token in candidates:
        if not token or token in template:
            continue
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id in used:
            continue
        out = copy.deepcopy(tokenizer)
        out.pad_token = token
        log.info(
            "score model export: the tokenizer pads with its end token %r; the export pads with %r instead so "
            "AutoModelForSequenceClassification reads the score at the end token",
            tokenizer.pad_token,
            token,
        )
        return out
    log.warning(
        "score model export: the tokenizer pads with its end token %r and has no other special token to pad with; "
        "AutoModelForSequenceClassification will read the score one token before a row's final %r",
        tokenizer.pad_token,
        tokenizer.pad_token,
    )
    return tokenizer


def seqcls_head_problem(config: Any, path: str) -> str | None:
    """Why the sequence-classification checkpoint at ``path`` is no single-score model, or None."""
    labels = getattr(config, "num_labels", 1)
    if labels != 1:
        return (
            f"{path}: a {config.architectures[0]} with num_labels={labels}; a score model has one output "
            "(num_labels=1)"
        )
    return None


def is_seqcls_config(config: Any) -> bool:
    """True when ``config`` names a ``*ForSequenceClassification`` architecture (an export with a head)."""
    return any(
        str(a).endswith("ForSequenceClassification") for a in getattr(config, "architectures", None) or []
    )
