"""CUDA fast path vs the pure-PyTorch reference (scripts/check_kernels.py at a test-sized workload).

Marked ``gpu``; skipped without CUDA. The full-size check (8 x 8192 bytes) is the script itself.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
TOLERANCE = 2e-2


@pytest.fixture(scope="module")
def check_kernels():
    path = Path(__file__).resolve().parents[1] / "scripts" / "check_kernels.py"
    spec = importlib.util.spec_from_file_location("check_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    module.ops.configure(ssd="auto", conv="auto", attention="auto", norm="auto")


def test_each_fast_op_matches_its_reference(check_kernels):
    for name, errors in check_kernels.check_ops(docs=2, doc_len=2048).items():
        assert max(errors.values()) < TOLERANCE, (name, errors)


@pytest.mark.parametrize("trained", [False, True], ids=["eager", "compiled_tf32"])
@pytest.mark.parametrize("flavor", ["hnet_1stage_L", "hnet_2stage_L"])
def test_model_fast_path_matches_reference(check_kernels, flavor, trained):
    r = check_kernels.check_model(flavor, docs=2, doc_len=2048, tolerance=TOLERANCE, trained=trained)
    print(flavor, trained, {k: r[k] for k in ("logits", "grad_global", "grad_max", "worst_over_floor")})  # shown by -rP
    assert r["logits"] < TOLERANCE and r["grad_global"] < TOLERANCE, r
    assert r["within_floor"], r["grad_worst"]
    b = r["backends"]
    assert (b["ssd"], b["conv"], b["norm"]) == ("triton", "cuda", "triton")
    assert b["attention"] in ("varlen", "flash_attn", "flash_attn_4")


def _split_conv_scan_case(ngroups: int):
    """A Mamba2 layer's inputs (documents of odd lengths, one of a single position) and a runner that returns
    the output and every input's gradient for a function of them."""
    torch.manual_seed(0)
    dev, bf16 = torch.device("cuda"), torch.bfloat16
    T, d, nheads, headdim, dstate = 3000, 256, 8, 64, 128  # T not a multiple of the chunk
    dim, conv_dim = nheads * headdim, nheads * headdim + 2 * ngroups * dstate
    params = {
        "zxbcdt": torch.randn(T, dim + conv_dim + nheads, device=dev, dtype=bf16),
        "conv_w": torch.randn(conv_dim, 4, device=dev, dtype=bf16) / 2,
        "conv_b": torch.randn(conv_dim, device=dev, dtype=bf16),
        "dt_bias": torch.randn(nheads, device=dev, dtype=bf16) - 3, "A": -torch.rand(nheads, device=dev) * 8 - 1,
        "D": torch.ones(nheads, device=dev), "norm_w": torch.rand(dim, device=dev, dtype=bf16) + 0.5,
        "outproj_w": torch.randn(d, dim, device=dev, dtype=bf16) / dim**0.5,
    }
    lengths = torch.tensor([700, 1, 299, 1500, 500])
    seq_idx = torch.repeat_interleave(torch.arange(len(lengths)), lengths).to(dev, torch.int32)
    dout = torch.randn(T, d, device=dev, dtype=bf16)

    def run(fn):
        leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
        out = fn(leaves)
        out.backward(dout)
        return [out] + [leaves[k].grad for k in params]

    return params, seq_idx, headdim, run


def _assert_close(names, ours, theirs) -> None:
    for name, a, b in zip(names, ours, theirs):
        err = ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
        print(name, err)  # shown by -rP
        assert err < 1e-3, (name, err)


@pytest.mark.parametrize("ngroups", [1, 2])  # 1: kernels launched heads first; 2: in the library's order
def test_split_conv_scan_keeping_states_matches_mamba_ssm(ngroups):
    """hnet.ops.mamba_fused (chunk states saved) == mamba_ssm's split-conv-scan (recomputed), forward and backward."""
    from mamba_ssm.ops.triton.ssd_combined import mamba_split_conv1d_scan_combined

    from hnet.ops import mamba_fused

    assert mamba_fused.available()
    params, seq_idx, headdim, run = _split_conv_scan_case(ngroups)
    ours = run(lambda p: mamba_fused.SplitConvScan.apply(*p.values(), seq_idx[None], 256, ngroups, 1e-5, False))
    theirs = run(lambda p: mamba_split_conv1d_scan_combined(
        p["zxbcdt"][None], p["conv_w"], p["conv_b"], p["dt_bias"], p["A"], p["D"], 256, seq_idx=seq_idx[None],
        activation="silu", rmsnorm_weight=p["norm_w"], rmsnorm_eps=1e-5, outproj_weight=p["outproj_w"],
        headdim=headdim, ngroups=ngroups, norm_before_gate=False)[0])
    _assert_close(["out", *params], ours, theirs)


