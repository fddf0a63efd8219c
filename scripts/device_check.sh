#!/usr/bin/env bash
# One call on a lent GPU: build lowbit against the image's torch, run the CUDA tests and,
# with --bench, the GPU benchmarks. Logs and JSON go to $OUT (the device tool's folder).
# Usage: bash scripts/device_check.sh [--bench] [pytest paths...]
set -uo pipefail
OUT=${OUT:-/tmp/lowbit-device}; mkdir -p "$OUT"
BENCH=0; if [ "${1:-}" = "--bench" ]; then BENCH=1; shift; fi
TESTS=("$@"); [ ${#TESTS[@]} -eq 0 ] && TESTS=(tests/ops tests/algorithms tests/api/test_quant_linear.py)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TORCH_CUDA_ARCH_LIST=9.0 CMAKE_BUILD_PARALLEL_LEVEL=16 MAX_JOBS=16
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/device.txt"
python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" | tee -a "$OUT/device.txt"
t0=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps -q -e . > "$OUT/build.log" 2>&1 || { tail -60 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
python3 -c "import lowbit, torch; print('lowbit', lowbit.__file__, 'cuda ops:', torch._C._dispatch_has_kernel_for_dispatch_key('lowbit::quantize', 'CUDA'))"
python3 -m pytest -q -p no:cacheprovider "${TESTS[@]}" -x --timeout=600 2>&1 | tee "$OUT/pytest.log" | tail -40 || true
if [ $BENCH = 1 ]; then
  for b in benchmarks/bench_gptq.py benchmarks/bench_linear.py; do
    [ -f "$b" ] && python3 "$b" --device cuda --out "$OUT" 2>&1 | tee -a "$OUT/bench.log" | tail -30
  done
fi
echo "total: $(( $(date +%s) - t0 )) s"
