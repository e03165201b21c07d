"""Where a sequence ends (issue 10, section 4): trained rows end at the template's end-of-turn token.

ChatML renders ``<|im_end|>\\n`` after every turn. The ``\\n`` is not part of what the model has to say: a
rollout stops at EOS and never produces it. So no trained row labels it, and the last assistant turn's
``\\n`` is not kept at the end of the row, where a score model reads the end score: a reward model then
scores a training row and a rollout of the same prompt + response at the same token, with the same inputs.
Checked with ChatML, a Llama-3-style template (``<|eot_id|>``, no newline after it), a template without
any trailing newline (``[INST] ... [/INST] answer</s>``, with a BOS-adding tokenizer) and the default one.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import Qwen2Config, Qwen2Model

from aa_lightning.algorithms.rl.rollout import Rollout, response_mask_from_eos
from aa_lightning.batch import model_inputs
from aa_lightning.data.collators import TextCollator
from aa_lightning.data.encoding import IGNORE_INDEX, SampleEncoder
from aa_lightning.data.templating import ChatRenderer
from aa_lightning.models.score_model import ScoreModel
from aa_lightning.testing.tiny_common import build_tiny_tokenizer

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
INST_TEMPLATE = (  # Mistral-like: nothing at all after the end-of-turn token
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
)


def tokenizer_for(template: str) -> Any:
    """The tiny BPE tokenizer dressed as each template family (its EOS is the template's end of turn)."""
    if template == "chatml":
        return build_tiny_tokenizer()
    if template == "llama3":
        tokenizer = build_tiny_tokenizer(
            ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
        )
        tokenizer.bos_token, tokenizer.eos_token = "<|begin_of_text|>", "<|eot_id|>"
        tokenizer.chat_template = LLAMA3_TEMPLATE
        return tokenizer
    if template == "inst":
        tokenizer = build_tiny_tokenizer(["<s>", "</s>"])
        tokenizer.bos_token, tokenizer.eos_token = "<s>", "</s>"
        tokenizer.add_bos_token = True  # BOS comes from the tokenizer, not from the template
        tokenizer.chat_template = INST_TEMPLATE
        return tokenizer
    if template == "default":  # "ASSISTANT: answer<|im_end|>\n"
        tokenizer = build_tiny_tokenizer()
        tokenizer.chat_template = None
        return tokenizer
    raise ValueError(template)


def conversation(*turns: str) -> list[dict[str, str]]:
    return [{"role": ("user", "assistant")[i % 2], "content": text} for i, text in enumerate(turns)]


MULTI_TURN = conversation("Hi there", "Hello!", "Name a colour.", "Blue, like the sky.")
PAIRS = [  # (prompt, chosen, rejected): different lengths, so both batches are padded
    ("Name a colour.", "Blue, like the sky on a clear day.", "Red."),
    ("Hi there, how are you today?", "Fine, thanks.", "I am doing well, thank you for asking."),
]


def labelled_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


@pytest.mark.parametrize("template", ["chatml", "llama3", "inst", "default"])
def test_every_trained_row_ends_with_a_labelled_end_of_turn_token(template):
    tokenizer = tokenizer_for(template)
    end_of_turn = tokenizer.eos_token_id
    renderer = ChatRenderer(tokenizer)
    rows = []
    for train_on in ("all_assistant", "last_assistant"):
        encoder = SampleEncoder(tokenizer, renderer, train_on=train_on)
        rows.append((train_on, *encoder.encode_conversation(MULTI_TURN)))
    prompt, chosen, rejected = PAIRS[0]
    record = SampleEncoder(tokenizer, renderer).preference(
        conversation(prompt, chosen), conversation(prompt, rejected), {}
    )
    for side in ("chosen", "rejected"):
        rows.append((side, record[f"{side}_input_ids"], record[f"{side}_labels"], record[f"{side}_text"]))
    for name, ids, labels, text in rows:
        assert ids[-1] == end_of_turn and labels[-1] == end_of_turn, name  # nothing after it, not even "\n"
        assert text.endswith(tokenizer.eos_token), name
        runs = labelled_runs(ids, labels)
        assert len(runs) == (2 if name == "all_assistant" else 1), name
        for run in runs:  # every turn's target stops exactly at its end-of-turn token
            assert run[-1] == end_of_turn and end_of_turn not in run[:-1], name
    # what the template renders after the first assistant turn's end (ChatML's "\n") is not trained on
    _, ids, labels, _ = rows[0]
    middle = labels.index(end_of_turn)
    assert labels[middle] == end_of_turn and labels[middle + 1] == IGNORE_INDEX


def tiny_score_model(vocab_size: int, pad_token_id: int) -> ScoreModel:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=pad_token_id,
    )
    return ScoreModel(Qwen2Model(config), head_init_std=1.0).eval()


