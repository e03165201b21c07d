"""The environment interface, the tool-call format, the sandboxed calculator and the tool-call reward."""

from __future__ import annotations

import pytest

from aa_lightning.environments import (
    CONVERSATION,
    CalculatorError,
    CalculatorLimits,
    Environment,
    EnvironmentStep,
    ToolEnvironment,
    build_environment,
    evaluate_expression,
    format_tool_call,
    parse_tool_calls,
    register_environment,
    tool_schemas,
)
from aa_lightning.environments.tools import calculator
from aa_lightning.rewards import get_reward


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("(3 + 4) * 12 / 8", 10.5),
        ("2 ** 10", 1024),
        ("17 // 5 + 17 % 5", 5),
        ("-3 + +2", -1),
        ("sqrt(16) + abs(-2) + max(1, 7, 3) + min(4, 2)", 15.0),
        ("round(2 / 3, 2)", 0.67),
        ("floor(2.7) + ceil(2.1)", 5),
        ("1e3 / 8", 125.0),
    ],
)
def test_calculator_evaluates_arithmetic(expression: str, value: float) -> None:
    assert evaluate_expression(expression) == pytest.approx(value)


HOSTILE = [
    ('__import__("os").system("echo pwned")', "not allowed|only these functions"),
    ('__import__("os")', "only these functions"),
    ("().__class__.__bases__[0].__subclasses__()", "brackets"),
    ("open('/etc/passwd')", "only these functions"),
    ("exec('1')", "only these functions"),
    ("(lambda: 1)()", "not allowed|only these functions"),
    ("[x for x in range(10)]", "brackets"),
    ("{1: 2}", "brackets"),
    ("'a' * 10", "not a number"),
    ("x", "unknown name"),
    ("sqrt.__self__", "Attribute is not allowed"),
    ("().__class__", "not allowed"),
    ("abs(x=1)", "keyword is not allowed"),
    ("abs(1, 2, 3, 4, 5, 6, 7, 8, 9)", "positional"),
    ("1 if 1 else 2", "not allowed"),
    ("1 < 2", "not allowed"),
    ("1 | 2", "not allowed"),
    ("9 ** 9 ** 9", "exponent"),
    ("10 ** 40", "exceeds the limit"),
    ("(10 ** 20) * (10 ** 20)", "exceeds the limit"),
    ("2 ** -1000", "exponent"),
    ("(-8) ** 0.5", "fractional power"),
    ("1 / 0", "division by zero"),
    ("5 % 0", "division by zero"),
    ("0 ** -1", "division by zero"),
    ("sqrt(-1)", "negative"),
    ("1" + "+1" * 200, "longer than"),
    ("(" * 30 + "1" + ")" * 30, "parentheses"),
    ("-" * 30 + "1", "nested deeper"),
    ("+".join(["1"] * 60), "parts"),
    ("", "empty"),
    ("1 +", "not an arithmetic expression"),
    ("1e400", "not finite"),
    ("round(1.5, 99)", "digits"),
    ("True + 1", "not a number"),
]


@pytest.mark.parametrize(("expression", "reason"), HOSTILE)
def test_calculator_refuses_hostile_or_oversized_input(expression: str, reason: str) -> None:
    with pytest.raises(CalculatorError, match=reason):
        evaluate_expression(expression)


def test_calculator_time_limit() -> None:
    with pytest.raises(CalculatorError, match="longer than"):
        evaluate_expression("1 + 2 * 3", CalculatorLimits(timeout_s=-1.0))


def test_calculator_tool_reports_errors_as_text() -> None:
    assert calculator("6 * 7") == "42"
    assert calculator("7 / 2") == "3.5"
    assert calculator("__import__('os')").startswith("error: only these functions")


def test_parse_tool_calls_qwen_format() -> None:
    text = 'I will compute.\n<tool_call>\n{"name": "calculator", "arguments": {"expression": "2+3"}}\n</tool_call>'
    parsed = parse_tool_calls(text)
    assert [(c.name, c.arguments) for c in parsed.calls] == [("calculator", {"expression": "2+3"})]
    assert parsed.errors == []
    stringly = parse_tool_calls(
        '<tool_call>{"name": "calculator", "arguments": "{\\"expression\\": \\"1\\"}"}</tool_call>'
    )
    assert stringly.calls[0].arguments == {"expression": "1"}
    bad = parse_tool_calls(
        '<tool_call>{"name": "calc", "arguments": {</tool_call><tool_call>[1]</tool_call><tool_call>'
    )
    assert bad.calls == [] and len(bad.errors) == 3
    assert (
        "not valid JSON" in bad.errors[0] and 'string "name"' in bad.errors[1] and "without" in bad.errors[2]
    )
    assert parse_tool_calls("no call here").attempted == 0
    assert parse_tool_calls(format_tool_call("calculator", {"expression": "1"})).calls[0].name == "calculator"


def test_tool_schema_renders_through_apply_chat_template() -> None:
    """``tools=`` of a chat template that renders tools (a Qwen2.5-style system block) sees the schema."""
    from aa_lightning.testing.tiny_common import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    template = (
        "{% if tools %}<|im_start|>system\n# Tools\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    )
    schemas = tool_schemas(["calculator"])
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tools=schemas, chat_template=template, tokenize=False
    )
    assert '"name": "calculator"' in text and '"required": ["expression"]' in text


