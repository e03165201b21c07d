"""Environments and tools of multi-turn RL rollouts (see :mod:`.base` for the interface).

Built-ins: the environments ``tools`` (runs the policy's ``<tool_call>`` JSON calls), ``answer_feedback``
(a user turn asking again after a wrong answer) and ``scripted_user`` (fixed follow-up user turns); the tool ``calculator`` (a sandboxed arithmetic evaluator).
"""

from aa_lightning.environments import builtin  # noqa: F401  (registers the built-ins)
from aa_lightning.environments.base import (
    CONVERSATION,
    Environment,
    EnvironmentSpec,
    EnvironmentStep,
    available_environments,
    build_environment,
    register_environment,
)
from aa_lightning.environments.builtin import (
    AnswerFeedbackEnvironment,
    ScriptedUserEnvironment,
    ToolEnvironment,
)
from aa_lightning.environments.calculator import CalculatorError, CalculatorLimits, evaluate_expression
from aa_lightning.environments.tools import (
    Tool,
    ToolCall,
    available_tools,
    format_tool_call,
    get_tool,
    parse_tool_calls,
    register_tool,
    tool_schemas,
)

__all__ = [
    "CONVERSATION",
    "AnswerFeedbackEnvironment",
    "CalculatorError",
    "CalculatorLimits",
    "Environment",
    "EnvironmentSpec",
    "EnvironmentStep",
    "ScriptedUserEnvironment",
    "Tool",
    "ToolCall",
    "ToolEnvironment",
    "available_environments",
    "available_tools",
    "build_environment",
    "evaluate_expression",
    "format_tool_call",
    "get_tool",
    "parse_tool_calls",
    "register_environment",
    "register_tool",
    "tool_schemas",
]
