// The one TORCH_LIBRARY(lowbit, m): every schema of the extension, in one place.
// Kernels register themselves per device at the end of csrc/cpu/*.cpp and
// csrc/cuda/*.cu; fake (meta) kernels and typed wrappers live in python/lowbit/ops.py,
// in this order. Semantics of each op: python/lowbit/reference/.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(lowbit, m) {
  // Integer grids (reference/quant.py). scales float32 [N, G], zeros int32 [N, G],
  // codes uint8 [N, K], G = ceil(K / group_size).
  m.def("quant_params(Tensor w, int bits, int group_size, bool symmetric, float clip_ratio=1.0) -> (Tensor, Tensor)");
  m.def("quantize(Tensor w, Tensor scales, Tensor zeros, int bits, int group_size) -> Tensor");
  m.def("dequantize(Tensor codes, Tensor scales, Tensor zeros, int group_size, ScalarType dtype) -> Tensor");
  // Bit packing into int32 words, the GPTQ layout (reference/packing.py).
  m.def("pack_int32(Tensor codes, int bits) -> Tensor");
  m.def("unpack_int32(Tensor packed, int bits, SymInt rows) -> Tensor");
  // FP8 e4m3fn / e5m2 with per-tensor or per-row scales (reference/fp8.py).
  m.def("quantize_fp8(Tensor x, Tensor scale, ScalarType dtype) -> Tensor");
  m.def("quantize_fp8_dynamic(Tensor x, ScalarType dtype, bool per_row) -> (Tensor, Tensor)");
  m.def("dequantize_fp8(Tensor q, Tensor scale, ScalarType dtype) -> Tensor");
  // Dynamic per-token int8 activations (reference/activation.py).
  m.def("quantize_per_token_int8(Tensor x) -> (Tensor, Tensor)");
  // Weight-only quantized linear y = x @ W^T + bias, W dequantized from a GPTQ qweight
  // (reference/matmul.py). x float [..., K], qweight int32 [K * bits / 32, N], scales
  // float [N, G], zeros int32 or uint8 [N, G], bias float [N]; y x.dtype [..., N].
  m.def("weight_only_matmul(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int bits, int group_size, Tensor? bias=None) -> Tensor");
  // GPTQ (reference/gptq.py). hessian float32/float64 [K, K], the mean 2 x x^T over the
  // num_seen rows so far, updated in place with x [..., K]. gptq_solve: w [N, K], returns
  // codes uint8 [N, K], scales float32 [N, G], zeros int32 [N, G], g_idx int32 [K] and the
  // loss (float64, 0-d).
  m.def("accumulate_hessian(Tensor(a!) hessian, Tensor x, int num_seen) -> ()");
  m.def("gptq_solve(Tensor w, Tensor hessian, int bits, int group_size, bool symmetric, float damp, bool act_order, bool static_groups, int block_size, float clip_ratio, ScalarType scale_dtype) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Calibration statistics of a linear layer's input x [..., K] (reference/activation.py):
  // absmax float32 [K] <- max(absmax, max |x|), abssum float64 [K] += sum |x| over rows.
  m.def("activation_stats(Tensor(a!) absmax, Tensor(b!) abssum, Tensor x) -> ()");
  // AWQ (reference/awq.py). w float32 [N, K] (the linears that share an input, stacked),
  // gram float32 [K, K] (X^T X / n of that input). scale search: losses float64 [n_grid],
  // the best per-input-channel scales float32 [K]. clip search: scales float32 [N, G],
  // zeros int32 [N, G], clip ratios float32 [N, G].
  m.def("awq_scale_search(Tensor w, Tensor gram, Tensor act_mean, int bits, int group_size, bool symmetric, int n_grid, ScalarType scale_dtype, float max_value) -> (Tensor, Tensor)");
  m.def("awq_clip_search(Tensor w, Tensor gram, int bits, int group_size, bool symmetric, int n_grid, float max_shrink, ScalarType scale_dtype) -> (Tensor, Tensor, Tensor)");
  // W8A8 (reference/activation.py, reference/matmul.py, reference/fp8.py). Static int8
  // activations: x float [..., K] with one float32 scale -> int8 [..., K].
  // int8_matmul: x int8 [..., K], x_scale float32 per row ([..., 1] or [M]) or one value,
  // w int8 [N, K], w_scale float32 [N] or one value, bias float [N];
  // y = float(x w^T) * x_scale * w_scale + bias as out_dtype [..., N].
  // fp8_matmul: the same with float8_e4m3fn x and w (float32 accumulation).
  m.def("quantize_per_tensor_int8(Tensor x, Tensor scale) -> Tensor");
  m.def("int8_matmul(Tensor x, Tensor x_scale, Tensor w, Tensor w_scale, Tensor? bias, ScalarType out_dtype) -> Tensor");
  m.def("fp8_matmul(Tensor x, Tensor x_scale, Tensor w, Tensor w_scale, Tensor? bias, ScalarType out_dtype) -> Tensor");
  // Tensor-core weight-only matmul (reference/mma.py). pack_mma re-lays a GPTQ qweight
  // int32 [K * bits / 32, N] (bits 4 or 8, K % 16 == 0, N % 64 == 0) with its scales
  // float [G, N] and zeros int32/uint8 [G, N] into the mma layout: packed int32
  // [K / 16, N * bits / 2], scales [G, N] (same dtype) and zeros uint8 [G, N], columns
  // permuted within each 64. mma_matmul: y = x @ W^T + bias from that layout, x float
  // [..., K]; max_mma_rows picks the path (-1: measured default, 0: dequantize + GEMM).
  m.def("pack_mma(Tensor qweight, Tensor scales, Tensor zeros, int bits, int group_size) -> (Tensor, Tensor, Tensor)");
  m.def("mma_matmul(Tensor x, Tensor packed, Tensor scales, Tensor zeros, int bits, int group_size, Tensor? bias=None, int max_mma_rows=-1) -> Tensor");
}

// A plain extension module: importing lowbit._C runs the static registrations above
// and in the kernel files. No pybind11: nothing else crosses into Python.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
