"""hnet.ops reference kernels against plain, obviously-correct loops, and backend selection."""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import hnet.ops
import hnet.ops.attention as attention_ops
from hnet.modules.dynamic_chunking import RouterOutput, chunk, chunk_layout, dechunk
from hnet.modules.packing import PackedSeq
from hnet.ops import BackendError
from hnet.ops.attention import packed_attention, packed_attention_reference
from hnet.ops.backend import BACKENDS
from hnet.ops.conv import causal_conv1d, causal_conv1d_reference
from hnet.ops.ssd import ssd_scan, ssd_scan_reference


def cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def seq_idx(lengths: list[int]) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32), torch.tensor(lengths))


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    scale = float(expected.abs().max())
    err = float((actual.double() - expected.double()).abs().max())
    assert err <= rel * scale, f"max abs error {err:.3e} > {rel:g} * {scale:.3e}"


# ---- SSD scan ------------------------------------------------------------------------------------


def ssd_loop(x, dt, A, B, C, sidx, D, dt_bias):
    """Sequential fp64 recurrence: h = exp(dt A) h + dt x B^T, y = h C + D x, h = 0 at each new document."""
    x, dt, A, B, C, D, dt_bias = (t.double() for t in (x, dt, A, B, C, D, dt_bias))
    T, H, P = x.shape
    G, N = B.shape[1:]
    dt = F.softplus(dt + dt_bias)
    y = torch.zeros(T, H, P, dtype=torch.float64)
    h = torch.zeros(H, P, N, dtype=torch.float64)
    for t in range(T):
        if t == 0 or sidx[t] != sidx[t - 1]:
            h = torch.zeros_like(h)
        for head in range(H):
            g = head // (H // G)
            h[head] = torch.exp(dt[t, head] * A[head]) * h[head] + dt[t, head] * torch.outer(x[t, head], B[t, g])
            y[t, head] = h[head] @ C[t, g] + D[head] * x[t, head]
    return y


@pytest.mark.parametrize("G", [1, 2])
def test_ssd_reference_matches_sequential_loop(G):
    # chunk 16; T = 77 (not a multiple); documents of length 1, one starting exactly on a chunk boundary,
    # one spanning three chunks, and a trailing partial chunk.
    lengths = [1, 15, 16, 1, 40, 4]
    T, H, P, N, Q = sum(lengths), 4, 8, 6, 16
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, H, P, generator=g)
    dt = torch.randn(T, H, generator=g) - 1.0
    dt_bias = torch.randn(H, generator=g) * 0.5
    A = -torch.exp(torch.rand(H, generator=g) * 2)
    B = torch.randn(T, G, N, generator=g)
    C = torch.randn(T, G, N, generator=g)
    D = torch.randn(H, generator=g)
    sidx = seq_idx(lengths)

    y = ssd_scan_reference(x, dt, A, B, C, Q, sidx, D=D, dt_bias=dt_bias, dt_softplus=True)
    expected = ssd_loop(x, dt, A, B, C, sidx, D, dt_bias)
    assert y.shape == (T, H, P) and y.dtype == torch.float32
    assert_rel_close(y, expected, 1e-4)
    # The dispatcher picks the reference on CPU.
    y2 = ssd_scan(x, dt, A, B, C, chunk_size=Q, seq_idx=sidx, D=D, dt_bias=dt_bias, dt_softplus=True)
    assert torch.equal(y, y2)


def test_ssd_reference_documents_are_independent():
    # Without resets the states would leak: the second document must not depend on the first.
    T, H, P, N = 40, 2, 4, 3
    g = torch.Generator().manual_seed(1)
    x, dt = torch.randn(T, H, P, generator=g), torch.rand(T, H, generator=g)
    A, B, C = -torch.ones(H), torch.randn(T, 1, N, generator=g), torch.randn(T, 1, N, generator=g)
    sidx = seq_idx([23, 17])
    y = ssd_scan_reference(x, dt, A, B, C, 16, sidx)
    alone = ssd_scan_reference(x[23:], dt[23:], A, B[23:], C[23:], 16, torch.zeros(17, dtype=torch.int32))
    torch.testing.assert_close(y[23:], alone, rtol=1e-5, atol=1e-5)
    assert y.is_contiguous()


# ---- dechunk EMA ---------------------------------------------------------------------------------


