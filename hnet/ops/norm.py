"""RMSNorm with the residual add fused in, and Mamba2's gated RMSNorm.

The residual stream is kept in fp32: ``rms_norm(x, w, residual=r, prenorm=True)`` returns
(norm(x + r) in x's dtype, x + r in fp32), the add-then-norm pattern of every pre-norm block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hnet.ops.backend import resolve


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    prenorm: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    if resolve("norm", x.device) == "triton":
        return _rms_norm_triton(x, weight, eps, residual, prenorm)
    summed = x.float() if residual is None else x.float() + residual.float()
    out = (summed * torch.rsqrt(summed.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
    return (out, summed) if prenorm else out


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """norm(x * silu(z)) * weight over the last dim (one group), in x's dtype."""
    if resolve("norm", x.device) == "triton":
        return _gated_rms_norm_triton(x, z, weight, eps)
    gated = x.float() * F.silu(z.float())
    return (gated * torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


# mamba_ssm's Triton norms are autograd.Functions that dynamo cannot trace: opaque when forced under compile.
@torch.compiler.disable
def _rms_norm_triton(x, weight, eps, residual, prenorm):
    from hnet.ops.tuned_launch import install_mamba_ssm
    from mamba_ssm.ops.triton.layer_norm import rms_norm_fn

    install_mamba_ssm()
    return rms_norm_fn(x, weight, None, residual=residual, eps=eps, prenorm=prenorm, residual_in_fp32=True)


@torch.compiler.disable
def _gated_rms_norm_triton(x, z, weight, eps):
    from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn

    return rmsnorm_fn(x, weight, None, z=z, eps=eps, group_size=None, norm_before_gate=False)
