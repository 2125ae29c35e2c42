"""Sparse mixture-of-experts: a float32 router and stacked experts run by MLX's gather kernels.

Expert weights are stacked [n_experts, out, in]. Tokens are dispatched with ``gather_mm``
(``gather_qmm`` once quantized) in mlx-lm's SwitchGLU layout: activations [T, 1, 1, D]
with indices [T, k], or flattened and sorted by expert. The tempting [T, 1, D] with
[T, 1] indices broadcasts to a [T, T, 1, D] result on the CPU backend (256x the work
at 256 tokens): never hand these kernels that shape.

The "dense" dispatch runs every expert on every token as one batched matmul and weights
the outputs by the routing (zero for experts a token did not choose): E/k times the work,
the same result. It pays on MLX's CPU backend with a fast BLAS, where ``gather_mm`` makes
one BLAS call per row (measurements: bench/README.md).

The "grouped" dispatch sorts the rows by expert and pads each expert's rows to blocks, one
GEMM per block (``nn.grouped``): gather's work plus the padding, at the BLAS rate, float or
quantized experts alike, with shapes that do not follow the routing (it compiles).
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from ..config import MoEArgs
from ..dtypes import gather_dtype, on_cpu
from .grouped import Blocks, block_matmul, block_qmm, blocks_for, from_blocks, swiglu, to_blocks
from .mlp import GatedMLP

# Below this many (token, expert) pairs sorting costs more than it saves.
SORT_THRESHOLD = 64
DISPATCHES = ("gather", "dense", "grouped")
# Below this many (token, expert) pairs, as in decoding, the dense dispatch stays gather:
# a few rows are matrix-vector products bound by reading weights, and dense reads all E.
DENSE_MIN_PAIRS = 64


class Router(nn.Module):
    """Top-k softmax routing, computed in float32 whatever the model's dtype.

    Half-precision routing flips near-tied expert choices, a reported cause of diverging MoE
    fine-tunes; float32 keeps the top-k decisions stable (Switch Transformer's selective
    precision). ``temperature`` divides the logits;
    ``jitter`` multiplies the router's input by uniform noise in [1 - j, 1 + j] while
    training (Switch Transformer's router jitter, applied to the router input only).

    ``softmax`` "all": softmax over every expert, then the top k probabilities
    (renormalized if ``normalize_top_k``); "top_k": the k largest logits, softmaxed among
    themselves (gpt-oss). Both choose the same experts, and "top_k" weighs them as "all"
    renormalized does, up to rounding; "top_k" is what gpt-oss's reference computes.

    DeepSeek-V2's options (softmax "all"): the weights times ``scaling``
    (routed_scaling_factor); with ``groups`` > 1 the experts form that many equal groups, and
    the top k are taken from the ``groups_used`` groups whose best probability is highest
    (topk_method "group_limited_greedy").
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        normalize_top_k: bool,
        bias: bool = False,
        softmax: str = "all",
        scaling: float = 1.0,
        groups: int = 1,
        groups_used: int = 1,
    ):
        super().__init__()
        if softmax not in ("all", "top_k"):
            raise ValueError(f"router softmax must be 'all' or 'top_k', got {softmax!r}")
        self.weight = mx.zeros((num_experts, hidden_size), dtype=mx.float32)
        if bias:
            self.bias = mx.zeros((num_experts,), dtype=mx.float32)
        self.top_k = top_k
        self.normalize_top_k = normalize_top_k
        self.softmax = softmax
        self.scaling, self.groups, self.groups_used = scaling, groups, groups_used
        self.temperature = 1.0
        self.jitter = 0.0

    def raw_logits(self, x: mx.array) -> mx.array:
        logits = x.astype(mx.float32) @ self.weight.astype(mx.float32).T
        return logits + self.bias.astype(mx.float32) if "bias" in self else logits

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """Returns (router logits [..., E] float32, expert indices [..., k], weights [..., k])."""
        x = x.astype(mx.float32)
        if self.training and self.jitter > 0:
            x = x * mx.random.uniform(1.0 - self.jitter, 1.0 + self.jitter, x.shape)
        logits = self.raw_logits(x)
        if self.temperature != 1.0:
            logits = logits / self.temperature
        k = self.top_k
        if self.softmax == "top_k":
            indices = mx.stop_gradient(mx.argpartition(-logits, kth=k - 1, axis=-1)[..., :k])
            top = mx.take_along_axis(logits, indices, axis=-1)
            return logits, indices, mx.softmax(top, axis=-1, precise=True)
        probs = mx.softmax(logits, axis=-1, precise=True)
        candidates = self.best_groups_only(probs) if self.groups > 1 else probs
        indices = mx.stop_gradient(mx.argpartition(-candidates, kth=k - 1, axis=-1)[..., :k])
        weights = mx.take_along_axis(probs, indices, axis=-1)
        if self.normalize_top_k:
            weights = weights / weights.sum(axis=-1, keepdims=True)
        if self.scaling != 1.0:
            weights = weights * self.scaling
        return logits, indices, weights

    def best_groups_only(self, probs: mx.array) -> mx.array:
        """``probs`` [..., E] with every expert outside the ``groups_used`` best groups (by
        their best expert's probability) set to 0, as transformers' DeepSeek-V2 masks them."""
        grouped = probs.reshape(*probs.shape[:-1], self.groups, -1)
        best = grouped.max(axis=-1)
        kept = mx.argpartition(-best, kth=self.groups_used - 1, axis=-1)[..., : self.groups_used]
        keep = (mx.arange(self.groups)[:, None] == kept[..., None, :]).any(axis=-1)
        return mx.stop_gradient(mx.where(keep[..., None], grouped, 0.0).reshape(probs.shape))