def make_router(lengths: list[int], seed: int) -> tuple[RouterOutput, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    p = torch.rand(T, generator=g)
    p[::7] = 1 - 1e-7  # above the clamp: must be clamped to 1 - 1e-4
    p[3::11] = 0.5  # exactly 0.5 is not a boundary (strict >)
    cus = cu(lengths)
    p[cus[:-1].long()] = 1.0
    mask = p > 0.5
    return RouterOutput(p, mask, torch.maximum(p, 1 - p)), cus


def test_dechunk_matches_ema_loop():
    # Enough chunks (> 256) to cross the internal SSD chunk of the dechunk scan; several documents.
    lengths = [1, 130, 2, 420, 57, 1]
    router, cus = make_router(lengths, seed=0)
    counts = [int(router.boundary_mask[a:b].sum()) for a, b in zip(cus[:-1].tolist(), cus[1:].tolist())]
    assert sum(counts) > 256
    chunk_cu = cu(counts)
    d = 64
    chunks = torch.randn(sum(counts), d, generator=torch.Generator().manual_seed(1))
    layout = chunk_layout(router, PackedSeq(cus))
    assert layout.seq.cu_seqlens.tolist() == chunk_cu.tolist()
    out = dechunk(chunks, router, layout)

    # Plain loop in fp64: EMA over chunks with reset at each chunk-level document.
    P = router.boundary_prob[router.boundary_mask].double().clamp(1e-4, 1 - 1e-4)
    chunk_doc = seq_idx(counts)
    z = torch.zeros(len(P), d, dtype=torch.float64)
    prev = torch.zeros(d, dtype=torch.float64)
    for i in range(len(P)):
        if i == 0 or chunk_doc[i] != chunk_doc[i - 1]:
            prev = torch.zeros(d, dtype=torch.float64)
        prev = P[i] * chunks[i].double() + (1 - P[i]) * prev
        z[i] = prev
    expected = torch.stack([z[int(router.boundary_mask[: t + 1].sum()) - 1] for t in range(sum(lengths))])
    assert out.shape == (sum(lengths), d) and out.dtype == chunks.dtype
    assert_rel_close(out, expected, 1e-4)


def test_chunk_keeps_boundaries_and_counts_per_document():
    lengths = [1, 9, 2, 20]
    router, cus = make_router(lengths, seed=3)
    hidden = torch.randn(sum(lengths), 8)
    kept, layout = chunk(hidden, router, PackedSeq(cus))
    chunk_seq = layout.seq
    assert torch.equal(kept, hidden[router.boundary_mask])
    counts = [int(router.boundary_mask[a:b].sum()) for a, b in zip(cus[:-1].tolist(), cus[1:].tolist())]
    assert chunk_seq.cu_seqlens.dtype == torch.int32
    assert chunk_seq.cu_seqlens.tolist() == cu(counts).tolist()
    assert all(c >= 1 for c in counts)  # every document starts with a boundary


_EMA_CHECK = """
import torch
from hnet.ops import ema_scan, ema_triton
ema_triton.CONFIG = (8, 64, 1)  # several position blocks and channel blocks, a partial last one of each
lengths = [1, 10, 3, 20, 11]  # a one-position document, documents across block edges
seq = torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32), torch.tensor(lengths))
g = torch.Generator().manual_seed(0)
n, d = sum(lengths), 96  # the reference's heads are 32 channels wide
x = torch.randn(n, d + 3, generator=g)[:, 1 : 1 + d]  # rows strided
p = torch.rand(n, generator=g) * 0.98 + 0.01
dh = torch.randn(n, d, generator=g)
leaves = [t.clone().requires_grad_() for t in (x, p)]
ref = ema_scan(*leaves, seq)  # the SSD reference on the CPU
expected = torch.autograd.grad(ref, leaves, dh)
ours_leaves = [t.clone().requires_grad_() for t in (x, p)]
h = ema_triton.EmaScan.apply(*ours_leaves, seq)
torch.testing.assert_close(h, ref, rtol=1e-5, atol=1e-5)
for ours, want in zip(torch.autograd.grad(h, ours_leaves, dh), expected):
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-4)
"""


def test_ema_kernels_match_reference():
    """hnet.ops.ema_triton (the CUDA path's dechunk EMA) in Triton's interpreter, against the SSD reference."""
    run_in_triton_interpreter(_EMA_CHECK)


# ---- causal conv ---------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["silu", None])
def test_causal_conv_matches_per_document_conv(activation):
    lengths = [1, 2, 3, 10, 5, 1]  # several shorter than the width 4
    Dm, W = 6, 4
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sum(lengths), Dm, generator=g)
    weight = torch.randn(Dm, W, generator=g)
    bias = torch.randn(Dm, generator=g)
    out = causal_conv1d_reference(x, weight, bias, seq_idx(lengths), activation)
    pieces = []
    for doc in torch.split(x, lengths):
        y = F.conv1d(F.pad(doc.t()[None], (W - 1, 0)), weight[:, None, :], bias, groups=Dm)[0].t()
        pieces.append(F.silu(y) if activation == "silu" else y)
    torch.testing.assert_close(out, torch.cat(pieces), rtol=1e-5, atol=1e-5)
    if activation == "silu":
        assert torch.equal(causal_conv1d(x, weight, bias, seq_idx(lengths)), out)


