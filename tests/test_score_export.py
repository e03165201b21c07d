"""A trained reward / cost model loads in plain transformers (``AutoModelForSequenceClassification``) with the
scores our :class:`ScoreModel` gives; a folder without a trained head is refused; the earlier format loads."""

from __future__ import annotations

import json
import os

import lightning.pytorch as pl
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from aa_lightning.algorithms import CostModule, OptimConfig, PPOModule, RewardModule
from aa_lightning.algorithms.config import LoraConfig
from aa_lightning.data import TextToTextDataModule
from aa_lightning.models import ScoreModel, load_pretrained_models, resolve_model_path
from aa_lightning.models.score_model import SCORE_CONFIG_FILE, SCORE_HEAD_FILE, has_score_head

OPTIM = OptimConfig(lr=5e-3, warmup_steps=0, scheduler="constant")
CASES = {  # module class, data file, template
    "rm": (RewardModule, "hh_rlhf_train_128.jsonl", "HH-RLHF"),
    "cost": (CostModule, "pku_saferlhf_train_24.json", "PKU-SafeRLHF-Safety"),
}


def fit(module: pl.LightningModule, dm: pl.LightningDataModule, tmp_path, steps: int = 3) -> None:
    pl.Trainer(
        default_root_dir=str(tmp_path),
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    ).fit(module, dm)


def datamodule(repo_path, data: str, template: str) -> TextToTextDataModule:
    spec = {"path": repo_path("configs", "data", data), "template": template, "size": 12}
    return TextToTextDataModule("tiny-qwen2", train=spec, max_length=192, batch_size=4)


def left_padded(batch: dict, pad_id: int) -> dict:
    """The same rows with their padding moved to the left."""
    ids, mask = batch["input_ids"].clone(), batch["attention_mask"].clone()
    for i in range(len(ids)):
        n = int(mask[i].sum())
        ids[i] = torch.cat([torch.full((len(ids[i]) - n,), pad_id), batch["input_ids"][i][:n]])
        mask[i] = torch.cat([torch.zeros(len(ids[i]) - n, dtype=mask.dtype), mask.new_ones(n)])
    return {"input_ids": ids, "attention_mask": mask}


