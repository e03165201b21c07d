"""``aa eval`` as a user runs it: the config suite, the table, results.json, TensorBoard, progress lines, a run
folder as the model, one-line errors, and the same scores from two processes (torchrun, gloo)."""

from __future__ import annotations

import glob
import importlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import yaml
from launch_env import DIST_ENV

from aa_lightning.evaluation import build_task, evaluate
from aa_lightning.models.aliases import resolve_model_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = os.path.join(REPO, "configs", "eval", "tiny_suite.yaml")


def aa(*args, cwd=REPO, launcher=None, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    command = [*(launcher or [sys.executable]), "-m", "aa_lightning.cli", "eval", *args]
    proc = subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"aa eval hung:\n{out[-3000:]}\n{err[-3000:]}")
    return proc.returncode, out, err


def tensorboard_scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(folder)
    events.Reload()
    return {tag: events.Scalars(tag)[-1] for tag in events.Tags()["scalars"]}


def test_every_shipped_eval_config_builds_its_tasks():
    for path in glob.glob(os.path.join(REPO, "configs", "eval", "*.yaml")):
        with open(path) as handle:
            config = yaml.safe_load(handle)
        tasks = [build_task(entry) for entry in config["tasks"]]
        for task in tasks:
            if task.data is not None:
                assert os.path.exists(os.path.join(REPO, task.data.path)), (path, task.data.path)


def test_suite_from_the_command_line(tmp_path):
    """Table, JSON, per-row records, TensorBoard scalars at --step, progress lines (stdout is no terminal)."""
    code, out, err = aa(
        "--config",
        SUITE,
        "--limit",
        "2",
        "--max_new_tokens",
        "4",
        "--output_dir",
        str(tmp_path),
        "--step",
        "7",
    )
    assert code == 0, err[-3000:]
    assert "eval gsm8k: 2/2 rows (100%)" in out
    header = next(line for line in out.splitlines() if line.startswith("task"))
    assert header.split() == ["task", "metric", "value", "rows"]
    with open(tmp_path / "results.json") as handle:
        results = json.load(handle)
    assert set(results["scores"]) == {"gsm8k", "math", "multiple_choice", "multiple_choice_generate"}
    assert results["rows"]["multiple_choice"] == 2
    with open(tmp_path / "multiple_choice.jsonl") as handle:
        records = [json.loads(line) for line in handle]
    assert [r["row"] for r in records] == [0, 1] and len(records[0]["log_likelihoods"]) == 4
    accuracy = sum(r["accuracy"] for r in records) / 2
    assert results["scores"]["multiple_choice"]["accuracy"] == accuracy
    scalars = tensorboard_scalars(str(tmp_path / "tensorboard"))
    assert scalars["eval/multiple_choice/accuracy"].value == pytest.approx(accuracy)
    assert scalars["eval/multiple_choice/accuracy"].step == 7
    assert f"{accuracy:.4f}" in next(
        line for line in out.splitlines() if line.startswith("multiple_choice  ")
    )


def in_process(*args, capsys):
    """``aa eval ARGS`` in this process (the dispatch of ``aa_lightning.cli.main``): status, stdout, stderr."""
    from aa_lightning.cli import TOOLS

    module, function = TOOLS["eval"].split(":")
    code = 0
    try:
        getattr(importlib.import_module(module), function)(list(args))
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_run_folder_is_evaluated_through_its_export(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    run = tmp_path / "runs" / "sft"
    shutil.copytree(resolve_model_path("tiny-qwen2"), run / "hf_model")
    code, out, err = in_process(
        "--config",
        SUITE,
        "--model",
        str(run),
        "--tasks",
        "multiple_choice",
        "--limit",
        "1",
        "--no_tensorboard",
        capsys=capsys,
    )
    assert code == 0, err[-3000:]
    with open(run / "eval" / "results.json") as handle:
        assert json.load(handle)["model"] == str(run)
    assert not os.path.exists(run / "eval" / "tensorboard")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"tasks": [{"task": "no_such_task", "data": "x.jsonl"}]}, "unknown evaluation task 'no_such_task'"),
        ({"tasks": [{"task": "gsm8k", "data": {"path": "x.jsonl", "sise": 3}}]}, "sise"),
        ({"tasks": [{"task": "gsm8k", "data": "missing.jsonl"}]}, "missing.jsonl"),
        ({"model": "tiny-qwen2", "tasks": [{"task": "safety", "data": "x.json"}]}, "set `cost_model`"),
    ],
)
def test_mistakes_are_one_line_and_status_2(tmp_path, config, message, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    code, out, err = in_process("--config", str(path), capsys=capsys)
    assert code == 2
    assert err.strip().startswith("error:") and message in err and "Traceback" not in err


def test_two_processes_give_the_scores_of_one(tmp_path):
    """Rows are shared over two ranks (3 GSM8K rows: 2 + 1) and the sums reduced with gloo."""
    config = {
        "model": "tiny-qwen2",
        "tasks": [
            {
                "task": "gsm8k",
                "data": os.path.join(REPO, "tests/fixtures/eval/gsm8k.jsonl"),
                "responses_field": "reply",
            },
            {
                "task": "multiple_choice",
                "data": os.path.join(REPO, "tests/fixtures/eval/mmlu.jsonl"),
                "batch_size": 1,
            },
        ],
        "tensorboard": False,
    }
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(config))
    evaluate({**config, "output_dir": str(tmp_path / "one"), "device": "cpu"})  # one process: this one
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29531",
    ]
    code, out, err = aa(
        "--config", str(path), "--output_dir", str(tmp_path / "two"), "--device", "cpu", launcher=torchrun
    )
    assert code == 0, (out[-2000:], err[-3000:])
    one, two = (json.load(open(tmp_path / name / "results.json")) for name in ("one", "two"))
    flat = {
        name: {f"{t}/{m}": v for t, ms in run["scores"].items() for m, v in ms.items()}
        for name, run in (("one", one), ("two", two))
    }
    assert flat["two"] == pytest.approx(flat["one"]) and flat["one"]["gsm8k/accuracy"] == pytest.approx(2 / 3)
    assert two["rows"] == one["rows"] == {"gsm8k": 3, "multiple_choice": 4}
    records = [json.loads(line) for line in open(tmp_path / "two" / "multiple_choice.jsonl")]
    assert [r["row"] for r in records] == [0, 1, 2, 3]
    assert out.count("results:") == 1  # rank 0 alone prints and writes


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_a_bar_in_a_terminal_and_lines_elsewhere():
    from aa_lightning.evaluation.runner import Progress

    terminal = _Terminal()
    bar = Progress("gsm8k", 10, every=0.0, enabled=True, stream=terminal)
    bar.update(4)
    bar.update(6)
    bar.close()
    assert "eval gsm8k:" in terminal.getvalue() and "\r" in terminal.getvalue()  # tqdm redraws in place
    log = io.StringIO()
    lines = Progress("gsm8k", 10, every=0.0, enabled=True, stream=log)
    lines.update(4)
    lines.update(6)
    lines.close()
    printed = log.getvalue().splitlines()
    assert printed[0].startswith("eval gsm8k: 4/10 rows (40%) | ") and "ETA" in printed[0]
    assert printed[-1].startswith("eval gsm8k: 10/10 rows (100%) | ") and "ETA" not in printed[-1]
    quiet = io.StringIO()
    other_rank = Progress("gsm8k", 10, every=0.0, enabled=False, stream=quiet)
    other_rank.update(10)
    other_rank.close()
    assert quiet.getvalue() == ""
