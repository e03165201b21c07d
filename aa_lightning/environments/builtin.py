"""Built-in environments: ``tools`` (runs the policy's tool calls), ``answer_feedback`` (a user who checks the
answer) and ``scripted_user`` (fixed follow-up user turns)."""

from __future__ import annotations

from typing import Any

from aa_lightning.environments.base import Environment, EnvironmentStep, Message, register_environment
from aa_lightning.environments.tools import get_tool, parse_tool_calls

__all__ = ["AnswerFeedbackEnvironment", "ScriptedUserEnvironment", "ToolEnvironment"]


@register_environment("tools")
class ToolEnvironment(Environment):
    """Runs the tool calls of the last assistant message and answers with one ``tool`` message per call.

    A message without a tool call ends the episode (it is the final answer). A malformed call or an unknown
    tool gets an ``error: ...`` tool message, so the policy sees what went wrong.

    Args:
        tools: names of the tools it may call (registered, or ``package.module:tool``).
        max_calls_per_turn: calls of one message that are run; further calls get an error message.
        invalid_call_reward: reward of a turn with a malformed call or an unknown tool (e.g. -0.1).
    """

    def __init__(
        self, tools: list[str] | None = None, max_calls_per_turn: int = 4, invalid_call_reward: float = 0.0
    ) -> None:
        names = list(tools) if tools is not None else ["calculator"]
        self.tools = {get_tool(n).name: get_tool(n) for n in names}
        self.max_calls_per_turn = max_calls_per_turn
        self.invalid_call_reward = invalid_call_reward

    def step(self, conversation: list[Message], meta: dict[str, Any]) -> EnvironmentStep:
        parsed = parse_tool_calls(str(conversation[-1]["content"]))
        if not parsed.attempted:
            return EnvironmentStep(done=True)
        messages = [{"role": "tool", "content": f"error: {e}"} for e in parsed.errors]
        invalid = bool(parsed.errors)
        for k, call in enumerate(parsed.calls):
            tool = self.tools.get(call.name)
            if k >= self.max_calls_per_turn:
                content = f"error: at most {self.max_calls_per_turn} tool calls per turn"
            elif tool is None:
                content = f"error: unknown tool {call.name!r} (tools: {', '.join(self.tools)})"
            else:
                try:
                    content = tool(call.arguments)
                except (ValueError, TypeError) as err:
                    content = f"error: {err}"
            invalid = invalid or content.startswith("error:")
            messages.append({"role": "tool", "content": content})
        return EnvironmentStep(messages, reward=self.invalid_call_reward if invalid else 0.0)


@register_environment("answer_feedback")
class AnswerFeedbackEnvironment(Environment):
    """A user who checks the final answer against ``meta["reference_answer"]`` and asks again when it is wrong.

    Each turn is rewarded ``correct_reward`` or ``0``; a correct answer ends the episode.
    """

    def __init__(
        self, feedback: str = "That is not right. Please try again.", correct_reward: float = 1.0
    ) -> None:
        self.feedback = feedback
        self.correct_reward = correct_reward

    def step(self, conversation: list[Message], meta: dict[str, Any]) -> EnvironmentStep:
        if "reference_answer" not in meta:
            raise KeyError("answer_feedback needs meta['reference_answer'] (use the GSM8K template)")
        from aa_lightning.rewards.builtin import (
            extract_final_answer,
            normalize_number,
        )  # rewards import tools

        answer = extract_final_answer(str(conversation[-1]["content"]))
        if answer is not None and normalize_number(answer) == normalize_number(str(meta["reference_answer"])):
            return EnvironmentStep(done=True, reward=self.correct_reward)
        return EnvironmentStep([{"role": "user", "content": self.feedback}])


@register_environment("scripted_user")
class ScriptedUserEnvironment(Environment):
    """Fixed follow-up user turns: after the policy's ``k``-th turn the user says ``replies[k - 1]``; the episode
    ends after the policy answered the last one (e.g. ``["Double-check your answer."]`` for self-correction)."""

    def __init__(self, replies: list[str] | None = None) -> None:
        self.replies = list(replies) if replies is not None else ["Are you sure? Check your answer."]
        if not self.replies:
            raise ValueError("scripted_user needs at least one reply")

    def step(self, conversation: list[Message], meta: dict[str, Any]) -> EnvironmentStep:
        turns = sum(1 for m in conversation if m.get("role") == "assistant")
        if turns > len(self.replies):
            return EnvironmentStep(done=True)
        return EnvironmentStep([{"role": "user", "content": self.replies[turns - 1]}])
