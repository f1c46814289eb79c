"""Exchange checkpoints with the reference H-Net: ``python -m hnet_titan.convert``.

* DCP (a training step, or the newest) -> one reference state-dict file (``--format pt`` via torch.save,
  or ``safetensors``) with exactly the reference keys, shapes and dtypes (``--dtype``, default bfloat16;
  Mamba2 ``D`` and ``residual_proj`` stay float32), plus its JSON config next to it (``<stem>.json``).
* Reference file (or a hub name such as ``cartesia-ai/hnet_2stage_L``) -> a model-only DCP folder in
  float32, usable as ``checkpoint.initial_load_path`` for fine-tuning; its config goes inside it as
  ``model_config.json``.

    python -m hnet_titan.convert --checkpoint outputs/run/checkpoint --output hnet.pt
    python -m hnet_titan.convert --checkpoint hnet_2stage_L.pt --model-config hnet_2stage_L.json \\
        --output outputs/ft/seed/step-0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from hnet import HNetConfig, HNetConfigError
from hnet_titan.config import DTYPES
from hnet_titan.model_io import (
    MODEL_CONFIG_NAME,
    CheckpointError,
    cast_to_spec,
    check_state_dict,
    find_model_config,
    model_spec,
    read_state_dict,
    resolve_checkpoint,
    single_process_dcp,
)


def to_reference(
    state: dict[str, torch.Tensor], config: HNetConfig, dtype: torch.dtype = torch.bfloat16, where: str = "state dict"
) -> dict[str, torch.Tensor]:
    """The reference layout of a model state dict: its keys in reference order, cast to ``dtype`` except fp32 tensors."""
    spec = model_spec(config, dtype)
    check_state_dict(state, spec, where)
    return cast_to_spec(state, spec)


def save_reference(state: dict[str, torch.Tensor], config: HNetConfig, path: str | Path, fmt: str = "pt") -> Path:
    """Write the state dict (torch.save or safetensors) and ``<stem>.json``; returns the config path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        try:
            from safetensors.torch import save_file
        except ImportError:
            raise CheckpointError("--format safetensors needs the safetensors package: pip install safetensors") from None
        save_file(state, str(path))
    else:
        torch.save(state, path)
    config_path = path.with_suffix(".json")
    config.to_json(config_path)
    return config_path


def save_dcp(state: dict[str, torch.Tensor], config: HNetConfig, folder: str | Path, where: str = "state dict") -> None:
    """A model-only DCP checkpoint ``{"model": state}`` in float32, with ``model_config.json`` inside."""
    import torch.distributed.checkpoint as dcp

    folder = Path(folder)
    if (folder / ".metadata").exists():
        raise CheckpointError(f"{folder} already holds a DCP checkpoint; choose a new --output folder")
    spec = model_spec(config, torch.float32)
    check_state_dict(state, spec, where)
    state = cast_to_spec(state, spec)
    with single_process_dcp():
        dcp.save({"model": state}, checkpoint_id=str(folder), no_dist=True)
    config.to_json(folder / MODEL_CONFIG_NAME)


def convert(
    checkpoint: str,
    output: str,
    *,
    step: int | None = None,
    model_config: str | None = None,
    flavor: str | None = None,
    to: str | None = None,
    fmt: str | None = None,
    dtype: str = "bfloat16",
) -> str:
    """Convert ``checkpoint`` to ``output``; ``to`` defaults to the other format. Returns a summary line."""
    source = resolve_checkpoint(checkpoint, step)
    config = find_model_config(source, model_config, flavor)
    state = read_state_dict(source)
    to = to or ("reference" if source.kind == "dcp" else "dcp")
    if to == "dcp":
        save_dcp(state, config, output, where=str(source.path))
        return f"wrote model-only DCP checkpoint {output} (float32) from {source.path}"
    fmt = fmt or ("safetensors" if output.endswith(".safetensors") else "pt")
    reference = to_reference(state, config, DTYPES[dtype], where=str(source.path))
    config_path = save_reference(reference, config, output, fmt)
    return f"wrote reference state dict {output} ({fmt}, {dtype}) and {config_path} from {source.path}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hnet_titan.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="DCP step/checkpoint folder, reference .pt/.safetensors, or hub name")
    parser.add_argument("--output", required=True, help="reference file to write, or DCP folder to create")
    parser.add_argument("--step", type=int, help="step-N folder to read (default: newest complete)")
    parser.add_argument("--model-config", help="reference-format JSON model config")
    parser.add_argument("--flavor", help="named model flavor instead of --model-config")
    parser.add_argument("--to", choices=("reference", "dcp"), help="output kind (default: the other one)")
    parser.add_argument("--format", dest="fmt", choices=("pt", "safetensors"), help="reference file format (default: from --output suffix)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16", help="reference export dtype (DCP is float32)")
    args = parser.parse_args(argv)
    try:
        print(convert(
            args.checkpoint, args.output, step=args.step, model_config=args.model_config, flavor=args.flavor,
            to=args.to, fmt=args.fmt, dtype=args.dtype,
        ))
    except (CheckpointError, HNetConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
