"""Show what training changed: generate answers (or images) to fixed prompts before and after fit."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from aa_lightning.models.unwrap import unwrap


class SampleGenerationCallback(pl.Callback):
    """Greedy answers to ``prompts`` at fit start and fit end, printed and logged to TensorBoard (text).

    Works with any module that has a causal ``model`` (or ``generation_model()``) and a ``tokenizer``. A model
    family that generates media (``generate_outputs``, e.g. diffusion) gets its images logged instead
    (``samples/before/<i>``, ``samples/after/<i>``), sampled with the module's ``generation`` settings.
    """

    def __init__(
        self, prompts: list[str] | None = None, max_new_tokens: int = 48, print_samples: bool = True
    ):
        self.prompts = prompts or ["Give three tips for staying healthy."]
        self.max_new_tokens = max_new_tokens
        self.print_samples = print_samples
        self.before: list[str] = []
        self.after: list[str] = []

    @torch.no_grad()
    def generate(self, pl_module: pl.LightningModule) -> list[Any]:
        get_model = getattr(pl_module, "generation_model", None)
        model = unwrap(get_model() if callable(get_model) else pl_module.model)
        tokenizer = pl_module.tokenizer
        family = model.get_base_model() if hasattr(model, "get_base_model") else model
        if callable(getattr(family, "generate_outputs", None)):
            tokens = tokenizer(
                self.prompts,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).to(pl_module.device)
            return family.generate_outputs(**tokens, generation=getattr(pl_module, "generation", None))
        was_training = model.training
        model.eval()
        answers = []
        for prompt in self.prompts:
            messages = [{"role": "user", "content": prompt}]
            if tokenizer.chat_template:
                text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            else:
                text = f"USER: {prompt}\nASSISTANT: "
            inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(pl_module.device)
            out = model.generate(
                **inputs,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            answers.append(tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
        model.train(was_training)
        return answers

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.before = self.generate(pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.after = self.generate(pl_module)
        self.report(trainer)

    @rank_zero_only
    def report(self, trainer: pl.Trainer) -> None:
        if self.before and not isinstance(self.before[0], str):
            self.report_media(trainer)
            return
        rows: list[Any] = []
        for prompt, before, after in zip(self.prompts, self.before, self.after):
            rows.append(f"### Prompt\n{prompt}\n\n### Before\n{before}\n\n### After\n{after}")
            if self.print_samples:
                print(
                    f"\n=== prompt: {prompt}\n--- before training:\n{before.strip()}\n--- after training:\n{after.strip()}"
                )
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text(
                    "samples/before_after", "\n\n---\n\n".join(rows), trainer.global_step
                )

    def report_media(self, trainer: pl.Trainer) -> None:
        """Generated images before and after, one TensorBoard image each (HWC uint8)."""
        import numpy as np

        for logger in trainer.loggers:
            if not isinstance(logger, TensorBoardLogger):
                continue
            for stage, outputs in (("before", self.before), ("after", self.after)):
                for i, image in enumerate(outputs):
                    pixels = np.asarray(image.convert("RGB"))
                    logger.experiment.add_image(
                        f"samples/{stage}/{i}", pixels, trainer.global_step, dataformats="HWC"
                    )
        if self.print_samples:
            print(
                f"\n=== {len(self.prompts)} prompt(s): generated images logged to TensorBoard (samples/before, after)"
            )
