"""Chat-template priority and exact assistant-only label masks."""

from __future__ import annotations

import pytest

from aa_lightning.data.encoding import IGNORE_INDEX, PromptTooLongError, SampleEncoder
from aa_lightning.data.templating import ChatRenderer, default_chat_template
from aa_lightning.testing.tiny_common import build_tiny_tokenizer

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue, like the sky."},
]

# A Qwen2.5-style template that injects a default system prompt when there is none.
DEFAULT_SYSTEM_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def labelled_text(tokenizer, ids, labels) -> list[str]:
    """Decoded runs of consecutive labelled tokens."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


@pytest.mark.parametrize("template", [None, DEFAULT_SYSTEM_TEMPLATE])
def test_labels_are_exactly_the_assistant_turns(template):
    tokenizer = build_tiny_tokenizer()
    if template:
        tokenizer.chat_template = template
    encoder = SampleEncoder(tokenizer, ChatRenderer(tokenizer), max_length=512)
    ids, labels, text = encoder.encode_conversation(CONVERSATION)
    assert labelled_text(tokenizer, ids, labels) == ["Hello!<|im_end|>", "Blue, like the sky.<|im_end|>"]
    # the token just before each labelled run is the end of the assistant header
    first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert tokenizer.decode(ids[:first]).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(ids) == text


def test_last_assistant_only():
    tokenizer = build_tiny_tokenizer()
    encoder = SampleEncoder(tokenizer, ChatRenderer(tokenizer), max_length=512, train_on="last_assistant")
    ids, labels, _ = encoder.encode_conversation(CONVERSATION)
    assert labelled_text(tokenizer, ids, labels) == ["Blue, like the sky.<|im_end|>"]


def test_default_template_labels_include_eos():
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = None
    renderer = ChatRenderer(tokenizer)
    assert renderer.source == "default"
    ids, labels, text = SampleEncoder(tokenizer, renderer).encode_conversation(CONVERSATION[1:3])
    assert text == "USER: Hi there\nASSISTANT: Hello!<|im_end|>"  # nothing after the last end of turn
    # " Hello" is one token that straddles the prompt's trailing space: it is labelled (the model must say it)
    assert labelled_text(tokenizer, ids, labels) == [" Hello!<|im_end|>"]
    assert default_chat_template(CONVERSATION[1:2], True) == "USER: Hi there\nASSISTANT: "


def test_template_priority_model_class_over_tokenizer_over_default():
    tokenizer = build_tiny_tokenizer()

    class WithTemplateString:
        chat_template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"

    class WithTemplateMethod:
        aa_custom_chat_template = True

        @staticmethod
        def apply_chat_template(messages, add_generation_prompt=False):
            return "".join(f"<{m['role']}>{m['content']}" for m in messages) + (
                "<assistant>" if add_generation_prompt else ""
            )

    conv = CONVERSATION[1:3]
    assert (
        ChatRenderer(tokenizer, model_class=WithTemplateString).render(conv)
        == "[user]Hi there[assistant]Hello!"
    )
    method = ChatRenderer(tokenizer, model_class=WithTemplateMethod)
    assert method.source == "model class"
    assert method.render(conv[:1], add_generation_prompt=True) == "<user>Hi there<assistant>"
    assert ChatRenderer(tokenizer).source == "tokenizer"
    tokenizer.chat_template = None
    assert ChatRenderer(tokenizer).source == "default"


def test_prefix_unstable_template_is_reported():
    tokenizer = build_tiny_tokenizer()
    # puts the number of messages up front: the prefix render is not a prefix of the full render
    tokenizer.chat_template = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="not prefix-stable"):
        ChatRenderer(tokenizer).render_with_spans(CONVERSATION[1:3])


def test_truncation_that_removes_the_response_is_an_error_not_silence():
    tokenizer = build_tiny_tokenizer()
    encoder = SampleEncoder(tokenizer, ChatRenderer(tokenizer), max_length=6)
    with pytest.raises(PromptTooLongError, match="max_length=6"):
        encoder.encode_conversation(CONVERSATION)
    # a cut inside the response keeps the row (labels on what is left)
    ids, labels, _ = SampleEncoder(tokenizer, ChatRenderer(tokenizer), max_length=22).encode_conversation(
        CONVERSATION[1:3]
    )
    assert len(ids) <= 22 and any(label != IGNORE_INDEX for label in labels)
