"""Data parallelism on CPU (gloo, real processes): FSDP2 / HSDP / DDP against one rank, activation
checkpointing, mixed precision units, per-block compile, mesh errors.

The parity runs are exact by construction. Every document of the test corpus fills exactly one
row of SEQ_LEN bytes and a micro-batch is one row, so rank r of W trains on documents
r, r + W, r + 2W, ... (the dataloader deals records round-robin over ranks), and a single rank with
W micro-batches of gradient accumulation per step sees the same documents, step by step. Equal
losses and gradient norms then show that the gradient reduction averages exactly once.
"""

from __future__ import annotations

import gc
import itertools
import json
import os
import random

import pytest
import torch
import torch.distributed as dist
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from torch._dynamo.utils import counters
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dist_utils import read_metrics, run_ranks
from hnet import HNetConfig, HNetForCausalLM
from hnet.modules.block import Block
from hnet.modules.dynamic_chunking import forced_boundaries
from hnet_titan.config import ConfigError, JobConfig, Parallelism
from hnet_titan.data import build_dataloader
from hnet_titan.losses import cross_entropy_sum, ratio_loss
from hnet_titan.parallelize import (
    NORM_GRAD_ROWS,
    apply_activation_checkpointing,
    apply_compile,
    block_kinds,
    build_mesh,
    build_model,
    configure_cuda_allocator,
    dp_degrees,
    reshard_after_forward,
    stage_blocks,
    stage_networks,
    target_lengths,
)

SEQ_LEN = 128
STEPS = 5
TARGETS = {"debug": "3.0", "debug_2stage": "3.0,3.0"}


# ---- multi-process parity -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """64 documents of SEQ_LEN - 1 bytes: with BOS and EOS each is exactly one row of SEQ_LEN pairs."""
    rng = random.Random(0)
    words = "the of and to in is was for on that with as by at from it an be this are or which".split()
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    with open(path, "w") as f:
        for i in range(64):
            text = f"doc {i}: " + " ".join(rng.choice(words) for _ in range(SEQ_LEN))
            f.write(json.dumps({"text": text[: SEQ_LEN - 1]}) + "\n")
    return str(path)


def train_args(corpus: str, dump, flavor: str, *extra: str) -> list[str]:
    return [
        "--model.flavor", flavor, "--loss.ratio_targets", TARGETS[flavor],
        "--data.sources", corpus, "--data.val_fraction", "0", "--validation.no_enable",
        "--training.seq_len", str(SEQ_LEN), "--training.local_batch_size", "1", "--training.steps", str(STEPS),
        "--lr_scheduler.name", "constant", "--lr_scheduler.warmup_steps", "0",
        "--metrics.log_freq", "1", "--metrics.no_enable_tensorboard", "--parallelism.timeout_s", "60",
        "--job.dump_folder", str(dump), *extra,
    ]


def losses_and_norms(dump) -> dict[str, dict[int, float]]:
    return {key: read_metrics(dump, key) for key in ("loss", "grad_norm")}


@pytest.fixture(scope="module")
def single_rank(corpus, tmp_path_factory):
    """One rank accumulating `accum` micro-batches per step: the reference for `accum` ranks; cached."""
    cache = {}

    def run(flavor: str, accum: int) -> dict[str, dict[int, float]]:
        if (flavor, accum) not in cache:
            dump = tmp_path_factory.mktemp(f"{flavor}_1x{accum}")
            args = train_args(corpus, dump, flavor, "--training.global_batch_size", str(accum))
            run_ranks(args, nproc=1).check()
            cache[flavor, accum] = losses_and_norms(dump)
        return cache[flavor, accum]

    return run


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_see_the_micro_batches_of_one_accumulating_rank(corpus, world):
    """The premise of the parity runs: rank r's step-i batch is the single rank's micro-batch world*i + r."""
    def batches(rank: int, ranks: int, n: int) -> list[dict]:
        loader = build_dataloader([corpus], seq_len=SEQ_LEN, local_batch_size=1, dp_rank=rank, dp_world_size=ranks)
        return list(itertools.islice(loader, n))

    single = batches(0, 1, world * STEPS)
    for rank in range(world):
        for step, batch in enumerate(batches(rank, world, STEPS)):
            expected = single[world * step + rank]
            assert batch["cu_seqlens"].tolist() == [0, SEQ_LEN]  # one whole document
            for key in ("input_ids", "labels", "cu_seqlens"):
                assert torch.equal(batch[key], expected[key]), (rank, step, key)