def assert_same_scores(ours: ScoreModel, export: str, batch: dict) -> float:
    """Our end scores equal transformers' pooled logits on right- and left-padded rows; returns the max diff."""
    plain = AutoModelForSequenceClassification.from_pretrained(export).eval()
    ours.eval()
    worst = 0.0
    for inputs in (batch, left_padded(batch, plain.config.pad_token_id)):
        with torch.no_grad():
            expected = ours(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).end_scores
            # no attention mask for transformers: it finds the last real token from the pad id alone
            got = plain(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
            ).logits.squeeze(-1)
            got_ids_only = plain(input_ids=inputs["input_ids"]).logits.squeeze(-1) if inputs is batch else got
        torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)
        torch.testing.assert_close(got_ids_only, expected, rtol=0, atol=2e-6)
        worst = max(worst, float((got - expected).abs().max()))
    return worst


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_trained_score_model_exports_for_auto_model_for_sequence_classification(
    tmp_path, repo_path, case, lora
):
    pl.seed_everything(0)
    module_class, data, template = CASES[case]
    adapters = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]) if lora else None
    module = module_class("tiny-qwen2", optim=OPTIM, new_score_head=True, lora=adapters)
    dm = datamodule(repo_path, data, template)
    fit(module, dm, tmp_path)
    export = str(tmp_path / "hf_model")
    module.export_pretrained(export)

    with open(os.path.join(export, "config.json")) as f:
        config = json.load(f)
    assert config["architectures"] == ["Qwen2ForSequenceClassification"] and len(config["id2label"]) == 1
    assert config["pad_token_id"] == module.tokenizer.pad_token_id != module.tokenizer.eos_token_id
    assert not os.path.exists(os.path.join(export, SCORE_HEAD_FILE)) and has_score_head(export)
    _, info = AutoModelForSequenceClassification.from_pretrained(export, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info

    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["attention_mask"].sum(1).min() < batch["attention_mask"].shape[1], "the test needs padding"
    trained = module.model.get_base_model() if lora else module.model
    worst = assert_same_scores(trained, export, batch)
    reloaded, _, _ = load_pretrained_models(export, score_model=True)  # how PPO loads a reward model
    assert reloaded.score_head.bias is None
    worst = max(worst, assert_same_scores(reloaded, export, batch))
    print(
        f"{case}/{'lora' if lora else 'full'}: max |ScoreModel - AutoModelForSequenceClassification| = {worst:.3g}"
    )


def test_a_tokenizer_that_pads_with_its_end_token_is_exported_with_another_pad_token(tmp_path, repo_path):
    """Rows end at ``<|im_end|>``; if the export padded with it, transformers would score the token before it."""
    pl.seed_everything(0)
    module = RewardModule("tiny-qwen2", optim=OPTIM, new_score_head=True)
    module.configure_model()
    module.tokenizer.pad_token = module.tokenizer.eos_token  # as SmolLM2's tokenizer does
    export = str(tmp_path / "hf_model")
    module.export_pretrained(export)
    assert module.tokenizer.pad_token == module.tokenizer.eos_token  # the training tokenizer is untouched
    exported = AutoTokenizer.from_pretrained(export)
    assert exported.pad_token_id != exported.eos_token_id
    plain = AutoModelForSequenceClassification.from_pretrained(export).eval()
    assert plain.config.pad_token_id == exported.pad_token_id
    chat = [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello, how can I help?"},
    ]
    texts = [exported.apply_chat_template(chat, tokenize=False).rstrip(), "<|im_start|>user\nok<|im_end|>"]
    batch = exported(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert (batch["input_ids"][:, -1] == exported.pad_token_id).any()
    assert_same_scores(module.model, export, dict(batch))


def test_a_folder_without_a_trained_head_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"tiny-qwen2.*no trained score head.*new_score_head"):
        load_pretrained_models("tiny-qwen2", score_model=True)
    with pytest.raises(ValueError, match="no trained score head.*new_score_head: true"):
        RewardModule("tiny-qwen2").configure_model()
    with pytest.raises(ValueError, match="no trained score head"):  # a frozen reward model of PPO
        PPOModule("tiny-qwen2", reward_model_name_or_path="tiny-qwen2").configure_model()
    model, _, _ = load_pretrained_models("tiny-qwen2", score_model=True, new_score_head=True)
    assert model.score_head.bias is None  # new heads are bias-free: they export to transformers' format
    classifier = tmp_path / "two_labels"  # a classifier of transformers' own making, not a score model
    AutoModelForSequenceClassification.from_pretrained(
        resolve_model_path("tiny-qwen2"), num_labels=2
    ).save_pretrained(str(classifier))
    with pytest.raises(
        ValueError, match="Qwen2ForSequenceClassification with num_labels=2; a score model has one"
    ):
        ScoreModel.from_pretrained(str(classifier))


def test_score_models_in_the_earlier_format_still_load(tmp_path):
    """A biased head cannot be a transformers seqcls head: written as backbone + score_head.safetensors, which
    loads with its bias; so does a folder of the first format (no score_config.json, head with a bias)."""
    torch.manual_seed(0)
    model, tokenizer, _ = load_pretrained_models(
        "tiny-qwen2", score_model=True, new_score_head=True, score_head_bias=True, score_head_init_std=0.1
    )
    with torch.no_grad():
        model.score_head.bias.fill_(0.25)
    folder = tmp_path / "biased"
    model.save_pretrained(str(folder))
    assert (folder / SCORE_HEAD_FILE).exists() and (folder / SCORE_CONFIG_FILE).exists()
    ids = tokenizer(["a short row", "another row of text"], return_tensors="pt", padding=True)
    again = ScoreModel.from_pretrained(str(folder)).eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**ids).end_scores, model(**ids).end_scores, rtol=0, atol=1e-6)

    old = tmp_path / "old"  # written before score_config.json existed
    model.backbone.save_pretrained(str(old))
    save_file(
        {k: v.contiguous() for k, v in model.score_head.state_dict().items()}, str(old / SCORE_HEAD_FILE)
    )
    first = ScoreModel.from_pretrained(str(old)).eval()
    assert first.score_head.bias is not None and float(first.score_head.bias.detach()) == 0.25
    with torch.no_grad():
        torch.testing.assert_close(first(**ids).end_scores, model(**ids).end_scores, rtol=0, atol=1e-6)


