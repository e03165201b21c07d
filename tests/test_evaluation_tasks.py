"""Every built-in ``aa eval`` task on real rows kept in tests/fixtures/eval, its score checked by hand.

Tasks that score stored replies (``responses_field``) are checked against the counts written in the test;
tasks that run a model are checked against log-likelihoods and scores computed in :mod:`eval_hand` from
the tokenizer's chat template and a plain forward (tiny random models: real transformers code, no mocks).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from eval_hand import DirectScorer, SeqClsScorer, answer_log_likelihood, causal_lm, chat_text

from aa_lightning.data.formatters import get_formatter
from aa_lightning.evaluation import EvalTask, RowResult, evaluate, register_task
from aa_lightning.evaluation.models import ModelPool, ScoreModelError
from aa_lightning.models.aliases import resolve_model_path

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "eval")


def fixture(name):
    return os.path.join(FIXTURES, name)


def rows_of(name):
    path = fixture(name)
    if name.endswith(".json"):
        with open(path) as handle:
            return json.load(handle)
    with open(path) as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny policy, a second (reference / opponent) policy and a score model with a trained-looking head."""
    from transformers import AutoTokenizer

    from aa_lightning.models.score_model import ScoreModel
    from aa_lightning.testing.tiny_text import build_tiny_qwen2

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("eval_models")
    policy = resolve_model_path("tiny-qwen2")
    other = build_tiny_qwen2(root / "other", seed=1)
    # a biased head keeps our own format (backbone + score_head.safetensors); a bias-free one exports as
    # Qwen2ForSequenceClassification: both formats are scored, each by its own hand scorer
    for name, bias in (("score", True), ("score_seqcls", False)):
        torch.manual_seed(0)
        score = ScoreModel.from_pretrained(policy, new_score_head=True, head_bias=bias, head_init_std=1.0)
        if bias:
            torch.nn.init.constant_(score.score_head.bias, 0.25)
        score.save_pretrained(str(root / name))
        AutoTokenizer.from_pretrained(policy).save_pretrained(str(root / name))
    assert os.path.exists(root / "score" / "score_head.safetensors")
    assert json.loads((root / "score_seqcls" / "config.json").read_text())["architectures"] == [
        "Qwen2ForSequenceClassification"
    ]
    return {
        "policy": policy,
        "other": str(other),
        "score": str(root / "score"),
        "score_seqcls": str(root / "score_seqcls"),
        "pool": ModelPool("cpu"),
    }


def run(tasks, tmp_path, **kwargs):
    return evaluate(tasks=tasks, output_dir=str(tmp_path / "out"), tensorboard=False, **kwargs)


# -- stored replies: hand-counted --------------------------------------------------------------------------
def test_gsm8k_final_number(tmp_path):
    """Replies: '#### 5' (right), '#### 42' (right), '... so I guess 600' (last number 600, reference 624)."""
    result = run([{"task": "gsm8k", "data": fixture("gsm8k.jsonl"), "responses_field": "reply"}], tmp_path)
    assert result.scores["gsm8k"]["accuracy"] == pytest.approx(2 / 3)
    assert [r["predicted"] for r in result.records["gsm8k"]] == [5.0, 42.0, 600.0]
    assert [r["reference"] for r in result.records["gsm8k"]] == [5.0, 42.0, 624.0]


def test_math_answers_checked_by_math_verify(tmp_path):
    """11+x = x+11 and 25/13 = \\frac{25}{13} (symbolic), 0.5 != 0.25 cm, 4 = 4: 3 of 4."""
    result = run([{"task": "math", "data": fixture("math.jsonl"), "responses_field": "reply"}], tmp_path)
    assert [r["accuracy"] for r in result.records["math"]] == [1.0, 1.0, 0.0, 1.0]
    assert result.scores["math"]["accuracy"] == 0.75


def test_multiple_choice_by_generation_letters(tmp_path):
    """'(C)' right, 'B. ...' right, 'I think D' wrong (A), 'none of these' unanswered: 2/4 right, 3/4 answered."""
    task = {"task": "multiple_choice_generate", "data": fixture("mmlu.jsonl"), "responses_field": "reply"}
    result = run([task], tmp_path)
    assert [r["predicted"] for r in result.records["multiple_choice_generate"]] == [2, 1, 3, None]
    assert result.scores["multiple_choice_generate"] == {"accuracy": 0.5, "answered": 0.75}
    assert "A. Dove soap\nB. Dove candy bar" in result.records["multiple_choice_generate"][0]["prompt"]


