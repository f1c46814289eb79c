"""The dechunk EMA, h[t] = (1 - p[t]) h[t-1] + p[t] x[t] restarting at each document, in Triton.

The reference runs it as a Mamba2 SSD scan with one state per channel (``hnet.ops.ssd.ema_scan``);
mamba_ssm's chunked kernels then spend a dozen launches and their host-side bookkeeping on a first-
order recurrence, and the GPU waits on that host work in the backward (docs/performance.md, change
31). Here one program walks a block of channels down the whole sequence, a block of positions per
step, with ``tl.associative_scan`` inside the block and the state carried in registers between them:
one launch forward, one backward, deterministic.

Layouts: x (n, d) in any float dtype with unit channel stride; p (n,) fp32; seq_idx (n,) int32. The
EMA comes out in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hnet.ops.backend import launch_device

# (BLOCK_T positions per step, BLOCK_C channels per program, warps), chosen on an H100 at 10,923
# positions x 1,536 channels (docs/performance.md, change 31).
CONFIG = (256, 8, 4)


@triton.jit
def _compose(a1, b1, a2, b2):
    """The map h -> a2 (a1 h + b1) + b2: (a1, b1) first."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _continues(seq_ptr, offs, n):
    """Whether each position in ``offs`` is in the document of the position before it (False past the end)."""
    seq = tl.load(seq_ptr + offs, mask=offs < n, other=-1)
    return seq == tl.load(seq_ptr + offs - 1, mask=(offs < n) & (offs > 0), other=-2)


@triton.jit
def _last_row(t, BLOCK_T: tl.constexpr):
    return tl.sum(tl.where((tl.arange(0, BLOCK_T) == BLOCK_T - 1)[:, None], t, 0.0), axis=0)


@triton.jit
def _ema_fwd_kernel(x_ptr, p_ptr, seq_ptr, h_ptr, n, d, s_x, s_h,
                    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    in_c = offs_c < d
    state = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t0 in range(0, n, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        in_t = offs_t < n
        p = tl.load(p_ptr + offs_t, mask=in_t, other=0.0)
        keep = tl.where(_continues(seq_ptr, offs_t, n), 1.0 - p, 0.0)  # nothing carried into a document's start
        mask = in_t[:, None] & in_c[None, :]
        x = tl.load(x_ptr + offs_t[:, None] * s_x + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
        a, b = tl.associative_scan((tl.broadcast_to(keep[:, None], [BLOCK_T, BLOCK_C]), p[:, None] * x), 0, _compose)
        h = a * state[None, :] + b
        tl.store(h_ptr + offs_t[:, None] * s_h + offs_c[None, :], h, mask=mask)
        state = _last_row(h, BLOCK_T)


@triton.jit
def _ema_bwd_kernel(x_ptr, p_ptr, seq_ptr, h_ptr, dh_ptr, dx_ptr, dp_ptr, n, d, s_x, s_h, s_dh, s_dx,
                    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """g[t] = dh[t] + (1 - p[t+1]) g[t+1] within a document, walked from the end, positions in reverse
    inside each block so that the scan runs forward; dx = p g and dp = g . (x - h[t-1])."""
    pid = tl.program_id(0)
    offs_c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    in_c = offs_c < d
    state = tl.zeros([BLOCK_C], dtype=tl.float32)
    blocks = tl.cdiv(n, BLOCK_T)
    for i in range(0, blocks):
        offs_t = (blocks - i) * BLOCK_T - 1 - tl.arange(0, BLOCK_T)  # descending
        in_t = offs_t < n
        p_next = tl.load(p_ptr + offs_t + 1, mask=offs_t + 1 < n, other=0.0)
        keep = tl.where(_continues(seq_ptr, offs_t + 1, n), 1.0 - p_next, 0.0)
        mask = in_t[:, None] & in_c[None, :]
        dh = tl.load(dh_ptr + offs_t[:, None] * s_dh + offs_c[None, :], mask=mask, other=0.0)
        a, b = tl.associative_scan((tl.broadcast_to(keep[:, None], [BLOCK_T, BLOCK_C]), dh), 0, _compose)
        g = a * state[None, :] + b
        state = _last_row(g, BLOCK_T)

        p = tl.load(p_ptr + offs_t, mask=in_t, other=0.0)
        x = tl.load(x_ptr + offs_t[:, None] * s_x + offs_c[None, :], mask=mask, other=0.0)
        h_prev = tl.load(h_ptr + (offs_t - 1)[:, None] * s_h + offs_c[None, :],
                         mask=mask & _continues(seq_ptr, offs_t, n)[:, None], other=0.0)
        tl.store(dx_ptr + offs_t[:, None] * s_dx + offs_c[None, :], (p[:, None] * g).to(dx_ptr.dtype.element_ty),
                 mask=mask)
        tl.store(dp_ptr + pid * n + offs_t, tl.sum(g * (x.to(tl.float32) - h_prev), axis=1), mask=in_t)


def _launch(kernel, x: torch.Tensor, *args) -> None:
    block_t, block_c, warps = CONFIG
    with launch_device(x):
        kernel[(triton.cdiv(x.shape[1], block_c),)](*args, BLOCK_T=block_t, BLOCK_C=block_c, num_warps=warps)


class EmaScan(torch.autograd.Function):
    """x (n, d), p (n,) fp32, seq_idx (n,) int32 -> the EMA (n, d) fp32; gradients for x and p."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: torch.Tensor, seq_idx: torch.Tensor) -> torch.Tensor:
        x = x if x.stride(1) == 1 else x.contiguous()
        n, d = x.shape
        h = torch.empty(n, d, device=x.device, dtype=torch.float32)
        _launch(_ema_fwd_kernel, x, x, p, seq_idx, h, n, d, x.stride(0), h.stride(0))
        ctx.save_for_backward(x, p, seq_idx, h)
        return h

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        x, p, seq_idx, h = ctx.saved_tensors
        dh = dh if dh.stride(1) == 1 else dh.contiguous()
        n, d = x.shape
        dx = torch.empty_like(x)
        dp = torch.empty(triton.cdiv(d, CONFIG[1]), n, device=x.device, dtype=torch.float32)  # per channel block
        _launch(_ema_bwd_kernel, x, x, p, seq_idx, h, dh, dx, dp, n, d, x.stride(0), h.stride(0), dh.stride(0),
                dx.stride(0))
        return dx, dp.sum(0), None