def tiny_gemma3_score_model() -> ScoreModel:
    """A tiny random Gemma 3 (SigLIP vision tower + Gemma 3 text model): a multimodal family that transformers
    has a sequence-classification class for; 4 image tokens per 28x28 image."""
    from transformers import AutoModel, Gemma3Config

    text = dict(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=256,
        sliding_window=16,
        pad_token_id=0,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        boi_token_index=297,
        eoi_token_index=298,
        image_token_index=299,
    )
    torch.manual_seed(0)
    backbone = AutoModel.from_config(config)
    with torch.no_grad():  # transformers starts the image projection at 0: images would not move any score
        backbone.multi_modal_projector.mm_input_projection_weight.normal_(std=0.5)
    return ScoreModel(backbone, head_init_std=0.1).eval()


def test_a_multimodal_family_exports_as_its_sequence_classification_class(tmp_path):
    """Gemma 3 (image + text): ``Gemma3ForSequenceClassification`` scores image rows as our ScoreModel does."""
    model = tiny_gemma3_score_model()
    model.save_pretrained(str(tmp_path))
    plain, info = AutoModelForSequenceClassification.from_pretrained(str(tmp_path), output_loading_info=True)
    assert type(plain).__name__ == "Gemma3ForSequenceClassification" and not any(info.values()), info
    image = [297, 299, 299, 299, 299, 298]
    right = torch.tensor([[5, *image, 7, 8, 9], [6, *image, 7, 0, 0]])
    left = torch.tensor([[5, *image, 7, 8, 9], [0, 0, 6, *image, 7]])
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    reloaded = ScoreModel.from_pretrained(str(tmp_path)).eval()
    plain.eval()
    with torch.no_grad():
        for ids in (right, left):
            inputs = {"input_ids": ids, "attention_mask": (ids != 0).long(), "pixel_values": pixels}
            ours = model(**inputs).end_scores
            torch.testing.assert_close(plain(**inputs).logits.squeeze(-1), ours, rtol=0, atol=2e-6)
            torch.testing.assert_close(reloaded(**inputs).end_scores, ours, rtol=0, atol=2e-6)
        other = model(input_ids=right, attention_mask=(right != 0).long(), pixel_values=-pixels).end_scores
    assert (other - ours).abs().max() > 1e-4  # the image reaches the score: the comparison covers it


def test_a_family_without_a_sequence_classification_class_keeps_our_format(tmp_path, caplog):
    """LLaVA: transformers has no LlavaForSequenceClassification; the export says so and still loads."""
    model, _, _ = load_pretrained_models("tiny-llava", score_model=True, new_score_head=True)
    with caplog.at_level("WARNING", logger="aa_lightning.models.score_model"):
        model.save_pretrained(str(tmp_path))
    assert "no ForSequenceClassification class for 'llava'" in caplog.text
    assert (tmp_path / SCORE_HEAD_FILE).exists() and has_score_head(str(tmp_path))
    again = ScoreModel.from_pretrained(str(tmp_path))
    torch.testing.assert_close(again.score_head.weight, model.score_head.weight, rtol=0, atol=0)
