"""Data parallelism for H-Net: the device mesh, per-block compile, activation checkpointing, FSDP2 / HSDP / DDP.

``parallelize_model`` applies, innermost first, ``torch.compile`` per block, then activation
checkpointing around blocks, then the data-parallel wrapper bottom-up: every Block of every stage's
encoder, main network and decoder is one unit, each routed stage's fp32 ``residual_proj`` is one
unit, each inner stage module is one unit (routing, pad_dimension and the networks' final norms),
and the root unit holds the embeddings, the outer stage's small modules and lm_head.

Compile goes inside the checkpoint wrapper, not around it as in TorchTitan: a compiled checkpoint
must trace the block as one graph, and the blocks break their graphs around the data-dependent
reference kernels (CPU), so dynamo would run every checkpointed block eagerly.

Gradient reduction: FSDP2, HSDP and replicate all average gradients over the data-parallel ranks.
``Trainer.forward_loss`` scales each rank's loss by the data-parallel world size for the
cross-entropy (summed over the rank's bytes, divided by the global byte count), so that this one
average gives the global-batch mean exactly once.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from datetime import timedelta

import torch
import torch._inductor.config
import torch.distributed as dist
from torch import nn
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

from hnet import HNetConfig
from hnet.model import HNet, HNetForCausalLM
from hnet.modules.block import Isotropic
from hnet_titan.config import DTYPES, ActivationCheckpoint, ConfigError, JobConfig, Parallelism

logger = logging.getLogger("hnet_titan")

MESH_DIMS = ("dp_replicate", "dp_shard")


def configure_cuda_allocator() -> None:
    """Expandable segments unless the user set PYTORCH_CUDA_ALLOC_CONF; call before the first CUDA allocation.

    Dynamic chunking changes the inner stages' lengths, so every activation's size, each step: fixed-size
    segments fragment (a 1-GPU hnet_1stage_L run ran out of memory with 4.3 GiB reserved but unusable).
    """
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def set_tf32(enabled: bool) -> None:
    """fp32 matmuls (residual_proj; all of an fp32 model) on TF32 tensor cores, or in full fp32 (training.tf32)."""
    torch.set_float32_matmul_precision("high" if enabled else "highest")


def init_distributed(timeout_s: int) -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins torchrun's group, or makes a 1-rank group for a plain process.

    A 1-rank group lets a single process take the same FSDP path as many (mixed precision included).
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=timeout_s)
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, timeout=timeout, device_id=device if device.type == "cuda" else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return dist.get_rank(), dist.get_world_size(), device


def dp_degrees(cfg: Parallelism, world_size: int) -> tuple[int, int]:
    """(replicate, shard) degrees; their product is the world size."""
    shard, replicate = cfg.data_parallel_shard_degree, cfg.data_parallel_replicate_degree
    if cfg.dp_mode == "ddp":
        if shard not in (-1, 1) or replicate not in (1, world_size):
            raise ConfigError(
                f"parallelism.dp_mode = 'ddp' replicates the model on every rank: leave "
                f"parallelism.data_parallel_shard_degree at -1 or 1 (got {shard}) and "
                f"parallelism.data_parallel_replicate_degree at 1 or the world size {world_size} (got {replicate})"
            )
        return world_size, 1
    if shard == -1:
        shard = world_size // replicate
    if replicate * shard != world_size:
        raise ConfigError(
            f"parallelism.data_parallel_replicate_degree ({replicate}) x data_parallel_shard_degree "
            f"({cfg.data_parallel_shard_degree}) must equal the world size ({world_size}); set "
            "data_parallel_shard_degree = -1 to use all remaining ranks"
        )
    return replicate, shard


def build_mesh(cfg: Parallelism, world_size: int, device_type: str) -> DeviceMesh:
    """The ("dp_replicate", "dp_shard") device mesh over all ranks (HSDP when both degrees exceed 1)."""
    replicate, shard = dp_degrees(cfg, world_size)
    return init_device_mesh(device_type, (replicate, shard), mesh_dim_names=MESH_DIMS)


def dp_rank_and_size(mesh: DeviceMesh) -> tuple[int, int]:
    """This rank's index among the data-parallel ranks and their number: what shards the data."""
    rank = 0
    for coord, size in zip(mesh.get_coordinate(), mesh.shape):
        rank = rank * size + coord
    return rank, mesh.size()