def assert_parity(
    actual: dict[str, dict[int, float]], expected: dict[str, dict[int, float]], rel: float = 1e-5
) -> None:
    assert sorted(expected["loss"]) == list(range(1, STEPS + 1))
    for key in ("loss", "grad_norm"):
        assert actual[key].keys() == expected[key].keys()
        for step, value in expected[key].items():
            assert actual[key][step] == pytest.approx(value, rel=rel, abs=rel), (key, step)


@pytest.mark.parametrize(
    "flavor, reshard", [("debug", "default"), ("debug_2stage", "always")], ids=["debug", "debug_2stage"]
)
def test_fsdp_two_ranks_match_one_rank(corpus, single_rank, tmp_path, flavor, reshard):
    args = train_args(corpus, tmp_path, flavor, "--parallelism.fsdp_reshard_after_forward", reshard)
    run_ranks(args, nproc=2).check()
    assert_parity(losses_and_norms(tmp_path), single_rank(flavor, 2))


def test_hsdp_2x2_with_activation_checkpointing_matches_one_rank(corpus, single_rank, tmp_path):
    args = train_args(
        corpus, tmp_path, "debug", "--parallelism.data_parallel_replicate_degree", "2",
        "--activation_checkpoint.mode", "full",
    )
    result = run_ranks(args, nproc=4).check()
    assert "'dp_replicate': 2, 'dp_shard': 2" in result.output
    assert_parity(losses_and_norms(tmp_path), single_rank("debug", 4))


def test_ddp_two_ranks_match_one_rank(corpus, single_rank, tmp_path):
    run_ranks(train_args(corpus, tmp_path, "debug", "--parallelism.dp_mode", "ddp"), nproc=2).check()
    assert_parity(losses_and_norms(tmp_path), single_rank("debug", 2))


@pytest.mark.slow
def test_compiled_checkpointed_fsdp_two_ranks_match_eager_one_rank(corpus, single_rank, tmp_path):
    args = train_args(corpus, tmp_path, "debug", "--compile.enable", "--activation_checkpoint.mode", "every_n")
    run_ranks(args, nproc=2, timeout=600).check()
    # Inductor sums in another order than eager (the router's cosine, the norms): 1.2e-5 apart by step 5
    assert_parity(losses_and_norms(tmp_path), single_rank("debug", 2), rel=1e-4)


def test_mesh_mismatch_is_one_clear_error(corpus, tmp_path):
    args = train_args(corpus, tmp_path, "debug", "--parallelism.data_parallel_shard_degree", "4")
    result = run_ranks(args, nproc=2, grace=30.0)  # both ranks fail alone; a loaded machine exits slowly
    assert result.returncodes == [2, 2]
    assert "data_parallel_shard_degree (4) must equal the world size (2)" in result.output
    assert "Traceback" not in result.output


# ---- mesh degrees ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, shard, replicate, world, expected",
    [("fsdp", -1, 1, 4, (1, 4)), ("fsdp", -1, 2, 8, (2, 4)), ("fsdp", 2, 2, 4, (2, 2)),
     ("fsdp", -1, 1, 1, (1, 1)), ("ddp", -1, 1, 4, (4, 1)), ("ddp", 1, 4, 4, (4, 1))],
)
def test_dp_degrees(mode, shard, replicate, world, expected):
    cfg = Parallelism(data_parallel_shard_degree=shard, data_parallel_replicate_degree=replicate, dp_mode=mode)
    assert dp_degrees(cfg, world) == expected


@pytest.mark.parametrize("user_value", [None, "max_split_size_mb:256"])
def test_cuda_allocator_expandable_unless_the_user_chose(monkeypatch, user_value):
    if user_value is None:
        monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    else:
        monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", user_value)
    configure_cuda_allocator()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == (user_value or "expandable_segments:True")


@pytest.mark.parametrize(
    "mode, shard, replicate, world, message",
    [("fsdp", 3, 1, 4, "must equal the world size (4)"), ("fsdp", -1, 3, 4, "must equal the world size (4)"),
     ("fsdp", 2, 1, 1, "must equal the world size (1)"), ("ddp", 2, 1, 4, "replicates the model on every rank"),
     ("ddp", -1, 2, 4, "replicates the model on every rank")],
)
def test_mesh_degree_errors(mode, shard, replicate, world, message):
    cfg = Parallelism(data_parallel_shard_degree=shard, data_parallel_replicate_degree=replicate, dp_mode=mode)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_mesh(cfg, world, "cpu")  # fails before it needs a process group


