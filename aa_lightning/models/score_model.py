"""Score model: a transformer backbone plus a linear head that scores every token.

Reward models, cost models and PPO critics are all this one class. The end score of a sequence is the
score at its last non-pad token, found from the attention mask, so left and right padding both work.
That token is the end-of-turn token both for an encoded training row (the encoder ends rows there, with
nothing after it: see :mod:`aa_lightning.data.templating`) and for a rollout that stopped at EOS, so a
reward model is read at the same token in training and in PPO.

Saved as the family's ``*ForSequenceClassification`` where transformers has one, so plain transformers loads
the same scores (:mod:`aa_lightning.models.seqcls`); else as backbone + ``score_head.safetensors``. Loading
takes either format, and refuses a folder without a trained head unless a new one is asked for.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers.utils import ModelOutput

from aa_lightning.models.seqcls import (
    SEQCLS_HEAD_KEY,
    SeqClsLayout,
    is_seqcls_config,
    meta_seqcls_model,
    seqcls_config,
    seqcls_head_problem,
    seqcls_layout,
    without_transformers_zero3,
)

log = logging.getLogger(__name__)

SCORE_HEAD_FILE = "score_head.safetensors"
SCORE_CONFIG_FILE = "score_config.json"


@dataclass
class ScoreModelOutput(ModelOutput):
    """A ``ModelOutput`` so that ZeRO-3's hooks find its tensors."""

    scores: torch.Tensor | None = None  # (B, L) one score per position
    end_scores: torch.Tensor | None = None  # (B,) score at the last non-pad token
    end_index: torch.Tensor | None = None  # (B,) position of that token


@contextlib.contextmanager
def gathered(module: nn.Module) -> Iterator[None]:
    """Whole (not ZeRO-3 partitioned) parameters of ``module`` inside the block; writes on rank 0 are kept."""
    params = list(module.parameters())
    if not any(hasattr(p, "ds_id") for p in params):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        yield


def init_score_head(head: nn.Linear, std: float) -> None:
    """Draw a score head ``N(0, std)`` (``std`` 0: all zeros) with a zero bias, also when ZeRO-3 has partitioned
    it: the draw happens on gathered weights with ``modifier_rank=0`` (rank 0's values are broadcast).

    Critics call it again after loading (:meth:`OnlineRLModule.load_trainable_score_model`): under
    ``deepspeed.zero.Init`` the head the constructor drew may not survive the loading.
    """
    with gathered(head), torch.no_grad():
        if std > 0:
            nn.init.normal_(head.weight, std=std)
        else:
            nn.init.zeros_(head.weight)
        if head.bias is not None:
            nn.init.zeros_(head.bias)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position whose mask is 1, per row (works for left and right padding)."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * attention_mask.to(positions.dtype)).argmax(dim=-1)


