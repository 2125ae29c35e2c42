"""gpt-oss's MXFP4 experts held three ways, each loaded and run in a fresh process:

- ``dequantized``: ``load(folder, dtype=...)``: the experts in float, exactly the published values;
- ``mxfp4``: ``load(folder, quantize=4)``: the experts kept in MLX's mxfp4 mode, the same bytes
  (exact too), the other layers affine 4-bit;
- ``affine4``: the dequantized experts re-quantized to MLX's affine 4-bit (group 64), the usual
  QLoRA base, for comparison; not exact (it rounds the published values again).

    .venv/bin/python bench/gpt_oss_mxfp4.py [--hidden 512] [--layers 4] [--experts 32] [--tokens 256]

Prints per case the experts' bytes, the whole model's, the load's peak MLX allocation, and
tokens/s of a forward pass and of a LoRA training step (the ``experts`` strategy, rank 8;
forward + backward through the frozen experts). The checkpoint is random and written here in
the hub's layout (``*_blocks`` / ``*_scales``, uint8).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

MEASURE = """
import json, sys, time
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlxmoe.adapt import AdapterSpec, apply_adapters
from mlxmoe.load import load_model
from mlxmoe.quantize import quantize_model
case, folder, dtype, tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
start = time.perf_counter()
model = load_model(folder, quantize=4 if case == "mxfp4" else None, dtype=dtype)
if case == "affine4":
    quantize_model(model, 4, 64)
    mx.eval(model.parameters())
load_s, peak = time.perf_counter() - start, mx.get_peak_memory()
params = tree_flatten(model.parameters())
experts = sum(v.nbytes for k, v in params if ".moe.experts." in k)
total = sum(v.nbytes for _, v in params)
x = mx.random.randint(0, model.args.vocab_size, (1, tokens), key=mx.random.key(0))

def rate(step, repeat=3):
    mx.eval(step())  # warm up
    start = time.perf_counter()
    for _ in range(repeat):
        mx.eval(step())
    return repeat * tokens / (time.perf_counter() - start)

forward = rate(lambda: model(x))
apply_adapters(model, AdapterSpec(strategy="experts", rank=8))
loss = nn.value_and_grad(model, lambda m: m(x).astype(mx.float32).square().mean())
train = rate(lambda: loss(model))
print("RESULT " + json.dumps(dict(load_s=load_s, peak=peak, experts=experts, total=total,
                                  forward=forward, train=train)))
"""


def write_checkpoint(folder: Path, hidden: int, layers: int, experts: int, vocab: int = 2048) -> None:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    heads, kv, head_dim, ffn = hidden // 64, max(hidden // 256, 1), 64, hidden

    def normal(*shape, scale=0.05):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    tensors = {
        "model.embed_tokens.weight": normal(vocab, hidden),
        "lm_head.weight": normal(vocab, hidden),
        "model.norm.weight": 1 + normal(hidden),
    }
    for i in range(layers):
        p = f"model.layers.{i}"
        tensors |= {
            f"{p}.input_layernorm.weight": 1 + normal(hidden),
            f"{p}.post_attention_layernorm.weight": 1 + normal(hidden),
            f"{p}.self_attn.sinks": normal(heads, scale=1.0),
            f"{p}.mlp.router.weight": normal(experts, hidden),
            f"{p}.mlp.router.bias": normal(experts),
            f"{p}.mlp.experts.gate_up_proj_bias": normal(experts, 2 * ffn),
            f"{p}.mlp.experts.down_proj_bias": normal(experts, hidden),
        }
        for name, out_dims in (("q", heads * head_dim), ("k", kv * head_dim), ("v", kv * head_dim)):
            tensors |= {
                f"{p}.self_attn.{name}_proj.weight": normal(out_dims, hidden),
                f"{p}.self_attn.{name}_proj.bias": normal(out_dims),
            }
        tensors |= {
            f"{p}.self_attn.o_proj.weight": normal(hidden, heads * head_dim),
            f"{p}.self_attn.o_proj.bias": normal(hidden),
        }
        # MXFP4 as published: rows are outputs; any bytes are valid codes, scales near 2^-7
        for name, rows, cols in (("gate_up_proj", 2 * ffn, hidden), ("down_proj", hidden, ffn)):
            blocks = (experts, rows, cols // 32)
            tensors[f"{p}.mlp.experts.{name}_blocks"] = rng.integers(0, 256, (*blocks, 16), np.uint8)
            tensors[f"{p}.mlp.experts.{name}_scales"] = rng.integers(118, 122, blocks, np.uint8)
    save_file(tensors, str(folder / "model.safetensors"))
    config = dict(
        model_type="gpt_oss",
        architectures=["GptOssForCausalLM"],
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        num_local_experts=experts,
        num_experts_per_tok=4,
        sliding_window=128,
        rms_norm_eps=1e-5,
        rope_theta=150000,
        max_position_embeddings=131072,
        rope_scaling=dict(
            rope_type="yarn",
            factor=32.0,
            beta_fast=32.0,
            beta_slow=1.0,
            truncate=False,
            original_max_position_embeddings=4096,
        ),
        swiglu_limit=7.0,
        attention_bias=True,
        tie_word_embeddings=False,
        quantization_config={"quant_method": "mxfp4"},
    )
    (folder / "config.json").write_text(json.dumps(config))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_checkpoint(folder, args.hidden, args.layers, args.experts)
        size = (folder / "model.safetensors").stat().st_size
        print(
            f"checkpoint: {size / 2**20:.1f} MiB; hidden {args.hidden}, {args.layers} layers, "
            f"{args.experts} experts top-4, {args.tokens} tokens"
        )
        print(
            "| experts | dtype | expert MiB | model MiB | load peak MiB | load s | forward tok/s "
            "| LoRA step tok/s |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for case, dtype in (
            ("dequantized", "float32"),
            ("dequantized", "bfloat16"),
            ("mxfp4", "float32"),
            ("affine4", "float32"),
        ):
            out = subprocess.run(
                [sys.executable, "-c", MEASURE, case, str(folder), dtype, str(args.tokens)],
                capture_output=True,
                text=True,
                cwd=ROOT,
            )
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(f"| {case} | {dtype} | failed: {out.stderr.strip().splitlines()[-1:]} |")
                continue
            r = json.loads(line[len("RESULT ") :])
            print(
                f"| {case} | {dtype} | {r['experts'] / 2**20:.1f} | {r['total'] / 2**20:.1f} | "
                f"{r['peak'] / 2**20:.1f} | {r['load_s']:.2f} | {r['forward']:.0f} | {r['train']:.0f} |"
            )


if __name__ == "__main__":
    main()
