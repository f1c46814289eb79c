"""Mamba2 mixer with mamba_ssm's parameter names, document-aware over packed input.

in_proj produces [z, x, B, C, dt]; a causal depthwise conv runs over [x, B, C]; the SSD scan gives y;
out = out_proj(norm(y * silu(z))). On CUDA with mamba_ssm and causal_conv1d the chain from in_proj on
runs as one autograd function over mamba_ssm's kernels (hnet.ops.mamba_fused), replayed from CUDA
graphs at short lengths (hnet.ops.mamba_graphs); otherwise it is composed from hnet.ops.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from hnet.config import MAMBA_HEADDIM, MAMBA_NGROUPS
from hnet.modules.norm import RMSNormGated
from hnet.modules.packing import PackedSeq
from hnet.ops import causal_conv1d, mamba_fused, resolve, ssd_scan
from hnet.ops.mamba_graphs import LayerGraphs


class Mamba2(nn.Module):
    def __init__(self, d: int, d_state: int, d_conv: int, expand: int, chunk_size: int, device=None, dtype=None):
        super().__init__()
        self.d_inner = expand * d
        self.headdim, self.ngroups, self.d_state = MAMBA_HEADDIM, MAMBA_NGROUPS, d_state
        self.nheads = self.d_inner // self.headdim
        self.chunk_size = chunk_size
        self.conv_dim = self.d_inner + 2 * self.ngroups * d_state
        factory = {"device": device, "dtype": dtype}
        # Own parameters first, in mamba_ssm's order, so state-dict keys line up with the reference.
        self.dt_bias = nn.Parameter(torch.empty(self.nheads, **factory))
        self.A_log = nn.Parameter(torch.empty(self.nheads, **factory))
        self.D = nn.Parameter(torch.empty(self.nheads, device=device, dtype=torch.float32))
        self.in_proj = nn.Linear(d, self.d_inner + self.conv_dim + self.nheads, bias=False, **factory)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=d_conv - 1, **factory)
        self.norm = RMSNormGated(self.d_inner, eps=1e-5, **factory)
        self.out_proj = nn.Linear(self.d_inner, d, bias=False, **factory)
        chain = functools.partial(mamba_fused.chain, chunk_size=chunk_size, ngroups=self.ngroups,
                                  eps=self.norm.eps, norm_before_gate=False)
        self.graphs = LayerGraphs(chain, chunk_size)  # holds no parameters: state dicts and sharding ignore it

    def forward(self, u: torch.Tensor, seq: PackedSeq) -> torch.Tensor:
        if resolve("ssd", u.device) == "triton" and resolve("conv", u.device) == "cuda":
            return self._fused(u, seq.seq_idx)
        zxbcdt = self.in_proj(u)
        A = -torch.exp(self.A_log.float())
        conv_w = self.conv1d.weight.squeeze(1)
        z, xbc, dt = zxbcdt.split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        xbc = causal_conv1d(xbc, conv_w, self.conv1d.bias, seq.seq_idx)
        x, B, C = xbc.split([self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        T = u.shape[0]
        y = ssd_scan(
            x.view(T, self.nheads, self.headdim), dt, A,
            B.view(T, self.ngroups, self.d_state), C.view(T, self.ngroups, self.d_state),
            chunk_size=self.chunk_size, seq_idx=seq.seq_idx, D=self.D, dt_bias=self.dt_bias, dt_softplus=True,
        )
        return self.out_proj(self.norm(y.view(T, self.d_inner), z))

    @torch.compiler.disable  # mamba_ssm's kernels in an autograd.Function: opaque to dynamo, eager between graphs
    def _fused(self, u: torch.Tensor, seq_idx: torch.Tensor) -> torch.Tensor:
        """in_proj -> conv -> SSD -> gated norm -> out_proj as one autograd function (hnet.ops.mamba_fused),
        replayed from a CUDA graph at short lengths (hnet.ops.mamba_graphs)."""
        weights = (self.in_proj.weight, self.A_log, self.conv1d.weight, self.conv1d.bias, self.dt_bias, self.D,
                   self.norm.weight, self.out_proj.weight)
        return self.graphs(u, seq_idx, weights)

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float, dt_min=1e-3, dt_max=0.1, dt_floor=1e-4) -> None:
        """mamba_ssm's init: log-uniform dt (stored as softplus^-1 in dt_bias), A in [1, 16], D = 1."""
        nn.init.normal_(self.in_proj.weight, std=std)
        nn.init.normal_(self.out_proj.weight, std=out_std)
        self.conv1d.reset_parameters()
        self.norm.init_weights()
        dt = self.dt_bias
        dt.uniform_(0, 1).mul_(math.log(dt_max) - math.log(dt_min)).add_(math.log(dt_min)).exp_().clamp_(min=dt_floor)
        dt.add_(torch.log(-torch.expm1(-dt)))  # inverse softplus, in place so sharded tensors work
        self.A_log.uniform_(1, 16).log_()
        self.D.fill_(1.0)
