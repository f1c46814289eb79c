"""mamba_ssm's autotuned Triton kernels, launched without Triton's per-call autotuner bookkeeping.

Triton's ``Autotuner.run`` rebuilds its cache key on every launch: a dict of every argument, a
membership test in a list per argument and ``hasattr(arg, "dtype")`` on each. mamba_ssm's SSD kernels
take 30-60 arguments, and a Mamba2 layer launches 11 of them per training step. On the lent H100's
host a layer costs 5.6-6.8 ms of host time, more than its GPU time at the short inner lengths of a
2-stage H-Net; skipping the bookkeeping saves 0.2-0.44 ms of it (docs/performance.md, change 32).

``TunedKernel`` stands in for one ``Autotuner``: the first launch for a key goes through the autotuner
(which tunes, or finds its earlier choice), and later launches with the same key go straight to the
kernel with the chosen config, running the config's pre-hook (mamba_ssm zeroes its atomic
accumulators there) as the autotuner does. The key holds what Triton's holds: the values of the
autotuner's key arguments and the dtypes of the tensor arguments. Other attributes are the autotuner's;
``best_config`` is the latest launch's, which mamba_ssm reads after some launches to size a reduction.
"""

from __future__ import annotations

import functools
import importlib
import logging
from types import ModuleType

import torch

logger = logging.getLogger("hnet.ops")


class TunedKernel:
    """``kernel[grid](*args, **kwargs)`` as the wrapped autotuner launches it, with its choice remembered."""

    def __init__(self, tuner):
        self.tuner = tuner
        self.names = list(tuner.arg_names)
        self.key_args = [(self.names.index(k), k) for k in tuner.keys]
        self.chosen: dict[tuple, tuple] = {}  # key -> (config, its keyword arguments)

    def __getattr__(self, name: str):  # configs, and anything else a caller reads off the autotuner
        return getattr(self.tuner, name)

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.run(*args, grid=grid, **kwargs)

    def key(self, args: tuple, kwargs: dict) -> tuple:
        values = tuple(args[i] if i < len(args) else kwargs.get(name) for i, name in self.key_args)
        dtypes = tuple(a.dtype for a in args if isinstance(a, torch.Tensor))
        kw_dtypes = tuple((n, v.dtype) for n, v in kwargs.items() if isinstance(v, torch.Tensor))
        return values, dtypes, kw_dtypes

    def run(self, *args, grid, **kwargs):
        key = self.key(args, kwargs)
        chosen = self.chosen.get(key)
        if chosen is None:
            out = self.tuner.run(*args, grid=grid, warmup=False, **kwargs)
            self.best_config = self.tuner.best_config
            self.chosen[key] = (self.best_config, self.best_config.all_kwargs())
            return out
        config, config_kwargs = chosen
        self.best_config = config
        if config.pre_hook is not None:
            config.pre_hook({**dict(zip(self.names, args)), **kwargs, **config_kwargs})
        return self.tuner.fn.run(*args, grid=grid, warmup=False, **kwargs, **config_kwargs)


def install(*modules: ModuleType) -> int:
    """Replace every autotuned kernel defined in ``modules`` by a ``TunedKernel``; returns how many.

    The modules' launch wrappers look their kernels up by global name at each call, so they pick up the
    replacement. Idempotent. Does nothing for a Triton whose ``Autotuner`` lacks what this relies on.
    """
    from triton.runtime.autotuner import Autotuner

    count = 0
    for module in modules:
        for name, obj in list(vars(module).items()):
            if not isinstance(obj, Autotuner):
                continue
            if not all(hasattr(obj, a) for a in ("arg_names", "keys", "fn")):
                logger.warning("Triton's Autotuner has changed: %s.%s launches through it", module.__name__, name)
                continue
            setattr(module, name, TunedKernel(obj))
            count += 1
    return count


# The mamba_ssm modules whose autotuned kernels this package launches (SSD, the plain RMSNorm).
MAMBA_SSM_MODULES = ("ssd_bmm", "ssd_chunk_scan", "ssd_chunk_state", "ssd_state_passing", "layer_norm")


@functools.cache
def install_mamba_ssm() -> int:
    """``install`` on mamba_ssm's Triton modules, once per process (the callers import mamba_ssm first)."""
    return install(*(importlib.import_module(f"mamba_ssm.ops.triton.{m}") for m in MAMBA_SSM_MODULES))
