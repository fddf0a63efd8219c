"""lowbit: post-training quantization of large language models in PyTorch.

Importing lowbit registers its kernels as torch custom ops under ``torch.ops.lowbit``;
``lowbit.ops`` holds their typed Python wrappers and ``lowbit.reference`` the
plain-PyTorch specification each kernel is tested against.
"""
from __future__ import annotations

import logging

import torch  # noqa: F401  (loads libtorch before the extension)

from ._loader import load_extension

build_info = load_extension()

from . import data, eval, ops, reference  # noqa: E402,A004  (lowbit.eval.perplexity)
from . import models, nn  # noqa: E402  (lowbit.nn.QuantLinear; models loads transformers lazily)
from .algorithms.awq import AWQ  # noqa: E402
from .algorithms.gptq import GPTQ  # noqa: E402
from .algorithms.smoothquant import SmoothQuant  # noqa: E402
from .algorithms.rtn import QuantizedWeight, rtn_quantize  # noqa: E402
from .api import QuantReport, model_bytes, quantize  # noqa: E402
from .config import PRESETS, QuantConfig, QuantScheme  # noqa: E402
from . import checkpoint, formats  # noqa: E402
from .checkpoint import load_quantized, save_quantized  # noqa: E402
from . import hf as _hf  # noqa: E402

_hf.install()   # transformers' from_pretrained / save_pretrained of lowbit checkpoints (imports nothing)

__version__ = "0.1.0"
__all__ = [
    "quantize", "GPTQ", "AWQ", "SmoothQuant", "QuantConfig", "QuantScheme", "PRESETS", "QuantReport", "model_bytes", "nn", "models",
    "ops", "reference", "data", "eval", "rtn_quantize", "QuantizedWeight", "build_info", "__version__",
    "save_quantized", "load_quantized", "checkpoint", "formats",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
