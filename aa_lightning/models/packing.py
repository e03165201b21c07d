"""Padding-free forwards: the rows of a padded batch run through the transformer as ONE packed sequence.

A padded ``(N, L)`` batch spends every matmul of every layer on its pad positions too; on these preference
and SFT batches that is 35-45% of the positions. :func:`enable_padding_free` hooks the text backbone (the
``PreTrainedModel`` whose ``base_model`` is itself: ``Qwen2Model`` inside ``Qwen2ForCausalLM``, a score
model's backbone) so that a training-style forward (a 2-D ``attention_mask`` with padding, no KV cache):

1. keeps only the real tokens, as one ``(1, T)`` row, with the ``position_ids`` each token had in the padded
   forward (so rotary embeddings see the same positions) and the sequence boundaries ``cu_seq_lens``;
2. runs attention per sequence: ``flash_attention_2/3`` takes ``cu_seq_lens_q/k`` (varlen kernels, GPU);
   elsewhere the attention implementation :data:`PACKED_SDPA` runs torch's SDPA causally on each sequence's
   slice (exact; no ``T x T`` mask, so attention costs ``sum L_i^2`` rather than ``N * L^2``);
3. scatters the last hidden state back to ``(N, L, H)`` (zeros at pad positions), so everything after the
   backbone (LM head, the sparse-LM-head hook, score heads, end-token lookups) sees the usual padded layout.

Losses and gradients equal the padded forward's up to float rounding (tested for SFT, DPO and reward models).
Batches, collators and the batch contract are unchanged: only the backbone's work shrinks. Forwards with a
cache (``generate``), without padding, or with inputs other than token ids (media, ``inputs_embeds``) run
as before. Selecting the real tokens reads the mask on the host (one sync per forward on a GPU).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["PACKED_SDPA", "enable_padding_free", "pack_rows", "packed_sdpa_attention", "text_backbone"]

#: attention implementation name registered with transformers: SDPA per packed sequence, plain SDPA otherwise
PACKED_SDPA = "aa_packed_sdpa"
FLASH = ("flash_attention_2", "flash_attention_3", "flash_attention_4")
_CACHE_KWARGS = ("cache", "past_key_values")
#: keyword inputs a packed forward may carry (anything else, e.g. media, runs the padded forward)
_PACKABLE = {
    "input_ids",
    "attention_mask",
    "position_ids",
    "use_cache",
    "return_dict",
    "output_hidden_states",
    "output_attentions",
    *_CACHE_KWARGS,
}


def packed_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA, run causally on each packed sequence when ``cu_seq_lens_q`` is given.

    Without boundaries (evaluation, ``generate``) this is exactly ``sdpa``. With them, ``attention_mask`` is
    ignored (the packed forward passes none) and every sequence attends only to its own earlier tokens.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.pop("cu_seq_lens_q", None)
    for name in ("cu_seq_lens_k", "max_length_q", "max_length_k"):
        kwargs.pop(name, None)
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if kwargs.get("sliding_window") is not None:
        raise ValueError(
            "padding_free with sliding-window attention needs flash_attention_2 (the SDPA fallback has no window)"
        )
    kwargs["is_causal"] = True
    edges = bounds.tolist()
    outputs = [
        sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, **kwargs)[0]
        for a, b in zip(edges, edges[1:])
        if b > a  # a row without real tokens has no slice
    ]
    return torch.cat(outputs, dim=1), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)


_register()


def text_backbone(model: nn.Module) -> nn.Module:
    """The base (headless) text transformer inside ``model`` (peft wrappers and score models included)."""
    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel) and module.base_model is module:
            config = module.config
            if config.get_text_config() is not config:
                raise ValueError(
                    f"padding_free supports text-only decoders; {type(module).__name__} is multimodal "
                    "(its media inputs are not packed): turn padding_free off"
                )
            return module
    raise ValueError(f"padding_free: no transformers base model found inside {type(model).__name__}")


def pack_rows(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None
) -> dict[str, Any]:
    """The real tokens of a padded batch as one row: ``input_ids`` / ``position_ids`` ``(1, T)``, the flat
    indices ``index`` of those tokens in the ``(N * L)`` layout, and ``cu_seq_lens`` ``(N + 1,)`` int32."""
    rows, length = input_ids.shape
    mask = attention_mask.bool()
    index = mask.reshape(-1).nonzero().squeeze(1)
    if position_ids is None:  # what the padded forward uses: 0..L-1 on every row
        position_ids = torch.arange(length, device=input_ids.device).expand(rows, length)
    else:
        position_ids = position_ids.expand(rows, length)
    lengths = mask.sum(dim=1, dtype=torch.int32)
    cu = torch.zeros(rows + 1, dtype=torch.int32, device=input_ids.device)
    cu[1:] = lengths.cumsum(0)
    return {
        "input_ids": input_ids.reshape(-1)[index].unsqueeze(0),
        "position_ids": position_ids.reshape(-1)[index].unsqueeze(0),
        "index": index,
        "cu_seq_lens": cu,
        "max_length": int(lengths.max()) if rows else 0,
        "shape": (rows, length),
    }


class _PaddingFreeHooks:
    """Pre-hook packs the backbone's inputs, post-hook scatters its hidden states back (module docstring)."""

    def __init__(self, backbone: nn.Module) -> None:
        self.backbone = backbone
        self.pending: list[dict[str, Any]] = []  # one entry per packed forward in flight (nesting-safe)
        backbone.register_forward_pre_hook(self.pre, with_kwargs=True)
        backbone.register_forward_hook(self.post, with_kwargs=True)

    def packable(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids")
        if args or ids is None or mask is None or mask.dim() != 2 or ids.dim() != 2:
            return False
        given = {name for name, value in kwargs.items() if value is not None and value is not False}
        if given - _PACKABLE or kwargs.get("use_cache") or kwargs.get("output_attentions"):
            return False
        if any(kwargs.get(name) is not None for name in _CACHE_KWARGS):
            return False
        position_ids = kwargs.get("position_ids")
        if position_ids is not None and position_ids.shape[-1] != ids.shape[1]:
            return False
        return bool((mask == 0).any())

    def pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not self.packable(args, kwargs):
            self.pending.append({})
            return None
        packed = pack_rows(kwargs["input_ids"], kwargs["attention_mask"], kwargs.get("position_ids"))
        self.pending.append(packed)
        impl = getattr(module.config, "_attn_implementation", None)
        # flash kernels read the boundaries on the device; the SDPA fallback slices by them on the host in
        # every layer, so it gets a host copy made once per forward (no device sync per layer)
        bounds = packed["cu_seq_lens"] if impl in FLASH else packed["cu_seq_lens"].cpu()
        new = dict(kwargs)
        new.update(
            input_ids=packed["input_ids"],
            position_ids=packed["position_ids"],
            use_cache=False,
            cu_seq_lens_q=bounds,
            cu_seq_lens_k=bounds,
            max_length_q=packed["max_length"],
            max_length_k=packed["max_length"],
        )
        # flash kernels take the boundaries and no mask; the SDPA fallback ignores a placeholder 4-D mask
        # (a 4-D mask makes transformers skip building a T x T one)
        new["attention_mask"] = None if impl in FLASH else packed["input_ids"].new_ones((1, 1, 1, 1)).bool()
        return (), new

    def post(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
        packed = self.pending.pop()
        if not packed:
            return None
        rows, length = packed["shape"]
        index = packed["index"]

        def unpack(hidden: torch.Tensor) -> torch.Tensor:
            flat = hidden.new_zeros((rows * length, hidden.shape[-1]))
            return flat.index_copy(0, index, hidden[0]).view(rows, length, hidden.shape[-1])

        if isinstance(output, tuple):  # return_dict=False
            return (unpack(output[0]), *output[1:])
        output.last_hidden_state = unpack(output.last_hidden_state)
        if getattr(output, "hidden_states", None) is not None:
            output.hidden_states = tuple(unpack(h) for h in output.hidden_states)
        return output


def enable_padding_free(model: nn.Module) -> nn.Module:
    """Make ``model``'s training forwards padding-free (module docstring); returns ``model``.

    The backbone keeps a flash-attention implementation; any other is switched to :data:`PACKED_SDPA`
    (``sdpa`` unchanged for unpacked forwards). Idempotent.
    """
    backbone = text_backbone(model)
    if getattr(backbone, "_aa_padding_free", None) is not None:
        return model
    impl = getattr(backbone.config, "_attn_implementation", None)
    if impl not in FLASH and impl != PACKED_SDPA:
        if impl not in (None, "sdpa", "eager"):
            raise ValueError(
                f"padding_free needs flash_attention_2/3 or SDPA attention, not {impl!r} "
                "(attn_implementation)"
            )
        for module in model.modules():  # the backbone and every wrapper that shares its config
            config = getattr(module, "config", None)
            if config is not None and hasattr(module, "set_attn_implementation"):
                module.set_attn_implementation(PACKED_SDPA)
                break
    backbone._aa_padding_free = _PaddingFreeHooks(backbone)
    return model
