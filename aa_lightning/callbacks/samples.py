"""Show what training changes: generate answers (or media) to fixed prompts before, during and after fit.

TensorBoard tags (``step`` = the global step, so the slider of one tag walks through training):

* ``samples/before/<i>``, ``samples/after/<i>``: prompt ``i``'s output at fit start and at fit end;
* ``samples/val/<i>``: the same prompt's output at the end of every ``every_n_validations``-th validation run
  (never in the sanity check);

for a model family with ``generate_outputs`` (or a causal family with a token-output codec that builds its
own prompts, :mod:`aa_lightning.models.token_outputs`: Emu3's images), each tag holds its kind of output: an image (IMAGES tab), a
waveform at the family's sampling rate (AUDIO tab) or a video as a strip of frames (IMAGES tab). Text models
log markdown instead: ``samples/before_after`` at fit end, ``samples/val`` at each validation.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from aa_lightning.callbacks.media_logging import log_generated_output
from aa_lightning.models.token_outputs import token_output_codec
from aa_lightning.models.unwrap import unwrap


class SampleGenerationCallback(pl.Callback):
    """Greedy answers (or a family's generated media) for ``prompts``, printed and logged to TensorBoard.

    Works with any module that has a causal ``model`` (or ``generation_model()``) and a ``tokenizer``; a family
    with ``generate_outputs`` (diffusion: images, audio, video) is sampled with the module's ``generation``
    settings instead. Every rank generates (a ZeRO-3 model needs all ranks in its forward); rank 0 logs.

    Args:
        prompts: the fixed prompts.
        max_new_tokens: answer length of text models.
        print_samples: also print text answers (and a line saying where media went) at fit end.
        every_n_validations: generate at the end of every n-th validation run (0: never, only before/after).
        num_frames: frames of a generated video shown in its strip.
        max_side: generated images and frames are shrunk to at most this many pixels on their longest side.
    """

    def __init__(
        self,
        prompts: list[str] | None = None,
        max_new_tokens: int = 48,
        print_samples: bool = True,
        every_n_validations: int = 1,
        num_frames: int = 4,
        max_side: int = 512,
    ):
        if every_n_validations < 0:
            raise ValueError(f"every_n_validations must be >= 0 (0 turns it off), got {every_n_validations}")
        self.prompts = prompts or ["Give three tips for staying healthy."]
        self.max_new_tokens = max_new_tokens
        self.print_samples = print_samples
        self.every_n_validations = every_n_validations
        self.num_frames = num_frames
        self.max_side = max_side
        self.before: list[Any] = []
        self.after: list[Any] = []
        self.validations = 0  # validation runs seen this fit (sanity check excluded)

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
        codec = token_output_codec(model, tokenizer, getattr(pl_module, "processor", None))
        if codec is not None and callable(getattr(codec, "prompt_inputs", None)):
            return self.generate_token_outputs(model, codec, pl_module)
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

    def generate_token_outputs(self, model: Any, codec: Any, pl_module: pl.LightningModule) -> list[Any]:
        """A causal family whose outputs are not text (Emu3 images): its own prompts, constraint and decoding,
        sampled with the module's ``generation`` settings and seed (the same images at every validation
        for an unchanged model)."""
        inputs, metas = codec.prompt_inputs(self.prompts)
        inputs = {k: v.to(pl_module.device) for k, v in inputs.items()}
        gen = getattr(pl_module, "generation", None)
        overrides = codec.generation_overrides(metas)
        was_training = model.training
        model.eval()
        try:
            devices = (
                [pl_module.device] if pl_module.device.type == "cuda" else []
            )  # training's RNG untouched
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(int(getattr(gen, "seed", 0) or 0))
                out = model.generate(
                    **inputs,
                    do_sample=True,
                    temperature=getattr(gen, "temperature", 1.0) or 1.0,
                    top_k=getattr(gen, "top_k", None),
                    pad_token_id=pl_module.tokenizer.pad_token_id,
                    **overrides,
                )
            return codec.decode(out[:, inputs["input_ids"].shape[1] :], metas)
        finally:
            model.train(was_training)

    # -- hooks ---------------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.validations = 0
        self.before = self.generate(pl_module)
        if self.before and not isinstance(self.before[0], str):
            self.log_media(trainer, "before", self.before)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self.every_n_validations:
            return
        self.validations += 1
        if self.validations % self.every_n_validations:
            return
        outputs = self.generate(pl_module)
        if outputs and isinstance(outputs[0], str):
            self.log_text(trainer, "samples/val", outputs)
        else:
            self.log_media(trainer, "val", outputs)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.after = self.generate(pl_module)
        if self.after and not isinstance(self.after[0], str):
            self.log_media(trainer, "after", self.after)
            if self.print_samples:
                self.print_media_note()
            return
        self.report(trainer)

    # -- logging (rank 0) ----------------------------------------------------------------------------------
    @staticmethod
    def _writers(trainer: pl.Trainer) -> list[Any]:
        return [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]

    @rank_zero_only
    def log_media(self, trainer: pl.Trainer, stage: str, outputs: list[Any]) -> None:
        """Each prompt's output as ``samples/<stage>/<i>`` at the current global step."""
        for writer in self._writers(trainer):
            for i, output in enumerate(outputs):
                log_generated_output(
                    writer,
                    f"samples/{stage}/{i}",
                    output,
                    trainer.global_step,
                    self.num_frames,
                    self.max_side,
                )

    @rank_zero_only
    def log_text(self, trainer: pl.Trainer, tag: str, answers: list[str]) -> None:
        rows = [f"### Prompt\n{p}\n\n### Answer\n{a}" for p, a in zip(self.prompts, answers)]
        for writer in self._writers(trainer):
            writer.add_text(tag, "\n\n---\n\n".join(rows), trainer.global_step)

    @rank_zero_only
    def print_media_note(self) -> None:
        print(
            f"\n=== {len(self.prompts)} prompt(s): generated outputs logged to TensorBoard "
            "(samples/before, samples/val, samples/after)"
        )

    @rank_zero_only
    def report(self, trainer: pl.Trainer) -> None:
        """Text answers before and after, side by side (printed, and ``samples/before_after``)."""
        rows: list[Any] = []
        for prompt, before, after in zip(self.prompts, self.before, self.after):
            rows.append(f"### Prompt\n{prompt}\n\n### Before\n{before}\n\n### After\n{after}")
            if self.print_samples:
                print(
                    f"\n=== prompt: {prompt}\n--- before training:\n{before.strip()}\n--- after training:\n{after.strip()}"
                )
        for writer in self._writers(trainer):
            writer.add_text("samples/before_after", "\n\n---\n\n".join(rows), trainer.global_step)
