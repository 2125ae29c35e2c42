"""Loading a checkpoint with 4-bit quantization: `mlxmoe.load(..., quantize=4)` against
`mlx_lm.convert -q`, measured in one run, each in a fresh process.

    .venv/bin/python bench/load_vs_mlx_lm.py [--hidden 512] [--layers 8] [--experts 16] [--dtype bf16]

Writes a random Qwen3-MoE checkpoint (transformers' own `save_pretrained`, the hub's config
style so that mlx-lm reads it, per-expert tensors as the hub stores them), then prints per
tool its peak MLX allocation and process max RSS against the checkpoint's size and the
quantized model's size, and the load peak `mlxmoe plan` predicts from config.json alone.
mlxmoe keeps the model in memory (it trains it); mlx-lm's converter writes it to disk.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx

from mlxmoe.info import read_config
from mlxmoe.plan.load import plan_load

ROOT = Path(__file__).resolve().parents[1]

MEASURE = """
import json, resource, sys, time
import mlx.core as mx
from mlxmoe.memory import maxrss_bytes
tool, folder, out, dtype = sys.argv[1:5]
start = time.perf_counter()
if tool == "mlxmoe":
    from mlx.utils import tree_flatten
    from mlxmoe.load import load_model
    model = load_model(folder, quantize=4, group_size=64, dtype=dtype)
    size = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
else:
    from mlx_lm.convert import convert
    convert(folder, out, quantize=True, q_bits=4, q_group_size=64, dtype=dtype)
    size = sum(p.stat().st_size for p in __import__("pathlib").Path(out).glob("*.safetensors"))
print("RESULT " + json.dumps({"seconds": time.perf_counter() - start, "mlx_peak": mx.get_peak_memory(),
      "max_rss": maxrss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss), "quantized": size}))
"""


MAKE = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import torch
from tiny_models import make_hf_model, save
folder, hidden, layers, experts, dtype = Path(sys.argv[2]), *map(int, sys.argv[3:6]), sys.argv[6]
model = make_hf_model("qwen3_moe", hidden_size=hidden, intermediate_size=2 * hidden,
                      moe_intermediate_size=hidden, num_experts=experts, num_experts_per_tok=2,
                      num_hidden_layers=layers, vocab_size=16000, head_dim=64,
                      num_attention_heads=hidden // 64, num_key_value_heads=max(hidden // 128, 1))
if dtype == "bf16":
    model = model.to(torch.bfloat16)
save(model, folder, style="t4")
"""


def make_checkpoint(folder: Path, hidden: int, layers: int, experts: int, dtype: str) -> int:
    # in a child: a process's max RSS survives fork and exec on Linux, so the measuring
    # children must not start from a parent that held torch and the model
    subprocess.run(
        [
            sys.executable,
            "-c",
            MAKE,
            str(ROOT / "tests"),
            str(folder),
            str(hidden),
            str(layers),
            str(experts),
            dtype,
        ],
        check=True,
        capture_output=True,
    )
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def measure(tool: str, folder: Path, out: Path, dtype: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, tool, str(folder), str(out), dtype],
        capture_output=True,
        text=True,
        check=True,
    )
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument(
        "--dtype",
        choices=("bf16", "f32"),
        default="bf16",
        help="the checkpoint's dtype (the model is loaded in the same)",
    )
    args = parser.parse_args()
    model_dtype = {"bf16": "bfloat16", "f32": "float32"}[args.dtype]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "checkpoint"
        size = make_checkpoint(folder, args.hidden, args.layers, args.experts, args.dtype)
        print(
            f"Qwen3-MoE hidden {args.hidden}, {args.layers} layers, {args.experts} experts: "
            f"{args.dtype} checkpoint {size / 2**20:.0f} MiB, loaded in {model_dtype}, 4-bit group 64"
        )
        print(
            f"  {'tool':<20}{'seconds':>9}{'quantized MiB':>15}{'MLX peak MiB':>14}{'max RSS MiB':>13}"
            f"{'peak / checkpoint':>19}"
        )
        rows = {}
        for tool in ("mlxmoe", "mlx_lm.convert"):
            r = rows[tool] = measure(tool, folder, Path(tmp) / "mlx", model_dtype)
            print(
                f"  {tool:<20}{r['seconds']:>9.1f}{r['quantized'] / 2**20:>15.0f}"
                f"{r['mlx_peak'] / 2**20:>14.0f}{r['max_rss'] / 2**20:>13.0f}"
                f"{r['mlx_peak'] / size:>19.2f}",
                flush=True,
            )
        ours, theirs = rows["mlxmoe"], rows["mlx_lm.convert"]
        predicted = plan_load(read_config(folder), 4, 64, getattr(mx, model_dtype)).peak
        print(
            f"mlxmoe plan's load peak: {predicted / 2**20:.0f} MiB "
            f"({predicted / ours['mlx_peak']:.3f}x the measured MLX peak)"
        )
        print(
            f"mlxmoe / mlx-lm: MLX peak {ours['mlx_peak'] / theirs['mlx_peak']:.2f}x, "
            f"max RSS {ours['max_rss'] / theirs['max_rss']:.2f}x"
        )


if __name__ == "__main__":
    main()