class ExpertLinear(nn.Module):
    """A linear layer per expert; ``weight`` is [n_experts, out, in], the optional ``bias``
    (gpt-oss) [n_experts, out]."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int, bias: bool = False):
        super().__init__()
        bound = math.sqrt(1.0 / input_dims)
        self.weight = mx.random.uniform(-bound, bound, (num_experts, output_dims, input_dims))
        if bias:
            self.bias = mx.zeros((num_experts, output_dims))

    def __call__(self, x: mx.array, indices: mx.array | None, sorted_indices: bool = False) -> mx.array:
        """``indices`` None: every expert on every row, x [1 or E, T, in] -> [E, T, out]."""
        if indices is None:
            return with_expert_bias(self, x @ self.weight.swapaxes(-1, -2), None)
        y = gather_matmul(x, self.weight.swapaxes(-1, -2), indices, sorted_indices)
        return with_expert_bias(self, y, indices)

    def grouped(self, x: mx.array, blocks: Blocks) -> mx.array:
        """Rows in the blocked layout (``nn.grouped``), x [blocks, size, in]."""
        return with_block_bias(self, block_matmul(x, self.weight, blocks), blocks)

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine", **_):
        return QuantizedExpertLinear.from_float(self, group_size, bits, mode)


def with_expert_bias(layer: nn.Module, y: mx.array, indices: mx.array | None) -> mx.array:
    """``y`` plus each row's expert's bias, if ``layer`` has one: y is [E, T, out] for the
    dense dispatch (``indices`` None), else [..., 1, out] with indices [...]."""
    if "bias" not in layer:
        return y
    bias = layer.bias[:, None, :] if indices is None else mx.expand_dims(layer.bias[indices], -2)
    return y + bias.astype(y.dtype)


def with_block_bias(layer: nn.Module, y: mx.array, blocks: Blocks) -> mx.array:
    """``y`` [blocks, size, out] plus each block's expert's bias, if ``layer`` has one."""
    return y + layer.bias[blocks.experts][:, None, :].astype(y.dtype) if "bias" in layer else y


def gather_matmul(x: mx.array, w: mx.array, indices: mx.array, sorted_indices: bool) -> mx.array:
    """``gather_mm`` in the dtype the backend computes it in (``dtypes.gather_dtype``),
    returned in ``x``'s dtype: float experts (and expert LoRA) run in a bfloat16 model on
    the CPU too, and stay bfloat16 on a GPU."""
    compute = gather_dtype(x.dtype)
    y = mx.gather_mm(x.astype(compute), w.astype(compute), rhs_indices=indices, sorted_indices=sorted_indices)
    return y.astype(x.dtype)


class QuantizedExpertLinear(nn.Module):
    """Quantized expert weights, run with ``gather_qmm``: MLX's affine mode (our QLoRA base),
    or ``mxfp4`` (gpt-oss's experts as published: 4-bit floats, a power-of-two scale per 32,
    no ``biases``). ``bias`` is the experts' own additive bias, kept in float."""

    def __init__(
        self, weight: mx.array, group_size: int, bits: int, mode: str = "affine", bias: mx.array | None = None
    ):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        packed = mx.quantize(weight, group_size, bits, mode=mode)
        self.weight, self.scales = packed[0], packed[1]
        if mode == "affine":
            self.biases = packed[2]
        if bias is not None:
            self.bias = bias
        self.freeze()

    @classmethod
    def from_float(cls, layer: ExpertLinear, group_size: int, bits: int, mode: str = "affine"):
        return cls(layer.weight, group_size, bits, mode, layer.get("bias"))

    def dequantized_weight(self, after: mx.array | None = None) -> mx.array:
        """The float weight [E, out, in]. ``after``: an array to compute it after: it depends
        on parameters only, so MLX may otherwise compute it at the start of an evaluation and
        hold it until its product runs (every layer's at once, in a training step)."""
        weight = self.weight if after is None else mx.depends(self.weight, after)
        # mxfp4's scales are uint8 exponents: ask for float32, which holds its values exactly
        dtype = None if self.mode == "affine" else mx.float32
        return mx.dequantize(
            weight,
            self.scales,
            self.get("biases"),
            self.group_size,
            self.bits,
            mode=self.mode,
            dtype=dtype,
        )

    def grouped(self, x: mx.array, blocks: Blocks) -> mx.array:
        return with_block_bias(self, block_qmm(x, self, blocks), blocks)

    def __call__(self, x: mx.array, indices: mx.array | None, sorted_indices: bool = False) -> mx.array:
        if indices is None:
            raise ValueError("quantized experts run with the gather dispatch only")
        y = mx.gather_qmm(
            x,
            self.weight,
            self.scales,
            self.get("biases"),
            rhs_indices=indices,
            transpose=True,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
            sorted_indices=sorted_indices,
        )
        return with_expert_bias(self, y, indices)


