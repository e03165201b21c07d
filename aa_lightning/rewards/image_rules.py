"""Built-in rule rewards on generated images (the decoded outputs of an image family's rollouts).

An image family's rollouts reach the reward functions as ``PIL.Image`` responses
(:mod:`aa_lightning.models.token_outputs`), so an image rule is an ordinary reward function whose
``response`` is an image. A text response is refused with the reason: a config that pairs an image rule with
a text model is a mistake that would otherwise train on garbage.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from aa_lightning.rewards.registry import register_reward

__all__ = ["image_color"]


def _pixels(response: Any, reward: str) -> np.ndarray:
    if not hasattr(response, "convert"):
        raise TypeError(
            f"reward {reward!r} scores generated images, but the response is a {type(response).__name__}: "
            "use it with an image-output model (e.g. Emu3 on image-token prompts)"
        )
    return np.asarray(response.convert("RGB"), dtype=np.float32)


@register_reward("image_color")
def image_color(
    prompt: str, response: Any, meta: dict[str, Any], color: Sequence[float] = (255.0, 0.0, 0.0)
) -> float:
    """How close the image is to one colour: ``1 - mean_pixels |rgb - color|_1 / (3 * 255)``, in [0, 1].

    ``meta["color"]`` (a row's own target) wins over the ``color`` argument.
    """
    target = np.asarray(meta.get("color", color), dtype=np.float32)
    if target.shape != (3,) or not ((target >= 0) & (target <= 255)).all():
        raise ValueError(
            f"image_color: the colour must be three RGB values in [0, 255], got {target.tolist()}"
        )
    distance = np.abs(_pixels(response, "image_color") - target).sum(axis=-1).mean()
    return float(1.0 - distance / (3 * 255.0))
