"""CUDA graphs of a Mamba2 layer's fused chain (in_proj -> conv -> SSD -> gated norm -> out_proj), per length.

At a 2-stage H-Net's inner lengths a Mamba2 layer needs less GPU time than host time: about 2.7 ms of
GPU against 4.4 ms of host at 2stage_L's 21,845 stage-1 positions (mamba_ssm's wrappers, Triton's
launch path, two dozen small torch ops; docs/performance.md, changes 32 and 45). After each
``chunk()`` sync the inner stage therefore runs at the host's pace. A captured graph replays the
layer's forward, or its backward, in one launch.

A graph's shapes are fixed and the lengths change from step to step. So each layer keeps one graph
pair for a length rounded up (``bucket``), and a shorter length reuses the pair while it fills at
least ``REUSE`` of it. A layer captures a bucket once ``STABLE_CALLS`` calls in a row fit it, and runs
eagerly until then. The padding rows form a document of their own (seq_idx one past the last), which
the conv and the scan keep apart from the real rows. Their output gradient is zero, so they change no
output and add nothing to any gradient.

A layer's two graphs share a private memory pool. It holds their inputs, the activations the
backward reads and their temporaries: hnet_2stage_L's eight stage-1 layers at 8 x 8192 bytes add 1.9
GiB of peak active memory and 7.6 GiB reserved. Eager runs where a graph cannot stand in:
- without autograd;
- under saved-tensor hooks (activation checkpointing: the pool would keep what it means to free);
- past ``max_positions``;
- while the layer's previous replay still awaits its backward.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence

import torch

# A length that fills at least this share of the captured one reuses it.
REUSE = 7 / 8
# Calls in a row that fit one bucket before a layer captures it: an untrained router's lengths jump from
# step to step, and a capture per step would cost more than it saves (and pools waiting to be freed).
STABLE_CALLS = 3

# 2stage_L's and 2stage_XL's stage 1 (21,845 positions at 8 x 8192 bytes) in, their outer stages out.
DEFAULT_MAX_POSITIONS = 32768
_max_positions = DEFAULT_MAX_POSITIONS


def configure(max_positions: int) -> None:
    """Graph Mamba2 layers of at most ``max_positions`` positions on CUDA; 0 turns graphs off."""
    if max_positions < 0:
        raise ValueError(f"max_positions must be >= 0 (0: no CUDA graphs), got {max_positions}")
    global _max_positions
    _max_positions = max_positions


def bucket(rows: int, chunk_size: int) -> int:
    """``rows`` rounded up to a multiple of 1/32 to 1/16 of it (at least the SSD chunk): the padding
    costs at most 1/16 more work, and lengths that differ a little share a graph."""
    step = max(chunk_size, 1 << max(rows.bit_length() - 5, 0))
    return -(-rows // step) * step


def fill_padded(dst_u: torch.Tensor, dst_seq: torch.Tensor, u: torch.Tensor, seq_idx: torch.Tensor) -> None:
    """``u`` and ``seq_idx`` into the first rows of the longer buffers; the rows after them become one more
    document. Their inputs stay whatever the buffer held (finite: earlier inputs, or zeros)."""
    rows = u.shape[0]
    dst_u[:rows].copy_(u)
    dst_seq[:rows].copy_(seq_idx)
    dst_seq[rows:].copy_(seq_idx[-1:] + 1)


def _saved_tensor_hooks_active() -> bool:
    """True under saved-tensor hooks (checkpointing, offloading); also where torch no longer exposes them."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


