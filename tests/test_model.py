"""HNetForCausalLM: reference state-dict layout, packing invariance, causality, gradients, init, LR multipliers.

All numeric tests use the tiny ``debug`` / ``debug_2stage`` flavors in fp32 on CPU; the released
flavors are only built on the meta device.
"""

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hnet import HNetConfig, HNetConfigError, HNetForCausalLM, lr_multipliers
from hnet.modules.dynamic_chunking import ste
from hnet.modules.mamba2 import Mamba2
from hnet.modules.packing import PackedSeq

FIXTURES = Path(__file__).parent / "fixtures"
RELEASED = ["hnet_1stage_L", "hnet_2stage_L", "hnet_1stage_XL", "hnet_2stage_XL"]
TINY = ["debug", "debug_2stage"]


# ---- helpers ------------------------------------------------------------------------------------


def read_keys(name: str) -> tuple[str, list[str]]:
    lines = (FIXTURES / f"{name}.keys.txt").read_text().splitlines()
    assert lines[0].startswith("#")
    return lines[0], [line for line in lines[1:] if line.strip()]


def state_dict_lines(model: torch.nn.Module) -> list[str]:
    return [
        f"{k}\t{tuple(v.shape)}\t{str(v.dtype).removeprefix('torch.')}" for k, v in model.state_dict().items()
    ]


def meta_state_dict(lines: list[str]) -> dict[str, torch.Tensor]:
    out = {}
    for line in lines:
        name, shape, dtype = line.split("\t")
        dims = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
        out[name] = torch.empty(dims, dtype=getattr(torch, dtype), device="meta")
    return out


def cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def build(flavor: str, seed: int = 0, routing_noise: float = 0.0) -> HNetForCausalLM:
    torch.manual_seed(seed)
    model = HNetForCausalLM(HNetConfig.from_flavor(flavor))
    model.init_weights()
    if routing_noise:
        with torch.no_grad():
            for stage in model.stages()[:-1]:
                for layer in (stage.routing_module.q_proj_layer, stage.routing_module.k_proj_layer):
                    layer.weight.add_(torch.randn_like(layer.weight) * routing_noise)
    return model.eval()


def random_docs(lengths: list[int], seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g) for n in lengths]


def close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """Tight fp32 comparison: atol relative to the expected magnitude."""
    scale = max(float(expected.abs().max()), 1e-6)
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


# ---- reference layout ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", RELEASED)
def test_state_dict_matches_reference_keys(name):
    header, expected = read_keys(name)
    model = HNetForCausalLM(HNetConfig.from_flavor(name), device="meta", dtype=torch.bfloat16)
    assert state_dict_lines(model) == expected
    m = re.search(r"(\d+) tensors, (\d+) parameters", header)
    assert m, header
    assert len(expected) == int(m.group(1))
    assert sum(v.numel() for v in model.state_dict().values()) == int(m.group(2))


@pytest.mark.parametrize("name", RELEASED)
def test_reference_json_equals_flavor(name, tmp_path):
    flavor = HNetConfig.from_flavor(name)
    loaded = HNetConfig.from_json(FIXTURES / f"{name}.json")
    assert loaded.to_dict() == flavor.to_dict()
    assert loaded.to_dict() == json.loads((FIXTURES / f"{name}.json").read_text())
    # to_dict -> from_dict and to_json -> from_json round trips
    assert HNetConfig.from_dict(flavor.to_dict()).to_dict() == flavor.to_dict()
    flavor.to_json(tmp_path / "c.json")
    assert HNetConfig.from_json(tmp_path / "c.json").to_dict() == flavor.to_dict()


@pytest.mark.parametrize("name", ["hnet_1stage_L", "hnet_2stage_L"])
def test_reference_state_dict_loads_strict(name):
    _, lines = read_keys(name)
    sd = meta_state_dict(lines)
    model = HNetForCausalLM(HNetConfig.from_flavor(name), device="meta", dtype=torch.bfloat16)
    result = model.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys

    missing = dict(sd)
    dropped = next(k for k in missing if "routing_module" in k)
    del missing[dropped]
    with pytest.raises(RuntimeError, match=r"Missing key\(s\)[\s\S]*" + re.escape(dropped)):
        model.load_state_dict(missing, strict=True)

    extra = {**sd, "backbone.not_a_param": torch.empty(3, device="meta")}
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\)[\s\S]*backbone\.not_a_param"):
        model.load_state_dict(extra, strict=True)


