"""The private DeepSpeed APIs the RL engine touches (listed once in ``rl/deepspeed_adapter.py``) still exist."""

from __future__ import annotations

import pytest

from aa_lightning.algorithms.rl.deepspeed_adapter import PRIVATE_APIS, DeepSpeedAdapter, missing_private_apis


def test_every_private_deepspeed_api_of_the_adapter_exists() -> None:
    pytest.importorskip("deepspeed")
    assert len(PRIVATE_APIS) == 7
    assert missing_private_apis() == [], "DeepSpeed renamed an API the RL adapter relies on"


def test_the_adapter_without_deepspeed_does_nothing() -> None:
    adapter = DeepSpeedAdapter(None)
    assert not adapter.active and adapter.zero_stage() == 0
    adapter.start_micro_batch()
    adapter.set_accumulation_boundary(True)
    assert adapter.global_grad_norm(device=None) is None  # type: ignore[arg-type]
