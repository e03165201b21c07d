"""One-off: train the tiny byte-level BPE tokenizer shipped in aa_lightning/models/assets."""
import json

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

texts = []
for r in json.load(open("../shared/data/text/alpaca_en_demo.json"))[:600]:
    texts += [r["instruction"], r["input"], r["output"]]
for line in open("../shared/data/text/hh_rlhf_harmless.jsonl").readlines()[:400]:
    texts.append(json.loads(line)["chosen"])
for line in open("../shared/data/text/gsm8k_train.jsonl").readlines()[:400]:
    r = json.loads(line); texts += [r["question"], r["answer"]]
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
tok.train_from_iterator(texts, trainer=trainer)
tok.save("aa_lightning/models/assets/tiny_bpe_tokenizer.json")
print(tok.get_vocab_size(), tok.decode(tok.encode("Hello wörld! 你好").ids))
