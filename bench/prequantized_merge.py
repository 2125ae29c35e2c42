"""What merging into a quantized grid costs: adapters trained over mlx-lm's 4-bit conversion
of a model, merged into its full-precision release (`--base-weights`) or into the
dequantized 4-bit grid (the fallback), against each other on held-out text.

    .venv/bin/python bench/prequantized_merge.py [--iters 8] [--bits 4] [--group-size 64]

The model is SmolLM2-135M-Instruct upcycled into a 4-expert MoE (the demo's; its packaged
weights, no download) and the data the Python FAQ (`mlxmoe data python-faq`). Prints the
held-out perplexity of each merged model (float32, in MLX) and their top-1 agreement.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path


def perplexity_and_argmax(model_dir: Path, texts: list[str]) -> tuple[float, list]:
    import mlx.core as mx
    import mlx.nn as nn

    import mlxmoe

    model, tokenizer = mlxmoe.load(model_dir, dtype="float32")
    total, count, argmax = 0.0, 0, []
    for text in texts:
        tokens = mx.array([tokenizer.encode(text)[:256]])
        logits = model(tokens[:, :-1])
        loss = nn.losses.cross_entropy(logits, tokens[:, 1:], reduction="sum")
        total += loss.item()
        count += tokens.shape[1] - 1
        argmax.append(logits.argmax(-1))
    return math.exp(total / count), argmax


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    args = parser.parse_args()
    from mlx_lm.convert import convert

    from mlxmoe.gguf.merge import export_hf

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run = [sys.executable, "-m", "mlxmoe"]
        subprocess.run([*run, "upcycle", "--out", str(tmp / "float")], check=True, capture_output=True)
        subprocess.run([*run, "data", "python-faq", str(tmp / "data")], check=True, capture_output=True)
        convert(
            str(tmp / "float"), str(tmp / "q"), quantize=True, q_bits=args.bits, q_group_size=args.group_size
        )
        recipe = tmp / "recipe.yaml"
        recipe.write_text(
            json.dumps(
                {
                    "lora": {"strategy": "experts", "rank": 8, "alpha": 16},
                    "train": {
                        "iters": args.iters,
                        "batch_size": 4,
                        "learning_rate": 5e-4,
                        "warmup": 1,
                        "max_seq_len": 256,
                        "quantize": args.bits,
                        "group_size": args.group_size,
                        "report_every": 2,
                        "val_every": 0,
                        "save_every": 0,
                    },
                }
            )
        )
        subprocess.run(
            [
                *run,
                "train",
                "--model",
                str(tmp / "q"),
                "--data",
                str(tmp / "data"),
                "--out",
                str(tmp / "run"),
                "--recipe",
                str(recipe),
                "--no-plots",
            ],
            check=True,
            capture_output=True,
        )
        full, grid = tmp / "merged-full", tmp / "merged-grid"
        export_hf(tmp / "q", full, tmp / "run", dtype="F32", base_weights=tmp / "float")
        export_hf(tmp / "q", grid, tmp / "run", dtype="F32")
        samples = [json.loads(line) for line in (tmp / "data" / "test.jsonl").read_text().splitlines()]
        texts = [f"{s['prompt']}\n{s['completion']}" for s in samples]
        ppl_full, top_full = perplexity_and_argmax(full, texts)
        ppl_grid, top_grid = perplexity_and_argmax(grid, texts)
        agree = sum((a == b).sum().item() for a, b in zip(top_full, top_grid))
        positions = sum(a.size for a in top_full)
        print(
            f"SmolLM2-135M MoE, mlx-lm {args.bits}-bit group {args.group_size}, LoRA {args.iters} "
            f"steps over it; {len(texts)} held-out FAQ answers, {positions} positions"
        )
        print(f"  merged into the full-precision release: perplexity {ppl_full:.2f}")
        print(
            f"  merged into the dequantized grid:       perplexity {ppl_grid:.2f} "
            f"({ppl_grid / ppl_full:.3f}x)"
        )
        print(f"  top-1 agreement grid vs full:          {agree / positions:.1%}")


if __name__ == "__main__":
    main()
