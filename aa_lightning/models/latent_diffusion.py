"""The latent-diffusion model family's shared part: per-row seeded scoring, frozen VAE and text encoder, modes,
generation and pipeline-folder persistence (the families in :mod:`.diffusion` say how media become latents).

See :mod:`aa_lightning.models.diffusion` for the score and why it makes DPO Diffusion-DPO.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from aa_lightning.models.denoising_policy import TrajectoryPolicyMixin

__all__ = ["PREDICTION_TYPES", "DiffusionConfig", "LatentDiffusion", "OutputScores", "draw_row_noise"]

PREDICTION_TYPES = ("epsilon", "v_prediction")


class OutputScores(NamedTuple):
    """How well a model explains each row's output: ``sum`` of the scored units, and their ``count``."""

    sum: torch.Tensor  # (N,) float32
    count: torch.Tensor  # (N,) int64


@dataclass
class DiffusionConfig:
    """What generic code reads from ``model.config`` (a transformers model's config has the same fields)."""

    model_type: str = "stable-diffusion"
    name_or_path: str = ""
    prediction_type: str = "epsilon"
    num_train_timesteps: int = 1000
    use_cache: bool = False  # set by prepare_trainable with gradient checkpointing; nothing caches here

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)


def draw_row_noise(
    seed: int, latent_shape: torch.Size | tuple[int, ...], num_train_timesteps: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(latent_draw, timestep, noise)`` of one row, drawn in THIS order from a CPU generator seeded ``seed``.

    The order of diffusers' training scripts given one generator: ``latent_dist.sample(generator)`` (the
    posterior sample is ``mean + std * latent_draw``), then ``randint(0, T)``, then ``randn`` for the noise.
    Float32 CPU tensors, so the same values on every device, batch size and batch order.
    """
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    latent_draw = torch.randn(tuple(latent_shape), generator=generator)
    timestep = torch.randint(0, num_train_timesteps, (), generator=generator)
    noise = torch.randn(tuple(latent_shape), generator=generator)
    return latent_draw, timestep, noise


def _gathered_whole_under_zero3(*parts: nn.Module) -> None:
    """Under ZeRO-3, gather each part's parameters once when its forward starts (a DeepSpeed "leaf" module).

    Submodule by submodule gathering breaks where a parent reads a child's weight shape before the child runs
    (CLIP's text embeddings check ``position_embedding.weight.shape``, a 0-element shard outside its forward).
    Only done when DeepSpeed is already imported (it is whenever a DeepSpeed strategy builds the model).
    """
    if "deepspeed" not in sys.modules:
        return
    from deepspeed.utils import set_z3_leaf_modules

    for part in parts:
        set_z3_leaf_modules(part, [type(part)])


class LatentDiffusion(TrajectoryPolicyMixin, nn.Module):
    """A text-conditioned latent diffusion model: ``unet`` (trained), ``vae`` and ``text_encoder`` (frozen).

    The shared part of every media kind: the per-row seeded noise, the score, the frozen parts, saving and
    loading. A subclass says how its media become VAE posteriors in the UNet's latent layout
    (:meth:`posterior`), which batch key holds them (``media_key``), and which diffusers pipeline samples and
    saves it (``pipeline_class``).

    Args:
        unet: a UNet (``UNet2DConditionModel``, ``UNet3DConditionModel``) predicting noise (or v) from
            latents, timestep and text states.
        vae: an ``AutoencoderKL``; its posterior sample, times ``scaling_factor``, is the latent.
        text_encoder: a ``CLIPTextModel`` (or any encoder whose first output is the hidden states).
        tokenizer: the pipeline's tokenizer (prompts are padded to its ``model_max_length``).
        scheduler: the inference scheduler, used by :meth:`generate` and saved with the pipeline.
        noise_scheduler: the training noise schedule; a ``DDPMScheduler`` from ``scheduler``'s config if None.
        name_or_path: where the pipeline came from (for logs and peft).
    """

    #: the batch key of the media the model scores (read by :meth:`explain_outputs`)
    media_key = "pixel_values"
    #: the diffusers pipeline class (a name in ``diffusers``) that samples, saves and loads the model
    pipeline_class = "StableDiffusionPipeline"
    #: the ``model.config.model_type`` generic code reads
    model_type = "stable-diffusion"

    base_model_prefix = ""  # read by peft (through transformers) when it injects LoRA layers
    #: a row's score depends on the batch's noise seed, not on the sample alone, so a reference cannot be
    #: scored once per sample ahead of training (read by the preference modules)
    deterministic_scores = False

    def __init__(
        self,
        unet: nn.Module,
        vae: nn.Module,
        text_encoder: nn.Module,
        tokenizer: Any,
        scheduler: Any,
        noise_scheduler: Any = None,
        name_or_path: str = "",
    ) -> None:
        super().__init__()
        from diffusers import DDPMScheduler

        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.noise_scheduler = noise_scheduler or DDPMScheduler.from_config(scheduler.config)
        self.name_or_path = name_or_path
        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type {prediction_type!r} is not supported; use one of {PREDICTION_TYPES}"
            )
        self.config = DiffusionConfig(
            model_type=self.model_type,
            name_or_path=name_or_path,
            prediction_type=prediction_type,
            num_train_timesteps=int(self.noise_scheduler.config.num_train_timesteps),
        )
        self.requires_grad_(True)
        self.train(self.training)
        _gathered_whole_under_zero3(
            self.text_encoder
        )  # called through its forward (the VAE is not: encode())

    # -- modes: only the UNet ever trains ----------------------------------------------------------------
    def train(self, mode: bool = True) -> LatentDiffusion:
        """The frozen VAE and text encoder stay in eval mode whatever mode the UNet is put in.

        A UNet without active dropout (diffusers' default, ``p == 0`` everywhere) stays in eval mode as well:
        its train mode changes no function, only memory layouts (``ResnetBlock2D`` makes its shortcut input
        contiguous when training), and so the rounding of the next kernels. A training policy and its
        eval-mode reference would then score the same weights differently (by ~1e-7, which DPO's beta of
        2500 turns into a visible margin at the first step). Gradient checkpointing follows
        ``torch.is_grad_enabled()``, not the mode, so it is unaffected.
        """
        super().train(mode)
        self.vae.eval()
        self.text_encoder.eval()
        if not any(isinstance(m, nn.Dropout) and m.p > 0 for m in self.unet.modules()):
            self.unet.eval()
        return self

    def requires_grad_(self, requires_grad: bool = True) -> LatentDiffusion:
        """Only the UNet's parameters follow ``requires_grad``: the VAE and text encoder are never trained, so
        an optimizer over ``model.parameters()`` that skips frozen ones sees the UNet alone."""
        self.unet.requires_grad_(requires_grad)
        self.vae.requires_grad_(False)
        self.text_encoder.requires_grad_(False)
        return self

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict[str, Any] | None = None
    ) -> None:
        """Checkpoint the UNet's blocks (the transformers signature; ``use_reentrant=False`` unless told)."""
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}

        def checkpoint(module: nn.Module, *args: Any) -> Any:
            return torch.utils.checkpoint.checkpoint(module.__call__, *args, **kwargs)

        self.unet.enable_gradient_checkpointing(checkpoint)

    def gradient_checkpointing_disable(self) -> None:
        self.unet.disable_gradient_checkpointing()

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    # -- scoring -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The frozen text encoder's hidden states; the mask is passed only when the encoder's config asks for
        it (``use_attention_mask``), as ``StableDiffusionPipeline.encode_prompt`` does, so training and
        sampling condition on the same states."""
        device = next(self.text_encoder.parameters()).device
        use_mask = (
            getattr(self.text_encoder.config, "use_attention_mask", False) and attention_mask is not None
        )
        mask = attention_mask.to(device) if use_mask else None
        return self.text_encoder(input_ids.to(device), attention_mask=mask)[0]

    def posterior(self, media: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)`` of the frozen VAE's posterior for ``media`` in ``[-1, 1]``, float32, laid out as the
        UNet takes latents (the subclass's media layout)."""
        raise NotImplementedError

    def vae_posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)`` of the VAE's posterior for images ``(n, 3, H, W)``: ``(n, c, h, w)`` float32."""
        vae_param = next(self.vae.parameters())
        posterior = self.vae.encode(pixels.to(device=vae_param.device, dtype=vae_param.dtype)).latent_dist
        return posterior.mean.float(), posterior.std.float()

    @torch.no_grad()
    def noised_latents(
        self, media: torch.Tensor, noise_seed: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_t, timesteps, target)`` for media in ``[-1, 1]``, from the rows' seeds (float32, no grad).

        The latent is the frozen VAE's posterior sample times ``scaling_factor`` (minus ``shift_factor`` first
        where the VAE has one); ``x_t = sqrt(abar_t) * latent + sqrt(1 - abar_t) * noise``; the target is the
        noise, or ``v`` for v-prediction schedules. Each row's draws come from :func:`draw_row_noise` with
        the row's latent shape.
        """
        mean, std = self.posterior(media)
        draws = [
            draw_row_noise(s, mean.shape[1:], self.config.num_train_timesteps) for s in noise_seed.tolist()
        ]
        latent_draw, timesteps, noise = (torch.stack(parts).to(mean.device) for parts in zip(*draws))
        latents = mean + std * latent_draw
        shift = getattr(self.vae.config, "shift_factor", None)
        latents = (latents - shift if shift is not None else latents) * self.vae.config.scaling_factor
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.config.prediction_type == "epsilon":
            target = noise
        else:
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        return noisy, timesteps, target

    def score(
        self,
        media: torch.Tensor,
        input_ids: torch.Tensor,
        noise_seed: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> OutputScores:
        """Per row ``-0.5 * mean((target - prediction)^2)`` over the latent dims (float32), count 1.

        Gradients flow into the UNet only.
        """
        noisy, timesteps, target = self.noised_latents(media, noise_seed)
        hidden = self.encode_prompt(input_ids, attention_mask)
        dtype, device = self.dtype, self.device
        prediction = self.unet(
            noisy.to(device=device, dtype=dtype),
            timesteps.to(device),
            **self.unet_conditioning(hidden.to(device=device, dtype=dtype)),
        ).sample
        mse = (
            (prediction.float() - target.to(prediction.device))
            .pow(2)
            .mean(dim=tuple(range(1, prediction.ndim)))
        )
        return OutputScores(sum=-0.5 * mse, count=torch.ones_like(mse, dtype=torch.long))

    def unet_conditioning(self, text: torch.Tensor) -> dict[str, Any]:
        """How the UNet takes the encoded prompt (cross-attention states; AudioLDM: class embeddings)."""
        return {"encoder_hidden_states": text}

    def explain_outputs(
        self,
        input_ids: torch.Tensor,
        noise_seed: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **inputs: Any,
    ) -> OutputScores:
        """:meth:`score` of the batch's media (``inputs[media_key]``); other batch tensors are ignored."""
        if self.media_key not in inputs:
            raise KeyError(
                f"{type(self).__name__} scores the batch key {self.media_key!r}, which the batch lacks "
                f"(it has {sorted(inputs)}): use the datamodule of this model's media kind"
            )
        return self.score(inputs[self.media_key], input_ids, noise_seed, attention_mask)

    def forward(self, **inputs: Any) -> OutputScores:
        """Same as :meth:`explain_outputs` (so DDP/DeepSpeed wrappers, which call forward, see it)."""
        return self.explain_outputs(**inputs)

    # -- sampling ----------------------------------------------------------------------------------------
    def pipeline(self) -> Any:
        """A ``pipeline_class`` pipeline over these components (no safety checker)."""
        from aa_lightning.models.diffusion_pipeline_io import build_pipeline

        return build_pipeline(self)

    def _sample(self, **call: Any) -> Any:
        """Run :meth:`pipeline` with the UNet in eval mode (its mode is restored)."""
        was_training = self.unet.training
        self.unet.eval()
        try:
            return self.pipeline()(**call)
        finally:
            self.unet.train(was_training)

    def mismatched_pairs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch with row ``i``'s prompt and row ``i+1``'s image (KTO's KL reference point, as for text:
        a prompt with a response written for another prompt); each row keeps its noise seed."""
        out = dict(batch)
        out["pixel_values"] = batch["pixel_values"].roll(-1, dims=0)
        return out

    def generate_outputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        generation: Any = None,
        **_: Any,
    ) -> list[Any]:
        """Outputs for a prompt batch (``aa predict``, sample logging): the family's generation hook (images; a
        video family: lists of frames; audio: waveforms with their sampling rate).

        ``generation`` supplies ``num_inference_steps``, ``guidance_scale`` and ``seed`` (one generator per row,
        seeded ``seed + row``, so a prompt's image does not depend on its batch).
        """
        steps = int(getattr(generation, "num_inference_steps", 25))
        guidance = float(getattr(generation, "guidance_scale", 7.5))
        seed = int(getattr(generation, "seed", 0))
        prompts = self.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
        generators = [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(len(prompts))]
        return self.generate(
            prompts, num_inference_steps=steps, guidance_scale=guidance, generator=generators
        )

    # -- persistence: a diffusers pipeline folder ------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        state_dict: dict[str, torch.Tensor] | None = None,
        safe_serialization: bool = True,
        **kwargs: Any,
    ) -> None:
        """Write a pipeline folder that ``diffusers.DiffusionPipeline.from_pretrained`` loads; see
        :func:`~aa_lightning.models.diffusion_pipeline_io.save_pipeline` for ``state_dict``."""
        from aa_lightning.models.diffusion_pipeline_io import save_pipeline

        save_pipeline(self, save_directory, state_dict, safe_serialization=safe_serialization, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike,
        dtype: torch.dtype | None = None,
        trust_remote_code: bool = False,
        **kwargs: Any,
    ) -> LatentDiffusion:
        """Load a pipeline folder of ``pipeline_class``'s layout (``dtype`` applies to every component)."""
        from aa_lightning.models.diffusion_pipeline_io import load_pipeline_components

        parts = load_pipeline_components(
            folder,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            pipeline_class=cls.pipeline_class,
            **kwargs,
        )
        return cls(**parts, name_or_path=str(folder))
