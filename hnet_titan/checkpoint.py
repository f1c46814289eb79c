"""Checkpoints: save and resume the whole training state with torch.distributed.checkpoint (DCP).

Each save is one DCP folder ``<dump_folder>/<checkpoint.folder>/step-N`` holding the state dict

    {"model": ..., "optimizer": ..., "lr_scheduler": ..., "train": ..., "dataloader": ...}

``"model"`` has exactly HNetForCausalLM's state-dict keys (sharded or not: any world size loads it),
``"optimizer"`` the AdamW state keyed by parameter name, ``"train"`` the step, the bytes seen and each
rank's RNG states (``rng.rank<R>``), ``"dataloader"`` each data-parallel rank's stream position
(``rank<R>``). Model-only checkpoints (a seed at step 0, the final export, a converted reference
model) hold ``"model"`` alone.

A save is written into ``step-N.tmp`` and renamed to ``step-N`` once every rank has finished, so a
folder named ``step-N`` is always complete (it holds DCP's ``.metadata``): a process killed while
saving leaves the previous checkpoint as the newest, and the next start removes the partial folder.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import shutil
import time
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from hnet import HNetConfig
from hnet_titan.config import DTYPES, ConfigError, JobConfig
from hnet_titan.data import DataError
from hnet_titan.model_io import (
    CheckpointError,
    is_complete_dcp,
    key_mismatches,
    model_spec,
    single_process_dcp,
    step_folders,
)

logger = logging.getLogger("hnet_titan")

STATE_KEYS = ("model", "optimizer", "lr_scheduler", "train", "dataloader")
_TMP = ".tmp"


class ModelState:
    """The model's own state-dict keys, sharded as the model is (FSDP2 DTensors or plain tensors)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state_dict)


class OptimizerState:
    """The optimizer state keyed by parameter name, so it reshards with the model."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state_dict)


class _PerRank:
    """One rank's entry ``rank<R>`` of a state every rank saves; DCP merges the ranks' entries.

    The state is pickled so DCP stores it whole instead of flattening its nested, run-dependent keys.
    """

    def __init__(self, obj: Stateful, rank: int) -> None:
        self.obj, self.key = obj, f"rank{rank}"

    def state_dict(self) -> dict[str, bytes]:
        return {self.key: pickle.dumps(self.obj.state_dict())}

    def load_state_dict(self, state_dict: dict[str, bytes]) -> None:
        self.obj.load_state_dict(pickle.loads(state_dict[self.key]))


class _RNG:
    """This process's Python, NumPy, torch CPU and CUDA generator states."""

    def state_dict(self) -> dict[str, Any]:
        state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])


class _TrainState:
    """The trainer's counters (the same on every rank) plus each rank's RNG states under ``rng``."""

    def __init__(self, trainer: Stateful, rank: int, with_rng: bool = True) -> None:
        self.trainer, self.rng, self.with_rng = trainer, _PerRank(_RNG(), rank), with_rng

    def state_dict(self) -> dict[str, Any]:
        state = dict(self.trainer.state_dict())
        if self.with_rng:
            state["rng"] = self.rng.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        rng = state.pop("rng", None)
        self.trainer.load_state_dict(state)
        if rng is not None:
            self.rng.load_state_dict(rng)


def _saved_entries(metadata: Metadata) -> set[str]:
    return {fqn.split(".", 1)[0] for fqn in metadata.state_dict_metadata}


def _check_model_fits(path: Path, metadata: Metadata, model_state: dict[str, Any]) -> None:
    """Name the first missing key, unexpected key and shape mismatch before DCP fails less clearly."""
    saved = {
        fqn.removeprefix("model."): tuple(meta.size) if isinstance(meta, TensorStorageMetadata) else None
        for fqn, meta in metadata.state_dict_metadata.items()
        if fqn.startswith("model.")
    }
    missing, unexpected, mis_shaped = key_mismatches(saved, {k: tuple(v.shape) for k, v in model_state.items()})
    found = {
        "missing key": [repr(k) for k in missing],
        "unexpected key": [repr(k) for k in unexpected],
        "shape mismatch": [
            f"{k!r} is {saved[k]} in the checkpoint but {tuple(model_state[k].shape)} in the model" for k in mis_shaped
        ],
    }
    problems = [
        f"{what} {items[0]}" + (f" (and {len(items) - 1} more)" if len(items) > 1 else "")
        for what, items in found.items()
        if items
    ]
    if problems:
        raise CheckpointError(
            f"checkpoint {path} does not fit the model: {'; '.join(problems)}; load it with the model config "
            "it was saved with (model_config.json in its dump folder)"
        )


def _load(path: Path, states: dict[str, Any]) -> None:
    """dcp.load the Stateful ``states`` from ``path``; DCP's failures become one CheckpointError."""
    state_dict = {key: state.state_dict() for key, state in states.items()}
    try:
        with single_process_dcp():
            dcp.load(state_dict, checkpoint_id=str(path))
    except CheckpointException as e:
        error = next(iter(e.failures.values()))[0]
        raise CheckpointError(f"cannot load checkpoint {path}: {error}") from None
    except (RuntimeError, ValueError) as e:  # raised unwrapped without a process group
        raise CheckpointError(f"cannot load checkpoint {path}: {e}") from None
    for key, state in states.items():
        state.load_state_dict(state_dict[key])