def test_tiny_state_dict_round_trip_reproduces_logits():
    src, dst = build("debug_2stage", seed=0), build("debug_2stage", seed=1)
    ids, cus = torch.cat(random_docs([10, 40])), cu([10, 40])
    with torch.no_grad():
        assert not torch.equal(src(ids, cus).logits, dst(ids, cus).logits)
        dst.load_state_dict(src.state_dict(), strict=True)
        assert torch.equal(src(ids, cus).logits, dst(ids, cus).logits)


def test_packed_seq_layout():
    # Rotary is shift invariant, so packed-vs-separate logits cannot see positions: check them directly.
    seq = PackedSeq(cu([3, 1, 4]))
    assert seq.total == 8 and seq.max_seqlen == 4
    assert seq.seq_idx.tolist() == [0, 0, 0, 1, 2, 2, 2, 2] and seq.seq_idx.dtype == torch.int32
    assert seq.position_ids.tolist() == [0, 1, 2, 0, 0, 1, 2, 3]
    cos, sin = seq.rotary(4)
    assert cos.shape == (8, 2) and torch.equal(cos[3], torch.ones(2)) and torch.equal(sin[4], torch.zeros(2))
    torch.testing.assert_close(sin[7], torch.tensor([math.sin(3.0), math.sin(3.0 / 100.0)]))


# ---- packing invariance -------------------------------------------------------------------------

# 1..3 are shorter than d_conv = 4; 20 exceeds the debug window 15; 100 spans several SSD chunks (32).
PACK_LENGTHS = [20, 1, 100, 2, 3, 17]


@pytest.mark.parametrize("flavor", TINY)
def test_packed_equals_separate(flavor):
    model = build(flavor, routing_noise=0.1)
    docs = random_docs(PACK_LENGTHS)
    cus = cu(PACK_LENGTHS)
    with torch.no_grad():
        packed = model(torch.cat(docs), cus)
        n_stages = model.config.num_stages
        assert packed.logits.shape == (sum(PACK_LENGTHS), 256)
        assert len(packed.router_outputs) == n_stages - 1
        assert len(packed.stage_cu_seqlens) == n_stages

        # Routing is neither trivial-all nor trivial-none somewhere (document starts excluded).
        fractions = []
        for r, c in zip(packed.router_outputs, packed.stage_cu_seqlens):
            not_start = torch.ones_like(r.boundary_mask).index_fill_(0, c[:-1].long(), False)
            fractions.append(float(r.boundary_mask[not_start].float().mean()))
        assert any(0.0 < f < 1.0 for f in fractions), fractions

        for i, doc in enumerate(docs):
            alone = model(doc, cu([len(doc)]))
            s, e = int(cus[i]), int(cus[i + 1])
            close(packed.logits[s:e], alone.logits)
            # Router outputs of every stage: positions of this document inside each stage's pack.
            for level, (rp, ra) in enumerate(zip(packed.router_outputs, alone.router_outputs)):
                pc = packed.stage_cu_seqlens[level]
                ps, pe = int(pc[i]), int(pc[i + 1])
                assert pe - ps == ra.boundary_prob.shape[0]
                assert torch.equal(rp.boundary_mask[ps:pe], ra.boundary_mask)
                close(rp.boundary_prob[ps:pe], ra.boundary_prob)
                close(rp.selected_probs[ps:pe], ra.selected_probs)
                assert bool(ra.boundary_mask[0]) and float(ra.boundary_prob[0]) == 1.0
            # Each stage keeps as many positions of this document as when it runs alone.
            for level in range(n_stages):
                pc, ac = packed.stage_cu_seqlens[level], alone.stage_cu_seqlens[level]
                assert int(pc[i + 1] - pc[i]) == int(ac[-1])


