"""Which token closes an assistant turn in a checkpoint's chat template (``<|im_end|>``, ``<|eot_id|>``, ...).

Trained rows end at that token (the data side cuts them there), so rollouts must stop there too: a base
tokenizer's EOS (``<|endoftext|>``) used with a ChatML template would otherwise let generation run past the
end of the turn, and a reward model would read rollouts at a position no training row has.
"""

from __future__ import annotations

from typing import Any

__all__ = ["end_of_turn_token_ids"]

_MARKER = "\u2063aa-turn-end\u2063"


def _special_tokens(tokenizer: Any) -> list[str]:
    texts = set(getattr(tokenizer, "all_special_tokens", None) or ())
    for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(token, "special", False):
            texts.add(getattr(token, "content", str(token)))
    return sorted((t for t in texts if t), key=len, reverse=True)


def end_of_turn_token_ids(tokenizer: Any, processor: Any = None) -> list[int]:
    """The id of the special token that follows an assistant message in the chat template (``[]`` if none:
    no template, or a template that closes turns with plain text)."""
    owner = processor if getattr(processor, "chat_template", None) else tokenizer
    if not getattr(owner, "chat_template", None):
        return []
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _MARKER}]
    try:
        text = owner.apply_chat_template(conversation, tokenize=False)
    except Exception:  # a template with requirements of its own (system turns, media): no guess
        return []
    if not isinstance(text, str) or _MARKER not in text:
        return []
    after = text[text.index(_MARKER) + len(_MARKER) :].lstrip(" ")
    for token in _special_tokens(tokenizer):
        if after.startswith(token):
            token_id = tokenizer.convert_tokens_to_ids(token)
            return [int(token_id)] if isinstance(token_id, int) and token_id >= 0 else []
    return []