def reshard_after_forward(choice: str, shard_ranks: int) -> tuple[bool, bool]:
    """FSDP's reshard_after_forward for (inner units, root) under parallelism.fsdp_reshard_after_forward.

    "default": the root keeps its parameters, which backward needs first (TorchTitan's choice), and
    inner units reshard where a shard group has more than one rank. On one rank resharding frees only
    the compute-dtype copy of the parameters and costs a second cast and copy of each unit in backward
    (docs/performance.md, change 39).
    """
    if choice == "default":
        return shard_ranks > 1, False
    return {"always": (True, True), "never": (False, False)}[choice]


def build_model(config: HNetConfig, job: JobConfig, mesh: DeviceMesh, device: torch.device) -> HNetForCausalLM:
    """The parallelized model with the reference init.

    On accelerators the model is built on the meta device, parallelized, then materialised and
    initialised shard by shard (DTensor's RNG tracker draws each shard from its own offset of the
    seeded stream). DTensor random ops on CPU draw every shard from the start of the stream: the
    halves of a matrix sharded in two come out equal and the init changes with the world size. So on
    CPU the full model is initialised first and then sharded, and every layout starts from the
    same weights.
    """
    if device.type == "cpu":
        model = HNetForCausalLM(config, device=device)
        model.init_weights()
        return parallelize_model(model, job, mesh)
    with torch.device("meta"):
        model = HNetForCausalLM(config)
    parallelize_model(model, job, mesh)
    model.to_empty(device=device)
    model.init_weights()
    return model


def parallelize_model(model: HNetForCausalLM, job: JobConfig, mesh: DeviceMesh) -> HNetForCausalLM:
    """Compile, then activation checkpointing, then the data-parallel wrapper; in place."""
    # A network's first block hands its input back as the residual and inner stages return a slice
    # of their wider hidden state: views, but nothing changes them in place (what FSDP warns about).
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(\w*(Block|HNet)\) returned a view tensor")
    if job.compile.enable:
        apply_compile(model, dynamic=job.compile.dynamic)
    checkpointed = apply_activation_checkpointing(model, job.activation_checkpoint, target_lengths(job))
    t, p = job.training, job.parallelism
    param_dtype, reduce_dtype = DTYPES[t.mixed_precision_param], DTYPES[t.mixed_precision_reduce]
    if p.dp_mode == "ddp":
        apply_replicate(model, mesh["dp_replicate"], param_dtype, reduce_dtype)
    else:
        dp_mesh = mesh if mesh["dp_replicate"].size() > 1 else mesh["dp_shard"]
        reshard = reshard_after_forward(p.fsdp_reshard_after_forward, mesh["dp_shard"].size())
        apply_fsdp(model, dp_mesh, param_dtype, reduce_dtype, *reshard)
    logger.info(
        "data parallel: %s over %s mesh %s, params in %s, gradients reduced in %s; activation checkpointing "
        "on %d of %d blocks; compile %s", p.dp_mode, dict(zip(mesh.mesh_dim_names, mesh.shape)), mesh.device_type,
        t.mixed_precision_param, t.mixed_precision_reduce, checkpointed, len(all_blocks(model)),
        "per block" if job.compile.enable else "off",
    )
    return model


def stage_networks(stage: HNet) -> dict[str, Isotropic]:
    """The isotropic networks a stage owns (the main network only in the innermost stage)."""
    if stage.is_innermost:
        return {"main_network": stage.main_network}
    return {"encoder": stage.encoder, "decoder": stage.decoder}


def stage_blocks(stage: HNet) -> list[nn.Module]:
    return [block for net in stage_networks(stage).values() for block in net.layers]


def all_blocks(model: HNetForCausalLM) -> list[nn.Module]:
    return [block for stage in model.stages() for block in stage_blocks(stage)]


def target_lengths(job: JobConfig) -> list[float]:
    """Positions entering each stage of a micro-batch at the target compression, outer stage first."""
    outer = job.training.local_batch_size * job.training.seq_len
    return [outer / math.prod(job.loss.ratio_targets[:s]) for s in range(len(job.loss.ratio_targets) + 1)]