# ---- mixed precision units (one rank, in process) -------------------------------------------------


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    gc.collect()  # free FSDP state before the group goes (see notes on exit-time aborts)
    dist.destroy_process_group()


def test_bf16_units_keep_fp32_where_the_reference_does(one_rank_group):
    job = JobConfig.from_dict({"training": {"mixed_precision_param": "bfloat16"}})
    model = build_model(HNetConfig.from_flavor("debug_2stage"), job, build_mesh(job.parallelism, 1, "cpu"),
                        torch.device("cpu"))
    seen = {}

    def linear(name):
        def hook(module, args, output):
            seen[name] = (args[0].dtype, module.weight.dtype, output.dtype)
        return hook

    def block(module, args, output):
        seen["residual"] = output[1].dtype

    stage1 = model.stages()[1]
    stage1.residual_proj.register_forward_hook(linear("residual_proj"))
    stage1.encoder.layers[0].mixer.in_proj.register_forward_hook(linear("in_proj"))
    stage1.encoder.layers[0].register_forward_hook(block)
    ids = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(0))
    out = model(ids, torch.tensor([0, 120, 300], dtype=torch.int32))
    cross_entropy_sum(out.logits, ids).backward()

    assert seen["residual_proj"] == (torch.float32,) * 3
    assert seen["in_proj"] == (torch.bfloat16,) * 3
    assert seen["residual"] == torch.float32  # the residual stream stays fp32 between blocks
    assert out.logits.dtype == torch.bfloat16
    assert all(p.dtype == p.grad.dtype == torch.float32 for p in model.parameters())


# ---- activation checkpointing (in process) --------------------------------------------------------


class LiveActivations(TorchDispatchMode):
    """Bytes of the tensors created under it that are still alive: what forward keeps for backward."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: list[tuple[StorageWeakRef, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                self.storages.append((StorageWeakRef(storage), storage.nbytes()))
        return out

    def live_bytes(self) -> int:
        """Each storage still alive, once (outputs that are views share one)."""
        live = {ref.cdata: n for ref, n in self.storages if not ref.expired()}
        return sum(live.values())


def forward_backward(flavor: str, ac: dict, stage_lengths: list[float] | None = None):
    """Loss, gradients by reference name, activation bytes alive after forward, block calls per stage
    (a recomputed block runs twice) and each stage's length, for one batch."""
    torch.manual_seed(0)
    model = HNetForCausalLM(HNetConfig.from_flavor(flavor))
    model.init_weights()
    calls = [0] * len(model.stages())
    for stage in model.stages():
        for block in stage_blocks(stage):
            block.register_forward_pre_hook(lambda *_, s=stage.stage: calls.__setitem__(s, calls[s] + 1))
    ac_cfg = JobConfig.from_dict({"activation_checkpoint": ac}).activation_checkpoint
    apply_activation_checkpointing(model, ac_cfg, stage_lengths)
    ids = torch.randint(0, 256, (513,), generator=torch.Generator().manual_seed(1))
    with LiveActivations() as live:
        out = model(ids[:-1], torch.tensor([0, 100, 300, 512], dtype=torch.int32))
        loss = cross_entropy_sum(out.logits, ids[1:]) / 512 + 0.03 * sum(ratio_loss(r, 3.0) for r in out.router_outputs)
    kept = live.live_bytes()
    loss.backward()
    grads = {n.replace("._checkpoint_wrapped_module", ""): p.grad for n, p in model.named_parameters()}
    return loss.item(), grads, kept, calls, [seq.total for seq in out.stage_seqs]


@pytest.mark.parametrize("flavor", ["debug", "debug_2stage"])
@pytest.mark.parametrize("mode, max_kept", [("full", 0.35), ("every_n", 0.8)])
def test_activation_checkpointing_same_gradients_less_memory(flavor, mode, max_kept):
    loss, grads, kept, _, _ = forward_backward(flavor, {"mode": "none"})
    ac_loss, ac_grads, ac_kept, _, _ = forward_backward(flavor, {"mode": mode, "every_n": 2})
    assert ac_loss == loss
    assert ac_grads.keys() == grads.keys()
    for name, grad in grads.items():
        assert torch.equal(ac_grads[name], grad), name
    assert ac_kept < max_kept * kept, (ac_kept, kept)


