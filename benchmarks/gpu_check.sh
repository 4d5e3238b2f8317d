#!/usr/bin/env bash
# On a machine with CUDA: the step-speed benchmark against the diffusers examples' reference and the
# memory benchmark (fast and low against a sampling step), fp16 and bf16, SD1.5 at 512 px and SDXL at
# 1024 px, printed as tables into $OUT (default ./gpu-check). Needs torch with CUDA, diffusers and
# transformers; wheels in ./.whl are installed to /tmp/site first when the machine has no registry.
#   bash benchmarks/gpu_check.sh               (about 8 minutes on one H100/H200)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 - <<'PY' | tee "$OUT/machine.txt"
import diffusers, torch, transformers
print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}, "
      f"{torch.cuda.get_device_name()}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
PY
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >>"$OUT/machine.txt" 2>/dev/null
echo "== memory: one training step (fast / low) against one sampling step =="
timeout "${MEMORY_TIMEOUT:-300}" python3 benchmarks/memory.py --device cuda --precision fp16,bf16 \
  --families sd15,sdxl --json "$OUT/memory.json" 2>"$OUT/memory.err" | tee "$OUT/memory.txt"
echo "== speed: textinv (memory=fast) against the diffusers examples' step =="
timeout "${SPEED_TIMEOUT:-240}" python3 benchmarks/step_speed.py --device cuda --sizes sd15-512,sdxl-1024 \
  --precision fp16,bf16 --steps 5 --warmup 2 2>"$OUT/speed.err" | tee "$OUT/speed.txt"
