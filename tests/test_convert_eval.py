"""Checkpoint exchange with the reference layout, loading errors, and evaluation numbers."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F

from hnet import HNetConfig, HNetForCausalLM
from hnet_titan import convert, evaluate
from hnet_titan.data import IGNORE_INDEX, build_dataloader
from hnet_titan.model_io import (
    CheckpointError,
    load_model,
    model_spec,
    read_state_dict,
    resolve_checkpoint,
    single_process_dcp,
)

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCE = FIXTURES if FIXTURES.is_dir() else Path(__file__).resolve().parents[2] / "shared" / "reference"
RELEASED = ["hnet_1stage_L", "hnet_2stage_L", "hnet_1stage_XL", "hnet_2stage_XL"]


def _reference_keys(name: str) -> list[tuple[str, tuple[int, ...], str]]:
    """(key, shape, dtype) lines of a reference key list, in order."""
    rows = []
    for line in (REFERENCE / f"{name}.keys.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape, dtype = line.split("\t")
            rows.append((key, tuple(int(n) for n in shape.strip("()").split(",") if n.strip()), dtype))
    return rows


def _as_rows(spec_or_state) -> list[tuple[str, tuple[int, ...], str]]:
    items = spec_or_state.items()
    return [
        (k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) if torch.is_tensor(v)
        else (k, v[0], str(v[1]).removeprefix("torch."))
        for k, v in items
    ]


def _random_model(flavor: str = "debug_2stage") -> HNetForCausalLM:
    torch.manual_seed(0)
    model = HNetForCausalLM(HNetConfig.from_flavor(flavor))
    model.init_weights()
    with torch.no_grad():  # non-trivial values where init leaves zeros or the identity
        for stage in model.stages()[:-1]:
            stage.residual_proj.weight.normal_(0, 0.02)
            stage.routing_module.q_proj_layer.weight.add_(torch.randn_like(stage.routing_module.q_proj_layer.weight) * 0.3)
    return model.eval()


def _write_run(dump: Path, model: HNetForCausalLM, step: int) -> Path:
    """A training-style DCP step folder (with non-model entries) and the run's model_config.json."""
    folder = dump / "checkpoint" / f"step-{step}"
    state = {
        "model": model.state_dict(),
        "optimizer": {"state": {"exp_avg": torch.ones(3)}},
        "train": {"step": step},
    }
    with single_process_dcp():
        dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    model.config.to_json(dump / "model_config.json")
    return folder


@pytest.mark.parametrize("name", RELEASED)
def test_reference_layout_of_released_flavors(name):
    config = HNetConfig.from_json(REFERENCE / f"{name}.json")
    expected = _reference_keys(name)
    assert _as_rows(model_spec(config, torch.bfloat16)) == expected
    # The export mapping on a meta model: nothing is materialised, the layout is the reference one.
    meta_state = HNetForCausalLM(config, device="meta").state_dict()
    exported = convert.to_reference(meta_state, config, torch.bfloat16)
    assert all(t.is_meta for t in exported.values())
    assert _as_rows(exported) == expected


def test_dcp_reference_dcp_round_trip_is_exact(tmp_path):
    model = _random_model()
    _write_run(tmp_path / "run", model, 3)
    _write_run(tmp_path / "run", model, 5)
    (tmp_path / "run" / "checkpoint" / "step-7").mkdir()  # incomplete: no .metadata, never "latest"
    source = resolve_checkpoint(tmp_path / "run" / "checkpoint")
    assert source.kind == "dcp" and source.step == 5

    ref = tmp_path / "export" / "hnet.pt"
    assert convert.main(["--checkpoint", str(tmp_path / "run"), "--output", str(ref), "--dtype", "float32"]) == 0
    assert ref.with_suffix(".json").is_file()
    assert convert.main(["--checkpoint", str(ref), "--output", str(tmp_path / "back" / "step-0")]) == 0

    back = read_state_dict(resolve_checkpoint(tmp_path / "back"))
    original = model.state_dict()
    assert list(back) == list(original)
    for key, tensor in original.items():
        assert back[key].dtype == torch.float32 and torch.equal(back[key], tensor), key
    reloaded, _ = load_model(tmp_path / "back" / "step-0")  # config found inside the folder
    assert reloaded.config.to_dict() == model.config.to_dict()


