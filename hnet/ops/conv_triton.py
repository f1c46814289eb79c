"""SiLU(causal depthwise conv, width 4) over packed documents, forward and backward, in Triton.

Backward: causal_conv1d's channel-last backward runs at a third of an H100's memory bandwidth with 12%
occupancy (docs/performance.md, change 22). Here each program owns a block of channels and a run of rows
and walks the rows in order, keeping the last three inputs and pre-activation gradients in registers:
every row's gradient is computed once (plus three rows of overlap with the next run) and feeds the four
input rows it came from; each row is loaded one row ahead of its use (change 44). Weight and bias
gradients are reduced per program, then summed: deterministic.

Forward: one program per tile of rows and channels reads its rows and the three before them (four
shifted loads, three of them cache hits), so the input is read from memory about once and the output
written once (docs/performance.md, change 34).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hnet.ops.backend import launch_device

WIDTH = 4  # Mamba2's d_conv in every released H-Net
# Chosen on an H100 at 65,536 rows x 2,304 channels (docs/performance.md, changes 26, 34 and 44).
ROWS, BLOCK_C, WARPS, STAGES = 64, 128, 1, 1
FWD_CONFIG = (32, 128, 4)  # rows, channels, warps per forward program


@triton.jit
def _conv_silu_fwd_kernel(
    x_ptr, w_ptr, b_ptr, seq_ptr, out_ptr, T, C, stride_x, stride_w, stride_out,
    HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, WIDTH: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask, cmask = rows < T, cols < C
    doc = tl.load(seq_ptr + rows, mask=rmask, other=-1)
    pre = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    if HAS_BIAS:
        pre += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    for j in tl.static_range(WIDTH):  # tap j reads row t - (WIDTH - 1 - j), zero from an earlier document
        src = rows - (WIDTH - 1 - j)
        same = rmask & (src >= 0) & (tl.load(seq_ptr + src, mask=rmask & (src >= 0), other=-2) == doc)
        x = tl.load(x_ptr + src[:, None] * stride_x + cols[None, :], mask=same[:, None] & cmask[None, :], other=0.0)
        w = tl.load(w_ptr + cols * stride_w + j, mask=cmask, other=0.0).to(tl.float32)
        pre += x.to(tl.float32) * w[None, :]
    out = pre / (1.0 + tl.exp(-pre))
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], out.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _load_row(x_ptr, dy_ptr, seq_ptr, s, T, cols, cmask, stride_x, stride_dy):
    """Row s's input, output gradient (both as stored) and document id; zeros and -1 past the end."""
    inside = s < T
    return (tl.load(x_ptr + s * stride_x + cols, mask=cmask & inside, other=0.0),
            tl.load(dy_ptr + s * stride_dy + cols, mask=cmask & inside, other=0.0),
            tl.load(seq_ptr + s, mask=inside, other=-1))


@triton.jit
def _row(xd, dy, sd, w0, w1, w2, w3, bias, xa, xb, xc, sa, sb, sc):
    """Row s of the walk (its ``_load_row``), given rows s-3 .. s-1: its input in fp32, document id, the
    validity of its taps into rows s-3 .. s-1, and its pre-activation gradient (zero past the end)."""
    xd = xd.to(tl.float32)
    # Taps reaching into an earlier document read zero.
    va, vb, vc = (sa == sd).to(tl.float32), (sb == sd).to(tl.float32), (sc == sd).to(tl.float32)
    pre = bias + w3 * xd + w2 * xc * vc + w1 * xb * vb + w0 * xa * va
    sig = 1.0 / (1.0 + tl.exp(-pre))
    return xd, sd, dy.to(tl.float32) * sig * (1.0 + pre * (1.0 - sig)), va, vb, vc


@triton.jit
def _sums(dw0, dw1, dw2, dw3, db, g, xa, xb, xc, xd, va, vb, vc):
    """Add row s's share (pre-activation gradient g) to the weight and bias gradients."""
    return dw0 + g * xa * va, dw1 + g * xb * vb, dw2 + g * xc * vc, dw3 + g * xd, db + g


