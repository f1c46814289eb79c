"""Kernel times of one Mamba2 layer's fused chain on a CUDA GPU (docs/performance.md, changes 46-47).

    python scripts/bench_ssd.py --positions 65536
    python scripts/bench_ssd.py --positions 21845 --scan-configs 64,64,4,1,0 64,64,4,1,128 \
        --dx-configs 64,32,4,1,0 64,32,4,1,128

A layer at hnet_1stage_L's encoder shapes (d 1024, 32 heads x 64, state 128, 256-position chunks, one
group), random inputs in 8 documents. Prints:
- every kernel of its forward and backward (``hnet.ops.mamba_fused``), the profiler's mean over 5 calls;
- the state passing of ``hnet.ops.ssd_triton`` against mamba_ssm's, CUDA events over 20 calls each way,
  and the largest differences of their results;
- with ``--scan-configs`` / ``--dx-configs``: the chunk scan or its dx backward under each launch
  configuration (``SCAN_CONFIG`` / ``DX_CONFIG``'s five numbers), with the largest relative difference
  from the first configuration's results.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hnet.ops import mamba_fused, ssd_triton  # noqa: E402

D_MODEL, HEADS, HEADDIM, DSTATE, CHUNK, DOCS = 1024, 32, 64, 128, 256, 8


def cuda_ms(fn, reps: int = 20) -> float:
    """Mean time of ``fn()`` over ``reps`` calls after a warm-up call, by CUDA events."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def worst(ours, ref) -> float:
    """The largest relative difference over tensors: max |ours - ref| / max |ref|."""
    return max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item() for a, b in zip(ours, ref))


