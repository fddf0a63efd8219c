"""Loads the compiled extension ``lowbit._C`` and checks it matches this process."""
from __future__ import annotations

import importlib

import torch


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def load_extension():
    """Import ``lowbit._C`` (registering ``torch.ops.lowbit``); return the build info module."""
    try:
        build_info = importlib.import_module("lowbit._build_info")
        importlib.import_module("lowbit._C")
    except ImportError as e:
        raise ImportError(
            "lowbit's compiled extension (lowbit._C) is missing or does not load: "
            f"{e}. Build it against the installed torch with "
            "'pip install --no-build-isolation -e .' from the lowbit checkout "
            "(or run scripts/setup.sh)."
        ) from e
    built = build_info.TORCH_VERSION.split("+")[0]
    running = torch.__version__.split("+")[0]
    if built.split(".")[:2] != running.split(".")[:2]:
        raise ImportError(
            f"lowbit was built against torch {build_info.TORCH_VERSION} but torch "
            f"{torch.__version__} is installed; the C++ ABI differs between releases. Rebuild: "
            "'pip install --no-build-isolation --force-reinstall --no-deps .'"
        )
    if build_info.CPU_ISA == "avx2":
        flags = _cpu_flags()
        if flags and not {"avx2", "fma", "f16c"} <= flags:
            raise ImportError(
                "lowbit was built with AVX2/FMA/F16C CPU kernels but this CPU lacks them; "
                "rebuild with LOWBIT_CPU_ARCH=generic."
            )
    return build_info
