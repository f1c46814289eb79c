"""Byte-by-byte generation with an inference cache, so each new byte costs O(1) in the sequence length.

Every batch row is one document and advances on its own. Stepping a byte mirrors the packed forward
exactly: each mixer keeps its recurrent state (Mamba2 conv window and SSM state, an attention KV cache
trimmed to the sliding window), each routed stage keeps the previous encoder output (for the cosine
with the next one) and the EMA of its latest chunk. An inner stage steps only for the rows whose
router emits a boundary (p > 0.5); the other rows reuse their latest chunk's EMA. STE(c) is exactly 1
in the forward pass, so a stage's output is the dechunked EMA plus ``residual_proj`` of the encoder.

The step logic lives here and reads the modules' parameters, so the training modules stay unaware of
caching.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hnet.model import HNet, HNetForCausalLM
from hnet.modules.attention import CausalMHA, apply_rotary
from hnet.modules.block import Isotropic
from hnet.modules.dynamic_chunking import RoutingModule
from hnet.modules.mamba2 import Mamba2
from hnet.tokenizer import EOS

ROTARY_BASE = 10000.0
_KV_INITIAL_CAPACITY = 64  # positions of a global-attention cache before its first doubling


@dataclass
class MambaState:
    """conv: the last d_conv - 1 conv inputs (B, conv_dim, d_conv - 1); ssm: (B, nheads, headdim, d_state) fp32."""

    conv: torch.Tensor
    ssm: torch.Tensor


class KVCache:
    """Rotated keys and values per row, (B, H, capacity, Dh), and the positions each row has seen.

    A windowed layer keeps a ring buffer of the last W + 1 positions (the window plus the query
    itself); a global layer grows by doubling. Softmax ignores key order, so ring slots need no sorting.
    """

    def __init__(self, mha: CausalMHA, batch_size: int, device: torch.device, dtype: torch.dtype):
        self.window = mha.window
        capacity = mha.window + 1 if mha.window >= 0 else _KV_INITIAL_CAPACITY
        shape = (batch_size, mha.num_heads, capacity, mha.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = torch.zeros(batch_size, device=device, dtype=torch.long)
        self.max_length = 0  # host-side bound on length, so growing needs no device sync

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def append(self, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Store one position per row; returns the (n, capacity) mask of slots each row may attend to."""
        self.max_length += 1
        if self.window < 0 and self.max_length > self.capacity:
            grow = torch.zeros_like(self.k)
            self.k, self.v = torch.cat((self.k, grow), dim=2), torch.cat((self.v, grow), dim=2)
        slot = pos % self.capacity if self.window >= 0 else pos
        self.k[rows, :, slot] = k
        self.v[rows, :, slot] = v
        self.length[rows] = pos + 1
        filled = (pos + 1).clamp(max=self.capacity)
        return torch.arange(self.capacity, device=pos.device)[None] < filled[:, None]


@dataclass
class RouteState:
    """Per routed stage: previous encoder output, whether the row has one yet, and its latest chunk's EMA."""

    prev: torch.Tensor  # (B, D) in the model dtype
    seen: torch.Tensor  # (B,) bool
    ema: torch.Tensor  # (B, D) fp32; zero before the first chunk, so the first boundary starts it


