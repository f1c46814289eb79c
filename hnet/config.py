"""H-Net architecture config, compatible with the reference JSON format.

A config is the reference ``HNetConfig``: ``arch_layout`` (nested lists, outer stage first),
per-stage lists ``d_model`` / ``d_intermediate`` / ``attn_cfg.*`` and one ``ssm_cfg``.
Validation happens at construction so a bad config fails before any module is built,
with one message naming the offending key.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

_RUN = re.compile(r"([mMtT])(\d+)")


class HNetConfigError(ValueError):
    """A user-fixable problem in an H-Net config."""


@dataclass(frozen=True)
class LayerSpec:
    """One block: ``mixer`` is "mamba" or "attention"; ``mlp`` adds a SwiGLU after it."""

    mixer: str
    mlp: bool

    @property
    def n_residuals(self) -> int:
        return 2 if self.mlp else 1


def parse_layout_string(text: Any, where: str) -> list[LayerSpec]:
    """Parse a run string such as ``"m4T2"`` into one LayerSpec per block."""
    if not isinstance(text, str) or not text or _RUN.sub("", text) != "":
        raise HNetConfigError(
            f"arch_layout{where}: {text!r} is not a layout string; expected runs like 'm4', 'T22' or 'm1T2' "
            "(m = Mamba2, t = attention, upper case adds a SwiGLU MLP, each followed by a count)"
        )
    specs = []
    for letter, count in _RUN.findall(text):
        if int(count) < 1:
            raise HNetConfigError(f"arch_layout{where}: run {letter}{count} has no layers")
        mixer = "mamba" if letter in "mM" else "attention"
        specs += [LayerSpec(mixer, letter.isupper())] * int(count)
    return specs


@dataclass(frozen=True)
class StageLayout:
    """Sub-networks of one hierarchy stage: encoder/decoder for outer stages, main for the innermost."""

    encoder: list[LayerSpec] | None
    main: list[LayerSpec] | None
    decoder: list[LayerSpec] | None

    @property
    def is_innermost(self) -> bool:
        return self.main is not None

    def networks(self) -> dict[str, list[LayerSpec]]:
        names = ("main_network",) if self.is_innermost else ("encoder", "decoder")
        return {n: getattr(self, "main" if n == "main_network" else n) for n in names}


def parse_arch_layout(layout: Any) -> list[StageLayout]:
    """Flatten the nested layout into one StageLayout per stage, outer first."""
    stages: list[StageLayout] = []
    node, where = layout, ""
    while True:
        if not isinstance(node, list) or len(node) not in (1, 3):
            raise HNetConfigError(
                f"arch_layout{where}: expected [encoder, [inner...], decoder] or [main], got {node!r}"
            )
        if len(node) == 1:
            stages.append(StageLayout(None, parse_layout_string(node[0], f"{where}[0]"), None))
            return stages
        enc = parse_layout_string(node[0], f"{where}[0]")
        dec = parse_layout_string(node[2], f"{where}[2]")
        stages.append(StageLayout(enc, None, dec))
        node, where = node[1], f"{where}[1]"


@dataclass
class SSMConfig:
    """Mamba2 settings shared by all stages (headdim 64 and ngroups 1 are fixed by the reference)."""

    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    chunk_size: int = 256


@dataclass
class AttnConfig:
    """Per-stage attention settings; window_size -1 is global, W attends to W previous keys and itself."""

    num_heads: list[int] = field(default_factory=list)
    rotary_emb_dim: list[int] = field(default_factory=list)
    window_size: list[int] = field(default_factory=list)


MAMBA_HEADDIM = 64
MAMBA_NGROUPS = 1


@dataclass
class HNetConfig:
    """The reference H-Net config. Lists are per stage, outer stage first."""

    arch_layout: list = field(default_factory=list)
    d_model: list[int] = field(default_factory=list)
    d_intermediate: list[int] = field(default_factory=list)
    vocab_size: int = 256
    ssm_cfg: SSMConfig = field(default_factory=SSMConfig)
    attn_cfg: AttnConfig = field(default_factory=AttnConfig)
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.ssm_cfg, SSMConfig):  # a dict, or a user error _from_dict reports
            self.ssm_cfg = _from_dict(SSMConfig, self.ssm_cfg, "ssm_cfg.")
        if not isinstance(self.attn_cfg, AttnConfig):
            self.attn_cfg = _from_dict(AttnConfig, self.attn_cfg, "attn_cfg.")
        self.stages = parse_arch_layout(self.arch_layout)
        self._validate()

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict) -> HNetConfig:
        return _from_dict(cls, copy.deepcopy(data), "")

    @classmethod
    def from_json(cls, path: str | Path) -> HNetConfig:
        path = Path(path)
        if not path.is_file():
            raise HNetConfigError(f"model config file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise HNetConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(data)

    @classmethod
    def from_flavor(cls, name: str) -> HNetConfig:
        if name not in FLAVORS:
            raise HNetConfigError(f"unknown model flavor {name!r}; valid flavors: {', '.join(FLAVORS)}")
        return cls.from_dict(FLAVORS[name])

    def to_dict(self) -> dict:
        return {f.name: copy.deepcopy(asdict(self)[f.name]) for f in fields(self)}

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    # ---- derived ------------------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        """Hierarchy stages including the innermost: a 1-stage H-Net has 2."""
        return len(self.stages)

    def n_residuals(self) -> list[int]:
        """Residual branches accumulated outer to inner; sets the out_proj / fc2 init scale per stage."""
        total, out = 0, []
        for stage in self.stages:
            total += sum(s.n_residuals for net in stage.networks().values() for s in net)
            out.append(total)
        return out

    # ---- validation ---------------------------------------------------------------------------
    def _validate(self) -> None:
        depth = self.num_stages
        per_stage = {
            "d_model": self.d_model,
            "d_intermediate": self.d_intermediate,
            "attn_cfg.num_heads": self.attn_cfg.num_heads,
            "attn_cfg.rotary_emb_dim": self.attn_cfg.rotary_emb_dim,
            "attn_cfg.window_size": self.attn_cfg.window_size,
        }
        for key, values in per_stage.items():
            if not isinstance(values, list) or len(values) != depth:
                raise HNetConfigError(
                    f"{key}: expected a list of {depth} values (one per stage of arch_layout), got {values!r}"
                )
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                raise HNetConfigError(f"{key}: expected integers, got {values!r}")
        for s in range(depth):
            d, heads = self.d_model[s], self.attn_cfg.num_heads[s]
            rot, win = self.attn_cfg.rotary_emb_dim[s], self.attn_cfg.window_size[s]
            if d <= 0 or (d * self.ssm_cfg.expand) % MAMBA_HEADDIM:
                raise HNetConfigError(
                    f"d_model[{s}] = {d}: must be positive with d_model * ssm_cfg.expand divisible by the "
                    f"Mamba2 head dim {MAMBA_HEADDIM}"
                )
            if s > 0 and d < self.d_model[s - 1]:
                raise HNetConfigError(f"d_model: widths never shrink inward, but d_model[{s}] = {d} < d_model[{s - 1}]")
            if heads <= 0 or d % heads:
                raise HNetConfigError(f"attn_cfg.num_heads[{s}] = {heads}: d_model[{s}] = {d} is not divisible by it")
            if rot < 0 or rot % 2 or rot > d // heads:
                raise HNetConfigError(
                    f"attn_cfg.rotary_emb_dim[{s}] = {rot}: must be even and at most the head dim {d // heads}"
                )
            if win != -1 and win < 0:
                raise HNetConfigError(f"attn_cfg.window_size[{s}] = {win}: use -1 (global) or W >= 0")
            if self.d_intermediate[s] < 0:
                raise HNetConfigError(f"d_intermediate[{s}] = {self.d_intermediate[s]}: must be >= 0")
            uses_mlp = any(spec.mlp for net in self.stages[s].networks().values() for spec in net)
            if uses_mlp and self.d_intermediate[s] == 0:
                raise HNetConfigError(
                    f"d_intermediate[{s}] = 0 but arch_layout stage {s} has upper-case (MLP) blocks"
                )
        for key in ("d_state", "d_conv", "expand", "chunk_size"):
            if getattr(self.ssm_cfg, key) <= 0:
                raise HNetConfigError(f"ssm_cfg.{key} must be positive")
        if self.vocab_size != 256:
            raise HNetConfigError(f"vocab_size = {self.vocab_size}: H-Net is byte level, vocab_size must be 256")
        if self.tie_embeddings:
            raise HNetConfigError("tie_embeddings = true is not supported: H-Net unties embeddings and lm_head")


def _from_dict(cls, data: Any, prefix: str):
    if not isinstance(data, dict):
        raise HNetConfigError(f"{prefix.rstrip('.') or 'config'}: expected an object, got {data!r}")
    known = {f.name for f in fields(cls)}
    for key in data:
        if key not in known:
            raise HNetConfigError(f"unknown key {prefix}{key!r}; valid keys: {', '.join(sorted(known))}")
    return cls(**data)


def lr_multipliers(config: HNetConfig, ratio_targets: list[float], n_gpt: float = 4.6) -> list[float]:
    """Per-stage LR multipliers of the paper (eq. 11), outer stage first.

    lambda_s = sqrt(N_GPT * prod_{i>=s} N_i / prod_i N_i * D_S / D_s): stages that see more bytes per
    step (fewer, wider tokens inside) take larger steps.
    """
    if len(ratio_targets) != config.num_stages - 1:
        raise HNetConfigError(
            f"loss.ratio_targets has {len(ratio_targets)} values, the model has {config.num_stages - 1} "
            "routed stages: give one target compression N per stage"
        )
    total = math.prod(ratio_targets)
    d_inner = config.d_model[-1]
    return [
        math.sqrt(n_gpt * math.prod(ratio_targets[s:]) / total * d_inner / config.d_model[s])
        for s in range(config.num_stages)
    ]


def _flavor(layout, d_model, d_int, heads, rotary, window, **ssm) -> dict:
    return {
        "arch_layout": layout,
        "d_model": d_model,
        "d_intermediate": d_int,
        "vocab_size": 256,
        "ssm_cfg": {"chunk_size": 256, "d_conv": 4, "d_state": 128, "expand": 2, **ssm},
        "attn_cfg": {"num_heads": heads, "rotary_emb_dim": rotary, "window_size": window},
        "tie_embeddings": False,
    }


FLAVORS: dict[str, dict] = {
    # Tiny CPU models: both mixers, MLPs, a window shorter than test documents, a short SSD chunk.
    "debug": _flavor(
        ["m1t1", ["M1T1"], "t1m1"], [64, 96], [0, 192], [4, 4], [8, 12], [15, -1], d_state=16, chunk_size=32
    ),
    "debug_2stage": _flavor(
        ["m1t1", ["m1t1", ["M1T1"], "t1m1"], "t1m1"],
        [64, 96, 128], [0, 0, 256], [4, 4, 4], [8, 12, 16], [15, 15, -1], d_state=16, chunk_size=32,
    ),
    "hnet_1stage_L": _flavor(["m4", ["T22"], "m4"], [1024, 1536], [0, 4096], [16, 16], [32, 48], [1023, -1]),
    "hnet_2stage_L": _flavor(
        ["m4", ["T1m4", ["T26"], "m4T1"], "m4"],
        [1024, 1024, 1536], [0, 2816, 4096], [16, 16, 16], [32, 32, 48], [1023, 1023, -1],
    ),
    "hnet_1stage_XL": _flavor(["m4", ["T24"], "m4"], [1024, 2048], [0, 5504], [16, 16], [32, 64], [1023, -1]),
    "hnet_2stage_XL": _flavor(
        ["m4", ["T1m4", ["T27"], "m4T1"], "m4"],
        [1024, 1536, 2048], [0, 4096, 5504], [16, 16, 16], [32, 48, 64], [1023, 1023, -1],
    ),
}
