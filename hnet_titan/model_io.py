"""Load an H-Net from any checkpoint path: the one place generate, evaluate and convert find weights.

Accepted paths:
  * a DCP step folder ``<dump>/checkpoint/step-N`` (complete when it holds ``.metadata``); only its
    ``"model"`` entry is read;
  * a checkpoint folder of ``step-N`` folders (the newest complete one, or ``step``), or a dump folder
    holding ``checkpoint/``;
  * a consolidated reference state dict, ``.pt`` / ``.pth`` / ``.bin`` (torch.save) or ``.safetensors``;
  * a Hugging Face name such as ``cartesia-ai/hnet_2stage_L`` (fetched with huggingface_hub).
The model config comes from an explicit JSON or flavor, else from ``model_config.json`` in the step
folder or the folders above it (DCP), or ``<stem>.json`` / ``config.json`` next to a file.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from hnet import FLAVORS, HNetConfig, HNetForCausalLM

MODEL_CONFIG_NAME = "model_config.json"
STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
_STEP_DIR = re.compile(r"step-(\d+)")
_HUB_NAME = re.compile(r"[\w.-]+/[\w.-]+")
_SHOW = 5  # keys named per problem in error messages


class CheckpointError(ValueError):
    """A checkpoint path, file or state dict that cannot be used as given."""


@dataclass(frozen=True)
class CheckpointSource:
    """Where the weights are: ``kind`` "dcp" (a step folder) or "file"; ``flavor`` when a hub name implies it."""

    kind: str
    path: Path
    flavor: str | None = None

    @property
    def step(self) -> int | None:
        match = _STEP_DIR.fullmatch(self.path.name) if self.kind == "dcp" else None
        return int(match.group(1)) if match else None


def is_complete_dcp(path: Path) -> bool:
    return (path / ".metadata").is_file()


def step_folders(folder: Path) -> dict[int, Path]:
    """Complete ``step-N`` folders under ``folder`` by step."""
    found = {}
    for child in folder.iterdir() if folder.is_dir() else ():
        match = _STEP_DIR.fullmatch(child.name)
        if match and is_complete_dcp(child):
            found[int(match.group(1))] = child
    return found


def resolve_checkpoint(path: str | Path, step: int | None = None) -> CheckpointSource:
    """Classify ``path`` (see the module docstring); ``step`` picks a step-N folder, default the newest."""
    path = Path(path)
    if not path.exists():
        if _HUB_NAME.fullmatch(str(path)):
            return fetch_pretrained(str(path))
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_file():
        if path.suffix not in STATE_DICT_SUFFIXES:
            raise CheckpointError(
                f"checkpoint file {path}: unknown format {path.suffix!r}; expected {', '.join(STATE_DICT_SUFFIXES)}"
            )
        return CheckpointSource("file", path)
    if is_complete_dcp(path):
        if step is not None:
            raise CheckpointError(f"{path} is a single DCP step folder; step={step} applies to a folder of step-N folders")
        return CheckpointSource("dcp", path)
    if not step_folders(path) and step_folders(path / "checkpoint"):
        path = path / "checkpoint"  # a dump folder
    steps = step_folders(path)
    if not steps:
        raise CheckpointError(
            f"{path} is not a checkpoint: expected a DCP step folder (holding .metadata), a folder of complete "
            f"step-N folders, or a {'/'.join(STATE_DICT_SUFFIXES)} file"
        )
    if step is None:
        return CheckpointSource("dcp", steps[max(steps)])
    if step not in steps:
        raise CheckpointError(f"{path} has no complete step-{step}; available steps: {sorted(steps)}")
    return CheckpointSource("dcp", steps[step])


def fetch_pretrained(name: str) -> CheckpointSource:
    """Download ``<name>/<basename>.pt`` of a released H-Net from the Hugging Face hub."""
    basename = name.split("/")[-1]
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise CheckpointError(
            f"checkpoint {name!r} is not a local path; fetching it from the Hugging Face hub needs huggingface_hub "
            f"(pip install huggingface_hub) and network access; or download {basename}.pt yourself and pass "
            "--checkpoint path.pt --model-config config.json"
        ) from None
    try:
        file = hf_hub_download(repo_id=name, filename=f"{basename}.pt")
    except Exception as e:  # network, auth or missing-file errors all mean the same to the user
        raise CheckpointError(
            f"could not fetch {basename}.pt from the Hugging Face repo {name!r} ({e}); download it yourself "
            "and pass --checkpoint path.pt --model-config config.json"
        ) from None
    return CheckpointSource("file", Path(file), basename if basename in FLAVORS else None)


def find_model_config(
    source: CheckpointSource, model_config: str | Path | None = None, flavor: str | None = None
) -> HNetConfig:
    """The model config: ``model_config`` JSON, else ``flavor``, else one stored with the checkpoint."""
    if model_config:
        return HNetConfig.from_json(model_config)
    if flavor or source.flavor:
        return HNetConfig.from_flavor(flavor or source.flavor)
    if source.kind == "dcp":
        candidates = [folder / MODEL_CONFIG_NAME for folder in (source.path, source.path.parent, source.path.parent.parent)]
    else:
        candidates = [source.path.with_suffix(".json"), source.path.parent / "config.json"]
    for candidate in candidates:
        if candidate.is_file():
            return HNetConfig.from_json(candidate)
    raise CheckpointError(
        f"no model config found for {source.path} (looked for {', '.join(str(c) for c in candidates)}); "
        "pass --model-config CONFIG.json or --flavor NAME"
    )


def read_state_dict(source: CheckpointSource) -> dict[str, torch.Tensor]:
    """The model's tensors on the CPU, as stored (a DCP checkpoint's optimizer and other entries are skipped)."""
    if source.kind == "dcp":
        return _read_dcp_model(source.path)
    if source.path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise CheckpointError(f"reading {source.path} needs the safetensors package: pip install safetensors") from None
        return load_file(str(source.path))
    try:
        state = torch.load(source.path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt or non-torch file
        raise CheckpointError(f"cannot read {source.path} with torch.load: {e}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise CheckpointError(
            f"{source.path} does not hold a flat state dict {{name: tensor}} (got {type(state).__name__}"
            f"{' with keys ' + ', '.join(map(str, list(state)[:_SHOW])) if isinstance(state, dict) else ''})"
        )
    return state


def _read_dcp_model(path: Path) -> dict[str, torch.Tensor]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(path))
    entries = reader.read_metadata().state_dict_metadata
    tensors = {
        key.removeprefix("model."): meta
        for key, meta in entries.items()
        if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)
    }
    if not tensors:
        raise CheckpointError(
            f"DCP checkpoint {path} has no 'model' entry (it holds: {', '.join(sorted({k.split('.')[0] for k in entries}))})"
        )
    state = {k: torch.empty(meta.size, dtype=meta.properties.dtype) for k, meta in tensors.items()}
    with single_process_dcp():
        dcp.load({"model": state}, storage_reader=reader, no_dist=True)
    return state


@contextmanager
def single_process_dcp() -> Iterator[None]:
    """Silence DCP's warning that no process group exists: reading or writing whole tensors here is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def model_spec(config: HNetConfig, dtype: torch.dtype = torch.float32) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{key: (shape, dtype)} of the model's state dict in ``dtype``, built on the meta device.

    Tensors the model keeps in fp32 whatever its dtype (Mamba2 ``D``, ``residual_proj``) keep it here,
    so with bfloat16 this is exactly the reference checkpoint layout.
    """
    model = HNetForCausalLM(config, device="meta", dtype=dtype)
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def check_state_dict(
    state: dict[str, torch.Tensor], spec: dict[str, tuple[tuple[int, ...], torch.dtype]], where: str
) -> None:
    """Raise one CheckpointError naming the first missing, unexpected and mis-shaped keys, if any."""
    missing, extra, mis_shaped = key_mismatches(
        {k: tuple(v.shape) for k, v in state.items()}, {k: shape for k, (shape, _) in spec.items()}
    )
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {spec[k][0]}" for k in mis_shaped]
    problems = [
        _listing(f"{len(missing)} missing key(s)", missing),
        _listing(f"{len(extra)} unexpected key(s)", extra),
        _listing(f"{len(shapes)} shape mismatch(es)", shapes),
    ]
    problems = [p for p, items in zip(problems, (missing, extra, shapes)) if items]
    if problems:
        raise CheckpointError(f"{where} does not match the model config: " + "; ".join(problems))


def key_mismatches(
    found: dict[str, tuple[int, ...] | None], expected: dict[str, tuple[int, ...]]
) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, mis-shaped) keys of ``found`` against ``expected``; a None shape is not compared."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mis_shaped = [k for k in expected if found.get(k) is not None and tuple(found[k]) != tuple(expected[k])]
    return missing, unexpected, mis_shaped


def _listing(title: str, items: list[str]) -> str:
    more = f" (and {len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return f"{title}: {', '.join(items[:_SHOW])}{more}"


def cast_to_spec(
    state: dict[str, torch.Tensor], spec: dict[str, tuple[tuple[int, ...], torch.dtype]]
) -> dict[str, torch.Tensor]:
    """The tensors in the spec's key order and dtypes (call check_state_dict first)."""
    return {k: state[k].to(dtype).contiguous() for k, (_, dtype) in spec.items()}


def load_model(
    path: str | Path,
    *,
    step: int | None = None,
    model_config: str | Path | None = None,
    flavor: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[HNetForCausalLM, CheckpointSource]:
    """A model in eval mode with the checkpoint's weights, on ``device`` in ``dtype`` (fp32 tensors stay fp32)."""
    source = resolve_checkpoint(path, step)
    config = find_model_config(source, model_config, flavor)
    state = read_state_dict(source)
    spec = model_spec(config, dtype)
    check_state_dict(state, spec, str(source.path))
    state = {k: v.to(device) for k, v in cast_to_spec(state, spec).items()}
    model = HNetForCausalLM(config, device="meta", dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval(), source
