"""Causal attention over packed documents, optionally with a sliding window.

A query at position i of a document attends to keys j of the same document with
i - window <= j <= i (window -1: all j <= i). q, k, v are (T, H, Dh); documents are given by
``cu_seqlens`` (int32, (num_docs + 1,)).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from hnet.ops.backend import resolve

# Reference path: documents are grouped into blocks of about this many positions, each block one
# masked SDPA call, so cost stays near T * block instead of T^2 while the Python loop stays short.
_REFERENCE_BLOCK = 2048


def packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    window: int = -1,
    scale: float | None = None,
) -> torch.Tensor:
    backend = resolve("attention", q.device, q.dtype)
    if backend in ("varlen", "flash_attn_4"):
        return _varlen(q, k, v, cu_seqlens, max_seqlen, window, scale, fa4_backward=backend == "flash_attn_4")
    if backend == "flash_attn":
        return _flash_attn(q, k, v, cu_seqlens, max_seqlen, window, scale)
    if backend == "flex":
        return _flex(q, k, v, cu_seqlens, window, scale)
    return packed_attention_reference(q, k, v, cu_seqlens, window, scale)


@torch.compiler.disable  # flash_attn's own op registration differs between releases: keep it opaque
def _flash_attn(q, k, v, cu_seqlens, max_seqlen, window, scale):
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
        softmax_scale=scale, causal=True, window_size=(window, -1),
    )


# FlashAttention-4 (flash-attn-4's CuTe kernels, ``flash_attn.cute``) runs the backward only; the forward stays
# FlashAttention-2's aten op. With FA4 both ways (change 42, H100) hnet_1stage_L's main network took 29.0 ms
# forward against FA2's 29.6 and 55.8 ms backward against 62.4: the gain is the backward's. hnet_2stage_L's
# forward, which runs at the host's pace after chunk()'s sync, took 29.6 ms against 23.9: the package's Python
# launch path adds about 0.13 ms of host per call over the aten op's C++ launch (change 44).
# Both forwards leave the softmax statistics as lse (H, T) fp32, which FA4's backward reads. A custom op:
# compiled blocks call it in place, where dynamo could not trace the package's launch path.

@torch.library.custom_op("hnet::fa4_varlen_bwd", mutates_args=())
def _fa4_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, window: int,
             scale: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from flash_attn.cute.interface import _flash_attn_bwd

    dq, dk, dv = _flash_attn_bwd(
        q, k, v, out, dout, lse, softmax_scale=scale, causal=True,
        window_size_left=window if window >= 0 else None,  # the package reads -1 as a window
        cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen,
        deterministic=torch.are_deterministic_algorithms_enabled(),
    )[:3]
    return dq, dk, dv


@_fa4_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, window, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


try:  # since torch 2.9; with a sliding window (and the aten ops' window arguments) since 2.10
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None
_VARLEN_HAS_WINDOW = varlen_attn is not None and "window_size" in inspect.signature(varlen_attn).parameters


class _FlashVarlen(torch.autograd.Function):
    """What ``varlen_attn`` runs (FlashAttention-2 over packed documents), calling the aten ops directly.

    ``varlen_attn`` wraps them in two Python custom ops, whose dispatch and bookkeeping (and an extra
    kernel per call for an rng state that dropout 0 never reads) cost the host about as much as the
    attention's launch itself, inside main-network blocks that run at the host's pace after
    ``chunk()``'s sync (docs/performance.md, change 36). Dynamo traces this function, so compiled
    blocks call the aten ops as Inductor fallbacks. Causal through the window's right edge 0, as
    ``varlen_attn(window_size=(window, 0))``. With ``fa4_backward`` the backward is FlashAttention-4's.
    """

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen: int, window: int, scale: float | None, fa4_backward: bool):
        out, lse, seed, offset = _flash2_forward(q, k, v, cu_seqlens, max_seqlen, window, scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, seed, offset)
        ctx.max_seqlen, ctx.window, ctx.scale, ctx.fa4_backward = max_seqlen, window, scale, fa4_backward
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu_seqlens, seed, offset = ctx.saved_tensors
        dout = dout.contiguous()
        if ctx.fa4_backward:
            dq, dk, dv = _fa4_bwd(dout, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.window, ctx.scale)
        else:
            dq, dk, dv = torch.ops.aten._flash_attention_backward(
                dout, q, k, v, out, lse, cu_seqlens, cu_seqlens, ctx.max_seqlen, ctx.max_seqlen, 0.0, False,
                seed, offset, scale=ctx.scale, window_size_left=ctx.window, window_size_right=0,
            )
        return dq, dk, dv, None, None, None, None, None


def _flash2_forward(q, k, v, cu_seqlens, max_seqlen, window, scale):
    """FlashAttention-2's forward: out (T, H, Dh), lse (H, T) fp32, and the rng state its backward takes."""
    out, lse, seed, offset, _ = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, 0.0, False, False,
        scale=scale, window_size_left=window, window_size_right=0,
    )
    return out, lse, seed, offset


