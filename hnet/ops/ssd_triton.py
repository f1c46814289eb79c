"""Mamba2 SSD's chunk scan (forward), its input-gradient backward, dt's gradient and the state passing, in
Triton.

mamba_ssm's two costliest SSD kernels launch (row tiles, chunks, heads): every chunk of head 0 runs before
any chunk of head 1, so C.B, C and B, shared by all heads of a chunk, have left L2 when the next head reads
them (Nsight Compute: 2-3x the DRAM traffic the kernels need; docs/performance.md, change 22). They also
read the skip term D by head, so the library's kernels cannot be handed the heads as their batch, as
``hnet.ops.mamba_fused`` does for two others. These launch (row tiles, heads, chunks), one program per
row tile of one head over the whole head dimension, so a chunk's C.B tile is read from DRAM once and the
head dimension's gradient sums (dt, D) need no atomics: deterministic. The backward also gives dA's
gradient through the scan, which the library computes in a kernel of its own that reads x, dy and C.B
again (change 29): 0.24 ms less per encoder layer on an H100. ``dt_grad`` then adds up every term of
dA's gradient and takes it through dt's softplus in one launch, where the library's wrappers and torch
take about fifteen small launches (change 37). The state passing walks the chunks one after another per
block of state entries, as the library's does, but issues the next chunk's loads before it adds the current
one, so they wait while it computes: 35% faster backward at 65,536 positions, and both directions twice as
fast at 21,845 where the library's autotuned blocks leave SMs idle (change 47).

Layouts are mamba_ssm's (2.x): x and y (b, T, H, P); dt and its cumsum dA (b, H, nchunks, Q); C and B
(b, T, G, N); C.B (b, nchunks, G, Q, Q) with entries across documents zeroed; states (b, nchunks, H, P, N),
fp32 or x's dtype; seq_idx (b, T) int32. The arithmetic follows the library's: fp32 accumulation, the
decayed C.B and the states rounded to x's dtype for the tensor cores, dA's gradient from fp32 terms
(rounding the decayed C.B there cancels badly: change 28). The kernels' names differ from the library's,
which ``hnet.ops.ssd.ssd_scan`` still launches, so that profiles tell them apart.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from hnet.ops.backend import launch_device

# (BLOCK_M, BLOCK_K, warps, stages, register cap per thread or 0), chosen on an H100 at 65,536 positions,
# 32 heads x 64, N 128 (docs/performance.md, changes 27 and 46). Capped at 128 registers, both kernels fit
# four programs per SM where they fitted three: 12% faster each, with the same results.
SCAN_CONFIG = (64, 64, 4, 1, 128)
DX_CONFIG = (64, 32, 4, 1, 128)
DT_BLOCK_H = 16  # heads per program of dt_grad's kernel
STATE_PASSING_CONFIG = (512, 4)  # state entries per program, warps (change 47)


@triton.jit
def _tile(T, Q, nchunks, heads_per_group, BLOCK_M: tl.constexpr):
    """This program's rows: (tile, batch row, chunk, head, group, chunk start, rows in the chunk, row offsets)."""
    pid_m, h, pid_bc = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c = pid_bc % nchunks
    rows = min(Q, T - c * Q)  # the last chunk may be short
    return pid_m, pid_bc // nchunks, c, h, h // heads_per_group, c * Q, rows, pid_m * BLOCK_M + tl.arange(0, BLOCK_M)


