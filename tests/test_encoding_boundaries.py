"""One encoder (issue 10, section 5): text rows are encoded by the multimodal encoder's own code, media-free.

The two copies had diverged: the text rule labelled tokens that overlap an assistant span, the multimodal
rule only tokens that start inside it (so after a generation prompt ending in a space, as
``"ASSISTANT: "``, the multimodal path never trained the first response token ``" Hello"``), and text
prompt-only rows never got the BOS the other rows got. Here both encoders meet the boundary cases on the
real tiny-qwen2-vl tokenizer and processor: they must give identical samples, and the right ones.
"""

from __future__ import annotations

import shutil
from typing import Any

import pytest
from tokenizers import processors

from aa_lightning.data import DataSpec, TextToTextDataModule
from aa_lightning.data.encoding import IGNORE_INDEX, SampleEncoder
from aa_lightning.data.multimodal import MultimodalSampleEncoder, ProcessorInfo
from aa_lightning.data.templating import ChatRenderer
from aa_lightning.models.aliases import resolve_model_path
from aa_lightning.models.loading import load_tokenizer_and_processor

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue, like the sky."},
]
REJECTED = [*CONVERSATION[:-1], {"role": "assistant", "content": "Red."}]
KINDS = ("supervised", "preference", "prompt_only")


def tokenizer_and_processor(variant: str) -> tuple[Any, Any]:
    """The tiny-qwen2-vl tokenizer (ChatML), with the default template, or with a BOS it adds itself."""
    tokenizer, processor = load_tokenizer_and_processor("tiny-qwen2-vl")
    if variant == "space":  # default template: the generation prompt "ASSISTANT: " ends in a space
        tokenizer.chat_template = None
    elif variant == "bos":  # as Llama's tokenizers: BOS comes from the tokenizer, not from the template
        tokenizer.bos_token = "<|endoftext|>"
        tokenizer.add_bos_token = True
    return tokenizer, processor


def encoders(variant: str, **kwargs: Any) -> tuple[SampleEncoder, MultimodalSampleEncoder]:
    """The text datamodule's encoder and the multimodal datamodule's, on the same tokenizer and template."""
    tokenizer, processor = tokenizer_and_processor(variant)
    renderer = ChatRenderer(tokenizer)
    text = SampleEncoder(tokenizer, renderer, **kwargs)
    multimodal = MultimodalSampleEncoder(tokenizer, renderer, ProcessorInfo(processor, tokenizer), **kwargs)
    return text, multimodal


def encoder_for(side: str, variant: str, **kwargs: Any) -> SampleEncoder:
    text, multimodal = encoders(variant, **kwargs)
    return text if side == "text" else multimodal


def encode(encoder: SampleEncoder, kind: str) -> dict[str, Any]:
    if kind == "supervised":
        return encoder.supervised(CONVERSATION, {"reference": "x"})
    if kind == "preference":
        return encoder.preference(CONVERSATION, REJECTED, {"reference": "x"})
    return encoder.prompt_only(CONVERSATION, {"reference": "x"})


def labelled_runs(tokenizer: Any, ids: list[int], labels: list[int]) -> list[str]:
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs + ([tokenizer.decode(current)] if current else [])


def test_the_multimodal_encoder_only_adds_media_hooks():
    """One code path: every token/label/BOS method of the multimodal encoder is the text encoder's."""
    for name in ("tokenize", "label", "encode_conversation", "supervised", "preference", "prompt_only"):
        assert getattr(MultimodalSampleEncoder, name) is getattr(SampleEncoder, name), name
    dm = TextToTextDataModule("tiny-qwen2")
    dm.load_processing()
    assert type(dm.build_encoder()) is SampleEncoder


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("variant", ["chatml", "space", "bos"])
def test_text_rows_and_media_free_multimodal_rows_are_identical(variant, kind):
    text, multimodal = encoders(variant)
    assert encode(multimodal, kind) == encode(text, kind)