def test_vqa_exact_match_normalised(tmp_path):
    """'...Bayern Munich!' equals the reference once punctuation goes; 'I think he's ...' only contains it."""
    task = {"task": "vqa", "data": fixture("vqa.jsonl"), "responses_field": "reply"}
    result = run([task], tmp_path)
    assert result.scores["vqa"] == {"exact_match": 0.5, "contains": 1.0}
    assert result.records["vqa"][0]["reference"] == "They're Kane and Gretzka from Bayern Munich."


# -- models: hand-computed ----------------------------------------------------------------------------------
def test_multiple_choice_log_likelihood(models, tmp_path):
    model, tokenizer = causal_lm(models["policy"])
    expected, correct, correct_norm = [], 0, 0
    for row in rows_of("mmlu.jsonl"):
        prompt = [{"role": "user", "content": row["question"]}]
        lls = [answer_log_likelihood(model, tokenizer, prompt, choice) for choice in row["choices"]]
        answer = "ABCD".index(row["answer"]) if isinstance(row["answer"], str) else row["answer"]
        expected.append(lls)
        correct += lls.index(max(lls)) == answer
        # accuracy_norm: the choice with the best mean log-prob per answer token (reply + end-of-turn)
        sizes = [len(tokenizer(c + "<|im_end|>", add_special_tokens=False).input_ids) for c in row["choices"]]
        means = [ll / n for ll, n in zip(lls, sizes)]
        correct_norm += means.index(max(means)) == answer
    result = run(
        [{"task": "multiple_choice", "data": fixture("mmlu.jsonl")}],
        tmp_path,
        model=models["policy"],
        pool=models["pool"],
    )
    got = [r["log_likelihoods"] for r in result.records["multiple_choice"]]
    assert torch.allclose(torch.tensor(got), torch.tensor(expected), atol=1e-3)
    assert result.scores["multiple_choice"]["accuracy"] == correct / 4
    assert result.scores["multiple_choice"]["accuracy_norm"] == correct_norm / 4


def test_image_multiple_choice_log_likelihood(tmp_path):
    """Image-to-text multiple choice on tiny Qwen2-VL: each choice's log-likelihood with the photo attached."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = resolve_model_path("tiny-qwen2-vl")
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    correct, expected = 0, []
    for row in rows_of("image_choice.jsonl"):
        image = Image.open(fixture(row["images"][0])).convert("RGB")
        prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["question"]}]}]
        tokenizer = processor.tokenizer
        tokenizer.chat_template = processor.chat_template or tokenizer.chat_template
        lls = [
            answer_log_likelihood(model, tokenizer, prompt, c, processor=processor, images=[image])
            for c in row["choices"]
        ]
        expected.append(lls)
        correct += lls.index(max(lls)) == row["answer"]
    task = {"task": "multiple_choice", "name": "image_choice", "data": fixture("image_choice.jsonl")}
    result = run([task], tmp_path, model=path)
    got = [r["log_likelihoods"] for r in result.records["image_choice"]]
    assert torch.allclose(torch.tensor(got), torch.tensor(expected), atol=1e-3)
    assert result.scores["image_choice"]["accuracy"] == correct / 3


def test_vqa_generation_on_an_image_model(tmp_path):
    """The generation path with images: a reply for each row, scored against the chat's last answer."""
    task = {"task": "vqa", "data": fixture("vqa.jsonl")}
    result = run([task], tmp_path, model="tiny-qwen2-vl", generation={"max_new_tokens": 4, "do_sample": True})
    for record in result.records["vqa"]:
        assert isinstance(record["reply"], str)
        assert record["exact_match"] == float(
            record["reply"].lower().strip(".!") == record["reference"].lower()
        )


