"""Environment messages -> the tokens that follow a policy turn, rendered by the model's own chat template.

The same :class:`~aa_lightning.data.templating.ChatRenderer` renders the prompts (data layer) and the
environment turns (here), so a transcript's tokens are the ones the chat model sees in a real conversation.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ObservationRenderer"]

_MARK = "\u2063aa-turn\u2063"


class ObservationRenderer:
    """Environment messages -> the token ids that follow a policy turn in the chat template.

    The text is what the template renders after an assistant message (its end-of-turn token excluded, the
    policy generated that) up to and including the next generation prompt, so the transcript's tokens are the
    ones a chat model sees in a real conversation. Found by rendering a fixed short conversation with and
    without the messages; a template that is not prefix-stable there is refused.
    """

    def __init__(self, tokenizer: Any, processor: Any = None, model_class: Any = None) -> None:
        from aa_lightning.data.templating import ChatRenderer

        self.tokenizer = tokenizer
        self.renderer = ChatRenderer(tokenizer, processor, model_class)
        self.base = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _MARK}]
        base_text = self.renderer.render(self.base)
        if _MARK not in base_text:
            raise ValueError(f"the {self.renderer.source} chat template drops the assistant message content")
        self.base_text = base_text
        self.closing = base_text[base_text.index(_MARK) + len(_MARK) :]  # e.g. "<|im_end|>\n"

    def text(self, messages: list[dict[str, Any]], end_token_text: str) -> str:
        """The text after a policy turn that ended with ``end_token_text`` (the decoded end token)."""
        full = self.renderer.render([*self.base, *messages], add_generation_prompt=True)
        if not full.startswith(self.base_text):
            raise ValueError(
                f"the {self.renderer.source} chat template is not prefix-stable: rendering an environment "
                f"message ({messages[0].get('role')!r}) changes the text before it"
            )
        closing = self.closing
        if end_token_text and closing.startswith(end_token_text):
            closing = closing[len(end_token_text) :]
        return closing + full[len(self.base_text) :]

    def ids(self, messages: list[dict[str, Any]], end_token_id: int | None) -> list[int]:
        """Token ids after a policy turn that ended with ``end_token_id`` (None: cut, the turn is closed here)."""
        end_text = (
            "" if end_token_id is None else self.tokenizer.decode([end_token_id], skip_special_tokens=False)
        )
        return list(self.tokenizer(self.text(messages, end_text), add_special_tokens=False).input_ids)
