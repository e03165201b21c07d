"""Janus as a text -> image family: image codes are scored by its generation head, not by the LM head.

Janus (``JanusForConditionalGeneration``) generates images outside its text vocabulary: a VQ code enters the
language model through ``model.generation_embeddings`` -> ``model.generation_aligner`` and is predicted from
the LM's hidden state by ``model.generation_head`` (a codebook-sized classifier). So label log-probs of
``outputs.logits`` (the text head) mean nothing for its images, and the family answers "how well do you
explain this row's output" itself (:meth:`JanusImageGeneration.explain_outputs`, read through
:func:`~aa_lightning.algorithms.logprobs.output_log_probs`): the unchanged SFT, DPO, KTO ... modules train it.

The batch (written by :class:`~aa_lightning.data.TextToImageTokensDataModule` for a Janus checkpoint)::

    input_ids    <bos><|User|>: {prompt}\\n\\n<|Assistant|>:<begin_of_image>  <img> <img> ... <img>  <pad> ...
    image_codes  -100 ...                                            -100   c_0   c_1  ...  c_n-1  -100 ...
    labels       = image_codes (what the step token counts see)

``<img>`` is the checkpoint's ``<image_placeholder>`` token (its text embedding is replaced, never used);
``image_codes`` (:data:`~aa_lightning.batch.IMAGE_CODES`) holds the codebook index of each image position.
Teacher forcing is exactly image-mode ``generate``'s conditional branch: text positions embedded by the
text embeddings, image positions by ``generation_aligner(generation_embeddings(code))``, hidden state ``t``
-> ``generation_head`` -> log-softmax over the codebook, scored at code ``t + 1``. Classifier-free
guidance only mixes this distribution with the unconditional one at sampling time, so it is not trained
here (Janus's own recipe drops prompts for that; see the report in the data module's doc).

Only the parts of the image path train: the LM, its text embeddings, ``generation_embeddings``, the aligner
and the head. The understanding tower (``vision_model``, ``aligner``), the VQ-VAE and an untied text
``lm_head`` are frozen (never in a generation forward: trainable, they would be DDP's unused parameters).
The export is a plain Janus checkpoint (``architectures: JanusForConditionalGeneration``). KTO needs no
``mismatched_pairs`` of its own: ``image_codes`` is listed in the batch's ``per_token_keys``, so the generic
re-pairing moves the codes with their response.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import JanusForConditionalGeneration

from aa_lightning.batch import IGNORE_INDEX
from aa_lightning.models.latent_diffusion import OutputScores

__all__ = ["JanusImageGeneration"]

_PLAIN = "JanusForConditionalGeneration"


class JanusImageGeneration(JanusForConditionalGeneration):
    """``JanusForConditionalGeneration`` with the family hooks: ``explain_outputs``, ``generate_outputs``."""

    #: teacher forcing has no noise: a row's score depends on the row alone (a reference may be cached)
    deterministic_scores = True

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self.freeze_unused()

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> JanusImageGeneration:
        model = super().from_pretrained(*args, **kwargs)
        model.freeze_unused()  # loading may hand back fresh (trainable) parameters
        return model

    def freeze_unused(self) -> None:
        """No gradients for what image generation never runs (module doc)."""
        for part in (self.model.vision_model, self.model.aligner, self.model.vqmodel):
            part.requires_grad_(False)
        if self.lm_head.weight is not self.get_input_embeddings().weight:
            self.lm_head.requires_grad_(False)
        self.model.vqmodel.eval()

    def train(self, mode: bool = True) -> JanusImageGeneration:
        """The VQ-VAE stays in eval mode (it is frozen; Janus's ``__init__`` says so)."""
        super().train(mode)
        self.model.vqmodel.eval()
        return self

    # -- scoring -----------------------------------------------------------------------------------------
    def code_log_probs(
        self,
        input_ids: torch.Tensor,
        image_codes: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(token_log_probs, mask)``, both ``(N, L - 1)``: ``log p(code_{t+1} | ...)`` (float32) where
        ``image_codes[:, t + 1]`` is a code, 0 elsewhere.

        Every part is called on the whole batch even where it holds no code, so under ZeRO-3 each rank
        gathers the same modules in the same order.
        """
        is_image = image_codes != IGNORE_INDEX
        text = self.get_input_embeddings()(input_ids)
        image = self.prepare_embeddings_for_image_generation(image_codes.clamp(min=0))
        embeds = torch.where(is_image[..., None], image.to(text.dtype), text)
        hidden = self.model.language_model(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        mask = is_image[:, 1:]
        scores = self.model.generation_head(hidden[:, :-1][mask]).float()  # only positions predicting a code
        picked = scores.log_softmax(-1).gather(-1, image_codes[:, 1:][mask][:, None]).squeeze(-1)
        token_lp = torch.zeros(mask.shape, dtype=picked.dtype, device=picked.device)
        return token_lp.masked_scatter(mask, picked), mask

    def explain_outputs(
        self,
        input_ids: torch.Tensor,
        image_codes: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **other: Any,
    ) -> OutputScores:
        """Per row: the summed teacher-forced log-probs of its image codes, and how many codes it has."""
        if image_codes is None or other:
            what = "lacks 'image_codes'" if image_codes is None else f"also holds {sorted(other)}"
            raise KeyError(
                f"JanusImageGeneration scores prompt + image-code batches (input_ids, attention_mask, "
                f"image_codes: the VQ codes, -100 on text); this batch {what}: use TextToImageTokensDataModule "
                "with the Janus checkpoint"
            )
        token_lp, mask = self.code_log_probs(input_ids, image_codes, attention_mask, position_ids)
        return OutputScores(sum=token_lp.sum(-1), count=mask.sum(-1))

    def forward(
        self,
        input_ids: torch.Tensor,
        image_codes: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **other: Any,
    ) -> OutputScores:
        """Same as :meth:`explain_outputs` (DDP, DeepSpeed and peft call forward). Image-mode ``generate`` runs
        the LM and the generation head itself, never this; text-mode generation is not this family's (load
        the export with transformers' ``JanusForConditionalGeneration`` for that)."""
        return self.explain_outputs(input_ids, image_codes, attention_mask, position_ids, **other)

    # -- sampling ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_outputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        generation: Any = None,
        **_: Any,
    ) -> list[Any]:
        """Images for a prompt batch (``aa predict``): image-mode ``generate`` then ``decode_image_tokens``.

        Each row runs alone, unpadded (image-mode ``generate`` numbers positions from the first column, so a
        left-padded row would be placed differently than in training), under its own seed ``seed + row``.
        ``generation`` supplies ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``guidance_scale``
        (classifier-free guidance; <= 1 turns it off) and ``seed``.
        """
        from PIL import Image

        sample = bool(getattr(generation, "do_sample", True))
        call: dict[str, Any] = {
            "generation_mode": "image",
            "do_sample": sample,
            "guidance_scale": float(getattr(generation, "guidance_scale", 5.0)),
        }
        if (
            sample
        ):  # top_k 0 is "off", as for text models (transformers would otherwise apply its default, 50)
            top_k = int(getattr(generation, "top_k", 0))
            call.update(
                temperature=float(getattr(generation, "temperature", 1.0)),
                top_k=top_k if top_k > 0 else None,
                top_p=float(getattr(generation, "top_p", 1.0)),
            )
        seed = int(getattr(generation, "seed", 0))
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        devices = [input_ids.device] if input_ids.device.type == "cuda" else []
        was_training = self.training
        self.eval()
        images = []
        try:
            for row in range(input_ids.shape[0]):
                ids = input_ids[row][attention_mask[row].bool()][None]
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(seed + row)
                    codes = self.generate(inputs=ids, attention_mask=torch.ones_like(ids), **call)
                pixels = self.decode_image_tokens(codes)[0].float()  # (H, W, 3), processor range [-1, 1]
                # JanusImageProcessor.postprocess for mean = std = 0.5 (Janus-Pro's): x * 127.5 + 127.5, clipped
                # and truncated to uint8
                array = ((pixels + 1) * 127.5).clamp(0, 255).to(torch.uint8).cpu().numpy()
                images.append(Image.fromarray(array))
        finally:
            self.train(was_training)
        return images

    # -- persistence -------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """A plain Janus checkpoint: ``config.architectures`` names transformers' class, not this one."""
        super().save_pretrained(save_directory, *args, **kwargs)
        self.config.architectures = [_PLAIN]
        if kwargs.get("is_main_process", True):
            self.config.save_pretrained(save_directory)
