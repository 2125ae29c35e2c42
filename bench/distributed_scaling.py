"""Data-parallel scaling of `mlxmoe train`: one process against two ranks on 127.0.0.1.

Both runs train the same recipe on the same global batch (two ranks take half of it each),
so they must end at the same loss; the script checks that, then prints throughput, seconds
per step, the time each step spends in the gradient all_sum (waiting for the slower rank
included) and memory per rank.

    .venv/bin/python bench/distributed_scaling.py [--iters 30] [--batch-size 8] [--hidden 128]

Two ranks on one machine share its cores: on a 2-core box each rank gets one core where the
lone process had two, so expect no speed-up. What the numbers show is that the two runs agree
and what communication costs per step; across two Macs the ranks do not share cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from local_ranks import free_port_pair  # noqa: E402  (tests/ is on the path from here)


def make_data(folder: Path, n: int, words: int) -> Path:
    """prompt/completion pairs with answers of ``words`` words (a few tokens each)."""
    rng = random.Random(0)
    vocab = ["red", "green", "blue", "cat", "dog", "fox", "list", "tuple", "dict", "set"]
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "train.jsonl").open("w") as f:
        for _ in range(n):
            answer = " ".join(rng.choice(vocab) for _ in range(words))
            f.write(json.dumps({"prompt": f"Say {answer[:20]}", "completion": answer}) + "\n")
    return folder


def run(ranks: int, model: Path, data: Path, recipe: Path, out: Path) -> list[dict]:
    command = [
        sys.executable,
        "-m",
        "mlxmoe",
        "train",
        "--model",
        str(model),
        "--data",
        str(data),
        "--out",
        str(out),
        "--recipe",
        str(recipe),
    ]
    if ranks > 1:
        launcher = Path(sys.executable).with_name("mlx.launch")
        command = [
            str(launcher),
            "--backend",
            "ring",
            "-n",
            str(ranks),
            "-p",
            str(free_port_pair()),
            "--python",
            sys.executable,
            "--",
            *command[1:],
        ]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if not (out / "adapters.safetensors").is_file():
        sys.exit(f"the {ranks}-rank run failed:\n{proc.stdout}\n{proc.stderr}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def steady(rows: list[dict], key: str) -> float:
    """Mean of ``key`` over the report windows after the first (compilation, warm-up)."""
    kept = rows[1:] or rows
    return sum(r[key] for r in kept) / len(kept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8, help="global batch (sequences)")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--words", type=int, default=40, help="words per answer")
    args = parser.parse_args()

    from tiny_models import make_trainable_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_trainable_checkpoint(
            "qwen3_moe",
            tmp / "model",
            hidden_size=args.hidden,
            intermediate_size=args.hidden * 2,
            moe_intermediate_size=args.hidden,
            num_hidden_layers=args.layers,
            num_experts=args.experts,
            num_experts_per_tok=args.top_k,
            head_dim=args.hidden // 4,
        )
        data = make_data(tmp / "data", n=args.batch_size * 16, words=args.words)
        recipe = tmp / "recipe.yaml"
        recipe.write_text(
            json.dumps(
                {  # JSON is YAML
                    "lora": {"strategy": "experts"},
                    "train": {
                        "iters": args.iters,
                        "batch_size": args.batch_size,
                        "quantize": 0,
                        "warmup": 0,
                        "report_every": max(args.iters // 5, 1),
                        "val_every": 0,
                        "save_every": 0,
                        "max_seq_len": 512,
                    },
                }
            )
        )
        one = run(1, model, data, recipe, tmp / "one")
        two = run(2, model, data, recipe, tmp / "two")

    print(
        f"qwen3_moe hidden {args.hidden}, {args.layers} layers, {args.experts} experts top-"
        f"{args.top_k}; global batch {args.batch_size}, {args.iters} steps, {os.cpu_count()} cores"
    )
    loss_gap = abs(one[-1]["loss"] - two[-1]["loss"])
    print(
        f"final loss: 1 rank {one[-1]['loss']:.6f}, 2 ranks {two[-1]['loss']:.6f} (difference {loss_gap:.1e})"
    )
    tps1, tps2 = steady(one, "tokens_per_s"), steady(two, "tokens_per_s")
    step1, step2 = steady(one, "step_s"), steady(two, "step_s")
    comm = steady(two, "comm_s")
    print(f"{'':>8} {'tokens/s':>10} {'s/step':>8} {'comm s/step':>12} {'peak GB':>8}")
    print(f"{'1 rank':>8} {tps1:>10.0f} {step1:>8.3f} {'-':>12} {one[-1]['peak_memory_gb']:>8.2f}")
    print(
        f"{'2 ranks':>8} {tps2:>10.0f} {step2:>8.3f} {comm:>12.4f} "
        f"{max(r['peak_memory_gb'] for r in two[-1]['ranks']):>8.2f}"
    )
    for rank in two[-1]["ranks"]:
        per_rank = sum(r["ranks"][rank["rank"]]["tokens_per_s"] for r in two[1:] or two)
        per_rank /= len(two[1:] or two)
        print(
            f"{'rank ' + str(rank['rank']):>8} {per_rank:>10.0f} {'':>8} {'':>12} "
            f"{rank['peak_memory_gb']:>8.2f}"
        )
    print(
        f"speed-up {tps2 / tps1:.2f}x (efficiency {tps2 / tps1 / 2:.0%}); gradient all_sum "
        f"{comm / step2:.1%} of a 2-rank step"
    )
    if loss_gap > 1e-3:
        sys.exit("the 1-rank and 2-rank runs disagree")


if __name__ == "__main__":
    main()
