"""Forward+backward time of our Gated DeltaNet layer against mlx-lm's: same shapes, same weights.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \
        .venv/bin/python bench/deltanet_vs_mlx_lm.py [--batch 4] [--seq 256] [--repeats 5]

The layer is Qwen3.5-35B-A3B's linear attention scaled down by 4 (hidden 2048 -> 512, 16 -> 4
key heads, 32 -> 8 value heads; head dims 128 and the kernel 4 kept), built once as
``mlxmoe.nn.gated_deltanet.GatedDeltaNet`` and once as mlx-lm's ``qwen3_5.GatedDeltaNet``
with our weights copied in (the names and the conv layout are the same). Each step is one
``value_and_grad`` of sum(out * cotangent) w.r.t. every parameter and the input, the layer in
training mode: mlx-lm then runs its token-by-token recurrence (``gated_delta_ops``; its Metal
kernel is for inference, and off Metal it loops anyway), we run the chunked form (chunk 64).
Variants alternate step by step after a warm-up, so a busy machine slows both alike; the
time reported is the median. The outputs and gradients of the two are compared too.
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.qwen3_5 import GatedDeltaNet as MlxLmGatedDeltaNet
from mlx_lm.models.qwen3_5 import TextModelArgs

from mlxmoe import blas
from mlxmoe.nn.gated_deltanet import DeltaNetArgs, GatedDeltaNet


def build(hidden: int, key_heads: int, value_heads: int, head_dim: int):
    args = DeltaNetArgs(
        hidden_size=hidden,
        num_key_heads=key_heads,
        num_value_heads=value_heads,
        key_head_dim=head_dim,
        value_head_dim=head_dim,
    )
    ours = GatedDeltaNet(args)
    rng = np.random.default_rng(0)
    weights = {}
    for name, p in tree_flatten(ours.parameters()):
        if name == "A_log":
            value = np.log(rng.uniform(0.05, 4.0, p.shape))
        elif name in ("dt_bias", "norm.weight"):
            value = 1.0 + 0.3 * rng.standard_normal(p.shape)
        elif name == "conv1d.weight":
            value = 0.5 * rng.standard_normal(p.shape)
        else:
            value = rng.standard_normal(p.shape) / np.sqrt(p.shape[-1])
        weights[name] = mx.array(value.astype(np.float32))
    ours.load_weights(list(weights.items()))
    theirs = MlxLmGatedDeltaNet(
        TextModelArgs(
            hidden_size=hidden,
            num_attention_heads=8,
            linear_num_key_heads=key_heads,
            linear_num_value_heads=value_heads,
            linear_key_head_dim=head_dim,
            linear_value_head_dim=head_dim,
            linear_conv_kernel_dim=4,
            rms_norm_eps=1e-6,
        )
    )
    theirs.load_weights(list(weights.items()))
    for layer in (ours, theirs):
        layer.train()
        mx.eval(layer.parameters())
    return ours, theirs


def step_fn(layer: nn.Module, cotangent: mx.array, compile: bool):
    weights = layer.trainable_parameters()

    def loss(params, x):
        layer.update(params)
        out = layer(x)
        layer.update(weights)  # leave no traced arrays in the layer (mx.compile)
        return (out * cotangent).sum()

    grad = mx.value_and_grad(loss, argnums=(0, 1))
    grad = mx.compile(grad) if compile else grad

    def step(x):
        value, grads = grad(weights, x)
        mx.eval(value, grads)
        return value, grads

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--key-heads", type=int, default=4)
    parser.add_argument("--value-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--compile",
        action="store_true",
        help="mx.compile both steps (as `train.compile` does the training step)",
    )
    opts = parser.parse_args()

    print(blas.describe())
    print(f"MLX {mx.__version__}, device {mx.default_device()}")
    ours, theirs = build(opts.hidden, opts.key_heads, opts.value_heads, opts.head_dim)
    rng = np.random.default_rng(1)
    shape = (opts.batch, opts.seq, opts.hidden)
    x = mx.array(rng.standard_normal(shape).astype(np.float32))
    cotangent = mx.array(rng.standard_normal(shape).astype(np.float32))
    steps = {
        "mlxmoe (chunked)": step_fn(ours, cotangent, opts.compile),
        "mlx-lm (recurrent ops)": step_fn(theirs, cotangent, opts.compile),
    }
    print(
        f"batch {opts.batch} x seq {opts.seq}, hidden {opts.hidden}, {opts.key_heads} key / "
        f"{opts.value_heads} value heads of {opts.head_dim}; forward+backward w.r.t. the "
        f"{sum(p.size for _, p in tree_flatten(ours.trainable_parameters())) / 1e6:.2f}M "
        f"parameters and the input; {opts.repeats} timed repeats after one warm-up"
        f"{'; compiled' if opts.compile else ''}"
    )

    results = {name: step(x) for name, step in steps.items()}  # warm-up, and the comparison
    (v0, g0), (v1, g1) = results.values()
    grads0, grads1 = dict(tree_flatten(g0)), dict(tree_flatten(g1))
    worst = max(
        float(mx.abs(grads0[k] - grads1[k]).max() / (mx.abs(grads1[k]).max() + 1e-12)) for k in grads0
    )
    print(
        f"loss {float(v0):.4f} vs {float(v1):.4f}; largest gradient difference "
        f"{worst:.2e} of that gradient's max-abs"
    )

    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(opts.repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step(x)
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    tokens = opts.batch * opts.seq
    for name, t in medians.items():
        spread = f"{min(times[name]) * 1e3:.0f}-{max(times[name]) * 1e3:.0f}"
        print(f"{name:24s} {t * 1e3:8.1f} ms  ({spread} ms)  {tokens / t:8.0f} tokens/s")
    ours_t, theirs_t = medians.values()
    print(f"mlx-lm / mlxmoe: {theirs_t / ours_t:.2f}x")


if __name__ == "__main__":
    main()
