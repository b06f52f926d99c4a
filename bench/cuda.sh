#!/usr/bin/env bash
# The GPU table of issue 3 / docs/performance.md and the CUDA tests, as one run on a lent GPU
# machine (the `device` tool): `bash bench/cuda.sh` from the repository root.
#
# Nothing can be installed there, so this uses that machine's own python3 and torch with the
# package from src/ (PYTHONPATH), and states the torch version it ran with. Results go to
# $OUT (the device tool's folder that comes back) or ./bench-cuda. BENCH_DEVICE=cpu (with small
# BENCH_CUDA_SHAPES and BENCH_CUDA_LINEAR_SHAPES) dry-runs the script on a machine without a GPU.
set -uo pipefail
out=${OUT:-bench-cuda}
device=${BENCH_DEVICE:-cuda}
shapes=${BENCH_CUDA_SHAPES:-8192x32000,2048x128256}
repeat=${BENCH_CUDA_REPEAT:-9}
mkdir -p "$out"
export PYTHONPATH=src PYTHONUNBUFFERED=1

python3 - "$device" <<'PY' 2>&1 | tee "$out/machine.txt" || exit 1
import sys
import torch
device = sys.argv[1]
if device == "cuda" and not torch.cuda.is_available():
    sys.exit("bench/cuda.sh: no CUDA device is visible")
name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
print("torch", torch.__version__, "cuda", torch.version.cuda, name)
PY
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/tests.txt"
for dtype in float32 bfloat16; do
    python3 -m label_relaxation bench --device "$device" --dtype "$dtype" --shapes "$shapes" \
        --repeat "$repeat" --json "$out/bench-$device-$dtype.json" 2>&1 | tee "$out/bench-$dtype.txt"
done
# The output layer fused with the loss (docs/language-models.md): against matmul + cross-entropy,
# matmul + label relaxation and PyTorch's chunked linear_cross_entropy, with the allocator's peak.
linear_shapes=${BENCH_CUDA_LINEAR_SHAPES:-8192x128256}
python3 -m label_relaxation bench --device "$device" --hidden 4096 --shapes "$linear_shapes" \
    --repeat 5 --json "$out/bench-linear-$device.json" 2>&1 | tee "$out/bench-linear.txt"