def _varlen(q, k, v, cu_seqlens, max_seqlen, window, scale, fa4_backward=False):
    """FlashAttention-2 through the aten ops, the backward FlashAttention-4's where asked. Before torch 2.10
    (no window in the aten ops) ``varlen_attn`` or the reference run, FlashAttention-2 both ways."""
    if _VARLEN_HAS_WINDOW:
        return _FlashVarlen.apply(q, k, v, cu_seqlens, max_seqlen, window, scale, fa4_backward)
    if window >= 0:  # older torch: varlen_attn has no window; fall back to the exact masked path
        return packed_attention_reference(q, k, v, cu_seqlens, window, scale)
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, is_causal=True, scale=scale)


def document_mask(doc_ids: torch.Tensor, window: int) -> torch.Tensor:
    """(L, L) bool: same document, causal, within the window."""
    pos = torch.arange(len(doc_ids), device=doc_ids.device)
    diff = pos[:, None] - pos[None, :]
    mask = (doc_ids[:, None] == doc_ids[None, :]) & (diff >= 0)
    return mask & (diff <= window) if window >= 0 else mask


def _document_blocks(bounds: list[int], block: int) -> list[tuple[int, int]]:
    """Consecutive document index ranges [i, j) spanning at most ``block`` positions (or one longer document)."""
    groups, i, n = [], 0, len(bounds) - 1
    while i < n:
        j = i + 1
        while j < n and bounds[j + 1] - bounds[i] <= block:
            j += 1
        groups.append((i, j))
        i = j
    return groups


# Eager even inside compiled blocks: its Python control flow follows the data (host syncs, loops
# over chunks or documents), so a compiled version would recompile for every new layout.
@torch.compiler.disable
def packed_attention_reference(q, k, v, cu_seqlens, window=-1, scale=None):
    """Masked SDPA over blocks of whole documents (see _REFERENCE_BLOCK)."""
    bounds = cu_seqlens.tolist()
    lengths = torch.diff(cu_seqlens)
    outs = []
    for i, j in _document_blocks(bounds, _REFERENCE_BLOCK):
        doc_ids = torch.repeat_interleave(torch.arange(j - i, device=q.device), lengths[i:j])
        qs, ks, vs = (t[bounds[i]:bounds[j]].transpose(0, 1) for t in (q, k, v))  # (H, L, Dh)
        mask = document_mask(doc_ids, window)
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale).transpose(0, 1))
    return torch.cat(outs)


def _flex(q, k, v, cu_seqlens, window, scale):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    T = q.shape[0]
    doc_ids = torch.searchsorted(cu_seqlens[1:], torch.arange(T, device=q.device), right=True)

    def mask_mod(b, h, qi, ki):
        ok = (doc_ids[qi] == doc_ids[ki]) & (qi >= ki)
        return ok & (qi - ki <= window) if window >= 0 else ok

    block_mask = create_block_mask(mask_mod, None, None, T, T, device=q.device)
    out = flex_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), block_mask=block_mask, scale=scale)
    return out[0].transpose(0, 1)
