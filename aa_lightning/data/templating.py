"""Conversation -> text, and the character spans of assistant turns in that text.

Chat template priority (as in align-anything): the model class's own template > the processor's or
tokenizer's chat template > :func:`default_chat_template`. Assistant spans are found by rendering the
conversation prefix by prefix, so any chat template works without ``{% generation %}`` markers.

A turn's target ends at the template's end-of-turn token (``<|im_end|>``, ``<|eot_id|>``, ``</s>``): the
whitespace many templates render after it (ChatML's ``\n``) is neither trained on nor, after the last
turn, kept at the end of the text. Rollouts stop at that token, so a score model reads the end score of a
training row and of a rollout at the same token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Message = dict[str, Any]
Conversation = list[Message]


def text_of(content: Any) -> str:
    """The text of a message content: a string, or the concatenated text parts of a parts list."""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")


def as_text_messages(conversation: Conversation) -> Conversation:
    """Messages with string contents (what text-only tokenizer templates expect)."""
    return [{**m, "content": text_of(m["content"])} for m in conversation]


def as_parts_messages(conversation: Conversation) -> Conversation:
    """Messages whose contents are parts lists (what multimodal processor templates expect)."""
    out = []
    for m in conversation:
        content = m["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        out.append({**m, "content": content})
    return out


def default_chat_template(
    conversation: Conversation, add_generation_prompt: bool, eos_token: str = ""
) -> str:
    """``ROLE: text`` lines; assistant turns end with the EOS token so the model learns to stop."""
    text = ""
    for message in conversation:
        body = text_of(message["content"])
        end = eos_token if message["role"] == "assistant" else ""
        text += f"{message['role'].upper()}: {body}{end}\n"
    if add_generation_prompt:
        text += "ASSISTANT: "
    return text


def special_token_texts(tokenizer: Any) -> tuple[str, ...]:
    """Texts of the tokenizer's special tokens (where a template's end-of-turn marker is found)."""
    texts = set(getattr(tokenizer, "all_special_tokens", None) or ())
    for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(token, "special", False):
            texts.add(getattr(token, "content", str(token)))
    return tuple(sorted(text for text in texts if text))


class ChatRenderer:
    """Renders conversations to text with the highest-priority template available."""

    def __init__(
        self, tokenizer: Any, processor: Any = None, model_class: Any = None, tools: list[dict] | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.processor = processor
        self.render_fn: Callable[[Conversation, bool], str]
        # tool schemas a chat template renders into its system prompt (Qwen2.5, Llama 3.1, Hermes ...)
        extra: dict[str, Any] = {"tools": tools} if tools else {}
        custom = getattr(model_class, "apply_chat_template", None) if model_class is not None else None
        custom_template = getattr(model_class, "chat_template", None) if model_class is not None else None
        if callable(custom) and getattr(model_class, "aa_custom_chat_template", False):
            self.source = "model class"
            self.render_fn = lambda conv, gen: custom(conv, add_generation_prompt=gen)
        elif isinstance(custom_template, str):
            self.source = "model class"
            self.render_fn = lambda conv, gen: tokenizer.apply_chat_template(
                as_text_messages(conv),
                chat_template=custom_template,
                add_generation_prompt=gen,
                tokenize=False,
                **extra,
            )
        elif processor is not None and getattr(processor, "chat_template", None):
            self.source = "processor"
            self.render_fn = lambda conv, gen: processor.apply_chat_template(
                as_parts_messages(conv), add_generation_prompt=gen, tokenize=False, **extra
            )
        elif getattr(tokenizer, "chat_template", None):
            self.source = "tokenizer"
            self.render_fn = lambda conv, gen: tokenizer.apply_chat_template(
                as_text_messages(conv), add_generation_prompt=gen, tokenize=False, **extra
            )
        else:
            self.source = "default"
            eos = tokenizer.eos_token or ""
            self.render_fn = lambda conv, gen: default_chat_template(conv, gen, eos)
        self.special_tokens = special_token_texts(tokenizer)

    def turn_end(self, text: str, start: int, end: int) -> int:
        """End of the assistant turn ``text[start:end]`` without the whitespace after its end-of-turn token.

        Only whitespace that follows a special token is dropped: a template with no end-of-turn token
        keeps its own ending (then nothing else tells the model to stop).
        """
        stripped = start + len(text[start:end].rstrip())
        if stripped < end and any(text.endswith(token, start, stripped) for token in self.special_tokens):
            return stripped
        return end

    def render(self, conversation: Conversation, add_generation_prompt: bool = False) -> str:
        return self.render_fn(conversation, add_generation_prompt)

    def render_with_spans(
        self, conversation: Conversation, train_on: str = "all_assistant"
    ) -> tuple[str, list[tuple[int, int]]]:
        """The full text and the ``[start, end)`` character spans of the assistant turns to train on.

        Each span ends at the turn's end-of-turn token (:meth:`turn_end`); when the conversation ends
        with an assistant turn, the text ends there too (only whitespace is dropped).
        ``train_on``: ``all_assistant`` (every assistant turn) or ``last_assistant``. Raises ValueError
        when the template is not prefix-stable (a prefix render is not a prefix of the full render).
        """
        full = self.render(conversation)
        spans: list[tuple[int, int]] = []
        for k, message in enumerate(conversation):
            if message["role"] != "assistant":
                continue
            prompt = self.render(conversation[:k], add_generation_prompt=True)
            upto = self.render(conversation[: k + 1])
            if not (upto.startswith(prompt) and full.startswith(upto)):
                raise ValueError(
                    f"the {self.source} chat template is not prefix-stable: rendering the first {k} messages "
                    "is not a prefix of the whole conversation, so assistant tokens cannot be located. "
                    "Register a model class with its own chat template (see aa_lightning.models.registry)."
                )
            spans.append((len(prompt), self.turn_end(upto, len(prompt), len(upto))))
        if spans and not full[spans[-1][1] :].strip():
            full = full[: spans[-1][1]]
        if train_on == "last_assistant":
            spans = spans[-1:]
        elif train_on != "all_assistant":
            raise ValueError(f"train_on must be 'all_assistant' or 'last_assistant', got {train_on!r}")
        return full, spans
