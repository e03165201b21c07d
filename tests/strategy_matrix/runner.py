"""Run the cells of ONE strategy column in one process: ``python -m strategy_matrix.runner --column C ...``.

On 2-process columns Lightning's launcher starts this same script again as rank 1 at the first ``fit``; both
ranks then run every cell in sequence (the process group, which DeepSpeed also caches in module globals, stays
up for the whole column). Each rank writes ``<cell>.rank<r>.started`` when it begins a cell and
``<cell>.rank<r>.json`` when it ends it, whatever happened: an exception is caught and recorded (message and
traceback tail), so a broken algorithm never hides the others. After a cell that failed on any rank the ranks
exit (code 3) rather than reuse a process whose state or process group the failure may have left broken; the
driver starts a fresh process for the remaining cells.
"""

from __future__ import annotations

import os

for _key, _value in {
    "AA_LIGHTNING_CACHE": os.path.join(os.path.expanduser("~"), ".cache", "aa_lightning"),
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
}.items():
    os.environ.setdefault(_key, _value)

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from datetime import timedelta  # noqa: E402
from typing import Any  # noqa: E402

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

import aa_lightning.strategies  # noqa: E402,F401  (registers the deepspeed_cpu* strategies)
from aa_lightning.callbacks import HFExportCallback  # noqa: E402
from strategy_matrix.cells import (  # noqa: E402
    ALGORITHMS,
    COLUMNS,
    REPO,
    BuildContext,
    Column,
    lora_config,
    twin_overrides,
    zero3_config,
)
from strategy_matrix.probes import (  # noqa: E402
    Probe,
    StepRecorder,
    check_export,
    digest,
    scalar_metrics,
    start_from_named_adapters,
)

# a rank stuck in a collective fails after this instead of hanging forever
PROCESS_GROUP_TIMEOUT = timedelta(seconds=180)
PEER_WAIT_S = 90.0  # how long a rank waits for the other rank's record of the same cell
TRACEBACK_LINES = 40


