"""The grouped MoE dispatch: rows sorted by expert and cut into blocks of one expert each.

MLX's CPU ``gather_mm`` / ``gather_qmm`` make one BLAS call per row (a matrix-vector
product each) in the usual MoE layout. Here each expert's rows are padded to a whole number
of blocks of ``size`` rows, so that one ``gather_mm`` over [blocks, size, in] makes one GEMM
of ``size`` rows per block. Every shape depends on the number of rows and experts only, never
on the routing: nothing is read back to the host, so the dispatch compiles, and a training
step stays near gather's memory (reading the routing to the host inside ``value_and_grad``
kept arrays alive that one evaluation of the step frees: bench/README.md). The price is
padding, at most ``size - 1`` rows per expert, which the backward pass keeps too.

The products are custom functions: the input gradient is the same block GEMM against the
weight, weight gradients come from ``mx.segmented_mm`` over each expert's padded rows (the
padding rows are zero), and nothing is computed for weights nobody asks a gradient of.
Quantized experts are dequantized in the forward pass and again in the backward pass, rather
than keep a float copy of every layer's experts alive in between, each after its product's
input exists (``QuantizedExpertLinear.dequantized_weight``'s ``after``).
"""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx

from ..dtypes import gather_dtype

# Rows per block: the GEMM rate rises with the rows a call gets, the padding (memory the
# backward pass keeps) with the block. Measured on 2 cores with OpenBLAS (bench/README.md).
MIN_BLOCK, MAX_BLOCK = 16, 64


class Blocks(NamedTuple):
    """Where the (token, expert) pairs of one MoE layer call sit in the blocked layout."""

    slots: mx.array  # [pairs]: the padded row of each pair, pairs in token order
    sources: mx.array  # [blocks * size]: the token each padded row reads; tokens for padding
    experts: mx.array  # [blocks]: each block's expert, ascending (uint32)
    segments: mx.array  # [E, 2]: each expert's padded rows [first, end) (uint32)
    size: int


def block_size(pairs: int, num_experts: int) -> int:
    """A quarter of an expert's mean share of rows, as a power of two within [MIN_BLOCK,
    MAX_BLOCK]: padding of at most a quarter of the rows, an eighth on average."""
    size = MIN_BLOCK
    while size < MAX_BLOCK and 8 * size <= pairs // num_experts:
        size *= 2
    return size


