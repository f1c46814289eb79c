"""Selective state-space scan (Mamba2 SSD) over packed documents.

h[t] = exp(dt[t] * A) * h[t-1] + dt[t] * B[t] x[t]^T,   y[t] = C[t] . h[t] + D * x[t],
with h reset to zero wherever ``seq_idx`` changes (a new document). The reference is a chunked scan
in fp32: quadratic only inside chunks of ``chunk_size`` and a short loop over chunks, so it is exact
enough to be the oracle and fast enough to train the debug model on a CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hnet.ops.backend import resolve


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    chunk_size: int,
    seq_idx: torch.Tensor,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
) -> torch.Tensor:
    """x (T, H, P), dt (T, H), A (H,), B and C (T, G, N), seq_idx (T,) int32 -> y (T, H, P) in x's dtype."""
    if resolve("ssd", x.device) == "triton":
        return _ssd_triton(x, dt, A, B, C, chunk_size, seq_idx, D, dt_bias, dt_softplus)
    return ssd_scan_reference(x, dt, A, B, C, chunk_size, seq_idx, D, dt_bias, dt_softplus)


@torch.compiler.disable  # an autograd.Function around Triton launches: opaque to dynamo (see hnet.ops.backend)
def _ssd_triton(x, dt, A, B, C, chunk_size, seq_idx, D, dt_bias, dt_softplus):
    from hnet.ops.tuned_launch import install_mamba_ssm
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    install_mamba_ssm()
    y = mamba_chunk_scan_combined(
        x[None], dt[None], A, B[None], C[None], chunk_size,
        D=D, dt_bias=dt_bias, dt_softplus=dt_softplus, seq_idx=seq_idx[None],
    )
    return y[0]


# The dechunk EMA as an SSD scan: heads of 32 channels, chunks of 256 positions (the reference H-Net's).
EMA_HEADDIM = 32
EMA_CHUNK_SIZE = 256


def ema_scan(x: torch.Tensor, p: torch.Tensor, seq_idx: torch.Tensor) -> torch.Tensor:
    """h[t] = (1 - p[t]) h[t-1] + p[t] x[t], from zero at each document: (n, d), (n,) fp32, (n,) int32 -> fp32.

    It is the scan above with one state per channel: dt = log(1 / (1 - p)), A = -1, B = p, C = 1 and
    the input x / dt. The reference runs that; the Triton backend runs the recurrence itself
    (``hnet.ops.ema_triton``), as mamba_ssm's chunked kernels cost far more than it needs.
    """
    p = p.float()
    if resolve("ssd", x.device) == "triton":
        return _ema_triton(x, p, seq_idx)
    n, d = x.shape
    heads = d // EMA_HEADDIM
    dt = torch.log(1 / (1 - p))
    return ssd_scan_reference(
        (x.float() / dt[:, None]).view(n, heads, EMA_HEADDIM), dt[:, None].expand(n, heads),
        -torch.ones(heads, device=x.device), p.view(n, 1, 1), torch.ones(n, 1, 1, device=x.device),
        chunk_size=EMA_CHUNK_SIZE, seq_idx=seq_idx,
    ).view(n, d)


@torch.compiler.disable  # an autograd.Function around Triton launches, as _ssd_triton
def _ema_triton(x, p, seq_idx):
    from hnet.ops.ema_triton import EmaScan

    return EmaScan.apply(x, p, seq_idx)


# Eager even inside compiled blocks: its Python control flow follows the data (host syncs, loops
# over chunks or documents), so a compiled version would recompile for every new layout.
@torch.compiler.disable
def ssd_scan_reference(x, dt, A, B, C, chunk_size, seq_idx, D=None, dt_bias=None, dt_softplus=False):
    """Chunked SSD in fp32 with document resets (see module docstring)."""
    T, H, P = x.shape
    G, N = B.shape[1:]
    out_dtype = x.dtype
    x, dt, A, B, C = x.float(), dt.float(), A.float(), B.float(), C.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    Q = chunk_size
    pad = (-T) % Q
    if pad:  # padding is its own document, so it never mixes with real positions
        x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 1) + (0, pad)) for t in (x, dt, B, C))
        seq_idx = F.pad(seq_idx, (0, pad), value=int(seq_idx[-1]) + 1)
    nc = (T + pad) // Q
    x = x.view(nc, Q, H, P)
    dt = dt.view(nc, Q, H)
    heads_per_group = H // G
    B = B.view(nc, Q, G, N).repeat_interleave(heads_per_group, dim=2)  # (nc, Q, H, N)
    C = C.view(nc, Q, G, N).repeat_interleave(heads_per_group, dim=2)
    sid = seq_idx.view(nc, Q)

    a_cum = torch.cumsum(dt * A, dim=1)  # (nc, Q, H): log decay from the chunk start
    # Intra-chunk: y_i += sum_{j<=i, same doc} C_i.B_j exp(a_i - a_j) dt_j x_j
    causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    allowed = causal & (sid[:, :, None] == sid[:, None, :])  # (nc, Qi, Qj)
    log_decay = a_cum[:, :, None, :] - a_cum[:, None, :, :]  # (nc, Qi, Qj, H)
    decay = log_decay.masked_fill(~allowed[..., None], float("-inf")).exp()
    scores = torch.einsum("cihn,cjhn->cijh", C, B) * decay * dt[:, None, :, :]
    y = torch.einsum("cijh,cjhp->cihp", scores, x)

    # State at each chunk end, restricted to the document of the chunk's last position.
    same_as_last = (sid == sid[:, -1:])[..., None]  # (nc, Q, 1)
    w = torch.exp(a_cum[:, -1:, :] - a_cum) * dt * same_as_last
    local = torch.einsum("cjh,cjhn,cjhp->chpn", w, B, x)
    # Carry across chunks; a chunk whose end lies in a new document drops the carried state.
    chunk_decay = a_cum[:, -1, :].exp()[..., None, None]  # (nc, H, 1, 1)
    prev_end = torch.cat([sid[:1, :1] - 1, sid[:-1, -1:]])  # (nc, 1): document of the previous chunk's end
    keep = (sid[:, -1:] == prev_end).to(local.dtype)[..., None, None]  # (nc, 1, 1, 1)
    state, carried = torch.zeros_like(local[0]), []
    for c in range(nc):
        carried.append(state)
        state = local[c] + state * chunk_decay[c] * keep[c]
    state_in = torch.stack(carried)  # (nc, H, P, N): state entering each chunk
    from_prev = (sid == prev_end)[..., None]  # positions still in the previous chunk's document
    y = y + torch.einsum("cihn,chpn->cihp", C, state_in) * (a_cum.exp() * from_prev)[..., None]
    y = y.reshape(nc * Q, H, P)[:T]
    if D is not None:
        y = y + x.reshape(nc * Q, H, P)[:T] * D.float()[:, None]
    return y.to(out_dtype).contiguous()  # (T, H, P) row-major like the kernel: callers .view() it
