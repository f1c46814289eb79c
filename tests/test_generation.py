"""Cached byte-by-byte decoding equals the packed forward; sampling and the generate CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hnet import HNetConfig, HNetForCausalLM
from hnet.generation import InferenceCache, KVCache, SamplingConfig, generate, sample
from hnet.tokenizer import BOS

ROOT = Path(__file__).resolve().parents[1]
LENGTHS = [40, 23, 7]  # the longest exceeds the debug flavors' attention window of 15


def _model(flavor: str) -> HNetForCausalLM:
    """Random fp32 model whose routers give mixed boundaries and whose residual and pad paths matter."""
    torch.manual_seed(0)
    model = HNetForCausalLM(HNetConfig.from_flavor(flavor))
    model.init_weights()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for stage in model.stages():
            if stage.pad_dimension is not None:
                stage.pad_dimension.normal_(0, 1, generator=g)
            if stage.is_innermost:
                continue
            for layer in (stage.routing_module.q_proj_layer, stage.routing_module.k_proj_layer):
                layer.weight.add_(torch.randn(layer.weight.shape, generator=g) * 0.5)
            stage.residual_proj.weight.normal_(0, 0.02, generator=g)
            stage.residual_proj.bias.normal_(0, 0.02, generator=g)
    return model.eval()


def _docs(lengths: list[int], seed: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, 256, (n,), generator=g) for n in lengths]
    for d in docs:
        d[0] = BOS
    return docs


def _packed_forward(model: HNetForCausalLM, docs: list[torch.Tensor]):
    cu = torch.tensor([0] + torch.tensor([len(d) for d in docs]).cumsum(0).tolist(), dtype=torch.int32)
    with torch.no_grad():
        return model(torch.cat(docs), cu), cu


@pytest.mark.parametrize("flavor", ["debug", "debug_2stage"])
def test_cached_steps_match_packed_forward(flavor):
    model = _model(flavor)
    docs = _docs(LENGTHS)
    out, cu = _packed_forward(model, docs)
    for router in out.router_outputs:  # both boundary and non-boundary bytes are exercised
        assert 0.2 < router.boundary_mask.float().mean() < 0.8

    cache = InferenceCache(model, len(docs))
    for t in range(max(LENGTHS)):  # rows advance together while they have bytes, then drop out
        rows = torch.tensor([r for r, d in enumerate(docs) if len(d) > t])
        logits = cache.step(torch.stack([docs[r][t] for r in rows]), rows)
        expected = out.logits[cu[rows].long() + t]
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)

    windowed = [c for c in cache.mixers.values() if isinstance(c, KVCache) and c.window >= 0]
    assert windowed and all(c.capacity == c.window + 1 for c in windowed)
    assert max(int(c.length.max()) for c in windowed) > windowed[0].capacity  # the ring buffer wrapped


def test_prefill_returns_each_rows_last_logits():
    model = _model("debug_2stage")
    docs = _docs(LENGTHS)
    out, cu = _packed_forward(model, docs)
    last = InferenceCache(model, len(docs)).prefill([d.tolist() for d in docs])
    torch.testing.assert_close(last, out.logits[cu[1:].long() - 1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("flavor", ["debug", "debug_2stage"])
def test_greedy_generation_matches_forward_argmax(flavor):
    model = _model(flavor)
    prompts = [d.tolist() for d in _docs([12, 3, 20], seed=3)]
    new = generate(model, prompts, SamplingConfig(max_new_bytes=8, temperature=0))
    for prompt, generated in zip(prompts, new):
        assert 1 <= len(generated) <= 8
        full = torch.tensor(prompt + generated)
        out, _ = _packed_forward(model, [full])
        predicted = out.logits[len(prompt) - 1 : len(full) - 1].argmax(-1)
        assert predicted.tolist() == generated


def test_sampling_filters_and_seed():
    model = _model("debug")
    prompts = [d.tolist() for d in _docs([5, 9], seed=4)]
    greedy = generate(model, prompts, SamplingConfig(max_new_bytes=6, temperature=0))
    assert generate(model, prompts, SamplingConfig(max_new_bytes=6, top_k=1)) == greedy
    assert generate(model, prompts, SamplingConfig(max_new_bytes=6, top_p=1e-6)) == greedy
    config = SamplingConfig(max_new_bytes=6, temperature=1.3, top_k=50, top_p=0.9, seed=7)
    assert generate(model, prompts, config) == generate(model, prompts, config)


def test_sample_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    drawn = {int(sample(logits, SamplingConfig(top_p=0.75), g)) for _ in range(200)}
    assert drawn == {0, 1}


@pytest.mark.parametrize(
    "kwargs, message",
    [({"temperature": -1}, "temperature"), ({"top_k": -2}, "top_k"), ({"top_p": 0}, "top_p"), ({"max_new_bytes": -1}, "max_new_bytes")],
)
def test_sampling_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**kwargs)


def test_generate_cli_random_init():
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run(
        [sys.executable, "-m", "hnet_titan.generate", "--flavor", "debug", "--random-init", "--prompt", "Hi",
         "--max-new-bytes", "12", "--temperature", "0.8", "--seed", "3", "--device", "cpu"],
        cwd=ROOT, env=env, capture_output=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr.decode()
    text = result.stdout.decode("utf-8")
    assert text.startswith("Hi") and len(text.rstrip("\n")) > len("Hi")


def test_generate_cli_sets_expandable_segments_as_the_trainer(monkeypatch, capsys):
    from hnet_titan import generate as cli

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    assert cli.main(["--flavor", "debug", "--random-init", "--prompt", "Hi", "--max-new-bytes", "2", "--device", "cpu"]) == 0
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert capsys.readouterr().out.startswith("Hi")
