"""Mamba2's conv -> SSD -> gated norm -> out_proj in one autograd function that keeps its chunk states.

mamba_ssm's ``mamba_split_conv1d_scan_combined`` saves only its input and, in the backward, recomputes
the conv, the dt cumsum, C.B within chunks, the per-chunk states and their passing across chunks. This
function runs the same steps, but the forward keeps what the backward needs (the conv's output, dt
after softplus, its cumsum, C.B and the states entering each chunk: about 0.5 GB per layer at 65,536
positions, d_inner 2048), so the backward recomputes none of it. The states are kept in x's dtype, as the
library's forward stores them for its scan; its backward recomputes them in fp32, and the only gradient
that sees the difference is dA's term through the state each chunk passes on (``passing_bwd``), within
the tests' tolerance. Storing them in bf16 saves a quarter of the state passing's memory traffic both ways
and its conversion copy (docs/performance.md, change 46). Outputs equal the library's up to the order of
fp32 sums (tests/test_gpu.py).

Launch order: the library's SSD kernels launch (row tiles, chunks, heads), so every chunk of head 0 runs
before any chunk of head 1, and C, B and C.B, which all heads of a chunk share, have left L2 by the time
the next head reads them (Nsight Compute: 2-3x the DRAM traffic the kernels need at 65,536 positions).
With one group, the library's kernels that index nothing else by head (chunk states, dstates) are
given the heads as their batch and a single head (views, no copies): the heads of a chunk then run back
to back, with the same arithmetic (docs/performance.md, change 22). The chunk scan and its backward
(dx, dt, D and dA through the scan) are ours (``hnet.ops.ssd_triton``), launched heads inside chunks for
any number of groups (changes 27 and 29), and so is the state passing both ways (change 47).

The conv is ours both ways (``hnet.ops.conv_triton``): causal_conv1d's backward runs at a third of the
memory bandwidth (change 26), its forward at 0.35 ms where ours takes 0.25 (change 34).

Uses mamba_ssm's internal kernel wrappers (2.x layout); where they are missing, callers fall back to
the library's public function (``available()``). Their autotuned kernels launch past Triton's
per-call autotuner bookkeeping once tuned (``hnet.ops.tuned_launch``).
"""

from __future__ import annotations

import functools
import logging
import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from hnet.ops.backend import launch_device

logger = logging.getLogger("hnet.ops")


@functools.cache
def available() -> bool:
    """True when this mamba_ssm exposes the kernel wrappers the function composes."""
    try:
        _kernels()
    except (ImportError, AttributeError) as e:  # an older layout: no determinism helpers, other kernel arguments
        logger.warning("mamba_ssm internals not found (%s): Mamba2 uses the library's split-conv-scan, "
                       "which recomputes its chunk states in the backward", e)
        return False
    return True


@functools.cache
def _kernels() -> SimpleNamespace:
    from hnet.ops import conv_triton, ssd_triton
    from hnet.ops.tuned_launch import install_mamba_ssm
    from mamba_ssm.ops.triton import layernorm_gated, ssd_bmm, ssd_chunk_scan, ssd_chunk_state
    from mamba_ssm.utils import determinism

    install_mamba_ssm()

    return SimpleNamespace(
        conv_fwd=conv_triton.causal_conv1d_silu_fwd, conv_bwd=conv_triton.causal_conv1d_silu_bwd,
        conv_width=conv_triton.WIDTH,
        norm_fwd=layernorm_gated._layer_norm_fwd, norm_bwd_kernel=layernorm_gated._layer_norm_bwd_kernel,
        bmm_fwd=ssd_bmm._bmm_chunk_fwd, bmm_bwd=ssd_bmm._bmm_chunk_bwd,
        cumsum_fwd=ssd_chunk_state._chunk_cumsum_fwd, dt_bwd=ssd_triton.dt_grad,
        state_fwd=ssd_chunk_state._chunk_state_fwd,
        passing_fwd=ssd_triton.state_passing_fwd, passing_bwd=ssd_triton.state_passing_bwd,
        scan_fwd=ssd_triton.chunk_scan_fwd, scan_bwd_dx=ssd_triton.chunk_scan_bwd_dx,
        scan_bwd_dstates=ssd_chunk_scan._chunk_scan_bwd_dstates,
        db_kernel=ssd_chunk_state._chunk_state_bwd_db_kernel, dc_kernel=ssd_chunk_scan._chunk_scan_bwd_dc_kernel,
        dcb_kernel=ssd_chunk_scan._chunk_scan_bwd_dcb_kernel,
        db_min_block_n=ssd_chunk_state._CHUNK_STATE_BWD_DB_MIN_BLOCK_N,
        dc_min_block_n=ssd_chunk_scan._CHUNK_SCAN_BWD_DC_MIN_BLOCK_N,
        deterministic=determinism.use_deterministic_mode, tiles=determinism.alloc_tile_workspace,
        tiles_sum=determinism.finalize_tile_workspace,
    )


