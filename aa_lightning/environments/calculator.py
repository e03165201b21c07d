"""A sandboxed calculator: arithmetic expressions evaluated over a whitelisted AST, never ``eval``.

The policy writes the expression, so it is hostile input: only number literals, ``+ - * / // % **``, unary
signs, parentheses, the constants ``pi``/``e`` and a few pure functions (``abs``, ``round``, ``min``, ``max``,
``sqrt``, ...) are accepted. Every other node (names, attributes, subscripts, calls of anything else,
strings, lambdas, comprehensions) is refused before anything runs. Limits bound the work of one expression:
its length, AST size and depth, the size of every intermediate number (so ``9**9**9`` or ``10**100 * ...``
are refused before they are computed), exponents, and a wall-clock deadline checked at every node.
"""

from __future__ import annotations

import ast
import math
import operator
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["CalculatorError", "CalculatorLimits", "evaluate_expression", "format_number"]


class CalculatorError(ValueError):
    """An expression the calculator refuses or cannot evaluate; the message says why (shown to the policy)."""


@dataclass(frozen=True)
class CalculatorLimits:
    """Bounds on one expression: characters, AST nodes and depth, exponent, result magnitude, seconds."""

    max_chars: int = 200
    max_nodes: int = 64
    max_depth: int = 16
    max_exponent: float = 64.0
    max_magnitude: float = 1e30
    timeout_s: float = 0.05


def _sqrt(x: float) -> float:
    if x < 0:
        raise CalculatorError("sqrt of a negative number")
    return math.sqrt(x)


def _log(x: float, base: float = math.e) -> float:
    if x <= 0 or base <= 0 or base == 1:
        raise CalculatorError("log needs a positive argument and a positive base other than 1")
    return math.log(x, base)


def _round(x: float, digits: int = 0) -> float:
    if not isinstance(digits, int) or not 0 <= digits <= 12:
        raise CalculatorError("round takes 0 to 12 digits")
    return round(x, digits)


FUNCTIONS: dict[str, Callable[..., float]] = {
    "abs": abs,
    "round": _round,
    "min": min,
    "max": max,
    "sqrt": _sqrt,
    "log": _log,
    "floor": math.floor,
    "ceil": math.ceil,
}
CONSTANTS = {"pi": math.pi, "e": math.e}
_BINARY: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[float], float]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_MAX_ARGS = 8


class _Evaluator:
    def __init__(self, limits: CalculatorLimits) -> None:
        self.limits = limits
        self.deadline = time.monotonic() + limits.timeout_s

    def number(self, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CalculatorError(f"not a number: {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise CalculatorError("the result is not finite")
        if abs(value) > self.limits.max_magnitude:
            raise CalculatorError(f"a number exceeds the limit of {self.limits.max_magnitude:g}")
        return value

    def power(self, base: float, exponent: float) -> float:
        if abs(exponent) > self.limits.max_exponent:
            raise CalculatorError(f"exponent {exponent:g} exceeds the limit of {self.limits.max_exponent:g}")
        if base == 0 and exponent < 0:
            raise CalculatorError("division by zero")
        if abs(base) > 1 and exponent > 0:  # the size of the result, before computing it
            if exponent * math.log10(abs(base)) > math.log10(self.limits.max_magnitude):
                raise CalculatorError(f"a number exceeds the limit of {self.limits.max_magnitude:g}")
        if base < 0 and not float(exponent).is_integer():
            raise CalculatorError("a negative number to a fractional power")
        return base**exponent

    def eval(self, node: ast.AST) -> float:
        if time.monotonic() > self.deadline:
            raise CalculatorError(f"the expression took longer than {self.limits.timeout_s:g} s")
        if isinstance(node, ast.Expression):
            return self.eval(node.body)
        if isinstance(node, ast.Constant):
            return self.number(node.value)
        if isinstance(node, ast.Name):
            if node.id not in CONSTANTS:
                raise CalculatorError(f"unknown name {node.id!r} (constants: {', '.join(CONSTANTS)})")
            return CONSTANTS[node.id]
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return self.number(_UNARY[type(node.op)](self.eval(node.operand)))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = self.eval(node.left), self.eval(node.right)
            if isinstance(node.op, ast.Pow):
                return self.number(self.power(left, right))
            if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and right == 0:
                raise CalculatorError("division by zero")
            return self.number(_BINARY[type(node.op)](left, right))
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
                raise CalculatorError(f"only these functions can be called: {', '.join(FUNCTIONS)}")
            if node.keywords or not 1 <= len(node.args) <= _MAX_ARGS:
                raise CalculatorError(f"{node.func.id} takes 1 to {_MAX_ARGS} positional arguments")
            args = [self.eval(a) for a in node.args]
            try:
                return self.number(FUNCTIONS[node.func.id](*args))
            except (TypeError, OverflowError) as err:
                raise CalculatorError(f"{node.func.id}: {err}") from None
        raise CalculatorError(f"{type(node).__name__} is not allowed in a calculator expression")


_ALLOWED_NODES = (
    ast.Expression,
    ast.Constant,
    ast.Name,
    ast.Load,
    ast.UnaryOp,
    ast.BinOp,
    ast.Call,
    *_BINARY,
    *_UNARY,
)


def _check_nodes(tree: ast.AST) -> None:
    """Refuse the whole expression before anything runs when any node is not on the whitelist."""
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED_NODES):
            raise CalculatorError(f"{type(node).__name__} is not allowed in a calculator expression")
        if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS):
            raise CalculatorError(f"only these functions can be called: {', '.join(FUNCTIONS)}")


def _depth(node: ast.AST, limit: int, level: int = 1) -> None:
    if level > limit:
        raise CalculatorError(f"the expression is nested deeper than {limit} levels")
    for child in ast.iter_child_nodes(node):
        _depth(child, limit, level + 1)


def evaluate_expression(expression: str, limits: CalculatorLimits | None = None) -> float:
    """The value of an arithmetic ``expression``; :class:`CalculatorError` for anything else or over a limit."""
    limits = limits or CalculatorLimits()
    if not isinstance(expression, str):
        raise CalculatorError(f"the expression must be a string, got {type(expression).__name__}")
    if len(expression) > limits.max_chars:
        raise CalculatorError(f"the expression is longer than {limits.max_chars} characters")
    if not expression.strip():
        raise CalculatorError("the expression is empty")
    # the parser itself recurses: bound the brackets before handing it the text
    if "[" in expression or "{" in expression:
        raise CalculatorError("brackets [ ] and braces { } are not allowed in a calculator expression")
    if expression.count("(") > limits.max_depth:
        raise CalculatorError(f"the expression has more than {limits.max_depth} parentheses")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError) as err:
        raise CalculatorError(f"not an arithmetic expression: {type(err).__name__}") from None
    nodes = sum(1 for _ in ast.walk(tree))
    if nodes > limits.max_nodes:
        raise CalculatorError(f"the expression has {nodes} parts, more than the limit of {limits.max_nodes}")
    _check_nodes(tree)
    _depth(tree, limits.max_depth)
    try:
        return _Evaluator(limits).eval(tree)
    except ZeroDivisionError:
        raise CalculatorError("division by zero") from None
    except (OverflowError, RecursionError, MemoryError) as err:
        raise CalculatorError(f"the expression is too large: {type(err).__name__}") from None


def format_number(value: float) -> str:
    """``7`` for ``7.0`` (so a GSM8K answer check reads it as the integer it is), else 10 significant digits."""
    if isinstance(value, int):
        return str(value)
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.10g}"