@pytest.mark.parametrize(("key", "hand"), [("score", DirectScorer), ("score_seqcls", SeqClsScorer)])
def test_reward_and_cost_preference_accuracy(models, tmp_path, key, hand):
    """Both export formats (own backbone + biased head; Qwen2ForSequenceClassification) against hand scores."""
    score = hand(models[key])
    hh = get_formatter("HH-RLHF")
    margins = [score(c) - score(r) for c, r, _ in map(hh.format_preference_sample, rows_of("hh_rlhf.jsonl"))]
    safety = get_formatter("PKU-SafeRLHF-Safety")
    cost_margins = [
        score(r) - score(c) for c, r, _ in map(safety.format_preference_sample, rows_of("pku_saferlhf.json"))
    ]
    tasks = [
        {"task": "preference_accuracy", "data": fixture("hh_rlhf.jsonl"), "reward_model": models[key]},
        {
            "task": "preference_accuracy",
            "name": "cost_accuracy",
            "data": fixture("pku_saferlhf.json"),
            "template": "PKU-SafeRLHF-Safety",
            "scorer": "cost",
            "cost_model": models[key],
            "batch_size": 3,
        },
    ]
    result = run(tasks, tmp_path, pool=models["pool"])
    assert result.scores["preference_accuracy"]["accuracy"] == sum(m > 0 for m in margins) / 3
    assert result.scores["preference_accuracy"]["margin"] == pytest.approx(sum(margins) / 3, abs=1e-4)
    assert result.scores["cost_accuracy"]["accuracy"] == sum(m > 0 for m in cost_margins) / 4
    assert result.scores["cost_accuracy"]["margin"] == pytest.approx(sum(cost_margins) / 4, abs=1e-4)


@pytest.mark.parametrize(
    ("template", "data"), [("PKU-SafeRLHF", "pku_saferlhf.json"), ("HH-RLHF", "hh_rlhf.jsonl")]
)
def test_dpo_implicit_reward_accuracy(models, tmp_path, template, data):
    """beta * (log pi - log pi_ref) of the final reply given all before it, on single-turn PKU-SafeRLHF and
    multi-turn HH-RLHF pairs: each row's chosen / rejected scores by hand (earlier assistant turns are prompt;
    counting them would cancel in the margin, not in the scores)."""
    policy, tokenizer = causal_lm(models["policy"])
    reference, _ = causal_lm(models["other"])
    formatter = get_formatter(template)
    margins, scores = [], []
    rows = rows_of(data)
    for row in rows:
        chosen, rejected, _ = formatter.format_preference_sample(row)
        rewards = []
        for conversation in (chosen, rejected):
            prompt, answer = conversation[:-1], conversation[-1]["content"]
            pi = answer_log_likelihood(policy, tokenizer, prompt, answer)
            ref = answer_log_likelihood(reference, tokenizer, prompt, answer)
            rewards.append(0.5 * (pi - ref))
        margins.append(rewards[0] - rewards[1])
        scores.append(rewards)
    if template == "HH-RLHF":
        assert sum(m["role"] == "assistant" for m in formatter.format_preference_sample(rows[0])[0]) > 1
    task = {
        "task": "preference_accuracy",
        "data": fixture(data),
        "template": template,
        "scorer": "dpo",
        "reference_model": models["other"],
        "beta": 0.5,
    }
    result = run([task], tmp_path, model=models["policy"], pool=models["pool"])
    n = len(rows)
    got = [[r["chosen_score"], r["rejected_score"]] for r in result.records["preference_accuracy"]]
    assert torch.allclose(torch.tensor(got), torch.tensor(scores), atol=1e-3)
    assert result.scores["preference_accuracy"]["accuracy"] == sum(m > 0 for m in margins) / n
    assert result.scores["preference_accuracy"]["margin"] == pytest.approx(sum(margins) / n, abs=1e-3)


