"""Pre-norm residual blocks and the isotropic networks (encoder, main network, decoder) built from them."""

from __future__ import annotations

import torch
from torch import nn

from hnet.config import HNetConfig, LayerSpec
from hnet.modules.attention import CausalMHA
from hnet.modules.mamba2 import Mamba2
from hnet.modules.mlp import SwiGLU
from hnet.modules.norm import RMSNorm
from hnet.modules.packing import PackedSeq


class Block(nn.Module):
    """norm1 -> mixer [-> norm2 -> SwiGLU]; the residual add is fused into each norm and kept in fp32."""

    def __init__(self, spec: LayerSpec, config: HNetConfig, stage: int, device=None, dtype=None):
        super().__init__()
        d = config.d_model[stage]
        factory = {"device": device, "dtype": dtype}
        self.norm1 = RMSNorm(d, **factory)
        if spec.mixer == "mamba":
            ssm = config.ssm_cfg
            self.mixer = Mamba2(d, ssm.d_state, ssm.d_conv, ssm.expand, ssm.chunk_size, **factory)
        else:
            attn = config.attn_cfg
            self.mixer = CausalMHA(
                d, attn.num_heads[stage], attn.rotary_emb_dim[stage], attn.window_size[stage], **factory
            )
        if spec.mlp:
            self.norm2 = RMSNorm(d, **factory)
            self.mlp = SwiGLU(d, config.d_intermediate[stage], **factory)
        else:
            self.norm2 = self.mlp = None

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, seq: PackedSeq):
        hidden, residual = self.norm1(hidden, residual, prenorm=True)
        hidden = self.mixer(hidden, seq)
        if self.mlp is not None:
            hidden, residual = self.norm2(hidden, residual, prenorm=True)
            hidden = self.mlp(hidden)
        return hidden, residual

    def init_weights(self, std: float, out_std: float) -> None:
        self.norm1.init_weights()
        self.mixer.init_weights(std, out_std)
        if self.mlp is not None:
            self.norm2.init_weights()
            self.mlp.init_weights(std, out_std)


class Isotropic(nn.Module):
    """A stack of blocks at one width, closed by an RMSNorm that adds the last residual."""

    def __init__(self, specs: list[LayerSpec], config: HNetConfig, stage: int, device=None, dtype=None):
        super().__init__()
        self.layers = nn.ModuleList(Block(s, config, stage, device, dtype) for s in specs)
        self.rmsnorm = RMSNorm(config.d_model[stage], device=device, dtype=dtype)
        self.has_attention = any(s.mixer != "mamba" for s in specs)
        self.rotary_dim = config.attn_cfg.rotary_emb_dim[stage] if self.has_attention else 0

    def forward(self, hidden: torch.Tensor, seq: PackedSeq) -> torch.Tensor:
        seq.precompute(self.has_attention, self.rotary_dim)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, seq)
        return self.rmsnorm(hidden, residual)

    def init_weights(self, std: float, out_std: float) -> None:
        for layer in self.layers:
            layer.init_weights(std, out_std)
        self.rmsnorm.init_weights()
