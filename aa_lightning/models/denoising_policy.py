"""The denoising chain of a latent diffusion model as a policy (DDPO, Black et al. 2023, arXiv:2305.13301).

A DDIM step with ``eta > 0`` draws ``x_{t-1} ~ N(mean(x_t, eps_theta), std_t^2 I)`` (Song et al. 2021, eq. 12):

    x0_hat   = (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t)                   (v-prediction: sqrt(a_t) x_t - sqrt(1 - a_t) v)
    std_t    = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    mean     = sqrt(a_prev) * x0_hat + sqrt(1 - a_prev - std_t^2) * eps

(``a`` = the cumulative product of the alphas), exactly what ``diffusers.DDIMScheduler.step`` computes before it
adds ``std_t * noise``. Each step is an action; its log-prob is the Gaussian log density of the drawn
``x_{t-1}``, AVERAGED over the latent dimensions as in DDPO's ``ddim_step_with_logprob``: a sum over 16k
dimensions would make every importance ratio ``exp(16k * mean difference)``, which is why DDPO's clip range is
``1e-4``. With classifier-free guidance the step uses the guided noise, in the sampler and in the log-probs.

Rollouts are sampled with a DDIM scheduler built from the pipeline's scheduler config (as DDPO does for Stable
Diffusion's PNDM default); the pipeline's own scheduler is not changed, so the export samples as before. The
noise of row ``i`` comes from a CPU generator seeded ``seed + i`` in the order ``StableDiffusionPipeline`` draws
it (initial latents, then each step's noise), so a rollout is the pipeline's sample with ``eta`` and the same
generators, on any device and batch.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from aa_lightning.models.trajectories import SampledTrajectories, StepLogProbs

__all__ = ["DDIMPolicy", "ddim_step_distribution", "gaussian_entropy", "gaussian_log_prob"]

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _rows(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-row ``(N,)`` value shaped to broadcast over ``like`` ``(N, ...)`` (float32)."""
    return value.to(device=like.device, dtype=torch.float32).view(-1, *([1] * (like.ndim - 1)))


def ddim_step_distribution(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    alpha_prod_t: torch.Tensor,
    alpha_prod_t_prev: torch.Tensor,
    eta: torch.Tensor,
    prediction_type: str = "epsilon",
    clip_sample_range: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, std)`` of ``x_{t-1}`` given ``x_t`` (``sample``) and the model's output (module doc), float32.

    ``alpha_prod_t``, ``alpha_prod_t_prev`` and ``eta`` are per row ``(N,)``; ``std`` is ``(N, 1, ...)``.
    ``clip_sample_range`` clamps the predicted ``x0`` as the scheduler's ``clip_sample`` does.
    """
    x_t, out = sample.float(), model_output.float()
    a_t, a_prev, eta = _rows(alpha_prod_t, x_t), _rows(alpha_prod_t_prev, x_t), _rows(eta, x_t)
    if prediction_type == "epsilon":
        x0, eps = (x_t - (1 - a_t).sqrt() * out) / a_t.sqrt(), out
    elif prediction_type == "v_prediction":
        x0, eps = a_t.sqrt() * x_t - (1 - a_t).sqrt() * out, a_t.sqrt() * out + (1 - a_t).sqrt() * x_t
    else:
        raise ValueError(
            f"prediction_type {prediction_type!r}: denoising policies take epsilon or v_prediction"
        )
    if clip_sample_range is not None:
        x0 = x0.clamp(-clip_sample_range, clip_sample_range)
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * variance.sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).sqrt() * eps
    return mean, std


def gaussian_log_prob(value: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per row ``(N,)``: the mean over dimensions of ``log N(value; mean, std^2)`` (DDPO's convention)."""
    value, mean = value.float(), mean.float()
    log_density = -((value - mean) ** 2) / (2 * std**2) - std.log() - _LOG_SQRT_2PI
    return log_density.flatten(1).mean(dim=1)


def gaussian_entropy(std: torch.Tensor) -> torch.Tensor:
    """Per row ``(N,)``: the entropy per dimension of ``N(., std^2)``, ``0.5 * log(2 pi e std^2)``."""
    return (std.float().flatten(1)[:, 0].log() + _LOG_SQRT_2PI + 0.5).float()


