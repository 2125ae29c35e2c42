"""Forward+backward time of our MoE experts against mlx-lm's SwitchGLU and a dense-matmul ceiling.

    .venv/bin/python bench/moe_layer.py [--quick]
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \
        .venv/bin/python bench/moe_layer.py [--quick]

Variants: our experts under the gather and the grouped dispatch (``nn.grouped``), mlx-lm's
SwitchGLU (float32 without LoRA only), float and 4-bit. ``--lora R`` freezes the experts
under rank-R LoRA (what expert LoRA trains), ``--dtype bfloat16`` runs a bfloat16 model;
without mlx-lm rows the reference column is our gather dispatch. ``--tokens``, ``--hidden``,
``--ffn``, ``--top-k`` set the layer (issue #20's: 1024, 512, 512, 4).

Every variant runs on the same weights, tokens and routing (random top-k, fixed seed) and is
timed as one ``value_and_grad`` step: w.r.t. the activations and the expert weights for float
weights, w.r.t. the activations only for 4-bit (quantized weights are frozen). The dense rows
run the same SwiGLU forward+backward with plain matmuls (``quantized_matmul`` for 4-bit) on
[tokens * top_k, hidden] rows and one expert's weights: the same FLOPs, i.e. the rate the
backend reaches when nothing is gathered. Each variant runs one warm-up and then its timed
repeats back to back; the time reported is their median.

On Linux the MLX wheel calls whichever ``cblas_sgemm`` is loaded first: its bundled reference
BLAS (a few GFLOP/s), or OpenBLAS when preloaded. Rankings change with it, so the BLAS in use
is printed with the table. So is MLX's buffer-cache limit (32 MiB by default on the CPU):
buffers above it go back to the OS and are page-faulted in afresh on the next step (~75 ms
per 128 MiB here, ~35 ms when cached), a large part of the cost of 64 experts' weight
gradients (3 x 128 MiB); ``--cache-gb`` raises it.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import SwitchGLU

from mlxmoe.adapt.lora import LoRAExperts
from mlxmoe.nn.moe import SwitchExperts


@dataclass(frozen=True)
class Workload:
    tokens: int = 512
    hidden: int = 1024
    # 512 = hidden / 2: the expert width of the fine-grained MoEs we target (Qwen3-30B-A3B:
    # 2048 -> 768, OLMoE: 2048 -> 1024), and what FINDINGS.md's gather_mm numbers used.
    ffn: int = 512
    top_k: int = 2
    group_size: int = 64
    bits: int = 4

    @property
    def rows(self) -> int:
        return self.tokens * self.top_k

    def flops(self, weight_grads: bool) -> float:
        # three projections of 2 * rows * hidden * ffn each, forward; as many again for the
        # activation gradient, and once more for the weight gradient
        return 3 * 2 * self.rows * self.hidden * self.ffn * (3 if weight_grads else 2)


@dataclass
class Variant:
    name: str
    experts: int | None  # None: the dense ceiling, the same for every expert count
    kind: str  # "float" or "4-bit"
    module: nn.Module
    inputs: tuple[mx.array, mx.array | None]  # (activations, expert indices)
    cotangent: mx.array
    times: list[float] = field(default_factory=list)

    def __post_init__(self):
        self.step = gradient_step(self.module, *self.inputs, self.cotangent)

    def run(self) -> tuple[mx.array, object]:
        """One timed unit, evaluated: returns (layer output, gradients)."""
        (_, output), grads = self.step()
        mx.eval(output, grads)
        return output, grads

    def warm_up(self, full: bool) -> None:
        mx.eval(self.step() if full else self.module(*self.inputs))

    @property
    def median_s(self) -> float:
        return statistics.median(self.times)


class DenseGLU(nn.Module):
    """The same SwiGLU on already-gathered rows with one expert's weights: no routing at all."""

    def __init__(self, experts: SwitchExperts, expert: int = 0):
        super().__init__()
        ffn, hidden = experts.gate_proj.weight.shape[1:]
        self.gate_proj = nn.Linear(hidden, ffn, bias=False)
        self.up_proj = nn.Linear(hidden, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, hidden, bias=False)
        for name in ("gate_proj", "up_proj", "down_proj"):
            self[name].weight = experts[name].weight[expert]

    def __call__(self, rows: mx.array, indices: mx.array | None = None) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(rows)) * self.up_proj(rows))


