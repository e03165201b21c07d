"""The tool-call-format reward: did the episode call tools, and were all its calls well formed?"""

from __future__ import annotations

from typing import Any

from aa_lightning.environments.base import CONVERSATION
from aa_lightning.environments.tools import parse_tool_calls
from aa_lightning.rewards.registry import register_reward

__all__ = ["tool_call_format"]


@register_reward("tool_call_format")
def tool_call_format(
    prompt: str,
    response: str,
    meta: dict[str, Any],
    called: float = 1.0,
    malformed: float = 0.0,
    no_call: float = 0.0,
    tools: list[str] | None = None,
) -> float:
    """``called`` when the policy's turns hold at least one tool call and every call parses (a JSON object
    with a string ``name`` and object ``arguments`` between ``<tool_call>`` tags, a name among ``tools`` when
    given); ``malformed`` when any call does not; ``no_call`` without calls.

    Multi-turn rollouts read every assistant turn of ``meta["conversation"]``; otherwise the response.
    """
    conversation = meta.get(CONVERSATION)
    texts = (
        [str(m["content"]) for m in conversation if m.get("role") == "assistant"]
        if conversation
        else [response]
    )
    calls = errors = 0
    for text in texts:
        parsed = parse_tool_calls(text)
        calls += len(parsed.calls)
        errors += len(parsed.errors)
        if tools is not None:
            errors += sum(c.name not in tools for c in parsed.calls)
    if errors:
        return malformed
    return called if calls else no_call