def test_tool_environment_runs_calls_and_ends_without_one() -> None:
    env = ToolEnvironment(tools=["calculator"], invalid_call_reward=-0.5)
    conversation = [{"role": "user", "content": "What is 6 times 7?"}]
    call = {"role": "assistant", "content": format_tool_call("calculator", {"expression": "6*7"})}
    step = env.step([*conversation, call], {})
    assert step == EnvironmentStep([{"role": "tool", "content": "42"}], done=False, reward=0.0)
    unknown = {"role": "assistant", "content": format_tool_call("search", {"q": "x"})}
    step = env.step([*conversation, unknown], {})
    assert step.messages[0]["content"].startswith("error: unknown tool 'search'") and step.reward == -0.5
    bad_args = {"role": "assistant", "content": format_tool_call("calculator", {"expr": "1"})}
    assert (
        env.step([*conversation, bad_args], {})
        .messages[0]["content"]
        .startswith("error: calculator: missing")
    )
    assert env.step([*conversation, {"role": "assistant", "content": "#### 42"}], {}).done


def test_build_environment_by_name_spec_and_module_path() -> None:
    assert isinstance(build_environment("tools"), ToolEnvironment)
    env = build_environment({"name": "tools", "kwargs": {"max_calls_per_turn": 1}})
    assert env.max_calls_per_turn == 1
    feedback = build_environment("aa_lightning.environments.builtin:AnswerFeedbackEnvironment")
    wrong = feedback.step(
        [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "#### 3"}],
        {"reference_answer": "2"},
    )
    assert not wrong.done and wrong.messages[0]["role"] == "user" and wrong.reward == 0.0
    right = feedback.step(
        [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "#### 2"}],
        {"reference_answer": "2"},
    )
    assert right.done and right.reward == 1.0
    with pytest.raises(KeyError, match="known environments"):
        build_environment("no_such_env")
    with pytest.raises(TypeError, match="bad kwargs"):
        build_environment({"name": "tools", "kwargs": {"nope": 1}})
    with pytest.raises(ValueError, match="name, kwargs"):
        build_environment({"kind": "tools"})


def test_register_environment() -> None:
    @register_environment("test_echo")
    class Echo(Environment):
        def step(self, conversation, meta):  # noqa: ANN001, ANN202
            return EnvironmentStep([{"role": "user", "content": conversation[-1]["content"]}])

    assert (
        build_environment("test_echo")
        .step([{"role": "assistant", "content": "x"}], {})
        .messages[0]["content"]
        == "x"
    )


def test_tool_call_format_reward() -> None:
    reward = get_reward("tool_call_format")
    good = format_tool_call("calculator", {"expression": "1+1"})

    def conv(*texts: str) -> dict:
        turns = [{"role": "assistant", "content": t} for t in texts]
        return {CONVERSATION: [{"role": "user", "content": "q"}, *turns]}

    metas = [conv(good, "#### 2"), conv("#### 2"), conv(good, "<tool_call>{oops</tool_call>"), {}]
    assert reward(["q"] * 4, ["", "", "", good], metas, malformed=-1.0) == [1.0, 0.0, -1.0, 1.0]
    assert reward(["q"], [""], [conv(good)], tools=["search"]) == [0.0]


def test_scripted_user_replies_in_order_then_ends() -> None:
    env = build_environment({"name": "scripted_user", "kwargs": {"replies": ["Again?", "Sure?"]}})
    conversation = [{"role": "prompt", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert env.step(conversation, {}).messages == [{"role": "user", "content": "Again?"}]
    conversation += [{"role": "user", "content": "Again?"}, {"role": "assistant", "content": "b"}]
    assert env.step(conversation, {}).messages == [{"role": "user", "content": "Sure?"}]
    conversation += [{"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "c"}]
    assert env.step(conversation, {}).done
    with pytest.raises(TypeError, match="bad kwargs"):
        build_environment({"name": "scripted_user", "kwargs": {"reply": "x"}})


# A ChatML template that renders tools the way Qwen2.5's does (written for this test): the schemas in a system
# block, tool results as a user turn of <tool_response> blocks, consecutive results in one turn.
QWEN25_STYLE = (
    "{% if tools %}<|im_start|>system\n# Tools\n<tools>\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
    "</tools><|im_end|>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}<|im_start|>user{% endif %}"
    "{{ '\\n<tool_response>\\n' + m['content'] + '\\n</tool_response>' }}"
    "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}<|im_end|>\n{% endif %}"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_tools_and_tool_results_through_a_qwen25_style_template() -> None:
    """The data layer's renderer puts the schemas into the prompt; the observation renderer turns two tool
    results into the one user turn of <tool_response> blocks the template renders, then the generation prompt."""
    from aa_lightning.data.templating import ChatRenderer
    from aa_lightning.environments.rendering import ObservationRenderer
    from aa_lightning.testing.tiny_common import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = QWEN25_STYLE
    prompt = ChatRenderer(tokenizer, tools=tool_schemas(["calculator"])).render(
        [{"role": "user", "content": "What is 6 * 7?"}], add_generation_prompt=True
    )
    assert prompt.startswith("<|im_start|>system\n# Tools\n<tools>\n") and '"name": "calculator"' in prompt
    assert "tools" not in ChatRenderer(tokenizer).render([{"role": "user", "content": "q"}])
    results = [{"role": "tool", "content": "42"}, {"role": "tool", "content": "error: division by zero"}]
    text = ObservationRenderer(tokenizer).text(results, "<|im_end|>")
    assert text == (
        "\n<|im_start|>user\n<tool_response>\n42\n</tool_response>\n<tool_response>\nerror: division by zero\n"
        "</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )
