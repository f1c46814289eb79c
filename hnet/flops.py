"""Model FLOPs of H-Net, counted from the config and the per-stage lengths each batch actually produced.

The router decides the inner stages' lengths, so they change every batch. A fixed FLOPs-per-byte
figure would make TFLOP/s and MFU wrong, which is why compute is counted from the realised documents
(``HNetOutput.stage_cu_seqlens``).

Formula. One multiply-add counts as 2 FLOPs. Stage s has width d = d_model[s], T_s positions in all
and documents of lengths L. Mamba2 at that stage has d_inner = expand * d, H = d_inner / 64 heads of
P = 64, N = d_state, G = 1 group and conv width K = d_conv. Per position of the stage that runs the term:

  gemm              Mamba2 in_proj 2 d (2 d_inner + 2 G N + H), out_proj 2 d_inner d
                    attention Wqkv 2 d (3 d), out_proj 2 d d
                    SwiGLU fc1 2 d (2 f), fc2 2 f d                    (f = d_intermediate[s])
                    residual_proj 2 d d
                    routing q and k 2 d d each, on T_s - 1 positions   (the packed sequence shifted by one)
                    lm_head 2 d_0 vocab                                (stage 0 only)
  conv              Mamba2 depthwise conv 2 K (d_inner + 2 G N)
  ssd               Mamba2 scan, counted as its recurrence h = a h + B x^T, y = C h:
                    2 H P N for the update plus 2 H P N for the readout = 4 d_inner N.
                    The dechunk EMA runs the same scan with P = 32 and N = 1 at the outer width
                    d = d_model[s] on the T_{s+1} chunks: 4 d per chunk.
Per document of length L, with window W (-1 = global):
  pairs(L, W)       sum over i < L of min(i + 1, W + 1) query-key pairs (i + 1 when global)
  attention_scores  2 d pairs(L, W)  (Q K^T over all heads)
  attention_values  2 d pairs(L, W)  (P V over all heads)

The SSD term counts the recurrence rather than the chunked kernel's extra intra-chunk quadratic work
(about chunk_size (N + d_inner) more per position): like the causal mask in attention, that is how a
kernel spends its matrix units, not model compute, and it keeps the count independent of chunk_size.
Excluded, being O(d) per position: the embedding lookup, norms, activations and gating, rotary,
softmax, the router's cosine, the scan's dt/decay/D terms, the residual adds and the STE.

Training FLOPs = forward + backward = 3 x forward (backward: gradients w.r.t. inputs and weights).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from hnet.config import MAMBA_HEADDIM, MAMBA_NGROUPS, HNetConfig, LayerSpec

Lengths = Sequence[int] | torch.Tensor


@dataclass
class FlopBreakdown:
    """FLOPs per part (``stage0.encoder``, ``stage0.routing``, ..., ``lm_head``) and op class (``gemm``, ...)."""

    parts: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, part: str, op: str, flops: int) -> None:
        ops = self.parts.setdefault(part, {})
        ops[op] = ops.get(op, 0) + flops

    @property
    def by_op(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for ops in self.parts.values():
            for op, flops in ops.items():
                totals[op] = totals.get(op, 0) + flops
        return totals

    @property
    def by_part(self) -> dict[str, int]:
        return {part: sum(ops.values()) for part, ops in self.parts.items()}

    @property
    def total(self) -> int:
        return sum(self.by_part.values())

    @property
    def gemm(self) -> int:
        return self.by_op.get("gemm", 0)

    def scaled(self, factor: int) -> FlopBreakdown:
        return FlopBreakdown({part: {op: f * factor for op, f in ops.items()} for part, ops in self.parts.items()})

    def as_dict(self) -> dict:
        """Plain nested dict for logs and JSON."""
        return {"total": self.total, "by_op": self.by_op, "by_part": self.by_part}


def attention_pairs(length: int, window: int) -> int:
    """Query-key pairs of one causal document: sum over i < length of min(i + 1, window + 1)."""
    if window < 0 or length <= window + 1:
        return length * (length + 1) // 2
    return (window + 1) * (window + 2) // 2 + (length - window - 1) * (window + 1)


def _scan(positions: int, d_inner: int, d_state: int) -> int:
    """SSD recurrence: update and readout of a (d_inner x d_state) state per position."""
    return 4 * positions * d_inner * d_state


def _block(config: HNetConfig, stage: int, spec: LayerSpec, positions: int, pairs: int) -> dict[str, int]:
    d = config.d_model[stage]
    if spec.mixer == "mamba":
        ssm = config.ssm_cfg
        d_inner = ssm.expand * d
        bc = 2 * MAMBA_NGROUPS * ssm.d_state
        flops = {
            "gemm": 2 * positions * d * (2 * d_inner + bc + d_inner // MAMBA_HEADDIM) + 2 * positions * d_inner * d,
            "conv": 2 * positions * ssm.d_conv * (d_inner + bc),
            "ssd": _scan(positions, d_inner, ssm.d_state),
        }
    else:
        flops = {
            "gemm": 2 * positions * d * 3 * d + 2 * positions * d * d,
            "attention_scores": 2 * pairs * d,
            "attention_values": 2 * pairs * d,
        }
    if spec.mlp:
        f = config.d_intermediate[stage]
        flops["gemm"] += 2 * positions * d * 2 * f + 2 * positions * f * d
    return flops


def forward_flops(config: HNetConfig, stage_lengths: Sequence[Lengths]) -> FlopBreakdown:
    """Forward FLOPs given, per stage (outer first, innermost included), the document lengths it saw."""
    if len(stage_lengths) != config.num_stages:
        raise ValueError(
            f"stage_lengths has {len(stage_lengths)} entries, the model has {config.num_stages} stages: "
            "give the document lengths of every stage, outer first"
        )
    lengths = [x.tolist() if isinstance(x, torch.Tensor) else [int(n) for n in x] for x in stage_lengths]
    totals = [sum(x) for x in lengths]
    out = FlopBreakdown()
    for s, layout in enumerate(config.stages):
        d, positions = config.d_model[s], totals[s]
        pairs = sum(attention_pairs(n, config.attn_cfg.window_size[s]) for n in lengths[s])
        for name, specs in layout.networks().items():
            for spec in specs:
                for op, flops in _block(config, s, spec, positions, pairs).items():
                    out.add(f"stage{s}.{name}", op, flops)
        if not layout.is_innermost:
            out.add(f"stage{s}.routing", "gemm", 2 * 2 * max(positions - 1, 0) * d * d)
            out.add(f"stage{s}.residual_proj", "gemm", 2 * positions * d * d)
            out.add(f"stage{s}.dechunk", "ssd", _scan(totals[s + 1], d, 1))
    out.add("lm_head", "gemm", 2 * totals[0] * config.d_model[0] * config.vocab_size)
    return out


def training_flops(config: HNetConfig, stage_lengths: Sequence[Lengths]) -> FlopBreakdown:
    """Forward plus backward, the backward taken as twice the forward: 3 x forward_flops."""
    return forward_flops(config, stage_lengths).scaled(3)


def batch_flops(config: HNetConfig, stage_cu_seqlens: Sequence[torch.Tensor], training: bool = True) -> FlopBreakdown:
    """FLOPs of one step from a model output's ``stage_cu_seqlens``; training (3x forward) by default.

    Every document start is a boundary, so all stages have the same number of documents and the
    cu_seqlens stack into one tensor: a single host sync per step.
    """
    lengths = document_lengths(torch.stack(list(stage_cu_seqlens)).tolist())
    return (training_flops if training else forward_flops)(config, lengths)


def document_lengths(stage_bounds: Sequence[Sequence[int]]) -> list[list[int]]:
    """Per stage, the document lengths of host-side cu_seqlens (one list of boundaries per stage)."""
    return [[b - a for a, b in zip(row, row[1:])] for row in stage_bounds]


def flops_per_byte(config: HNetConfig, seq_len: int, compression: Sequence[float]) -> float:
    """Training FLOPs per byte of one seq_len-byte document when stage s keeps 1/N_s of stage s-1's positions.

    ``compression`` holds the target ratio N_s of each routed stage, outer first (paper: [6.0] or [3.0, 3.0]);
    each stage's length is rounded to whole positions.
    """
    if len(compression) != config.num_stages - 1:
        raise ValueError(
            f"compression has {len(compression)} ratios, the model has {config.num_stages - 1} routed stages"
        )
    lengths = [[max(1, round(seq_len / math.prod(compression[:s])))] for s in range(config.num_stages)]
    return training_flops(config, lengths).total / seq_len