def test_tuned_launch_matches_the_autotuner():
    """mamba_ssm's kernels launched past Triton's autotuner (hnet.ops.tuned_launch) == launched through it."""
    from hnet.ops import mamba_fused, tuned_launch

    assert mamba_fused.available()  # installs the tuned launches
    modules = [importlib.import_module(f"mamba_ssm.ops.triton.{m}") for m in tuned_launch.MAMBA_SSM_MODULES]
    tuned = {(m, name): k for m in modules for name, k in vars(m).items() if isinstance(k, tuned_launch.TunedKernel)}
    assert len(tuned) >= 11
    params, seq_idx, _, run = _split_conv_scan_case(1)
    layer = lambda p: mamba_fused.SplitConvScan.apply(*p.values(), seq_idx[None], 256, 1, 1e-5, False)  # noqa: E731
    run(layer)  # keys seen once: later launches skip the autotuner
    tuner_calls = []
    for k in tuned.values():
        k.tuner.run = lambda *a, _run=k.tuner.run, **kw: tuner_calls.append(1) or _run(*a, **kw)
    try:
        fast = run(layer)
        assert not tuner_calls
        for (m, name), k in tuned.items():
            setattr(m, name, k.tuner)
        reference = run(layer)
    finally:
        for (m, name), k in tuned.items():
            setattr(m, name, k)
            del k.tuner.run
    _assert_close(["out", *params], fast, reference)


def test_mamba_graphs_match_eager():
    """A Mamba2 layer replayed from CUDA graphs (hnet.ops.mamba_graphs) == called directly: at a captured length,
    at a shorter one that reuses the capture over stale padding, after a recapture; and where a graph cannot
    stand in (a second forward before the first's backward, checkpointing, no autograd) the layer runs eagerly."""
    import itertools

    from torch.utils.checkpoint import checkpoint

    from hnet import ops
    from hnet.modules.mamba2 import Mamba2
    from hnet.modules.packing import PackedSeq
    from hnet.ops import mamba_graphs

    ops.configure(ssd="triton", conv="cuda")  # the fused path, whatever an earlier test forced
    dev, bf16 = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    m = Mamba2(d=256, d_state=128, d_conv=4, expand=2, chunk_size=256, device=dev, dtype=bf16)
    m.init_weights(std=0.02, out_std=0.02)
    params = list(m.parameters())
    names = ["out", "u", *(n for n, _ in m.named_parameters())]

    def inputs(lengths: list[int], count: int = 1):
        g = torch.Generator(device=dev).manual_seed(sum(lengths))
        T = sum(lengths)
        seq = PackedSeq(torch.tensor([0, *itertools.accumulate(lengths)], device=dev))
        us = [torch.randn(T, 256, device=dev, dtype=bf16, generator=g).requires_grad_() for _ in range(count)]
        return seq, us, torch.randn(T, 256, device=dev, dtype=bf16, generator=g)

    def run(lengths: list[int], graphs: bool):
        mamba_graphs.configure(1 << 20 if graphs else 0)
        seq, (u,), dout = inputs(lengths)
        out = m(u, seq)
        return [out, *torch.autograd.grad(out, [u, *params], dout)]

    try:
        # 3,000 rows capture 3,072 at their third call in a row; 2,900 reuse them at once (the last 172 rows hold
        # 3,000's inputs); 1,000 capture 1,024, again at the third call
        stable = mamba_graphs.STABLE_CALLS
        for lengths, rows, calls in [([700, 1, 299, 1500, 500], 3072, stable), ([700, 1, 299, 1400, 500], 3072, 1),
                                     ([900, 100], 1024, stable)]:
            before = m.graphs.graphs
            for call in range(calls):
                assert m.graphs.graphs is before  # eager until the length has held for STABLE_CALLS calls
                graphed = run(lengths, graphs=True)
            assert m.graphs.graphs.rows == rows and m.graphs.graphs.generation == (1 if calls > 1 else 2)
            _assert_close(names, graphed, run(lengths, graphs=False))

        # Lengths that jump between buckets never hold for STABLE_CALLS calls: no capture
        captured = m.graphs.graphs
        for lengths in [[1500, 1500], [900, 100]] * stable:
            run(lengths, graphs=True)
        assert m.graphs.graphs is captured and captured.generation == 1 + stable

        def two_forwards(graphs: bool):
            mamba_graphs.configure(1 << 20 if graphs else 0)
            seq, us, dout = inputs([900, 100], count=2)
            first = m(us[0], seq)
            assert m.graphs.graphs.busy() == graphs
            second = m(us[1], seq)  # eager: the graph holds the first one's activations
            loss = (first.float() * dout).sum() + (second.float() * dout.flip(0)).sum()
            return torch.autograd.grad(loss, [*us, *params])

        _assert_close(names[1:2] * 2 + names[2:], two_forwards(True), two_forwards(False))
        assert not m.graphs.graphs.busy()

        mamba_graphs.configure(1 << 20)
        captured, generation = m.graphs.graphs, m.graphs.graphs.generation
        seq, (u,), _ = inputs([900, 100])
        checkpoint(m, u, seq, use_reentrant=False).float().sum().backward()
        with torch.no_grad():
            m(u, seq)
        assert m.graphs.graphs is captured and captured.generation == generation
    finally:
        mamba_graphs.configure(mamba_graphs.DEFAULT_MAX_POSITIONS)
        ops.configure(ssd="auto", conv="auto")