def test_bfloat16_and_safetensors_export(tmp_path):
    pytest.importorskip("safetensors")
    model = _random_model()
    step = _write_run(tmp_path / "run", model, 1)
    out = tmp_path / "hnet.safetensors"
    assert convert.main(["--checkpoint", str(step), "--output", str(out)]) == 0
    exported = read_state_dict(resolve_checkpoint(out))
    assert sorted(_as_rows(exported)) == sorted(_as_rows(model_spec(model.config, torch.bfloat16)))  # sorted by the format
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(exported[key].float(), tensor.to(exported[key].dtype).float())
    loaded, _ = load_model(out)  # config found as <stem>.json
    assert loaded.backbone.residual_proj.weight.dtype == torch.float32


def test_state_dict_mismatch_errors(tmp_path):
    state = _random_model("debug").state_dict()

    def error_for(sd: dict) -> str:
        path = tmp_path / "bad.pt"
        torch.save(sd, path)
        with pytest.raises(CheckpointError) as info:
            load_model(path, flavor="debug")
        return str(info.value)

    missing = {k: v for k, v in state.items() if k != "lm_head.weight"}
    assert "1 missing key(s): lm_head.weight" in error_for(missing)
    extra = {**state, "backbone.extra.weight": torch.zeros(1)}
    assert "1 unexpected key(s): backbone.extra.weight" in error_for(extra)
    wrong = {**state, "embeddings.weight": torch.zeros(256, 8)}
    assert "embeddings.weight: checkpoint (256, 8) vs model (256, 64)" in error_for(wrong)
    with pytest.raises(CheckpointError, match="does not match"):  # a 1-stage checkpoint is not a 2-stage model
        torch.save(state, tmp_path / "good.pt")
        load_model(tmp_path / "good.pt", flavor="debug_2stage")


def test_path_errors(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        resolve_checkpoint(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="is not a checkpoint"):
        resolve_checkpoint(tmp_path)
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(CheckpointError, match="unknown format '.npz'"):
        resolve_checkpoint(tmp_path / "w.npz")
    _write_run(tmp_path / "run", _random_model("debug"), 2)
    with pytest.raises(CheckpointError, match=r"no complete step-9; available steps: \[2\]"):
        resolve_checkpoint(tmp_path / "run", step=9)
    torch.save(_random_model("debug").state_dict(), tmp_path / "loose.pt")
    with pytest.raises(CheckpointError, match="--model-config"):
        load_model(tmp_path / "loose.pt")


@pytest.mark.skipif(importlib.util.find_spec("huggingface_hub") is not None, reason="huggingface_hub is installed")
def test_hub_name_without_huggingface_hub():
    with pytest.raises(CheckpointError, match="--checkpoint path.pt --model-config config.json"):
        resolve_checkpoint("cartesia-ai/hnet_2stage_L")


def test_evaluate_matches_direct_forward(tmp_path, monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(5):
        (corpus / f"doc{i}.txt").write_text(f"Document {i}: " + "the quick brown fox jumps over the lazy dog. " * (i + 1))
    model = _random_model("debug")
    _write_run(tmp_path / "run", model, 4)
    results_path = tmp_path / "eval.json"
    argv = ["--checkpoint", str(tmp_path / "run"), "--sources", str(corpus), "--seq-len", "96", "--batch-size", "2",
            "--device", "cpu", "--top-k", "3", "--output", str(results_path), "--quiet"]
    assert evaluate.main(argv) == 0
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"  # as the trainer
    results = json.loads(results_path.read_text())

    nll, count, correct = 0.0, 0, 0
    loader = build_dataloader([str(corpus)], seq_len=96, local_batch_size=2, split="all", infinite=False)
    with torch.no_grad():
        for batch in loader:
            logits = model(batch["input_ids"], batch["cu_seqlens"], batch["max_seqlen"]).logits
            keep = batch["labels"] != IGNORE_INDEX
            nll += F.cross_entropy(logits[keep], batch["labels"][keep], reduction="sum").item()
            correct += (logits[keep].argmax(-1) == batch["labels"][keep]).sum().item()
            count += int(keep.sum())
    assert results["predicted_bytes"] == count
    assert results["bits_per_byte"] == pytest.approx(nll / count / math.log(2), rel=1e-6)
    assert results["accuracy"] == pytest.approx(correct / count)
    assert results["accuracy"] <= results["top3_accuracy"] <= 1
    assert results["step"] == 4 and results["bytes_per_second"] > 0
    (stage,) = results["stages"]
    assert 0 < stage["boundary_fraction"] <= 1
    assert stage["bytes_per_chunk"] == pytest.approx(1 / stage["boundary_fraction"])
