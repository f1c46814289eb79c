"""Causal depthwise convolution over packed documents (Mamba2's short conv).

out[t] = act(bias + sum_k w[k] * x[t - (W-1) + k]), where taps reaching into an earlier document
read zero: no conv window crosses a document start.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hnet.ops.backend import resolve


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, seq_idx: torch.Tensor, activation: str = "silu"
) -> torch.Tensor:
    """x (T, D), weight (D, W), bias (D,), seq_idx (T,) int32 -> (T, D) in x's dtype."""
    if resolve("conv", x.device) == "cuda":
        return _causal_conv1d_cuda(x, weight, bias, seq_idx, activation)
    return causal_conv1d_reference(x, weight, bias, seq_idx, activation)


@torch.compiler.disable  # an autograd.Function around a CUDA extension: opaque to dynamo
def _causal_conv1d_cuda(x, weight, bias, seq_idx, activation):
    from causal_conv1d import causal_conv1d_fn

    # (1, D, T) view of a (T, D) tensor is channel-last, the layout the kernel needs for seq_idx.
    return causal_conv1d_fn(x.t()[None], weight, bias, seq_idx=seq_idx[None], activation=activation)[0].t()


def causal_conv1d_reference(x, weight, bias, seq_idx, activation="silu"):
    width = weight.shape[1]
    xf, wf = x.float(), weight.float()
    out = xf * wf[:, -1]
    for shift in range(1, width):
        same_doc = torch.zeros_like(seq_idx, dtype=torch.bool)
        same_doc[shift:] = seq_idx[shift:] == seq_idx[:-shift]
        shifted = F.pad(xf[:-shift], (0, 0, shift, 0)) if shift < len(x) else torch.zeros_like(xf)
        out = out + shifted * same_doc[:, None] * wf[:, width - 1 - shift]
    if bias is not None:
        out = out + bias.float()
    if activation == "silu":
        out = F.silu(out)
    return out.to(x.dtype)
