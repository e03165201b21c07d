"""KTO: Kahneman-Tversky Optimisation on unpaired desirable / undesirable examples.

KTO is its own module (not a ``loss_type`` of :class:`~aa_lightning.algorithms.DPOModule`) because its data
is unpaired: a supervised batch (``input_ids/attention_mask/labels``) whose ``batch["extra"]["desirable"]``
says which rows are good (the ``KTO`` formatter sets it), not a chosen/rejected batch.

The reference point ``z0`` (a KL estimate) needs log-ratios of *mismatched* prompt/response pairs. They are
built here, inside the module, from the batch itself: a row's prompt is every token before its first
labelled token, its response the rest; row ``i``'s prompt is joined to row ``i+1``'s response. So the data
layer stays unchanged (no extra sample kind, no algorithm knowledge in the collator), and per-row
tensors other than tokens (e.g. images of the prompt) stay aligned with their prompts. Train on the last
assistant turn only (``data.train_on: last_assistant``) so that "response" means the final reply.
"""

from __future__ import annotations

from typing import Any

import torch

from aa_lightning.algorithms.losses import kto_kl_estimate, kto_loss
from aa_lightning.algorithms.policy import ReferencePolicyModule
from aa_lightning.batch import DESIRABLE, EXTRA, IGNORE_INDEX, LABELS, PER_TOKEN_KEYS
from aa_lightning.models.unwrap import unwrap

__all__ = ["KTOModule", "mismatched_pairs"]

TOKEN_KEYS = ("input_ids", "attention_mask", LABELS)


def mismatched_pairs(batch: dict[str, Any], pad_token_id: int = 0) -> dict[str, Any]:
    """A batch of (prompt of row ``i``, response of row ``i+1 mod B``) sequences, right-padded.

    Prompt = a row's non-pad tokens before its first labelled token; response = its tokens from there on,
    with their labels. Non-token tensors (media) are carried over unchanged, aligned with the prompts (each
    row keeps its own prompt, hence its own media rows). Per-token inputs the batch lists in ``PER_TOKEN_KEYS``
    (e.g. token type ids) are re-paired like the ids: the prompt part of row ``i``, the response part of row
    ``i+1``; a tensor of that shape in a batch that lists none raises (it cannot be told from media).
    """
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch[LABELS]
    size = ids.shape[0]
    prompts: list[torch.Tensor] = []
    responses: list[tuple[torch.Tensor, torch.Tensor]] = []
    starts: list[int] = []
    for i in range(size):
        keep = mask[i].bool()
        row_ids, row_labels = ids[i][keep], labels[i][keep]
        trained = (row_labels != IGNORE_INDEX).nonzero()
        start = int(trained[0]) if len(trained) else row_ids.shape[0]
        starts.append(start)
        prompts.append(row_ids[:start])
        responses.append((row_ids[start:], row_labels[start:]))
    seqs, seq_labels = [], []
    for i in range(size):
        resp_ids, resp_labels = responses[(i + 1) % size]
        seqs.append(torch.cat([prompts[i], resp_ids]))
        seq_labels.append(torch.cat([torch.full_like(prompts[i], IGNORE_INDEX), resp_labels]))
    length = max(int(s.shape[0]) for s in seqs)
    out_ids = ids.new_full((size, length), pad_token_id)
    out_mask = mask.new_zeros((size, length))
    out_labels = labels.new_full((size, length), IGNORE_INDEX)
    for i, (seq, lab) in enumerate(zip(seqs, seq_labels)):
        out_ids[i, : seq.shape[0]] = seq
        out_mask[i, : seq.shape[0]] = 1
        out_labels[i, : lab.shape[0]] = lab
    out: dict[str, Any] = {"input_ids": out_ids, "attention_mask": out_mask, LABELS: out_labels}
    declared = batch.get(PER_TOKEN_KEYS)
    for key, value in batch.items():
        if key in TOKEN_KEYS or not isinstance(value, torch.Tensor):
            continue
        if declared is None and value.dim() >= 2 and value.shape[:2] == ids.shape:
            raise ValueError(
                f"cannot build mismatched KTO pairs for the per-token tensor {key!r}: the batch does not list its "
                f"per-token inputs (batch[{PER_TOKEN_KEYS!r}]), so it cannot be re-paired safely"
            )
        per_token = declared is not None and key in declared
        if not per_token:
            out[key] = value
            continue
        rows = []
        for i in range(size):
            j = (i + 1) % size
            prompt_part = value[i][mask[i].bool()][: starts[i]]
            response_part = value[j][mask[j].bool()][starts[j] :]
            rows.append(torch.cat([prompt_part, response_part]))
        repaired = value.new_zeros((size, length, *value.shape[2:]))
        for i, row in enumerate(rows):
            repaired[i, : row.shape[0]] = row
        out[key] = repaired
    if declared is not None:
        out[PER_TOKEN_KEYS] = declared
    return out


