"""One mma_matmul kernel call per (M, dtype) on a Llama-2-7B gate/up shape, for
`ncu --kernel-name regex:mma_kernel` (scripts/device_check.sh's ncu stage)."""
import torch

from lowbit import ops

n, k = 11008, 4096
qweight = torch.randint(-2**31, 2**31 - 1, (k // 8, n), dtype=torch.int32, device="cuda")
scales = (torch.rand(k // 128, n, device="cuda") * 0.01 + 1e-3).half()
zeros = torch.full((k // 128, n), 8, dtype=torch.uint8, device="cuda")
packed = ops.pack_mma(qweight, scales, zeros, 4, 128)
for m in (1, 16):
    x = torch.randn(m, k, device="cuda").half()
    ops.mma_matmul(x, *packed, 4, 128, None, 1 << 30)
torch.cuda.synchronize()
