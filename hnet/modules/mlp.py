"""SwiGLU MLP with the reference layout: fc1 holds [value; gate], fc2 projects back."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    def __init__(self, d: int, d_intermediate: int, device=None, dtype=None):
        super().__init__()
        self.fc1 = nn.Linear(d, 2 * d_intermediate, bias=False, device=device, dtype=dtype)
        self.fc2 = nn.Linear(d_intermediate, d, bias=False, device=device, dtype=dtype)

    def forward(self, x):
        value, gate = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(value * F.silu(gate))

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.fc1.weight, std=std)
        nn.init.normal_(self.fc2.weight, std=out_std)