def layer_params(T: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    dim, conv_dim, dev, bf16 = HEADS * HEADDIM, HEADS * HEADDIM + 2 * DSTATE, "cuda", torch.bfloat16
    params = {
        "zxbcdt": torch.randn(T, dim + conv_dim + HEADS, device=dev, dtype=bf16),
        "conv_w": torch.randn(conv_dim, 4, device=dev, dtype=bf16) / 2,
        "conv_b": torch.randn(conv_dim, device=dev, dtype=bf16),
        "dt_bias": torch.randn(HEADS, device=dev) - 3, "A": -torch.rand(HEADS, device=dev) * 8 - 1,
        "D": torch.ones(HEADS, device=dev), "norm_w": torch.rand(dim, device=dev, dtype=bf16) + 0.5,
        "outproj_w": torch.randn(D_MODEL, dim, device=dev, dtype=bf16) / dim**0.5,
    }
    return params, (torch.arange(T, device=dev) * DOCS // T).int()


def layer_kernels(T: int) -> None:
    params, seq = layer_params(T)
    leaves = [p.requires_grad_() for p in params.values()]
    dout = torch.randn(T, D_MODEL, device="cuda", dtype=torch.bfloat16)

    def step():  # gradients returned, not accumulated into .grad: no adds the model would not run
        out = mamba_fused.split_conv_scan(*leaves, seq, chunk_size=CHUNK, ngroups=1, eps=1e-5, norm_before_gate=False)
        torch.autograd.grad(out, leaves, dout)

    for _ in range(3):  # Triton compiles, mamba_ssm's autotuners choose
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    us = collections.defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            us[e.name] += e.device_time_total / 5
    print(f"one layer, {T:,} positions: {sum(us.values()):.0f} us of kernels per forward + backward")
    for name, t in sorted(us.items(), key=lambda kv: -kv[1]):
        if t >= 5:
            print(f"  {t:8.1f} us  {name[:90]}")


def ssd_inputs(T: int) -> dict[str, torch.Tensor]:
    """The chunk scan's and the state passing's inputs as the layer's forward forms them."""
    k, bf16 = mamba_fused._kernels(), torch.bfloat16
    x = torch.randn(1, T, HEADS, HEADDIM, device="cuda", dtype=bf16)
    B, C = (torch.randn(1, T, 1, DSTATE, device="cuda", dtype=bf16) * 0.3 for _ in range(2))
    seq = (torch.arange(T, device="cuda") * DOCS // T).int()[None]
    dA, dt = k.cumsum_fwd(torch.randn(1, T, HEADS, device="cuda", dtype=bf16) - 2,
                          -torch.rand(HEADS, device="cuda") * 4 - 0.5, CHUNK,
                          dt_bias=torch.zeros(HEADS, device="cuda"), dt_softplus=True)
    h = mamba_fused._HeadsFirst(HEADS, on=True)
    local = x.new_empty(1, dA.shape[2], HEADS, HEADDIM, DSTATE, dtype=torch.float32)
    k.state_fwd(h.shared(B), h.seq(x), h.chunk(dt), h.chunk(dA), seq_idx=h.shared(seq), states=h.seq(local))
    local = local.flatten(-2)
    states = ssd_triton.state_passing_fwd(local, dA[..., -1], seq, CHUNK, bf16).unflatten(-1, (HEADDIM, DSTATE))
    # The passed-on states' gradient in the heads-first strides the layer's dstates kernel leaves.
    dstates = torch.randn(1, HEADS, dA.shape[2], HEADDIM * DSTATE, device="cuda").transpose(1, 2)
    return dict(x=x, B=B, C=C, seq=seq, dA=dA, dt=dt, local=local, states=states, dstates=dstates,
                CB=k.bmm_fwd(C, B, CHUNK, seq_idx=seq, output_dtype=torch.float32), D=torch.randn(HEADS, device="cuda"),
                dy=torch.randn_like(x))


def state_passing(d: dict[str, torch.Tensor]) -> None:
    from mamba_ssm.ops.triton.ssd_state_passing import _state_passing_bwd, _state_passing_fwd

    dA_end, states, bf16 = d["dA"][..., -1], d["states"].flatten(-2), torch.bfloat16
    runs = {
        "mamba_ssm": (
            lambda: _state_passing_fwd(d["local"], dA_end, seq_idx=d["seq"], chunk_size=CHUNK, out_dtype=bf16)[0],
            lambda: _state_passing_bwd(states, dA_end, d["dstates"], seq_idx=d["seq"], has_initial_states=False,
                                       dstates_dtype=bf16, states_dtype=bf16, chunk_size=CHUNK)[:2],
        ),
        "ours": (
            lambda: ssd_triton.state_passing_fwd(d["local"], dA_end, d["seq"], CHUNK, bf16),
            lambda: ssd_triton.state_passing_bwd(states, dA_end, d["dstates"], d["seq"], CHUNK, bf16),
        ),
    }
    for name, (fwd, bwd) in runs.items():
        print(f"state passing, {name}: forward {cuda_ms(fwd) * 1e3:.0f} us, backward {cuda_ms(bwd) * 1e3:.0f} us")
    (lib_fwd, lib_bwd), (fwd, bwd) = runs.values()
    print(f"  ours against mamba_ssm: states {worst([fwd()], [lib_fwd()]):.1e}, "
          f"their gradients and dA's {worst(bwd(), lib_bwd()):.1e} (largest relative difference)")


def configs(d: dict[str, torch.Tensor], name: str, texts: list[str]) -> None:
    """The chunk scan (SCAN_CONFIG) or its dx backward (DX_CONFIG) under each launch configuration."""
    if name == "SCAN_CONFIG":
        def run():
            return [ssd_triton.chunk_scan_fwd(d["CB"], d["x"], d["dt"], d["dA"], d["C"], d["states"], d["D"], d["seq"])]
    else:
        def run():  # dx, dt's and D's gradients (the dA sums leave slots unwritten: not compared); the
            # states, of the same shape and dtype, stand in for their gradient
            dx, ddt, _, dD = ssd_triton.chunk_scan_bwd_dx(d["x"], d["dt"], d["dA"], d["B"], d["CB"], d["dy"],
                                                          d["states"], d["D"], d["seq"])
            return [dx, ddt, dD]
    default, first = getattr(ssd_triton, name), None
    try:
        for text in texts:
            setattr(ssd_triton, name, tuple(int(v) for v in text.split(",")))
            ms = cuda_ms(run)
            out = run()
            first = first or out
            print(f"{name} {text}: {ms * 1e3:.0f} us, largest relative difference {worst(out, first):.1e}")
    finally:
        setattr(ssd_triton, name, default)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--positions", type=int, default=65536, help="positions of the layer (8 documents)")
    p.add_argument("--scan-configs", nargs="*", default=[], help="BLOCK_M,BLOCK_K,warps,stages,maxnreg (0: none)")
    p.add_argument("--dx-configs", nargs="*", default=[], help="as --scan-configs, for the dx backward")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or not mamba_fused.available():
        p.error("needs a CUDA GPU with mamba_ssm and Triton")
    if args.positions < CHUNK:
        p.error(f"--positions must be at least one chunk ({CHUNK})")
    torch.manual_seed(0)
    layer_kernels(args.positions)
    d = ssd_inputs(args.positions)
    state_passing(d)
    configs(d, "SCAN_CONFIG", args.scan_configs)
    configs(d, "DX_CONFIG", args.dx_configs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