@dataclass
class TrainingParts:
    """What a checkpoint saves and a healing replica group copies: the trainer's stateful parts.

    ``trainer`` is Stateful over the trainer's counters (step, bytes seen).
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: Stateful
    dataloader: Stateful
    trainer: Stateful


class CheckpointManager:
    """Saves the training state every ``checkpoint.interval`` steps and resumes from the newest save.

    The manager adds the RNG states to ``parts``. Call :meth:`load` before iterating the dataloader,
    :meth:`save` after every step and :meth:`close` before the process group is destroyed.
    """

    def __init__(
        self,
        job: JobConfig,
        parts: TrainingParts,
        *,
        model_config: HNetConfig,
        dp_rank: int,
        dp_world_size: int,
    ) -> None:
        self.cfg = cfg = job.checkpoint
        unknown = [key for key in cfg.exclude_from_loading if key not in STATE_KEYS]
        if unknown:
            raise ConfigError(
                f"checkpoint.exclude_from_loading: unknown state {unknown[0]!r}; valid: {', '.join(STATE_KEYS)}"
            )
        if cfg.load_step >= 0 and not cfg.enable:
            raise ConfigError("checkpoint.load_step needs checkpointing on: add --checkpoint.enable")
        self.folder = Path(job.job.dump_folder) / cfg.folder
        self.shared = job.fault_tolerance.enable  # every replica group resumes from here; one writes (ft.py)
        self.model, self.model_config, self.trainer = parts.model, model_config, parts.trainer
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.dp_world_size = dp_world_size
        self.states: dict[str, Stateful] = {
            "model": ModelState(parts.model),
            "optimizer": OptimizerState(parts.model, parts.optimizer),
            "lr_scheduler": parts.lr_scheduler,
            "train": _TrainState(parts.trainer, self.rank),
            "dataloader": _PerRank(parts.dataloader, dp_rank),
        }
        # Async saves run their collectives in a thread, beside training's: they need their own group.
        use_group = cfg.async_mode == "async" and dist.is_initialized()
        timeout = timedelta(seconds=job.parallelism.timeout_s)
        self._group = dist.new_group(backend="gloo", timeout=timeout) if use_group else None
        self._pending: tuple[Future, int, Path, float] | None = None
        self._last_saved = -1

    # ------------------------------------------------------------------ loading

    def load(self) -> Path | None:
        """Resume from the newest complete checkpoint, or ``checkpoint.load_step``; without one, start
        the model from ``checkpoint.initial_load_path`` when set. Returns the folder loaded, if any."""
        if self.rank == 0 and self.folder.is_dir() and not self.shared:  # a live group may be writing one
            for partial in self.folder.glob(f"step-*{_TMP}"):
                logger.warning("removing %s, a checkpoint whose save did not finish", partial)
                shutil.rmtree(partial, ignore_errors=True)
        steps = step_folders(self.folder) if self.cfg.enable else {}
        if self.cfg.load_step >= 0 and self.cfg.load_step not in steps:
            raise CheckpointError(
                f"checkpoint.load_step = {self.cfg.load_step}: {self.folder} has no complete step-"
                f"{self.cfg.load_step}; complete steps: {sorted(steps) or 'none'}"
            )
        if steps:
            step = self.cfg.load_step if self.cfg.load_step >= 0 else max(steps)
            self._resume(steps[step])
            self._last_saved = step
            return steps[step]
        if self.cfg.initial_load_path:
            path = Path(self.cfg.initial_load_path)
            if not is_complete_dcp(path):
                raise CheckpointError(
                    f"checkpoint.initial_load_path {path} is not a complete DCP checkpoint folder (no .metadata); "
                    "give a step-N folder, or convert a reference model with python -m hnet_titan.convert"
                )
            self._load_model(path)
            logger.info("starting from the model weights of %s", path)
            return path
        if self.cfg.enable:
            logger.info("no checkpoint in %s: starting from scratch", self.folder)
        return None

    def _resume(self, path: Path) -> None:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
        saved = _saved_entries(metadata)
        if saved == {"model"}:
            if path.name != "step-0":
                raise CheckpointError(
                    f"{path} holds only model weights (a final export), so training cannot resume from it; "
                    "resume from an earlier step with --checkpoint.load_step, or start a new run from it with "
                    "--checkpoint.initial_load_path"
                )
            self._load_model(path, metadata)
            logger.info("starting from the seed checkpoint %s", path)
            return
        keys = [key for key in STATE_KEYS if key not in self.cfg.exclude_from_loading]
        for key in keys:
            if key not in saved:
                raise CheckpointError(
                    f"checkpoint {path} holds no {key!r} state (it holds {', '.join(sorted(saved))}); "
                    f"start it fresh with --checkpoint.exclude_from_loading {key}"
                )
        states = {key: self.states[key] for key in keys}
        if "model" in states:
            _check_model_fits(path, metadata, states["model"].state_dict())
        if "dataloader" in states:
            prefix = "dataloader.rank"
            ranks = {int(fqn[len(prefix):]) for fqn in metadata.state_dict_metadata if fqn.startswith(prefix)}
            if ranks != set(range(self.dp_world_size)):
                raise DataError(
                    f"the dataloader state in {path} was saved by {max(ranks, default=-1) + 1} data-parallel ranks "
                    f"but this run has {self.dp_world_size}; the data shards differ, so resume without the "
                    "dataloader state (--checkpoint.exclude_from_loading dataloader)"
                )
        if "train" in states:
            has_rng = f"train.rng.rank{self.rank}" in metadata.state_dict_metadata
            if not has_rng:
                logger.warning("%s has no RNG state for rank %d (saved on fewer ranks): keeping this run's", path,
                               self.rank)
            states["train"] = _TrainState(self.trainer, self.rank, with_rng=has_rng)
        begin = time.perf_counter()
        _load(path, states)
        logger.info(
            "resumed from %s (%s) in %.2f s", path, ", ".join(states), time.perf_counter() - begin
        )

    def _load_model(self, path: Path, metadata: Metadata | None = None) -> None:
        metadata = metadata or dcp.FileSystemReader(str(path)).read_metadata()
        model = self.states["model"]
        _check_model_fits(path, metadata, model.state_dict())
        _load(path, {"model": model})

    # ------------------------------------------------------------------ saving

    def save(self, step: int, *, last: bool = False, force: bool = False) -> None:
        """Save at every ``checkpoint.interval`` steps, at the last step and when ``force``d (a stop).

        With ``checkpoint.last_save_model_only`` the last save is the model alone in ``export_dtype``.
        """
        self._publish_if_done()
        if self.due(step, last=last, force=force):
            model_only = last and self.cfg.last_save_model_only
            self._save(step, self._export_state() if model_only else self.states)

    def due(self, step: int, *, last: bool = False, force: bool = False) -> bool:
        """Whether ``save`` with these arguments writes a checkpoint."""
        return self.cfg.enable and step != self._last_saved and (force or last or step % self.cfg.interval == 0)

    def save_seed(self) -> Path:
        """Write the freshly initialised model alone as step-0, in float32: runs of any layout that
        resume from it start from the same weights."""
        existing = sorted(step_folders(self.folder))
        if existing:
            raise CheckpointError(
                f"checkpoint.create_seed_checkpoint: {self.folder} already holds checkpoints (steps {existing}); "
                "choose an empty checkpoint.folder or job.dump_folder"
            )
        self._save(0, {"model": self.states["model"]})
        self.wait()
        return self.folder / "step-0"

    def wait(self) -> None:
        """Block until the background save finishes, then publish it."""
        if self._pending is not None:
            future, step, tmp, begin = self._pending
            self._pending = None
            future.result()
            self._publish(step, tmp, begin)

    def close(self) -> None:
        self.wait()

    def _publish_if_done(self) -> None:
        if self._pending is not None and self._pending[0].done():
            self.wait()

    def _export_state(self) -> dict[str, Any]:
        """The model alone, cast to ``export_dtype`` except the tensors H-Net keeps in float32."""
        spec = model_spec(self.model_config, DTYPES[self.cfg.export_dtype])
        state = {k: v.to(spec[k][1]) for k, v in get_model_state_dict(self.model).items()}
        return {"model": state}

    def _save(self, step: int, states: dict[str, Any]) -> None:
        self.wait()
        tmp = self.folder / f"step-{step}{_TMP}"
        state_dict = {key: s.state_dict() if isinstance(s, Stateful) else s for key, s in states.items()}
        begin = time.perf_counter()
        if self.cfg.async_mode == "async":
            future = dcp.async_save(state_dict, checkpoint_id=str(tmp), process_group=self._group)
            self._pending = (future, step, tmp, begin)
            logger.info("saving checkpoint step-%d in the background", step)
        else:
            with single_process_dcp():
                dcp.save(state_dict, checkpoint_id=str(tmp))
            self._publish(step, tmp, begin)
        self._last_saved = step

    def _publish(self, step: int, tmp: Path, begin: float) -> None:
        """Rank 0 renames the finished save to step-N (every rank has written by now) and prunes old ones."""
        if self.rank != 0:
            return
        final = self.folder / f"step-{step}"
        if final.exists():  # left by an earlier run that went further than the step this one resumed from
            shutil.rmtree(final)
        os.rename(tmp, final)
        logger.info("saved checkpoint %s in %.2f s", final, time.perf_counter() - begin)
        if self.cfg.keep_latest_k > 0:
            steps = step_folders(self.folder)
            for old in sorted(steps)[: -self.cfg.keep_latest_k]:
                shutil.rmtree(steps[old], ignore_errors=True)