class ChainGraphs:
    """One layer's chain captured at ``rows`` positions: a forward graph and a backward graph."""

    def __init__(self, fn: Callable, rows: int, u: torch.Tensor, seq_idx: torch.Tensor,
                 weights: Sequence[torch.Tensor]):
        self.rows = rows
        self.key = _key(u, weights)
        self.u = u.new_zeros(rows, u.shape[1]).requires_grad_(u.requires_grad)
        self.seq = seq_idx.new_zeros(rows)
        self.weights = [w.detach().clone().requires_grad_(w.requires_grad) for w in weights]
        inputs = [self.u, *self.weights]
        self.wants_grad = [t.requires_grad for t in inputs]
        diff = [t for t in inputs if t.requires_grad]
        with torch.no_grad():
            fill_padded(self.u, self.seq, u, seq_idx)
        # Warm-up off the capture: Triton compiles the padded length's specialisation, cuBLAS sets up.
        side = torch.cuda.Stream(device=u.device)
        side.wait_stream(torch.cuda.current_stream(u.device))
        with torch.cuda.stream(side):
            out = fn(self.u, self.seq, *self.weights)
            self.dout = torch.zeros_like(out)
            torch.autograd.grad(out, diff, self.dout)
            del out
        torch.cuda.current_stream(u.device).wait_stream(side)
        # torch.cuda.graph empties the allocator's cache first: a capture cannot free cached blocks to make room.
        self.fwd, self.bwd = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(self.fwd, pool=pool):
            self.out = fn(self.u, self.seq, *self.weights)
        with torch.cuda.graph(self.bwd, pool=pool):  # the graph of the backward, and its saved tensors, kept
            self.grads = torch.autograd.grad(self.out, diff, self.dout, retain_graph=True)
        self.generation = 0
        self._pending = None  # the latest forward's autograd context, weakly, until its backward runs

    def busy(self) -> bool:
        """A replayed forward whose backward has not run yet, and can still run, holds the activations."""
        return self._pending is not None and self._pending() is not None

    def forward(self, u: torch.Tensor, seq_idx: torch.Tensor, weights: Sequence[torch.Tensor], token) -> torch.Tensor:
        with torch.no_grad():
            fill_padded(self.u, self.seq, u, seq_idx)
            torch._foreach_copy_(self.weights, list(weights))
        self.fwd.replay()
        self.generation += 1
        self._pending = weakref.ref(token)
        return self.out[: u.shape[0]].clone()

    def backward(self, dout: torch.Tensor, generation: int) -> list[torch.Tensor | None]:
        if generation != self.generation:
            raise RuntimeError(
                "a CUDA-graphed Mamba2 layer ran its forward again before this backward: its activations are "
                "gone (a second backward through a retained graph?). Turn the graphs off for this use "
                "(model.mamba_graph_max_positions = 0, or hnet.ops.mamba_graphs.configure(0))"
            )
        rows = dout.shape[0]
        self.dout[:rows].copy_(dout)
        self.dout[rows:].zero_()
        self.bwd.replay()
        self._pending = None
        grads = iter(self.grads)
        du, *dweights = [next(grads) if wanted else None for wanted in self.wants_grad]
        # The input's gradient is a view, used before this layer's next replay; weight gradients are copied,
        # since autograd may keep them as .grad.
        return [None if du is None else du[:rows], *(None if g is None else g.clone() for g in dweights)]


def _key(u: torch.Tensor, weights: Sequence[torch.Tensor]) -> tuple:
    """What a graph is specialised on besides the length: widths, dtypes, which inputs take gradients."""
    return tuple((t.shape[1:] if t is u else t.shape, t.dtype, t.requires_grad, t.device) for t in (u, *weights))


class _Token:
    """Lives exactly as long as one replay's autograd context."""


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, graphs: ChainGraphs, u, seq_idx, *weights):
        ctx.graphs, ctx.token = graphs, _Token()
        out = graphs.forward(u, seq_idx, weights, ctx.token)
        ctx.generation = graphs.generation
        return out

    @staticmethod
    def backward(ctx, dout):
        du, *dweights = ctx.graphs.backward(dout.contiguous(), ctx.generation)
        return None, du, None, *dweights


class LayerGraphs:
    """A Mamba2 layer's chain ``fn(u, seq_idx, *weights)``: replayed from CUDA graphs where it can be,
    else called directly."""

    def __init__(self, fn: Callable, chunk_size: int):
        self.fn, self.chunk_size = fn, chunk_size
        self.graphs: ChainGraphs | None = None
        self.candidate, self.streak = 0, 0  # the bucket the latest calls that missed the graphs fit, and how many

    def __call__(self, u: torch.Tensor, seq_idx: torch.Tensor, weights: Sequence[torch.Tensor]) -> torch.Tensor:
        graphs = self._graphs_for(u, seq_idx, weights)
        if graphs is None:
            return self.fn(u, seq_idx, *weights)
        return _Replay.apply(graphs, u, seq_idx, *weights)

    def _fits(self, captured: int, rows: int) -> bool:
        """``captured`` covers ``rows`` and is no longer than their own bucket, or than rows / REUSE."""
        return rows <= captured <= max(bucket(rows, self.chunk_size), rows / REUSE)

    def _graphs_for(self, u, seq_idx, weights) -> ChainGraphs | None:
        rows = u.shape[0]
        if not (u.is_cuda and 0 < rows <= _max_positions and torch.is_grad_enabled()
                and any(t.requires_grad for t in (u, *weights)) and not _saved_tensor_hooks_active()):
            return None
        current = self.graphs
        if current is not None and current.busy():
            return None
        if current is not None and self._fits(current.rows, rows) and current.key == _key(u, weights):
            self.streak = 0
            return current
        if self.streak and self._fits(self.candidate, rows):
            self.streak += 1
        else:
            self.candidate, self.streak = bucket(rows, self.chunk_size), 1
        if self.streak < STABLE_CALLS:
            return None
        self.graphs = None  # its pool goes before the next one is captured
        del current
        self.graphs = ChainGraphs(self.fn, self.candidate, u, seq_idx, weights)
        self.streak = 0
        return self.graphs
