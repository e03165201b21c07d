"""Write ``aa predict`` outputs to a JSON-lines file (one generation per line), media outputs as files.

Text answers stand in the line (``response``). Models that generate media (``output``) get a file per row next
to the index, named in the line by its path relative to it: a PIL image as PNG, a list of frames (video) as
an MP4 when PyAV can write one and a side-by-side PNG strip otherwise, audio (``{"audio": array,
"sampling_rate": int}``) as WAV.
"""

from __future__ import annotations

import json
import os
from typing import Any

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter


class JsonlPredictionWriter(BasePredictionWriter):
    """Appends ``{prompt, response, meta}`` rows to ``<dirpath or default_root_dir>/predictions[_rankN].jsonl``."""

    def __init__(self, dirpath: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.dirpath = dirpath
        self._written = 0  # rows written this predict run (names the media files)

    def path(self, trainer: pl.Trainer) -> str:
        directory = self.dirpath or trainer.default_root_dir
        os.makedirs(directory, exist_ok=True)
        suffix = f"_rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        return os.path.join(directory, f"predictions{suffix}.jsonl")

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        open(self.path(trainer), "w").close()
        self._written = 0

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        index = self.path(trainer)
        media_dir = os.path.splitext(index)[0]  # predictions[_rankN]/ next to predictions[_rankN].jsonl
        with open(index, "a") as f:
            for row in prediction:
                if "output" in row:
                    stem = os.path.join(media_dir, f"{self._written:06d}")
                    row = {
                        **row,
                        "output": os.path.relpath(save_media(row["output"], stem), os.path.dirname(index)),
                    }
                self._written += 1
                f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")


def save_media(value: Any, stem: str) -> str:
    """Write one generated output to ``stem`` + its extension; returns the path."""
    from PIL import Image

    os.makedirs(os.path.dirname(stem), exist_ok=True)
    if isinstance(value, Image.Image):
        value.save(stem + ".png")
        return stem + ".png"
    if isinstance(value, dict) and "audio" in value:
        import soundfile

        audio = np.asarray(value["audio"], dtype=np.float32)
        soundfile.write(stem + ".wav", audio.T if audio.ndim == 2 else audio, int(value["sampling_rate"]))
        return stem + ".wav"
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], Image.Image):  # video frames
        frames = [np.asarray(frame.convert("RGB")) for frame in value]
        try:
            import torch
            from torchvision.io import write_video

            write_video(stem + ".mp4", torch.from_numpy(np.stack(frames)), fps=8)
            return stem + ".mp4"
        except Exception:  # no video encoder available: one image, frames side by side
            from aa_lightning.callbacks.media_logging import frame_strip

            Image.fromarray(frame_strip(frames)).save(stem + ".png")
            return stem + ".png"
    raise TypeError(f"cannot save a generated output of type {type(value).__name__}")