def _checkpoint_longer_than(block: nn.Module, hidden: torch.Tensor, *args, min_positions: float, **kwargs):
    """Recompute in backward for inputs of more than ``min_positions`` positions; a plain call otherwise."""
    if hidden.shape[0] > min_positions:
        return checkpoint(block, hidden, *args, use_reentrant=False, **kwargs)
    return block(hidden, *args, **kwargs)


def apply_activation_checkpointing(
    model: HNetForCausalLM, cfg: ActivationCheckpoint, stage_lengths: list[float] | None = None
) -> int:
    """Wrap blocks to recompute their activations in backward; returns how many were wrapped.

    ``mode`` (or its ``per_stage`` override, outer stage first) applies to the networks named in
    ``networks``; ``every_n`` wraps blocks n-1, 2n-1, ... of each network, trading part of the
    memory saving for less recompute. With ``when_longer_than``, a wrapped block recomputes only
    calls whose input is longer than that many times its stage's entry of ``stage_lengths``
    (``target_lengths``).
    """
    stages = model.stages()
    if cfg.per_stage and len(cfg.per_stage) != len(stages):
        raise ConfigError(
            f"activation_checkpoint.per_stage has {len(cfg.per_stage)} entries but the model has "
            f"{len(stages)} stages; give one mode per stage, outer first, or leave it empty"
        )
    if cfg.when_longer_than and (stage_lengths is None or len(stage_lengths) != len(stages)):
        raise ConfigError(
            f"activation_checkpoint.when_longer_than needs one target length per stage ({len(stages)}), "
            f"got {stage_lengths}: loss.ratio_targets must give one target per routed stage"
        )
    wrapped = 0
    for stage in stages:
        mode = cfg.per_stage[stage.stage] if cfg.per_stage else cfg.mode
        gate = {}
        if cfg.when_longer_than:
            gate = {"checkpoint_fn": _checkpoint_longer_than,
                    "min_positions": cfg.when_longer_than * stage_lengths[stage.stage]}
        before = wrapped
        for name, net in stage_networks(stage).items():
            if mode == "none" or name not in cfg.networks:
                continue
            for i, block in enumerate(net.layers):
                if mode == "full" or (i + 1) % cfg.every_n == 0:
                    net.layers[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT, **gate)
                    wrapped += 1
        if gate and wrapped > before:
            logger.info("activation checkpointing: stage %d recomputes %d blocks for inputs over %d positions",
                        stage.stage, wrapped - before, gate["min_positions"])
    return wrapped


RECOMPILES_PER_KIND = 8  # graphs one kind of block may need: length ranges, views or not, ...
# Inductor computes a norm's weight gradient in the pass that gives its input gradient, as partial sums
# over runs of rows that an eager sum then adds up. Its default run at the 1stage_L main network's
# 10,923 rows is 16: 683 partials per norm, 1 ms of eager sums per step. Runs of 64 take 0.9 ms of
# kernels off that step (docs/performance.md, change 35). A value the user set is kept.
NORM_GRAD_ROWS = 64


def block_kinds(model: HNetForCausalLM) -> set[tuple]:
    """What tells compiled blocks apart: first of its network (no residual in), mixer, MLP, width."""
    return {
        (i == 0, type(block.mixer), block.mlp is not None, block.norm1.weight.shape[0])
        for stage in model.stages() for net in stage_networks(stage).values() for i, block in enumerate(net.layers)
    }


