"""MLX on a Linux CPU: MLX's bundled BLAS against a preloaded OpenBLAS (auto's; the wheel's as
well where a system one comes first), and the gather MoE dispatch against the dense one, from
one matmul up to `mlxmoe train`.

    python bench/cpu_blas.py [--model DIR] [--data DIR] [--iters 4] [--demo]

Without --model it upcycles the packaged SmolLM2-135M-Instruct into a 4-expert MoE (the
demo's model) and builds the Python FAQ dataset in a temporary folder. Every training run
uses the same recipe, data and seed; the table prints tokens/s as a ratio against the
bundled BLAS with gather (MLX's default) and the largest loss difference from it.
--demo also times `mlxmoe demo --iters 2` with each BLAS (minutes with the bundled one).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MATMUL = """
import json, time, numpy as np, mlx.core as mx
from mlxmoe import blas
n = 1024
a, b = mx.random.normal((n, n)), mx.random.normal((n, n))

def rate(x, y):
    mx.eval(x @ y)
    start = time.perf_counter()
    for _ in range(5):
        mx.eval(x @ y)
    return 2 * n**3 / ((time.perf_counter() - start) / 5) / 1e9

x, y = np.array(a), np.array(b)
start = time.perf_counter()
for _ in range(5):
    x @ y
np_s = (time.perf_counter() - start) / 5
print(json.dumps({"blas": blas.loaded_blas(), "mlx": rate(a, b),
                  "mlx_bf16": rate(a.astype(mx.bfloat16), b.astype(mx.bfloat16)),
                  "numpy": 2 * n**3 / np_s / 1e9}))
"""

RUNS = (("bundled", "gather"), ("auto", "gather"), ("auto", "dense"))


def env_for(setting: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MLXMOE_BLAS_PRELOADED")}
    return {**env, "MLXMOE_BLAS": setting}


def matmul_rates(setting: str) -> dict:
    # reexec happens for compute commands only; preload by hand for this snippet
    env = env_for(setting)
    from mlxmoe.blas import choose_library, preload_env

    library = choose_library(setting)
    if library:
        env = preload_env(library, env)
    out = subprocess.run(
        [sys.executable, "-c", MATMUL], env=env, capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.splitlines()[-1])


def train_run(model: Path, data: Path, out: Path, setting: str, dispatch: str, iters: int) -> dict:
    recipe = out.with_suffix(".yaml")
    recipe.write_text(
        json.dumps(
            {
                "lora": {"strategy": "experts", "rank": 8, "alpha": 16},
                "train": {
                    "iters": iters,
                    "batch_size": 4,
                    "learning_rate": 5e-4,
                    "warmup": 1,
                    "max_seq_len": 256,
                    "quantize": 0,
                    "report_every": 1,
                    "val_every": 0,
                    "save_every": 0,
                    "moe_dispatch": dispatch,
                },
            }
        )
    )
    start = time.perf_counter()
    subprocess.run(
        [
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
            "--no-plots",
        ],
        env=env_for(setting),
        check=True,
        capture_output=True,
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = rows[1:] or rows  # the first step compiles
    return {
        "tokens_per_s": sum(r["tokens_per_s"] for r in steady) / len(steady),
        "losses": [r["loss"] for r in rows],
        "wall_s": time.perf_counter() - start,
        "peak_gb": max(r["peak_memory_gb"] for r in rows),
    }


def demo_run(setting: str, folder: Path) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "mlxmoe", "demo", "--out", str(folder), "--iters", "2", "--eval-answers", "1"],
        env=env_for(setting),
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--iters", type=int, default=4)
    parser.add_argument("--demo", action="store_true")
    args = parser.parse_args()
    from mlxmoe.blas import choose_library, wheel_library

    if choose_library("auto") is None:
        sys.exit(
            "no OpenBLAS to compare with: pip install ngsolve-openblas (Linux x86_64) "
            "or apt-get install libopenblas0-pthread"
        )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model, data = args.model, args.data
        if model is None:
            model = tmp / "model"
            subprocess.run(
                [sys.executable, "-m", "mlxmoe", "upcycle", "--out", str(model)],
                check=True,
                capture_output=True,
            )
        if data is None:
            data = tmp / "data"
            subprocess.run(
                [sys.executable, "-m", "mlxmoe", "data", "python-faq", str(data)],
                check=True,
                capture_output=True,
            )

        # bfloat16 never reaches a BLAS: MLX's own CPU kernel (why the dense dispatch and
        # train.dtype auto stay float32 on the CPU)
        print("1024x1024 matmul, GFLOP/s")
        wheel = wheel_library() not in (None, choose_library("auto"))
        for setting in ("bundled", "auto", *(["wheel"] if wheel else [])):
            rates = matmul_rates(setting)
            print(
                f"  {rates['blas']:<60} MLX {rates['mlx']:7.1f}   MLX bfloat16 "
                f"{rates['mlx_bf16']:6.1f}   numpy {rates['numpy']:7.1f}",
                flush=True,
            )

        print(f"\nmlxmoe train, {model.name}, {args.iters} steps of batch 4 (experts strategy)")
        print(
            f"  {'BLAS':<10}{'dispatch':<10}{'tokens/s':>10}{'ratio':>8}{'peak GB':>9}{'max |dloss|':>13}",
            flush=True,
        )
        base = None
        for setting, dispatch in RUNS:  # each row as soon as it is measured: the first is slow
            r = train_run(model, data, tmp / f"run-{setting}-{dispatch}", setting, dispatch, args.iters)
            base = base or r
            diff = max(abs(a - b) for a, b in zip(r["losses"], base["losses"]))
            print(
                f"  {setting:<10}{dispatch:<10}{r['tokens_per_s']:>10.1f}"
                f"{r['tokens_per_s'] / base['tokens_per_s']:>8.2f}{r['peak_gb']:>9.2f}{diff:>13.2e}",
                flush=True,
            )

        if args.demo:
            print("\nmlxmoe demo --iters 2 --eval-answers 1, wall time")
            times = {s: demo_run(s, tmp / f"demo-{s}") for s in ("auto", "bundled")}
            for s, t in times.items():
                print(f"  {s:<10}{t:8.0f} s  ({times['bundled'] / t:.2f}x)")


if __name__ == "__main__":
    main()
