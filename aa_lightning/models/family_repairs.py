"""Per-family repairs applied to every loaded model: what a transformers class gets wrong for training.

Each repair is keyed by the class name of the submodule it fixes, so any checkpoint that contains that
submodule (a Qwen2-Audio chat model, its score model, a frozen reference) gets it, and nothing outside
``aa_lightning.models`` has to know about the family.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

__all__ = ["REPAIRS", "repair_loaded_model"]


def _qwen2_audio_encoder(encoder: nn.Module) -> None:
    """Qwen2-Audio's encoder adds ``embed_positions.weight`` by reading the tensor, not calling the module.

    * The table is a fixed sinusoid that ``__init__`` freezes; ``from_pretrained`` loses that flag (except on
      the ZeRO-3 path), so it would train on one strategy and not on another. Freeze it again.
    * ZeRO-3 gathers a parameter when the module owning it runs; ``embed_positions`` never runs, so its shard
      (0 elements) reached the addition. Registered as an external parameter of the encoder, it is gathered
      with the encoder's forward.
    """
    positions = getattr(encoder, "embed_positions", None)
    if positions is None:
        return
    positions.requires_grad_(False)
    weight = positions.weight
    if hasattr(weight, "ds_id"):
        import deepspeed

        deepspeed.zero.register_external_parameter(encoder, weight)


def _frozen_vqvae(vqmodel: nn.Module) -> None:
    """Emu3's and Janus's VQ-VAEs are frozen (their ``__init__`` says so and calls ``eval()``) but their weights
    load trainable.

    Image tokens reach the LM as token ids (Emu3) or codes (Janus), so the VQ-VAE never runs in a training
    forward: trainable, its weights would be "unused parameters" under DDP and dead optimizer entries
    everywhere. Freeze it.
    """
    vqmodel.requires_grad_(False)
    vqmodel.eval()


REPAIRS: dict[str, Callable[[nn.Module], None]] = {
    "Qwen2AudioEncoder": _qwen2_audio_encoder,
    "Emu3VQVAE": _frozen_vqvae,
    "JanusVQVAE": _frozen_vqvae,
}


def repair_loaded_model(model: nn.Module) -> nn.Module:
    for module in model.modules():
        repair = REPAIRS.get(type(module).__name__)
        if repair is not None:
            repair(module)
    return model