def run_in_triton_interpreter(script: str) -> None:
    """Run a check script with Triton's interpreter on the CPU; skipped where Triton is missing (CI)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # read when a kernel is decorated: a fresh process
    done = subprocess.run([sys.executable, "-c", _INTERPRETER_SHIM + script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


_INTERPRETER_SHIM = """
import triton.runtime.interpreter as interpreter

# Triton 3.6's interpreter turns loop bounds that depend on a program id (1-element arrays) into ints with
# int(array), which NumPy 2.4 refuses; .item() is what it means.
_patch = interpreter._patch_lang_tensor
def _patch_index(tensor, scope):
    _patch(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))
interpreter._patch_lang_tensor = _patch_index
"""

_CONV_CHECK = """
import torch
from hnet.ops import conv_triton
from hnet.ops.conv import causal_conv1d_reference
conv_triton.ROWS, conv_triton.BLOCK_C = 8, 16  # several row runs and channel blocks, a partial last one of each
lengths = [5, 1, 20, 2, 9, 3]  # documents shorter than the width, and runs that start mid-document
seq = torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32), torch.tensor(lengths))
g = torch.Generator().manual_seed(0)
T, C = sum(lengths), 24
x = torch.randn(T, C + 7, generator=g)[:, 3 : 3 + C]  # rows strided, as in in_proj's output
weight, bias, dy = torch.randn(C, 4, generator=g), torch.randn(C, generator=g), torch.randn(T, C, generator=g)
leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
expected = torch.autograd.grad(causal_conv1d_reference(*leaves, seq), leaves, dy)
dx = torch.full((T, C + 5), float("nan"))[:, 5:]  # written in place, every element
for ours, ref in zip(conv_triton.causal_conv1d_silu_bwd(x, weight, bias, dy, seq, dx=dx), expected):
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
conv_triton.FWD_CONFIG = (8, 16, 1)
for b in (bias, None):
    ref = causal_conv1d_reference(x, weight, b, seq)
    torch.testing.assert_close(conv_triton.causal_conv1d_silu_fwd(x, weight, b, seq), ref, rtol=1e-5, atol=1e-5)