def test_activation_checkpointing_only_for_inputs_longer_than_their_target():
    """when_longer_than: a block recomputes only calls longer than that factor x its stage's target length."""
    loss, grads, kept, calls, lengths = forward_backward("debug", {"mode": "none"})
    assert lengths[0] == 512 and 1 < lengths[1] < 512
    ac = {"mode": "full", "when_longer_than": 2.0}
    # At their targets (within the factor): nothing is recomputed, nothing saved.
    at_loss, at_grads, at_kept, at_calls, _ = forward_backward("debug", ac, [512, lengths[1] / 1.9])
    assert (at_loss, at_calls, at_kept) == (loss, calls, kept)
    # The inner stage keeps 4x its target: its blocks recompute, the outer stage's still do not.
    long_loss, long_grads, long_kept, long_calls, _ = forward_backward("debug", ac, [512, lengths[1] / 4])
    assert long_loss == loss and long_calls == [calls[0], 2 * calls[1]]
    assert long_kept < kept
    for name, grad in grads.items():
        assert torch.equal(at_grads[name], grad) and torch.equal(long_grads[name], grad), name


def test_activation_checkpointing_target_lengths_follow_the_ratio_targets():
    job = JobConfig.from_dict({"training": {"local_batch_size": 8, "seq_len": 8192}, "loss": {"ratio_targets": [3, 3]}})
    assert target_lengths(job) == pytest.approx([65536, 65536 / 3, 65536 / 9])
    with torch.device("meta"):
        model = HNetForCausalLM(HNetConfig.from_flavor("debug_2stage"))
    cfg = JobConfig.from_dict({"activation_checkpoint": {"mode": "full", "when_longer_than": 2}}).activation_checkpoint
    with pytest.raises(ConfigError, match="when_longer_than needs one target length per stage"):
        apply_activation_checkpointing(model, cfg, [65536, 65536 / 6])


def test_activation_checkpointing_per_stage_and_network():
    with torch.device("meta"):
        model = HNetForCausalLM(HNetConfig.from_flavor("debug_2stage"))
    cfg = JobConfig.from_dict({"activation_checkpoint": {
        "per_stage": ["none", "full", "every_n"], "every_n": 2, "networks": ["encoder", "main_network"],
    }}).activation_checkpoint
    assert apply_activation_checkpointing(model, cfg) == 3
    wrapped = {
        (stage.stage, name, i)
        for stage in model.stages() for name, net in stage_networks(stage).items()
        for i, block in enumerate(net.layers) if hasattr(block, "_checkpoint_wrapped_module")
    }
    assert wrapped == {(1, "encoder", 0), (1, "encoder", 1), (2, "main_network", 1)}


def test_activation_checkpointing_per_stage_needs_one_mode_per_stage():
    with torch.device("meta"):
        model = HNetForCausalLM(HNetConfig.from_flavor("debug"))
    cfg = JobConfig.from_dict({"activation_checkpoint": {"per_stage": ["full"]}}).activation_checkpoint
    with pytest.raises(ConfigError, match="per_stage has 1 entries but the model has 2 stages"):
        apply_activation_checkpointing(model, cfg)


# ---- compile (in process) -------------------------------------------------------------------------


