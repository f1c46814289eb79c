"""Optimizer and LR schedule: AdamW over per-stage param groups, warmup-stable-decay or cosine.

Each parameter belongs to a hierarchy stage (hnet.params.param_stages) and takes that stage's LR
multiplier (the paper's eq. 11 when ``lr_multipliers = "auto"``); norm weights, biases, Mamba's
A_log / D / dt_bias and pad_dimension take no weight decay (``optimizer.no_weight_decay`` patterns).
"""

from __future__ import annotations

import math
from fnmatch import fnmatch

import torch
from torch.optim.lr_scheduler import LambdaLR

from hnet import HNetConfig, lr_multipliers
from hnet.params import param_stages
from hnet_titan.config import ConfigError, JobConfig


def no_weight_decay(name: str, patterns: list[str]) -> bool:
    """True when a dotted component of ``name`` matches a pattern (fnmatch), e.g. "*norm*" or "D"."""
    parts = name.split(".")
    return any(fnmatch(part, pat) for part in parts for pat in patterns)


def stage_lr_multipliers(job: JobConfig, config: HNetConfig) -> list[float]:
    mults = job.optimizer.lr_multipliers
    if mults == "auto":
        return lr_multipliers(config, job.loss.ratio_targets)
    if len(mults) != config.num_stages:
        raise ConfigError(
            f"optimizer.lr_multipliers has {len(mults)} values but the model has {config.num_stages} stages "
            f"(give one per stage, outer first, or 'auto')"
        )
    return list(mults)


def build_param_groups(model: torch.nn.Module, job: JobConfig, config: HNetConfig) -> list[dict]:
    """One group per (stage, decay/no-decay), each carrying its ``lr_multiplier``."""
    mults = stage_lr_multipliers(job, config)
    stages = param_stages(model)
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        stage, decay = stages[name], not no_weight_decay(name, job.optimizer.no_weight_decay)
        group = groups.setdefault(
            (stage, decay),
            {
                "params": [],
                "lr": job.optimizer.lr * mults[stage],
                "lr_multiplier": mults[stage],
                "weight_decay": job.optimizer.weight_decay if decay else 0.0,
                "name": f"stage{stage}/{'decay' if decay else 'no_decay'}",
            },
        )
        group["params"].append(param)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(model: torch.nn.Module, job: JobConfig, config: HNetConfig) -> torch.optim.Optimizer:
    opt = job.optimizer
    if opt.name != "AdamW":
        raise ConfigError(f"optimizer.name: {opt.name!r} is not supported; valid: AdamW")
    impl = {}
    if opt.implementation == "fused":
        impl = {"fused": True}
    elif opt.implementation == "foreach":
        impl = {"foreach": True}
    elif opt.implementation == "for-loop":
        impl = {"foreach": False}
    elif any(p.is_cuda for p in model.parameters()):
        impl = {"fused": True}
    return torch.optim.AdamW(
        build_param_groups(model, job, config), lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps, **impl
    )


def decay_shape(kind: str, t: float) -> float:
    """Decay from 1 at t = 0 to 0 at t = 1.

    inverse_sqrt follows 1 / sqrt(1 + 99 t), an inverse-square-root fall to a tenth, shifted and
    rescaled so it ends exactly at 0 (then min_lr_factor sets the floor); sqrt is the "1 - sqrt" cooldown.
    """
    t = min(max(t, 0.0), 1.0)
    if kind == "linear":
        return 1.0 - t
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if kind == "sqrt":
        return 1.0 - math.sqrt(t)
    end = 1.0 / math.sqrt(100.0)
    return (1.0 / math.sqrt(1.0 + 99.0 * t) - end) / (1.0 - end)


def lr_factor(job: JobConfig, step: int) -> float:
    """LR multiplier of the base LR at optimizer step ``step`` (0-based), before stage multipliers."""
    sched, total = job.lr_scheduler, job.training.steps
    warmup = sched.warmup_steps if sched.warmup_steps >= 0 else round(sched.warmup_fraction * total)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    floor = sched.min_lr_factor
    if sched.name == "constant":
        return 1.0
    if sched.name == "cosine":
        t = (step - warmup) / max(total - warmup, 1)
        return floor + (1 - floor) * decay_shape("cosine", t)
    decay_steps = round(sched.decay_fraction * total)
    decay_start = total - decay_steps
    if step < decay_start:
        return 1.0
    return floor + (1 - floor) * decay_shape(sched.decay_type, (step - decay_start + 1) / max(decay_steps, 1))


def build_lr_scheduler(optimizer: torch.optim.Optimizer, job: JobConfig) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_factor(job, step))