"""


def test_conv_kernels_match_reference():
    """hnet.ops.conv_triton (the CUDA path's conv) in Triton's interpreter, against the reference and autograd."""
    run_in_triton_interpreter(_CONV_CHECK)


_SSD_KERNELS_CHECK = """
import torch
import torch.nn.functional as F
from hnet.ops import ssd_triton
from hnet.ops.ssd import ssd_scan_reference

H, G, P, N = 4, 2, 16, 16
_empty = torch.empty  # the kernels' buffers start as NaN, so a read of an element no kernel wrote shows
torch.empty = lambda *a, **k: (lambda t: t.fill_(float("nan")) if t.is_floating_point() else t)(_empty(*a, **k))


def case(lengths, Q, seed, D, A, bias):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    nc = -(-T // Q)
    seq = torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32), torch.tensor(lengths))
    x, dy = torch.randn(T, H, P, generator=g), torch.randn(T, H, P, generator=g)
    B, C = torch.randn(T, G, N, generator=g) * 0.5, torch.randn(T, G, N, generator=g) * 0.5
    dt_raw = torch.randn(T, H, generator=g) - 1.5
    dt_raw[0, 0] = 25.0  # above the softplus threshold: passed through
    dt = F.softplus(dt_raw + bias, threshold=20)
    dstates = torch.randn(nc, H, P, N, generator=g)
    # The other kernels' terms of dA's gradient: by increment (handed over as the differences whose cumsum
    # it is, as mamba_ssm's dB kernel leaves it), by cumsum position, by chunk end.
    g_inc, g_cs = torch.randn(nc, Q, H, generator=g), torch.randn(nc, Q, H, generator=g)
    g_end = torch.randn(nc, H, generator=g)
    pad = lambda t: torch.cat([t, t.new_zeros(nc * Q - T, *t.shape[1:])])  # dt 0 past the end, as mamba_ssm's
    dA = pad(dt * A).view(nc, Q, H).cumsum(1)
    seqp = torch.cat([seq, seq.new_full((nc * Q - T,), -1)]).view(nc, Q)
    CB = torch.einsum("cmgn,ckgn->cgmk", pad(C).view(nc, Q, G, N), pad(B).view(nc, Q, G, N))
    CB = CB * (seqp[:, None, :, None] == seqp[:, None, None, :])  # across documents: zero, as the library's
    # The state entering each chunk, by the plain recurrence over positions.
    h, states, Bh = torch.zeros(H, P, N), torch.zeros(nc, H, P, N), B.repeat_interleave(H // G, dim=1)
    for t in range(T):
        if t and seq[t] != seq[t - 1]:
            h = torch.zeros_like(h)
        h = (dt[t] * A).exp()[:, None, None] * h + dt[t][:, None, None] * x[t][:, :, None] * Bh[t][:, None, :]
        if t % Q == Q - 1 and t // Q + 1 < nc:
            states[t // Q + 1] = h
    # Autograd over dense position x position weights. The dx kernel's gradients are x's, D's, dt's where dt
    # is used itself (dtl) and dA's increments' through the scan's weights (inc; not through the state a
    # chunk passes on, whose dA term g_inc stands for); dt_grad's are dt_raw's, A's and the bias's.
    xl, Dl, rawl, Al, biasl = leaves = [t.clone().requires_grad_() for t in (x, D, dt_raw, A, bias)]
    dtf = F.softplus(rawl + biasl, threshold=20)
    dtl, inc = dtf.clone(), pad(dtf * Al).view(nc, Q, H)
    pos, cs = torch.arange(T), inc.cumsum(1)
    dAf = cs.view(-1, H)[:T]
    same = (pos[:, None] // Q == pos[None, :] // Q) & (pos[None, :] <= pos[:, None]) & (seq[:, None] == seq[None, :])
    W = torch.einsum("tgn,sgn->tsg", C, B).repeat_interleave(H // G, dim=2) * same[..., None]
    W = W * (dAf[:, None] - dAf[None, :]).clamp(max=0).exp()
    last = seq[torch.clamp(pos // Q * Q + Q - 1, max=T - 1)]
    end = ((dA[:, -1].repeat_interleave(Q, 0)[:T] - dAf.detach()).exp() * (seq == last)[:, None])
    y = torch.einsum("tsh,sh,shp->thp", W, dtl, xl) + Dl[:, None] * xl
    local = torch.zeros(nc, H, P, N).index_add(0, pos // Q, torch.einsum("th,thp,thn->thpn", end * dtl, xl, Bh))
    loss = (y * dy).sum() + (local * dstates).sum()
    loss = loss + (inc * g_inc).sum() + (cs * g_cs).sum() + (cs[:, -1] * g_end).sum()
    grads = torch.autograd.grad(loss, [*leaves, dtl, inc])
    lay = lambda t: pad(t).view(nc, Q, H).permute(2, 0, 1)  # (T, H) -> (H, nc, Q)
    return dict(x=x, dy=dy, B=B, C=C, dt=lay(dt), dA=dA.permute(2, 0, 1), CB=CB, states=states, dstates=dstates,
                seq=seq, y=ssd_scan_reference(x, dt, A, B, C, chunk_size=Q, seq_idx=seq, D=D), dt_raw=dt_raw,
                ddA_next=g_inc.diff(dim=1, prepend=torch.zeros(nc, 1, H)).permute(2, 0, 1),
                ddA_prev=g_cs.permute(2, 0, 1), ddA_end=g_end.t(),
                dx=grads[0], dD=grads[1], ddt_raw=grads[2], dA_param=grads[3], dbias=grads[4], ddt=lay(grads[5]),
                ddA_scan=grads[6].permute(2, 0, 1))


def check(Q, lengths_a, lengths_b):
    D = torch.randn(H, generator=torch.Generator().manual_seed(2))
    A = -torch.rand(H, generator=torch.Generator().manual_seed(3)) * 2 - 0.1
    bias = torch.randn(H, generator=torch.Generator().manual_seed(4)) * 0.5
    a, b = case(lengths_a, Q, 0, D, A, bias), case(lengths_b, Q, 1, D, A, bias)  # two rows of one batch
    both = {k: torch.stack([a[k], b[k]]) for k in a if k not in ("dD", "dA_param", "dbias")}
    y = ssd_triton.chunk_scan_fwd(both["CB"], both["x"], both["dt"], both["dA"], both["C"], both["states"], D,
                                  both["seq"])
    for i, r in enumerate((a, b)):
        torch.testing.assert_close(y[i], r["y"], rtol=1e-4, atol=1e-4)
    out = torch.full((*both["x"].shape[:-1], P + 3), float("nan"))[..., 3:]  # written in place, every element
    dx, ddt, ddA_scan, dD = ssd_triton.chunk_scan_bwd_dx(both["x"], both["dt"], both["dA"], both["B"], both["CB"],
                                                          both["dy"], both["dstates"], D, both["seq"], dx=out)
    assert dx.data_ptr() == out.data_ptr()
    torch.testing.assert_close(dx, both["dx"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ddt, both["ddt"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dD, a["dD"] + b["dD"], rtol=1e-4, atol=1e-4)
    ddt_raw = torch.full((*both["dt_raw"].shape[:-1], H + 2), float("nan"))[..., 2:]  # a strided slice, as in zxbcdt
    dA, dbias = ssd_triton.dt_grad(ddA_scan, both["ddA_next"].contiguous(), both["ddA_prev"].contiguous(),
                                   both["ddA_end"], ddt, both["dt"].contiguous(), both["dt_raw"], A, bias, ddt_raw)
    torch.testing.assert_close(ddt_raw, both["ddt_raw"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dA, a["dA_param"] + b["dA_param"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dbias, a["dbias"] + b["dbias"], rtol=1e-4, atol=1e-4)
    # The scan's term matters at this tolerance: the check fails without it.
    assert both["ddA_scan"].abs().amax() > 1e-2 and (both["ddA_scan"] * both["dt"]).sum(-1).abs().amax() > 1e-2


# Documents shorter than a chunk, longer than one, starting mid-chunk; a short last chunk.
check(64, [10, 150, 1, 39], [200])
ssd_triton.SCAN_CONFIG = ssd_triton.DX_CONFIG = (16, 8, 1, 1, 0)  # several row tiles and steps per chunk
ssd_triton.DT_BLOCK_H = 2  # several head blocks
check(32, [3, 60, 33, 4, 1], [17, 84])
"""


def test_ssd_chunk_scan_kernels_match_reference():
    """hnet.ops.ssd_triton (the CUDA path's chunk scan and its dx backward) in Triton's interpreter, against
    the reference scan and autograd."""
    run_in_triton_interpreter(_SSD_KERNELS_CHECK)


_STATE_PASSING_CHECK = """
import torch
from hnet.ops import ssd_triton


def check(lengths, Q, H=3, dim=40):
    g = torch.Generator().manual_seed(len(lengths))
    T = sum(lengths)
    nc = -(-T // Q)
    seq = torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32), torch.tensor(lengths))[None]
    local = torch.randn(1, nc, H, dim, generator=g)
    dA = -torch.rand(1, H, nc, Q, generator=g)[..., -1] * 3  # a strided view, as the cumsum's last column
    dout = torch.randn(1, H, nc, dim, generator=g).transpose(1, 2)  # heads-first strides, as the dstates kernel's
    # The recurrence by chunks with autograd: nothing carried across a chunk whose last position is in a
    # document other than the previous chunk's last position's.
    leaves = loc, dAl = local.clone().requires_grad_(), dA.clone().requires_grad_()
    ends = seq[0, torch.clamp(torch.arange(1, nc + 1) * Q, max=T) - 1]
    prev = torch.cat([ends.new_zeros(1), ends[:-1]])
    state, outs = torch.zeros(H, dim), [torch.zeros(H, dim)]
    for c in range(nc - 1):
        state = (dAl[0, :, c].exp() * (ends[c] == prev[c]))[:, None] * state + loc[0, c]
        outs.append(state)
    ref = torch.stack(outs)[None]
    grads = torch.autograd.grad((ref * dout).sum(), leaves) if nc > 1 else [torch.zeros_like(t) for t in leaves]
    out = ssd_triton.state_passing_fwd(local, dA, seq, Q, torch.float32)
    torch.testing.assert_close(out, ref.detach())
    dlocal, ddA = ssd_triton.state_passing_bwd(out, dA, dout, seq, Q, torch.float32)
    torch.testing.assert_close(dlocal, grads[0])
    torch.testing.assert_close(ddA, grads[1])
    assert (dlocal[0, -1] == 0).all() and (nc == 1 or (dlocal.abs().amax() > 1 and ddA.abs().amax() > 1))


ssd_triton.STATE_PASSING_CONFIG = (16, 1)  # three blocks of the 40 entries, the last one partial
check([10, 150, 1, 39], 32)  # a one-position document at a chunk's end: nothing carried past it
check([64, 31, 1, 100], 32)  # documents ending on chunk ends
check([20], 32)  # one chunk: a zero state, nothing to pass
"""


def test_state_passing_kernels_match_the_recurrence():
    """hnet.ops.ssd_triton's state passing, forward and backward, in Triton's interpreter against the chunk
    recurrence and autograd."""
    run_in_triton_interpreter(_STATE_PASSING_CHECK)


# ---- packed attention ----------------------------------------------------------------------------


def attention_per_document(q, k, v, lengths, window):
    outs, start = [], 0
    for n in lengths:
        qs, ks, vs = (t[start : start + n].transpose(0, 1) for t in (q, k, v))
        i = torch.arange(n)[:, None]
        j = torch.arange(n)[None, :]
        mask = j <= i
        if window >= 0:
            mask &= i - j <= window
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask).transpose(0, 1))
        start += n
    return torch.cat(outs)


def qkv(T, H=2, Dh=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(T, H, Dh, generator=g) for _ in range(3))


@pytest.mark.parametrize("window", [-1, 0, 3])
def test_packed_attention_matches_per_document(window):
    lengths = [1, 5, 2, 30, 9]
    q, k, v = qkv(sum(lengths))
    out = packed_attention_reference(q, k, v, cu(lengths), window)
    torch.testing.assert_close(out, attention_per_document(q, k, v, lengths, window), rtol=1e-5, atol=1e-5)
    assert torch.equal(packed_attention(q, k, v, cu(lengths), max(lengths), window), out)
    if window == 0:  # attends to itself only
        torch.testing.assert_close(out, v, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("window", [-1, 5])
def test_packed_attention_across_reference_blocks(window):
    assert attention_ops._REFERENCE_BLOCK == 2048
    lengths = [1, 1200, 900, 2100, 5]  # > 2048 in total, and one document longer than a block
    q, k, v = qkv(sum(lengths), H=1, Dh=4, seed=1)
    out = packed_attention_reference(q, k, v, cu(lengths), window)
    torch.testing.assert_close(out, attention_per_document(q, k, v, lengths, window), rtol=1e-5, atol=1e-5)


def test_packed_attention_small_block_grouping(monkeypatch):
    monkeypatch.setattr(attention_ops, "_REFERENCE_BLOCK", 7)
    lengths = [3, 3, 1, 9, 2, 4, 1]
    q, k, v = qkv(sum(lengths), seed=2)
    out = packed_attention_reference(q, k, v, cu(lengths), 2)
    torch.testing.assert_close(out, attention_per_document(q, k, v, lengths, 2), rtol=1e-5, atol=1e-5)


class _FakeFlash:
    """FlashAttention-2's forward (the aten op) and ``flash_attn.cute.interface``'s backward on the CPU, over the
    reference: they check what the FlashAttention-4 path hands them and return what the real ones return."""

    def __init__(self, lengths: list[int]):
        self.lengths, self.calls = lengths, []

    def _window(self, causal, window_size_left, **kwargs):
        assert causal and "window_size_right" not in kwargs  # causal sets the right edge
        assert window_size_left is None or window_size_left >= 0  # the package reads -1 as a window, not none
        return -1 if window_size_left is None else window_size_left

    def _check_layout(self, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
        assert cu_seqlens_q is cu_seqlens_k and torch.equal(cu_seqlens_q, cu(self.lengths))
        assert max_seqlen_q == max_seqlen_k == max(self.lengths)

    def scores(self, q, k, window, scale):
        """(H, T, T) scaled scores, -inf outside the document's causal window; and the scale."""
        Dh = q.shape[-1]
        mask = attention_ops.document_mask(torch.repeat_interleave(torch.arange(len(self.lengths)),
                                                                   torch.tensor(self.lengths)), window)
        scale = Dh**-0.5 if scale is None else scale
        return (torch.einsum("thd,shd->hts", q, k) * scale).masked_fill(~mask, float("-inf")), scale

    def flash2_forward(self, q, k, v, cu_seqlens, max_seqlen, window, scale):
        """Traced by dynamo, as the aten op is: the layout (data-dependent) is checked in the eager run."""
        if not torch.compiler.is_compiling():
            self._check_layout(cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)
        self.calls.append(("fa2 fwd", window, scale))
        scores, _ = self.scores(q, k, window, scale)
        out = torch.einsum("hts,shd->thd", scores.softmax(-1), v)
        return out, scores.logsumexp(-1), torch.zeros(2, dtype=torch.int64), torch.zeros((), dtype=torch.int64)

    def _flash_attn_bwd(self, q, k, v, out, dout, lse, *, softmax_scale, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                        max_seqlen_k, deterministic, **kwargs):
        self._check_layout(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        window = self._window(**kwargs)
        self.calls.append(("fa4 bwd", window, softmax_scale))
        assert dout.is_contiguous()
        scores, scale = self.scores(q, k, window, softmax_scale)
        p = (scores - lse[..., None]).exp()  # the softmax from the forward's lse, as FlashAttention's backward
        dp = torch.einsum("thd,shd->hts", dout, v)
        ds = p * (dp - torch.einsum("thd,thd->ht", dout, out)[..., None])
        dq, dk = torch.einsum("hts,shd->thd", ds, k) * scale, torch.einsum("hts,thd->shd", ds, q) * scale
        return dq, dk, torch.einsum("hts,thd->shd", p, dout), None  # the package's fourth: the sink's gradient


@pytest.mark.parametrize("window, scale", [(-1, None), (3, 0.7)])
def test_flash_attn_4_backend_runs_flash2_forward_and_flash4_backward(monkeypatch, window, scale):
    """packed_attention's FlashAttention-4 path: FlashAttention-2's forward, whose softmax statistics FA4's backward
    custom op reads; what each is handed, the gradients, and one graph with no break under torch.compile (both
    run on the CPU reference here)."""
    import types

    lengths = [1, 6, 2, 9]
    fake = _FakeFlash(lengths)
    monkeypatch.setitem(sys.modules, "flash_attn.cute.interface", types.SimpleNamespace(
        _flash_attn_bwd=fake._flash_attn_bwd))
    monkeypatch.setattr(attention_ops, "_flash2_forward", fake.flash2_forward)
    monkeypatch.setattr(attention_ops, "_VARLEN_HAS_WINDOW", True)
    monkeypatch.setattr(attention_ops, "resolve", lambda op, device, dtype: "flash_attn_4")
    q, k, v = qkv(sum(lengths), seed=3)
    dout = torch.randn(sum(lengths), 2, 16)[..., ::2]  # not contiguous: the backward hands on a contiguous copy
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = packed_attention_reference(*leaves, cu(lengths), window, scale)
    expected_grads = torch.autograd.grad(expected, leaves, dout)

    def loss(q, k, v):
        return packed_attention(q, k, v, cu(lengths), max(lengths), window, scale)

    for fn in (loss, torch.compile(loss, backend="aot_eager", fullgraph=True)):
        fake.calls.clear()
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
        for got, ref in zip(torch.autograd.grad(out, leaves, dout), expected_grads):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        assert fake.calls == [("fa2 fwd", window, scale), ("fa4 bwd", window, scale)]


# ---- backend selection ---------------------------------------------------------------------------


@pytest.fixture
def restore_backends():
    yield
    hnet.ops.configure(**{op: "auto" for op in BACKENDS})


def test_configure_rejects_unknown_op_and_backend(restore_backends):
    with pytest.raises(BackendError, match=r"unknown op 'sdd'.*ssd"):
        hnet.ops.configure(sdd="torch")
    with pytest.raises(BackendError, match=r"ssd backend 'cuda' is not one of: auto, torch, triton"):
        hnet.ops.configure(ssd="cuda")
    with pytest.raises(BackendError, match=r"attention backend 'xformers'"):
        hnet.ops.configure(attention="xformers")
    assert issubclass(BackendError, ValueError)


def test_forced_cuda_backend_fails_on_cpu_when_run(restore_backends):
    T = 6
    sidx = torch.zeros(T, dtype=torch.int32)
    x, dt = torch.randn(T, 1, 4), torch.rand(T, 1)
    B = C = torch.randn(T, 1, 2)
    q = k = v = torch.randn(T, 1, 4)

    hnet.ops.configure(ssd="triton")  # configuring is fine; running on CPU is not
    with pytest.raises(BackendError, match=r"ssd backend 'triton' cannot run on cpu"):
        ssd_scan(x, dt, -torch.ones(1), B, C, chunk_size=4, seq_idx=sidx)
    hnet.ops.configure(ssd="torch", conv="cuda")
    ssd_scan(x, dt, -torch.ones(1), B, C, chunk_size=4, seq_idx=sidx)  # the reference runs
    with pytest.raises(BackendError, match=r"conv backend 'cuda' cannot run on cpu"):
        causal_conv1d(torch.randn(T, 3), torch.randn(3, 4), None, sidx)
    for name in ("flash_attn_4", "flash_attn", "varlen", "flex"):
        hnet.ops.configure(attention=name)
        with pytest.raises(BackendError, match=rf"attention backend '{name}' cannot run on cpu"):
            packed_attention(q, k, v, cu([T]), T)
    hnet.ops.configure(norm="triton")
    with pytest.raises(BackendError, match=r"norm backend 'triton'"):
        hnet.ops.rms_norm(torch.randn(T, 4), torch.ones(4), 1e-5)

    hnet.ops.configure(**{op: "auto" for op in BACKENDS})
    assert hnet.ops.resolve("ssd", torch.device("cpu")) == "torch"
    assert hnet.ops.resolve("attention", torch.device("cpu")) == "sdpa"
    assert math.isfinite(float(packed_attention(q, k, v, cu([T]), T).sum()))


def test_selection_on_a_gpu_with_every_package(restore_backends, monkeypatch):
    """What a CUDA machine with mamba_ssm, causal_conv1d and flash_attn runs, eager and inside compiled blocks."""
    from hnet.ops import backend

    monkeypatch.setitem(backend._INSTALLED, "mamba_ssm", True)
    monkeypatch.setitem(backend._INSTALLED, "causal_conv1d", True)
    monkeypatch.setitem(backend._INSTALLED, "flash_attn_2_cuda", True)
    cuda = torch.device("cuda")
    assert hnet.ops.selection(cuda, torch.bfloat16) == {
        "ssd": "triton", "conv": "cuda", "attention": "flash_attn", "norm": "triton",
    }
    # Inductor fuses the norms' PyTorch formula with their neighbours; flash kernels need half precision.
    assert hnet.ops.selection(cuda, torch.float32, compiled=True) == {
        "ssd": "triton", "conv": "cuda", "attention": "sdpa", "norm": "triton (torch in compiled blocks)",
    }
    hnet.ops.configure(norm="triton")  # a forced backend holds inside compiled blocks too
    assert hnet.ops.selection(cuda, torch.bfloat16, compiled=True)["norm"] == "triton"
    with pytest.raises(BackendError, match=r"norm backend 'triton' cannot run on cpu"):
        hnet.ops.selection(torch.device("cpu"), torch.float32)

    # FlashAttention-4 as well: the automatic choice from Hopper on, FlashAttention-2 before it.
    monkeypatch.setitem(backend._INSTALLED, "flash_attn.cute", True)
    for major, chosen in ((9, "flash_attn_4"), (10, "flash_attn_4"), (8, "flash_attn")):
        monkeypatch.setattr(backend, "capability", lambda device: major)
        assert hnet.ops.resolve("attention", cuda, torch.bfloat16) == chosen
        assert hnet.ops.resolve("attention", cuda, torch.float32) == "sdpa"
    hnet.ops.configure(attention="flash_attn_4")  # forced, it runs wherever the package does
    assert hnet.ops.resolve("attention", cuda, torch.bfloat16) == "flash_attn_4"


def test_flash_attn_2_is_not_flash_attn_4s_namespace(tmp_path, monkeypatch):
    """flash-attn-4 alone installs flash_attn/cute/ with no flash_attn/__init__.py: ``import flash_attn`` works
    then, but FlashAttention-2 is not there, and the backend check must say so."""
    from hnet.ops import backend

    (tmp_path / "flash_attn" / "cute").mkdir(parents=True)
    (tmp_path / "flash_attn" / "cute" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert backend.installed("flash_attn") and backend.installed("flash_attn.cute")
    assert not backend.installed("flash_attn_2_cuda") and not backend.installed("flash_attn.other")
    assert backend.installed("torch.nn.attention.varlen") and not backend.installed("no_such_package.cute")


def test_compiled_code_resolves_without_logging(restore_backends, monkeypatch):
    """Inside torch.compile resolve() must not touch its logged-once state: a traced read or write of it
    becomes a guard, and eager calls changing it would recompile the block every step."""
    from hnet.ops import backend

    monkeypatch.setattr(backend, "_last", {})

    @torch.compile(backend="eager", fullgraph=True)
    def pick(x):
        return x + (1 if hnet.ops.resolve("norm", x.device) == "torch" else 2)

    assert pick(torch.zeros(2)).tolist() == [1.0, 1.0]
    assert backend._last == {}


class _StubConfig:
    def __init__(self, block: int, hook):
        self.block, self.pre_hook = block, hook

    def all_kwargs(self) -> dict:
        return {"BLOCK": self.block}


class _StubTuner:
    """The part of Triton's Autotuner that TunedKernel uses: picks BLOCK 8 for n > 4, else 4."""

    arg_names, keys = ["x_ptr", "acc_ptr", "n"], ["n"]

    def __init__(self):
        self.tuned, self.launched, self.zeroed = [], [], []
        self.fn = type("Fn", (), {"run": lambda _, *a, **kw: self.launched.append((a, kw))})()

    def run(self, *args, grid, warmup, **kwargs):
        self.tuned.append(args)
        hook = lambda nargs: self.zeroed.append(nargs["acc_ptr"])  # noqa: E731
        self.best_config = _StubConfig(8 if args[2] > 4 else 4, hook)


def test_tuned_kernel_launches_the_tuners_choice_per_key():
    """The autotuner sees each new key once; later launches get its config and its pre-hook."""
    from hnet.ops.tuned_launch import TunedKernel

    tuner = _StubTuner()
    kernel = TunedKernel(tuner)
    x32, x16, acc = torch.zeros(3), torch.zeros(3, dtype=torch.float16), torch.zeros(1)
    kernel["grid"](x32, acc, 10)
    kernel["grid"](x32, acc, 10)
    kernel["grid"](x32, acc, n=10)  # the key argument by name: the same key
    assert len(tuner.tuned) == 1 and len(tuner.launched) == 2
    assert all(kw == {"grid": "grid", "warmup": False, "BLOCK": 8} | ({"n": 10} if "n" in kw else {})
               for _, kw in tuner.launched)
    assert tuner.zeroed == [acc, acc]  # the chosen config's pre-hook, with the arguments by name
    kernel["grid"](x32, acc, 3)  # another key value, another dtype: back to the tuner
    kernel["grid"](x16, acc, 10)
    assert len(tuner.tuned) == 3
    kernel["grid"](x32, acc, 3)
    assert tuner.launched[-1][1]["BLOCK"] == 4
    assert kernel.best_config.block == 4 and kernel.keys == ["n"]  # the latest launch's config; the tuner's attributes
