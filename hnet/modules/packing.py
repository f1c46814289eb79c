"""Document layout of one packed stage input, computed once and shared by every layer of the stage."""

from __future__ import annotations

from functools import cached_property

import torch


class PackedSeq:
    """Documents of a packed (T, ...) sequence: ``cu_seqlens`` int32 boundaries, 0 first and T last."""

    def __init__(self, cu_seqlens: torch.Tensor, total: int | None = None, max_seqlen: int | None = None):
        self.cu_seqlens = cu_seqlens.to(torch.int32)
        self.total = int(cu_seqlens[-1]) if total is None else total
        if max_seqlen is not None:
            self.max_seqlen = max_seqlen
        self._rotary: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    @cached_property
    def max_seqlen(self) -> int:
        """Longest document; a host sync, so it is computed only when an attention kernel asks."""
        return int(torch.diff(self.cu_seqlens).max())

    @cached_property
    def seq_idx(self) -> torch.Tensor:
        """(T,) int32 document index of every position."""
        lengths = torch.diff(self.cu_seqlens)
        docs = torch.arange(len(lengths), device=self.cu_seqlens.device, dtype=torch.int32)
        return torch.repeat_interleave(docs, lengths, output_size=self.total)

    @cached_property
    def position_ids(self) -> torch.Tensor:
        """(T,) position of every byte inside its document: rotary positions restart per document."""
        pos = torch.arange(self.total, device=self.cu_seqlens.device)
        return pos - self.cu_seqlens[self.seq_idx].long()

    def precompute(self, attention: bool, rotary_dim: int = 0) -> None:
        """Build the layout a network needs before its blocks run.

        A compiled block that built it would break its graph (cached_property takes a lock) and
        recompile between its first and later calls on a sequence.
        """
        self.seq_idx
        self.position_ids  # rotary tables and forced routing boundaries
        if attention:
            self.max_seqlen
            if rotary_dim:
                self.rotary(rotary_dim)

    def rotary(self, dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 (T, dim/2) cos and sin tables for non-interleaved rotary embeddings, cached per dim."""
        key = (dim, base)
        if key not in self._rotary:
            inv_freq = base ** -(torch.arange(0, dim, 2, device=self.cu_seqlens.device, dtype=torch.float32) / dim)
            angles = self.position_ids.float()[:, None] * inv_freq[None]
            self._rotary[key] = (angles.cos(), angles.sin())
        return self._rotary[key]