def rank() -> int:
    """This process's rank: Lightning's launcher exports LOCAL_RANK (to 1 for the child, 0 for itself)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def cell_path(out: str, column: str, cell: str, suffix: str) -> str:
    return os.path.join(out, column, f"{cell}.rank{rank()}.{suffix}")


def write_json(path: str, data: dict[str, Any]) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)  # the other rank and the driver never read a half-written record


def make_strategy(column: Column) -> Any:
    from lightning.pytorch.strategies import DDPStrategy

    from aa_lightning.strategies import CPUDeepSpeedStrategy

    if column.strategy == "ddp":
        return DDPStrategy(process_group_backend="gloo", timeout=PROCESS_GROUP_TIMEOUT)
    if column.strategy == "zero2":
        return CPUDeepSpeedStrategy(stage=2, timeout=PROCESS_GROUP_TIMEOUT)
    if column.strategy == "zero3":
        return CPUDeepSpeedStrategy(config=zero3_config(), timeout=PROCESS_GROUP_TIMEOUT)
    return column.strategy


def make_trainer(column: Column, cell_dir: str, callbacks: list[pl.Callback]) -> pl.Trainer:
    return pl.Trainer(
        max_steps=2,
        accelerator="cpu",
        devices=column.devices,
        strategy=make_strategy(column),
        precision=column.precision,
        default_root_dir=cell_dir,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )


def error_fields(err: BaseException) -> dict[str, Any]:
    """Message, traceback tail, and the frames in this repository (where a root cause usually shows)."""
    tail = "".join(traceback.format_exception(err)).splitlines()[-TRACEBACK_LINES:]
    ours = [
        f"{os.path.relpath(f.filename, REPO)}:{f.lineno} in {f.name}"
        for f in traceback.extract_tb(err.__traceback__)
        if f.filename.startswith(REPO) and f"{os.sep}.venv{os.sep}" not in f.filename
    ]
    return {
        "error_type": type(err).__name__,
        "error": str(err),
        "traceback": "\n".join(tail),
        "repo_frames": ours,
    }


def run_algorithm_cell(column: Column, name: str, out: str, cell_dir: str, record: dict[str, Any]) -> None:
    """Train 2 steps, probe the trained model, check the export (rank 0); fills ``record`` as it goes."""
    pl.seed_everything(0, verbose=False)
    context = BuildContext(
        out_dir=out,
        cell_dir=cell_dir,
        per_rank_batch=lambda global_batch: max(1, global_batch // column.devices),
        lora=lora_config() if column.lora else None,
    )
    module, datamodule = ALGORITHMS[name].build(context)
    if column.lora:
        start_from_named_adapters(module)
    probe = Probe(module, datamodule)
    recorder = StepRecorder(probe)
    record["steps"] = recorder.steps  # the same list: steps recorded before a failure are kept
    export_dir = os.path.join(cell_dir, "hf_model")
    trainer = make_trainer(column, cell_dir, [recorder, HFExportCallback(dirpath=export_dir)])
    record["phase"] = "fit"
    start = time.perf_counter()
    trainer.fit(module, datamodule)
    record["fit_seconds"] = time.perf_counter() - start
    record["global_step"] = trainer.global_step
    record["world_size"] = trainer.world_size
    record["phase"] = "probe"
    trained = probe()
    record["digest"] = digest(trained)
    if recorder.initial is not None:
        record["initial_vs_trained"] = float((trained - recorder.initial).abs().max())
    if trainer.is_global_zero:
        record["phase"] = "export"
        record["export"] = {}
        check_export(export_dir, trained, probe, record["export"])


def run_config_cell(column: Column, name: str, out: str, cell_dir: str, record: dict[str, Any]) -> None:
    """The tiny twin of ``configs/<name>.yaml`` through the ``aa`` CLI, 1 step under ZeRO-3; export checked."""
    from aa_lightning.cli import build_cli

    overrides = twin_overrides(name)
    args = [
        "fit",
        "--config",
        os.path.join(REPO, "configs", "tiny", f"{name}.yaml"),
        "--trainer.strategy",
        column.strategy,
        "--trainer.max_steps",
        "1",
        "--trainer.default_root_dir",
        cell_dir,
        "--trainer.enable_progress_bar",
        "false",
        *overrides,
    ]
    record["cli_args"] = args
    record["phase"] = "fit"
    start = time.perf_counter()
    cli = build_cli(args)
    record["fit_seconds"] = time.perf_counter() - start
    trainer = cli.trainer
    record["global_step"] = trainer.global_step
    record["world_size"] = trainer.world_size
    record["strategy"] = type(trainer.strategy).__name__
    record["steps"] = [{"metrics": scalar_metrics(trainer.callback_metrics)}]
    record["phase"] = "probe"
    probe = Probe(cli.model, cli.datamodule)
    trained = probe()
    record["digest"] = digest(trained)
    if trainer.is_global_zero:
        record["phase"] = "export"
        record["export"] = {}
        check_export(os.path.join(cell_dir, "hf_model"), trained, probe, record["export"])


def run_cell(column: Column, name: str, out: str) -> dict[str, Any]:
    """One cell on this rank; never raises (the exception goes into the record)."""
    cell_dir = os.path.join(out, column.name, name)
    os.makedirs(cell_dir, exist_ok=True)
    write_json(cell_path(out, column.name, name, "started"), {"time": time.time(), "pid": os.getpid()})
    record: dict[str, Any] = {"column": column.name, "cell": name, "rank": rank(), "status": "error"}
    record["phase"] = "build"
    start = time.perf_counter()
    try:
        if column.kind == "configs":
            run_config_cell(column, name, out, cell_dir, record)
        else:
            run_algorithm_cell(column, name, out, cell_dir, record)
        record["status"] = "ok"
    except Exception as err:  # recorded, never raised: the next cells still run
        record.update(error_fields(err))
    finally:
        record["seconds"] = time.perf_counter() - start
        record["rank"] = rank()  # known for sure only once the first fit has launched the ranks
        cleanup()
    write_json(cell_path(out, column.name, name, "json"), record)
    return record


def cleanup() -> None:
    """Leave no ZeRO-3 loading switch behind (a failed fit skips the module's teardown), free the models."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    gc.collect()


def peers_ok(column: Column, name: str, out: str, record: dict[str, Any]) -> bool:
    """Whether every rank finished this cell without error (waits for the other ranks' records)."""
    if record["status"] != "ok":
        return False
    others = [
        os.path.join(out, column.name, f"{name}.rank{r}.json") for r in range(column.devices) if r != rank()
    ]
    deadline = time.time() + PEER_WAIT_S
    while time.time() < deadline:
        if all(os.path.exists(p) for p in others):
            records = []
            for path in others:
                with open(path) as f:
                    records.append(json.load(f))
            return all(r["status"] == "ok" for r in records)
        time.sleep(0.2)
    return False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--column", required=True, choices=sorted(COLUMNS))
    parser.add_argument("--out", required=True)
    parser.add_argument("--cells", required=True, help="comma-separated cell names, run in this order")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    column = COLUMNS[args.column]
    os.makedirs(os.path.join(args.out, column.name), exist_ok=True)
    for name in args.cells.split(","):
        print(f"[matrix rank {rank()}] {column.name}/{name}: start", flush=True)
        record = run_cell(column, name, args.out)
        print(
            f"[matrix rank {rank()}] {column.name}/{name}: {record['status']} in {record['seconds']:.1f} s"
            + (
                f" ({record.get('error_type')}: {record.get('error', '')[:300]})"
                if record["status"] != "ok"
                else ""
            ),
            flush=True,
        )
        if not peers_ok(column, name, args.out, record):
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(3)  # a fresh process for the rest (see the module docstring)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown: a process group torn down rank by rank can hang at exit


if __name__ == "__main__":
    main()
