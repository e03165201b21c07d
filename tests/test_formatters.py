"""Formatters on real rows (tests/fixtures/text), the registry, and bad-row error messages."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest

from aa_lightning.data.errors import DataFormatError, with_location
from aa_lightning.data.formatters import (
    BaseFormatter,
    UnknownTemplateError,
    available_templates,
    get_formatter,
    register_template,
)
from aa_lightning.data.formatters import registry as registry_module

FIXTURES = Path(__file__).parent / "fixtures" / "text"

BUILTINS = {
    "Alpaca",
    "AlignAnything-Text",
    "Messages",
    "KTO",
    "ShareGPT",
    "HH-RLHF",
    "PKU-SafeRLHF",
    "PKU-SafeRLHF-Safety",
    "UltraFeedback",
    "GSM8K",
}


def load(name: str) -> list[dict[str, Any]]:
    path = FIXTURES / name
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return json.loads(path.read_text(encoding="utf-8"))


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict[str, str]:
    return {"role": "system", "content": text}


# ------------------------------------------------------------------------------------------ Alpaca
def test_alpaca_first_rows_exact() -> None:
    rows = load("alpaca_en_demo.json")
    fmt = get_formatter("Alpaca")
    conv, meta = fmt.format_supervised_sample(rows[0])
    assert conv == [user("Describe a process of making crepes."), assistant(rows[0]["output"])]
    assert conv[1]["content"].startswith("Making crepes is an easy and delicious process!")
    assert meta == {}
    conv, _ = fmt.format_supervised_sample(rows[1])
    assert conv == [
        user("Transform the following sentence using a synonym: The car sped quickly."),
        assistant("The car accelerated rapidly."),
    ]


def test_alpaca_input_joined_with_blank_line_and_prompt_only_reference() -> None:
    row = load("alpaca_en_demo.json")[2]
    fmt = get_formatter("Alpaca")
    conv, meta = fmt.format_prompt_only_sample(row)
    assert conv == [
        user(
            "Given the parameters of a triangle, find out its perimeter.\n\nSide 1 = 4\nSide 2 = 6\nSide 3 = 8"
        )
    ]
    assert meta == {"reference": row["output"]}
    # A missing or null input is the same as an empty one.
    conv, _ = fmt.format_prompt_only_sample({"instruction": "Say hi.", "input": None})
    assert conv == [user("Say hi.")]


def test_align_anything_text_layout() -> None:
    rows = load("align_anything_supervised.json")
    fmt = get_formatter("AlignAnything-Text")
    conv, meta = fmt.format_supervised_sample(rows[2])
    assert conv == [
        user("Identify the odd one out.\n\nTwitter, Instagram, Telegram"),
        assistant("Telegram"),
    ]
    assert meta == {}
    conv, meta = fmt.format_prompt_only_sample(rows[1])
    assert conv == [user("What are the three primary colors?")]
    assert meta == {"reference": "The three primary colors are red, blue, and yellow."}
    assert type(fmt).supported_kinds() == ("supervised", "prompt_only")


# ------------------------------------------------------------------------------------------ Messages / KTO
def test_messages_text_parts_are_normalised() -> None:
    row = load("v1_sft_demo.jsonl")[0]
    fmt = get_formatter("Messages")
    conv, meta = fmt.format_supervised_sample(row)
    hello = "Hello! I am {{name}}, an AI assistant developed by {{author}}. How can I assist you today?"
    assert conv == [user("hi"), assistant(hello)]
    assert meta == {}
    conv, meta = fmt.format_prompt_only_sample(row)
    assert conv == [user("hi")]
    assert meta == {"reference": hello}


def test_kto_label_becomes_desirable() -> None:
    rows = load("kto_en_demo.json")
    fmt = get_formatter("KTO")
    conv, meta = fmt.format_supervised_sample(rows[0])
    assert conv == [
        user("What is the result of 660-549695? Only respond with math and no words."),
        assistant("660 - 549695 = -549035"),
    ]
    assert meta == {"desirable": True}
    assert fmt.format_supervised_sample(rows[1])[1] == {"desirable": False}
    conv, meta = fmt.format_supervised_sample(rows[2])
    assert len(conv) >= 4 and conv[-1]["role"] == "assistant" and meta == {"desirable": True}


def test_kto_string_label_is_an_error_naming_the_field() -> None:
    row = {**load("kto_en_demo.json")[0], "label": "true"}
    with pytest.raises(DataFormatError) as info:
        get_formatter("KTO").format_supervised_sample(row)
    assert info.value.field == "label"
    assert str(info.value) == "field 'label': expected a boolean, got str 'true'"


# ------------------------------------------------------------------------------------------ ShareGPT
def test_sharegpt_preference_exact() -> None:
    rows = load("dpo_en_demo.json")
    fmt = get_formatter("ShareGPT")
    chosen, rejected, meta = fmt.format_preference_sample(rows[0])
    prompt = user(
        "Obtain the result by calculating 6778576-84834150134. Only respond with math and no words."
    )
    assert chosen == [prompt, assistant("6778576 - 84834150134 = -84827371558")]
    assert rejected == [prompt, assistant("84834150134 - 6778576 = -16666579378")]
    assert meta == {}


def test_sharegpt_system_turn_supervised_and_prompt_only() -> None:
    rows = load("dpo_en_demo.json")
    fmt = get_formatter("ShareGPT", system_prompt="Ignored: the row has its own.")
    chosen, _, _ = fmt.format_preference_sample(rows[1])
    assert chosen[0] == system(
        "You are an AI assistant. You will be given a task. You must generate a detailed and long answer."
    )
    assert [t["role"] for t in chosen] == ["system", "user", "assistant"]
    # Supervised on a preference row trains on the chosen reply.
    conv, meta = fmt.format_supervised_sample(rows[1])
    assert conv == chosen and meta == {}
    # Multi-turn: prompt-only ends with the last human turn; the chosen reply is the reference.
    conv, meta = get_formatter("ShareGPT").format_prompt_only_sample(rows[2])
    assert conv[-1]["role"] == "user" and len(conv) >= 5
    assert meta == {"reference": rows[2]["chosen"]["value"]}


# ------------------------------------------------------------------------------------------ HH-RLHF
def test_hh_rlhf_multi_turn_exact() -> None:
    row = load("hh_rlhf_harmless.jsonl")[0]
    fmt = get_formatter("HH-RLHF")
    prompt = [
        user("Does Glenda Blackwell still live in Homer, LA?"),
        assistant("Yes."),
        user("Is she still living with her mom?"),
    ]
    chosen, rejected, meta = fmt.format_preference_sample(row)
    assert chosen == [*prompt, assistant("Not anymore.")]
    assert rejected == [*prompt, assistant("Yes.")]
    assert meta == {}
    assert fmt.format_supervised_sample(row) == (chosen, {})
    assert fmt.format_prompt_only_sample(row) == (prompt, {"reference": "Not anymore."})


def test_hh_rlhf_repeated_speaker_is_merged() -> None:
    row = load("hh_rlhf_harmless.jsonl")[3]  # "rejected" has two Assistant turns in a row
    chosen, rejected, _ = get_formatter("HH-RLHF").format_preference_sample(row)
    assert [t["role"] for t in rejected] == ["user", "assistant"]
    assert rejected[-1]["content"].endswith("Then you’d need to find")
    assert "\n\nLet’s just walk through the steps." in rejected[-1]["content"]
    assert chosen[0] == rejected[0]


def test_hh_rlhf_empty_final_reply_and_diverging_transcripts() -> None:
    fmt = get_formatter("HH-RLHF")
    empty = load("hh_rlhf_harmless.jsonl")[2]  # real row whose chosen transcript ends with "Assistant: "
    with pytest.raises(DataFormatError) as info:
        fmt.format_preference_sample(empty)
    assert info.value.field == "chosen" and "final Assistant reply is empty" in str(info.value)
    # The prompt is still usable for prompt-only training.
    conv, meta = fmt.format_prompt_only_sample(empty)
    assert conv == [user("What do you think of tubular breasts")] and meta == {}

    diverging = {
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant: Goodbye.",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Go away.\n\nHuman: Bye\n\nAssistant: Whatever.",
    }
    with pytest.raises(DataFormatError, match=r"differ at turn 1") as info:
        fmt.format_preference_sample(diverging)
    assert "'Hello!'" in str(info.value) and "'Go away.'" in str(info.value)

    with pytest.raises(DataFormatError, match="must start with"):
        fmt.format_supervised_sample({"chosen": "Human: no leading blank line", "rejected": "x"})


# ------------------------------------------------------------------------------------------ PKU-SafeRLHF
def test_pku_saferlhf_helpfulness_and_safety_orderings() -> None:
    rows = load("pku_saferlhf_sample.json")
    helpful, safety = get_formatter("PKU-SafeRLHF"), get_formatter("PKU-SafeRLHF-Safety")
    row = rows[0]  # better_response_id 0, safer_response_id 1, both unsafe
    prompt = user("How can I seduce my friend's husband?")
    chosen, rejected, meta = helpful.format_preference_sample(row)
    assert chosen == [prompt, assistant(row["response_0"])]
    assert rejected == [prompt, assistant(row["response_1"])]
    assert meta == {"chosen_is_safe": False, "rejected_is_safe": False}
    chosen, rejected, _ = safety.format_preference_sample(row)
    assert chosen[-1]["content"] == row["response_1"] and rejected[-1]["content"] == row["response_0"]

    row = rows[3]  # better 1 (unsafe), safer 0 (safe)
    _, _, meta = helpful.format_preference_sample(row)
    assert meta == {"chosen_is_safe": False, "rejected_is_safe": True}
    chosen, _, meta = safety.format_preference_sample(row)
    assert chosen[-1]["content"] == row["response_0"]
    assert meta == {"chosen_is_safe": True, "rejected_is_safe": False}

    assert helpful.format_prompt_only_sample(rows[0]) == ([prompt], {})


def test_pku_saferlhf_bad_ids_and_margin() -> None:
    row = load("pku_saferlhf_sample.json")[0]
    fmt = get_formatter("PKU-SafeRLHF")
    with pytest.raises(DataFormatError, match="expected 0 or 1, got int 2"):
        fmt.format_preference_sample({**row, "better_response_id": 2})
    with pytest.raises(DataFormatError, match="expected an integer, got bool True"):
        fmt.format_preference_sample({**row, "better_response_id": True})
    assert fmt.format_preference_sample({**row, "margin": 2})[2]["margin"] == 2.0
    with pytest.raises(DataFormatError) as info:
        fmt.format_preference_sample({**row, "margin": "big"})
    assert info.value.field == "margin"


# ------------------------------------------------------------------------------------------ UltraFeedback
def test_ultrafeedback_layout() -> None:
    row = load("ultrafeedback_binarized.jsonl")[0]
    fmt = get_formatter("UltraFeedback")
    question = "What is the capital of France? Answer in one sentence."
    chosen, rejected, meta = fmt.format_preference_sample(row)
    assert chosen == [user(question), assistant("The capital of France is Paris.")]
    assert rejected == [
        user(question),
        assistant("France is a country in Western Europe with many large cities."),
    ]
    assert meta == {"score_chosen": 9.0, "score_rejected": 3.5}
    assert fmt.format_supervised_sample(row) == (chosen, {})
    assert fmt.format_prompt_only_sample(row) == (
        [user(question)],
        {"reference": "The capital of France is Paris."},
    )
    bad = {**row, "rejected": [user("Another question?"), assistant("No.")]}
    with pytest.raises(DataFormatError, match="differ at turn 0"):
        fmt.format_preference_sample(bad)


# ------------------------------------------------------------------------------------------ GSM8K
def test_gsm8k_reference_answer() -> None:
    rows = load("gsm8k_train.jsonl")
    fmt = get_formatter("GSM8K")
    conv, meta = fmt.format_prompt_only_sample(rows[0])
    assert conv == [
        user(
            "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
            "How many clips did Natalia sell altogether in April and May?"
        )
    ]
    assert meta == {"reference_answer": "72", "solution": rows[0]["answer"]}
    assert fmt.format_prompt_only_sample(rows[2])[1]["reference_answer"] == "1080"  # "#### 1,080"
    conv, meta = fmt.format_supervised_sample(rows[1])
    assert conv[1] == assistant(rows[1]["answer"]) and meta == {}
    with pytest.raises(DataFormatError, match="####") as info:
        fmt.format_prompt_only_sample({"question": "q?", "answer": "no marker"})
    assert info.value.field == "answer"


# ------------------------------------------------------------------------------------------ all rows, shape
CASES = [
    ("Alpaca", "alpaca_en_demo.json"),
    ("AlignAnything-Text", "align_anything_supervised.json"),
    ("Messages", "v1_sft_demo.jsonl"),
    ("Messages", "kto_en_demo.json"),
    ("KTO", "kto_en_demo.json"),
    ("ShareGPT", "dpo_en_demo.json"),
    ("HH-RLHF", "hh_rlhf_harmless.jsonl"),
    ("PKU-SafeRLHF", "pku_saferlhf_sample.json"),
    ("PKU-SafeRLHF-Safety", "pku_saferlhf_sample.json"),
    ("UltraFeedback", "ultrafeedback_binarized.jsonl"),
    ("GSM8K", "gsm8k_train.jsonl"),
]
KNOWN_BAD = {("HH-RLHF", "hh_rlhf_harmless.jsonl", 2)}  # empty final chosen reply (tested above)


def _check_conversation(conv: list[dict[str, Any]]) -> None:
    assert conv, "empty conversation"
    for turn in conv:
        assert set(turn) == {"role", "content"}
        assert turn["role"] in {"system", "user", "assistant"}
        assert isinstance(turn["content"], str) and turn["content"].strip()


@pytest.mark.parametrize(("name", "filename"), CASES)
def test_every_fixture_row_formats(name: str, filename: str) -> None:
    fmt = get_formatter(name, system_prompt="You are helpful.")
    kinds = type(fmt).supported_kinds()
    assert kinds
    for i, row in enumerate(load(filename)):
        if (name, filename, i) in KNOWN_BAD:
            continue
        for kind in kinds:
            result = getattr(fmt, f"format_{kind}_sample")(row)
            assert isinstance(result[-1], dict)
            conversations = result[:-1]
            for conv in conversations:
                _check_conversation(conv)
                assert conv[0]["role"] == "system"
            if kind == "prompt_only":
                assert conversations[0][-1]["role"] == "user"
            elif kind == "supervised":
                assert conversations[0][-1]["role"] == "assistant"
            else:
                chosen, rejected = conversations
                assert (
                    chosen[:-1] == rejected[:-1] and chosen[-1]["role"] == rejected[-1]["role"] == "assistant"
                )


# ------------------------------------------------------------------------------------------ bad rows
def test_missing_key_names_field() -> None:
    with pytest.raises(DataFormatError) as info:
        get_formatter("Alpaca").format_supervised_sample({"instruction": "Hi", "input": ""})
    err = info.value
    assert err.field == "output" and err.source is None and err.row is None
    assert str(err) == "field 'output': missing required key (row has keys: 'instruction', 'input')"


@pytest.mark.parametrize(
    ("output", "got"),
    [(None, "None"), (5, "int 5"), ("", "''"), ("   ", "'   '"), (["a"], "list ['a']")],
)
def test_wrong_type_or_empty_response_names_field_and_location(output: Any, got: str) -> None:
    row = {**load("alpaca_en_demo.json")[0], "output": output}
    with pytest.raises(DataFormatError) as info:
        get_formatter("Alpaca").format_supervised_sample(row)
    assert str(info.value) == f"field 'output': expected a non-empty string, got {got}"
    err = with_location(info.value, "alpaca.json", 17)
    assert err is info.value
    assert str(err) == f"alpaca.json, row 17, field 'output': expected a non-empty string, got {got}"
    assert (err.source, err.row, err.field) == ("alpaca.json", 17, "output")


def test_nested_fields_are_named() -> None:
    fmt = get_formatter("Messages")
    with pytest.raises(DataFormatError) as info:
        fmt.format_supervised_sample({"messages": [user("a"), {"role": "assistant", "content": 3}]})
    assert info.value.field == "messages[1].content"
    with pytest.raises(DataFormatError, match="'assistant' was expected") as info:
        fmt.format_supervised_sample({"messages": [user("a"), user("b")]})
    assert info.value.field == "messages[1]"
    with pytest.raises(DataFormatError, match="last turn must be an assistant") as info:
        fmt.format_supervised_sample({"messages": [user("a")]})
    with pytest.raises(DataFormatError, match="unsupported role 'tool'"):
        fmt.format_supervised_sample({"messages": [{"role": "tool", "content": "x"}]})
    image_part = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what?"}]}
    with pytest.raises(DataFormatError, match="multimodal") as info:
        fmt.format_prompt_only_sample({"messages": [image_part]})
    assert info.value.field == "messages[0].content[0]"
    with pytest.raises(DataFormatError, match="expected the row to be a mapping"):
        fmt.format_supervised_sample(["not", "a", "row"])  # type: ignore[arg-type]


def test_data_format_error_contract() -> None:
    err = DataFormatError("bad thing", field="x", source="f.json", row=3)
    assert isinstance(err, ValueError)
    # Inner location wins over a later, outer one.
    assert err.with_location("other.json", 9) is err and (err.source, err.row) == ("f.json", 3)
    clone = pickle.loads(pickle.dumps(err))
    assert (clone.reason, clone.field, clone.source, clone.row) == ("bad thing", "x", "f.json", 3)
    assert str(clone) == "f.json, row 3, field 'x': bad thing"
    assert str(DataFormatError("just a message")) == "just a message"  # single-arg re-raise still works


# ------------------------------------------------------------------------------------------ base / registry
def test_system_prompt_and_unsupported_kind() -> None:
    fmt = get_formatter("Alpaca", system_prompt="Be brief.")
    conv, _ = fmt.format_supervised_sample({"instruction": "Hi", "output": "Hello"})
    assert conv == [system("Be brief."), user("Hi"), assistant("Hello")]
    with pytest.raises(NotImplementedError, match=r"'Alpaca'.*preference.*supervised, prompt_only"):
        fmt.format_preference_sample({})
    with pytest.raises(NotImplementedError, match="supervised"):
        BaseFormatter().format_supervised_sample({})


def test_builtins_registered() -> None:
    assert BUILTINS <= set(available_templates())
    assert available_templates() == sorted(available_templates())
    assert get_formatter("GSM8K").name == "GSM8K"


@pytest.fixture
def clean_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "_TEMPLATES", registry_module._TEMPLATES.copy())


@pytest.mark.usefixtures("clean_registry")
def test_custom_formatter_via_decorator() -> None:
    @register_template("My-QA")
    class MyQA(BaseFormatter):
        def format_supervised_sample(self, raw_sample: dict[str, Any]) -> tuple[list[dict], dict]:
            q, a = self.field(raw_sample, "q"), self.field(raw_sample, "a")
            return self.with_system([user(q), assistant(a)]), {"id": raw_sample.get("id")}

    fmt = get_formatter("My-QA", system_prompt="S")
    assert isinstance(fmt, MyQA) and fmt.name == "My-QA"
    assert fmt.format_supervised_sample({"q": "1+1?", "a": "2", "id": 7}) == (
        [system("S"), user("1+1?"), assistant("2")],
        {"id": 7},
    )
    assert "My-QA" in available_templates() and "my-qa" not in available_templates()
    assert MyQA.supported_kinds() == ("supervised",)

    register_template("My-QA")(MyQA)  # same class again: fine

    class Other(BaseFormatter):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register_template("My-QA")(Other)
    register_template("My-QA", override=True)(Other)
    assert type(get_formatter("My-QA")) is Other
    with pytest.raises(TypeError):
        register_template("NotAFormatter")(dict)  # type: ignore[type-var]


def test_unknown_template_lists_known_names() -> None:
    with pytest.raises(UnknownTemplateError) as info:
        get_formatter("alpaca")
    message = str(info.value)
    assert "unknown template 'alpaca'" in message and "did you mean 'Alpaca'" in message
    for name in BUILTINS:
        assert name in message
    assert isinstance(info.value, KeyError)
