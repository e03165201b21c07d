"""lm-evaluation-harness through ``aa eval``: one task YAML over a local jsonl, on a tiny exported model."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from aa_lightning.evaluation import evaluate
from aa_lightning.evaluation.tasks.lm_eval_harness import import_lm_eval
from aa_lightning.models.aliases import resolve_model_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK_DIR = os.path.join(REPO, "tests", "fixtures", "eval", "lm_eval_task")


def test_missing_extra_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what an environment without the package gives
    with pytest.raises(ImportError, match=r"aa-lightning\[eval\]"):
        import_lm_eval()


def test_a_local_lm_eval_task_matches_hand_computed_accuracy(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval", reason="the eval extra (lm-eval) is in dev; CI installs it")
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    monkeypatch.chdir(REPO)  # the YAML's data_files path is relative to the repository root
    path = resolve_model_path("tiny-qwen2")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    correct = 0
    with open(os.path.join(REPO, "tests", "fixtures", "eval", "mmlu.jsonl")) as handle:
        rows = [json.loads(line) for line in handle]
    for row in rows:
        context = f"Question: {row['question']}\nAnswer:"
        sums = []
        for choice in row["choices"]:  # lm-eval: whole = context + " " + choice, continuation = the tail
            whole = tokenizer(context + " " + choice, add_special_tokens=False).input_ids
            start = len(tokenizer(context, add_special_tokens=False).input_ids)
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
            sums.append(sum(float(logp[i - 1, whole[i]]) for i in range(start, len(whole))))
        answer = "ABCD".index(row["answer"]) if isinstance(row["answer"], str) else row["answer"]
        correct += sums.index(max(sums)) == answer
    task = {"task": "lm_eval", "tasks": ["aa_mmlu_local"], "include_path": TASK_DIR, "batch_size": 4}
    import lm_eval

    from aa_lightning.evaluation.models import ModelPool

    handed, real = [], lm_eval.simple_evaluate

    def record(model, **kwargs):  # the real simple_evaluate, noting which model lm-eval was given
        handed.append(model)
        return real(model=model, **kwargs)

    monkeypatch.setattr(lm_eval, "simple_evaluate", record)
    pool = ModelPool("cpu")
    result = evaluate(model=path, tasks=[task], output_dir=str(tmp_path), tensorboard=False, pool=pool)
    assert result.scores["lm_eval"]["aa_mmlu_local/acc"] == pytest.approx(correct / len(rows))
    # lm-eval got the pool's loaded model (one process: world_size 1 under torchrun too), not a path to load
    assert handed[0]._model is pool.loaded[(path, "lm")].model and handed[0].world_size == 1
