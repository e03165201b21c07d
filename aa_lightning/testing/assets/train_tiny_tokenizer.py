"""One-off script that trained ``tiny_bpe_tokenizer.json``: a 2048-token byte-level BPE on public text.

Run from the repository root with the shared data beside it: ``python aa_lightning/testing/assets/train_tiny_tokenizer.py``.
"""

import json

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

DATA = "../shared/data/text"


def corpus() -> list[str]:
    texts = []
    with open(f"{DATA}/alpaca_en_demo.json") as f:
        for row in json.load(f)[:600]:
            texts += [row["instruction"], row["input"], row["output"]]
    with open(f"{DATA}/hh_rlhf_harmless.jsonl") as f:
        texts += [json.loads(line)["chosen"] for line in f.readlines()[:400]]
    with open(f"{DATA}/gsm8k_train.jsonl") as f:
        for line in f.readlines()[:400]:
            row = json.loads(line)
            texts += [row["question"], row["answer"]]
    return texts


def main() -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2048,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.save("aa_lightning/testing/assets/tiny_bpe_tokenizer.json")


if __name__ == "__main__":
    main()
