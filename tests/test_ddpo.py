"""DDPO (Black et al. 2023, arXiv:2305.13301) with the UNCHANGED GRPOModule on a tiny Stable Diffusion.

The family samples its own trajectories (:mod:`aa_lightning.models.trajectories`): each stochastic DDIM step
(eta > 0) is an action whose log-prob is the Gaussian density of ``x_{t-1}`` (:mod:`aa_lightning.models.
denoising_policy`); GRPO's group normalisation is DDPO's per-prompt stat tracking, its clipped per-token loss
over the steps is DDPO-IS. Rewards see the decoded PIL images.
"""

from __future__ import annotations

import math
import os
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from test_rl_modules import Recorder

from aa_lightning.algorithms import GenerationConfig, GRPOModule, OptimConfig, PPOModule
from aa_lightning.algorithms.losses import grpo_advantages
from aa_lightning.data import DataSpec, TextToImageDataModule
from aa_lightning.models.denoising_policy import ddim_step_distribution, gaussian_log_prob
from aa_lightning.models.loading import load_pretrained_models
from aa_lightning.rewards import RewardSpec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = DataSpec(os.path.join(REPO, "configs/data/media/text_to_image/pick_a_pic.json"), "Pick-a-Pic")
RED = [RewardSpec("image_color", kwargs={"color": [255, 0, 0]})]
STEPS = GenerationConfig(num_inference_steps=3, guidance_scale=1.0, eta=1.0)


def prompts(batch_size: int = 2) -> TextToImageDataModule:
    return TextToImageDataModule(
        "tiny-sd", kind="prompt_only", train=PROMPTS, resolution=32, batch_size=batch_size, shuffle=False
    )


def first_batch(batch_size: int = 2) -> dict[str, Any]:
    dm = prompts(batch_size)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def ddpo(**kwargs: Any) -> GRPOModule:
    defaults: dict[str, Any] = dict(
        reward_functions=RED,
        num_generations=4,
        beta=0.0,
        generation=STEPS,
        sample_log_interval=0,
        optim=OptimConfig(lr=1e-3, warmup_steps=0, scheduler="constant"),
    )
    return GRPOModule("tiny-sd", **{**defaults, **kwargs})


