#!/usr/bin/env bash
# The GPU checks of issue 26 in one call of a lent device (its own torch and triton; results in $OUT):
# the packed and per-part updates agree on CUDA, the interpreter-tested kernels compile, and the
# VGG-19 step (batch 128, K 8) of every mode, weight training included, eager and captured in a
# CUDA graph. Each part writes its JSON as it finishes, so a cut run keeps what it measured.
#   OUT=/tmp/gpu bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
OUT=${OUT:-/tmp/seedslot-gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/device.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
# bit-identity of the grouped and per-part updates, and of the Triton kernels, now on CUDA
timeout 240 python -m pytest -q -x -p no:cacheprovider tests/test_grouped_update.py tests/test_step_graph.py \
    tests/test_triton_kernels.py 2>&1 | tail -5 | tee "$OUT/tests.txt"
timeout 150 python -m seedslot bench gpu --parts identities --quick --json "$OUT/identities.json" | tee -a "$OUT/tables.md"
for compile in reduce-overhead off; do
    timeout 300 python -m seedslot bench speed --model vgg19 --k 8 --batch-size 128 --device cuda --repeats 3 \
        --modes learned,int8,implicit --compile "$compile" --profile --json "$OUT/speed-$compile.json" \
        | tee -a "$OUT/tables.md"
done
