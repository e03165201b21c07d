"""What both sides of a benchmark share: the settings, the step timer, token counting and the result record.

This module imports only the standard library and torch, so a TRL child process never loads aa-lightning
(and the other way round): each side's peak memory is its own.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).parent / "data"
WORKLOADS = (
    "sft",
    "sft_padding_free",
    "dpo",
    "dpo_padding_free",
    "dpo_precomputed",
    "dpo_sparse_head",
    "rm",
    "rm_padding_free",
    "kto",
    "grpo",
    "gspo",
    "rloo",
    "online_dpo",
    "ppo",
)
AA_ONLY = (
    "sft_padding_free",
    "dpo_padding_free",
    "dpo_precomputed",
    "dpo_sparse_head",
    "rm_padding_free",
    "ppo",
)
#: aa-only rows that get a TRL side of their own when the attention kernel takes sequence boundaries
#: (flash-attention's varlen kernels on a GPU): TRL's ``padding_free=True`` then does the same work; with
#: SDPA, TRL's padding-free batches would attend across rows, so those rows compare with TRL's padded default.
TRL_WITH_VARLEN = ("sft_padding_free",)


def has_trl_side(workload: str, attn: str) -> bool:
    """Whether TRL runs this workload under this attention implementation (else it is an aa-only row)."""
    if workload in TRL_WITH_VARLEN:
        return attn.startswith("flash_attention")
    return workload not in AA_ONLY


#: workloads that sample completions with ``generate`` inside each step
GENERATING = ("grpo", "gspo", "rloo", "online_dpo", "ppo")

#: aa-only rows compared with the TRL figure of this workload (same data, TRL's default batches)
BASELINE_OF = {
    "sft_padding_free": "sft",
    "dpo_padding_free": "dpo",
    "dpo_precomputed": "dpo",
    "dpo_sparse_head": "dpo",
    "rm_padding_free": "rm",
}


@dataclass
class BenchConfig:
    """One workload on one side. Both sides get exactly the same values."""

    workload: str
    side: str  # "trl" | "aa"
    model_path: str
    work_dir: str
    data_file: str = ""  # prepared rows (see benchmarks.run.prepare_data)
    steps: int = 20
    batch_size: int = 8
    max_length: int = 256
    device: str = "cpu"
    bf16: bool = False
    attn: str = "sdpa"  # attn_implementation on both sides (flash_attention_2 on GPU: padding-free varlen)
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    lr: float = 1e-5
    max_grad_norm: float = 1.0
    seed: int = 0
    beta: float = 0.1  # DPO beta
    grpo_beta: float = 0.04
    num_generations: int = 4
    prompts_per_step: int = 2
    max_new_tokens: int = 64
    temperature: float = 1.0
    log_every: int = 10
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, text: str) -> BenchConfig:
        return cls(**json.loads(text))

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def online_dpo_prompts(config: BenchConfig) -> int:
    """Prompts per online-DPO step: as many completions (2 per prompt) as a GRPO step samples."""
    return max(1, config.prompts_per_step * config.num_generations // 2)


def setup_process(config: BenchConfig) -> None:
    """Same thread count and seeds on both sides, before any model exists."""
    import torch

    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if config.workload in GENERATING:
        GenerationClock.install(config.device)


def peak_rss_mb() -> float:
    """Peak resident set size of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def current_rss_mb() -> float:
    """Resident set size now (Linux ``/proc``; the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return peak_rss_mb()


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


class GenerationClock:
    """Wall seconds spent inside ``GenerationMixin.generate`` (both sides sample with it), so a step splits
    into sampling and the rest: generation-bound rows show how much of the step is code both sides share."""

    seconds = 0.0
    installed = False

    @classmethod
    def install(cls, device: str) -> None:
        if cls.installed:
            return
        from transformers.generation.utils import GenerationMixin

        original = GenerationMixin.generate

        def generate(self: Any, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                synchronize(device)
                cls.seconds += time.perf_counter() - start

        GenerationMixin.generate = generate
        cls.installed = True


class StepTimer:
    """Timestamps at the end of every optimizer step; steady state = from the end of step 1 to the last end.

    The first step (allocator warm-up, lazy initialisation, first data pass) is never counted.
    """

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.ends: list[float] = []
        self.cpu: list[
            float
        ] = []  # process CPU seconds (all threads): work done, whatever else the machine runs
        self.rss: list[float] = []
        self.generate: list[float] = []  # GenerationClock.seconds at each step end

    def step_end(self) -> None:
        synchronize(self.device)
        self.ends.append(time.perf_counter())
        self.cpu.append(time.process_time())
        self.rss.append(current_rss_mb())
        self.generate.append(GenerationClock.seconds)

    @property
    def generate_step_times(self) -> list[float]:
        """Seconds inside ``generate`` in each timed step (zeros when nothing generates)."""
        return [b - a for a, b in zip(self.generate, self.generate[1:])]

    @property
    def cpu_step_times(self) -> list[float]:
        """Process CPU seconds of each timed step: less sensitive to other processes than wall time."""
        return [b - a for a, b in zip(self.cpu, self.cpu[1:])]

    @property
    def step_times(self) -> list[float]:
        """Seconds of each timed step (steps 2..N)."""
        return [b - a for a, b in zip(self.ends, self.ends[1:])]

    @property
    def timed_steps(self) -> int:
        return max(len(self.ends) - 1, 0)

    @property
    def seconds(self) -> float:
        return self.ends[-1] - self.ends[0] if len(self.ends) > 1 else float("nan")


class CountingCollator:
    """Wraps a collate function and records the non-pad tokens of every batch it builds, in order.

    It also records the sum of squared row lengths per batch: causal attention's work grows with each
    row's length squared, so FLOP counts need ``sum(len^2)``, not the mean length.

    With ``num_workers=0`` and an in-order sampler, the i-th call builds the i-th training batch (a loader
    that looks one batch ahead only adds calls at the end), so batches 2..N are ``counts[1:N]``.
    """

    def __init__(self, collate: Any, key: str = "attention_mask") -> None:
        self.collate = collate
        self.key = key
        self.counts: list[int] = []
        self.square_sums: list[int] = []

    def __call__(self, samples: list[Any]) -> Any:
        batch = self.collate(samples)
        lengths = self.row_lengths(batch)
        self.counts.append(int(lengths.sum()) if lengths is not None else 0)
        self.square_sums.append(int((lengths**2).sum()) if lengths is not None else 0)
        return batch

    def row_lengths(self, batch: Any) -> Any:
        """Real tokens of each row: from the mask, or, for a padding-free batch (one row of concatenated
        sequences, no mask), from where the position ids restart at 0."""
        if not isinstance(batch, dict):
            return None
        mask = batch.get(self.key)
        if mask is not None:
            return mask.reshape(mask.shape[0] if mask.dim() > 1 else 1, -1).long().sum(-1)
        positions = batch.get("position_ids")
        if positions is None:
            return None
        import torch

        flat = positions.reshape(-1)
        starts = torch.nonzero(flat == 0).reshape(-1)
        ends = torch.cat([starts[1:], torch.tensor([flat.numel()])])
        return (ends - starts).long()

    def __getattr__(self, name: str) -> Any:  # the wrapped collator's attributes (e.g. TRL's pad_token_id)
        return getattr(self.__dict__["collate"], name)


def step_time_stats(times: list[float]) -> dict[str, Any]:
    """Median and slowest timed step, and their ratio: how steady the steady state is."""
    if not times:
        return {
            "step_times_s": [],
            "median_step_s": float("nan"),
            "slowest_step_s": float("nan"),
            "slowest_over_median": float("nan"),
        }
    ordered = sorted(times)
    mid = len(ordered) // 2
    median = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    return {
        "step_times_s": [round(t, 4) for t in times],
        "median_step_s": median,
        "slowest_step_s": ordered[-1],
        "slowest_over_median": ordered[-1] / median if median > 0 else float("nan"),
    }


def make_result(
    config: BenchConfig,
    timer: StepTimer,
    unit: str,
    per_step: float,
    token_counts: list[int] | None = None,
    square_sums: list[int] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The record a child prints: steady-state rate in ``unit`` per second, peak memory and details."""
    steps = timer.timed_steps
    seconds = timer.seconds
    result: dict[str, Any] = {
        "workload": config.workload,
        "side": config.side,
        "unit": unit,
        "timed_steps": steps,
        "seconds": seconds,
        "rate": per_step * steps / seconds if steps else float("nan"),
        "step_s": seconds / steps if steps else float("nan"),
        "peak_rss_mb": peak_rss_mb(),
        "rss_after_step1_mb": timer.rss[0] if timer.rss else float("nan"),
        "rss_last_step_mb": timer.rss[-1] if timer.rss else float("nan"),
        "rss_trace_mb": [round(r) for r in timer.rss],
        **step_time_stats(timer.step_times),
        "cpu_step_times_s": [round(t, 4) for t in timer.cpu_step_times],
        "cpu_slowest_over_median": step_time_stats(timer.cpu_step_times)["slowest_over_median"],
        "generate_step_times_s": [round(t, 4) for t in timer.generate_step_times],
        "generate_s": sum(timer.generate_step_times),
    }
    if token_counts is not None and steps:
        tokens = sum(token_counts[1 : steps + 1])
        result["tokens"] = tokens
        result["tokens_per_s"] = tokens / seconds
    if square_sums is not None and steps:
        result["token_square_sum"] = sum(square_sums[1 : steps + 1])
    if config.device.startswith("cuda"):
        import torch

        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    result.update(extra)
    return result


def write_result(path: str, result: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(result, f)


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