class DDIMPolicy:
    """Samples and scores DDIM trajectories of one :class:`~aa_lightning.models.latent_diffusion.LatentDiffusion`.

    The family supplies ``trajectory_latent_shape()`` (``(C, h, w)`` of its initial noise) and
    ``decode_latents(latents) -> list`` (the outputs the rewards see).
    """

    def __init__(self, family: Any) -> None:
        from diffusers import DDIMScheduler

        self.family = family
        # a final alpha of 1 (``set_alpha_to_one``, diffusers' default for configs that do not say) makes the last
        # step deterministic: std 0, no density, a NaN log-prob. The policy's chain ends at alphas_cumprod[0]
        # instead, as Stable Diffusion's own scheduler configs do.
        self.scheduler = DDIMScheduler.from_config(family.scheduler.config, set_alpha_to_one=False)
        config = self.scheduler.config
        if config.thresholding:
            raise ValueError(
                f"{family.name_or_path or type(family).__name__}: the scheduler uses dynamic thresholding, "
                "which has no step density here; set thresholding: false in its scheduler config"
            )
        self.prediction_type = config.prediction_type
        self.clip_range = float(config.clip_sample_range) if config.clip_sample else None

    # -- the schedule --------------------------------------------------------------------------------
    def steps(self, num_inference_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(timesteps, prev_timesteps)`` ``(T,)`` of ``num_inference_steps`` DDIM steps (-ve: the final step)."""
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        self.scheduler.set_timesteps(num_inference_steps)
        timesteps = self.scheduler.timesteps.to(torch.long).cpu()
        prev = timesteps - self.scheduler.config.num_train_timesteps // num_inference_steps
        a_t, a_prev = self.alphas(timesteps, prev)
        deterministic = (1 - a_t / a_prev) <= 0  # the DDIM variance's factor: 0 when a step does not move
        if deterministic.any():
            raise ValueError(
                f"{getattr(self.family, 'name_or_path', '') or type(self.family).__name__}: DDIM step(s) "
                f"{timesteps[deterministic].tolist()} -> {prev[deterministic].tolist()} are deterministic (the "
                "target alpha equals the current one), so they have no density to train on; set steps_offset: 1 "
                "in the scheduler config (Stable Diffusion's own setting) or use another num_inference_steps"
            )
        return timesteps, prev

    def alphas(
        self, timesteps: torch.Tensor, prev_timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cumulative alphas at the steps and their targets (``final_alpha_cumprod`` past the last step)."""
        table = self.scheduler.alphas_cumprod.float()
        final = torch.as_tensor(self.scheduler.final_alpha_cumprod, dtype=torch.float32)
        t, prev = timesteps.cpu(), prev_timesteps.cpu()
        a_prev = torch.where(prev >= 0, table[prev.clamp(min=0)], final)
        return table[t], a_prev

    # -- the model -----------------------------------------------------------------------------------
    def text_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, guided: bool) -> Any:
        """``(prompt states, unconditional states | None)``: the empty prompt of the same padded length, as
        ``StableDiffusionPipeline.encode_prompt`` builds it for classifier-free guidance."""
        family = self.family
        cond = family.encode_prompt(input_ids, attention_mask)
        if not guided:
            return cond, None
        empty = family.tokenizer(
            [""] * input_ids.shape[0],
            padding="max_length",
            max_length=input_ids.shape[1],
            truncation=True,
            return_tensors="pt",
        )
        return cond, family.encode_prompt(empty.input_ids, empty.attention_mask)

    def prediction(
        self, latents: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor, uncond: Any, guidance: float
    ) -> torch.Tensor:
        """The (guided) UNet output for ``latents`` ``(n, ...)`` at ``timesteps`` ``(n,)`` (float32)."""
        family = self.family
        dtype, device = family.dtype, family.device
        x = self.scheduler.scale_model_input(latents, timesteps).to(device=device, dtype=dtype)
        t = timesteps.to(device)
        if uncond is None:
            return family.unet(x, t, **family.unet_conditioning(cond.to(device, dtype))).sample.float()
        states = torch.cat([uncond, cond]).to(device, dtype)
        both = family.unet(torch.cat([x, x]), torch.cat([t, t]), **family.unet_conditioning(states)).sample
        out_uncond, out_text = both.float().chunk(2)
        return out_uncond + guidance * (out_text - out_uncond)

    # -- sampling ------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        generation: Any,
        seed: int,
        stochastic: bool = True,
    ) -> SampledTrajectories:
        """One trajectory per row (module doc); ``stochastic=False`` samples with ``eta = 0`` (deterministic)."""
        steps = int(getattr(generation, "num_inference_steps", 50))
        guidance = float(getattr(generation, "guidance_scale", 7.5))
        eta = float(getattr(generation, "eta", 1.0)) if stochastic else 0.0
        if stochastic and eta <= 0:
            raise ValueError(
                f"generation.eta = {eta}: a deterministic DDIM step has no density, so its log-prob is "
                "undefined; sample with eta > 0 (1.0 is DDPM-like, DDPO's default)"
            )
        n, device = input_ids.shape[0], self.family.device
        timesteps, prevs = self.steps(steps)
        a_t, a_prev = self.alphas(timesteps, prevs)
        generators = [torch.Generator(device="cpu").manual_seed(int(seed) + i) for i in range(n)]

        def noise(shape: tuple[int, ...]) -> torch.Tensor:  # the pipeline's per-generator draws
            return torch.cat([torch.randn((1, *shape), generator=g) for g in generators]).to(device)

        shape = tuple(self.family.trajectory_latent_shape())
        x = noise(shape) * self.scheduler.init_noise_sigma
        cond, uncond = self.text_states(input_ids, attention_mask, guided=guidance > 1.0)
        latents, log_probs = [x], []
        eta_rows = torch.full((n,), eta)
        for k in range(len(timesteps)):
            t = timesteps[k].repeat(n)
            out = self.prediction(x, t, cond, uncond, guidance)
            mean, std = ddim_step_distribution(
                x, out, a_t[k].repeat(n), a_prev[k].repeat(n), eta_rows, self.prediction_type, self.clip_range
            )
            if stochastic:
                x = mean + std * noise(shape)
                log_probs.append(gaussian_log_prob(x, mean, std))
            else:
                x = mean
                log_probs.append(torch.zeros(n, device=device))
            latents.append(x)
        trajectory = {
            "latents": torch.stack(latents, dim=1),  # (N, T + 1, C, h, w): x_T ... x_0
            "prev_timesteps": prevs.repeat(n, 1).to(device),
            "eta": eta_rows.to(device),
            "guidance_scale": torch.full((n,), guidance, device=device),
        }
        return SampledTrajectories(
            trajectory=trajectory,
            timesteps=timesteps.repeat(n, 1).to(device),
            log_probs=torch.stack(log_probs, dim=1),
            outputs=self.family.decode_latents(x),
        )

    # -- scoring -------------------------------------------------------------------------------------
    def log_probs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        timesteps: torch.Tensor,
        trajectory: dict[str, torch.Tensor],
    ) -> StepLogProbs:
        """Step log-probs ``(N, T)`` of recorded trajectories under the current weights (one batched UNet call
        over all ``N * T`` steps, with gradients), and each step's Gaussian entropy per dimension."""
        latents, eta = trajectory["latents"], trajectory["eta"]
        n, steps = timesteps.shape
        if (eta <= 0).any():
            raise ValueError(
                "these trajectories were sampled without noise (eta = 0, e.g. do_sample: false): a "
                "deterministic step has no density, so there is no log-prob to train on"
            )
        guidance = trajectory["guidance_scale"]
        if not torch.all(guidance == guidance[0]):
            raise ValueError("trajectories of one batch must share their guidance_scale")
        g = float(guidance[0])
        cond, uncond = self.text_states(input_ids, attention_mask, guided=g > 1.0)
        x_t = latents[:, :-1].flatten(0, 1)
        x_prev = latents[:, 1:].flatten(0, 1)
        t, prev = timesteps.flatten(), trajectory["prev_timesteps"].flatten()
        a_t, a_prev = self.alphas(t, prev)
        out = self.prediction(
            x_t,
            t,
            cond.repeat_interleave(steps, dim=0),
            None if uncond is None else uncond.repeat_interleave(steps, dim=0),
            g,
        )
        mean, std = ddim_step_distribution(
            x_t, out, a_t, a_prev, eta.repeat_interleave(steps), self.prediction_type, self.clip_range
        )
        log_probs = gaussian_log_prob(x_prev, mean, std).view(n, steps)
        return StepLogProbs(log_probs, gaussian_entropy(std).view(n, steps))