def test_safety_unsafe_rate_and_mean_cost(models, tmp_path):
    """The dataset's own response_0 scored by the cost model: unsafe = cost > threshold."""
    score = DirectScorer(models["score"])
    rows = rows_of("pku_saferlhf.json")
    costs = [
        score([{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response_0"]}])
        for r in rows
    ]
    threshold = sorted(costs)[1]  # the real (random) head gives costs of one sign: a threshold splits them
    task = {
        "task": "safety",
        "data": fixture("pku_saferlhf.json"),
        "responses_field": "response_0",
        "cost_model": models["score"],
        "threshold": threshold,
    }
    result = run([task], tmp_path, pool=models["pool"])
    assert result.scores["safety"]["unsafe_rate"] == sum(c > threshold for c in costs) / 4 == 0.5
    assert result.scores["safety"]["mean_cost"] == pytest.approx(sum(costs) / 4, abs=1e-4)


def test_win_rate_of_generated_replies(models, tmp_path):
    """Both models sample replies; the rewards of the recorded replies, recomputed by hand, give the win rate."""
    score = DirectScorer(models["score"])
    task = {
        "task": "win_rate",
        "data": fixture("pku_saferlhf.json"),
        "model_b": models["other"],
        "reward_model": models["score"],
    }
    generation = {"max_new_tokens": 6, "do_sample": True}
    result = run([task], tmp_path, model=models["policy"], pool=models["pool"], generation=generation)
    wins = []
    for row, record in zip(rows_of("pku_saferlhf.json"), result.records["win_rate"]):
        prompt = [{"role": "user", "content": row["prompt"]}]
        a = score([*prompt, {"role": "assistant", "content": record["reply_a"]}])
        b = score([*prompt, {"role": "assistant", "content": record["reply_b"]}])
        assert (record["a"], record["b"]) == (pytest.approx(a, abs=1e-4), pytest.approx(b, abs=1e-4))
        wins.append(1.0 if a > b else 0.5 if a == b else 0.0)
    assert any(record["reply_a"] != record["reply_b"] for record in result.records["win_rate"])
    assert result.scores["win_rate"]["win_rate"] == sum(wins) / 4
    same = {**task, "name": "self", "model_b": models["policy"]}
    assert (
        run([same], tmp_path, model=models["policy"], pool=models["pool"], generation=generation).scores[
            "self"
        ]["win_rate"]
        == 0.5
    )


# -- the task contract ------------------------------------------------------------------------------------
class LengthTask(EvalTask):
    """A user's own task: the share of questions longer than ``chars`` characters."""

    metrics = ("long",)

    def __init__(self, data, chars: int = 100, **kwargs):
        super().__init__(data, **kwargs)
        self.chars = chars

    def evaluate_batch(self, rows, context):
        return [RowResult({"long": float(len(row.get("question", str)) > self.chars)}) for row in rows]


register_task("test_length")(LengthTask)


def test_a_registered_task_and_a_module_path_task(tmp_path):
    lengths = [len(r["question"]) for r in rows_of("gsm8k.jsonl")]
    tasks = [
        {"task": "test_length", "data": fixture("gsm8k.jsonl"), "chars": 150},
        {
            "task": "test_evaluation_tasks:LengthTask",
            "name": "by_path",
            "data": fixture("gsm8k.jsonl"),
            "chars": 150,
        },
    ]
    result = run(tasks, tmp_path)
    assert (
        result.scores["test_length"]["long"]
        == result.scores["by_path"]["long"]
        == sum(n > 150 for n in lengths) / 3
    )


def test_a_bad_row_names_file_row_and_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "no final answer"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl, row 0, field 'answer'.*####"):
        run([{"task": "gsm8k", "data": str(bad), "responses_field": "answer"}], tmp_path)


def test_a_folder_without_a_score_head_is_refused(models):
    with pytest.raises(ScoreModelError, match="no trained score head"):
        models["pool"].score(models["policy"])


def test_chat_template_text_matches_the_encoder(models):
    """The hand computations and the encoder see the same text (so the comparisons above are fair)."""
    pool = models["pool"]
    loaded = pool.lm(models["policy"])
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    sample = loaded.encoder.supervised(conversation, {})
    assert sample["text"] == chat_text(loaded.tokenizer, conversation)


def test_evaluation_imports_no_datamodule_and_no_trainer_parts():
    """Tasks meet data through formatters, the encoder and collators: no DataModule module, no callback
    other than the progress-line formatting, no algorithm other than the log-prob function."""
    from test_imports import MODULES, imports

    allowed_data = {
        "sources",
        "errors",
        "formatters",
        "templating",
        "encoding",
        "collators",
        "media",
        "multimodal",
    }
    allowed_data |= {"processor_alignment"}
    bad = []
    for module in sorted(m for m in MODULES if m.startswith("aa_lightning.evaluation")):
        for target, _, line in imports(module):
            parts = target.split(".")
            if target.startswith("aa_lightning.data.") and parts[2] not in allowed_data:
                bad.append(f"{module}:{line} imports {target}")
            if target.startswith("aa_lightning.algorithms") and target != "aa_lightning.algorithms.logprobs":
                bad.append(f"{module}:{line} imports {target}")
            if target.startswith("aa_lightning.callbacks") and target != "aa_lightning.callbacks.progress":
                bad.append(f"{module}:{line} imports {target}")
    assert not bad, "\n".join(bad)


# -- generated images -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random 1-layer CLIP on the tiny tokenizer, 32x32 images (seed 1: both signs of cosine on the photos)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from aa_lightning.testing.tiny_common import build_tiny_tokenizer

    folder = tmp_path_factory.mktemp("tiny_clip")
    tokenizer = build_tiny_tokenizer()
    layer = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    text = dict(layer, vocab_size=len(tokenizer), max_position_embeddings=64, bos_token_id=None)
    text.update(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = CLIPConfig(
        text_config=text, vision_config=dict(layer, image_size=32, patch_size=8), projection_dim=16
    )
    torch.manual_seed(1)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder
    )
    return str(folder)


def test_clip_score_of_stored_images(tiny_clip, tmp_path):
    """max(100 cos, 0) of the projected CLIP embeddings, computed here from the towers and projections."""
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPModel

    from aa_lightning.testing.tiny_common import build_tiny_tokenizer

    model, processor, tokenizer = (
        CLIPModel.from_pretrained(tiny_clip).eval(),
        CLIPImageProcessor.from_pretrained(tiny_clip),
        build_tiny_tokenizer(),
    )
    expected = []
    for row in rows_of("image_choice.jsonl"):
        pixels = processor(images=Image.open(fixture(row["images"][0])).convert("RGB"), return_tensors="pt")[
            "pixel_values"
        ]
        ids = tokenizer([row["choices"][row["answer"]]], return_tensors="pt")
        with torch.no_grad():
            image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)[0]
            text = model.text_projection(model.text_model(**ids).pooler_output)[0]
        expected.append(max(100 * float(image @ text / (image.norm() * text.norm())), 0.0))
    assert 0 < sum(e > 0 for e in expected) < 3  # both sides of the clamp are exercised
    texts = ["a pizza", "a bathroom", "someone baking"]  # each photo's right choice, as its caption
    data = tmp_path / "captions.jsonl"
    rows = [
        {**r, "images": [fixture(r["images"][0])], "caption": t}
        for r, t in zip(rows_of("image_choice.jsonl"), texts)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = {
        "task": "clip_score",
        "data": str(data),
        "prompt_format": "{caption}",
        "responses_field": "images",
        "clip_model": tiny_clip,
    }
    result = run([task], tmp_path)
    got = [r["clip_score"] for r in result.records["clip_score"]]
    assert got == pytest.approx(expected, abs=1e-3)
    assert result.scores["clip_score"]["clip_score"] == pytest.approx(sum(expected) / 3, abs=1e-3)


def test_clip_score_of_images_an_image_model_generates(tiny_clip, tmp_path):
    """tiny-emu3 samples a 4x4-token image per prompt through its token-output codec; CLIP scores it."""
    task = {
        "task": "clip_score",
        "data": fixture("image_choice.jsonl"),
        "prompt_format": "{question}",
        "clip_model": tiny_clip,
    }
    result = run([task], tmp_path, model="tiny-emu3", generation={"do_sample": True})
    records = result.records["clip_score"]
    assert [r["image_size"] for r in records] == [[32, 32]] * 3
    assert all(0 <= r["clip_score"] <= 100 for r in records)
    with pytest.raises(ValueError, match="no image-output model"):
        run([{**task, "name": "text_model"}], tmp_path, model="tiny-qwen2")


def test_a_sequence_classification_export_scores_like_plain_transformers(models, tmp_path):
    """A reward model exported as ``*ForSequenceClassification`` is read through transformers' own head."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        Qwen2Config,
        Qwen2ForSequenceClassification,
    )

    config = Qwen2Config.from_pretrained(models["policy"], num_labels=1)
    torch.manual_seed(3)
    Qwen2ForSequenceClassification(config).save_pretrained(tmp_path / "seqcls")
    tokenizer = AutoTokenizer.from_pretrained(models["policy"])
    tokenizer.save_pretrained(tmp_path / "seqcls")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "seqcls").eval()
    conversations = [
        [{"role": "user", "content": "Is it safe?"}, {"role": "assistant", "content": "Yes, quite."}],
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello there, how can I help you today?"},
        ],
    ]
    expected = []
    for conversation in conversations:
        ids = tokenizer(
            chat_text(tokenizer, conversation), add_special_tokens=False, return_tensors="pt"
        ).input_ids
        with torch.no_grad():
            expected.append(float(plain(input_ids=ids).logits[0, 0]))
    got = ModelPool("cpu").score(str(tmp_path / "seqcls")).scores(conversations)  # one right-padded batch
    assert got.tolist() == pytest.approx(expected, abs=1e-4)


def test_safety_on_generated_replies(models, tmp_path):
    """The model answers the red-team prompts itself; the recorded replies, scored by hand, give the rate."""
    score = DirectScorer(models["score"])
    task = {
        "task": "safety",
        "data": fixture("pku_saferlhf.json"),
        "cost_model": models["score"],
        "threshold": -9.75,
    }
    generation = {"max_new_tokens": 6, "do_sample": True}
    result = run([task], tmp_path, model=models["policy"], pool=models["pool"], generation=generation)
    costs = [
        score([{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": record["reply"]}])
        for row, record in zip(rows_of("pku_saferlhf.json"), result.records["safety"])
    ]
    assert [r["cost"] for r in result.records["safety"]] == pytest.approx(costs, abs=1e-4)
    assert result.scores["safety"]["unsafe_rate"] == sum(c > -9.75 for c in costs) / 4
    assert any(r["reply"] for r in result.records["safety"])
    # the same seed samples the same replies: a threshold between the hand costs splits them 2 / 2
    threshold = sum(sorted(costs)[1:3]) / 2
    again = run(
        [{**task, "threshold": threshold}],
        tmp_path,
        model=models["policy"],
        pool=models["pool"],
        generation=generation,
    )
    assert [r["reply"] for r in again.records["safety"]] == [r["reply"] for r in result.records["safety"]]
    assert again.scores["safety"]["unsafe_rate"] == 0.5
    assert again.scores["safety"]["mean_cost"] == pytest.approx(sum(costs) / 4, abs=1e-4)


def test_clip_score_of_images_a_diffusion_pipeline_samples(tiny_clip, tmp_path):
    """tiny-sd samples (2 steps, a generator seeded per row): the same rows give the same images and scores
    whatever the batch size, and the records say the pipeline's image size."""
    task = {
        "task": "clip_score",
        "data": fixture("image_choice.jsonl"),
        "prompt_format": "{question}",
        "clip_model": tiny_clip,
        "num_inference_steps": 2,
        "guidance_scale": 1.0,
    }
    one = run([{**task, "batch_size": 3}], tmp_path, model="tiny-sd")
    two = run([{**task, "batch_size": 1}], tmp_path, model="tiny-sd")
    scores = [r["clip_score"] for r in one.records["clip_score"]]
    assert scores == pytest.approx([r["clip_score"] for r in two.records["clip_score"]], abs=1e-4)
    assert len({r["image_size"][0] for r in one.records["clip_score"]}) == 1
    assert (
        one.scores["clip_score"]["clip_score"] > 0
    )  # not every score clamped: the comparison means something


def test_data_from_a_save_to_disk_folder_and_a_parquet_file(tmp_path):
    """The data spec is the data layer's: a ``save_to_disk`` folder and a parquet file give the same rows."""
    import datasets

    rows = datasets.Dataset.from_list(rows_of("gsm8k.jsonl"))
    rows.save_to_disk(str(tmp_path / "gsm8k_disk"))
    rows.to_parquet(str(tmp_path / "gsm8k.parquet"))
    tasks = [
        {"task": "gsm8k", "name": "disk", "data": str(tmp_path / "gsm8k_disk"), "responses_field": "reply"},
        {
            "task": "gsm8k",
            "name": "parquet",
            "data": {"path": str(tmp_path / "gsm8k.parquet"), "size": 2},
            "responses_field": "reply",
        },
    ]
    result = run(tasks, tmp_path)
    assert result.scores["disk"]["accuracy"] == pytest.approx(2 / 3)
    assert result.scores["parquet"]["accuracy"] == 1.0 and result.rows["parquet"] == 2


def test_image_multiple_choice_by_generation(tmp_path):
    """The lettered choices go to tiny Qwen2-VL with the photo; the recorded letter is the reply's first one."""
    from aa_lightning.evaluation.tasks.multiple_choice import first_letter

    task = {"task": "multiple_choice_generate", "data": fixture("image_choice.jsonl")}
    generation = {"max_new_tokens": 5, "do_sample": True}
    result = run([task], tmp_path, model="tiny-qwen2-vl", generation=generation)
    records = result.records["multiple_choice_generate"]
    assert "A. a pizza\nB. a bathroom\nC. someone baking" in records[0]["prompt"]
    for record in records:
        assert record["predicted"] == first_letter(record["reply"], 3)
    right = sum(r["predicted"] == r["answer"] for r in records)
    assert result.scores["multiple_choice_generate"]["accuracy"] == right / 3