def test_step_distribution_matches_hand_numbers_and_the_scheduler():
    # hand numbers: a_t = 0.5, a_prev = 0.8, eta = 1, x_t = 1, eps = 0.5 (epsilon prediction)
    x0 = (1 - math.sqrt(0.5) * 0.5) / math.sqrt(0.5)
    var = (1 - 0.8) / (1 - 0.5) * (1 - 0.5 / 0.8)
    mean = math.sqrt(0.8) * x0 + math.sqrt(1 - 0.8 - var) * 0.5
    one = torch.ones(1)
    m, s = ddim_step_distribution(torch.ones(1, 1), torch.full((1, 1), 0.5), 0.5 * one, 0.8 * one, one)
    assert m.item() == pytest.approx(mean, rel=1e-6) and s.item() == pytest.approx(math.sqrt(var), rel=1e-6)
    value = torch.full((1, 1), 0.3)
    by_hand = -((0.3 - mean) ** 2) / (2 * var) - 0.5 * math.log(var) - 0.5 * math.log(2 * math.pi)
    assert gaussian_log_prob(value, m, s).item() == pytest.approx(by_hand, rel=1e-5)
    # against diffusers' DDIMScheduler.step: its prev_sample with zero noise is the mean, with noise z it
    # is mean + std * z, for both prediction types
    model, _, _ = load_pretrained_models("tiny-sd")
    sched = model._trajectory_policy().scheduler
    sched.set_timesteps(4)
    g = torch.Generator().manual_seed(0)
    x, out, z = (torch.randn(2, 4, 3, 3, generator=g) for _ in range(3))
    for prediction in ("epsilon", "v_prediction"):
        sched.register_to_config(prediction_type=prediction)
        for t in sched.timesteps.tolist():
            prev = t - 1000 // 4
            a_t = sched.alphas_cumprod[t].repeat(2)
            a_prev = (sched.alphas_cumprod[prev] if prev >= 0 else sched.final_alpha_cumprod).repeat(2)
            mean_t, std_t = ddim_step_distribution(x, out, a_t, a_prev, torch.full((2,), 0.7), prediction)
            zero = sched.step(out, t, x, eta=0.7, variance_noise=torch.zeros_like(x)).prev_sample
            noisy = sched.step(out, t, x, eta=0.7, variance_noise=z).prev_sample
            torch.testing.assert_close(mean_t, zero, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(mean_t + std_t * z, noisy, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_rollouts_are_the_pipelines_samples_and_score_themselves(guidance: float):
    """The sampler draws what ``StableDiffusionPipeline`` (DDIM, eta, the same generators) draws; the
    trajectory's log-probs recomputed under the same weights equal the sampler's (ratio 1 at step 0)."""
    from diffusers import DDIMScheduler

    pl.seed_everything(0)
    module = ddpo(generation=GenerationConfig(num_inference_steps=3, guidance_scale=guidance, eta=1.0))
    module.configure_model()
    rollout = module.generate_rollout(first_batch(), num_samples=2)
    assert rollout.response_mask.shape == (4, 3) and rollout.response_mask.all() and rollout.has_eos.all()
    assert all(image.size == (32, 32) for image in rollout.responses)
    family = module.model
    pipe = family.pipeline()
    pipe.scheduler = DDIMScheduler.from_config(family.scheduler.config)
    seed = module.rollout_seed(0)
    out = pipe(
        prompt=rollout.prompts,
        num_inference_steps=3,
        guidance_scale=guidance,
        eta=1.0,
        generator=[torch.Generator().manual_seed(seed + i) for i in range(4)],
        output_type="latent",
    )
    torch.testing.assert_close(rollout.trajectory["latents"][:, -1], out.images, rtol=1e-5, atol=1e-5)
    logprobs, entropy = module.response_log_probs(module.model, rollout, with_entropy=True)
    assert logprobs.requires_grad and entropy.shape == (4, 3)
    torch.testing.assert_close(logprobs.detach(), rollout["sampling_logprobs"], rtol=0, atol=1e-5)
    scores, parts = module.compute_scores(rollout)
    assert scores.shape == (4,) and parts["image_color"].std() > 0


def test_one_ddpo_update_moves_the_step_log_probs_towards_the_advantages():
    """A small gradient step on GRPO's loss over the steps raises ``sum A * log p`` of the rollout, and the
    same seeds then sample images with a higher mean reward (measured: 0.5079 -> 0.5086)."""
    pl.seed_everything(0)
    module = ddpo()
    module.configure_model()
    batch = first_batch()
    rollout = module.generate_rollout(batch, num_samples=4)
    scores, _ = module.compute_scores(rollout)
    adv = grpo_advantages(scores, 4, "std")
    logprobs, _ = module.response_log_probs(module.model, rollout)
    (-(adv[:, None] * logprobs).mean()).backward()
    params = [p for p in module.model.parameters() if p.grad is not None]
    assert params and all(
        n.startswith("unet.") for n, p in module.model.named_parameters() if p.grad is not None
    )
    with torch.no_grad():
        for p in params:
            p -= 1e-2 * p.grad
        moved, _ = module.response_log_probs(module.model, rollout)
        assert (adv[:, None] * (moved - logprobs)).sum() > 0
    again, _ = module.compute_scores(module.generate_rollout(batch, num_samples=4))
    assert again.mean() > scores.mean()


def fit(module: GRPOModule, rollouts: int, *callbacks: Any, batch_size: int = 2) -> pl.Trainer:
    trainer = pl.Trainer(
        max_steps=rollouts,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=list(callbacks),
    )
    trainer.fit(module, prompts(batch_size))
    return trainer


def test_ddpo_raises_the_reward_of_the_generated_images():
    """DDPO learns when a rollout has enough images to average the noise out (DDPO itself uses large batches).

    Measured (seed 0, 3 DDIM steps, eta 1, lr 3e-4, 4 prompts x 8 images a rollout): mean ``image_color``
    0.5089 at the first rollout -> 0.514 by rollout 8 -> 0.5216 at rollout 20; the same 28 seeded
    trajectories score 0.5086 before and 0.5228 after 20 rollouts. With 2 prompts x 4 images (8 a rollout)
    the score rose for 2-3 rollouts and then drifted down (lr 3e-4 and 1e-3, for red, white and black
    targets): the gradient of 8 near-grey images (reward std ~0.004) is mostly noise, and Adam's steps do not
    shrink with it. Here: 12 rollouts (about 25 s on one core; 0.5089 -> 0.5129 over the last four).
    """
    pl.seed_everything(0)
    module = ddpo(num_generations=8, optim=OptimConfig(lr=3e-4, warmup_steps=0, scheduler="constant"))
    rec = Recorder()
    fit(module, 12, rec, batch_size=4)
    scores = rec.series("rollout/score")  # scores[0]: the initial policy's images (sampled before an update)
    assert sum(scores[-4:]) / 4 > scores[0] + 0.002 and min(scores[1:]) > scores[0], scores


def test_beta_runs_with_a_reference_and_starts_at_kl_zero():
    pl.seed_everything(0)
    module = ddpo(beta=0.1, num_iterations=2)
    rec = Recorder()
    fit(module, 2, rec)
    assert module.ref_model is not None
    kl = rec.series("train/kl")
    assert all(math.isfinite(v) for v in kl) and kl[-1] > 0, kl  # k3 >= 0; the policy left the reference
    assert rec.rows[-1]["rollout/response_length"] == 3.0  # T steps per trajectory


def test_kl_to_the_reference_is_zero_at_the_first_rollout():
    pl.seed_everything(0)
    module = ddpo(beta=0.1)
    module.configure_model()
    rollout, _ = module.experience(first_batch())
    logprobs, _ = module.response_log_probs(module.model, rollout)
    torch.testing.assert_close(rollout["ref_logprobs"], logprobs.detach(), rtol=0, atol=1e-6)


def test_ppo_and_reward_models_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="PPO's critic.*no tokens.*GRPOModule"):
        PPOModule("tiny-sd", reward_functions=RED, generation=STEPS).configure_model()
    with pytest.raises(ValueError, match="score model reads token sequences.*reward_functions"):
        ddpo(reward_model_name_or_path="tiny-sd").configure_model()


def test_deterministic_validation_chains_have_no_density():
    module = ddpo()
    module.configure_model()
    rollout = module.generate_rollout(first_batch(), num_samples=1, do_sample=False)
    assert (rollout["sampling_logprobs"] == 0).all()
    with pytest.raises(ValueError, match="without noise"):
        module.response_log_probs(module.model, rollout)
    with pytest.raises(ValueError, match="eta > 0"):
        module.model.sample_trajectories(
            rollout.sequences[:, : rollout.prompt_length], None, SimpleNamespace(eta=0.0), seed=0
        )


def test_every_step_of_a_policy_has_a_density_or_the_schedule_is_refused():
    """Diffusers fills ``set_alpha_to_one=True`` into configs that lack it (Euler, SDXL ...): a final step to
    alpha 1 has std 0 and a NaN log-prob. The policy's chain ends at ``alphas_cumprod[0]`` instead, and a
    schedule whose last step still does not move (t = 0 without ``steps_offset``) is refused with the fix."""
    from diffusers import EulerDiscreteScheduler

    from aa_lightning.models.denoising_policy import DDIMPolicy

    zero_offset = SimpleNamespace(scheduler=EulerDiscreteScheduler(steps_offset=0), name_or_path="euler")
    with pytest.raises(ValueError, match="deterministic.*steps_offset: 1"):
        DDIMPolicy(zero_offset).steps(3)
    family = SimpleNamespace(scheduler=EulerDiscreteScheduler(steps_offset=1), name_or_path="euler")
    policy = DDIMPolicy(family)
    timesteps, prev = policy.steps(3)
    a_t, a_prev = policy.alphas(timesteps, prev)
    assert float(a_prev[-1]) < 1.0  # not set_alpha_to_one's 1
    x = torch.randn(3, 4, 2, 2)
    mean, std = ddim_step_distribution(x, torch.randn_like(x), a_t, a_prev, torch.ones(3), "epsilon")
    assert (std > 0).all() and torch.isfinite(gaussian_log_prob(x, mean, std)).all()