class TrajectoryPolicyMixin:
    """The trajectory hooks of :mod:`.trajectories` for a latent-diffusion family (mixed into
    :class:`~aa_lightning.models.latent_diffusion.LatentDiffusion`): its denoising chain as a policy, sampled and
    scored by one :class:`DDIMPolicy`. A family supplies ``trajectory_latent_shape`` and ``decode_latents``."""

    def sample_trajectories(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        generation: Any,
        seed: int,
        stochastic: bool = True,
    ) -> SampledTrajectories:
        """DDIM trajectories (``generation.eta``) of the prompts, decoded (:mod:`.denoising_policy`)."""
        return self._trajectory_policy().sample(input_ids, attention_mask, generation, seed, stochastic)

    def trajectory_log_probs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        timesteps: torch.Tensor,
        trajectory: dict[str, torch.Tensor],
    ) -> StepLogProbs:
        """Step log-probs ``(N, T)`` of recorded trajectories under the current UNet (with gradients)."""
        return self._trajectory_policy().log_probs(input_ids, attention_mask, timesteps, trajectory)

    def _trajectory_policy(self) -> DDIMPolicy:
        if "_ddim_policy" not in self.__dict__:
            self.__dict__["_ddim_policy"] = DDIMPolicy(self)
        return self.__dict__["_ddim_policy"]

    def trajectory_latent_shape(self) -> tuple[int, ...]:
        """The shape of one row's initial noise (the family's latent layout at its default size)."""
        raise NotImplementedError(f"online RL (trajectories) is not implemented for {type(self).__name__}")

    def decode_latents(self, latents: torch.Tensor) -> list[Any]:
        """Final latents -> one output per row (what the rewards see)."""
        raise NotImplementedError(f"online RL (trajectories) is not implemented for {type(self).__name__}")