def apply_compile(model: HNetForCausalLM, dynamic: bool) -> None:
    """Compile each block, each network's closing norm, and each routed stage's routing and dechunk modules,
    in place (names unchanged).

    The closing norms run as Inductor kernels, as the blocks' norms do, instead of mamba_ssm's eager Triton
    norm, whose backward launches one program per SM (docs/performance.md, change 48).

    Inner lengths change with every batch. With ``dynamic``, a size becomes symbolic when it first
    changes between calls (torch.compile's ``dynamic=None``): each graph compiles once for its first
    lengths and once more, symbolic, for the rest. Marking every size symbolic from the start
    (``dynamic=True``) also made head counts and widths symbolic in the trainer's graphs that begin at
    a (positions, heads, head dim) tensor, and Inductor's kernels there then index with runtime
    divisions: the rotary and QKV kernels of hnet_1stage_L ran 2-4x slower than with constants
    (docs/performance.md, change 38). Without ``dynamic`` every new length compiles anew.

    Blocks share their code, and dynamo compiles graphs per kind of block (width, mixer, MLP or not,
    first of its network or not: the first gets no residual), and again per range of lengths:
    Inductor's kernel choices guard a lower bound on the length they were made for
    (``5120 <= hidden.size()[0]``), which the tiny inner stages of an untrained router's first steps
    break. Past dynamo's limit per code object (8) the blocks would silently run eagerly for the rest
    of the run: hnet_2stage_L (6 kinds) reached it in step 2 on an H100. The limit is raised to
    ``RECOMPILES_PER_KIND`` times the number of kinds.
    """
    limit = RECOMPILES_PER_KIND * len(block_kinds(model))
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    inductor = torch._inductor.config.triton
    if getattr(inductor, "mix_order_reduction_split_size", 0) is None:  # torch >= 2.10, and not set by the user
        inductor.mix_order_reduction_split_size = NORM_GRAD_ROWS
    mode = None if dynamic else False  # None: automatic dynamic shapes
    for stage in model.stages():
        for net in stage_networks(stage).values():
            for module in (*net.layers, net.rmsnorm):
                module.compile(dynamic=mode)
    for stage in model.stages()[:-1]:  # the elementwise work between the networks
        stage.routing_module.compile(dynamic=mode)
        stage.dechunk_layer.compile(dynamic=mode)


def data_parallel_units(model: HNetForCausalLM) -> list[tuple[nn.Module, str]]:
    """The modules that each get one data-parallel unit, bottom-up, with their precision kind.

    Blocks ("block"); each routed stage's residual_proj ("fp32"); each inner stage ("module": its
    routing, pad_dimension and final norms); the root last ("module": embeddings, the outer
    stage's small modules, lm_head).
    """
    units = []
    for stage in reversed(model.stages()):  # an inner stage's units before the stage that holds it
        units += [(block, "block") for net in stage_networks(stage).values() for block in net.layers]
        if not stage.is_innermost:
            units.append((stage.residual_proj, "fp32"))
        if stage.stage > 0:
            units.append((stage, "module"))
    units.append((model, "module"))
    return units


def precision_policies(param_dtype: torch.dtype, reduce_dtype: torch.dtype) -> dict[str, MixedPrecisionPolicy]:
    """Policies per unit kind (see data_parallel_units).

    Blocks take their inputs as given: FSDP's input cast would turn the fp32 residual stream into
    ``param_dtype``. residual_proj computes in fp32 like the reference. Mamba2's ``D`` (fp32 in the
    reference) shares its block's compute dtype: its fp32 master copy is what the optimizer updates,
    and in bf16 the skip term ``D * x`` then carries at most one more bf16 rounding than the bf16
    output it is added into; a unit of its own per block would cost an all-gather per block.
    """
    return {
        "block": MixedPrecisionPolicy(param_dtype, reduce_dtype, cast_forward_inputs=False),
        "fp32": MixedPrecisionPolicy(torch.float32, reduce_dtype),
        "module": MixedPrecisionPolicy(param_dtype, reduce_dtype),
    }


def apply_fsdp(
    model: HNetForCausalLM,
    mesh: DeviceMesh,
    param_dtype: torch.dtype,
    reduce_dtype: torch.dtype,
    reshard_inner: bool,
    reshard_root: bool,
) -> None:
    """FSDP2 (HSDP on a 2-D mesh) on every data-parallel unit, root last."""
    policies = precision_policies(param_dtype, reduce_dtype)
    for module, kind in data_parallel_units(model):
        reshard = reshard_root if module is model else reshard_inner
        fully_shard(module, mesh=mesh, mp_policy=policies[kind], reshard_after_forward=reshard)


def apply_replicate(
    model: HNetForCausalLM, mesh: DeviceMesh, param_dtype: torch.dtype, reduce_dtype: torch.dtype
) -> None:
    """DDP as FSDP2's replicate: the units and precision policies of apply_fsdp, gradients all-reduced."""
    policies = precision_policies(param_dtype, reduce_dtype)
    for module, kind in data_parallel_units(model):
        replicate(module, mesh=mesh, mp_policy=policies[kind])