@triton.jit
def _through_state(bc_base, s_bc_t, s_bc_n, st_base, s_st_n, s_st_p, offs_m, in_m, N, P,
                   BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr):
    """The rows' (C or B, (rows, N)) product with a chunk's (N, P) state tile, the state in the rows' dtype."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_p = tl.arange(0, BLOCK_P)
    bc = tl.load(bc_base + offs_m[:, None] * s_bc_t + offs_n[None, :] * s_bc_n,
                 mask=in_m[:, None] & (offs_n[None, :] < N), other=0.0)
    st = tl.load(st_base + offs_n[:, None] * s_st_n + offs_p[None, :] * s_st_p,
                 mask=(offs_n[:, None] < N) & (offs_p[None, :] < P), other=0.0)
    return tl.dot(bc, st.to(bc.dtype))


@triton.jit
def _ssd_scan_fwd_kernel(
    cb_ptr, x_ptr, dt_ptr, dA_ptr, c_ptr, st_ptr, d_ptr, seq_ptr, y_ptr,
    T, Q, P, N, nchunks, heads_per_group,
    s_cb_b, s_cb_c, s_cb_g, s_cb_m, s_cb_k,
    s_x_b, s_x_t, s_x_h, s_x_p,
    s_dt_b, s_dt_h, s_dt_c, s_dt_q,
    s_dA_b, s_dA_h, s_dA_c, s_dA_q,
    s_c_b, s_c_t, s_c_g, s_c_n,
    s_st_b, s_st_c, s_st_h, s_st_p, s_st_n,
    s_seq_b, s_seq_t,
    s_y_b, s_y_t, s_y_h, s_y_p,
    HAS_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m, b, c, h, g, t0, rows, offs_m = _tile(T, Q, nchunks, heads_per_group, BLOCK_M)
    offs_p = tl.arange(0, BLOCK_P)
    in_m = offs_m < rows
    dA_base = dA_ptr + b * s_dA_b + h * s_dA_h + c * s_dA_c
    x_base = x_ptr + b * s_x_b + t0 * s_x_t + h * s_x_h
    dA_m = tl.load(dA_base + offs_m * s_dA_q, mask=in_m, other=0.0).to(tl.float32)

    # The state entering the chunk, for rows still in the document the previous chunk ended in.
    seq_base = seq_ptr + b * s_seq_b + t0 * s_seq_t
    seq_m = tl.load(seq_base + offs_m * s_seq_t, mask=in_m, other=-1)
    seq_prev = tl.load(seq_base - s_seq_t, mask=c > 0, other=-2)
    scale = tl.where(seq_m == seq_prev, tl.exp(dA_m), 0.0)
    acc = _through_state(c_ptr + b * s_c_b + t0 * s_c_t + g * s_c_g, s_c_t, s_c_n,
                         st_ptr + b * s_st_b + c * s_st_c + h * s_st_h, s_st_n, s_st_p, offs_m, in_m, N, P,
                         BLOCK_N, BLOCK_P) * scale[:, None]
    # Within the chunk: y[m] += sum_{k <= m} C.B[m, k] exp(dA[m] - dA[k]) dt[k] x[k].
    offs_k = tl.arange(0, BLOCK_K)
    cb_base = cb_ptr + b * s_cb_b + c * s_cb_c + g * s_cb_g + offs_m[:, None] * s_cb_m
    dt_base = dt_ptr + b * s_dt_b + h * s_dt_h + c * s_dt_c
    k_end = min((pid_m + 1) * BLOCK_M, rows)
    for k0 in range(0, k_end, BLOCK_K):
        ks = k0 + offs_k
        in_k = ks < k_end
        cb = tl.load(cb_base + ks[None, :] * s_cb_k, mask=in_m[:, None] & in_k[None, :], other=0.0).to(tl.float32)
        dA_k = tl.load(dA_base + ks * s_dA_q, mask=in_k, other=0.0).to(tl.float32)
        dt_k = tl.load(dt_base + ks * s_dt_q, mask=in_k, other=0.0).to(tl.float32)
        w = cb * tl.exp(tl.minimum(dA_m[:, None] - dA_k[None, :], 0.0)) * dt_k[None, :]
        w = tl.where(offs_m[:, None] >= ks[None, :], w, 0.0)
        xk = tl.load(x_base + ks[:, None] * s_x_t + offs_p[None, :] * s_x_p,
                     mask=in_k[:, None] & (offs_p[None, :] < P), other=0.0)
        acc += tl.dot(w.to(xk.dtype), xk)

    io_mask = in_m[:, None] & (offs_p[None, :] < P)
    if HAS_D:
        xm = tl.load(x_base + offs_m[:, None] * s_x_t + offs_p[None, :] * s_x_p, mask=io_mask, other=0.0)
        acc += xm.to(tl.float32) * tl.load(d_ptr + h).to(tl.float32)
    y_base = y_ptr + b * s_y_b + t0 * s_y_t + h * s_y_h
    tl.store(y_base + offs_m[:, None] * s_y_t + offs_p[None, :] * s_y_p, acc.to(y_ptr.dtype.element_ty), mask=io_mask)


@triton.jit
def _ssd_scan_bwd_dx_kernel(
    cb_ptr, x_ptr, dt_ptr, dA_ptr, b_ptr, dst_ptr, d_ptr, seq_ptr, dy_ptr, dx_ptr, ddt_ptr, sums_ptr, dD_ptr,
    T, Q, P, N, nchunks, heads_per_group, m_tiles,
    s_cb_b, s_cb_c, s_cb_g, s_cb_m, s_cb_k,
    s_x_b, s_x_t, s_x_h, s_x_p,
    s_dt_b, s_dt_h, s_dt_c, s_dt_q,
    s_dA_b, s_dA_h, s_dA_c, s_dA_q,
    s_b_b, s_b_t, s_b_g, s_b_n,
    s_dst_b, s_dst_c, s_dst_h, s_dst_p, s_dst_n,
    s_seq_b, s_seq_t,
    s_dy_b, s_dy_t, s_dy_h, s_dy_p,
    s_dx_b, s_dx_t, s_dx_h, s_dx_p,
    HAS_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m, b, c, h, g, t0, rows, offs_m = _tile(T, Q, nchunks, heads_per_group, BLOCK_M)
    offs_p = tl.arange(0, BLOCK_P)
    in_m = offs_m < rows
    io_mask = in_m[:, None] & (offs_p[None, :] < P)
    dA_base = dA_ptr + b * s_dA_b + h * s_dA_h + c * s_dA_c
    dy_base = dy_ptr + b * s_dy_b + t0 * s_dy_t + h * s_dy_h
    dA_m = tl.load(dA_base + offs_m * s_dA_q, mask=in_m, other=0.0).to(tl.float32)

    # Through the state the chunk passes on, for rows in the document the chunk ends in.
    seq_base = seq_ptr + b * s_seq_b + t0 * s_seq_t
    seq_m = tl.load(seq_base + offs_m * s_seq_t, mask=in_m, other=-1)
    seq_last = tl.load(seq_base + (rows - 1) * s_seq_t)
    dA_last = tl.load(dA_base + (Q - 1) * s_dA_q).to(tl.float32)
    scale = tl.where(seq_m == seq_last, tl.exp(tl.minimum(dA_last - dA_m, 0.0)), 0.0)
    acc = _through_state(b_ptr + b * s_b_b + t0 * s_b_t + g * s_b_g, s_b_t, s_b_n,
                         dst_ptr + b * s_dst_b + c * s_dst_c + h * s_dst_h, s_dst_n, s_dst_p, offs_m, in_m, N, P,
                         BLOCK_N, BLOCK_P) * scale[:, None]

    # From later rows of the chunk: sum_{k >= m} C.B[k, m] exp(dA[k] - dA[m]) dy[k]. Along the way, the
    # terms of dA's gradient, in fp32 as the library forms them: for k > m, M[k, m] = dy[k] . x[m] times the
    # same decayed C.B and dt[m]. Row m's sum over k is this program's; its sums over m for each k are
    # partial (one slot per row tile; ``dt_grad`` adds them up).
    dt_m = tl.load(dt_ptr + b * s_dt_b + h * s_dt_h + c * s_dt_c + offs_m * s_dt_q, mask=in_m, other=0.0)
    dt_m = dt_m.to(tl.float32)
    xm = tl.load(x_ptr + b * s_x_b + t0 * s_x_t + h * s_x_h + offs_m[:, None] * s_x_t + offs_p[None, :] * s_x_p,
                 mask=io_mask, other=0.0)
    chunk_q = ((b * tl.num_programs(1) + h) * nchunks + c) * Q  # dt's (b, H, nchunks, Q), contiguous
    slot = tl.num_programs(2) * tl.num_programs(1) * Q  # one (b, H, nchunks, Q) slot of the sums
    out_sums = tl.zeros([BLOCK_M], dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    cbt_base = cb_ptr + b * s_cb_b + c * s_cb_c + g * s_cb_g + offs_m[:, None] * s_cb_k
    for k0 in range(pid_m * BLOCK_M, rows, BLOCK_K):
        ks = k0 + offs_k
        in_k = ks < rows
        cbt = tl.load(cbt_base + ks[None, :] * s_cb_m, mask=in_m[:, None] & in_k[None, :], other=0.0).to(tl.float32)
        dA_k = tl.load(dA_base + ks * s_dA_q, mask=in_k, other=0.0).to(tl.float32)
        w = cbt * tl.exp(tl.minimum(dA_k[None, :] - dA_m[:, None], 0.0))
        dyk = tl.load(dy_base + ks[:, None] * s_dy_t + offs_p[None, :] * s_dy_p,
                      mask=in_k[:, None] & (offs_p[None, :] < P), other=0.0)
        acc += tl.dot(tl.where(ks[None, :] >= offs_m[:, None], w, 0.0).to(dyk.dtype), dyk)
        mt = tl.dot(xm, tl.trans(dyk)) * tl.where(ks[None, :] > offs_m[:, None], w, 0.0) * dt_m[:, None]
        out_sums += tl.sum(mt, axis=1)
        tl.store(sums_ptr + pid_m * slot + chunk_q + ks, tl.sum(mt, axis=0), mask=in_k)
    tl.store(sums_ptr + m_tiles * slot + chunk_q + offs_m, out_sums, mask=offs_m < Q)

    xm = xm.to(tl.float32)
    # zero past the end, as the cumsum's backward reads the whole chunk
    tl.store(ddt_ptr + chunk_q + offs_m, tl.sum(acc * xm, axis=1), mask=offs_m < Q)
    dx = acc * dt_m[:, None]
    if HAS_D:
        dym = tl.load(dy_base + offs_m[:, None] * s_dy_t + offs_p[None, :] * s_dy_p, mask=io_mask, other=0.0)
        dym = dym.to(tl.float32)
        dx += dym * tl.load(d_ptr + h).to(tl.float32)
        tl.store(dD_ptr + ((b * nchunks + c) * m_tiles + pid_m) * tl.num_programs(1) + h,
                 tl.sum(tl.sum(dym * xm, axis=1), axis=0))
    dx_base = dx_ptr + b * s_dx_b + t0 * s_dx_t + h * s_dx_h
    tl.store(dx_base + offs_m[:, None] * s_dx_t + offs_p[None, :] * s_dx_p, dx.to(dx_ptr.dtype.element_ty), mask=io_mask)


@triton.jit
def _dt_grad_kernel(
    sums_ptr, next_ptr, prev_ptr, end_ptr, ddt_ptr, dt_ptr, raw_ptr, a_ptr, bias_ptr, draw_ptr, parts_ptr,
    T, Q, H, nchunks, tile_rows, m_tiles,
    s_raw_b, s_raw_t, s_raw_h,
    s_draw_b, s_draw_t, s_draw_h,
    HAS_BIAS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    pid_bc = tl.program_id(0)
    b, c = pid_bc // nchunks, pid_bc % nchunks
    rows = min(Q, T - c * Q)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_q = tl.arange(0, BLOCK_Q)
    in_h = offs_h < H
    mask = in_h[:, None] & (offs_q[None, :] < Q)
    hq = ((b * H + offs_h[:, None]) * nchunks + c) * Q + offs_q[None, :]  # in (b, H, nchunks, Q), contiguous
    slot = tl.num_programs(0) * H * Q

    # Through the scan: row sums less the row tiles' column sums, each tile's from its first row on (what
    # lies past the chunk's rows is dropped below).
    net = tl.load(sums_ptr + m_tiles * slot + hq, mask=mask, other=0.0)
    for j in range(m_tiles):
        net -= tl.load(sums_ptr + j * slot + hq, mask=mask & (offs_q[None, :] >= j * tile_rows), other=0.0)
    ddA = tl.cumsum(net, axis=1) - net  # the sum over earlier positions
    # Through the chunk-start states, by cumsum position: every increment up to it moves it.
    end = tl.load(end_ptr + (b * H + offs_h) * nchunks + c, mask=in_h, other=0.0)
    prev = tl.load(prev_ptr + hq, mask=mask, other=0.0) + tl.where(offs_q[None, :] == Q - 1, end[:, None], 0.0)
    ddA += tl.cumsum(prev, axis=1, reverse=True) + tl.cumsum(tl.load(next_ptr + hq, mask=mask, other=0.0), axis=1)

    valid = mask & (offs_q[None, :] < rows)
    ddA = tl.where(valid, ddA, 0.0)
    a = tl.load(a_ptr + offs_h, mask=in_h, other=0.0).to(tl.float32)
    ddt = tl.load(ddt_ptr + hq, mask=valid, other=0.0) + ddA * a[:, None]
    t = c * Q + offs_q[None, :]
    raw = tl.load(raw_ptr + b * s_raw_b + t * s_raw_t + offs_h[:, None] * s_raw_h, mask=valid, other=0.0)
    raw = raw.to(tl.float32)
    if HAS_BIAS:
        raw += tl.load(bias_ptr + offs_h, mask=in_h, other=0.0).to(tl.float32)[:, None]
    # softplus' = sigmoid; above 20 the forward passes dt through, where sigmoid is 1.0 in fp32 too
    draw = tl.where(valid, ddt * tl.sigmoid(raw), 0.0)
    tl.store(draw_ptr + b * s_draw_b + t * s_draw_t + offs_h[:, None] * s_draw_h, draw.to(draw_ptr.dtype.element_ty),
             mask=valid)
    dt = tl.load(dt_ptr + hq, mask=valid, other=0.0)
    tl.store(parts_ptr + pid_bc * H + offs_h, tl.sum(ddA * dt, axis=1), mask=in_h)
    tl.store(parts_ptr + (tl.num_programs(0) + pid_bc) * H + offs_h, tl.sum(draw, axis=1), mask=in_h)


@triton.jit
def _chunk_end_doc(seq_ptr, c, Q, T):
    """The document id at the last position of chunk c (0 before the first chunk, as mamba_ssm's)."""
    return tl.load(seq_ptr + tl.minimum((c + 1) * Q, T) - 1, mask=c >= 0, other=0)


@triton.jit
def _state_passing_fwd_kernel(local_ptr, dA_ptr, seq_ptr, out_ptr, dim, nchunks, T, Q,
                              s_l_c, s_l_h, s_o_c, s_o_h, s_dA_h, s_dA_c, BLOCK: tl.constexpr):
    h = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < dim
    local_ptr += h * s_l_h + offs
    out_ptr += h * s_o_h + offs
    dA_ptr += h * s_dA_h
    state = tl.zeros([BLOCK], dtype=tl.float32)
    tl.store(out_ptr, state.to(out_ptr.dtype.element_ty), mask=mask)
    # Chunk c + 1's loads are issued before chunk c's contribution is added: they wait while it computes.
    local = tl.load(local_ptr, mask=mask, other=0.0)
    dA, doc, prev_doc = tl.load(dA_ptr), _chunk_end_doc(seq_ptr, 0, Q, T), _chunk_end_doc(seq_ptr, -1, Q, T)
    for c in range(nchunks - 1):
        nxt = c + 1 < nchunks - 1
        local_n = tl.load(local_ptr + (c + 1) * s_l_c, mask=mask & nxt, other=0.0)
        dA_n, doc_n = tl.load(dA_ptr + (c + 1) * s_dA_c), _chunk_end_doc(seq_ptr, c + 1, Q, T)
        scale = tl.where(doc == prev_doc, tl.exp(dA.to(tl.float32)), 0.0)
        state = scale * state + local
        tl.store(out_ptr + (c + 1) * s_o_c, state.to(out_ptr.dtype.element_ty), mask=mask)
        local, dA, prev_doc, doc = local_n, dA_n, doc, doc_n


@triton.jit
def _state_passing_bwd_kernel(states_ptr, dA_ptr, seq_ptr, dout_ptr, dlocal_ptr, ddA_ptr, dim, nchunks, T, Q,
                              s_s_c, s_s_h, s_g_c, s_g_h, s_d_c, s_d_h, s_dA_h, s_dA_c, BLOCK: tl.constexpr):
    pid, h = tl.program_id(0), tl.program_id(1)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < dim
    states_ptr += h * s_s_h + offs
    dout_ptr += h * s_g_h + offs
    dlocal_ptr += h * s_d_h + offs
    dA_ptr += h * s_dA_h
    ddA_ptr += (pid * tl.num_programs(1) + h) * nchunks  # (blocks, H, nchunks): one partial sum per block
    carry = tl.zeros([BLOCK], dtype=tl.float32)  # the gradient of the state entering chunk j + 1
    tl.store(dlocal_ptr + (nchunks - 1) * s_d_c, carry.to(dlocal_ptr.dtype.element_ty), mask=mask)
    tl.store(ddA_ptr, 0.0)  # the state entering chunk 0 is zero
    j = nchunks - 1
    st = tl.load(states_ptr + j * s_s_c, mask=mask, other=0.0)
    g = tl.load(dout_ptr + j * s_g_c, mask=mask, other=0.0)
    dA = tl.load(dA_ptr + j * s_dA_c)
    doc, prev_doc = _chunk_end_doc(seq_ptr, j, Q, T), _chunk_end_doc(seq_ptr, j - 1, Q, T)
    for i in range(nchunks - 1):
        j = nchunks - 1 - i  # chunks j = nchunks - 1 .. 1; chunk j - 1's loads go out first
        nxt = j > 1
        st_n = tl.load(states_ptr + (j - 1) * s_s_c, mask=mask & nxt, other=0.0)
        g_n = tl.load(dout_ptr + (j - 1) * s_g_c, mask=mask & nxt, other=0.0)
        dA_n, doc_n = tl.load(dA_ptr + (j - 1) * s_dA_c), _chunk_end_doc(seq_ptr, j - 2, Q, T)
        scale = tl.where(doc == prev_doc, tl.exp(dA.to(tl.float32)), 0.0)
        tl.store(ddA_ptr + j, tl.sum(st.to(tl.float32) * carry) * scale)
        carry = scale * carry + g.to(tl.float32)
        tl.store(dlocal_ptr + (j - 1) * s_d_c, carry.to(dlocal_ptr.dtype.element_ty), mask=mask)
        st, g, dA, doc, prev_doc = st_n, g_n, dA_n, prev_doc, doc_n


def _launch(kernel, config: tuple[int, int, int, int, int], x: torch.Tensor, nchunks: int, Q: int, N: int, *args,
            has_d: bool) -> None:
    """One program per (row tile, head, batch row and chunk): a chunk's heads run together."""
    batch, _, H, P = x.shape
    block_m, block_k, warps, stages, maxnreg = config
    with launch_device(x):
        kernel[(triton.cdiv(Q, block_m), H, batch * nchunks)](
            *args, HAS_D=has_d, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_P=max(triton.next_power_of_2(P), 16),
            BLOCK_N=max(triton.next_power_of_2(N), 16), num_warps=warps, num_stages=stages,
            **({"maxnreg": maxnreg} if maxnreg else {}),
        )


def _shapes(x: torch.Tensor, dt: torch.Tensor, bc: torch.Tensor, cb: torch.Tensor, seq_idx: torch.Tensor):
    batch, T, H, P = x.shape
    _, _, nchunks, Q = dt.shape
    G, N = bc.shape[-2:]
    assert H % G == 0 and cb.shape == (batch, nchunks, G, Q, Q) and seq_idx.shape == (batch, T)
    return batch, T, H, P, nchunks, Q, G, N


def chunk_scan_fwd(cb: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, dA_cumsum: torch.Tensor, C: torch.Tensor,
                   states: torch.Tensor, D: torch.Tensor | None, seq_idx: torch.Tensor) -> torch.Tensor:
    """y = C . (state entering the chunk) + the causal chunk-local scan + D x, in x's dtype (layouts above)."""
    batch, T, H, P, nchunks, Q, G, N = _shapes(x, dt, C, cb, seq_idx)
    assert states.shape == (batch, nchunks, H, P, N) and (D is None or D.shape == (H,))
    y = torch.empty_like(x)
    _launch(_ssd_scan_fwd_kernel, SCAN_CONFIG, x, nchunks, Q, N,
            cb, x, dt, dA_cumsum, C, states, D, seq_idx, y, T, Q, P, N, nchunks, H // G,
            *cb.stride(), *x.stride(), *dt.stride(), *dA_cumsum.stride(), *C.stride(), *states.stride(),
            *seq_idx.stride(), *y.stride(), has_d=D is not None)
    return y


class ScanDdA(NamedTuple):
    """dA's gradient terms through the chunk scan as the dx kernel leaves them: per row tile, sums over its
    rows for each later position, and each position's sum over later positions (``dt_grad`` adds them up)."""

    sums: torch.Tensor  # (row tiles + 1, b, H, nchunks, Q) fp32
    tile_rows: int


def chunk_scan_bwd_dx(x: torch.Tensor, dt: torch.Tensor, dA_cumsum: torch.Tensor, B: torch.Tensor, cb: torch.Tensor,
                      dy: torch.Tensor, dstates: torch.Tensor, D: torch.Tensor | None, seq_idx: torch.Tensor,
                      dx: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, ScanDdA, torch.Tensor | None]:
    """The gradients of y and of the states each chunk passes on, with respect to x, dt (dA held), dA's
    increments through the chunk scan (dA's cumsum is of dt A), and D.

    dstates (b, nchunks, H, P, N) is the gradient of the chunk's own contribution to the state it passes on.
    Returns dx (into ``dx`` when given: any strides), ddt (fp32, dt's shape), the terms of dA's gradient
    (for ``dt_grad``) and dD (D's dtype, or None). With M[k, m] the fp32 terms of the scan's output sums
    (for k > m, in the kernel), the increment at i moves every pair k >= i > m, so dA's gradient at i is the
    sum over m < i of (sum_k M[k, m] - sum_k' M[m, k']): column sums less row sums. It is what mamba_ssm's
    ``_chunk_scan_bwd_ddAcs_stable`` returns.
    """
    batch, T, H, P, nchunks, Q, G, N = _shapes(x, dt, B, cb, seq_idx)
    assert dy.shape == x.shape and dstates.shape == (batch, nchunks, H, P, N)
    m_tiles = triton.cdiv(Q, DX_CONFIG[0])
    dx = torch.empty_like(x) if dx is None else dx
    ddt = torch.empty(batch, H, nchunks, Q, device=x.device, dtype=torch.float32)
    # Each row tile's column sums cover the later positions of its chunk; dt_grad reads no other slot.
    sums = torch.empty(m_tiles + 1, batch, H, nchunks, Q, device=x.device, dtype=torch.float32)
    dD = torch.empty(batch * nchunks * m_tiles, H, device=x.device, dtype=torch.float32) if D is not None else None
    _launch(_ssd_scan_bwd_dx_kernel, DX_CONFIG, x, nchunks, Q, N,
            cb, x, dt, dA_cumsum, B, dstates, D, seq_idx, dy, dx, ddt, sums, dD, T, Q, P, N, nchunks, H // G, m_tiles,
            *cb.stride(), *x.stride(), *dt.stride(), *dA_cumsum.stride(), *B.stride(), *dstates.stride(),
            *seq_idx.stride(), *dy.stride(), *dx.stride(), has_d=D is not None)
    return dx, ddt, ScanDdA(sums, DX_CONFIG[0]), dD.sum(0).to(D.dtype) if D is not None else None


def dt_grad(scan: ScanDdA, ddA_next: torch.Tensor, ddA_prev: torch.Tensor, ddA_chunk_end: torch.Tensor,
            ddt: torch.Tensor, dt: torch.Tensor, dt_raw: torch.Tensor, A: torch.Tensor, dt_bias: torch.Tensor | None,
            ddt_raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gradients of dt before its softplus, of A and of dt's bias, from every term of dA's gradient.

    dA's cumsum is of dt A, dt = softplus(dt_raw + dt_bias). The terms: the chunk scan's (``scan``) by
    increment, the chunk states' as mamba_ssm's dB kernel leaves it (``ddA_next``: its cumsum is the term by
    increment), the chunk-start states' by cumsum position (``ddA_prev``) and the passed-on states' by chunk
    end (``ddA_chunk_end``, (b, H, nchunks)); ddt is dt's own gradient with dA held; all fp32 in dt's
    (b, H, nchunks, Q) layout. Writes dt_raw's gradient into ``ddt_raw`` ((b, T, H), any strides) and
    returns dA's and dt_bias's, fp32, in the fixed order of a sum over chunks.
    This is mamba_ssm's two cumsums, sums and ``_chunk_cumsum_bwd`` in one launch (no atomics).
    """
    batch, H, nchunks, Q = dt.shape
    T = dt_raw.shape[1]
    assert dt_raw.shape == ddt_raw.shape == (batch, T, H) and ddA_chunk_end.shape == (batch, H, nchunks)
    assert all(t.shape == dt.shape and t.is_contiguous() for t in (ddt, dt, ddA_next, ddA_prev))
    parts = torch.empty(2, batch * nchunks, H, device=dt.device, dtype=torch.float32)  # per chunk: dA, dt_bias
    with launch_device(dt):
        _dt_grad_kernel[(batch * nchunks, triton.cdiv(H, DT_BLOCK_H))](
            scan.sums, ddA_next, ddA_prev, ddA_chunk_end.contiguous(), ddt, dt, dt_raw, A, dt_bias, ddt_raw, parts,
            T, Q, H, nchunks, scan.tile_rows, scan.sums.shape[0] - 1, *dt_raw.stride(), *ddt_raw.stride(),
            HAS_BIAS=dt_bias is not None, BLOCK_H=DT_BLOCK_H, BLOCK_Q=triton.next_power_of_2(Q),
        )
    dA, ddt_bias = parts.sum(1)
    return dA, ddt_bias if dt_bias is not None else None


def state_passing_fwd(local: torch.Tensor, dA_chunk_end: torch.Tensor, seq_idx: torch.Tensor, chunk_size: int,
                      out_dtype: torch.dtype) -> torch.Tensor:
    """The state entering each chunk, (1, nchunks, H, dim) in ``out_dtype``, from each chunk's own contribution
    ``local`` (1, nchunks, H, dim) fp32 and dA's cumsum at each chunk's end (1, H, nchunks): zero into the first
    chunk, and nothing carried across a chunk whose last position lies in another document than the previous
    chunk's last position. mamba_ssm's ``_state_passing_fwd`` without its final state, walking the chunks with
    the next one's loads in flight."""
    _, nchunks, H, dim = local.shape
    assert local.shape[0] == 1 and dA_chunk_end.shape == (1, H, nchunks) and local.stride(-1) == 1
    out = torch.empty(local.shape, device=local.device, dtype=out_dtype)
    block, warps = STATE_PASSING_CONFIG
    with launch_device(local):
        _state_passing_fwd_kernel[(triton.cdiv(dim, block), H)](
            local, dA_chunk_end, seq_idx, out, dim, nchunks, seq_idx.shape[-1], chunk_size,
            local.stride(1), local.stride(2), out.stride(1), out.stride(2), dA_chunk_end.stride(1),
            dA_chunk_end.stride(2), BLOCK=block, num_warps=warps,
        )
    return out


def state_passing_bwd(states: torch.Tensor, dA_chunk_end: torch.Tensor, dstates: torch.Tensor, seq_idx: torch.Tensor,
                      chunk_size: int, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``state_passing_fwd``'s backward: from the states it returned and their gradient ``dstates`` (fp32), the
    gradient of each chunk's own contribution (in ``out_dtype``) and of dA's cumsum at each chunk's end (fp32,
    (1, H, nchunks)). mamba_ssm's ``_state_passing_bwd``'s arithmetic, the next chunk's loads in flight; dA's
    term is summed in blocks of ``STATE_PASSING_CONFIG``'s entries, then over the blocks."""
    _, nchunks, H, dim = states.shape
    assert states.shape[0] == 1 and dA_chunk_end.shape == (1, H, nchunks) and dstates.shape == states.shape
    assert states.stride(-1) == 1 and dstates.stride(-1) == 1
    block, warps = STATE_PASSING_CONFIG
    blocks = triton.cdiv(dim, block)
    dlocal = torch.empty(states.shape, device=states.device, dtype=out_dtype)
    ddA = torch.empty(blocks, H, nchunks, device=states.device, dtype=torch.float32)
    with launch_device(states):
        _state_passing_bwd_kernel[(blocks, H)](
            states, dA_chunk_end, seq_idx, dstates, dlocal, ddA, dim, nchunks, seq_idx.shape[-1], chunk_size,
            states.stride(1), states.stride(2), dstates.stride(1), dstates.stride(2), dlocal.stride(1),
            dlocal.stride(2), dA_chunk_end.stride(1), dA_chunk_end.stride(2), BLOCK=block, num_warps=warps,
        )
    return dlocal, ddA.sum(0)[None]