class InferenceCache:
    """Decoding state of ``batch_size`` independent documents for one model; see the module docstring."""

    def __init__(self, model: HNetForCausalLM, batch_size: int):
        self.model, self.batch_size = model, batch_size
        weight = model.embeddings.weight
        device, dtype = weight.device, weight.dtype
        self.device = device
        self.mixers: dict[nn.Module, MambaState | KVCache] = {}
        self.routes: dict[HNet, RouteState] = {}
        for stage in model.stages():
            for net in _networks(stage):
                for block in net.layers:
                    self.mixers[block.mixer] = _new_state(block.mixer, batch_size, device, dtype)
            if not stage.is_innermost:
                d = stage.residual_proj.in_features
                self.routes[stage] = RouteState(
                    torch.zeros(batch_size, d, device=device, dtype=dtype),
                    torch.zeros(batch_size, device=device, dtype=torch.bool),
                    torch.zeros(batch_size, d, device=device, dtype=torch.float32),
                )

    @torch.no_grad()
    def step(self, ids: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Feed byte ids (n,) to batch rows ``rows`` (n,), default all; returns their next-byte logits (n, 256)."""
        if rows is None:
            rows = torch.arange(self.batch_size, device=self.device)
        model = self.model
        hidden = _stage_step(self, model.backbone, rows.to(self.device), model.embeddings(ids.to(self.device)))
        return model.lm_head(hidden)

    @torch.no_grad()
    def prefill(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Feed one prompt per row (lengths may differ); returns each row's logits after its last byte (B, 256)."""
        if len(prompts) != self.batch_size:
            raise ValueError(f"prefill got {len(prompts)} prompts for a cache of {self.batch_size} rows")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one byte (encode with a BOS byte)")
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        ids = torch.zeros(self.batch_size, int(lengths.max()), dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
        ids = ids.to(self.device)
        last = torch.empty(self.batch_size, self.model.lm_head.out_features, device=self.device)
        for t in range(ids.shape[1]):
            rows = (lengths > t).nonzero().squeeze(1)
            logits = self.step(ids[rows, t], rows)
            ends = lengths[rows] == t + 1
            last[rows[ends]] = logits[ends].float()
        return last


def _networks(stage: HNet) -> list[Isotropic]:
    return [stage.main_network] if stage.is_innermost else [stage.encoder, stage.decoder]


def _new_state(mixer: nn.Module, batch_size: int, device, dtype) -> MambaState | KVCache:
    if isinstance(mixer, Mamba2):
        d_conv = mixer.conv1d.kernel_size[0]
        return MambaState(
            torch.zeros(batch_size, mixer.conv_dim, d_conv - 1, device=device, dtype=dtype),
            torch.zeros(batch_size, mixer.nheads, mixer.headdim, mixer.d_state, device=device, dtype=torch.float32),
        )
    return KVCache(mixer, batch_size, device, dtype)


def _stage_step(cache: InferenceCache, stage: HNet, rows: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """One position per row through a stage and, for rows at a boundary, its inner stages."""
    d_in = hidden.shape[-1]
    if stage.pad_dimension is not None:
        hidden = torch.cat((hidden, stage.pad_dimension.expand(hidden.shape[0], -1)), dim=-1)
    if stage.is_innermost:
        return _isotropic_step(cache, stage.main_network, rows, hidden)[..., :d_in]
    hidden = _isotropic_step(cache, stage.encoder, rows, hidden)
    residual = stage.residual_proj(hidden.float())
    state = cache.routes[stage]
    p = _route(stage.routing_module, state, rows, hidden)
    boundary = p > 0.5
    if boundary.any():
        inner_rows = rows[boundary]
        inner = _stage_step(cache, stage.main_network, inner_rows, hidden[boundary])
        P = p[boundary].float().clamp(1e-4, 1 - 1e-4)[:, None]
        state.ema[inner_rows] = P * inner.float() + (1 - P) * state.ema[inner_rows]
    smoothed = state.ema[rows].to(hidden.dtype)
    hidden = (smoothed.float() + residual).to(hidden.dtype)  # dechunk * STE(c) + residual, STE(c) = 1
    return _isotropic_step(cache, stage.decoder, rows, hidden)[..., :d_in]


def _route(router: RoutingModule, state: RouteState, rows: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Boundary probability of the new position; 1 at a row's first position (its document start)."""
    q = F.normalize(router.q_proj_layer(state.prev[rows]), dim=-1)
    k = F.normalize(router.k_proj_layer(hidden), dim=-1)
    p = torch.clamp((1 - (q * k).sum(-1)) / 2, min=0.0, max=1.0)
    p = torch.where(state.seen[rows], p, torch.ones_like(p))
    state.prev[rows] = hidden
    state.seen[rows] = True
    return p


def _isotropic_step(cache: InferenceCache, net: Isotropic, rows: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    residual = None
    for block in net.layers:
        hidden, residual = block.norm1(hidden, residual, prenorm=True)
        mixer = block.mixer
        if isinstance(mixer, Mamba2):
            hidden = _mamba_step(mixer, cache.mixers[mixer], rows, hidden)
        else:
            hidden = _attention_step(mixer, cache.mixers[mixer], rows, hidden)
        if block.mlp is not None:
            hidden, residual = block.norm2(hidden, residual, prenorm=True)
            hidden = block.mlp(hidden)
    return net.rmsnorm(hidden, residual)


def _mamba_step(m: Mamba2, state: MambaState, rows: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The recurrent form of the SSD scan: h = exp(dt A) h + dt x B^T, y = C h + D x."""
    n = u.shape[0]
    z, xbc, dt = m.in_proj(u).split([m.d_inner, m.conv_dim, m.nheads], dim=-1)
    window = torch.cat((state.conv[rows], xbc[:, :, None]), dim=-1)  # (n, conv_dim, d_conv)
    state.conv[rows] = window[..., 1:]
    conv = (window.float() * m.conv1d.weight.squeeze(1).float()).sum(-1) + m.conv1d.bias.float()
    xbc = F.silu(conv).to(u.dtype)
    x, B, C = xbc.split([m.d_inner, m.ngroups * m.d_state, m.ngroups * m.d_state], dim=-1)
    heads_per_group = m.nheads // m.ngroups
    B = B.float().view(n, m.ngroups, m.d_state).repeat_interleave(heads_per_group, dim=1)  # (n, H, N)
    C = C.float().view(n, m.ngroups, m.d_state).repeat_interleave(heads_per_group, dim=1)
    x = x.float().view(n, m.nheads, m.headdim)
    dt = F.softplus(dt.float() + m.dt_bias.float())  # (n, H)
    decay = torch.exp(dt * -torch.exp(m.A_log.float()))
    h = state.ssm[rows] * decay[:, :, None, None] + (dt[:, :, None] * x)[..., None] * B[:, :, None, :]
    state.ssm[rows] = h
    y = (h @ C[..., None]).squeeze(-1) + m.D.float()[:, None] * x
    return m.out_proj(m.norm(y.to(u.dtype).view(n, m.d_inner), z))


def _attention_step(m: CausalMHA, cache: KVCache, rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    q, k, v = m.Wqkv(x).view(n, 3, m.num_heads, m.head_dim).unbind(1)
    pos = cache.length[rows]
    if m.rotary_dim:
        inv_freq = ROTARY_BASE ** -(
            torch.arange(0, m.rotary_dim, 2, device=x.device, dtype=torch.float32) / m.rotary_dim
        )
        angles = pos.float()[:, None] * inv_freq[None]
        q, k = apply_rotary(q, angles.cos(), angles.sin()), apply_rotary(k, angles.cos(), angles.sin())
    valid = cache.append(rows, k, v, pos)
    out = F.scaled_dot_product_attention(
        q[:, :, None], cache.k[rows], cache.v[rows], attn_mask=valid[:, None, None, :]
    )
    return m.out_proj(out.reshape(n, -1))


# ---------------------------------------------------------------- sampling


@dataclass
class SamplingConfig:
    """temperature 0 is greedy; top_k 0 and top_p 1 disable those filters; every row stops at EOS."""

    max_new_bytes: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_bytes < 0:
            raise ValueError(f"max_new_bytes must be >= 0, got {self.max_new_bytes}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")


def sample(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator) -> torch.Tensor:
    """Next byte per row from (n, 256) logits; draws on the CPU so a seed gives the same bytes on any device."""
    if config.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float().cpu() / config.temperature
    if config.top_k:
        kth = logits.topk(min(config.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1:
        probs, order = logits.softmax(-1).sort(dim=-1, descending=True)
        drop = probs.cumsum(-1) - probs >= config.top_p  # mass before a byte already reaches top_p
        logits = logits.masked_fill(torch.empty_like(drop).scatter_(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)


def stream(
    model: HNetForCausalLM, prompts: Sequence[Sequence[int]], config: SamplingConfig
) -> Iterator[tuple[int, int]]:
    """Generate for every prompt at once, yielding (row, byte) as bytes are sampled.

    A row ends after EOS (which is yielded) or after ``max_new_bytes`` bytes.
    """
    if config.max_new_bytes == 0:
        return
    cache = InferenceCache(model, len(prompts))
    logits = cache.prefill(prompts)
    generator = torch.Generator().manual_seed(config.seed)
    rows = torch.arange(len(prompts), device=cache.device)
    for produced in range(1, config.max_new_bytes + 1):
        ids = sample(logits[rows], config, generator).to(cache.device)
        yield from zip(rows.tolist(), ids.tolist())
        going = ids != EOS
        rows, ids = rows[going], ids[going]
        if produced == config.max_new_bytes or rows.numel() == 0:
            return
        logits[rows] = cache.step(ids, rows).float()


def generate(model: HNetForCausalLM, prompts: Sequence[Sequence[int]], config: SamplingConfig) -> list[list[int]]:
    """The bytes generated for each prompt (EOS included where a row stopped on it)."""
    out: list[list[int]] = [[] for _ in prompts]
    for row, byte in stream(model, prompts, config):
        out[row].append(byte)
    return out
