"""The CUDA kernels compile, and every op has one.

Build machines and most CI runners have no GPU, and a CPU build of torch never compiles
csrc/cuda/. These tests compile every csrc/cuda/*.cu with nvcc (compile only, for sm_80
and sm_90 in one call per file) against the installed torch's headers, and check from
the sources that the CUDA registrations cover every schema in csrc/torch_bindings.cpp.

nvcc is looked up at $CUDACXX, $CUDA_HOME/bin/nvcc, /usr/local/cuda/bin/nvcc, then PATH.
Without it the compile tests skip, unless $CI is set: CI must compile CUDA.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
CU_FILES = sorted((CSRC / "cuda").glob("*.cu"))
CUDA_SOURCES = CU_FILES + sorted((CSRC / "cuda").glob("*.cuh"))
ARCHS = ("80", "90")
# Headers that pull in most of ATen or cuBLAS: each costs tens of seconds per file.
HEAVY_HEADERS = ("torch/extension.h", "ATen/ATen.h", "ATen/cuda/CUDAContext.h")


def _find_nvcc() -> str | None:
    candidates = []
    if os.environ.get("CUDACXX"):
        candidates.append(os.environ["CUDACXX"])
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    for c in candidates:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return shutil.which("nvcc")


def _cxx_standard() -> str:
    # As CMakeLists.txt: torch >= 2.10 headers are C++20.
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    return "c++20" if (major, minor) >= (2, 10) else "c++17"


def _nvcc_command(nvcc: str, source: Path, obj: Path) -> list[str]:
    cmd = [nvcc, "-c", str(source), "-o", str(obj)]
    for arch in ARCHS:
        cmd += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    for inc in torch.utils.cpp_extension.include_paths():
        cmd += ["-I", inc]
    cmd += [
        "-I", str(CSRC),
        f"-std={_cxx_standard()}",
        "--expt-relaxed-constexpr",
        # The CPU wheel of torch lacks c10/cuda/impl/cuda_cmake_macros.h; this skips it.
        "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        "-Xcompiler", "-fPIC",
    ]
    return cmd


@dataclass
class Compiled:
    cmd: list[str]
    returncode: int
    stderr: str
    seconds: float


def _compile(cmd: list[str]) -> Compiled:
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        rc, err = p.returncode, p.stderr + p.stdout
    except subprocess.TimeoutExpired as e:
        rc, err = -1, f"nvcc timed out after {e.timeout} s"
    return Compiled(cmd, rc, err, time.monotonic() - t0)


@pytest.fixture(scope="session")
def nvcc_results(tmp_path_factory) -> dict[str, Compiled] | None:
    """Every .cu compiled once, two at a time (about one file's wall time per core);
    None when there is no nvcc."""
    nvcc = _find_nvcc()
    if nvcc is None:
        return None
    out = tmp_path_factory.mktemp("nvcc")
    # Largest files first, so the two workers finish close together.
    order = sorted(CU_FILES, key=lambda f: f.stat().st_size, reverse=True)
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {
            f.name: pool.submit(_compile, _nvcc_command(nvcc, f, out / f"{f.stem}.o")) for f in order
        }
        return {name: fut.result() for name, fut in futures.items()}


@pytest.mark.parametrize("source", CU_FILES, ids=lambda p: p.name)
def test_cuda_file_compiles(source: Path, nvcc_results: dict[str, Compiled] | None) -> None:
    if nvcc_results is None:
        msg = ("nvcc not found (looked at $CUDACXX, $CUDA_HOME/bin/nvcc, /usr/local/cuda/bin/nvcc "
               "and PATH)")
        if os.environ.get("CI"):
            pytest.fail(msg + "; CI must compile the CUDA kernels", pytrace=False)
        pytest.skip(msg)
    res = nvcc_results[source.name]
    print(f"{source.relative_to(ROOT)}: nvcc rc={res.returncode} in {res.seconds:.1f} s")
    if res.returncode != 0:
        print(res.stderr)
        pytest.fail(
            f"nvcc failed on {source.relative_to(ROOT)} (rc {res.returncode}):\n"
            f"{' '.join(res.cmd)}\n\n{res.stderr}",
            pytrace=False,
        )


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def _schemas() -> set[str]:
    text = _strip_comments((CSRC / "torch_bindings.cpp").read_text())
    return set(re.findall(r'\bm\.def\(\s*"(\w+)\(', text))


def test_every_op_has_a_cuda_kernel() -> None:
    schemas = _schemas()
    assert schemas, "no m.def(...) schemas found in csrc/torch_bindings.cpp"
    owner: dict[str, str] = {}
    for f in CU_FILES:
        text = _strip_comments(f.read_text())
        blocks = re.findall(r"TORCH_LIBRARY_IMPL\(\s*lowbit\s*,\s*CUDA\s*,\s*m\s*\)\s*\{(.*?)\}", text, re.S)
        assert len(blocks) == 1, f"{f.name}: expected one TORCH_LIBRARY_IMPL(lowbit, CUDA, m), got {len(blocks)}"
        impls = re.findall(r'\bm\.impl\(\s*"(\w+)"\s*,\s*&?\s*([\w:]+)\s*\)', blocks[0])
        registered = set()
        for op, fn in impls:
            assert fn.split("::")[-1] == f"{op}_cuda", f"{f.name}: op '{op}' registered with {fn}, not {op}_cuda"
            assert op not in owner, f"op '{op}' registered for CUDA in both {owner[op]} and {f.name}"
            owner[op] = f.name
            registered.add(op)
        # Kernel entry points: top-level definitions named <op>_cuda(.
        defined = set(re.findall(r"^[^\s#][^;{}]*?\b(\w+)_cuda\s*\(", text, re.M))
        assert defined == registered, (
            f"{f.name}: defines {sorted(defined)} but registers {sorted(registered)}")
    missing, unknown = schemas - owner.keys(), owner.keys() - schemas
    assert not missing, f"ops without a CUDA kernel in csrc/cuda: {sorted(missing)}"
    assert not unknown, f"CUDA kernels registered for ops with no schema: {sorted(unknown)}"


@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_file_avoids_heavy_headers(source: Path) -> None:
    includes = re.findall(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', source.read_text(), re.M)
    heavy = [h for h in includes if h in HEAVY_HEADERS]
    assert not heavy, f"{source.name} includes {heavy}: use the light headers (ATen/core/Tensor.h, ATen/ops/*.h)"
