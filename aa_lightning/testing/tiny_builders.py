"""The table of tiny model builders: one ``tiny-*`` alias -> one function ``build(save_dir, seed) -> path``.

:func:`aa_lightning.models.aliases.resolve_model_path` builds an alias once into the model cache, in the
folder ``<alias>-<TINY_VERSION>``; bump ``TINY_VERSION`` whenever a builder's output changes, so that caches
built by an older version are not reused.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from aa_lightning.testing.tiny_audio_diffusion import build_tiny_audioldm
from aa_lightning.testing.tiny_diffusion import build_tiny_sd, build_tiny_t2v
from aa_lightning.testing.tiny_image_generation import build_tiny_emu3
from aa_lightning.testing.tiny_janus import build_tiny_janus
from aa_lightning.testing.tiny_multimodal import build_tiny_llava, build_tiny_qwen2_audio, build_tiny_qwen2_vl
from aa_lightning.testing.tiny_score import TINY_SCORE_BUILDERS
from aa_lightning.testing.tiny_text import build_tiny_llama, build_tiny_qwen2
from aa_lightning.testing.tiny_tool_use import build_tiny_qwen2_tools

TINY_VERSION = "v1"

TINY_BUILDERS: dict[str, Callable[[str | os.PathLike, int], str]] = {
    "tiny-llama": build_tiny_llama,
    "tiny-qwen2": build_tiny_qwen2,
    "tiny-llava": build_tiny_llava,
    "tiny-qwen2-vl": build_tiny_qwen2_vl,
    "tiny-qwen2-audio": build_tiny_qwen2_audio,
    "tiny-sd": build_tiny_sd,
    "tiny-emu3": build_tiny_emu3,
    "tiny-janus": build_tiny_janus,
    "tiny-t2v": build_tiny_t2v,
    "tiny-audioldm": build_tiny_audioldm,
    **TINY_SCORE_BUILDERS,  # <family>-score: the family's tiny model + a fixed score head (a frozen reward model)
    "tiny-qwen2-tools": build_tiny_qwen2_tools,  # warm-started to call the calculator (multi-turn RL demos)
}
