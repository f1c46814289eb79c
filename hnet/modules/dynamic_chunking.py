"""Dynamic chunking: the routing module picks boundaries, chunk keeps them, dechunk smooths them back.

Routing: p[t] = clamp((1 - cos(q(h[t-1]), k(h[t]))) / 2, 0, 1), p = 1 at every document start,
boundary b[t] = p[t] > 0.5. Dechunk: an EMA over chunks z = P x + (1 - P) z_prev with P the clamped
boundary probability, reset per document (``hnet.ops.ssd.ema_scan``); every byte then takes the EMA
of its latest chunk.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import register_dataclass

from hnet.modules.packing import PackedSeq
from hnet.ops import ema_scan


@dataclass
class RouterOutput:
    """Per position of the stage input: boundary probability p, boundary b = p > 0.5, c = max(p, 1 - p)."""

    boundary_prob: torch.Tensor
    boundary_mask: torch.Tensor
    selected_probs: torch.Tensor


# Pytree nodes, so that tools walking a module's output find the tensors inside: FSDP2 before torch
# 2.12 hooks its pre-backward all-gather only onto tensors that tree_flatten reaches.
register_dataclass(RouterOutput)

class RoutingModule(nn.Module):
    """Boundary predictor. ``force_every`` (set through ``forced_boundaries``) fixes the boundaries."""

    def __init__(self, d: int, device=None, dtype=None):
        super().__init__()
        self.force_every: float | None = None
        self.q_proj_layer = nn.Linear(d, d, bias=False, device=device, dtype=dtype)
        self.k_proj_layer = nn.Linear(d, d, bias=False, device=device, dtype=dtype)

    def forward(self, hidden: torch.Tensor, seq: PackedSeq) -> RouterOutput:
        q = F.normalize(self.q_proj_layer(hidden[:-1]), dim=-1)
        k = F.normalize(self.k_proj_layer(hidden[1:]), dim=-1)
        cos = (q * k).sum(-1)
        p = torch.clamp((1 - cos) / 2, min=0.0, max=1.0)
        p = F.pad(p, (1, 0), value=1.0)
        starts = torch.zeros_like(p, dtype=torch.bool).index_fill_(0, seq.cu_seqlens[:-1].long(), True)
        p = torch.where(starts, torch.ones_like(p), p)
        mask = p > 0.5 if self.force_every is None else _every(seq.position_ids, self.force_every)
        # Probability of the decision taken: max(p, 1 - p) under natural routing.
        return RouterOutput(p, mask, torch.where(mask, p, 1 - p))

    @torch.no_grad()
    def init_weights(self) -> None:
        """Identity: at init a boundary falls where consecutive encoder states differ most."""
        for layer in (self.q_proj_layer, self.k_proj_layer):
            _copy_full(layer.weight, torch.eye(layer.weight.shape[0], device=layer.weight.device))


def _every(position_ids: torch.Tensor, n: float) -> torch.Tensor:
    """A boundary wherever floor(position / n) steps up: every document start, ceil(L / n) per document."""
    pos = position_ids.double()
    return (pos == 0) | (torch.floor(pos / n) != torch.floor((pos - 1) / n))


@contextmanager
def forced_boundaries(model: nn.Module, compression: list[float] | None):
    """Within the block, stage s keeps every compression[s]-th position of each document (outer first).

    Benchmarks need a fixed workload: an untrained router's ratio is arbitrary. ``None`` leaves
    routing natural. Probabilities still come from the router, so gradients and losses stay defined.
    """
    routers = [stage.routing_module for stage in model.stages()[:-1]]
    if compression is not None and len(compression) != len(routers):
        raise ValueError(f"forced compression needs {len(routers)} values (one per routed stage), got {compression}")
    try:
        for router, n in zip(routers, compression or [None] * len(routers)):
            router.force_every = n
        yield
    finally:
        for router in routers:
            router.force_every = None


def _copy_full(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full tensor into a parameter that may be a sharded DTensor."""
    try:
        from torch.distributed.tensor import DTensor, distribute_tensor
    except ImportError:  # torch built without distributed
        DTensor = ()
    if isinstance(param, DTensor):
        full = distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements)
    param.copy_(full)


@dataclass
class ChunkLayout:
    """Where a stage's chunks sit, worked out once by ``chunk`` and reused by ``dechunk``."""

    seq: PackedSeq  # the chunk-level documents
    positions: torch.Tensor  # (chunks,) the boundary positions, in order
    latest: torch.Tensor  # (T,) each position's latest chunk (the one it belongs to)


def chunk_layout(router: RouterOutput, seq: PackedSeq) -> ChunkLayout:
    """The chunk-level documents follow from the boundary count per document.

    Their cu_seqlens come to the host once (the stage's only sync): they give the chunk count, so the
    boundary gather needs no sync of its own, and the longest chunk document for attention kernels.
    """
    latest = router.boundary_mask.cumsum(0) - 1
    next_cu = F.pad(latest[seq.cu_seqlens[1:].long() - 1] + 1, (1, 0)).to(torch.int32)
    host = next_cu.cpu()
    chunk_seq = PackedSeq(next_cu, total=int(host[-1]), max_seqlen=int(torch.diff(host).max()))
    positions = torch.nonzero_static(router.boundary_mask, size=chunk_seq.total).squeeze(1)
    return ChunkLayout(chunk_seq, positions, latest)


def chunk(hidden: torch.Tensor, router: RouterOutput, seq: PackedSeq) -> tuple[torch.Tensor, ChunkLayout]:
    """Keep the boundary positions of ``hidden``."""
    layout = chunk_layout(router, seq)
    return hidden.index_select(0, layout.positions), layout


def dechunk(chunks: torch.Tensor, router: RouterOutput, layout: ChunkLayout) -> torch.Tensor:
    """EMA over the chunk sequence, then plugged back so each byte gets the EMA of its latest chunk."""
    P = router.boundary_prob.index_select(0, layout.positions).float().clamp(1e-4, 1 - 1e-4)
    ema = ema_scan(chunks, P, layout.seq.seq_idx)
    return ema.index_select(0, layout.latest).to(chunks.dtype)


def ste(x: torch.Tensor) -> torch.Tensor:
    """Straight-through: forward exactly 1, backward the identity."""
    return x - x.detach() + 1.0


class DeChunk(nn.Module):
    """A stage's way back out: dechunk the inner output, scale by STE(c), add the residual.

    A module without parameters (as in the reference) so that compile can take it: the elementwise
    passes over the (T, D) fp32 stream around the scan then fuse into a few kernels.
    """

    def forward(
        self, inner: torch.Tensor, router: RouterOutput, layout: ChunkLayout, residual: torch.Tensor
    ) -> torch.Tensor:
        smoothed = dechunk(inner, router, layout)
        return (smoothed.float() * ste(router.selected_probs)[:, None] + residual).to(inner.dtype)