class KTOModule(ReferencePolicyModule):
    """KTO (Ethayarajh et al. 2024) with a frozen reference and an in-batch KL reference point.

    Args:
        beta: reward scale.
        desirable_weight: weight of desirable examples' losses (raise it when they are the minority).
        undesirable_weight: weight of undesirable examples' losses.
        ref_model_name_or_path: a separate reference checkpoint; default: the initial policy (with LoRA: the
            policy with adapters switched off).
        kl_estimate: estimate ``z0`` from mismatched pairs (needs batch_size >= 2); False uses ``z0 = 0``.

    Reference log-probs are not precomputed: the mismatched pairs depend on which rows share a batch.
    Logs ``loss``, ``kl`` (``z0``), ``rewards/{desirable,undesirable,margins}``, ``logps/{desirable,undesirable}``.
    """

    data_kind = "supervised"
    metric_names = (
        "loss",
        "kl",
        "rewards/desirable",
        "rewards/undesirable",
        "logps/desirable",
        "logps/undesirable",
    )

    def __init__(
        self,
        *args: Any,
        beta: float = 0.1,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        kl_estimate: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.beta = beta
        self.desirable_weight = desirable_weight
        self.undesirable_weight = undesirable_weight
        self.kl_estimate = kl_estimate

    def reference_point(self, batch: dict[str, Any]) -> torch.Tensor:
        """``z0``: detached mean policy/reference log-ratio of mismatched pairs (0 if it cannot be estimated)."""
        zero = torch.zeros((), device=batch["input_ids"].device)
        if not self.kl_estimate or batch["input_ids"].shape[0] < 2:
            return zero
        pad = getattr(self.tokenizer, "pad_token_id", None) or 0
        family = unwrap(self.model)
        family = family.get_base_model() if hasattr(family, "get_base_model") else family
        # a family whose outputs are not label tokens (diffusion: images) re-pairs its own batches
        repair = getattr(family, "mismatched_pairs", None)
        kl_batch = repair(batch) if callable(repair) else mismatched_pairs(batch, pad)
        with torch.no_grad():
            policy_kl = self.policy_log_probs(kl_batch).sum
        ref_kl = self.reference_log_probs_live(kl_batch).sum
        if self._trainer is not None and self.trainer.world_size > 1:
            policy_kl = self.all_gather(policy_kl).reshape(-1)
            ref_kl = self.all_gather(ref_kl).reshape(-1)
        return kto_kl_estimate(policy_kl, ref_kl)

    def compute_loss(self, batch: dict[str, Any], stage: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        desirable = (batch.get(EXTRA) or {}).get(DESIRABLE)
        if desirable is None:
            raise ValueError(
                "KTO needs batch['extra']['desirable'] (a bool per row); use a formatter that sets it (template KTO)"
            )
        desirable = desirable.to(batch["input_ids"].device).bool()
        policy = self.policy_log_probs(batch)
        ref = self.reference_log_probs_live(batch)
        z0 = self.reference_point(batch)
        out = kto_loss(
            policy.sum,
            ref.sum.to(policy.sum),
            desirable,
            z0,
            beta=self.beta,
            desirable_weight=self.desirable_weight,
            undesirable_weight=self.undesirable_weight,
        )
        logps = policy.sum.detach()
        stats = {
            "loss": out.losses.detach(),
            "kl": out.kl.detach(),
            "rewards/desirable": out.rewards[desirable],
            "rewards/undesirable": out.rewards[~desirable],
            "logps/desirable": logps[desirable],
            "logps/undesirable": logps[~desirable],
        }
        if desirable.any() and (~desirable).any():
            stats["rewards/margins"] = stats["rewards/desirable"].mean() - stats["rewards/undesirable"].mean()
        return out.loss, stats

    def epoch_stats(self, stage: str) -> dict[str, torch.Tensor]:
        stats = super().epoch_stats(stage)
        if "rewards/desirable" in stats and "rewards/undesirable" in stats:
            stats["rewards/margins"] = stats["rewards/desirable"] - stats["rewards/undesirable"]
        return stats