def chain(u, seq_idx, in_w, A_log, conv_w, conv_b, dt_bias, D, norm_w, outproj_w, *, chunk_size: int, ngroups: int,
          eps: float, norm_before_gate: bool) -> torch.Tensor:
    """A Mamba2 mixer from its input (T, d) and parameters, as named in the module: in_proj, then
    ``split_conv_scan``. One function of tensors, so that it can be captured as a CUDA graph
    (``hnet.ops.mamba_graphs``)."""
    return split_conv_scan(
        F.linear(u, in_w), conv_w.squeeze(1), conv_b, dt_bias, -torch.exp(A_log.float()), D, norm_w, outproj_w,
        seq_idx, chunk_size=chunk_size, ngroups=ngroups, eps=eps, norm_before_gate=norm_before_gate,
    )


def split_conv_scan(zxbcdt, conv_w, conv_b, dt_bias, A, D, norm_w, outproj_w, seq_idx, *,
                    chunk_size: int, ngroups: int, eps: float, norm_before_gate: bool) -> torch.Tensor:
    """(T, d_inner + conv_dim + nheads) -> (T, d): this module's function, or the library's where it cannot run
    (mamba_ssm's internals missing, or a conv width other than the 4 our conv backward is written for)."""
    if available() and conv_w.shape[1] == _kernels().conv_width:
        return SplitConvScan.apply(zxbcdt, conv_w, conv_b, dt_bias, A, D, norm_w, outproj_w, seq_idx[None],
                                   chunk_size, ngroups, eps, norm_before_gate)
    from mamba_ssm.ops.triton.ssd_combined import mamba_split_conv1d_scan_combined

    nheads = A.shape[0]
    return mamba_split_conv1d_scan_combined(
        zxbcdt[None], conv_w, conv_b, dt_bias, A, D, chunk_size, seq_idx=seq_idx[None], activation="silu",
        rmsnorm_weight=norm_w, rmsnorm_eps=eps, outproj_weight=outproj_w, ngroups=ngroups,
        headdim=(zxbcdt.shape[-1] - conv_w.shape[0] - nheads) // nheads, norm_before_gate=norm_before_gate,
    )[0]


class _HeadsFirst:
    """Views that give mamba_ssm's kernels the heads as batches of one head (see the module docstring).

    Built with ``on=False`` (more than one group) every view is the tensor itself: the library's order.
    """

    def __init__(self, nheads: int, on: bool):
        self.nheads, self.on = nheads, on

    def seq(self, t: torch.Tensor) -> torch.Tensor:
        """Per head along the sequence or the chunks: (1, a, H, ...) -> (H, a, 1, ...)."""
        return t[0].transpose(0, 1).unsqueeze(2) if self.on else t

    def unseq(self, t: torch.Tensor) -> torch.Tensor:
        """The inverse of ``seq``."""
        return t.squeeze(2).transpose(0, 1)[None] if self.on else t

    def chunk(self, t: torch.Tensor) -> torch.Tensor:
        """Per head and chunk position, (1, H, nchunks, chunk) <-> (H, 1, nchunks, chunk)."""
        return t.transpose(0, 1) if self.on else t

    def shared(self, t: torch.Tensor) -> torch.Tensor:
        """The same for every head (C, B, C.B, seq_idx): repeated over the batch with stride 0."""
        return t.expand(self.nheads, *t.shape[1:]) if self.on else t


