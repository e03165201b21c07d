"""Which rows of each processor output belong to which sequence of a multimodal batch.

Processors stack media tensors per media item, not per sequence: LLaVA's ``pixel_values`` has one row per
image, Qwen2-VL's one row per image *patch* (``image_grid_thw`` holds each image's ``t * h * w``), and a
sequence may have 0, 1 or several items. Whoever repeats a prompt batch (GRPO groups) or takes a subset
of its sequences (PPO minibatches) must know those rows. The collator knows how many items of each kind it
gave each sequence, so it states the rows here (:data:`aa_lightning.batch.MEDIA_ROWS`) and the algorithms
stay modality-free (:func:`aa_lightning.batch.select_sequences`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

__all__ = ["MEDIA_OUTPUTS", "media_rows_per_sequence"]

#: Processor outputs stacked per media item, by media kind (the meta key), and the output that gives each
#: item's row count when an item spans several rows (flattened patches). Outputs not listed are matched
#: by their first dimension (a per-sequence tensor, or the item count of exactly one kind). Listing a key says
#: its layout is per item for every processor that writes it; processors that pad media per sequence
#: (``(N, max_images, ...)``, e.g. Idefics' ``pixel_attention_mask``) must not be listed.
MEDIA_OUTPUTS: dict[str, tuple[frozenset[str], str | None]] = {
    "images": (
        frozenset({"pixel_values", "image_grid_thw", "image_sizes"}),
        "image_grid_thw",
    ),
    "videos": (
        frozenset({"pixel_values_videos", "video_grid_thw", "second_per_grid_ts"}),
        "video_grid_thw",
    ),
    "audios": (frozenset({"input_features", "feature_attention_mask", "input_features_mask"}), None),
}


def _rows_of_items(
    outputs: Mapping[str, torch.Tensor], kind: str, counts: Sequence[int]
) -> list[torch.Tensor]:
    """Candidate per-item row counts of one media kind: one row per item, and the grid's when it has one."""
    n_items = sum(counts)
    candidates = [torch.ones(n_items, dtype=torch.long)]
    grid_key = MEDIA_OUTPUTS.get(kind, (frozenset(), None))[1]
    grid = outputs.get(grid_key) if grid_key else None
    if isinstance(grid, torch.Tensor) and grid.dim() == 2 and grid.shape[0] == n_items:
        candidates.append(grid.long().prod(dim=-1).cpu())
    return candidates


def _per_sequence(item_rows: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Sum the rows of each sequence's items (items are stacked in sequence order)."""
    owner = torch.repeat_interleave(
        torch.arange(len(counts)), torch.as_tensor(list(counts), dtype=torch.long)
    )
    return torch.zeros(len(counts), dtype=torch.long).index_add_(0, owner, item_rows)


def media_rows_per_sequence(
    outputs: Mapping[str, torch.Tensor],
    counts: Mapping[str, Sequence[int]],
    num_sequences: int,
    skip: frozenset[str] = frozenset(),
) -> dict[str, torch.Tensor]:
    """``{output key: (N,) long rows each sequence owns}`` for every output that is not one row a sequence.

    ``counts[kind][i]`` is how many items of media ``kind`` sequence ``i`` has. An output whose first
    dimension is ``num_sequences`` and that is not a listed media output needs no entry. An output that
    cannot be attributed (its row count matches no kind, or several) is left out: repeating or splitting
    such a batch then fails with a message naming it (:func:`aa_lightning.batch.select_sequences`).
    """
    rows: dict[str, torch.Tensor] = {}
    for key, value in outputs.items():
        if key in skip or not isinstance(value, torch.Tensor) or value.dim() == 0:
            continue
        listed = [kind for kind, (keys, _) in MEDIA_OUTPUTS.items() if key in keys and kind in counts]
        if not listed and value.shape[0] == num_sequences:
            continue  # one row a sequence: the default layout
        kinds = listed or list(counts)
        matches = []
        for kind in kinds:
            for item_rows in _rows_of_items(outputs, kind, counts[kind]):
                if int(item_rows.sum()) == value.shape[0]:
                    matches.append(_per_sequence(item_rows, counts[kind]))
                    break
        distinct = {tuple(m.tolist()) for m in matches}
        if len(distinct) == 1:
            rows[key] = matches[0]
    return rows
