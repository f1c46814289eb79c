"""RMSNorm modules (the math lives in hnet.ops.norm)."""

from __future__ import annotations

import torch
from torch import nn

from hnet.ops import gated_rms_norm, rms_norm


class RMSNorm(nn.Module):
    """RMSNorm that can add a residual first and hand the fp32 sum back (prenorm)."""

    def __init__(self, d: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))

    def forward(self, x, residual=None, prenorm: bool = False):
        return rms_norm(x, self.weight, self.eps, residual=residual, prenorm=prenorm)

    def init_weights(self) -> None:
        nn.init.ones_(self.weight)


class RMSNormGated(RMSNorm):
    """Mamba2's output norm: norm(x * silu(z)) * weight."""

    def forward(self, x, z):
        return gated_rms_norm(x, z, self.weight, self.eps)
