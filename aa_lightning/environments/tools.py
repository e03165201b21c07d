"""Tools a policy can call, and the JSON tool-call format chat templates use.

A tool call is a JSON object ``{"name": ..., "arguments": {...}}`` between ``<tool_call>`` and
``</tool_call>`` (Qwen2.5's and Hermes' format; their chat templates render the tool schemas given as
``tools=`` to ``apply_chat_template`` into the system prompt and ``tool`` messages as tool responses).
A tool is registered with ``@register_tool`` and described by the JSON schema those templates take.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aa_lightning.environments.calculator import (
    CalculatorError,
    CalculatorLimits,
    evaluate_expression,
    format_number,
)
from aa_lightning.registry import Registry, import_path_module

__all__ = [
    "TOOL_CALL_CLOSE",
    "TOOL_CALL_OPEN",
    "ParsedToolCalls",
    "Tool",
    "ToolCall",
    "available_tools",
    "calculator",
    "format_tool_call",
    "get_tool",
    "parse_tool_calls",
    "register_tool",
    "tool_schemas",
]

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
_CALL_RE = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)" + re.escape(TOOL_CALL_CLOSE), re.DOTALL)


@dataclass(frozen=True)
class Tool:
    """A callable tool: ``fn(**arguments) -> str`` plus the description and JSON schema of its arguments."""

    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., str]

    def schema(self) -> dict[str, Any]:
        """The ``{"type": "function", "function": {...}}`` entry of ``tools=`` in ``apply_chat_template``."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }

    def __call__(self, arguments: dict[str, Any]) -> str:
        required = self.parameters.get("required", [])
        missing = [k for k in required if k not in arguments]
        known = set(self.parameters.get("properties", {}))
        unknown = [k for k in arguments if k not in known]
        if missing or unknown:
            raise ValueError(f"{self.name}: missing arguments {missing}, unknown arguments {unknown}")
        return self.fn(**arguments)


_TOOLS: Registry[Tool] = Registry("tool", origin=lambda tool: tool.fn, hint=" (or 'package.module:tool')")


def register_tool(
    name: str, description: str, parameters: dict[str, Any], *, override: bool = False
) -> Callable[[Callable[..., str]], Callable[..., str]]:
    """Decorator registering ``fn(**arguments) -> str`` as the tool ``name``; returns ``fn`` unchanged."""

    def decorator(fn: Callable[..., str]) -> Callable[..., str]:
        _TOOLS.register(name, Tool(name, description, parameters, fn), override=override)
        return fn

    return decorator


def available_tools() -> list[str]:
    return _TOOLS.names()


def get_tool(name: str) -> Tool:
    """The tool registered as ``name``; ``"module:attr"`` imports ``module`` (which registers it or holds a
    :class:`Tool` under ``attr``)."""
    if name in _TOOLS:
        return _TOOLS[name]
    if ":" in name:
        module, attr = import_path_module(name, "tool")
        found = getattr(module, attr, None)
        if isinstance(found, Tool):
            return found
        if attr in _TOOLS:
            return _TOOLS[attr]
        raise KeyError(f"module {module.__name__!r} has no Tool {attr!r} and registers no tool of that name")
    return _TOOLS[name]  # raises, listing the known tools


def tool_schemas(names: list[str]) -> list[dict[str, Any]]:
    """The ``tools=`` argument of ``apply_chat_template`` for the tools ``names``."""
    return [get_tool(n).schema() for n in names]


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass
class ParsedToolCalls:
    """The well-formed calls of a message and the reasons the others were refused (one per bad call)."""

    calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def attempted(self) -> int:
        return len(self.calls) + len(self.errors)


def parse_tool_calls(text: str) -> ParsedToolCalls:
    """Every ``<tool_call>{json}</tool_call>`` of ``text``; an opening tag without its closing tag is an error."""
    out = ParsedToolCalls()
    for match in _CALL_RE.finditer(text):
        body = match.group(1).strip()
        try:
            value = json.loads(body)
        except json.JSONDecodeError as err:
            out.errors.append(f"the tool call is not valid JSON ({err.msg} at character {err.pos})")
            continue
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            out.errors.append('a tool call must be a JSON object with a string "name"')
            continue
        arguments = value.get("arguments", {})
        if isinstance(arguments, str):  # some templates emit the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass
        if not isinstance(arguments, dict):
            out.errors.append(f'the "arguments" of tool call {value["name"]!r} must be a JSON object')
            continue
        out.calls.append(ToolCall(value["name"], arguments))
    if text.count(TOOL_CALL_OPEN) > text.count(TOOL_CALL_CLOSE):
        out.errors.append(f"a {TOOL_CALL_OPEN} without its {TOOL_CALL_CLOSE}")
    return out


def format_tool_call(name: str, arguments: dict[str, Any]) -> str:
    """The text of one call, as a policy (or an SFT example) writes it."""
    return f"{TOOL_CALL_OPEN}{json.dumps({'name': name, 'arguments': arguments})}{TOOL_CALL_CLOSE}"


_LIMITS = CalculatorLimits()


@register_tool(
    "calculator",
    "Evaluate an arithmetic expression (numbers, + - * / // % **, parentheses, abs round min max sqrt log "
    "floor ceil, pi, e) and return its value.",
    {
        "type": "object",
        "properties": {"expression": {"type": "string", "description": "for example (3 + 4) * 12 / 8"}},
        "required": ["expression"],
    },
)
def calculator(expression: str) -> str:
    """The value of ``expression`` (sandboxed, :mod:`.calculator`), or ``error: <why>``."""
    try:
        return format_number(evaluate_expression(expression, _LIMITS))
    except CalculatorError as err:
        return f"error: {err}"