@triton.jit
def _conv_silu_bwd_kernel(
    x_ptr, w_ptr, b_ptr, dy_ptr, seq_ptr, dx_ptr, dw_ptr, db_ptr,
    T, C, stride_x, stride_w, stride_dy, stride_dx,
    HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr, WIDTH: tl.constexpr,
):
    pid_t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    w0 = tl.load(w_ptr + cols * stride_w + 0, mask=cmask, other=0.0).to(tl.float32)
    w1 = tl.load(w_ptr + cols * stride_w + 1, mask=cmask, other=0.0).to(tl.float32)
    w2 = tl.load(w_ptr + cols * stride_w + 2, mask=cmask, other=0.0).to(tl.float32)
    w3 = tl.load(w_ptr + cols * stride_w + 3, mask=cmask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros([BLOCK_C], dtype=tl.float32)
    t0 = pid_t * ROWS
    # The window: rows s-3, s-2, s-1 of the walk (inputs, document ids, then gradients). Before the run:
    sa = tl.load(seq_ptr + t0 - 3, mask=t0 >= 3, other=-1)
    sb = tl.load(seq_ptr + t0 - 2, mask=t0 >= 2, other=-1)
    sc = tl.load(seq_ptr + t0 - 1, mask=t0 >= 1, other=-1)
    xa = tl.load(x_ptr + (t0 - 3) * stride_x + cols, mask=cmask & (t0 >= 3), other=0.0).to(tl.float32)
    xb = tl.load(x_ptr + (t0 - 2) * stride_x + cols, mask=cmask & (t0 >= 2), other=0.0).to(tl.float32)
    xc = tl.load(x_ptr + (t0 - 1) * stride_x + cols, mask=cmask & (t0 >= 1), other=0.0).to(tl.float32)
    zero = tl.zeros([BLOCK_C], dtype=tl.float32)
    ga, gb, gc = zero, zero, zero
    dw0, dw1, dw2, dw3, db = zero, zero, zero, zero, zero
    # The run's first three rows: no input row has all four of its gradients yet. Unrolled: with these rows
    # inside the loop below (stores masked) the GPU build wrote wrong input gradients while Triton's
    # interpreter was right (Triton 3.6, H100; the zero-started window carried by the loop is the suspect).
    for i in tl.static_range(3):
        xd, dy, sd = _load_row(x_ptr, dy_ptr, seq_ptr, t0 + i, T, cols, cmask, stride_x, stride_dy)
        xd, sd, gd, va, vb, vc = _row(xd, dy, sd, w0, w1, w2, w3, bias, xa, xb, xc, sa, sb, sc)
        dw0, dw1, dw2, dw3, db = _sums(dw0, dw1, dw2, dw3, db, gd, xa, xb, xc, xd, va, vb, vc)
        xa, xb, xc, sa, sb, sc, ga, gb, gc = xb, xc, xd, sb, sc, sd, gb, gc, gd
    # Each row's loads are issued one row ahead, so they wait on memory while the row before is computed.
    nx, ndy, nsd = _load_row(x_ptr, dy_ptr, seq_ptr, t0 + 3, T, cols, cmask, stride_x, stride_dy)
    for i in range(3, ROWS + 3):
        s = t0 + i
        xd, dy, sd = nx, ndy, nsd
        nx, ndy, nsd = _load_row(x_ptr, dy_ptr, seq_ptr, s + 1, T, cols, cmask, stride_x, stride_dy)
        xd, sd, gd, va, vb, vc = _row(xd, dy, sd, w0, w1, w2, w3, bias, xa, xb, xc, sa, sb, sc)
        own = (tl.full([BLOCK_C], i, tl.int32) < ROWS).to(tl.float32)  # overlap rows: the next program's sums
        dw0, dw1, dw2, dw3, db = _sums(dw0, dw1, dw2, dw3, db, own * gd, xa, xb, xc, xd, va, vb, vc)
        # Row s-3 now has the four gradients it feeds: rows s-3 .. s, where still in its document.
        dx = w3 * ga + w2 * gb * (sb == sa).to(tl.float32) + w1 * gc * (sc == sa).to(tl.float32) \
            + w0 * gd * (sd == sa).to(tl.float32)
        tl.store(dx_ptr + (s - 3) * stride_dx + cols, dx.to(dx_ptr.dtype.element_ty), mask=cmask & (s - 3 < T))
        xa, xb, xc, sa, sb, sc, ga, gb, gc = xb, xc, xd, sb, sc, sd, gb, gc, gd
    base = dw_ptr + pid_t * WIDTH * C + cols
    tl.store(base, dw0, mask=cmask)
    tl.store(base + C, dw1, mask=cmask)
    tl.store(base + 2 * C, dw2, mask=cmask)
    tl.store(base + 3 * C, dw3, mask=cmask)
    tl.store(db_ptr + pid_t * C + cols, db, mask=cmask)


def causal_conv1d_silu_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           seq_idx: torch.Tensor) -> torch.Tensor:
    """x (T, C) with unit channel stride (any row stride), weight (C, 4), seq_idx (T,) int32 -> SiLU(conv(x)),
    (T, C) contiguous in x's dtype."""
    T, C = x.shape
    assert weight.shape == (C, WIDTH) and x.stride(1) == weight.stride(1) == 1
    out = torch.empty(T, C, device=x.device, dtype=x.dtype)
    rows, block_c, warps = FWD_CONFIG
    with launch_device(x):
        _conv_silu_fwd_kernel[(triton.cdiv(T, rows), triton.cdiv(C, block_c))](
            x, weight, bias, seq_idx, out, T, C, x.stride(0), weight.stride(0), out.stride(0),
            HAS_BIAS=bias is not None, BLOCK_T=rows, BLOCK_C=block_c, WIDTH=WIDTH, num_warps=warps,
        )
    return out


def causal_conv1d_silu_bwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dy: torch.Tensor, seq_idx: torch.Tensor,
    dx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x, dy (T, C) with unit channel stride, weight (C, 4), seq_idx (T,) int32 -> dx, dweight, dbias.

    ``dx``: where to write the input gradient (any row stride), e.g. a slice of a larger gradient buffer.
    """
    T, C = x.shape
    assert weight.shape == (C, WIDTH) and x.stride(1) == dy.stride(1) == weight.stride(1) == 1
    dx = torch.empty_like(x) if dx is None else dx
    programs = triton.cdiv(T, ROWS)
    dw = torch.empty(programs, WIDTH, C, device=x.device, dtype=torch.float32)
    db = torch.empty(programs, C, device=x.device, dtype=torch.float32)
    with launch_device(x):
        _conv_silu_bwd_kernel[(programs, triton.cdiv(C, BLOCK_C))](
            x, weight, bias, dy, seq_idx, dx, dw, db,
            T, C, x.stride(0), weight.stride(0), dy.stride(0), dx.stride(0),
            HAS_BIAS=bias is not None, ROWS=ROWS, BLOCK_C=BLOCK_C, WIDTH=WIDTH, num_warps=WARPS, num_stages=STAGES,
        )
    dbias = db.sum(0).to(bias.dtype) if bias is not None else None
    return dx, dw.sum(0).t().to(weight.dtype), dbias
