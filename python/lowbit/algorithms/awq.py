"""AWQ: activation-aware weight quantization (Lin et al., 2023, arXiv:2306.00978).

Per group of linears that read one input (:class:`lowbit.architectures.ScaleGroup`),
the input channels that carry large activations are protected by scaling them up in the
weight before rounding, and down in the input (folded into the producing norm or linear,
so the model's function is unchanged): ``s = mean|x|^alpha``, alpha searched on a grid to
minimise the group's output error (sec. 3.2). Then each layer's group ranges are shrunk
where clipping lowers the output error (the authors' ``auto_clip``). Both searches are one
op each, :func:`lowbit.ops.awq_scale_search` and :func:`lowbit.ops.awq_clip_search`
(specification: :mod:`lowbit.reference.awq`), working on the Gram matrix ``X^T X / n`` of
the calibration inputs: every candidate costs one GEMM against ``[K, K]``, not a forward
over all calibration tokens.

The block-by-block pipeline is :func:`lowbit.calibration.scale_model`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import ops
from ..config import QuantScheme
from .gptq import GPTQ

__all__ = ["AWQ", "awq_scales", "awq_clip"]


@dataclass(frozen=True)
class AWQ:
    """AWQ options: pass ``method=AWQ(...)`` to :func:`lowbit.quantize` (``"awq"`` is
    ``AWQ()``). Weight-only schemes (W4A16, W3A16...).

    Attributes:
        n_grid: alphas tried, ``i / n_grid`` for ``i < n_grid`` (20 in the paper's code).
        clip: run the clip search after scaling.
        clip_grid: clip ratio step ``1 / clip_grid``.
        max_shrink: the smallest ratio tried is ``1 - max_shrink`` (0.5: down to 0.55).
        clip_skip: regexes of layers left out of the clip search: the query and key
            projections, whose errors the attention scores amplify (as the authors' code).
        gptq: run GPTQ (with these options) on the scaled weights instead of RTN + clip
            ("AWQ then GPTQ").
        groups: scaling groups relative to a block, overriding the architecture's
            (:func:`lowbit.architectures.scale_groups`); ``[]`` scales nothing.
    """

    n_grid: int = 20
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    clip_skip: tuple[str, ...] = (r"q_proj$", r"k_proj$", r"\.query$", r"\.key$", r"q_lin$", r"k_lin$")
    gptq: GPTQ | None = None
    groups: tuple | None = None

    name = "awq"

    def __post_init__(self):
        if self.n_grid < 1 or self.clip_grid < 1:
            raise ValueError(f"AWQ: n_grid and clip_grid must be >= 1, got {self.n_grid}, {self.clip_grid}")
        if not 0 <= self.max_shrink < 1:
            raise ValueError(f"AWQ: max_shrink must be in [0, 1), got {self.max_shrink}")
        if self.gptq is not None and not isinstance(self.gptq, GPTQ):
            raise TypeError(f"AWQ: gptq must be a lowbit.GPTQ or None, got {type(self.gptq).__name__}")

    def clips(self, name: str) -> bool:
        """Whether the layer ``name`` gets the clip search."""
        return self.clip and self.gptq is None and not any(re.search(p, name) for p in self.clip_skip)


def awq_scales(w: Tensor, gram: Tensor, act_mean: Tensor, scheme: QuantScheme, options: AWQ,
               max_value: float) -> tuple[Tensor, Tensor]:
    """The best AWQ scales of one group: ``s`` float32 ``[K]`` and the candidates' losses
    float64 ``[n_grid]``.

    Args:
        w: float ``[N, K]``, the group's weights stacked. gram: ``[K, K]``, any positive
            multiple of ``X^T X / n``. act_mean: float ``[K]``, mean ``|x|``.
        max_value: the model dtype's largest value (the folded weights must fit it).
    """
    k = w.shape[1]
    losses, s = ops.awq_scale_search(w.float().contiguous(), gram.float().contiguous(),
                                     act_mean.float().contiguous(), scheme.bits, scheme.group_size or k,
                                     scheme.symmetric, options.n_grid, scheme.scale_dtype, max_value)
    return s, losses


def awq_clip(w: Tensor, gram: Tensor, scheme: QuantScheme, options: AWQ,
             name: str = "layer") -> tuple[Tensor, Tensor, Tensor]:
    """AWQ's clip search on one (already scaled) layer: float32 scales ``[N, G]`` (in the
    scheme's scale dtype), int32 zeros ``[N, G]`` and uint8 codes ``[N, K]``.

    Raises:
        ValueError: naming ``name``, when a group's scale overflows the scale dtype at
            every ratio.
    """
    k = w.shape[1]
    gs = scheme.group_size or k
    wf = w.float().contiguous()
    scales, zeros, _ = ops.awq_clip_search(wf, gram.float().contiguous(), scheme.bits, gs, scheme.symmetric,
                                           options.clip_grid, options.max_shrink, scheme.scale_dtype)
    if not torch.isfinite(scales).all():
        raise ValueError(f"lowbit AWQ: layer '{name}': a group's scale overflows {scheme.scale_dtype} (its scaled "
                         "weights are too large); use scale_dtype=torch.float32 for this layer")
    codes = ops.quantize(wf, scales, zeros, scheme.bits, gs)
    return scales, zeros, codes
