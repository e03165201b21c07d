"""Build the benchmark model: a ~5M-parameter Qwen2 (4 layers, hidden 256) with a BPE tokenizer trained on
the benchmark data, saved as an ordinary Hugging Face folder so both TRL and aa-lightning load the same files.

    python -m benchmarks.build_model [--out DIR]

The folder goes to ``$AA_LIGHTNING_CACHE/benchmarks/<name>`` by default and is built once (atomically, under
a file lock); the build is deterministic (fixed seed, fixed data), so every machine benchmarks the same model.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"
MODEL_NAME = "qwen2-5m-bpe-v1"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 8192
MODEL_SHAPE = dict(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
)


#: a Qwen2.5-0.5B-shaped body (24 layers, hidden 896, 14/2 heads, its 151936-row vocabulary) for GPU runs:
#: 494M parameters, random init, the same benchmark tokenizer (rows past its 8192 ids are never used)
SHAPES = {
    MODEL_NAME: MODEL_SHAPE,
    "qwen2-0.5b-shape-v1": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        vocab_size=151936,
    ),
}
#: ``--model`` names of ``benchmarks.run`` / ``benchmarks.mfu`` that build one of :data:`SHAPES`
MODEL_ALIASES = {"bench": MODEL_NAME, "bench-0.5b": "qwen2-0.5b-shape-v1"}


def corpus() -> Iterator[str]:
    """Every text field of the three benchmark data files (the tokenizer is fitted to what it encodes)."""
    for row in json.loads((DATA_DIR / "alpaca_256.json").read_text()):
        yield from (row["instruction"], row.get("input") or "", row["output"])
    for name in ("hh_rlhf_256.jsonl", "gsm8k_128.jsonl"):
        with open(DATA_DIR / name) as f:
            for line in f:
                yield from (str(v) for v in json.loads(line).values())


def build_tokenizer():  # noqa: ANN201
    """Byte-level BPE trained on the benchmark corpus, with ChatML specials and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|pad|>", bos_token=None, unk_token=None
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build(save_dir: str | os.PathLike, seed: int = 0, name: str = MODEL_NAME) -> str:
    """Write tokenizer + randomly initialised Qwen2ForCausalLM (float32) of shape ``SHAPES[name]``."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer()
    shape = {"vocab_size": len(tokenizer), **SHAPES[name]}
    config = Qwen2Config(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        **shape,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(save_dir)
    tokenizer.save_pretrained(save_dir)
    return str(save_dir)


def model_path(cache_dir: str | os.PathLike | None = None, name: str = MODEL_NAME) -> str:
    """The folder of benchmark model ``name`` (a key of :data:`SHAPES`), built on first use."""
    from aa_lightning.models.cache import build_once, cache_root

    target = cache_root(cache_dir) / "benchmarks" / name
    return str(build_once(target, lambda tmp: build(tmp, 0, name)))


def resolve(model: str) -> str:
    """``bench`` / ``bench-0.5b`` (built here), else any aa-lightning alias or folder."""
    if model in MODEL_ALIASES:
        return model_path(name=MODEL_ALIASES[model])
    from aa_lightning.models import resolve_model_path

    return resolve_model_path(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="write here instead of the cache (rebuilds)")
    args = parser.parse_args()
    path = build(args.out) if args.out else model_path()
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    print(f"{path}: {config.model_type}, vocab {config.vocab_size}, layers {config.num_hidden_layers}")


if __name__ == "__main__":
    main()