def train_four_steps(model: HNetForCausalLM, on_step=lambda: None) -> list[float]:
    """Four steps whose lengths and document counts all differ, so every stage's lengths change."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for i, docs in enumerate([[100, 156], [64, 90, 166], [300, 84], [50, 70, 90, 238]]):
        ids = torch.randint(0, 256, (sum(docs) + 1,), generator=gen)
        cu = torch.tensor([0, *torch.tensor(docs).cumsum(0).tolist()], dtype=torch.int32)
        out = model(ids[:-1], cu)
        loss = cross_entropy_sum(out.logits, ids[1:]) / sum(docs)
        loss = loss + 0.03 * sum(ratio_loss(r, 3.0) for r in out.router_outputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        on_step()
    return losses


def test_inner_units_reshard_by_default_only_when_sharded_over_several_ranks():
    assert reshard_after_forward("default", 1) == (False, False)  # one rank: nothing sharded to free
    assert reshard_after_forward("default", 8) == (True, False)  # the root is needed first in backward
    assert reshard_after_forward("always", 1) == (True, True)
    assert reshard_after_forward("never", 8) == (False, False)


@pytest.mark.slow
def test_compiled_blocks_match_eager_and_compile_once_more_for_new_lengths():
    def build(compiled: bool) -> HNetForCausalLM:
        torch.manual_seed(0)
        model = HNetForCausalLM(HNetConfig.from_flavor("debug"))
        model.init_weights()
        if compiled:
            apply_compile(model, dynamic=True)
        return model

    eager = train_four_steps(build(False))
    torch._dynamo.reset()
    counters.clear()
    frames = []
    compiled = train_four_steps(build(True), on_step=lambda: frames.append(counters["frames"]["ok"]))
    assert compiled == pytest.approx(eager, rel=1e-5, abs=1e-5)
    assert frames[0] > 0  # the blocks did compile, for the first lengths
    assert frames[1] > frames[0]  # again, symbolic, when the lengths first changed
    assert frames[2:] == [frames[1]] * 2  # and later lengths and document counts compiled nothing new


def test_compile_covers_every_block_and_each_networks_closing_norm():
    """No block holds a network's closing norm: left out, it ran mamba_ssm's eager norm on CUDA (change 48)."""
    model = HNetForCausalLM(HNetConfig.from_flavor("debug"))
    apply_compile(model, dynamic=True)
    nets = [net for stage in model.stages() for net in stage_networks(stage).values()]
    compiled = [m._compiled_call_impl is not None for net in nets for m in (*net.layers, net.rmsnorm)]
    assert len(nets) == 3 and all(compiled)


def test_compiled_graphs_keep_widths_and_heads_static(monkeypatch):
    """Only positions (and document counts) may be symbolic sizes in the compiled graphs' inputs.

    Sizes symbolic from the start also made head counts and head dims symbolic wherever a graph begins
    at a (positions, heads, head dim) tensor; Inductor's kernels then index with runtime divisions
    (2-4x slower rotary and QKV kernels on an H100, docs/performance.md change 38).
    """
    graphs = []

    def record(gm, example_inputs):  # a dynamo backend that keeps the graph's input sizes and runs it eagerly
        graphs.append([n.meta["example_value"].shape for n in gm.graph.nodes
                       if n.op == "placeholder" and isinstance(n.meta.get("example_value"), torch.Tensor)])
        return gm.forward

    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_module(self, **kw, backend=record))
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = HNetForCausalLM(HNetConfig.from_flavor("debug"))
    model.init_weights()
    apply_compile(model, dynamic=True)
    train_four_steps(model)
    symbolic = [[not is_concrete_int(d) for d in shape] for graph in graphs for shape in graph]
    assert any(s[0] for s in symbolic)  # lengths did become symbolic
    assert not any(any(s[1:]) for s in symbolic)  # nothing else did


def test_compile_leaves_room_for_a_graph_per_length_range(monkeypatch):
    """An untrained router hands inner stages lengths from a handful to thousands within a few steps.

    Inductor guards a block graph on the range of lengths it was built for, so each kind of block
    compiles again per range: here (CPU) two ranges per kind, on an H100 more (hnet_2stage_L reached
    dynamo's limit of 2 x kinds in step 2, after which its blocks ran eagerly). The limit that
    apply_compile sets must be out of reach with room to spare, and reaching it is an error here.
    """
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = HNetForCausalLM(HNetConfig.from_flavor("debug"))
    model.init_weights()
    apply_compile(model, dynamic=True)
    lengths = []
    for docs, every in [([2500, 2600], 1.2), ([3000, 2100], 2000.0), ([40, 60], 2.0), ([2000, 3100], 3.0)]:
        ids = torch.randint(0, 256, (sum(docs),))
        cu = torch.tensor([0, *itertools.accumulate(docs)], dtype=torch.int32)
        with forced_boundaries(model, [every]):
            out = model(ids, cu)
        out.logits.float().sum().backward()
        lengths.append(out.stage_seqs[1].total)
    assert min(lengths) < 8 and max(lengths) > 4096  # the inner stage went through both regimes
    graphs = len(_debug_get_cache_entry_list(Block.forward.__code__))
    kinds = len(block_kinds(model))
    assert graphs >= 2 * kinds  # a graph per kind and length range
    assert torch._dynamo.config.recompile_limit >= 2 * graphs


def test_compile_sets_the_norm_gradient_rows_unless_the_user_did(monkeypatch):
    """apply_compile sets Inductor's rows per partial weight-gradient sum (NORM_GRAD_ROWS), and keeps a user's."""
    inductor = torch._inductor.config.triton
    if not hasattr(inductor, "mix_order_reduction_split_size"):
        pytest.skip("this torch's Inductor has no mix-order reductions")
    model = HNetForCausalLM(HNetConfig.from_flavor("debug"))
    monkeypatch.setattr(inductor, "mix_order_reduction_split_size", None)
    apply_compile(model, dynamic=True)
    assert inductor.mix_order_reduction_split_size == NORM_GRAD_ROWS
    monkeypatch.setattr(inductor, "mix_order_reduction_split_size", 8)
    apply_compile(model, dynamic=True)
    assert inductor.mix_order_reduction_split_size == 8
