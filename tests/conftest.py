"""Shared test fixtures: devices present, fresh seeds, error metrics."""
from __future__ import annotations

import os
import random

import pytest
import torch

import lowbit  # noqa: F401  (registers torch.ops.lowbit)

from _helpers import DEVICES


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Every device present: CPU always, CUDA when there is one."""
    return request.param


@pytest.fixture(params=DEVICES + ["meta"])
def check_device(request) -> str:
    """Devices whose argument checks are tested: the real ones and meta (fake kernels)."""
    return request.param


@pytest.fixture(autouse=True)
def fresh_seed():
    """A new seed per test (inputs are random every run), printed so a failure can be
    replayed with LOWBIT_TEST_SEED=<seed>."""
    seed = int(os.environ.get("LOWBIT_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(seed)
    print(f"LOWBIT_TEST_SEED={seed}")
    yield seed


