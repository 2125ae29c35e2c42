"""Training-step time and MLX peak memory of one Qwen3-MoE under each MoE dispatch.

Each setting runs in a fresh process: a model built from a config (random weights, cast and
quantized as ``mlxmoe.load`` does, ``tests/step_memory.py``), expert LoRA, mlxmoe's own
``Stepper`` and AdamW, and ``--steps`` optimizer steps on one [batch, seq] micro-batch. Prints
each step's seconds (the first compiles) and ``mx.get_peak_memory()`` over the first.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        .venv/bin/python bench/dispatch_step.py --experts 16 --dispatch dense grouped gather
    ... --quantize 4 --dispatch grouped --block 16 32 64   # the grouped dispatch's block size

``--dispatch``: train.moe_dispatch values, ``:eager`` for train.compile off.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # shared helpers
from step_memory import prepared_step, setting  # noqa: E402


def config(a: argparse.Namespace) -> dict:
    h = a.hidden
    return dict(
        model_type="qwen3_moe",
        vocab_size=32000,
        hidden_size=h,
        num_hidden_layers=a.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=h // 8,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        tie_word_embeddings=False,
        intermediate_size=2 * h,
        moe_intermediate_size=h,
        num_experts=a.experts,
        num_experts_per_tok=a.top_k,
        norm_topk_prob=True,
    )


def run_steps(s: dict, steps: int, compiled: bool, block: int | None) -> dict:
    """In this process: ``steps`` training steps of setting ``s``."""
    import mlx.core as mx

    from mlxmoe.nn import grouped

    if block:
        grouped.MIN_BLOCK = grouped.MAX_BLOCK = block
    model, stepper, batches = prepared_step(s, compiled)
    seconds, peak = [], 0
    for _ in range(steps):
        mx.reset_peak_memory()
        start = time.perf_counter()
        stepper.step(batches)
        mx.eval(model.parameters())
        seconds.append(round(time.perf_counter() - start, 2))
        peak = peak or mx.get_peak_memory()
    return {
        "dispatch": model.layers[model.moe_layers[0]].moe.dispatch,
        "seconds": seconds,
        "mlx_peak_gb": round(peak / 1e9, 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512, help="hidden size = expert FFN size")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--quantize", type=int, default=0, metavar="BITS")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--dispatch", nargs="+", default=["gather", "grouped"])
    p.add_argument("--block", nargs="+", type=int, default=[0], help="grouped: rows per block (0: chosen)")
    p.add_argument("--run", help=argparse.SUPPRESS)  # one setting, in the child process
    a = p.parse_args()
    if a.run:
        job = json.loads(a.run)
        print(json.dumps(run_steps(job["setting"], a.steps, job["compiled"], job["block"])))
        return
    print(
        f"qwen3_moe hidden {a.hidden} (= expert FFN), {a.layers} layers, {a.experts} experts "
        f"top-{a.top_k}, {f'{a.quantize}-bit' if a.quantize else 'float32'} base, expert LoRA; "
        f"batch {a.batch} x {a.seq}; {a.steps} steps"
    )
    for choice in a.dispatch:
        name, _, mode = choice.partition(":")
        for block in a.block if name == "grouped" else [0]:
            s = setting(choice, config(a), bits=a.quantize, batch=a.batch, seq=a.seq, dispatch=name)
            job = {"setting": s, "compiled": mode != "eager", "block": block}
            proc = subprocess.run(
                [sys.executable, __file__, "--steps", str(a.steps), "--run", json.dumps(job)],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode:
                raise SystemExit(f"{choice}: failed\n{proc.stderr[-2000:]}")
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            label = f"{choice}{f' block {block}' if block else ''}"
            peak = out["mlx_peak_gb"]
            print(f"{label:<24} {out['dispatch']:<8} steps (s) {out['seconds']}  MLX peak {peak} GB")


if __name__ == "__main__":
    main()