def padded_rows(pairs: int, num_experts: int, size: int | None = None) -> int:
    """Rows of the blocked layout for ``pairs`` (token, expert) pairs: room for every expert
    to end in a partial block, whatever the routing."""
    size = size or block_size(pairs, num_experts)
    return -(-(pairs + num_experts * (size - 1)) // size) * size


def blocks_for(indices: mx.array, num_experts: int, size: int | None = None) -> Blocks:
    """The blocked layout for ``indices`` [..., k] (each token's experts)."""
    k = indices.shape[-1]
    flat = indices.flatten().astype(mx.int32)
    pairs = flat.size
    size = size or block_size(pairs, num_experts)
    blocks = padded_rows(pairs, num_experts, size) // size
    counts = (flat[:, None] == mx.arange(num_experts, dtype=mx.int32)).sum(axis=0).astype(mx.int32)
    padded = -(-counts // size) * size
    padded_end = mx.cumsum(padded)
    padded_start = padded_end - padded
    order = mx.argsort(flat)
    sorted_experts = flat[order]
    # a pair's place among its expert's rows, then its row in the padded layout
    rank = mx.arange(pairs, dtype=mx.int32) - (mx.cumsum(counts) - counts)[sorted_experts]
    slot_sorted = padded_start[sorted_experts] + rank
    slots = mx.zeros((pairs,), mx.int32).at[order].add(slot_sorted)
    tokens = pairs // k
    sources = mx.full((blocks * size,), tokens, mx.int32).at[slot_sorted].add(order // k - tokens)
    first_rows = mx.arange(blocks, dtype=mx.int32) * size
    experts = (padded_end[None, :] <= first_rows[:, None]).sum(axis=1)  # unused blocks: past E - 1
    experts = mx.minimum(experts, num_experts - 1).astype(mx.uint32)
    segments = mx.stack([padded_start, padded_end], axis=-1).astype(mx.uint32)
    return Blocks(slots, sources, experts, segments, size)


@mx.custom_function
def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up, whose gradient keeps gate and up only: autodiff would keep
    sigmoid(gate) and silu(gate) as well, two more arrays of the padded rows."""
    return gate * mx.sigmoid(gate) * up


@swiglu.vjp
def _swiglu_vjp(primals, cotangent, _output):
    gate, up = primals
    sigmoid = mx.sigmoid(gate)
    silu = gate * sigmoid
    return cotangent * up * (sigmoid + silu * (1 - sigmoid)), cotangent * silu


def to_blocks(x: mx.array, blocks: Blocks) -> mx.array:
    """Tokens ``x`` [..., D] -> their rows in the blocked layout [blocks, size, D]."""
    rows = x.reshape(-1, x.shape[-1])
    rows = mx.concatenate([rows, mx.zeros((1, rows.shape[-1]), rows.dtype)])  # the padding's row
    return rows[blocks.sources].reshape(-1, blocks.size, rows.shape[-1])


def from_blocks(y: mx.array, blocks: Blocks, indices_shape: tuple[int, ...]) -> mx.array:
    """Blocked rows ``y`` [blocks, size, D] -> each pair's row [..., k, D]."""
    return y.reshape(-1, y.shape[-1])[blocks.slots].reshape(*indices_shape, y.shape[-1])


def block_matmul(xb: mx.array, w: mx.array, blocks: Blocks) -> mx.array:
    """Blocked rows ``xb`` [blocks, size, in] times their expert's ``w`` [E, out, in]
    transposed -> [blocks, size, out] in ``xb``'s dtype, computed in the dtype ``gather_mm``
    would use (float32 on the CPU). The casts happen inside the product: what its gradient
    keeps is ``xb`` as given, not a float32 copy (nor the float32 output)."""
    compute = gather_dtype(xb.dtype)

    @mx.custom_function
    def product(xb, w, experts, segments):
        y = mx.gather_mm(
            xb.astype(compute), w.astype(compute).swapaxes(-1, -2), rhs_indices=experts, sorted_indices=True
        )
        return y.astype(xb.dtype)

    @product.vjp
    def product_vjp(primals, cotangent, _output):
        xb, w, experts, segments = primals
        dy = cotangent.astype(compute)
        dx = mx.gather_mm(dy, w.astype(compute), rhs_indices=experts, sorted_indices=True)
        rows = dy.shape[0] * dy.shape[1]
        dw = mx.segmented_mm(dy.reshape(rows, -1).T, xb.astype(compute).reshape(rows, -1), segments)
        return dx.astype(xb.dtype), dw.astype(w.dtype), mx.zeros_like(experts), mx.zeros_like(segments)

    return product(xb, w, blocks.experts, blocks.segments)


def block_qmm(xb: mx.array, layer, blocks: Blocks) -> mx.array:
    """Blocked rows ``xb`` times their expert's quantized weight (``layer``: a frozen
    QuantizedExpertLinear) -> [blocks, size, out] in ``xb``'s dtype; gradient w.r.t.
    ``xb`` only. MLX's CPU quantized kernels run at a few GFLOP/s, so the experts are
    dequantized and multiplied by BLAS (bench/README.md)."""
    compute = gather_dtype(xb.dtype)

    def weight(after: mx.array) -> mx.array:
        return layer.dequantized_weight(after).astype(compute)

    @mx.custom_function
    def product(xb, experts):
        y = mx.gather_mm(
            xb.astype(compute), weight(xb).swapaxes(-1, -2), rhs_indices=experts, sorted_indices=True
        )
        return y.astype(xb.dtype)

    @product.vjp
    def product_vjp(primals, cotangent, _output):
        xb, experts = primals
        dx = mx.gather_mm(
            cotangent.astype(compute), weight(cotangent), rhs_indices=experts, sorted_indices=True
        )
        return dx.astype(xb.dtype), mx.zeros_like(experts)

    return product(xb, blocks.experts)
