#!/usr/bin/env bash
# Install the peer (llm-compressor) that benchmarks/bench_gptq.py and bench_awq.py time
# against lowbit, WITHOUT touching the project's venv: everything goes into separate
# target folders, with --no-deps, so torch / transformers stay the venv's own.
#
#   benchmarks/peers/install_peer.sh                 # into <repo>/.venv-peer/site
#   benchmarks/peers/install_peer.sh --awq           # also what llm-compressor's oneshot
#                                                    # needs (datasets, pyarrow, pandas...),
#                                                    # into <repo>/.venv-peer/site-packages
#   benchmarks/peers/install_peer.sh --target DIR    # into DIR (--awq: into DIR/site-packages,
#                                                    # or beside DIR when DIR is named site)
#   benchmarks/peers/install_peer.sh --wheels DIR    # download the pinned wheels into DIR
#                                                    # (Python 3.12, manylinux x86_64), for
#                                                    # an offline GPU machine (with --awq too)
#
# Idempotent: a target that already holds every pinned version is left as it is, and
# pip download skips wheels already in DIR. PYTHON=... picks the interpreter (default:
# <repo>/.venv/bin/python, else python3). See benchmarks/peers/README.md.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PY="$REPO/.venv/bin/python"; else PY=python3; fi
fi

# The peer itself: always installed into the target (llmcompressor 0.14.0.1 pins
# compressed-tensors==0.19.0; it declares torch>=2.10,<=2.14 and transformers
# >=5.15,<=5.17, and its GPTQ path imports fine with torch 2.13 / transformers 5.24 too).
PEER=(
  llmcompressor==0.14.0.1
  compressed-tensors==0.19.0
)
# Pure-Python (or, for pydantic-core, binary) packages the GPTQ path imports. Installed
# into the target only where the interpreter lacks them; all downloaded in --wheels
# mode, for a machine that has torch/transformers/psutil/numpy but none of these.
SUPPORT=(
  loguru==0.7.3
  pydantic==2.13.4
  pydantic-core==2.46.4
  annotated-types==0.7.0
  typing-inspection==0.4.2
)

# --awq: what `import llmcompressor` (the oneshot entry point AWQModifier runs under)
# needs beyond the above: datasets and its imports, ~270 MB unpacked (pyarrow 170 MB).
# Installed, where the interpreter lacks them, into a SEPARATE folder whose path contains
# "site-packages": datasets fingerprints every Dataset by pickling it with dill, and dill
# pickles a module by value (failing on pyarrow's MonthDayNano type) unless the module's
# file lies under sys.prefix or in a folder named site-packages, which `.venv-peer/site`
# is not. pandas also needs python-dateutil and six (our .venv has both).
ONESHOT=(
  datasets==5.2.0
  pyarrow==26.0.1
  pandas==3.1.1
  dill==0.4.1
  multiprocess==0.70.19
  xxhash==4.1.0
)

usage() { sed -n '2,18p' "$0"; exit "${1:-0}"; }

MODE=install
TARGET="$REPO/.venv-peer/site"
AWQ=0
WHEELS=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --wheels) MODE=wheels; WHEELS="${2:?--wheels needs a folder}"; shift 2 ;;
    --target) TARGET="${2:?--target needs a folder}"; shift 2 ;;
    --awq) AWQ=1; shift ;;
    -h|--help) usage 0 ;;
    *) echo "unknown argument: $1" >&2; usage 2 ;;
  esac
done

if [[ "$MODE" == wheels ]]; then
  mkdir -p "$WHEELS"
  "$PY" -m pip download --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEELS" "${PEER[@]}" "${SUPPORT[@]}"
  if [[ $AWQ == 1 ]]; then
    "$PY" -m pip download --no-deps --only-binary=:all: \
      --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
      -d "$WHEELS" "${ONESHOT[@]}" python-dateutil==2.9.0.post0 six==1.17.0
    echo "--awq: install the oneshot wheels into a folder named site-packages (see ONESHOT above)"
  fi
  echo "wheels for Python 3.12 in $WHEELS ($(du -sh "$WHEELS" | cut -f1) in all)"
  exit 0
fi

# has_dist NAME VERSION [DIR]: is NAME==VERSION installed (in DIR, or for $PY)?
has_dist() {
  "$PY" - "$@" <<'EOF'
import sys
from importlib.metadata import distributions
name, ver = sys.argv[1], sys.argv[2]
paths = sys.argv[3:] or None
norm = lambda s: s.lower().replace("_", "-")
found = [d.version for d in (distributions(path=paths) if paths else distributions())
         if norm(d.metadata["Name"] or "") == norm(name)]
sys.exit(0 if ver in found else 1)
EOF
}

want=()
for spec in "${PEER[@]}"; do
  has_dist "${spec%%==*}" "${spec##*==}" "$TARGET" || want+=("$spec")
done
for spec in "${SUPPORT[@]}"; do
  name="${spec%%==*}"
  # the interpreter's own copy (any version) will do; else the pinned one in the target
  if "$PY" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$name" 2>/dev/null; then
    continue
  fi
  has_dist "$name" "${spec##*==}" "$TARGET" || want+=("$spec")
done

if [[ ${#want[@]} -eq 0 ]]; then
  echo "peer already installed in $TARGET"
else
  mkdir -p "$TARGET"
  "$PY" -m pip install --no-deps --upgrade --target "$TARGET" "${want[@]}"
fi

if [[ $AWQ == 1 ]]; then
  # beside the GPTQ target: <repo>/.venv-peer/site -> <repo>/.venv-peer/site-packages
  if [[ "$(basename "$TARGET")" == site ]]; then
    ONESHOT_TARGET="$(dirname "$TARGET")/site-packages"
  else
    ONESHOT_TARGET="$TARGET/site-packages"
  fi
  want=()
  for spec in "${ONESHOT[@]}"; do
    name="${spec%%==*}"
    # the interpreter's own copy (any version) will do; else the pinned one in the target
    if "$PY" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$name" 2>/dev/null; then
      continue
    fi
    has_dist "$name" "${spec##*==}" "$ONESHOT_TARGET" || want+=("$spec")
  done
  if [[ ${#want[@]} -eq 0 ]]; then
    echo "oneshot dependencies already installed in $ONESHOT_TARGET"
  else
    mkdir -p "$ONESHOT_TARGET"
    "$PY" -m pip install --no-deps --upgrade --target "$ONESHOT_TARGET" "${want[@]}"
  fi
  # check: the AWQ adapter imports llm-compressor (for real) and datasets fingerprints
  PYTHONWARNINGS=ignore "$PY" - "$REPO" "$TARGET" "$ONESHOT_TARGET" <<'EOF'
import sys
repo, target, oneshot = sys.argv[1:4]
sys.path[:0] = [repo + "/benchmarks"]
from pathlib import Path
from peers import llmcompressor_awq as awq
awq.PEER_SITE, awq.ONESHOT_SITE = Path(target), Path(oneshot)
why = awq.peer_available()
print(awq.peer_name() + ": oneshot + AWQModifier importable" if why is None else why)
sys.exit(why is not None)
EOF
fi

# check: the adapter imports the peer from the target
PYTHONWARNINGS=ignore "$PY" - "$REPO" "$TARGET" <<'EOF'
import sys
repo, target = sys.argv[1], sys.argv[2]
sys.path[:0] = [target, repo + "/benchmarks"]
from peers.llmcompressor_gptq import peer_available, peer_name
why = peer_available()
print(peer_name() + ": GPTQ importable" if why is None else why)
sys.exit(why is not None)
EOF