class GroupedExperts(SwitchExperts):
    """Our experts under the "grouped" dispatch (one matmul per expert over its sorted rows)."""

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        return self.grouped(x, indices, self.router_experts)


def with_lora(module: nn.Module, rank: int) -> nn.Module:
    """Frozen experts with LoRA on each projection, B nonzero: what expert LoRA trains."""
    for name in ("gate_proj", "up_proj", "down_proj"):
        lora = LoRAExperts(module[name], rank, 2 * rank)
        lora.lora_b = mx.random.normal(lora.lora_b.shape, key=mx.random.key(1)) * 0.01
        lora.lora_a = mx.random.normal(lora.lora_a.shape, key=mx.random.key(2)) * 0.04
        setattr(module, name, lora)
    return module


class PaddedBlockExperts(SwitchExperts):
    """A candidate layout, benchmarked with ``--blocks M``; not what the package runs.

    MLX's CPU ``gather_mm`` issues one ``cblas_sgemm`` per output matrix, so rows [N, 1, D]
    become N matrix-vector products, and ``sorted_indices`` is ignored. Here each expert's
    rows are padded to a multiple of M and cut into [n_blocks, M, D] blocks, one expert per
    block: one M-row GEMM per block. Shapes must stay static (mx.compile), so n_blocks is the
    worst case (N + E * (M - 1)) / M; the padding rows repeat token 0 and are never read back.
    """

    def __init__(self, experts: SwitchExperts, block_rows: int):
        super().__init__(1, 1, 1)
        self.update(experts.parameters())
        self.block_rows = block_rows

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        m, n_experts = self.block_rows, self.gate_proj.weight.shape[0]
        k, flat = indices.shape[-1], mx.stop_gradient(indices).flatten()
        n = flat.size
        order = mx.argsort(flat)
        expert_of_sorted = flat[order]
        counts = (flat[:, None] == mx.arange(n_experts, dtype=flat.dtype)).sum(0).astype(mx.uint32)
        padded = (counts + m - 1) // m * m
        padded_end = mx.cumsum(padded)
        slot = (
            (padded_end - padded)[expert_of_sorted]
            + mx.arange(n, dtype=mx.uint32)
            - (mx.cumsum(counts) - counts)[expert_of_sorted]
        )
        n_blocks = (n + n_experts * (m - 1)) // m
        token_of_slot = mx.zeros((n_blocks * m,), mx.uint32).at[slot].add(order // k)
        block_start = mx.arange(n_blocks, dtype=mx.uint32)[:, None] * m
        expert_of_block = mx.minimum((padded_end[None, :] <= block_start).sum(1), n_experts - 1)
        expert_of_block = expert_of_block.astype(mx.uint32)

        rows = x.reshape(-1, x.shape[-1])[token_of_slot].reshape(n_blocks, m, -1)
        h = nn.silu(self.gate_proj(rows, expert_of_block, True)) * self.up_proj(rows, expert_of_block, True)
        y = self.down_proj(h, expert_of_block, True).reshape(n_blocks * m, -1)
        return y[slot[mx.argsort(order)]].reshape(*indices.shape, -1)


def gradient_step(module: nn.Module, x: mx.array, indices: mx.array, cotangent: mx.array):
    """One value_and_grad call, returning ((loss, output), gradients): w.r.t. (weights,
    activations) when the module has trainable parameters, the activations alone when frozen."""

    def forward(x):
        y = module(x, indices)
        return (y * cotangent).sum(), y

    params = module.trainable_parameters()
    if not tree_flatten(params):
        value_and_grad = mx.value_and_grad(forward)
        return lambda: value_and_grad(x)

    def loss(params, x):
        module.update(params)
        return forward(x)

    value_and_grad = mx.value_and_grad(loss, argnums=(0, 1))
    return lambda: value_and_grad(params, x)


def quantized(module: nn.Module, w: Workload) -> nn.Module:
    nn.quantize(module, group_size=w.group_size, bits=w.bits)
    return module


def routing(w: Workload, experts: int, seed: int) -> mx.array:
    """top_k distinct experts per token, uniformly at random."""
    scores = np.random.default_rng(seed).random((w.tokens, experts))
    return mx.array(np.argsort(scores, axis=1)[:, : w.top_k].astype(np.uint32))


def build_variants(
    w: Workload,
    expert_counts: list[int],
    block_rows: list[int],
    seed: int = 0,
    dtype: mx.Dtype = mx.float32,
    lora_rank: int = 0,
) -> list[Variant]:
    """Our gather and grouped dispatches and mlx-lm's SwitchGLU, float and 4-bit; mlx-lm
    only for float32 without LoRA (its CPU gather_mm is float32-only; LoRA wraps ours)."""
    rng = np.random.default_rng(seed)
    x = mx.array(rng.standard_normal((w.tokens, w.hidden)).astype(np.float32)).astype(dtype)
    cotangent = mx.array(rng.standard_normal((w.tokens, w.top_k, w.hidden)).astype(np.float32))
    cotangent = cotangent.astype(dtype)
    variants = []
    for e in expert_counts:
        mx.random.seed(seed + e)
        indices = routing(w, e, seed + e)
        ours = SwitchExperts(w.hidden, w.ffn, e)
        ours.set_dtype(dtype)
        mx.eval(ours.parameters())
        weights = ours.parameters()  # every variant gets these very arrays

        def experts(cls=SwitchExperts, bits=False, e=e, weights=weights):
            module = cls(w.hidden, w.ffn, e).update(weights)
            module.router_experts = e
            module = quantized(module, w) if bits else module
            return with_lora(module, lora_rank) if lora_rank else module

        candidates = [
            ("ours", "float", experts()),
            ("grouped", "float", experts(GroupedExperts)),
            ("ours", "4-bit", experts(bits=True)),
            ("grouped", "4-bit", experts(GroupedExperts, bits=True)),
        ]
        if dtype == mx.float32 and not lora_rank:
            theirs = [SwitchGLU(w.hidden, w.ffn, e, bias=False).update(weights) for _ in range(2)]
            candidates += [("mlx-lm", "float", theirs[0]), ("mlx-lm", "4-bit", quantized(theirs[1], w))]
        for name, kind, module in candidates:
            mx.eval(module.parameters())
            variants.append(Variant(name, e, kind, module, (x, indices), cotangent))
        for m in block_rows if not lora_rank else ():
            blocks = PaddedBlockExperts(ours, m)
            variants.append(Variant(f"blocks of {m}", e, "float", blocks, (x, indices), cotangent))
        if e == expert_counts[0]:
            rows = mx.repeat(x.astype(mx.float32), w.top_k, axis=0)
            flat_cotangent = cotangent.reshape(w.rows, w.hidden).astype(mx.float32)
            for kind, dense in [("float", DenseGLU(ours)), ("4-bit", quantized(DenseGLU(ours), w))]:
                mx.eval(dense.parameters())
                variants.append(Variant("dense", None, kind, dense, (rows, None), flat_cotangent))
    return variants


def max_abs_diff(a, b) -> float:
    leaves_a, leaves_b = dict(tree_flatten(a)), dict(tree_flatten(b))
    assert leaves_a.keys() == leaves_b.keys()
    return max(mx.abs(leaves_a[k] - leaves_b[k]).max().item() for k in leaves_a)


def blas_in_use() -> str:
    mx.eval(mx.ones((64, 64)) @ mx.ones((64, 64)))  # make sure MLX has resolved cblas_sgemm
    preload = os.environ.get("LD_PRELOAD", "")
    preload_note = f"LD_PRELOAD={preload or '(unset)'}"
    preload_note += " [includes OpenBLAS]" if "openblas" in preload.lower() else " [no OpenBLAS]"
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return f"{platform.system()}: system BLAS (Accelerate on macOS); {preload_note}"
    # numpy's own scipy_openblas64_ exports suffixed symbols only: MLX cannot call it
    libs = sorted(
        {
            line.split()[-1]
            for line in maps.read_text().splitlines()
            if "blas" in line.split()[-1].lower() and "scipy_openblas" not in line
        }
    )
    first = (
        "OpenBLAS (preloaded, its cblas_sgemm wins)"
        if "openblas" in preload.lower()
        else ("the MLX wheel's bundled reference BLAS")
    )
    return f"{first}; {preload_note}\n  mapped: " + ", ".join(Path(p).name for p in libs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="a forward pass as warm-up and one timed step (under a minute)"
    )
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--repeats", type=int, help="timed repeats (default 5, --quick 1)")
    parser.add_argument(
        "--blocks",
        type=int,
        nargs="*",
        default=[],
        metavar="M",
        help="also time the padded-block candidate layout with M-row blocks",
    )
    parser.add_argument("--cache-gb", type=float, help="MLX buffer-cache limit (default: MLX's)")
    defaults = Workload()
    for name in ("tokens", "hidden", "ffn", "top_k"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--lora", type=int, default=0, metavar="R", help="frozen experts with rank-R LoRA")
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 5)
    w = Workload(args.tokens, args.hidden, args.ffn, args.top_k)
    if args.cache_gb is not None:
        mx.set_cache_limit(int(args.cache_gb * 2**30))
    cache_limit = mx.set_cache_limit(0)
    mx.set_cache_limit(cache_limit)

    print(
        f"mlx {version('mlx')} ({mx.default_device()}), mlx-lm {version('mlx-lm')}, "
        f"{os.cpu_count()} CPUs, {platform.machine()}"
    )
    print("BLAS:", blas_in_use())
    print(f"MLX buffer-cache limit: {cache_limit / 2**20:.0f} MiB")
    lora_note = f", LoRA rank {args.lora} (base frozen)" if args.lora else ""
    print(
        f"tokens {w.tokens}, top-{w.top_k}, hidden {w.hidden}, expert ffn {w.ffn}, {args.dtype} "
        f"activations{lora_note}, 4-bit = affine group {w.group_size}; median of {repeats} after a warm-up "
        f"{'forward' if args.quick else 'step'}"
    )

    started = time.perf_counter()
    dtype = getattr(mx, args.dtype)
    variants = build_variants(w, args.experts, args.blocks, dtype=dtype, lora_rank=args.lora)
    reference = "mlx-lm" if any(v.name == "mlx-lm" for v in variants) else "ours"
    results = {}  # (output, gradients) of each variant's last step
    for v in variants:
        # Back to back, not interleaved: the first run after another variant pays for fresh
        # buffers (page faults of ~1 GB/s here), which would penalise whichever runs first.
        v.warm_up(full=not args.quick)
        for _ in range(repeats):
            t = time.perf_counter()
            results[v.name, v.experts, v.kind] = v.run()
            v.times.append(time.perf_counter() - t)

    dense = {v.kind: v.median_s for v in variants if v.experts is None}
    print(
        f"\n{'variant':<24}{'ms':>9}{'GFLOP/s':>9}{'vs ' + reference:>13}{'of dense':>10}"
        f"{'max|dy|':>11}{'max|dgrad|':>12}"
    )
    for v in variants:
        label = f"{v.name} {v.kind}" + (f" E={v.experts}" if v.experts else "")
        gflops = w.flops(v.kind == "float" and not args.lora) / v.median_s / 1e9
        cells = [f"{label:<24}{v.median_s * 1e3:9.1f}{gflops:9.1f}"]
        if v.experts is None:
            cells.append(f"{'':>13}{1.0:10.2f}")
        else:
            ref = next(r for r in variants if (r.name, r.experts, r.kind) == (reference, v.experts, v.kind))
            cells.append(f"{v.median_s / ref.median_s:13.2f}{dense[v.kind] / v.median_s:10.2f}")
            if v.name != reference:
                y, grads = results[v.name, v.experts, v.kind]
                ref_y, ref_grads = results[ref.name, ref.experts, ref.kind]
                dy = mx.abs(y - ref_y).max().item()
                cells.append(f"{dy:11.1e}{max_abs_diff(grads, ref_grads):12.1e}")
        print("".join(cells))
    print(
        f"\nms: median fwd+bwd. vs {reference}: time / {reference}'s time (target <= 1.0). of dense: "
        f"dense-matmul time / variant time at equal FLOPs (target >= 0.70; 4-bit rows against "
        f"the dense quantized_matmul row). max|dy|, max|dgrad|: largest output and gradient "
        f"differences from {reference} (target 0). Took {time.perf_counter() - started:.0f} s."
    )


if __name__ == "__main__":
    main()
