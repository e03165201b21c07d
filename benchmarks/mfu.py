"""Hardware efficiency of aa-lightning SFT: model FLOPs per second against what this machine's matmuls reach.

    python -m benchmarks.mfu                                   # SmolLM2-135M SFT on CPU, fp32
    python -m benchmarks.mfu --device cuda --bf16 --model bench-0.5b --steps 10

1. The machine's matmul rate: a square matmul (2048 on CPU in fp32, 8192 on GPU in bf16), with the same
   torch thread count as the training run, timed after a warm-up: ``2 n^3 / t``.
2. SFT through the benchmark's aa-lightning side (``benchmarks.aa_side.run_sft``, a fresh process, step 1 not
   timed) on the benchmark's Alpaca rows: real (non-pad) tokens per second.
3. Model FLOPs per real token, the usual training count (forward + backward = 3 x forward):
   ``6 * (parameters in matmuls, LM head included) + 6 * layers * hidden * sum(len^2) / sum(len)`` (causal
   attention's ``QK^T`` and ``AV``, half of each row's full ``len x len``: a row's attention work grows with its
   length squared, so the per-token average weights long rows more than the mean length does). It is the nominal work of the model, so the fraction is
   comparable with any trainer's MFU; aa-lightning's sparse LM head skips the head on unlabelled positions, so
   the work it really executes is lower than this count.

The fraction is ``model FLOP/s / matmul FLOP/s``; on a GPU it is also given against the chip's dense bf16
peak (``--peak-tflops``; H100/H200 SXM: 989) as MFU.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}


def matmul_rate(device: str, dtype: Any, n: int, threads: int, seconds: float = 2.0) -> float:
    """FLOP/s of an ``n x n`` matmul on ``device`` (median of repeated timings after a warm-up)."""
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 5:
        start = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - start)
    times.sort()
    return 2 * n**3 / times[len(times) // 2]


def model_flops_per_token(config: Any, attention_length: float) -> dict[str, float]:
    """Nominal training FLOPs per real token (module docstring) and the parameters in matmuls.

    ``attention_length`` is ``sum(len^2) / sum(len)`` over the rows trained on.
    """
    text = config.get_text_config()
    hidden, layers = text.hidden_size, text.num_hidden_layers
    heads, kv_heads = (
        text.num_attention_heads,
        getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
    )
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    per_layer = hidden * q_out + 2 * hidden * kv_out + q_out * hidden + 3 * hidden * text.intermediate_size
    body = layers * per_layer
    head = hidden * text.vocab_size
    attention = 6 * layers * q_out * attention_length
    return {
        "matmul_params": float(body + head),
        "nominal": 6.0 * (body + head) + attention,
    }


def gpu_peak(name: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    for key, tflops in GPU_PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="alias, folder, bench or bench-0.5b")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--steps", type=int, default=6, help="SFT steps (the first is not timed)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--matmul-size", type=int, default=None, help="default 2048 on CPU, 8192 on GPU")
    parser.add_argument("--padding-free", action="store_true", help="measure the padding_free SFT row")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense peak for MFU")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from transformers import AutoConfig

    from benchmarks.build_model import resolve
    from benchmarks.common import BenchConfig
    from benchmarks.run import machine_summary, prepare_data, run_side

    threads = args.threads or os.cpu_count() or 1
    gpu = args.device.startswith("cuda")
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    n = args.matmul_size or (8192 if gpu else 2048)
    peak_matmul = matmul_rate(args.device, dtype, n, threads)
    per_core = matmul_rate(args.device, dtype, n, 1) if not gpu and threads > 1 else None

    path = resolve(args.model)
    work = Path(tempfile.mkdtemp(prefix="aa-mfu-"))
    aa_file, _, template = prepare_data("sft", path, work / "data", 256, args.max_length)
    workload = "sft_padding_free" if args.padding_free else "sft"
    config = BenchConfig(
        workload=workload,
        side="aa",
        model_path=path,
        work_dir=str(work / "run"),
        data_file=aa_file,
        steps=args.steps,
        batch_size=args.batch_size,
        max_length=args.max_length,
        device=args.device,
        bf16=args.bf16,
        threads=threads,
        extra={"template": template},
    )
    result = run_side(config)
    if "error" in result:
        raise SystemExit(f"the SFT run failed:\n{result['error']}")
    rows = result["timed_steps"] * args.batch_size
    mean_length = result["tokens"] / rows
    attention_length = result["token_square_sum"] / result["tokens"]
    flops = model_flops_per_token(AutoConfig.from_pretrained(path), attention_length)
    tokens_per_s = result["tokens_per_s"]
    nominal = flops["nominal"] * tokens_per_s
    report: dict[str, Any] = {
        "machine": machine_summary(),
        "model": args.model,
        "matmul_params": flops["matmul_params"],
        "threads": threads,
        "matmul_n": n,
        "matmul_flops": peak_matmul,
        "matmul_flops_one_thread": per_core,
        "tokens_per_s": tokens_per_s,
        "samples_per_s": result["rate"],
        "mean_real_length": mean_length,
        "attention_length": attention_length,
        "model_flops_per_token": flops["nominal"],
        "model_flops": nominal,
        "fraction_of_matmul": nominal / peak_matmul,
    }
    lines = [
        f"# {report['machine']}",
        f"matmul {n}x{n} {'bf16' if args.bf16 else 'fp32'}, {threads} thread(s): {peak_matmul / 1e9:.1f} GFLOP/s"
        + (f" (1 thread: {per_core / 1e9:.1f} GFLOP/s)" if per_core else ""),
        f"{args.model} SFT ({workload}, batch {args.batch_size}, max length {args.max_length}, steps 2..{args.steps}): "
        f"{result['rate']:.3f} samples/s, {tokens_per_s:.0f} real tokens/s (mean {mean_length:.0f} tokens/row, "
        f"sum(len^2)/sum(len) {attention_length:.0f})",
        f"model FLOPs/token {flops['nominal'] / 1e9:.3f} GFLOP ({flops['matmul_params'] / 1e6:.0f}M params in "
        f"matmuls): {nominal / 1e9:.1f} GFLOP/s = {100 * nominal / peak_matmul:.1f}% of the measured matmul rate",
    ]
    if gpu:
        peak = gpu_peak(torch.cuda.get_device_name(0), args.peak_tflops)
        if peak:
            report["mfu"] = nominal / peak
            lines.append(
                f"MFU against the chip's dense bf16 peak ({peak / 1e12:.0f} TFLOP/s): {100 * nominal / peak:.1f}%"
            )
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
