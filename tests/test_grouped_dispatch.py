"""The grouped MoE dispatch (nn/grouped.py, ``train.moe_dispatch: grouped``): rows sorted by
expert and padded to blocks of one expert, one GEMM per block, weight gradients with
``mx.segmented_mm``, quantized experts dequantized per use. Checked against naive per-token
loops and against the gather dispatch (test_moe_dispatch.py's helpers)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_map
from test_moe_dispatch import (
    EXPERTS,
    FFN,
    GROUP,
    HIDDEN,
    MANY_TOKENS,
    TOP_K,
    activations,
    dense_and_gather_grads,
    experts_layer,
    moe_args,
    naive_experts,
    naive_experts_mx,
    routing,
)

from mlxmoe.nn.grouped import MIN_BLOCK, block_size, blocks_for
from mlxmoe.nn.moe import SparseMoE, SwitchExperts


def test_grouped_dispatch_matches_a_per_token_loop_with_its_gradients(gather_calls):
    layer, indices = experts_layer(), routing(MANY_TOKENS)
    x = mx.array(activations(MANY_TOKENS))
    cotangent = mx.array(np.random.default_rng(3).standard_normal((MANY_TOKENS, TOP_K, HIDDEN)), mx.float32)
    out = layer.grouped(x, mx.array(indices), EXPERTS)
    np.testing.assert_allclose(
        np.array(out), naive_experts(layer, np.array(x), indices), atol=1e-5, rtol=1e-5
    )

    def loss(params, x):
        layer.update(params)
        return (layer.grouped(x, mx.array(indices), EXPERTS) * cotangent).sum()

    def reference(params, x):
        return (naive_experts_mx(params, x, indices) * cotangent).sum()

    params = layer.trainable_parameters()
    (grads, dx), (ref_grads, ref_dx) = (mx.grad(f, argnums=(0, 1))(params, x) for f in (loss, reference))
    mx.eval(grads, dx)
    assert gather_calls and all(rows >= MIN_BLOCK for (*_, rows, _), _, _ in gather_calls), gather_calls
    np.testing.assert_allclose(np.array(dx), np.array(ref_dx), atol=1e-5, rtol=1e-4)
    for name in ("gate_proj", "up_proj", "down_proj"):
        g = np.array(grads[name]["weight"])
        np.testing.assert_allclose(g, np.array(ref_grads[name]["weight"]), atol=1e-5, rtol=1e-4)
        assert np.all(g[EXPERTS - 1] == 0), f"{name}: an expert nobody chose got a gradient"


@pytest.mark.parametrize("bits", [None, 4])
def test_grouped_dispatch_equals_gather_with_expert_lora_and_a_shared_expert(bits):
    from mlx.utils import tree_flatten

    from mlxmoe.adapt.lora import LoRAExperts

    mx.random.seed(8)
    args = moe_args(True)
    args.shared_expert_intermediate_size = FFN
    moe = SparseMoE(args)
    moe.router.weight = mx.random.normal((EXPERTS, HIDDEN)) * 0.5
    if bits:
        nn.quantize(moe.experts, group_size=GROUP, bits=bits)
    for name in ("gate_proj", "up_proj", "down_proj"):
        lora = LoRAExperts(moe.experts[name], rank=4, alpha=8)
        lora.lora_b = mx.random.normal(lora.lora_b.shape) * 0.1
        setattr(moe.experts, name, lora)
    x = mx.array(activations(MANY_TOKENS))
    cotangent = mx.array(np.random.default_rng(9).standard_normal((MANY_TOKENS, HIDDEN)), mx.float32)
    runs = dense_and_gather_grads(moe, x, cotangent, ("gather", "grouped"))
    (y_gather, g_gather), (y_grouped, g_grouped) = runs["gather"], runs["grouped"]
    np.testing.assert_allclose(np.array(y_grouped), np.array(y_gather), atol=1e-5, rtol=1e-5)
    flat_gather, flat_grouped = dict(tree_flatten(g_gather)), dict(tree_flatten(g_grouped))
    assert any("lora_a" in k for k in flat_gather) and flat_gather.keys() == flat_grouped.keys()
    for key, value in flat_gather.items():
        np.testing.assert_allclose(
            np.array(flat_grouped[key]), np.array(value), atol=1e-5, rtol=1e-4, err_msg=key
        )


def test_grouped_dispatch_keeps_a_bfloat16_model_bfloat16():
    layer, rounded, indices = experts_layer(), experts_layer(), mx.array(routing(MANY_TOKENS))
    layer.set_dtype(mx.bfloat16)
    rounded.update(tree_map(lambda w: w.astype(mx.float32), layer.parameters()))
    x = mx.array(activations(MANY_TOKENS)).astype(mx.bfloat16)
    out = layer.grouped(x, indices, EXPERTS)
    assert out.dtype == mx.bfloat16
    want = naive_experts(rounded, np.array(x.astype(mx.float32)), np.array(indices))
    np.testing.assert_allclose(np.array(out.astype(mx.float32)), want, atol=2e-2, rtol=2e-2)


def test_a_compiled_grouped_dispatch_runs_the_same_blocks(gather_calls):
    """No shape follows the routing, so the dispatch compiles (a training step compiles)."""
    layer, x, indices = experts_layer(), mx.array(activations(MANY_TOKENS)), mx.array(routing(MANY_TOKENS))
    eager = layer.grouped(x, indices, EXPERTS)
    mx.eval(eager)
    eager_calls = list(gather_calls)
    # the routing is an input of the compiled function, as in a training step
    compiled = mx.compile(lambda x, indices: layer.grouped(x, indices, EXPERTS))(x, indices)
    np.testing.assert_allclose(np.array(compiled), np.array(eager), atol=1e-5, rtol=1e-5)
    assert gather_calls[len(eager_calls) :] == eager_calls


@pytest.mark.parametrize("tokens", [1, 7, MANY_TOKENS])
def test_the_blocked_layout_holds_every_pair_once_and_each_block_one_expert(tokens):
    indices = mx.array(routing(MANY_TOKENS))[:tokens]
    blocks = blocks_for(indices, EXPERTS)
    size, flat = blocks.size, np.array(indices).reshape(-1)
    slots, sources, experts = (np.array(a) for a in (blocks.slots, blocks.sources, blocks.experts))
    assert sorted(set(slots.tolist())) == sorted(slots.tolist())  # a row per pair
    np.testing.assert_array_equal(sources[slots], np.arange(flat.size) // indices.shape[-1])
    np.testing.assert_array_equal(experts[slots // size], flat)  # each pair in its expert's block
    padding = np.setdiff1d(np.arange(sources.size), slots)
    assert np.all(sources[padding] == tokens)  # the zero row
    assert np.all(np.diff(experts.astype(int)) >= 0)
    segments = np.array(blocks.segments)
    for e in range(EXPERTS):
        first, end = segments[e]
        assert first % size == 0 and end % size == 0
        assert end - first == -(-(flat == e).sum() // size) * size


def test_block_size_grows_with_each_experts_share_of_rows():
    assert block_size(64, 8) == MIN_BLOCK
    assert block_size(4096, 32) == 32
    assert block_size(1 << 20, 8) == 64
    assert block_size(4096, 64) == 16


def test_grouped_dispatch_runs_mxfp4_experts_with_their_biases_as_gather_does():
    """gpt-oss's experts: mxfp4 weights (no affine biases), a bias per expert, clamped SwiGLU."""
    mx.random.seed(10)
    layer = SwitchExperts(HIDDEN, FFN, EXPERTS, bias=True, swiglu=(1.702, 7.0))
    for name in ("gate_proj", "up_proj", "down_proj"):
        layer[name].bias = mx.random.normal(layer[name].bias.shape)
        setattr(layer, name, layer[name].to_quantized(group_size=32, bits=4, mode="mxfp4"))
    x, indices = mx.array(activations(MANY_TOKENS)), mx.array(routing(MANY_TOKENS))
    want = np.array(layer(x, indices))
    np.testing.assert_allclose(np.array(layer.grouped(x, indices, EXPERTS)), want, atol=1e-5, rtol=1e-5)