@pytest.mark.parametrize("side", ["text", "multimodal"])
def test_a_generation_prompt_ending_in_a_space_still_trains_the_first_response_token(side):
    encoder = encoder_for(side, "space")
    tokenizer = encoder.tokenizer
    sample = encoder.supervised(CONVERSATION, {})
    ids, labels = sample["input_ids"], sample["labels"]
    # " H(ello)" straddles the prompt's trailing space: it carries response text, so it is trained on
    first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert tokenizer.decode(ids[:first]).endswith("ASSISTANT:")
    assert tokenizer.decode(ids[first]).startswith(" H")  # the space and the first response letter
    assert labelled_runs(tokenizer, ids, labels) == [" Hello!<|im_end|>", " Blue, like the sky.<|im_end|>"]
    assert sample["text"].endswith("ASSISTANT: Blue, like the sky.<|im_end|>")


@pytest.mark.parametrize("side", ["text", "multimodal"])
def test_a_bos_adding_tokenizer_puts_bos_first_in_every_kind(side):
    encoder = encoder_for(side, "bos")
    bos = encoder.tokenizer.bos_token_id
    supervised = encode(encoder, "supervised")
    preference = encode(encoder, "preference")
    prompt = encode(encoder, "prompt_only")
    for ids, labels in (
        (supervised["input_ids"], supervised["labels"]),
        (preference["chosen_input_ids"], preference["chosen_labels"]),
        (preference["rejected_input_ids"], preference["rejected_labels"]),
        (prompt["input_ids"], None),
    ):
        assert ids[0] == bos and bos not in ids[1:]
        assert labels is None or labels[0] == IGNORE_INDEX
    # generation continues exactly the tokens a training row of the same conversation starts with
    assert supervised["input_ids"][: len(prompt["input_ids"])] == prompt["input_ids"]
    plain = encoder.tokenizer(prompt["prompt_text"], add_special_tokens=False)["input_ids"]
    assert prompt["input_ids"] == [bos, *plain]


def test_text_datamodule_rows_start_with_the_bos_a_llama3_style_post_processor_adds(tmp_path, repo_path):
    """A checkpoint whose tokenizer adds BOS in its post-processor (no ``add_bos_token`` attribute)."""
    folder = tmp_path / "bos-llama"
    shutil.copytree(resolve_model_path("tiny-llama"), folder)
    tokenizer, _ = load_tokenizer_and_processor(str(folder))
    tokenizer.bos_token = "<|endoftext|>"
    bos = tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", pair="<|endoftext|> $A $B", special_tokens=[("<|endoftext|>", bos)]
    )
    tokenizer.save_pretrained(folder)
    spec = DataSpec(repo_path("tests", "fixtures", "text", "alpaca_en_demo.json"), "Alpaca", size=3)
    for kind in ("prompt_only", "supervised"):
        dm = TextToTextDataModule(str(folder), train=spec, kind=kind)
        dm.setup("fit")
        assert dm.tokenizer("a")["input_ids"][0] == bos
        starts = [ids[0] for ids in dm.datasets["train"]["input_ids"]]
        assert starts == [bos] * 3, kind


@pytest.mark.parametrize("side", ["text", "multimodal"])
def test_labels_by_kind_and_turn(side):
    encoder = encoder_for(side, "chatml")
    tokenizer = encoder.tokenizer
    supervised = encode(encoder, "supervised")
    assert labelled_runs(tokenizer, supervised["input_ids"], supervised["labels"]) == [
        "Hello!<|im_end|>",
        "Blue, like the sky.<|im_end|>",
    ]
    sample = encoder_for(side, "chatml", train_on="last_assistant").supervised(CONVERSATION, {})
    assert labelled_runs(tokenizer, sample["input_ids"], sample["labels"]) == [
        "Blue, like the sky.<|im_end|>"
    ]

    preference = encode(encoder, "preference")
    assert labelled_runs(tokenizer, preference["chosen_input_ids"], preference["chosen_labels"]) == [
        "Hello!<|im_end|>",
        "Blue, like the sky.<|im_end|>",
    ]
    assert labelled_runs(tokenizer, preference["rejected_input_ids"], preference["rejected_labels"]) == [
        "Hello!<|im_end|>",
        "Red.<|im_end|>",
    ]

    prompt = encode(encoder, "prompt_only")  # the last assistant turn is what the policy has to generate
    assert "labels" not in prompt
    assert prompt["prompt_text"].endswith("Name a colour.<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode(prompt["input_ids"]) == prompt["prompt_text"]
    assert supervised["input_ids"][: len(prompt["input_ids"])] == prompt["input_ids"]
