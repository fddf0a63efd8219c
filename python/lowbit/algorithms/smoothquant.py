"""SmoothQuant (Xiao et al., 2022, arXiv:2211.10438): migrate activation outliers into
the weights before W8A8.

Per group of linears that read one input, ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``
(eq. 4; ``max|W_j|`` over the group's weights' input column ``j``) divides the input's
channel ``j`` (folded into the producing norm or linear) and multiplies the weights'
column ``j``: the product is unchanged and the activations' per-channel ranges flatten,
so per-token int8 loses less. The block-by-block pipeline is
:func:`lowbit.calibration.scale_model`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SmoothQuant", "smooth_scales"]


@dataclass(frozen=True)
class SmoothQuant:
    """SmoothQuant options: pass ``method=SmoothQuant(...)`` to :func:`lowbit.quantize`
    (``"smoothquant"`` is ``SmoothQuant()``), with a W8A8 or FP8 scheme.

    Attributes:
        alpha: migration strength in [0, 1] (0.5 in the paper; larger moves more of the
            activations' range into the weights).
        groups: scaling groups relative to a block, overriding the architecture's
            (:func:`lowbit.architectures.scale_groups`).
    """

    alpha: float = 0.5
    groups: tuple | None = None

    name = "smoothquant"

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"SmoothQuant: alpha must be in [0, 1], got {self.alpha}")


def smooth_scales(act_absmax: Tensor, w_absmax: Tensor, alpha: float) -> Tensor:
    """``s = act_absmax^alpha / w_absmax^(1 - alpha)`` float32 ``[K]`` (eq. 4).

    Channels that never fired (``act_absmax == 0``) or whose weights are all zero get
    ``s = 1``; the rest are clamped to ``[1e-5, 1e5]`` so that neither side of the fold
    leaves float16's range.
    """
    a = act_absmax.float()
    w = w_absmax.float()
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    ok = (a > 0) & (w > 0) & torch.isfinite(s)
    return torch.where(ok, s.clamp(1e-5, 1e5), torch.ones_like(s))
