#!/usr/bin/env bash
# The GPU session of the benchmarks, under 8 minutes on one H100/H200-class GPU (each step has its own budget):
#   1. SFT hardware efficiency (model FLOPs/s, MFU) on a Qwen2.5-0.5B-shaped model built from a config, bf16
#      (70 s);
#   2. SFT, DPO, RM (padded and padding_free) and GRPO, aa-lightning against TRL side by side, one run each
#      (300 s; the aa side only when TRL is not installed: the GPU machine has no network, nothing is installed);
#   3. GRPO with the vLLM engine (benchmarks/grpo_vllm.py), when vLLM imports (80 s).
# Every step is independent: one that overruns its budget or fails does not stop the next, and benchmarks.run
# writes its JSON and table after every finished row, so an overrun keeps what it measured.
# Usage (from the repository root): bash benchmarks/gpu.sh [OUT_DIR]   (default ./gpu-bench)
set -uo pipefail
OUT=${1:-gpu-bench}
PY=${PYTHON:-python}
STEPS=${STEPS:-8}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
SIDES=trl,aa
if ! $PY -c "import trl" 2>/dev/null; then
  echo "gpu.sh: WARNING: TRL is not installed (no network here to install it): aa side only" | tee "$OUT/warnings.txt"
  SIDES=aa
fi
ATTN=sdpa
$PY -c "import flash_attn" 2>/dev/null && ATTN=flash_attention_2
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; echo "attention: $ATTN; sides: $SIDES"; } > "$OUT/hardware.txt" 2>&1 || true
start=$(date +%s)
# the model folder is built once (random init, deterministic); the steps below reuse it
$PY -c "from benchmarks.build_model import resolve; print(resolve('bench-0.5b'))" || true
timeout 70 $PY -m benchmarks.mfu --device cuda --bf16 --model bench-0.5b --steps "$STEPS" --batch-size 16 \
  --max-length 1024 --json "$OUT/mfu.json" > "$OUT/mfu.txt" 2>&1 || echo "gpu.sh: mfu step failed or overran (rc $?)"
timeout 300 $PY -m benchmarks.run --device cuda --bf16 --model bench-0.5b --sides "$SIDES" --attn "$ATTN" \
  --workloads sft,sft_padding_free,dpo,dpo_padding_free,rm,rm_padding_free,grpo --steps "$STEPS" --repeats 1 \
  --timeout 40 --json "$OUT/run.json" --markdown "$OUT/table.md" > "$OUT/run.txt" 2>&1 \
  || echo "gpu.sh: benchmarks.run failed or overran (rc $?); the rows it finished are in $OUT/run.json"
if $PY -c "import vllm" 2>/dev/null; then
  timeout 80 $PY -m benchmarks.grpo_vllm --device cuda --bf16 --model bench-0.5b --steps 3 \
    > "$OUT/grpo_vllm.txt" 2>&1 || echo "gpu.sh: grpo_vllm failed or overran (rc $?)"
else
  echo "gpu.sh: vLLM does not import: the GRPO-with-vLLM step is skipped" | tee -a "$OUT/warnings.txt"
fi
tail -n 20 "$OUT/table.md" 2>/dev/null || true
echo "gpu.sh: $(( $(date +%s) - start )) s; results in $OUT/"