@pytest.mark.parametrize("flavor", TINY)
def test_stage_cu_seqlens_follow_boundaries(flavor):
    model = build(flavor, routing_noise=0.1)
    cus = cu(PACK_LENGTHS)
    with torch.no_grad():
        out = model(torch.cat(random_docs(PACK_LENGTHS)), cus)
    assert torch.equal(out.stage_cu_seqlens[0], cus)
    for level, r in enumerate(out.router_outputs):
        outer, inner = out.stage_cu_seqlens[level], out.stage_cu_seqlens[level + 1]
        assert inner.dtype == torch.int32
        counts = [int(r.boundary_mask[a:b].sum()) for a, b in zip(outer[:-1].tolist(), outer[1:].tolist())]
        assert inner.tolist() == [0, *torch.tensor(counts).cumsum(0).tolist()]
        assert torch.equal(r.boundary_mask, r.boundary_prob > 0.5)
        assert torch.equal(r.selected_probs, torch.maximum(r.boundary_prob, 1 - r.boundary_prob))


def test_output_tensors_are_pytree_leaves():
    """FSDP2 before torch 2.12 all-gathers a unit for backward from hooks on the tensors tree_flatten finds
    in its output: without them the root's lm_head weight is freed when backward needs it."""
    model = build("debug_2stage", routing_noise=0.1)
    out = model(torch.cat(random_docs(PACK_LENGTHS)), cu(PACK_LENGTHS))
    leaves = [t for t in torch.utils._pytree.tree_leaves(out) if torch.is_tensor(t) and t.requires_grad]
    expected = [out.logits] + [t for r in out.router_outputs for t in (r.boundary_prob, r.selected_probs)]
    assert {id(t) for t in expected} <= {id(t) for t in leaves}


