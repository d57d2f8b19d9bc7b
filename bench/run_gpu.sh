#!/usr/bin/env bash
# One call on a CUDA machine (a lent H100/H200): the CUDA tests, the kernel
# bandwidth sweep, the step-time comparison, and the rendered table. Results
# land in bench/results/ (commit them) and, on the device tool, in $OUT.
#
#   bash bench/run_gpu.sh            # ~10 min on an H200 with every peer
#
# Peers missing from the machine's image (it has no network) travel as
# wheels in .whl/: see bench/README.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/adopt-bench-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
SITE=/tmp/adopt-site
rm -rf "$SITE"
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target "$SITE" . || exit 1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-deps --no-index --target "$SITE" .whl/*.whl || exit 1
fi
export PYTHONPATH="$SITE"
{
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/device.txt"

# Ordered so that a run cut short still has the most important results.
# 1. The kernel against the reference, compiled, on CUDA tensors (bit-exact).
python3 -m pytest tests/test_kernel.py tests/test_capturable.py tests/test_mixed_precision.py \
    -q -p no:cacheprovider -x 2>&1 | tee "$OUT/tests-kernel.log" | tail -15

# 2. The kernel alone: GB/s against a copy of the same bytes.
python3 bench/bandwidth.py 2>&1 | tee "$OUT/bandwidth.log" | tail -25

# 3. Step time: ours and the headline peers on every parameter set.
BENCH="python3 -m pytest bench -q -p no:cacheprovider --benchmark-only --benchmark-min-rounds=5 --benchmark-max-time=0.5"
ADOPT_BENCH_IMPLS=adopt_triton_fused,adopt_triton_fused_bf16_state,torch_adopt_foreach,torch_adamw_fused,torch_adamw_foreach \
    $BENCH 2>&1 | tee "$OUT/bench-core.log" | tail -5

# 4. The whole test suite with compiled kernels.
python3 -m pytest tests -q -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -25

# 5. The remaining peers (the compiled ones take minutes to compile).
ADOPT_BENCH_IMPLS=adopt_triton_foreach,adopt_triton_reference,torch_adopt_single_tensor,timm_adopt,pytorch_optimizer_adopt,heavyball_adopt,reference_torch_compile \
    $BENCH 2>&1 | tee "$OUT/bench-peers.log" | tail -5

# 6. Table and plot; the README's table is regenerated from the JSON.
python3 bench/render.py --readme README.md | tee "$OUT/table.md"
cp bench/results/*.json bench/results/*.png "$OUT"/ 2>/dev/null
git diff --stat README.md
