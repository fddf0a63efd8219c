#!/usr/bin/env bash
# One call on a lent GPU (see the device tool's README): build lowbit against the image's
# torch, run the CUDA tests and the GPU benchmarks. Logs and JSON go to $OUT.
# Usage: bash scripts/device_check.sh [pytest -k expression]   (default: "cuda")
# .whl/ (git-ignored) may hold wheels missing there (expecttest, the GPTQ peer's):
#   benchmarks/peers/install_peer.sh --wheels .whl
set -uo pipefail
OUT=${OUT:-/tmp/lowbit-device}; mkdir -p "$OUT"
KEXPR=${1:-cuda}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TORCH_CUDA_ARCH_LIST=9.0 CMAKE_BUILD_PARALLEL_LEVEL=16
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
t0=$(date +%s)
stamp() { echo "== $1 at $(( $(date +%s) - t0 )) s"; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  date -u; git rev-parse HEAD 2>/dev/null; } > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"
python3 -m pip install --no-build-isolation --no-deps -q -e . > "$OUT/build.log" 2>&1 || { tail -60 "$OUT/build.log"; exit 1; }
stamp build
# An exception thrown by lowbit's kernels segfaulted under pytest on this image (2026-11-25)
# but not in a plain process: probe whether importing jax first is what breaks it.
for pre in "" "import jax" "import jaxtyping"; do
  timeout 60 python3 -c "$pre
import torch, lowbit
try:
    lowbit.ops.dequantize(torch.zeros(4, 64, dtype=torch.int32, device='cuda'), torch.ones(4, 2, device='cuda'), torch.zeros(4, 2, dtype=torch.int32, device='cuda'), 32)
except TypeError as e:
    print('probe [$pre]: raised TypeError as expected')" 2>&1 | tail -1 || echo "probe [$pre]: crashed"
done | tee -a "$OUT/device.txt"
stamp probes
# The ops' CUDA cases, then the GPTQ pipeline whole (its default device is CUDA there).
PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 timeout 130 python3 -m pytest -q -p no:cacheprovider -p xdist.plugin -n 12 \
  tests/ops tests/api/test_quant_linear.py -k "$KEXPR" 2>&1 | tee "$OUT/pytest.log" | tail -15
PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 timeout 70 python3 -m pytest -q -p no:cacheprovider -p xdist.plugin -n 8 \
  tests/calibration/test_gptq_pipeline.py 2>&1 | tee -a "$OUT/pytest.log" | tail -15
stamp tests
timeout 120 python3 benchmarks/bench_gptq.py --device cuda --out "$OUT" 2>&1 | tee "$OUT/bench_gptq.log" | tail -30
stamp bench_gptq
timeout 60 python3 benchmarks/bench_linear.py --device cuda --quick --out "$OUT/bench_linear_cuda.json" 2>&1 \
  | tee "$OUT/bench_linear.log" | tail -15
stamp done