class ScoreModel(nn.Module):
    """``backbone`` (any transformers base model: text or multimodal) + ``score_head`` (hidden -> 1).

    New heads have no bias by default: transformers' ``*ForSequenceClassification`` heads have none, so a
    bias-free head exports to that format exactly (:mod:`aa_lightning.models.seqcls`).
    """

    def __init__(
        self, backbone: PreTrainedModel, head_bias: bool = False, head_init_std: float | None = None
    ):
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config
        hidden = self.config.get_text_config().hidden_size
        self.score_head = nn.Linear(hidden, 1, bias=head_bias)
        init_score_head(
            self.score_head, head_init_std if head_init_std is not None else 1.0 / (hidden + 1) ** 0.5
        )

    def forward(self, **inputs: Any) -> ScoreModelOutput:
        inputs.pop("labels", None)
        inputs["use_cache"] = False
        hidden = self.backbone(**inputs, return_dict=True).last_hidden_state
        scores = self.score_head(hidden.to(self.score_head.weight.dtype)).squeeze(-1)
        mask = inputs.get("attention_mask")
        if mask is None:
            mask = torch.ones(scores.shape, dtype=torch.long, device=scores.device)
        end_index = last_token_index(mask)
        end_scores = scores.gather(1, end_index.unsqueeze(1)).squeeze(1)
        return ScoreModelOutput(scores=scores, end_scores=end_scores, end_index=end_index)

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        self.backbone.gradient_checkpointing_enable(**kwargs)

    def save_pretrained(self, save_directory: str, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """The family's ``*ForSequenceClassification`` checkpoint when it holds this model exactly, else the
        backbone in Hugging Face format plus the head in ``score_head.safetensors`` (the reason is logged).

        ``state_dict`` (CPU copies, e.g. gathered from ZeRO-3 shards or with LoRA merged) has this module's
        names (``backbone.*``, ``score_head.*``); by default the module's own tensors are written. The pad id
        written is the backbone config's (``RewardModule.export_pretrained`` sets the tokenizer's there).
        """
        os.makedirs(save_directory, exist_ok=True)
        if state_dict is None:
            state_dict = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        backbone_state = {
            k[len("backbone.") :]: v for k, v in state_dict.items() if k.startswith("backbone.")
        }
        head_state = {
            k[len("score_head.") :]: v.detach().cpu().contiguous()
            for k, v in state_dict.items()
            if k.startswith("score_head.")
        }
        layout = seqcls_layout(self.backbone, set(backbone_state), head_bias="bias" in head_state)
        if layout.problem is None:
            self._save_seqcls(save_directory, layout, backbone_state, head_state["weight"])
            return
        log.warning(
            "%s: written as backbone + %s, which AutoModelForSequenceClassification does not read (%s); "
            "load it with ScoreModel.from_pretrained / load_pretrained_models(path, score_model=True)",
            save_directory,
            SCORE_HEAD_FILE,
            layout.problem,
        )
        self.backbone.save_pretrained(save_directory, state_dict=backbone_state)
        save_file(head_state, os.path.join(save_directory, SCORE_HEAD_FILE))
        with open(os.path.join(save_directory, SCORE_CONFIG_FILE), "w") as f:
            json.dump({"head_bias": "bias" in head_state}, f)

    def _save_seqcls(
        self,
        save_directory: str,
        layout: SeqClsLayout,
        backbone_state: dict[str, torch.Tensor],
        head_weight: torch.Tensor,
    ) -> None:
        """Write ``*ForSequenceClassification`` (built on the meta device: its own ``save_pretrained`` names the
        files and applies the family's key conversions, no memory is allocated)."""
        assert layout.model_class is not None
        config = seqcls_config(self.config, layout.model_class, self.config.get_text_config().pad_token_id)
        target = meta_seqcls_model(layout.model_class, config)
        tensors = {f"{layout.base_model_prefix}.{k}": v for k, v in backbone_state.items()}
        tensors[SEQCLS_HEAD_KEY] = head_weight.detach().cpu().contiguous()
        with without_transformers_zero3():  # the tensors are already whole CPU copies
            target.save_pretrained(save_directory, state_dict=tensors)
        for stale in (SCORE_HEAD_FILE, SCORE_CONFIG_FILE):  # an earlier export in our own format
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(save_directory, stale))

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        backbone_class: Any = AutoModel,
        head_init_std: float | None = None,
        new_score_head: bool = False,
        head_bias: bool = False,
        **kwargs: Any,
    ) -> ScoreModel:
        """Load a trained score model: a ``*ForSequenceClassification`` checkpoint with one label (our export,
        or any such reward model) or our earlier format (backbone + ``score_head.safetensors``).

        A folder with no trained head (a plain language model) is refused unless ``new_score_head=True``: then
        a new head (``head_bias``, weights ``N(0, head_init_std)``) is drawn, as when a reward model or a
        critic starts from a causal LM. A random head must never be mistaken for a trained one.
        """
        head_path = os.path.join(name_or_path, SCORE_HEAD_FILE)
        if os.path.exists(head_path):
            return cls._from_own_format(name_or_path, backbone_class, head_init_std, **kwargs)
        config = AutoConfig.from_pretrained(
            name_or_path, trust_remote_code=kwargs.get("trust_remote_code", False)
        )
        if is_seqcls_config(config):
            return cls._from_seqcls(name_or_path, config, **kwargs)
        if not new_score_head:
            raise ValueError(
                f"{name_or_path}: no trained score head (neither a *ForSequenceClassification checkpoint nor "
                f"{SCORE_HEAD_FILE}): it is a plain model, and its scores would come from a random head. Point "
                "it at a trained reward/cost model, or start a new head on purpose with new_score_head=True "
                "(`new_score_head: true` in a RewardModule/CostModule config)"
            )
        backbone = backbone_class.from_pretrained(name_or_path, **kwargs)
        model = cls(backbone, head_bias=head_bias, head_init_std=head_init_std)
        model.score_head.to(next(backbone.parameters()).dtype)
        return model

    @classmethod
    def _from_own_format(
        cls, name_or_path: str, backbone_class: Any, head_init_std: float | None, **kwargs: Any
    ) -> ScoreModel:
        head_bias = True  # folders written before score_config.json existed had a biased head
        config_path = os.path.join(name_or_path, SCORE_CONFIG_FILE)
        if os.path.exists(config_path):
            with open(config_path) as f:
                head_bias = bool(json.load(f).get("head_bias", True))
        backbone = backbone_class.from_pretrained(name_or_path, **kwargs)
        model = cls(backbone, head_bias=head_bias, head_init_std=head_init_std)
        with gathered(model.score_head):
            model.score_head.load_state_dict(load_file(os.path.join(name_or_path, SCORE_HEAD_FILE)))
        model.score_head.to(next(backbone.parameters()).dtype)
        return model

    @classmethod
    def _from_seqcls(cls, name_or_path: str, config: Any, **kwargs: Any) -> ScoreModel:
        """The checkpoint's own class loads it (no key is unexpected); its base model becomes the backbone."""
        from transformers import AutoModelForSequenceClassification

        problem = seqcls_head_problem(config, name_or_path)
        if problem:
            raise ValueError(problem)
        loaded = AutoModelForSequenceClassification.from_pretrained(name_or_path, **kwargs)
        backbone = getattr(loaded, loaded.base_model_prefix)
        model = cls(backbone, head_bias=False, head_init_std=0.0)
        with gathered(loaded.score), gathered(model.score_head), torch.no_grad():
            model.score_head.weight.copy_(loaded.score.weight)
        model.score_head.to(next(backbone.parameters()).dtype)
        return model


def has_score_head(name_or_path: str) -> bool:
    """True when ``name_or_path`` holds a trained head (either format); a plain language model: False.

    A name that is no local folder (a hub model) is asked through its config (cached, or fetched if allowed).
    """
    if os.path.exists(os.path.join(name_or_path, SCORE_HEAD_FILE)):
        return True
    config_path = os.path.join(name_or_path, "config.json")
    if os.path.exists(config_path):
        with open(config_path) as f:
            architectures = json.load(f).get("architectures") or []
        return any(str(a).endswith("ForSequenceClassification") for a in architectures)
    if os.path.isdir(name_or_path):
        return False
    try:
        return is_seqcls_config(AutoConfig.from_pretrained(name_or_path))
    except (OSError, ValueError):
        return False
