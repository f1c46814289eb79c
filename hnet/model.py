"""HNetForCausalLM and the recursive H-Net stage, with the reference module and parameter names."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._pytree import register_dataclass

from hnet.config import HNetConfig
from hnet.modules.block import Isotropic
from hnet.modules.dynamic_chunking import DeChunk, RouterOutput, RoutingModule, chunk
from hnet.modules.packing import PackedSeq

INIT_STD = 0.02


class HNet(nn.Module):
    """One hierarchy stage: encoder -> route -> chunk -> inner stage -> dechunk -> residual -> decoder.

    The innermost stage is just its main network. Entering a wider stage appends the learned
    ``pad_dimension`` to every position; leaving keeps the first D channels.
    """

    def __init__(self, config: HNetConfig, stage: int, device=None, dtype=None):
        super().__init__()
        self.stage = stage
        d = config.d_model[stage]
        layout = config.stages[stage]
        extra = d - config.d_model[stage - 1] if stage > 0 else 0
        self.pad_dimension = nn.Parameter(torch.zeros(extra, device=device, dtype=dtype)) if extra else None
        if layout.is_innermost:
            self.main_network = Isotropic(layout.main, config, stage, device, dtype)
            return
        self.encoder = Isotropic(layout.encoder, config, stage, device, dtype)
        self.main_network = HNet(config, stage + 1, device, dtype)
        self.decoder = Isotropic(layout.decoder, config, stage, device, dtype)
        self.routing_module = RoutingModule(d, device, dtype)
        self.dechunk_layer = DeChunk()
        self.residual_proj = nn.Linear(d, d, device=device, dtype=torch.float32)  # fp32 by design

    @property
    def is_innermost(self) -> bool:
        return isinstance(self.main_network, Isotropic)

    def forward(self, hidden: torch.Tensor, seq: PackedSeq):
        """(T, D_outer) -> (T, D_outer), router outputs of this and inner stages, each stage's PackedSeq."""
        d_in = hidden.shape[-1]
        if self.pad_dimension is not None:
            hidden = torch.cat((hidden, self.pad_dimension.expand(hidden.shape[0], -1)), dim=-1)
        if self.is_innermost:
            return self.main_network(hidden, seq)[..., :d_in], [], [seq]
        hidden = self.encoder(hidden, seq)
        residual = self.residual_proj(hidden.float())
        router = self.routing_module(hidden, seq)
        chunks, layout = chunk(hidden, router, seq)
        inner, routers, seqs = self.main_network(chunks, layout.seq)
        hidden = self.dechunk_layer(inner, router, layout, residual)
        hidden = self.decoder(hidden, seq)
        return hidden[..., :d_in], [router, *routers], [seq, *seqs]

    def init_weights(self, out_stds: list[float]) -> None:
        """Reference init; routing stays the identity and residual_proj starts at zero."""
        if self.pad_dimension is not None:
            nn.init.zeros_(self.pad_dimension)
        networks = [self.main_network] if self.is_innermost else [self.encoder, self.decoder]
        for net in networks:
            net.init_weights(INIT_STD, out_stds[self.stage])
        if not self.is_innermost:
            self.main_network.init_weights(out_stds)
            self.routing_module.init_weights()
            nn.init.zeros_(self.residual_proj.weight)
            nn.init.zeros_(self.residual_proj.bias)


@dataclass
class HNetOutput:
    """Logits plus, outer stage first, each routed stage's router output and every stage's documents."""

    logits: torch.Tensor
    router_outputs: list[RouterOutput]
    stage_seqs: list[PackedSeq]

    @property
    def stage_cu_seqlens(self) -> list[torch.Tensor]:
        return [s.cu_seqlens for s in self.stage_seqs]


register_dataclass(HNetOutput)  # see RouterOutput: the root's all-gather for backward depends on it


class HNetForCausalLM(nn.Module):
    def __init__(self, config: HNetConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        d = config.d_model[0]
        self.embeddings = nn.Embedding(config.vocab_size, d, device=device, dtype=dtype)
        self.backbone = HNet(config, 0, device, dtype)
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False, device=device, dtype=dtype)

    def forward(
        self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None
    ) -> HNetOutput:
        """Packed: input_ids (T,) with cu_seqlens -> logits (T, 256).

        Batched convenience: input_ids (B, L) without cu_seqlens, each row one document -> logits (B, L, 256).
        """
        batch_shape = None
        if cu_seqlens is None:
            if input_ids.dim() != 2:
                raise ValueError("pass cu_seqlens with packed (T,) input_ids, or (batch, length) input_ids")
            batch_shape = input_ids.shape
            B, L = batch_shape
            cu_seqlens = torch.arange(0, B * L + 1, L, device=input_ids.device, dtype=torch.int32)
            input_ids, max_seqlen = input_ids.reshape(-1), L
        seq = PackedSeq(cu_seqlens, total=input_ids.shape[0], max_seqlen=max_seqlen)
        hidden, routers, seqs = self.backbone(self.embeddings(input_ids), seq)
        logits = self.lm_head(hidden)
        if batch_shape is not None:
            logits = logits.view(*batch_shape, -1)
        return HNetOutput(logits, routers, seqs)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Reference init, safe on materialised meta modules and on FSDP-sharded parameters.

        Embedding std 1.0, linears std 0.02, out_proj / fc2 std 0.02 / sqrt(n_residuals) with the
        residual count accumulated outer to inner, lm_head std 0.02.
        """
        nn.init.normal_(self.embeddings.weight, std=1.0)
        self.backbone.init_weights([INIT_STD / n**0.5 for n in self.config.n_residuals()])
        nn.init.normal_(self.lm_head.weight, std=INIT_STD)

    def stages(self) -> list[HNet]:
        """The HNet stage modules, outer first."""
        out, stage = [], self.backbone
        while True:
            out.append(stage)
            if stage.is_innermost:
                return out
            stage = stage.main_network

