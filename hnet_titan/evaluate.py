"""Evaluate an H-Net checkpoint on byte data: ``python -m hnet_titan.evaluate``.

Batches are packed exactly as in training (``hnet_titan.data``). Reported over predicted bytes:
bits per byte (cross-entropy / ln 2), cross-entropy (nats), byte accuracy and top-k accuracy; per
routed stage the boundary fraction (chunks / stage positions) and bytes per chunk (bytes / chunks
the stage emits), both over real bytes only (padding excluded); and bytes/s. Under torchrun every
rank evaluates its data shard and the sums are all-reduced; rank 0 writes the JSON results.

    python -m hnet_titan.evaluate --checkpoint outputs/run/checkpoint --sources data/val/ --output eval.json
    torchrun --nproc-per-node 8 -m hnet_titan.evaluate --checkpoint hnet_2stage_L.pt --model-config hnet_2stage_L.json \\
        --sources val.jsonl --seq-len 8192
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from hnet import HNetConfigError, HNetForCausalLM
from hnet_titan.config import DTYPES
from hnet_titan.data import IGNORE_INDEX, DataError, build_dataloader
from hnet_titan.losses import bits_per_byte
from hnet_titan.model_io import CheckpointError, load_model
from hnet_titan.parallelize import configure_cuda_allocator

# Counters summed over batches and ranks; then (positions, boundaries) per routed stage. Predicted bytes
# are the real bytes: every real input byte has a label, padding has none.
_TOTALS = ("nll", "predicted", "correct", "topk_correct")


@torch.no_grad()
def batch_sums(model: HNetForCausalLM, batch: dict, device: torch.device, top_k: int) -> torch.Tensor:
    """The additive counters of one packed batch as a float64 vector (see _TOTALS)."""
    ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
    out = model(ids, batch["cu_seqlens"].to(device), batch["max_seqlen"])
    predicted = labels != IGNORE_INDEX
    logits, targets = out.logits[predicted].float(), labels[predicted]
    nll = F.cross_entropy(logits, targets, reduction="sum")
    top = logits.topk(min(top_k, logits.shape[-1]), dim=-1).indices
    sums = [nll, predicted.sum(), (top[:, 0] == targets).sum(), (top == targets[:, None]).any(-1).sum()]
    real = predicted
    for router in out.router_outputs:
        sums += [real.sum(), (router.boundary_mask & real).sum()]
        real = real[router.boundary_mask]  # the real positions of the next stage
    return torch.stack([s.double() for s in sums])


def evaluate(
    model: HNetForCausalLM,
    batches: Iterable[dict],
    device: torch.device,
    *,
    top_k: int = 5,
    max_batches: int = 0,
    progress: Callable[[int, torch.Tensor, float], None] | None = None,
) -> tuple[torch.Tensor, int]:
    """Summed counters over the batches (at most ``max_batches`` when > 0) and the number of batches."""
    sums, count, start = None, 0, time.perf_counter()
    for batch in batches:
        if max_batches and count == max_batches:
            break
        step = batch_sums(model, batch, device, top_k)
        sums = step if sums is None else sums + step
        count += 1
        if progress:
            progress(count, sums, time.perf_counter() - start)
    if sums is None:
        sums = torch.zeros(len(_TOTALS) + 2 * (model.config.num_stages - 1), dtype=torch.float64, device=device)
    return sums, count


def summarize(sums: torch.Tensor, top_k: int, seconds: float) -> dict:
    """Metrics from the summed counters."""
    values = sums.tolist()
    total = dict(zip(_TOTALS, values))
    predicted = max(total["predicted"], 1.0)
    ce = total["nll"] / predicted
    stages = []
    for s, (positions, boundaries) in enumerate(zip(values[len(_TOTALS)::2], values[len(_TOTALS) + 1::2])):
        stages.append({
            "stage": s,
            "boundary_fraction": boundaries / max(positions, 1.0),
            "bytes_per_chunk": total["predicted"] / max(boundaries, 1.0),
        })
    return {
        "bits_per_byte": bits_per_byte(ce),
        "cross_entropy": ce,
        "accuracy": total["correct"] / predicted,
        f"top{top_k}_accuracy": total["topk_correct"] / predicted,
        "predicted_bytes": int(total["predicted"]),
        "stages": stages,
        "seconds": seconds,
        "bytes_per_second": total["predicted"] / seconds if seconds > 0 else 0.0,
    }


def _progress_line(count: int, sums: torch.Tensor, seconds: float) -> None:
    nll, byte_count = sums[0].item(), sums[1].item()
    sys.stderr.write(
        f"\rbatch {count}  bytes {int(byte_count):,}  bpb {bits_per_byte(nll / max(byte_count, 1.0)):.4f}  "
        f"{byte_count / max(seconds, 1e-9):,.0f} bytes/s"
    )
    sys.stderr.flush()


def _init_distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world size, this rank's device); starts a process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = torch.device(device)
    if world == 1:
        return 0, 1, dev
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dist.get_rank(), world, dev


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hnet_titan.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="DCP step/checkpoint folder, reference .pt/.safetensors, or hub name")
    parser.add_argument("--step", type=int, help="step-N folder to read (default: newest complete)")
    parser.add_argument("--model-config", help="reference-format JSON model config")
    parser.add_argument("--flavor", help="named model flavor instead of --model-config")
    parser.add_argument("--sources", nargs="*", default=[], help="files, folders, globs or hf:NAME (default: Python stdlib)")
    parser.add_argument("--split", choices=("all", "val", "train"), default="all", help="'val'/'train' split by --val-fraction")
    parser.add_argument("--val-fraction", type=float, default=0.0)
    parser.add_argument("--text-field", default="text", help="jsonl field / parquet column holding the text")
    parser.add_argument("--seq-len", type=int, default=8192, help="bytes per packed row")
    parser.add_argument("--batch-size", type=int, default=1, help="rows per batch and rank")
    parser.add_argument("--max-batches", type=int, default=0, help="batches per rank; 0 = the whole data")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="default: bfloat16 on CUDA, float32 otherwise")
    parser.add_argument("--output", default="eval_results.json", help="JSON results file")
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error(f"--top-k must be >= 1, got {args.top_k}")
    configure_cuda_allocator()  # batches' chunk lengths differ, as in training
    rank, world, device = _init_distributed(args.device)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    try:
        model, source = load_model(
            args.checkpoint, step=args.step, model_config=args.model_config, flavor=args.flavor, device=device, dtype=dtype,
        )
        loader = build_dataloader(
            args.sources, seq_len=args.seq_len, local_batch_size=args.batch_size, dp_rank=rank, dp_world_size=world,
            split=args.split, infinite=False, num_workers=args.num_workers, text_field=args.text_field,
            val_fraction=args.val_fraction,
        )
        start = time.perf_counter()
        progress = _progress_line if rank == 0 and not args.quiet else None
        sums, batches = evaluate(model, loader, device, top_k=args.top_k, max_batches=args.max_batches, progress=progress)
    except (CheckpointError, HNetConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if world > 1:
        dist.all_reduce(sums)
        elapsed = torch.tensor([seconds], dtype=torch.float64, device=device)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        seconds = elapsed.item()
        batch_counts = torch.tensor([batches], device=device)
        dist.all_reduce(batch_counts)
        batches = int(batch_counts.item())
    if progress:
        sys.stderr.write("\n")
    results = summarize(sums, args.top_k, seconds)
    if rank == 0:
        results.update({
            "checkpoint": str(source.path), "step": source.step, "sources": args.sources, "split": args.split,
            "seq_len": args.seq_len, "batch_size": args.batch_size, "batches": batches, "world_size": world,
            "device": device.type, "dtype": str(dtype).removeprefix("torch."),
        })
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
        stages = "  ".join(
            f"stage {s['stage']}: boundary_fraction {s['boundary_fraction']:.3f} bytes_per_chunk {s['bytes_per_chunk']:.2f}"
            for s in results["stages"]
        )
        print(
            f"bpb {results['bits_per_byte']:.4f}  ce {results['cross_entropy']:.4f}  acc {results['accuracy']:.4f}  "
            f"top{args.top_k} {results[f'top{args.top_k}_accuracy']:.4f}  {stages}  "
            f"{results['bytes_per_second']:,.0f} bytes/s  -> {args.output}"
        )
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
