"""hnet.flops: GEMM counts checked against torch's FlopCounterMode, attention pairs against a mask."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from hnet.config import HNetConfig
from hnet.flops import attention_pairs, batch_flops, flops_per_byte, forward_flops, training_flops
from hnet.model import HNetForCausalLM

DOC_LENGTHS = [37, 5, 120, 1, 64, 90]


def _linear_parts(model: HNetForCausalLM) -> dict[str, str]:
    """Counter key of every nn.Linear -> the FlopBreakdown part it belongs to."""
    fqn = {id(m): f"{type(model).__name__}.{name}" for name, m in model.named_modules()}
    names = {"routing_module": "routing", "residual_proj": "residual_proj"}
    parts = {fqn[id(model.lm_head)]: "lm_head"}
    for s, stage in enumerate(model.stages()):
        for child_name, child in stage.named_children():
            if child_name == "main_network" and not stage.is_innermost:
                continue  # the next stage, visited on its own
            part = f"stage{s}.{names.get(child_name, child_name)}"
            parts.update({fqn[id(m)]: part for m in child.modules() if isinstance(m, nn.Linear)})
    return parts


@pytest.mark.parametrize("flavor", ["debug", "debug_2stage"])
def test_gemm_matches_flop_counter(flavor: str) -> None:
    torch.manual_seed(0)
    config = HNetConfig.from_flavor(flavor)
    model = HNetForCausalLM(config)
    model.init_weights()
    with torch.no_grad():  # move routing off the identity so inner lengths are uneven and non-trivial
        for stage in model.stages()[:-1]:
            for layer in (stage.routing_module.q_proj_layer, stage.routing_module.k_proj_layer):
                layer.weight.add_(0.1 * torch.randn_like(layer.weight))
    cu = torch.tensor([0, *itertools.accumulate(DOC_LENGTHS)], dtype=torch.int32)
    ids = torch.randint(0, 256, (int(cu[-1]),))
    with FlopCounterMode(display=False) as counter:
        out = model(ids, cu)
    counts = counter.get_flop_counts()

    lengths = [torch.diff(c) for c in out.stage_cu_seqlens]
    assert len(lengths) == config.num_stages
    for outer, inner in zip(lengths, lengths[1:]):
        assert (inner <= outer).all() and inner.sum() < outer.sum() and (inner[outer > 1] > 1).any()

    measured: dict[str, int] = {}
    for key, part in _linear_parts(model).items():
        ops = {str(op): n for op, n in counts[key].items()}
        assert set(ops) <= {"aten.mm", "aten.addmm"}, (key, ops)
        measured[part] = measured.get(part, 0) + sum(ops.values())
    flops = forward_flops(config, lengths)
    assert {part: ops.get("gemm", 0) for part, ops in flops.parts.items() if ops.get("gemm")} == measured
    assert flops.gemm == sum(measured.values())
    assert batch_flops(config, out.stage_cu_seqlens, training=False).as_dict() == flops.as_dict()


@pytest.mark.parametrize("window", [-1, 0, 1, 3, 15, 40])
@pytest.mark.parametrize("length", [1, 2, 4, 16, 17, 33])
def test_attention_pairs_match_mask(length: int, window: int) -> None:
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    mask = (j <= i) & ((i - j <= window) if window >= 0 else True)
    assert attention_pairs(length, window) == int(mask.sum())


def test_breakdown_totals_and_training() -> None:
    config = HNetConfig.from_flavor("debug_2stage")
    lengths = [[50, 7], [20, 3], [6, 1]]
    fwd = forward_flops(config, lengths)
    assert fwd.total == sum(fwd.by_op.values()) == sum(fwd.by_part.values())
    assert set(fwd.by_op) == {"gemm", "conv", "ssd", "attention_scores", "attention_values"}
    assert training_flops(config, lengths).as_dict() == fwd.scaled(3).as_dict()
    assert training_flops(config, lengths).total == 3 * fwd.total
    with pytest.raises(ValueError, match="stages"):
        forward_flops(config, lengths[:2])


# Training GFLOP per byte of one 8192-byte document; also the table in docs/flops.md.
PINNED = [
    ("hnet_1stage_L", [6.0], 1.031),
    ("hnet_1stage_L", [4.8], 1.213),
    ("hnet_2stage_L", [3.0, 3.0], 1.055),
]


@pytest.mark.parametrize(("flavor", "compression", "gflops"), PINNED)
def test_flops_per_byte_pinned(flavor: str, compression: list[float], gflops: float) -> None:
    config = HNetConfig.from_flavor(flavor)
    assert flops_per_byte(config, 8192, compression) / 1e9 == pytest.approx(gflops, abs=5e-4)
