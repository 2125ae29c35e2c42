"""The grouped MoE dispatch: rows sorted by expert, one matmul per expert over its rows.

MLX's CPU ``gather_mm`` / ``gather_qmm`` make one BLAS call per row (a matrix-vector
product each); once rows are sorted by expert, each expert's rows are one contiguous slice
and one GEMM. The slice bounds must be Python ints, so the per-expert counts are read back
to the host once per layer call (MLX runs eagerly under ``value_and_grad``: one sync per
layer). The products are custom functions with their own gradients: left to autodiff, the
gradient of each slice would be a full-size zero array per expert (E times the rows' size).

Weight gradients come from ``mx.segmented_mm`` (x^T dy, the row dimension cut into the
experts' segments); nothing is computed for weights nobody asks a gradient of (MLX is lazy).
Quantized experts are dequantized one expert's slab at a time, then multiplied by BLAS.
Measurements: bench/README.md.
"""

from __future__ import annotations

import mlx.core as mx

from ..dtypes import gather_dtype


def expert_counts(experts: mx.array, num_experts: int) -> tuple[int, ...] | None:
    """How many rows each expert has, read to the host (``experts`` [N] sorted); None inside
    ``mx.compile``, which cannot read arrays while tracing: shapes there must not depend on
    the routing, so a compiled step runs the gather dispatch instead."""
    counts = (experts[:, None] == mx.arange(num_experts, dtype=experts.dtype)).sum(axis=0)
    try:
        return tuple(counts.tolist())
    except ValueError:  # "[eval] Attempting to eval an array during function transformations"
        return None


def _bounds(counts: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """(expert, first row, end row) of every expert with rows."""
    out, start = [], 0
    for e, n in enumerate(counts):
        if n:
            out.append((e, start, start + n))
        start += n
    return out


def _per_expert(x: mx.array, bounds, product) -> mx.array:
    parts = [product(x[s:t], e) for e, s, t in bounds]
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=0)


def _segments(counts: tuple[int, ...]) -> mx.array:
    ends = mx.cumsum(mx.array(counts, dtype=mx.uint32))
    return mx.stack([ends - mx.array(counts, dtype=mx.uint32), ends], axis=-1)


def grouped_matmul(x: mx.array, w: mx.array, counts: tuple[int, ...]) -> mx.array:
    """Rows ``x`` [N, in] sorted by expert times their expert's ``w`` [E, out, in] transposed
    -> [N, out] in ``x``'s dtype, computed in the dtype ``gather_mm`` would use (float32 on
    the CPU). ``w`` is taken as stored: slicing an expert out of a transposed view runs at
    half the rate (bench/README.md)."""
    compute = gather_dtype(x.dtype)
    bounds = _bounds(counts)
    if not bounds:
        return mx.zeros((0, w.shape[-2]), dtype=x.dtype)

    @mx.custom_function
    def product(x, w):
        return _per_expert(x, bounds, lambda rows, e: rows @ w[e].T)

    @product.vjp
    def product_vjp(primals, cotangent, _output):
        x, w = primals
        dx = _per_expert(cotangent, bounds, lambda rows, e: rows @ w[e])
        dw = mx.segmented_mm(cotangent.T, x, _segments(counts))
        return dx, dw.astype(w.dtype)

    y = product(x.astype(compute), w.astype(compute))
    return y.astype(x.dtype)


def grouped_qmm(x: mx.array, layer, counts: tuple[int, ...]) -> mx.array:
    """Rows ``x`` [N, in] sorted by expert times their expert's quantized weight
    (``layer``: a frozen QuantizedExpertLinear) -> [N, out]; gradient w.r.t. ``x`` only.
    The backward pass dequantizes again rather than keep every expert's float slab alive
    until then (a float copy of the quantized experts)."""
    bounds = _bounds(counts)
    if not bounds:
        return mx.zeros((0, layer.weight.shape[-2]), dtype=x.dtype)
    compute = gather_dtype(x.dtype)

    def slab(e: int) -> mx.array:
        return layer.dequantized_expert(e).astype(compute)

    @mx.custom_function
    def product(x):
        return _per_expert(x, bounds, lambda rows, e: rows @ slab(e).T)

    @product.vjp
    def product_vjp(_primals, cotangent, _output):
        return (_per_expert(cotangent, bounds, lambda rows, e: rows @ slab(e)),)

    return product(x.astype(compute)).astype(x.dtype)
