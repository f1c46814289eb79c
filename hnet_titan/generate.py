"""Generate text from an H-Net checkpoint: ``python -m hnet_titan.generate``.

With one prompt the prompt and its continuation stream to stdout as bytes are sampled; an
incremental UTF-8 decoder holds back incomplete multi-byte characters (invalid bytes print as U+FFFD;
BOS/EOS are not printed). With several prompts, all rows generate together and each row is printed as
a block ``=== prompt i ===`` as soon as it completes (EOS or --max-new-bytes), in completion order.

    python -m hnet_titan.generate --checkpoint outputs/run/checkpoint --prompt "Hello" --max-new-bytes 200
    python -m hnet_titan.generate --checkpoint hnet_2stage_L.pt --model-config hnet_2stage_L.json --prompt "a" --prompt "b"
    python -m hnet_titan.generate --flavor debug --random-init --prompt "demo"
"""

from __future__ import annotations

import argparse
import codecs
import sys
from typing import TextIO

import torch

from hnet import ByteTokenizer, HNetConfig, HNetConfigError, HNetForCausalLM
from hnet.generation import SamplingConfig, stream
from hnet.tokenizer import BOS, EOS
from hnet_titan.config import DTYPES
from hnet_titan.model_io import CheckpointError, load_model
from hnet_titan.parallelize import configure_cuda_allocator


def run(model: HNetForCausalLM, prompts: list[str], sampling: SamplingConfig, out: TextIO) -> list[bytes]:
    """Generate for every prompt, writing to ``out`` as the module docstring says; returns the new bytes (no EOS)."""
    tokenizer = ByteTokenizer()
    generated: list[list[int]] = [[] for _ in prompts]
    streaming = len(prompts) == 1
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    if streaming:
        out.write(prompts[0])
        out.flush()
    for row, byte in stream(model, [tokenizer.encode(p) for p in prompts], sampling):
        if byte != EOS:
            generated[row].append(byte)
        if streaming:
            if byte not in (BOS, EOS):
                out.write(decoder.decode(bytes([byte])))
                out.flush()
        elif byte == EOS or len(generated[row]) == sampling.max_new_bytes:
            out.write(f"=== prompt {row} ===\n{prompts[row]}{tokenizer.decode(generated[row])}\n")
            out.flush()
    if streaming:
        out.write(decoder.decode(b"", final=True) + "\n")
    return [bytes(g) for g in generated]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hnet_titan.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="DCP step/checkpoint folder, reference .pt/.safetensors, or hub name")
    parser.add_argument("--step", type=int, help="step-N folder to read (default: newest complete)")
    parser.add_argument("--model-config", help="reference-format JSON model config")
    parser.add_argument("--flavor", help="named model flavor (with --random-init, or instead of --model-config)")
    parser.add_argument("--random-init", action="store_true", help="random weights of --flavor, for a quick demo")
    parser.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    parser.add_argument("--max-new-bytes", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="default: bfloat16 on CUDA, float32 otherwise")
    args = parser.parse_args(argv)
    if args.random_init == bool(args.checkpoint):
        parser.error("pass --checkpoint PATH, or --random-init with --flavor NAME")
    dtype = DTYPES[args.dtype or ("bfloat16" if torch.device(args.device).type == "cuda" else "float32")]
    if args.random_init and not args.flavor:
        parser.error("--random-init needs --flavor NAME")
    try:
        sampling = SamplingConfig(args.max_new_bytes, args.temperature, args.top_k, args.top_p, args.seed)
    except ValueError as e:
        parser.error(str(e))
    configure_cuda_allocator()  # the caches and chunk lengths grow byte by byte
    try:
        if args.random_init:
            torch.manual_seed(args.seed)
            model = HNetForCausalLM(HNetConfig.from_flavor(args.flavor), device=args.device, dtype=dtype)
            model.init_weights()
        else:
            model, _ = load_model(
                args.checkpoint, step=args.step, model_config=args.model_config, flavor=args.flavor,
                device=args.device, dtype=dtype,
            )
        run(model.eval(), args.prompt, sampling, sys.stdout)
    except (CheckpointError, HNetConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