@pytest.mark.parametrize("flavor", TINY)
def test_batched_equals_packed(flavor):
    model = build(flavor, routing_noise=0.1)
    B, L = 3, 40
    ids = torch.randint(0, 256, (B, L), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        batched = model(ids)
        packed = model(ids.reshape(-1), torch.arange(0, B * L + 1, L, dtype=torch.int32))
    assert batched.logits.shape == (B, L, 256)
    close(batched.logits.reshape(B * L, 256), packed.logits)
    for rb, rp in zip(batched.router_outputs, packed.router_outputs, strict=True):
        assert torch.equal(rb.boundary_mask, rp.boundary_mask)
        close(rb.boundary_prob, rp.boundary_prob)


@pytest.mark.parametrize("flavor", TINY)
def test_causal(flavor):
    model = build(flavor, routing_noise=0.1)
    T, t = 90, 41
    ids = torch.randint(0, 256, (T,), generator=torch.Generator().manual_seed(3))
    changed = ids.clone()
    changed[t + 1 :] = torch.randint(0, 256, (T - t - 1,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a, b = model(ids, cu([T])), model(changed, cu([T]))
    close(b.logits[: t + 1], a.logits[: t + 1])
    close(b.router_outputs[0].boundary_prob[: t + 1], a.router_outputs[0].boundary_prob[: t + 1])
    # The change is visible right after t, so the comparison above could have failed.
    assert (a.logits[t + 1 :] - b.logits[t + 1 :]).abs().max() > 1e-3


# ---- gradients ----------------------------------------------------------------------------------


@pytest.mark.parametrize("flavor", TINY)
def test_gradients_reach_routing_residual_and_pad(flavor):
    model = build(flavor).train()
    lengths = [30, 50, 3]
    ids = torch.cat(random_docs(lengths))
    out = model(ids, cu(lengths))
    loss = F.cross_entropy(out.logits[:-1], ids[1:])  # logits only: no ratio loss shortcut to the router
    loss.backward()
    stages = model.stages()
    for s, stage in enumerate(stages[:-1]):
        rm = stage.routing_module
        for p in (rm.q_proj_layer.weight, rm.k_proj_layer.weight, stage.residual_proj.weight,
                  stage.residual_proj.bias):
            assert p.grad is not None and p.grad.abs().sum() > 0, f"stage {s}"
        assert torch.count_nonzero(stage.residual_proj.weight) == 0  # zero init, yet it learns
    for stage in stages[1:]:
        assert stage.pad_dimension is not None
        assert stage.pad_dimension.grad is not None and stage.pad_dimension.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())


def test_ste_forward_one_backward_identity():
    x = torch.tensor([0.5, 0.51, 0.9, 1.0, 0.73], requires_grad=True)
    y = ste(x)
    assert torch.equal(y, torch.ones_like(x))
    g = torch.tensor([1.0, -2.0, 3.0, 0.25, 7.0])
    y.backward(g)
    assert torch.equal(x.grad, g)


def test_routing_gradient_flows_through_dechunk_without_ste():
    # With the STE path cut (selected_probs detached), routing still gets a gradient through dechunk's P.
    model = build("debug").train()
    stage = model.backbone
    router_forward = stage.routing_module.forward

    def detached_selected(hidden, seq):
        r = router_forward(hidden, seq)
        r.selected_probs = r.selected_probs.detach()
        return r

    stage.routing_module.forward = detached_selected
    ids = torch.cat(random_docs([40, 25]))
    out = model(ids, cu([40, 25]))
    F.cross_entropy(out.logits[:-1], ids[1:]).backward()
    assert stage.routing_module.q_proj_layer.weight.grad.abs().sum() > 0
    assert stage.routing_module.k_proj_layer.weight.grad.abs().sum() > 0


# ---- init ---------------------------------------------------------------------------------------


def test_n_residuals_formula():
    assert HNetConfig.from_flavor("debug").n_residuals() == [4, 8]
    assert HNetConfig.from_flavor("debug_2stage").n_residuals() == [4, 8, 12]
    assert HNetConfig.from_flavor("hnet_1stage_L").n_residuals() == [8, 8 + 44]
    assert HNetConfig.from_flavor("hnet_2stage_L").n_residuals() == [8, 8 + 2 + 4 + 4 + 2, 20 + 52]


@pytest.mark.parametrize("flavor", TINY)
def test_init_weights(flavor):
    model = build(flavor, seed=5)
    config = model.config
    stages = model.stages()
    for stage in stages[:-1]:
        rm = stage.routing_module
        eye = torch.eye(rm.q_proj_layer.weight.shape[0])
        assert torch.equal(rm.q_proj_layer.weight, eye) and torch.equal(rm.k_proj_layer.weight, eye)
        assert torch.count_nonzero(stage.residual_proj.weight) == 0
        assert torch.count_nonzero(stage.residual_proj.bias) == 0
        assert stage.residual_proj.weight.dtype == torch.float32
    for stage in stages[1:]:
        assert torch.count_nonzero(stage.pad_dimension) == 0
    mambas = [m for m in model.modules() if isinstance(m, Mamba2)]
    assert mambas
    for m in mambas:
        assert torch.equal(m.D, torch.ones_like(m.D)) and m.D.dtype == torch.float32
        A = torch.exp(m.A_log)
        assert A.min() >= 1 - 1e-5 and A.max() <= 16 + 1e-4
        dt = F.softplus(m.dt_bias)
        assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001

    assert model.embeddings.weight.std().item() == pytest.approx(1.0, rel=0.05)
    assert model.lm_head.weight.std().item() == pytest.approx(0.02, rel=0.05)
    wqkv = torch.cat([m.weight.flatten() for n, m in model.named_modules() if n.endswith("Wqkv")])
    assert wqkv.std().item() == pytest.approx(0.02, rel=0.05)
    in_proj = torch.cat([m.weight.flatten() for n, m in model.named_modules() if n.endswith("mixer.in_proj")])
    assert in_proj.std().item() == pytest.approx(0.02, rel=0.05)

    # out_proj / fc2 of each stage: 0.02 / sqrt(n_residuals accumulated outer to inner).
    n_res = config.n_residuals()
    for s, stage in enumerate(stages):
        nets = [stage.main_network] if stage.is_innermost else [stage.encoder, stage.decoder]
        weights = [
            mod.weight.flatten()
            for net in nets
            for name, mod in net.named_modules()
            if name.endswith("mixer.out_proj") or name.endswith("mlp.fc2")
        ]
        std = torch.cat(weights).std().item()
        assert std == pytest.approx(0.02 / math.sqrt(n_res[s]), rel=0.05), f"stage {s}"
    # Inner stages are initialised smaller than outer ones (the ratio, not just the value).
    assert n_res == sorted(n_res) and n_res[-1] > n_res[0]


def test_init_weights_on_meta_then_materialised():
    model = HNetForCausalLM(HNetConfig.from_flavor("debug"), device="meta")
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with torch.no_grad():
        out = model(torch.cat(random_docs([12, 30])), cu([12, 30]))
    assert torch.isfinite(out.logits).all()


# ---- LR multipliers -----------------------------------------------------------------------------


def test_lr_multipliers_paper_values():
    # Paper / DESIGN.md values to 2 decimals. With N_GPT = 4.6 exactly the innermost 2-stage value is
    # sqrt(4.6 / 9) = 0.7149, which the design rounds to 0.72, hence a half-cent-plus tolerance.
    one = lr_multipliers(HNetConfig.from_flavor("hnet_1stage_L"), [6.0])
    assert one == pytest.approx([2.63, 0.88], abs=0.006)
    two = lr_multipliers(HNetConfig.from_flavor("hnet_2stage_L"), [3.0, 3.0])
    assert two == pytest.approx([2.63, 1.52, 0.72], abs=0.006)
    # Innermost stage sees N_GPT / prod(N) bytes per token at its own width: sqrt(4.6 / 9) exactly.
    assert two[-1] == pytest.approx(math.sqrt(4.6 / 9), rel=1e-12)
    # Multipliers scale as sqrt(N_GPT).
    four = lr_multipliers(HNetConfig.from_flavor("hnet_2stage_L"), [3.0, 3.0], n_gpt=4 * 4.6)
    assert four == pytest.approx([2 * x for x in two], rel=1e-12)
    with pytest.raises(HNetConfigError, match="ratio_targets"):
        lr_multipliers(HNetConfig.from_flavor("hnet_2stage_L"), [6.0])
    with pytest.raises(HNetConfigError, match="ratio_targets"):
        lr_multipliers(HNetConfig.from_flavor("hnet_1stage_L"), [3.0, 3.0])


# ---- CUDA graphs' padding (hnet.ops.mamba_graphs) -------------------------------------------------


@pytest.mark.parametrize("rows", [1, 100, 255, 256, 257, 3000, 21845, 32768, 65536, 100001])
def test_graph_buckets_pad_little_and_are_reused_nearby(rows):
    from hnet.ops.mamba_graphs import REUSE, bucket

    b = bucket(rows, 256)
    assert b >= rows and b % 256 == 0 and b - rows < max(256, rows / 16)
    assert bucket(b, 256) == b  # a bucket's own length needs no padding
    # A slightly shorter length reuses the capture; one under REUSE of it captures its own.
    shorter = int(b * REUSE) + 1
    assert bucket(shorter, 256) <= b and max(bucket(shorter, 256), shorter / REUSE) >= b


def test_padded_rows_change_no_output_or_gradient():
    """The graphs' padding: rows after the real ones, one more document of stale but finite inputs with a zero
    output gradient, change neither the real rows' outputs nor any gradient (reference kernels, fp32)."""
    from hnet.ops.mamba_graphs import bucket, fill_padded

    torch.manual_seed(0)
    m = Mamba2(d=32, d_state=16, d_conv=4, expand=2, chunk_size=32)
    m.init_weights(std=0.1, out_std=0.1)
    lengths = [20, 1, 50]
    seq, T = PackedSeq(cu(lengths)), sum(lengths)
    rows = bucket(T, m.chunk_size)
    assert rows > T
    u = torch.randn(T, 32, requires_grad=True)
    padded_u, padded_seq = torch.randn(rows, 32) * 3, torch.zeros(rows, dtype=torch.int32)
    fill_padded(padded_u, padded_seq, u, seq.seq_idx)  # copy_ keeps the graph back to u
    assert torch.equal(padded_seq, PackedSeq(cu(lengths + [rows - T])).seq_idx)

    params = list(m.parameters())
    dout = torch.randn(T, 32)
    out = m(u, seq)
    out_padded = m(padded_u, PackedSeq(cu(lengths + [rows - T])))
    grads = torch.autograd.grad(out, [u, *params], dout)
    grads_padded = torch.autograd.grad(out_padded, [u, *params], torch.cat([dout, torch.zeros(rows - T, 32)]))
    torch.testing.assert_close(out_padded[:T], out)
    for g, gp in zip(grads, grads_padded):
        torch.testing.assert_close(gp, g)
