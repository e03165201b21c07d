"""Score model: a transformer backbone plus a linear head that scores every token.

Reward models, cost models and PPO critics are all this one class. The end score of a sequence is the
score at its last non-pad token, found from the attention mask, so left and right padding both work.
That token is the end-of-turn token both for an encoded training row (the encoder ends rows there, with
nothing after it: see :mod:`aa_lightning.data.templating`) and for a rollout that stopped at EOS, so a
reward model is read at the same token in training and in PPO.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers.utils import ModelOutput

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
    """``backbone`` (any transformers base model: text or multimodal) + ``score_head`` (hidden -> 1)."""

    def __init__(self, backbone: PreTrainedModel, head_bias: bool = True, head_init_std: float | None = None):
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
        """Backbone in Hugging Face format plus the head in ``score_head.safetensors``."""
        os.makedirs(save_directory, exist_ok=True)
        backbone_state = None
        head_state = {k: v.detach().cpu().contiguous() for k, v in self.score_head.state_dict().items()}
        if state_dict is not None:
            backbone_state = {
                k[len("backbone.") :]: v for k, v in state_dict.items() if k.startswith("backbone.")
            }
            head_state = {
                k[len("score_head.") :]: v.detach().cpu().contiguous()
                for k, v in state_dict.items()
                if k.startswith("score_head.")
            }
        self.backbone.save_pretrained(save_directory, state_dict=backbone_state)
        save_file(head_state, os.path.join(save_directory, SCORE_HEAD_FILE))
        with open(os.path.join(save_directory, SCORE_CONFIG_FILE), "w") as f:
            json.dump({"head_bias": self.score_head.bias is not None}, f)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        backbone_class: Any = AutoModel,
        head_init_std: float | None = None,
        **kwargs: Any,
    ) -> ScoreModel:
        """Load a saved score model, or start one from any causal-LM checkpoint (new head)."""
        head_path = os.path.join(name_or_path, SCORE_HEAD_FILE)
        head_bias = True
        config_path = os.path.join(name_or_path, SCORE_CONFIG_FILE)
        if os.path.exists(config_path):
            with open(config_path) as f:
                head_bias = bool(json.load(f).get("head_bias", True))
        backbone = backbone_class.from_pretrained(name_or_path, **kwargs)
        model = cls(backbone, head_bias=head_bias, head_init_std=head_init_std)
        if os.path.exists(head_path):
            with gathered(model.score_head):
                model.score_head.load_state_dict(load_file(head_path))
        model.score_head.to(next(backbone.parameters()).dtype)
        return model


def has_score_head(name_or_path: str) -> bool:
    return os.path.exists(os.path.join(name_or_path, SCORE_HEAD_FILE))