def sort_by_expert(x: mx.array, indices: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """[..., 1, 1, D] and [..., k] -> rows [N, 1, D] in expert order, their experts [N], and
    the permutation that restores token order."""
    k = indices.shape[-1]
    flat = indices.flatten()
    order = mx.argsort(flat)
    return x.flatten(0, -3)[order // k], flat[order], mx.argsort(order)


def clamped_swiglu(gate: mx.array, up: mx.array, alpha: float, limit: float) -> mx.array:
    """gpt-oss's expert activation: g * sigmoid(alpha * g) * (u + 1), with g = min(gate, limit)
    and u = up clipped to [-limit, limit] (transformers' GptOssExperts; alpha and limit are
    ``swiglu_alpha`` and ``swiglu_limit`` of config.json)."""
    gate = mx.minimum(gate, limit)
    up = mx.clip(up, -limit, limit)
    return gate * mx.sigmoid(alpha * gate) * (up + 1)


class SwitchExperts(nn.Module):
    """SwiGLU experts: ``down(silu(gate(x)) * up(x))`` for each token's k chosen experts;
    with ``swiglu`` = (alpha, limit), gpt-oss's ``clamped_swiglu`` instead of silu(g) * u.
    ``bias``: each projection has a bias per expert (gpt-oss)."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        bias: bool = False,
        swiglu: tuple[float, float] | None = None,
    ):
        super().__init__()
        self.gate_proj = ExpertLinear(hidden_size, intermediate_size, num_experts, bias)
        self.up_proj = ExpertLinear(hidden_size, intermediate_size, num_experts, bias)
        self.down_proj = ExpertLinear(intermediate_size, hidden_size, num_experts, bias)
        self.swiglu_alpha, self.swiglu_limit = swiglu or (None, None)

    def activation(self, gate: mx.array, up: mx.array) -> mx.array:
        if self.swiglu_limit is None:
            return nn.silu(gate) * up
        return clamped_swiglu(gate, up, self.swiglu_alpha, self.swiglu_limit)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        """x [..., D], indices [..., k] -> each chosen expert's output [..., k, D]."""
        rows, experts, restore, do_sort = self.dispatch(x, indices)
        h = self.activation(self.gate_proj(rows, experts, do_sort), self.up_proj(rows, experts, do_sort))
        y = self.down_proj(h, experts, do_sort)
        return self.combine(y, indices, restore)

    def grouped(self, x: mx.array, indices: mx.array, num_experts: int) -> mx.array:
        """Like calling the layer, each expert's rows run in blocks (``nn.grouped``)."""
        blocks = blocks_for(indices, num_experts)
        rows = to_blocks(x, blocks)
        plain = type(self).activation is SwitchExperts.activation and self.swiglu_limit is None
        activation = swiglu if plain else self.activation
        h = activation(self.gate_proj.grouped(rows, blocks), self.up_proj.grouped(rows, blocks))
        return from_blocks(self.down_proj.grouped(h, blocks), blocks, indices.shape)

    def all_experts(self, x: mx.array) -> mx.array:
        """x [..., D] -> every expert's output [E, ..., D] (the dense dispatch)."""
        rows = x.reshape(1, -1, x.shape[-1])
        h = self.activation(self.gate_proj(rows, None), self.up_proj(rows, None))
        return self.down_proj(h, None).reshape(-1, *x.shape)

    @staticmethod
    def dispatch(x: mx.array, indices: mx.array):
        x = mx.expand_dims(x, (-2, -3))
        if indices.size >= SORT_THRESHOLD:
            rows, experts, restore = sort_by_expert(x, indices)
            return rows, experts, restore, True
        return x, indices, None, False

    @staticmethod
    def combine(y: mx.array, indices: mx.array, restore: mx.array | None) -> mx.array:
        if restore is not None:
            y = mx.unflatten(y[restore], 0, indices.shape)
        return y.squeeze(-2)


class SparseMoE(nn.Module):
    """Router + routed experts (+ a shared expert: Qwen2-MoE's behind a sigmoid gate,
    DeepSeek-V2's added as it is)."""

    def __init__(self, args: MoEArgs):
        super().__init__()
        d = args.hidden_size
        self.router = Router(
            d,
            args.num_experts,
            args.num_experts_per_tok,
            args.norm_topk_prob,
            args.router_bias,
            args.router_softmax,
            args.routed_scaling_factor,
            args.expert_groups,
            args.expert_groups_used,
        )
        swiglu = None if args.swiglu_limit is None else (args.swiglu_alpha, args.swiglu_limit)
        self.experts = SwitchExperts(
            d, args.moe_intermediate_size, args.num_experts, args.expert_bias, swiglu
        )
        if args.shared_expert_intermediate_size:
            self.shared_expert = GatedMLP(d, args.shared_expert_intermediate_size)
            if args.shared_expert_gate:
                self.shared_expert_gate = nn.Linear(d, 1, bias=False)
        self.dispatch = "gather"  # or "dense", "grouped": see the module docstring and set_dispatch

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """Returns (output, router logits [..., n_experts] in float32)."""
        logits, indices, weights = self.router(x)
        if self.dispatch == "dense" and indices.size >= DENSE_MIN_PAIRS:
            # [..., E] routing weights, zero for the experts a token did not choose
            chosen = indices[..., None] == mx.arange(logits.shape[-1])
            dense_weights = (weights[..., None] * chosen).sum(axis=-2)
            y = self.experts.all_experts(x)
            y = (y * mx.moveaxis(dense_weights, -1, 0)[..., None].astype(y.dtype)).sum(axis=0)
        elif self.dispatch == "grouped" and indices.size >= SORT_THRESHOLD:
            y = self.experts.grouped(x, indices, logits.shape[-1])
            y = (y * weights[..., None].astype(y.dtype)).sum(axis=-2)
        else:
            y = self.experts(x, indices)
            y = (y * weights[..., None].astype(y.dtype)).sum(axis=-2)
        if "shared_expert_gate" in self:
            y = y + mx.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        elif "shared_expert" in self:  # DeepSeek-V2: no gate
            y = y + self.shared_expert(x)
        return y, logits


# Dense does E/k times gather's work at the BLAS rate; gather_mm is fast while an expert's
# matrix stays in cache. So: the smallest expert matrix (float32 values, hidden x expert FFN)
# that runs dense, by the largest E/k it holds for; beyond E/k = 4 gather always. Measured
# with OpenBLAS on 2 cores: bench/README.md.
DENSE_MIN_EXPERT_VALUES = ((3, 128 * 1024), (4, 1024 * 1024))


def dense_pays(num_experts: int, top_k: int, expert_values: int) -> bool:
    """Whether the dense dispatch beats gather on MLX's CPU backend with a fast BLAS."""
    return any(
        num_experts <= ratio * top_k and expert_values >= values for ratio, values in DENSE_MIN_EXPERT_VALUES
    )


def choose_dispatch(
    setting: str,
    num_experts: int,
    top_k: int,
    float_experts: bool,
    fast_cpu: bool,
    expert_values: int = 0,
    float32: bool = True,
) -> str:
    """The dispatch ``setting`` (auto or one of ``DISPATCHES``) means for such MoE layers
    (``float_experts``: not quantized; ``fast_cpu``: MLX's CPU backend with a fast BLAS;
    ``expert_values``: hidden size x expert FFN size; ``float32``: the model's dtype).

    ``auto`` on MLX's CPU backend with a fast BLAS: dense for float32 experts whose matrices
    are too large for gather_mm's cache-bound rate at their E/k (``dense_pays``), else grouped
    (one GEMM per block of one expert's rows, where gather_mm and gather_qmm make one call per
    row). Gather everywhere else: Metal's gather kernels are fast, and the bundled CPU BLAS
    runs a GEMM no faster than gather_mm's rows (bench/README.md)."""
    if setting not in ("auto", *DISPATCHES):
        raise ValueError(f"MoE dispatch must be auto, {', '.join(DISPATCHES)}, got {setting!r}")
    if setting == "dense" and not float_experts:
        raise ValueError("the dense MoE dispatch needs float experts (this model is quantized)")
    if setting == "auto":
        if not fast_cpu:
            return "gather"
        dense = float_experts and float32 and dense_pays(num_experts, top_k, expert_values)
        return "dense" if dense else "grouped"
    return setting


def set_dispatch(model: nn.Module, setting: str = "auto") -> str:
    """Sets how every MoE layer of ``model`` runs its experts (see ``choose_dispatch``);
    returns the choice."""
    from ..blas import loaded_blas

    layers = [m for _, m in model.named_modules() if isinstance(m, SparseMoE)]
    if not layers:
        choose_dispatch(setting, 1, 1, True, False)  # still refuses a bad setting
        return "gather"
    float_experts = all(not isinstance(_base(m.experts.gate_proj), QuantizedExpertLinear) for m in layers)
    setting = choose_dispatch(
        setting,
        max(m.router.weight.shape[0] for m in layers),
        min(m.router.top_k for m in layers),
        float_experts,
        on_cpu() and loaded_blas() != "bundled",
        min(_base(m.experts.up_proj).weight[0].size for m in layers),
        # A BLAS multiplies float32 only; MLX's own CPU kernels for 16-bit floats are far
        # slower, so dense never pays on 16-bit experts (bench/README.md).
        all(_base(m.experts.up_proj).weight.dtype == mx.float32 for m in layers),
    )
    for m in layers:
        m.dispatch = setting
    return setting


def _base(layer: nn.Module) -> nn.Module:
    return layer.base if "base" in layer else layer  # a LoRA wrapper's frozen layer
