"""Causal multi-head attention over packed documents with partial rotary and an optional window."""

from __future__ import annotations

import torch
from torch import nn

from hnet.modules.packing import PackedSeq
from hnet.ops import packed_attention


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first 2 * cos.shape[-1] dims of x (T, H, Dh), halves not interleaved; fp32 math."""
    rot = 2 * cos.shape[-1]
    x1, x2, rest = x[..., : rot // 2].float(), x[..., rot // 2 : rot].float(), x[..., rot:]
    cos, sin = cos[:, None], sin[:, None]
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
    return torch.cat((rotated, rest), dim=-1)


class CausalMHA(nn.Module):
    def __init__(self, d: int, num_heads: int, rotary_dim: int, window: int, device=None, dtype=None):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, d // num_heads
        self.rotary_dim, self.window = rotary_dim, window
        self.Wqkv = nn.Linear(d, 3 * d, bias=False, device=device, dtype=dtype)
        self.out_proj = nn.Linear(d, d, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, seq: PackedSeq) -> torch.Tensor:
        q, k, v = self.Wqkv(x).view(-1, 3, self.num_heads, self.head_dim).unbind(1)
        if self.rotary_dim:
            cos, sin = seq.rotary(self.rotary_dim)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = packed_attention(q, k, v, seq.cu_seqlens, seq.max_seqlen, self.window)
        return self.out_proj(out.reshape(x.shape[0], -1))

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.Wqkv.weight, std=std)
        nn.init.normal_(self.out_proj.weight, std=out_std)
