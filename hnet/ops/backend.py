"""Kernel backend selection: one choice per op, resolved per device, logged once.

Every op has a pure-PyTorch reference (it defines the semantics and runs on CPU) and CUDA backends
used automatically on CUDA tensors when their package imports. ``configure`` forces a backend.

Inside ``torch.compile`` the automatic choice for the norms is the reference: Inductor fuses its
few elementwise lines and the reduction with the residual add and casts around it, which a separate
Triton kernel would fence off. The other fast backends are opaque to dynamo (their calls run eagerly
between compiled graphs), except PyTorch's varlen attention, whose aten ops compile in place, and
FlashAttention-4's backward, a custom op that compiled graphs call in place.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
from pathlib import Path

import torch

logger = logging.getLogger("hnet.ops")

# op -> (reference backend, fast backends in order of preference, each with the module it needs)
BACKENDS: dict[str, tuple[str, dict[str, str | None]]] = {
    "ssd": ("torch", {"triton": "mamba_ssm"}),
    "conv": ("torch", {"cuda": "causal_conv1d"}),
    "attention": ("sdpa", {"flash_attn_4": "flash_attn.cute", "flash_attn": "flash_attn_2_cuda",
                           "varlen": "torch.nn.attention.varlen", "flex": None}),
    "norm": ("torch", {"triton": "mamba_ssm"}),
}
_forced: dict[str, str] = {op: "auto" for op in BACKENDS}
_last: dict[tuple[str, str], str] = {}  # (op, device type) -> backend of the latest eager call, for logging


def launch_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it ``t``'s (nothing to do for CPU tensors, as in
    Triton's interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


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


def installed(module: str) -> bool:
    """Whether ``module`` is there to import, found without importing it or its packages.

    FlashAttention-2 is found by its compiled kernels, ``flash_attn_2_cuda``: FlashAttention-4 (flash-attn-4)
    installs ``flash_attn.cute`` without ``flash_attn/__init__.py``, which makes ``flash_attn`` itself an
    importable namespace package that holds none of FlashAttention-2's functions.
    """
    top, _, rest = module.partition(".")
    spec = importlib.util.find_spec(top)
    if spec is None or not rest:
        return spec is not None
    sub = Path(*rest.split("."))
    return any((Path(p) / sub).is_dir() or (Path(p) / sub).with_suffix(".py").is_file()
               for p in spec.submodule_search_locations or ())


# Whether each backend's package is installed, looked up once: ``resolve`` also runs while dynamo
# traces a compiled block, where an import-system call would break the graph.
_INSTALLED = {module: installed(module) for _, fast in BACKENDS.values() for module in fast.values() if module}
# Ops whose reference Inductor fuses better than the fast kernel: the automatic choice while compiling.
_COMPILED_PREFERS_REFERENCE = {"norm"}

# Flash-attention kernels (FlashAttention-4 and -2, PyTorch varlen) take only half-precision inputs.
_HALF_ONLY = {("attention", "flash_attn_4"), ("attention", "flash_attn"), ("attention", "varlen")}
# Fast backends the automatic choice takes only from this compute capability (major) on: FlashAttention-4's
# kernels were measured faster than FlashAttention-2's on Hopper (docs/performance.md, change 42).
_AUTO_FROM_CAPABILITY = {("attention", "flash_attn_4"): 9}


@torch.compiler.assume_constant_result  # read while dynamo traces a block: a constant, not a graph break
@functools.cache
def capability(device: torch.device) -> int:
    """The CUDA device's compute capability, major version (9 for Hopper)."""
    return torch.cuda.get_device_capability(device)[0]


def _available(op: str, name: str, device: torch.device, dtype: torch.dtype | None) -> bool:
    ref, fast = BACKENDS[op]
    if name == ref:
        return True
    if device.type != "cuda":
        return False
    if (op, name) in _HALF_ONLY and dtype not in (torch.float16, torch.bfloat16, None):
        return False
    module = fast[name]
    return module is None or _INSTALLED[module]


def _pick(op: str, device: torch.device, dtype: torch.dtype | None, compiled: bool) -> str:
    forced = _forced[op]
    if forced != "auto":
        if not _available(op, forced, device, dtype):
            raise BackendError(
                f"{op} backend {forced!r} cannot run on {device.type} {dtype or ''} inputs here (needs CUDA, its "
                f"package, and half precision for flash kernels); use 'auto' or '{BACKENDS[op][0]}'"
            )
        return forced
    ref, fast = BACKENDS[op]
    if compiled and op in _COMPILED_PREFERS_REFERENCE:
        return ref
    return next((n for n in fast if n != "flex" and _available(op, n, device, dtype) and _auto_fits(op, n, device)),
                ref)


def _auto_fits(op: str, name: str, device: torch.device) -> bool:
    least = _AUTO_FROM_CAPABILITY.get((op, name))
    return least is None or capability(device) >= least


def resolve(op: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The backend that runs ``op`` on ``device`` for ``dtype`` inputs: the forced one, else the first fast one."""
    if torch.compiler.is_compiling():  # no logging: a traced side effect would become a guard
        return _pick(op, device, dtype, compiled=True)
    name = _pick(op, device, dtype, compiled=False)
    if _last.get((op, device.type)) != name:
        _last[(op, device.type)] = name
        logger.info("hnet.ops: %s backend on %s = %s", op, device.type, name)
    return name


def selection(device: torch.device, dtype: torch.dtype, compiled: bool = False) -> dict[str, str]:
    """The backend of every op for ``dtype`` inputs on ``device``, for logs and reports.

    With ``compiled``, an op whose choice differs inside compiled blocks reads e.g. "triton (torch in
    compiled blocks)".
    """
    out = {}
    for op in BACKENDS:
        eager, inside = _pick(op, device, dtype, False), _pick(op, device, dtype, True)
        out[op] = eager if not compiled or inside == eager else f"{eager} ({inside} in compiled blocks)"
    return out
