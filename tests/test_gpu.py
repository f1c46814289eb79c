"""CUDA fast path vs the pure-PyTorch reference (scripts/check_kernels.py at a test-sized workload).

Marked ``gpu``; skipped without CUDA. The full-size check (8 x 8192 bytes) is the script itself.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
TOLERANCE = 2e-2


@pytest.fixture(scope="module")
def check_kernels():
    path = Path(__file__).resolve().parents[1] / "scripts" / "check_kernels.py"
    spec = importlib.util.spec_from_file_location("check_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    module.ops.configure(ssd="auto", conv="auto", attention="auto", norm="auto")


def test_each_fast_op_matches_its_reference(check_kernels):
    for name, errors in check_kernels.check_ops(docs=2, doc_len=2048).items():
        assert max(errors.values()) < TOLERANCE, (name, errors)


@pytest.mark.parametrize("trained", [False, True], ids=["eager", "compiled_tf32"])
@pytest.mark.parametrize("flavor", ["hnet_1stage_L", "hnet_2stage_L"])
def test_model_fast_path_matches_reference(check_kernels, flavor, trained):
    r = check_kernels.check_model(flavor, docs=2, doc_len=2048, tolerance=TOLERANCE, trained=trained)
    print(flavor, trained, {k: r[k] for k in ("logits", "grad_global", "grad_max", "worst_over_floor")})  # shown by -rP
    assert r["logits"] < TOLERANCE and r["grad_global"] < TOLERANCE, r
    assert r["within_floor"], r["grad_worst"]
    b = r["backends"]
    assert (b["ssd"], b["conv"], b["norm"]) == ("triton", "cuda", "triton") and b["attention"] in ("varlen", "flash_attn")
