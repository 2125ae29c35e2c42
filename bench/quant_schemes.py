"""What each quantization scheme of the frozen base costs in quality and saves in memory:
held-out perplexity and top-1 agreement with the float model, per scheme (`train.quantize`).

    .venv/bin/python bench/quant_schemes.py [--samples 12] [--max-tokens 128] [--group-size 64]
        [--scheme 4,experts=3 ...]

The model is SmolLM2-135M-Instruct upcycled into a 4-expert Mixtral-layout MoE (the demo's,
from its packaged weights, no download; those are Q4_1, so "float" is the dequantized
release) and the held-out text the Python FAQ's test answers (`mlxmoe data python-faq`).
Each scheme is loaded as `mlxmoe train` loads it (float32 compute, so that only the weights
differ); the base's bytes are its arrays' as a 16-bit base holds them. About 2.5 minutes a
scheme on 2 CPU cores (MLX's CPU gather kernels); the table is in README.md (Quantization).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from math import prod
from pathlib import Path

SCHEMES = ("none", "8", "4", "4,experts=3", "4,experts=2", "3")


def score(model, texts: list[list[int]]):
    """Summed cross-entropy, positions, and the argmax at each position."""
    import mlx.core as mx
    import mlx.nn as nn

    total, count, argmax = 0.0, 0, []
    for tokens in texts:
        tokens = mx.array([tokens])
        logits = model(tokens[:, :-1])
        loss = nn.losses.cross_entropy(logits, tokens[:, 1:], reduction="sum")
        top = logits.argmax(-1)
        mx.eval(loss, top)
        total += loss.item()
        count += tokens.shape[1] - 1
        argmax.append(top)
    return total, count, argmax


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=12, help="held-out FAQ answers")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens of each")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--scheme", action="append", help=f"default: {' | '.join(SCHEMES)}")
    args = parser.parse_args()
    import mlx.core as mx
    from mlx.utils import tree_flatten

    import mlxmoe
    from mlxmoe.data.faq import build_dataset
    from mlxmoe.gguf.importer import gguf_to_hf
    from mlxmoe.quantize import quantization
    from mlxmoe.upcycle import default_dense_gguf, upcycle

    schemes = args.scheme or list(SCHEMES)
    if "none" not in schemes:
        schemes.insert(0, "none")  # the reference
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dense = gguf_to_hf(default_dense_gguf(), tmp / "dense")
        upcycle(dense, tmp / "moe", layout="mixtral", n_experts=4, top_k=2)
        build_dataset(tmp / "data")
        samples = [json.loads(line) for line in (tmp / "data" / "test.jsonl").read_text().splitlines()]
        rows, reference = [], None
        for scheme in schemes:
            start = time.perf_counter()
            model, tokenizer = mlxmoe.load(
                tmp / "moe", quantize=scheme, group_size=args.group_size, dtype="float32"
            )
            texts = [
                tokenizer.encode(f"{s['prompt']}\n{s['completion']}")[: args.max_tokens + 1]
                for s in samples[: args.samples]
            ]
            # a 16-bit base, as training on a GPU holds it: float32 here only for the comparison
            size = sum(
                prod(v.shape) * (2 if v.dtype == mx.float32 and "router" not in k else v.dtype.size)
                for k, v in tree_flatten(model.parameters())
            )
            total, count, argmax = score(model, texts)
            if reference is None:
                reference = argmax
            agree = sum((a == b).sum().item() for a, b in zip(argmax, reference))
            q = quantization(scheme, args.group_size)
            rows.append((q.per_role() if q else "float (bf16)", math.exp(total / count), agree / count, size))
            print(f"  {rows[-1][0]}: {time.perf_counter() - start:.0f} s", flush=True)
            del model
            mx.clear_cache()
    print(
        f"\nSmolLM2-135M-Instruct upcycled to 4 experts (top-2), group {args.group_size}; "
        f"{len(texts)} held-out Python FAQ answers, {count} positions\n"
    )
    print("| base | perplexity | top-1 agreement with float | base weights |")
    print("| --- | --- | --- | --- |")
    for name, ppl, agree, size in rows:
        print(f"| {name} | {ppl:.3f} | {agree:.1%} | {size / 2**20:.1f} MiB ({size / rows[0][3]:.2f}x) |")


if __name__ == "__main__":
    main()
