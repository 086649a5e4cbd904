#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md in one run (about 8 minutes on one H100), on a machine
# whose python3 has CUDA builds of JAX and PyTorch but maybe other flax/optax versions:
#     WHEELS=.whl bash benchmarks/run_on_gpu.sh
# WHEELS (optional): a folder of wheels to put first on the path (this project's pinned flax,
# optax and segment-anything 1.0). Results: $OUT/gpu_parity.json, $OUT/train_step_gpu.json
# (OUT defaults to benchmarks/results/gpu-<UTC time>).
set -u
OUT=${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%dT%H%MZ)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
if [ -n "${WHEELS:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$WHEELS"/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
python3 -c "import jax, flax, optax, torch; print('jax', jax.__version__, 'flax', flax.__version__,
'optax', optax.__version__, 'torch', torch.__version__, jax.devices())"
timeout 150 python3 benchmarks/gpu_parity.py --json "$OUT/gpu_parity.json"
timeout 330 python3 benchmarks/train_step.py --batch 16 --steps 10 --warmup 3 \
    --json "$OUT/train_step_gpu.json"
