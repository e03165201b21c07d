#!/usr/bin/env bash
# The GPU session of the benchmarks, under 8 minutes on one H100/H200-class GPU:
#   1. SFT hardware efficiency (model FLOPs/s, MFU) on a Qwen2.5-0.5B-shaped model built from a config, bf16;
#   2. SFT, DPO, RM (padded and padding_free) and GRPO, aa-lightning against TRL side by side, one run each.
# Usage (from the repository root): bash benchmarks/gpu.sh [OUT_DIR]   (default ./gpu-bench)
# Installs TRL 1.16.0 if it is missing (pip install -e .[bench] does the same).
set -euo pipefail
OUT=${1:-gpu-bench}
PY=${PYTHON:-python}
STEPS=${STEPS:-8}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
$PY -c "import trl" 2>/dev/null || $PY -m pip install -q "trl==1.16.0"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; $PY -c "import torch, transformers, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__)"; } > "$OUT/hardware.txt" 2>&1 || true
start=$(date +%s)
# the model folder is built once (random init, deterministic); both steps below reuse it
$PY -c "from benchmarks.build_model import resolve; print(resolve('bench-0.5b'))"
timeout 150 $PY -m benchmarks.mfu --device cuda --bf16 --model bench-0.5b --steps "$STEPS" --json "$OUT/mfu.json" | tee "$OUT/mfu.txt"
timeout 330 $PY -m benchmarks.run --device cuda --bf16 --model bench-0.5b \
  --workloads sft,dpo,rm,rm_padding_free,grpo --steps "$STEPS" --repeats 1 --timeout 100 \
  --json "$OUT/run.json" --markdown "$OUT/table.md" | tail -n 20
if $PY -c "import vllm" 2>/dev/null; then
  echo "vLLM is installed: GRPO with the vLLM engine against plain generate has no workload here yet" | tee -a "$OUT/table.md"
fi
echo "gpu.sh: $(( $(date +%s) - start )) s; results in $OUT/"
