"""Which hierarchy stage each parameter belongs to, so trainers can give stages their own LR."""

from __future__ import annotations

from torch import nn


def param_stages(model: nn.Module) -> dict[str, int]:
    """{parameter name: stage}, outer stage 0; embeddings and lm_head belong to stage 0.

    Decided by module structure, not names, so wrappers (activation checkpointing, compile, FSDP)
    that rename submodules do not change the answer: a stage owns every parameter under its HNet
    module that is not under its inner stage.
    """
    owner: dict[int, int] = {}
    for stage in reversed(model.stages()):  # inner first; outer stages skip what is already owned
        for p in stage.parameters():
            owner.setdefault(id(p), stage.stage)
    return {name: owner.get(id(p), 0) for name, p in model.named_parameters()}