def _gated_norm_bwd(k: SimpleNamespace, dy, y, weight, eps: float, rstd, z, dz, *, group_size: int,
                    norm_before_gate: bool):
    """mamba_ssm's gated RMSNorm backward, launched with twice the library's programs.

    Each program walks its rows one at a time and keeps a partial weight gradient. The library starts
    one program of 8 warps per SM, half of what the kernel's registers allow, and each row waits on
    memory: 0.82 ms at 65,536 x 2,048 on an H100, 0.64 ms with two per SM (docs/performance.md,
    change 23).
    Returns the input gradient, the weight gradient and the recomputed output; dz is written in place.
    """
    M, N = y.shape
    ngroups = N // group_size
    block = _pow2(group_size)
    warps = min(max(block // 256, 1), 8)  # the library's choice
    programs = 2 * math.ceil(_sms(y.device) * math.ceil(4 / warps) / ngroups)
    dx, out = torch.empty_like(y), torch.empty_like(y)
    dw = torch.empty(programs, N, device=y.device, dtype=torch.float32)  # per-program partial sums
    with launch_device(y):
        k.norm_bwd_kernel[(programs, ngroups)](
            y, weight, None, z, out, dy, dx, dw, None, dz, None, rstd,
            y.stride(0), z.stride(0), out.stride(0), dy.stride(0), dx.stride(0), dz.stride(0), dw.stride(0), 0,
            M, group_size, eps, math.ceil(M / programs),
            BLOCK_N=block, NORM_BEFORE_GATE=norm_before_gate, IS_RMS_NORM=True, num_warps=warps,
        )
    return dx, dw.sum(0).to(weight.dtype), out


def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _head_splits(x: torch.Tensor, nchunks: int, ngroups: int) -> tuple[int, int]:
    """Heads per program and programs per group, as mamba_ssm's backward wrappers choose them: few heads per
    program where there are few chunks, so every SM gets work. The same for its dB, dC and dC.B kernels."""
    batch, _, nheads, _ = x.shape
    per_group = nheads // ngroups
    per_program = max(min(math.ceil(batch * nchunks * nheads / _sms(x.device)), per_group), 1)
    return per_program, math.ceil(per_group / per_program)


def _sum_splits(t: torch.Tensor) -> torch.Tensor:
    """The per-split partial outputs (dim 2) added up; one split is a view, where the library copies it."""
    return t.squeeze(2) if t.shape[2] == 1 else t.sum(2)


def _grid(rows: int, cols: int, chunks: int, splits: int):
    """mamba_ssm's backward grid: (row tile x column tile, batch x chunk, split x group)."""
    def grid(meta: dict) -> tuple[int, int, int]:
        return math.ceil(rows / meta["BLOCK_SIZE_M"]) * math.ceil(cols / meta["BLOCK_SIZE_N"]), chunks, splits

    return grid


# mamba_ssm's dB, dC and dC.B kernels, launched as its wrappers launch them, less two things: the sum over
# per-split outputs, a copy when there is one split (1stage_L: 0.14 ms and three launches per layer), and the
# cumsum of dA's chunk-state term, which ``dt_grad`` takes. ``split`` is ``_head_splits``'s; ``det`` the
# library's deterministic mode: per-tile partial sums of dA's terms instead of atomic adds. The kernels'
# arguments are mamba_ssm 2.3's.

def _bc_grad(k: SimpleNamespace, kernel, min_block_n: int, rows, states, bc, dt, dA_cumsum, seq_idx,
             split: tuple[int, int], det: bool):
    """B's or C's gradient through the chunk states (fp32) and dA's term from it, from mamba_ssm's dB kernel
    (rows x, states the passed-on states' gradient, dt given) or dC kernel (rows dy, the states entering each
    chunk, no dt): both reduce the (rows, heads) x (heads, states) products over heads, in splits of heads."""
    batch, T, nheads, headdim = rows.shape
    nchunks, Q = dA_cumsum.shape[2:]
    ngroups, dstate = bc.shape[-2:]
    per_program, splits = split
    ddA, tile_stride = k.tiles((batch, nheads, nchunks, Q), math.ceil(dstate / min_block_n), torch.float32,
                               rows.device, det, zero_init=True)
    grad = torch.empty(batch, T, splits, ngroups, dstate, device=rows.device, dtype=torch.float32)
    by_chunk = [dA_cumsum] if dt is None else [dt, dA_cumsum]
    with launch_device(rows):
        kernel[_grid(Q, dstate, batch * nchunks, splits * ngroups)](
            rows, states, bc, *by_chunk, seq_idx, grad, ddA, Q, dstate, headdim, batch, T, nheads, per_program,
            ngroups, *rows.stride(), *states.stride(), *bc.stride(), *(s for t in by_chunk for s in _chunk_major(t)),
            *seq_idx.stride(), *grad.stride(), *_chunk_major(ddA), tile_stride,
            HAS_DDA_CS=True, HAS_SEQ_IDX=True, DETERMINISTIC_REDUCTION=det, BLOCK_SIZE_K=_pow2(headdim, 16),
        )
    return _sum_splits(grad), k.tiles_sum(ddA, det)


def _scan_bwd_dcb(k: SimpleNamespace, x, dt, dA_cumsum, dy, seq_idx, ngroups: int, split: tuple[int, int]):
    """The gradient of C.B within chunks (fp32, (b, nchunks, G, Q, Q))."""
    batch, T, nheads, headdim = x.shape
    _, _, nchunks, Q = dt.shape
    per_program, splits = split
    dcb = torch.empty(batch, nchunks, splits, ngroups, Q, Q, device=x.device, dtype=torch.float32)
    with launch_device(x):
        k.dcb_kernel[_grid(Q, Q, batch * nchunks, splits * ngroups)](
            x, dy, None, dt, dA_cumsum, seq_idx, dcb, None, Q, headdim, batch, T, nheads, per_program, ngroups,
            *x.stride(), *dy.stride(), 0, 0, 0, 0, 0, *_chunk_major(dt), *_chunk_major(dA_cumsum), *seq_idx.stride(),
            *dcb.stride(), 0, 0, 0, 0, 0,
            HAS_DDA_CS=False, HAS_SEQ_IDX=True, BLOCK_SIZE_K=_pow2(headdim, 16),
        )
    return _sum_splits(dcb)


def _chunk_major(t: torch.Tensor) -> tuple[int, int, int, int]:
    """Strides of a (b, H, nchunks, Q) tensor in the order the library's kernels take them: b, chunk, head, Q."""
    return t.stride(0), t.stride(2), t.stride(1), t.stride(3)


def _pow2(n: int, least: int = 1) -> int:
    """The next power of two, at least ``least`` (a block covering n; tl.dot's blocks are at least 16)."""
    return max(1 << (n - 1).bit_length(), least)


def _split(zxbcdt: torch.Tensor, conv_dim: int, nheads: int):
    """z, xBC and dt of the (T, .) projection, as batch-1 views."""
    return zxbcdt[None].split([zxbcdt.shape[-1] - conv_dim - nheads, conv_dim, nheads], dim=-1)


def _conv(k: SimpleNamespace, xbc: torch.Tensor, conv_w, conv_b, seq_idx) -> torch.Tensor:
    """SiLU(causal conv(xBC)), (1, T, conv_dim) with channels innermost, as the SSD kernels read it."""
    return k.conv_fwd(xbc[0], conv_w, conv_b, seq_idx[0])[None]


def _heads(xbc_conv: torch.Tensor, dim: int, nheads: int, ngroups: int):
    """x (1, T, nheads, headdim), B and C (1, T, ngroups, dstate): views of the conv's output."""
    dstate = (xbc_conv.shape[-1] - dim) // (2 * ngroups)
    x, B, C = xbc_conv.split([dim, ngroups * dstate, ngroups * dstate], dim=-1)
    return x.unflatten(-1, (nheads, -1)), B.unflatten(-1, (ngroups, dstate)), C.unflatten(-1, (ngroups, dstate))


class SplitConvScan(torch.autograd.Function):
    """zxbcdt (T, d_inner + conv_dim + nheads) -> out_proj(norm(ssd(conv(xBC)) * silu(z))) (T, d).

    seq_idx is (1, T) int32; the rest are the Mamba2 mixer's parameters (A = -exp(A_log) in fp32).
    """

    @staticmethod
    def forward(ctx, zxbcdt, conv_w, conv_b, dt_bias, A, D, norm_w, outproj_w, seq_idx,
                chunk_size: int, ngroups: int, eps: float, norm_before_gate: bool):
        k = _kernels()
        z, xbc, dt_raw = _split(zxbcdt, conv_w.shape[0], A.shape[0])
        xbc_conv = _conv(k, xbc, conv_w, conv_b, seq_idx)
        x, B, C = _heads(xbc_conv, z.shape[-1], A.shape[0], ngroups)
        dA_cumsum, dt = k.cumsum_fwd(dt_raw, A, chunk_size, dt_bias=dt_bias, dt_softplus=True)
        h = _HeadsFirst(A.shape[0], on=ngroups == 1)
        # fp32 (1, nchunks, H, P, N): what each chunk adds to the state
        local = x.new_empty(1, dA_cumsum.shape[2], *x.shape[2:], B.shape[-1], dtype=torch.float32)
        k.state_fwd(h.shared(B), h.seq(x), h.chunk(dt), h.chunk(dA_cumsum), seq_idx=h.shared(seq_idx),
                    states=h.seq(local))
        local = local.flatten(-2)
        states = k.passing_fwd(local, dA_cumsum[..., -1], seq_idx, chunk_size, x.dtype)
        del local  # 0.27 GB at 65,536 positions: gone before the scan allocates
        states = states.unflatten(-1, x.shape[-1:] + B.shape[-1:])  # the state entering each chunk
        CB = k.bmm_fwd(C, B, chunk_size, seq_idx=seq_idx, output_dtype=torch.float32)
        y = k.scan_fwd(CB, x, dt, dA_cumsum, C, states, D, seq_idx)
        y_norm, _, rstd = k.norm_fwd(
            y[0].flatten(-2), norm_w, None, eps, z[0], group_size=z.shape[-1] // ngroups,
            norm_before_gate=norm_before_gate, is_rms_norm=True,
        )
        ctx.save_for_backward(zxbcdt, conv_w, conv_b, dt_bias, A, D, norm_w, outproj_w, seq_idx,
                              xbc_conv, y, rstd, dt, dA_cumsum, states, CB)
        ctx.config = (chunk_size, ngroups, eps, norm_before_gate)
        return F.linear(y_norm, outproj_w)

    @staticmethod
    def backward(ctx, dout):
        k = _kernels()
        (zxbcdt, conv_w, conv_b, dt_bias, A, D, norm_w, outproj_w, seq_idx,
         xbc_conv, y, rstd, dt, dA_cumsum, states, CB) = ctx.saved_tensors
        chunk_size, ngroups, eps, norm_before_gate = ctx.config
        z, xbc, dt_raw = _split(zxbcdt, conv_w.shape[0], A.shape[0])
        x, B, C = _heads(xbc_conv, z.shape[-1], A.shape[0], ngroups)
        # Gradient buffers laid out as the inputs, so the kernels write every piece in place.
        dzxbcdt = torch.empty_like(zxbcdt)
        dz, dxbc_in, ddt_raw = dzxbcdt[None].split([z.shape[-1], xbc.shape[-1], dt_raw.shape[-1]], dim=-1)
        dxbc = torch.empty_like(xbc)
        dx, dB, dC = dxbc.split([z.shape[-1], B[0, 0].numel(), C[0, 0].numel()], dim=-1)
        dx, dB, dC = dx.view_as(x), dB.view_as(B), dC.view_as(C)

        dout = dout.contiguous()
        dy, dnorm_w, y_norm = _gated_norm_bwd(  # y_norm recomputed for out_proj's weight gradient
            k, F.linear(dout, outproj_w.t()), y[0].flatten(-2), norm_w, eps, rstd, z[0], dz[0],
            group_size=z.shape[-1] // ngroups, norm_before_gate=norm_before_gate,
        )
        doutproj_w = dout.t() @ y_norm
        dy = dy.view_as(y)

        h = _HeadsFirst(A.shape[0], on=ngroups == 1)
        # each chunk's own gradient in fp32, as the library's: the passing sums it with the carried one
        dstates = h.unseq(k.scan_bwd_dstates(h.shared(C), h.chunk(dA_cumsum), h.seq(dy), seq_idx=h.shared(seq_idx),
                                             dtype=torch.float32))
        dstates, ddA_chunk_end = k.passing_bwd(states.flatten(-2), dA_cumsum[..., -1], dstates.flatten(-2), seq_idx,
                                               chunk_size, x.dtype)
        dstates = dstates.view_as(states)
        _, ddt, ddA_scan, dD = k.scan_bwd_dx(x, dt, dA_cumsum, B, CB, dy, dstates, D, seq_idx, dx=dx)
        # dA's terms: by increment before its cumsum (dB's), by cumsum position (dC's); dt_bwd adds them up
        split, det = _head_splits(x, dt.shape[2], ngroups), k.deterministic()
        dB_local, ddA_next = _bc_grad(k, k.db_kernel, k.db_min_block_n, x, dstates, B, dt, dA_cumsum, seq_idx, split,
                                      det)
        dC_local, ddA_prev = _bc_grad(k, k.dc_kernel, k.dc_min_block_n, dy, states, C, None, dA_cumsum, seq_idx,
                                      split, det)
        dCB = _scan_bwd_dcb(k, x, dt, dA_cumsum, dy, seq_idx, ngroups, split)
        k.bmm_bwd(C, dCB, residual=dB_local, out=dB)
        k.bmm_bwd(B, dCB.transpose(-1, -2), residual=dC_local, out=dC)
        dA, ddt_bias = k.dt_bwd(ddA_scan, ddA_next, ddA_prev, ddA_chunk_end, ddt, dt, dt_raw, A, dt_bias, ddt_raw)

        _, dconv_w, dconv_b = k.conv_bwd(xbc[0], conv_w, conv_b, dxbc[0], seq_idx[0], dx=dxbc_in[0])
        return dzxbcdt, dconv_w, dconv_b, ddt_bias, dA, dD, dnorm_w, doutproj_w, None, None, None, None, None
