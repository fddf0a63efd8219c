"""Plain-PyTorch references of every lowbit op and algorithm: the specification.

Kernels (CPU and CUDA) are tested against these functions; integer codes and packed
words must match them bit for bit, and weight_only_matmul to within float32 rounding
(reference/matmul.py). They favour clarity over speed.
"""
from .awq import awq_clip_search, awq_scale_search
from .activation import activation_stats, quantize_per_tensor_int8, quantize_per_token_int8
from . import gptq
from .fp8 import dequantize_fp8, fp8_matmul, fp8_max, quantize_fp8, quantize_fp8_dynamic
from .matmul import int8_matmul, weight_only_matmul
from .mma import mma_codes, mma_matmul, pack_mma, param_order, unpack_mma
from .packing import pack_int32, packed_rows, unpack_int32
from .quant import dequantize, expand_groups, num_groups, quant_params, quantize

__all__ = [
    "quant_params", "quantize", "dequantize", "pack_int32", "unpack_int32",
    "quantize_fp8", "quantize_fp8_dynamic", "dequantize_fp8", "quantize_per_token_int8",
    "weight_only_matmul", "gptq", "num_groups", "expand_groups", "packed_rows", "fp8_max",
    "activation_stats", "quantize_per_tensor_int8", "int8_matmul", "fp8_matmul", "awq_scale_search",
    "awq_clip_search", "pack_mma", "unpack_mma", "mma_codes", "mma_matmul", "param_order",
]
