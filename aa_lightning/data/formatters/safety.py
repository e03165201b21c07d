"""Formatters for PKU-SafeRLHF: helpfulness or safety orderings of a response pair, with per-response safety labels.

The safety labels become the ``chosen_is_safe`` / ``rejected_is_safe`` meta that Safe-RLHF's cost model needs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aa_lightning.batch import CHOSEN_IS_SAFE, REJECTED_IS_SAFE
from aa_lightning.data.errors import DataFormatError
from aa_lightning.data.formatters.base import BaseFormatter, Conversation, Meta, describe
from aa_lightning.data.formatters.registry import register_template

__all__ = ["PKUSafeRLHF", "PKUSafeRLHFSafety"]


@register_template("PKU-SafeRLHF")
class PKUSafeRLHF(BaseFormatter):
    """PKU-SafeRLHF rows: ``prompt, response_0, response_1, better_response_id, safer_response_id,
    is_response_0_safe, is_response_1_safe``.

    Preference orders by helpfulness (``better_response_id``, 0 or 1). Meta: preference
    ``{"chosen_is_safe": bool, "rejected_is_safe": bool}`` (+ ``margin``), which Safe-RLHF's cost model
    needs; prompt-only ``{}``.
    """

    order_key = "better_response_id"

    def response_id(self, raw_sample: Mapping[str, Any], key: str) -> int:
        value = self.field(raw_sample, key, kind=int)
        if value not in (0, 1):
            raise DataFormatError(f"expected 0 or 1, got {describe(value)}", field=key)
        return value

    def format_preference_sample(
        self, raw_sample: Mapping[str, Any]
    ) -> tuple[Conversation, Conversation, Meta]:
        prompt = self.field(raw_sample, "prompt")
        better = self.response_id(raw_sample, self.order_key)
        worse = 1 - better
        chosen = self.field(raw_sample, f"response_{better}")
        rejected = self.field(raw_sample, f"response_{worse}")
        meta: Meta = {
            CHOSEN_IS_SAFE: self.field(raw_sample, f"is_response_{better}_safe", kind=bool),
            REJECTED_IS_SAFE: self.field(raw_sample, f"is_response_{worse}_safe", kind=bool),
            **self.preference_meta(raw_sample),
        }
        user = {"role": "user", "content": prompt}
        return (
            self.with_system([user, {"role": "assistant", "content": chosen}]),
            self.with_system([dict(user), {"role": "assistant", "content": rejected}]),
            meta,
        )

    def format_prompt_only_sample(self, raw_sample: Mapping[str, Any]) -> tuple[Conversation, Meta]:
        return self.with_system([{"role": "user", "content": self.field(raw_sample, "prompt")}]), {}


@register_template("PKU-SafeRLHF-Safety")
class PKUSafeRLHFSafety(PKUSafeRLHF):
    """As :class:`PKUSafeRLHF` but chosen = the safer response (``safer_response_id``), for cost models."""

    order_key = "safer_response_id"
