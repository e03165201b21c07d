"""The SAME SFTModule and DPOModule train a text-to-image diffusion model (diffusers UNet + VAE + CLIP text
encoder): the model family answers "how well does this model explain this output" (``explain_outputs``: the
noise's Gaussian log-likelihood, -0.5 * MSE, at a per-pair noise and timestep), the algorithm supplies the
objective. Diffusion-DPO (Wallace et al. 2023, arXiv:2311.12908) is then DPO's sigmoid loss with the paper's
beta; these tests check it against the paper's formula, show SFT and DPO learn, and that the export is a
diffusers pipeline folder that loads and generates.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image
from quick_training import fixed_batch
from quick_training import quiet_trainer as trainer

from aa_lightning.algorithms import DPOModule, OptimConfig, SFTModule
from aa_lightning.algorithms.losses import dpo_loss
from aa_lightning.batch import model_inputs
from aa_lightning.data import DataSpec, TextToImageDataModule

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T2I = os.path.join(REPO, "configs", "data", "media", "text_to_image")
PHOTOS = [os.path.join(T2I, "images", n) for n in sorted(os.listdir(os.path.join(T2I, "images")))] + [
    os.path.join(REPO, "configs", "data", "media", "image", n)
    for n in ("baking.jpg", "bathroom.jpg", "pizza.jpg")
]
OPTIM = OptimConfig(lr=1e-3, warmup_steps=0, scheduler="constant")


def datamodule(path: str, template: str, kind: str, batch_size: int = 2) -> TextToImageDataModule:
    return TextToImageDataModule(
        "tiny-sd",
        train=DataSpec(path, template),
        kind=kind,
        resolution=32,
        batch_size=batch_size,
        shuffle=False,
    )


# --------------------------------------------------------------------------------------------------
# the loss: the paper's formula on hand-computed numbers
# --------------------------------------------------------------------------------------------------


def test_diffusion_dpo_is_dpo_on_minus_half_the_denoising_errors() -> None:
    """Wallace et al. eq. 14 (with T * omega(lambda_t) folded into beta, as their reference code does):
    ``L = -log sigmoid(-beta/2 * ((mse_w - mse_ref_w) - (mse_l - mse_ref_l)))``."""
    beta = 2500.0
    mse_w, mse_ref_w, mse_l, mse_ref_l = 0.1210, 0.1230, 0.0990, 0.0985
    # by hand: (0.1210 - 0.1230) - (0.0990 - 0.0985) = -0.0020 - 0.0005 = -0.0025; -1250 * -0.0025 = 3.125
    inside = 3.125
    expected = math.log1p(math.exp(-inside))  # -log sigmoid(x) = log(1 + e^-x) = log(1.0439369) = 0.0429991
    assert abs(expected - 0.0429991) < 1e-6
    out = dpo_loss(
        torch.tensor([-0.5 * mse_w], dtype=torch.float64),
        torch.tensor([-0.5 * mse_l], dtype=torch.float64),
        torch.tensor([-0.5 * mse_ref_w], dtype=torch.float64),
        torch.tensor([-0.5 * mse_ref_l], dtype=torch.float64),
        beta=beta,
        loss_type="sigmoid",
    )
    assert abs(out.loss.item() - expected) < 1e-9
    # implicit rewards: beta * (log-lik - ref log-lik) = -beta/2 * (mse - mse_ref)
    assert abs(out.chosen_rewards.item() - (-1250 * (mse_w - mse_ref_w))) < 1e-9
    assert abs(out.rejected_rewards.item() - (-1250 * (mse_l - mse_ref_l))) < 1e-9


def test_dpo_module_on_a_diffusion_model_computes_the_papers_loss_from_denoising_errors() -> None:
    """The module's loss equals the formula from the denoising errors of each row scored alone, by the policy
    and by the frozen reference: chosen and rejected share noise and timestep, and so do policy and reference."""
    pl.seed_everything(0)
    module = DPOModule("tiny-sd", beta=2500.0, optim=OPTIM)
    module.configure_model()
    batch = fixed_batch(datamodule(os.path.join(T2I, "aa_t2i.json"), "AA_T2I", "preference"))
    n = batch["input_ids"].shape[0]
    half = n // 2
    assert torch.equal(batch["noise_seed"][:half], batch["noise_seed"][half:])
    with torch.no_grad():  # one step on the policy so that policy and reference differ
        for p in module.model.unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
        loss, stats = module.compute_loss(batch, "train")
        inputs = model_inputs(batch)
        reference = module.frozen.get("reference")

        def mse(model: torch.nn.Module, row: int) -> float:
            alone = {k: v[row : row + 1] for k, v in inputs.items()}
            return -2.0 * float(model(**alone).sum)

        terms = []
        for i in range(half):
            w, lo = i, i + half
            inside = (
                -0.5
                * 2500.0
                * ((mse(module.model, w) - mse(reference, w)) - (mse(module.model, lo) - mse(reference, lo)))
            )
            terms.append(math.log1p(math.exp(-inside)))
    assert abs(float(loss) - sum(terms) / half) < 1e-4 * max(1.0, sum(terms) / half)
    assert stats["rewards/margins"].abs().max() > 0  # the perturbed policy is not the reference


# --------------------------------------------------------------------------------------------------
# learning
# --------------------------------------------------------------------------------------------------


def test_sft_lowers_the_denoising_loss_on_a_fixed_batch() -> None:
    pl.seed_everything(0)
    module = SFTModule("tiny-sd", optim=OPTIM)
    dm = datamodule(os.path.join(T2I, "prompt_image.json"), "T2I-Prompt-Image", "supervised", batch_size=4)
    module.configure_model()
    batch = fixed_batch(dm)

    def loss() -> float:  # the denoising loss of the batch: 0.5 * MSE, averaged over its rows
        with torch.no_grad():
            nll, count = module.token_nll(batch)
        return float(nll / count)

    before = loss()
    trainer(12).fit(module, dm)
    after = loss()
    assert math.isfinite(before) and after < 0.9 * before, (before, after)


def corrupted(path: str, out: Path) -> str:
    """The photo with its colours inverted and half its pixels replaced by noise: a clearly worse image."""
    image = np.asarray(Image.open(path).convert("RGB").resize((32, 32)), dtype=np.float32)
    rng = np.random.default_rng(zlib.crc32(os.path.basename(path).encode()))  # the same in every process
    noise = rng.uniform(0, 255, image.shape).astype(np.float32)
    mask = rng.uniform(size=image.shape[:2])[..., None] < 0.5
    worse = np.where(mask, noise, 255 - image).clip(0, 255).astype(np.uint8)
    target = out / f"worse_{os.path.basename(path)}.png"
    Image.fromarray(worse).save(target)
    return str(target)


def preference_file(photos: list[str], out: Path, name: str) -> str:
    rows = []
    for i, photo in enumerate(photos):
        good, bad = os.path.abspath(photo), corrupted(photo, out)
        first, second, better = (good, bad, 1) if i % 2 == 0 else (bad, good, 2)
        rows.append(
            {"prompt": f"a photo number {i}", "image_1": first, "image_2": second, "overall_image": better}
        )
    path = out / name
    path.write_text(json.dumps(rows))
    return str(path)


def held_out_margin(module: DPOModule, dm: TextToImageDataModule, passes: int = 6) -> tuple[float, float]:
    """Mean reward margin of the held-out pairs and the share of positive ones, over ``passes`` fixed noise draws
    (one draw per pair is a single timestep: too noisy to judge by)."""
    margins = []
    dm.setup("fit")
    with torch.no_grad():
        for draw in range(passes):
            pl.seed_everything(100 + draw)
            for batch in dm.train_dataloader():
                _, stats = module.compute_loss(batch, "val")
                margins.append(stats["rewards/margins"])
    values = torch.cat(margins)
    return float(values.mean()), float((values > 0).float().mean())


def test_dpo_raises_the_chosen_minus_rejected_margin_on_held_out_pairs(tmp_path: Path) -> None:
    """Pairs of a photo and a corrupted copy: trained on 6, the margin grows on 3 pairs it never saw.

    Measured (24 steps, lr 1e-3): held-out margin 2.6 with 67% of (pair, noise) draws positive; the 6 trained
    pairs 6.8 and 97%. At the start the margin is exactly 0 (policy == reference)."""
    train_file = preference_file(PHOTOS[:6], tmp_path, "train.json")
    held_file = preference_file(PHOTOS[6:], tmp_path, "held_out.json")
    pl.seed_everything(0)
    module = DPOModule("tiny-sd", beta=2500.0, optim=OPTIM)
    held = datamodule(held_file, "AA_T2I", "preference", batch_size=3)
    module.configure_model()
    before, _ = held_out_margin(module, held, passes=1)
    assert before == 0.0
    trainer(24).fit(module, datamodule(train_file, "AA_T2I", "preference", batch_size=2))
    after, positive = held_out_margin(module, held)
    assert after > 1.0 and positive > 0.55, (after, positive)


# --------------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------------


def test_the_export_is_a_diffusers_pipeline_that_loads_and_generates(tmp_path: Path) -> None:
    from diffusers import DiffusionPipeline

    pl.seed_everything(0)
    module = SFTModule("tiny-sd", optim=OPTIM)
    trainer(2).fit(
        module, datamodule(os.path.join(T2I, "prompt_image.json"), "T2I-Prompt-Image", "supervised")
    )
    folder = tmp_path / "hf_model"
    module.export_pretrained(str(folder))
    assert (folder / "model_index.json").is_file() and not (folder / "tokenizer_config.json").exists()
    pipeline = DiffusionPipeline.from_pretrained(str(folder))
    trained = dict(module.model.unet.named_parameters())
    for name, value in pipeline.unet.named_parameters():
        assert torch.equal(value, trained[name].detach()), name
    images = pipeline(
        ["a bus in the city"],
        num_inference_steps=2,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(0),
    ).images
    pixels = np.asarray(images[0])
    assert pixels.shape == (32, 32, 3) and pixels.std() > 0


def test_aa_fit_then_predict_writes_images_next_to_a_jsonl_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tiny SFT t2i config through the ``aa`` command; ``aa predict`` on its export writes one PNG a prompt."""
    from aa_lightning.cli import build_cli

    monkeypatch.chdir(REPO)  # the config's data paths are relative to the repository
    root = str(tmp_path / "run")
    common = ["--trainer.default_root_dir", root, "--trainer.enable_progress_bar", "false"]
    fit = ["fit", "--config", "configs/tiny/sft_t2i.yaml", "--trainer.max_steps", "2", *common]
    # one validation run, at step 2 (the config's SampleGenerationCallback samples there: every_n_validations 1)
    fit += ["--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1"]
    cli = build_cli(fit)
    assert cli.trainer.global_step == 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cli.trainer.logger.experiment.flush()
    events = EventAccumulator(cli.trainer.logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert {"samples/before/0", "samples/after/1"} <= set(events.Tags()["images"])  # SampleGenerationCallback
    assert [e.step for e in events.Images("samples/val/1")] == [2]
    export = os.path.join(root, "hf_model")
    assert os.path.isfile(os.path.join(export, "model_index.json"))
    build_cli(
        [
            "predict",
            "--config",
            "configs/tiny/sft_t2i.yaml",
            *common,
            "--model.init_args.model_name_or_path",
            export,
            "--model.init_args.generation.num_inference_steps",
            "2",
            "--data.init_args.predict.path",
            os.path.join(T2I, "prompt_image.json"),
            "--data.init_args.predict.template",
            "T2I-Prompt-Image",
            "--data.init_args.predict.size",
            "3",
        ]
    )
    with open(os.path.join(root, "predictions.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 3
    for row in rows:
        assert row["prompt"] and row["output"].endswith(".png")
        image = np.asarray(Image.open(os.path.join(root, row["output"])))
        assert image.shape == (32, 32, 3) and image.std() > 0


def test_diffusion_kto_on_unpaired_likes_and_dislikes_prefers_the_liked_kind(tmp_path: Path) -> None:
    """Diffusion-KTO (Li et al. 2024, arXiv:2404.04465) is the unchanged KTOModule on a diffusion model: photos
    are liked, corrupted copies disliked (no pairs); after training, the policy's log-likelihood gain over the
    reference (its implicit reward) is higher on liked images than on disliked ones, on images it never saw.
    The KL reference point pairs prompt ``i`` with image ``i+1`` (the family's own ``mismatched_pairs``)."""
    from aa_lightning.algorithms import KTOModule

    def unpaired(photos: list[str], name: str) -> str:
        rows = []
        for i, photo in enumerate(photos):
            rows.append({"prompt": f"a photo number {i}", "image": os.path.abspath(photo), "label": True})
            rows.append(
                {"prompt": f"a photo number {i}", "image": corrupted(photo, tmp_path), "label": False}
            )
        path = tmp_path / name
        path.write_text(json.dumps(rows))
        return str(path)

    train_file, held_file = unpaired(PHOTOS[:6], "train.json"), unpaired(PHOTOS[6:], "held.json")
    pl.seed_everything(0)
    # beta 100, not DPO's 2500: KTO's per-row sigmoids saturate at large beta (lowering every likelihood is
    # easy, and a saturated desirable term has no gradient left); measured held-out gains: liked -0.001,
    # disliked -0.006 (beta 2500: both -0.21, the liked kind not preferred)
    module = KTOModule(
        "tiny-sd", beta=100.0, optim=OptimConfig(lr=3e-4, warmup_steps=0, scheduler="constant")
    )
    trainer(24).fit(module, datamodule(train_file, "T2I-Unpaired", "supervised", batch_size=4))
    held = datamodule(held_file, "T2I-Unpaired", "supervised", batch_size=6)
    held.setup("fit")
    gains = {True: [], False: []}
    with torch.no_grad():
        for draw in range(6):
            pl.seed_everything(100 + draw)
            for batch in held.train_dataloader():
                ratio = module.policy_log_probs(batch).sum - module.reference_log_probs_live(batch).sum
                for value, liked in zip(ratio.tolist(), batch["extra"]["desirable"].tolist()):
                    gains[bool(liked)].append(value)
    liked, disliked = np.mean(gains[True]), np.mean(gains[False])
    assert liked > disliked, (liked, disliked)


@pytest.mark.parametrize("name, suffixes", [("tiny-audioldm", (".wav",)), ("tiny-t2v", (".mp4", ".png"))])
def test_generated_audio_and_video_are_written_as_files(
    name: str, suffixes: tuple[str, ...], tmp_path: Path
) -> None:
    """The families' ``generate_outputs`` feed the prediction writer: a WAV per clip (at the vocoder's rate), an
    MP4 (or a frame strip where no encoder is available) per video."""
    import soundfile

    from aa_lightning.algorithms import GenerationConfig
    from aa_lightning.callbacks.predictions import save_media
    from aa_lightning.models import load_pretrained_models

    model, tokenizer, _ = load_pretrained_models(name)
    tokens = tokenizer(
        ["a man says seven", "a dog runs"],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    outputs = model.generate_outputs(
        **tokens, generation=GenerationConfig(num_inference_steps=2, guidance_scale=2.0)
    )
    paths = [save_media(output, str(tmp_path / f"{i:06d}")) for i, output in enumerate(outputs)]
    assert len(paths) == 2 and all(p.endswith(suffixes) and os.path.getsize(p) > 0 for p in paths)
    if name == "tiny-audioldm":
        audio, rate = soundfile.read(paths[0])
        assert rate == 16000 and np.isfinite(audio).all() and audio.std() > 0
