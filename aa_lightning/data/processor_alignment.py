"""What a processor does to a rendered text, and how the cached labels follow it.

The encoder tokenizes and labels a conversation with each media part as one *unexpanded* placeholder; the
processor later expands every placeholder to one token per media feature. :class:`ProcessorInfo` reads the
placeholders and media tokens a processor uses; :func:`align_to_processor` expands the cached ids and
labels to the processor's ids (every token outside a placeholder run must agree; expanded placeholder
positions get label -100).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aa_lightning.batch import IGNORE_INDEX

__all__ = ["MEDIA_WRAPPER_TOKENS", "AlignmentError", "ProcessorInfo", "align_to_processor"]

# Tokens that wrap a placeholder in some families; never trained on when the tokenizer has them.
MEDIA_WRAPPER_TOKENS = (
    "<|vision_start|>",
    "<|vision_end|>",
    "<|audio_bos|>",
    "<|audio_eos|>",
    "<|vision_bos|>",
    "<|vision_eos|>",
    "<|audio_start|>",
    "<|audio_end|>",
    "<image_start>",
    "<image_end>",
    "<img>",
    "</img>",
)


class AlignmentError(ValueError):
    """The processor's ids disagree with the cached ids outside the media placeholders."""


class ProcessorInfo:
    """What encoding and batching need to know about a processor: its placeholders and media tokens."""

    def __init__(self, processor: Any, tokenizer: Any) -> None:
        self.placeholders: dict[str, str] = {}  # meta key -> placeholder token text
        vocab = tokenizer.get_vocab()
        for key, attr in (("images", "image_token"), ("audios", "audio_token"), ("videos", "video_token")):
            token = getattr(processor, attr, None)
            if isinstance(token, str) and token in vocab:
                self.placeholders[key] = token
        self.placeholder_ids = {tokenizer.convert_tokens_to_ids(t) for t in self.placeholders.values()}
        wrappers = {vocab[t] for t in MEDIA_WRAPPER_TOKENS if t in vocab}
        self.media_token_ids = frozenset(self.placeholder_ids | wrappers)
        extractor = getattr(processor, "feature_extractor", None)
        self.sampling_rate: int | None = getattr(extractor, "sampling_rate", None)
        seconds = getattr(extractor, "chunk_length", None)
        if seconds is None and getattr(extractor, "n_samples", None) and self.sampling_rate:
            seconds = extractor.n_samples / self.sampling_rate
        self.max_audio_seconds: float | None = float(seconds) if seconds else None
        self.bos_token_id = tokenizer.bos_token_id


def align_to_processor(
    ids: Sequence[int],
    labels: Sequence[int] | None,
    processor_ids: Sequence[int],
    placeholder_ids: set[int] | frozenset[int],
    bos_token_id: int | None = None,
) -> tuple[list[int], list[int], list[int]]:
    """Expand cached ``ids``/``labels`` to the processor's ids by run-length alignment on placeholders.

    Returns ``(ids, labels, source)``: ``source[k]`` is the processor position of output token ``k`` (-1
    for a leading BOS the processor did not add). A run of ``n`` placeholder tokens in ``ids`` takes the
    whole run (at least ``n`` long) of the same token in ``processor_ids``; those positions get -100.
    Processor tokens after the end of ``ids`` (a sample cut by ``max_length``) are ignored.
    """
    out_ids: list[int] = []
    out_labels: list[int] = []
    source: list[int] = []
    i = j = 0
    n, m = len(ids), len(processor_ids)

    def fail(reason: str) -> AlignmentError:
        lo = max(0, i - 3)
        return AlignmentError(
            f"{reason} (cached ids[{lo}:{i + 4}] = {list(ids[lo : i + 4])}, processor ids[{max(0, j - 3)}:"
            f"{j + 4}] = {list(processor_ids[max(0, j - 3) : j + 4])}). The processor tokenizes the rendered "
            "text differently from the tokenizer; check the processor's chat template and special tokens."
        )

    while i < n:
        token = ids[i]
        if token in placeholder_ids:
            end = i
            while end < n and ids[end] == token:
                end += 1
            if j >= m or processor_ids[j] != token:
                raise fail(f"placeholder token {token} at position {i} was not expanded by the processor")
            stop = j
            while stop < m and processor_ids[stop] == token:
                stop += 1
            if stop - j < end - i:
                raise fail(f"the processor has {stop - j} placeholder tokens where the text has {end - i}")
            out_ids.extend(processor_ids[j:stop])
            out_labels.extend([IGNORE_INDEX] * (stop - j))
            source.extend(range(j, stop))
            i, j = end, stop
        elif j < m and processor_ids[j] == token:
            out_ids.append(token)
            out_labels.append(labels[i] if labels is not None else IGNORE_INDEX)
            source.append(j)
            i, j = i + 1, j + 1
        elif i == 0 and bos_token_id is not None and token == bos_token_id:
            out_ids.append(token)
            out_labels.append(labels[i] if labels is not None else IGNORE_INDEX)
            source.append(-1)
            i += 1
        else:
            found = processor_ids[j] if j < m else "end of sequence"
            raise fail(f"token mismatch at position {i}: cached {token}, processor {found}")
    return out_ids, out_labels, source
