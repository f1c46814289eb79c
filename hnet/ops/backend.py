"""Kernel backend selection: one choice per op, resolved per device, logged once.

Every op has a pure-PyTorch reference (it defines the semantics and runs on CPU) and CUDA backends
used automatically on CUDA tensors when their package imports. ``configure`` forces a backend.
"""

from __future__ import annotations

import importlib.util
import logging

import torch

logger = logging.getLogger("hnet.ops")

# op -> (reference backend, fast backends in order of preference, each with the module it needs)
BACKENDS: dict[str, tuple[str, dict[str, str | None]]] = {
    "ssd": ("torch", {"triton": "mamba_ssm"}),
    "conv": ("torch", {"cuda": "causal_conv1d"}),
    "attention": ("sdpa", {"flash_attn": "flash_attn", "varlen": None, "flex": None}),
    "norm": ("torch", {"triton": "mamba_ssm"}),
}
_forced: dict[str, str] = {op: "auto" for op in BACKENDS}
_last: dict[tuple[str, str], str] = {}  # (op, device type) -> backend of the latest call


class BackendError(ValueError):
    """A forced backend that does not exist or cannot run here."""


def valid_backends(op: str) -> list[str]:
    ref, fast = BACKENDS[op]
    return ["auto", ref, *fast]


def configure(**choices: str) -> None:
    """Force backends, e.g. ``configure(ssd="torch", attention="varlen")``; "auto" restores the default."""
    for op, name in choices.items():
        if op not in BACKENDS:
            raise BackendError(f"unknown op {op!r}; ops with backends: {', '.join(BACKENDS)}")
        if name not in valid_backends(op):
            raise BackendError(f"{op} backend {name!r} is not one of: {', '.join(valid_backends(op))}")
        _forced[op] = name


# Flash-attention kernels (flash_attn, PyTorch varlen) take only half-precision inputs.
_HALF_ONLY = {("attention", "flash_attn"), ("attention", "varlen")}


def _available(op: str, name: str, device: torch.device, dtype: torch.dtype | None) -> bool:
    ref, fast = BACKENDS[op]
    if name == ref:
        return True
    if device.type != "cuda":
        return False
    if (op, name) in _HALF_ONLY and dtype not in (torch.float16, torch.bfloat16, None):
        return False
    if op == "attention" and name == "varlen":
        return importlib.util.find_spec("torch.nn.attention.varlen") is not None
    module = fast[name]
    return module is None or importlib.util.find_spec(module) is not None


def resolve(op: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The backend that runs ``op`` on ``device`` for ``dtype`` inputs: the forced one, else the first fast one."""
    forced = _forced[op]
    if forced != "auto":
        if not _available(op, forced, device, dtype):
            raise BackendError(
                f"{op} backend {forced!r} cannot run on {device.type} {dtype or ''} inputs here (needs CUDA, its "
                f"package, and half precision for flash kernels); use 'auto' or '{BACKENDS[op][0]}'"
            )
        name = forced
    else:
        ref, fast = BACKENDS[op]
        name = next((n for n in fast if n != "flex" and _available(op, n, device, dtype)), ref)
    if _last.get((op, device.type)) != name:
        _last[(op, device.type)] = name
        logger.info("hnet.ops: %s backend on %s = %s", op, device.type, name)
    return name


def chosen(device_type: str | None = None) -> dict[str, str]:
    """The backend each op used in its latest call (on ``device_type``, default: any), for reports."""
    return {op: name for (op, dev), name in sorted(_last.items()) if device_type in (None, dev)}