def rollout_ending_at_eos(
    prompt_batch: dict[str, Any], responses: list[list[int]], tokenizer: Any
) -> Rollout:
    """What ``generate_rollout`` builds from left-padded prompts and the generated tokens: ``generate``
    stops a row at EOS and pads it with ``pad_token_id`` (here the longest row runs 2 tokens further)."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    width = max(len(r) for r in responses) + 2
    generated = torch.tensor([r + [pad] * (width - len(r)) for r in responses])
    mask, has_eos = response_mask_from_eos(generated, [eos])
    response = torch.where(mask, generated, torch.full_like(generated, pad))
    return Rollout(
        sequences=torch.cat([prompt_batch["input_ids"], response], dim=1),
        attention_mask=torch.cat([prompt_batch["attention_mask"], mask.long()], dim=1),
        response_mask=mask,
        has_eos=has_eos,
        prompt_length=prompt_batch["input_ids"].shape[1],
    )


@pytest.mark.parametrize("template", ["chatml", "llama3", "inst"])
def test_score_model_reads_a_training_row_and_its_rollout_at_the_same_end_of_turn_token(template):
    tokenizer = tokenizer_for(template)
    encoder = SampleEncoder(tokenizer, ChatRenderer(tokenizer))
    pad = tokenizer.pad_token_id
    pairs = [encoder.preference(conversation(p, c), conversation(p, r), {}) for p, c, r in PAIRS]
    prompts = [encoder.prompt_only(conversation(p), {}) for p, _, _ in PAIRS]
    batch = TextCollator(pad, "preference")(pairs)  # right padded: chosen rows, then rejected rows
    prompt_batch = TextCollator(pad, "prompt_only")(prompts)  # left padded, as for generate
    assert (batch["attention_mask"] == 0).any() and (prompt_batch["attention_mask"] == 0).any()

    # a rollout of the same prompt that generated the chosen/rejected response and stopped at EOS
    rows = [p["chosen_input_ids"] for p in pairs] + [p["rejected_input_ids"] for p in pairs]
    responses = []
    for row, prompt in zip(rows, prompts + prompts):
        assert row[: len(prompt["input_ids"])] == prompt["input_ids"]  # training row = prompt + response
        responses.append(row[len(prompt["input_ids"]) :])
    doubled = {k: torch.cat([v, v]) for k, v in prompt_batch.items() if isinstance(v, torch.Tensor)}
    rollout = rollout_ending_at_eos(doubled, responses, tokenizer)
    assert rollout.has_eos.all()

    model = tiny_score_model(len(tokenizer), pad)
    with torch.no_grad():
        trained = model(**model_inputs(batch))  # what the reward model trains on (RewardModelModule)
        scored = model(**rollout.model_inputs())  # what score_with_model feeds it after generation
    for i, row in enumerate(rows):
        kept = rollout.sequences[i][rollout.attention_mask[i].bool()].tolist()
        assert kept == row  # the very same tokens: nothing of the training row lies beyond EOS
        assert batch["input_ids"][i, trained.end_index[i]] == tokenizer.eos_token_id
        assert rollout.sequences[i, scored.end_index[i]] == tokenizer.eos_token_id
        assert int(trained.end_index[i]) == len(row) - 1
    torch.testing.assert_close(scored.end_scores, trained.end_scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("template,expected", [("chatml", "<|im_end|>"), ("llama3", "<|eot_id|>")])
def test_rollouts_stop_at_the_end_of_turn_token_when_the_eos_is_another_token(template, expected):
    """A base tokenizer (EOS ``<|endoftext|>``) with a chat template: generation must still stop where trained
    rows end, at the template's end-of-turn token."""
    from aa_lightning.algorithms import PPOModule
    from aa_lightning.models.turns import end_of_turn_token_ids
    from aa_lightning.rewards import RewardSpec

    tokenizer = tokenizer_for(template)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|endoftext|>"]})
    tokenizer.eos_token = "<|endoftext|>"
    turn_end = tokenizer.convert_tokens_to_ids(expected)
    assert turn_end != tokenizer.eos_token_id
    assert end_of_turn_token_ids(tokenizer) == [turn_end]
    module = PPOModule(reward_functions=[RewardSpec("response_length")])
    module.configure_model()
    module.tokenizer = tokenizer
    assert {turn_end, tokenizer.eos_token_id} <= set(module.eos_token_ids())
    no_template = tokenizer_for("default")
    assert end_of_turn_token_ids(no_template) == []  # no template: nothing guessed
