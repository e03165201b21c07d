"""``aa eval`` over two CPU processes (gloo): a rank that gets no rows still joins the reductions."""

from __future__ import annotations

import json
import os
import socket

import torch.multiprocessing as mp

from aa_lightning.evaluation import EvalTask, RowResult, evaluate


class UndeclaredTask(EvalTask):
    """A user's task that declares no metrics: their names come from its rows (on every rank)."""

    def evaluate_batch(self, rows, context):
        return [RowResult({"long": float(len(row.get("question", str)) > 100), "one": 1.0}) for row in rows]


def worker(rank: int, port: int, data: str, out: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    result = evaluate(tasks=[UndeclaredTask(data)], output_dir=out, tensorboard=False, device="cpu")
    with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
        json.dump(result.scores, handle)


def test_a_rank_without_rows_reduces_the_same_metrics(tmp_path):
    """One row over two ranks: rank 1 has none, yet both reduce ``[long, one, count]`` and agree."""
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"question": "x" * 120}) + "\n")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    procs = [context.Process(target=worker, args=(r, port, str(data), str(tmp_path))) for r in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    for proc in procs:  # a mismatched all_reduce hangs or fails: end it instead of waiting
        if proc.is_alive():
            proc.terminate()
    # each rank wrote its scores only after every reduction: a mismatched all_reduce fails or hangs first
    for rank in range(2):
        scores = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert scores["task"] == {"long": 1.0, "one": 1.0}
