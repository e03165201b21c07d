"""Start strategy columns and collect their records, surviving cells that crash or hang.

A column runs as one ``strategy_matrix.runner`` process (which launches its second rank itself). When it
exits early (a failed cell, code 3) or a cell makes no progress for ``CELL_TIMEOUT_S`` (killed with its whole
process group), the cells it did not finish get a record saying so, with the tail of the launch log, and a
fresh process runs the cells after it. :class:`ColumnScheduler` runs several columns side by side, one core per
rank. ``python -m strategy_matrix.driver --out DIR [COLUMN ...]`` runs columns from the command line and prints
one line per cell.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from launch_env import DIST_ENV

from strategy_matrix.cells import COLUMNS, REPO, TINY_REWARD_MODEL, column_cells

CELL_TIMEOUT_S = 420.0  # the first DeepSpeed cell of a fresh machine JIT-builds a CPU op (~2 min)
LOG_TAIL_CHARS = 3000


@dataclass
class ColumnRun:
    """The records of one column: ``records[cell]`` is one dict per rank (index = rank)."""

    name: str
    records: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    seconds: float = 0.0
    launches: int = 0


def prepare(out: str) -> None:
    """The shared files every column reads: a tiny reward model with a fixed, non-trivial score head."""
    from aa_lightning.models.score_model import has_score_head

    path = os.path.join(out, TINY_REWARD_MODEL)
    if has_score_head(path):
        return
    import torch

    from aa_lightning.models import load_pretrained_models

    torch.manual_seed(0)
    model, tokenizer, _ = load_pretrained_models(
        "tiny-qwen2", score_model=True, new_score_head=True, score_head_init_std=0.1
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    tests = os.path.join(REPO, "tests")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, tests, env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def record_path(out: str, column: str, cell: str, rank: int, suffix: str = "json") -> str:
    return os.path.join(out, column, f"{cell}.rank{rank}.{suffix}")


def load_records(out: str, column: str, cell: str, ranks: int) -> list[dict[str, Any]] | None:
    records = []
    for rank in range(ranks):
        path = record_path(out, column, cell, rank)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            records.append(json.load(f))
    return records


def started(out: str, column: str, cell: str, ranks: int) -> float | None:
    """When the first rank started ``cell`` (None: not started)."""
    times = [
        os.path.getmtime(record_path(out, column, cell, r, "started"))
        for r in range(ranks)
        if os.path.exists(record_path(out, column, cell, r, "started"))
    ]
    return min(times) if times else None


def kill_group(proc: subprocess.Popen) -> None:
    """The runner and the rank it launched share a process group (own session): end them all."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def wait_for_group(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """After the runner exits, give its launched rank time to write its last record, then end the group."""
    deadline = time.time() + grace_s
    while time.time() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    kill_group(proc)


def log_tail(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-LOG_TAIL_CHARS:]


def run_column(name: str, out: str, echo: Any = None) -> ColumnRun:
    """Run every cell of column ``name`` (relaunching past broken cells); returns the records."""
    column = COLUMNS[name]
    cells = column_cells(column)
    ranks = column.devices
    os.makedirs(os.path.join(out, name), exist_ok=True)
    run = ColumnRun(name)
    start = time.perf_counter()
    remaining = [c for c in cells if load_records(out, name, c, ranks) is None]
    while remaining:
        run.launches += 1
        log = os.path.join(out, name, f"launch{run.launches}.log")
        with open(log, "w") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "strategy_matrix.runner", "--column", name, "--out", out]
                + ["--cells", ",".join(remaining)],
                cwd=REPO,
                env=child_env(),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            hung = watch(proc, out, name, remaining, ranks)
        if hung:
            kill_group(proc)
        else:
            wait_for_group(proc)
        remaining = advance(out, name, remaining, ranks, log, hung, proc.returncode, echo)
    for cell in cells:
        run.records[cell] = load_records(out, name, cell, ranks) or []
    run.seconds = time.perf_counter() - start
    return run


def last_progress(out: str, column: str, cells: list[str], ranks: int, since: float) -> float:
    """The latest time any rank started or finished one of ``cells`` (``since`` when none did)."""
    times = [since]
    for cell in cells:
        for rank in range(ranks):
            for suffix in ("started", "json"):
                path = record_path(out, column, cell, rank, suffix)
                if os.path.exists(path):
                    times.append(os.path.getmtime(path))
    return max(times)


def watch(proc: subprocess.Popen, out: str, column: str, remaining: list[str], ranks: int) -> bool:
    """Wait for the runner; True when nothing progressed for ``CELL_TIMEOUT_S`` (the caller kills it)."""
    launched = time.time()
    while proc.poll() is None:
        if time.time() - last_progress(out, column, remaining, ranks, launched) > CELL_TIMEOUT_S:
            return True
        time.sleep(0.5)
    return False


def failure_record(column: str, cell: str, rank: int, hung: bool, why: str, log: str) -> dict[str, Any]:
    return {
        "column": column,
        "cell": cell,
        "rank": rank,
        "status": "error",
        "phase": "hung" if hung else "crashed",
        "error_type": "Hang" if hung else "ProcessDied",
        "error": f"rank {rank}: {why}",
        "traceback": log_tail(log),
    }


def advance(
    out: str, column: str, remaining: list[str], ranks: int, log: str, hung: bool, code: int | None, echo: Any
) -> list[str]:
    """The cells still to run after a launch ended; writes records for the cell that broke it, if any."""
    for i, cell in enumerate(remaining):
        records = load_records(out, column, cell, ranks)
        if records is not None:
            if echo is not None:
                echo(summary_line(column, cell, records))
            continue
        if started(out, column, cell, ranks) is None:
            if i > 0:
                return remaining[i:]  # the launch stopped after a failed cell: a fresh one runs the rest
            why = f"the column's process exited (code {code}) before starting any cell"
            broken = remaining  # it cannot start at all: every remaining cell says so, and nothing loops
        else:
            why = (
                f"no progress for {CELL_TIMEOUT_S:.0f} s: killed (hang)"
                if hung
                else f"the process exited (code {code}) during this cell without writing its record"
            )
            broken = [cell]
        for name in broken:
            for rank in range(ranks):
                path = record_path(out, column, name, rank)
                if not os.path.exists(path):
                    with open(path, "w") as f:
                        json.dump(failure_record(column, name, rank, hung, why, log), f, indent=1)
            if echo is not None:
                echo(summary_line(column, name, load_records(out, column, name, ranks) or []))
        return remaining[i + len(broken) :]
    return []


def summary_line(column: str, cell: str, records: list[dict[str, Any]]) -> str:
    """One line per cell; every failing rank's error (on 2 ranks one failure often causes the other's)."""
    failed = [r for r in records if r.get("status") != "ok"]
    seconds = max((r.get("seconds", 0.0) for r in records), default=0.0)
    if not failed:
        return f"{column}/{cell}: ran ({seconds:.1f} s)"
    errors = "; ".join(
        f"rank {r.get('rank')} [{r.get('phase')}] {r.get('error_type')}: {str(r.get('error', ''))[:160]}"
        for r in failed
    )
    return f"{column}/{cell}: ERROR {errors}"


class ColumnScheduler:
    """Runs columns in the background, as many at once as there are cores (each rank holds one thread), in the
    order given; ``result(name)`` waits for one column. A 2-process column takes two cores."""

    def __init__(self, names: list[str], out: str, cores: int | None = None, echo: Any = None) -> None:
        self.names = list(names)
        self.out = out
        self.cores = max(1, cores or os.cpu_count() or 1)
        self.echo = echo
        self.runs: dict[str, ColumnRun] = {}
        self.errors: dict[str, BaseException] = {}
        self.done = {name: threading.Event() for name in self.names}
        self.started = time.perf_counter()
        self.finished: float | None = None
        self._free = threading.Condition()
        self._available = self.cores
        threading.Thread(target=self._schedule, name="strategy-matrix", daemon=True).start()

    def _schedule(self) -> None:
        prepare(self.out)
        workers = []
        for name in self.names:
            need = min(COLUMNS[name].devices, self.cores)
            with self._free:
                self._free.wait_for(lambda need=need: self._available >= need)
                self._available -= need
            worker = threading.Thread(target=self._run, args=(name, need), daemon=True)
            worker.start()
            workers.append(worker)
        for worker in workers:
            worker.join()
        self.finished = time.perf_counter()

    def _run(self, name: str, cores: int) -> None:
        try:
            self.runs[name] = run_column(name, self.out, echo=self.echo)
        except BaseException as err:  # reported by result(); the other columns go on
            self.errors[name] = err
        finally:
            with self._free:
                self._available += cores
                self._free.notify_all()
            self.done[name].set()

    def result(self, name: str) -> ColumnRun:
        self.done[name].wait()
        if name in self.errors:
            raise RuntimeError(f"column {name} could not be run") from self.errors[name]
        return self.runs[name]

    def wall_seconds(self) -> float:
        return (self.finished or time.perf_counter()) - self.started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--cores", type=int, default=None, help="columns run side by side on this many cores")
    parser.add_argument("columns", nargs="*", default=list(COLUMNS))
    args = parser.parse_args(argv)
    scheduler = ColumnScheduler(args.columns, args.out, args.cores, echo=lambda line: print(line, flush=True))
    for name in args.columns:
        run = scheduler.result(name)
        print(f"== column {name}: {run.seconds:.0f} s, {run.launches} launch(es)", flush=True)
    print(f"== matrix: {scheduler.wall_seconds():.0f} s wall time on {scheduler.cores} core(s)", flush=True)


if __name__ == "__main__":
    main()
