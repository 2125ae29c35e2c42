"""How SwitchExperts hands tokens to MLX's gather kernels, and what comes back.

The CPU ``gather_mm`` broadcasts activations [T, 1, D] against indices [T, 1] into a
[T, T, 1, F] result: T times the work, silently. These tests pin the two layouts we use
instead, and check outputs and gradients against naive per-token loops (numpy for outputs,
plain MLX matmuls for gradients).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlxmoe.config import MoEArgs
from mlxmoe.nn.moe import SORT_THRESHOLD, SparseMoE, SwitchExperts

HIDDEN, FFN, EXPERTS, TOP_K = 64, 32, 6, 2
GROUP = 32  # the smallest group size MLX quantizes with; divides HIDDEN and FFN
FEW_TOKENS = 5  # T * k below SORT_THRESHOLD: tokens stay in place
MANY_TOKENS = 40  # T * k at or above it: rows sorted by expert
assert FEW_TOKENS * TOP_K < SORT_THRESHOLD <= MANY_TOKENS * TOP_K


def routing(tokens: int, seed: int = 0, experts: int = EXPERTS) -> np.ndarray:
    """top-k distinct experts per token, leaving the last expert unused."""
    scores = np.random.default_rng(seed).random((tokens, experts))
    scores[:, -1] = -1.0
    return np.argsort(-scores, axis=1)[:, :TOP_K].astype(np.uint32)


def activations(tokens: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((tokens, HIDDEN)).astype(np.float32)


def experts_layer(seed: int = 2) -> SwitchExperts:
    mx.random.seed(seed)
    layer = SwitchExperts(HIDDEN, FFN, EXPERTS)
    mx.eval(layer.parameters())
    return layer


def naive_experts(layer: SwitchExperts, x: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """One token and one chosen expert at a time, in float64."""
    wg, wu, wd = (np.array(layer[n].weight, dtype=np.float64) for n in ("gate_proj", "up_proj", "down_proj"))
    out = np.zeros(indices.shape + (HIDDEN,))
    for t, chosen in enumerate(indices):
        for j, e in enumerate(chosen):
            g, u = wg[e] @ x[t], wu[e] @ x[t]
            out[t, j] = wd[e] @ (g / (1 + np.exp(-g)) * u)
    return out


def test_the_gather_kernel_broadcasts_tokens_against_tokens_given_t_1_d_and_t_1():
    # The trap itself, so the shape assertions below guard against something real.
    t = 4
    out = mx.gather_mm(
        mx.zeros((t, 1, HIDDEN)),
        mx.zeros((EXPERTS, HIDDEN, FFN)),
        rhs_indices=mx.zeros((t, 1), dtype=mx.uint32),
    )
    assert out.shape == (t, t, 1, FFN)


def test_many_tokens_are_dispatched_as_one_row_per_token_expert_pair_sorted_by_expert():
    x, indices = activations(MANY_TOKENS), routing(MANY_TOKENS)
    rows, experts, restore, do_sort = SwitchExperts.dispatch(mx.array(x), mx.array(indices))

    n = MANY_TOKENS * TOP_K
    assert do_sort
    assert rows.shape == (n, 1, HIDDEN)
    assert experts.shape == (n,)
    assert np.all(np.diff(np.array(experts).astype(np.int64)) >= 0)
    # row i is the token whose pair landed at position i; restore undoes the sort
    pair_of_row = np.argsort(np.array(restore))
    np.testing.assert_array_equal(np.array(rows)[:, 0], x[pair_of_row // TOP_K])
    np.testing.assert_array_equal(np.array(experts), indices.flatten()[pair_of_row])


def test_few_tokens_stay_in_place_as_t_1_1_d_with_t_k_indices():
    x, indices = activations(FEW_TOKENS), routing(FEW_TOKENS)
    rows, experts, restore, do_sort = SwitchExperts.dispatch(mx.array(x), mx.array(indices))

    assert not do_sort and restore is None
    assert rows.shape == (FEW_TOKENS, 1, 1, HIDDEN)
    assert experts.shape == (FEW_TOKENS, TOP_K)
    np.testing.assert_array_equal(np.array(rows)[:, 0, 0], x)


@pytest.mark.parametrize(
    "batch, tokens",
    [((), FEW_TOKENS), ((), MANY_TOKENS), ((2,), FEW_TOKENS // 2 + 1), ((2,), MANY_TOKENS)],
)
@pytest.mark.parametrize("bits", [None, 4])
def test_projections_never_carry_a_token_by_token_factor(gather_calls, batch, tokens, bits):
    layer = experts_layer()
    if bits:
        nn.quantize(layer, group_size=GROUP, bits=bits)
    n_tokens = int(np.prod(batch, dtype=int)) * tokens
    x = mx.array(activations(n_tokens)).reshape(*batch, tokens, HIDDEN)
    indices = mx.array(routing(x.size // HIDDEN)).reshape(*batch, tokens, TOP_K)
    mx.eval(layer(x, indices))

    gate, up, down = gather_calls
    pairs = indices.size
    sorted_path = pairs >= SORT_THRESHOLD
    expected_rows = (pairs,) if sorted_path else (*batch, tokens, TOP_K)
    assert gate[1] == expected_rows
    assert gate[2] == (*expected_rows, 1, FFN)
    assert up[2] == (*expected_rows, 1, FFN)
    assert down[2] == (*expected_rows, 1, HIDDEN)
    for a_shape, _, out_shape in gather_calls:
        assert a_shape[-2] == 1
        assert np.prod(out_shape) == pairs * out_shape[-1]  # one row per (token, expert)


@pytest.mark.parametrize("tokens", [FEW_TOKENS, MANY_TOKENS], ids=["in-place", "sorted"])
def test_output_equals_a_per_token_loop_over_the_chosen_experts(tokens):
    layer, x, indices = experts_layer(), activations(tokens), routing(tokens)
    out = layer(mx.array(x), mx.array(indices))
    assert out.shape == (tokens, TOP_K, HIDDEN)
    want = naive_experts(layer, x, indices)
    np.testing.assert_allclose(np.array(out), want, atol=1e-5, rtol=1e-5)


def test_batched_input_gives_the_same_rows_as_flattened_input():
    layer, x, indices = experts_layer(), activations(MANY_TOKENS), routing(MANY_TOKENS)
    flat = layer(mx.array(x), mx.array(indices))
    batched = layer(mx.array(x).reshape(2, -1, HIDDEN), mx.array(indices).reshape(2, -1, TOP_K))
    np.testing.assert_allclose(np.array(batched).reshape(flat.shape), np.array(flat), atol=1e-6)


def naive_experts_mx(params: dict, x: mx.array, indices: np.ndarray) -> mx.array:
    """The same loop in MLX with plain matmuls, so MLX can differentiate it."""
    rows = []
    for t, chosen in enumerate(indices):
        for e in chosen.tolist():
            xt = x[t]
            g = params["gate_proj"]["weight"][e] @ xt
            u = params["up_proj"]["weight"][e] @ xt
            rows.append(params["down_proj"]["weight"][e] @ (nn.silu(g) * u))
    return mx.stack(rows).reshape(*indices.shape, HIDDEN)


@pytest.mark.parametrize("tokens", [FEW_TOKENS, MANY_TOKENS], ids=["in-place", "sorted"])
def test_gradients_reach_chosen_expert_weights_and_activations(tokens):
    layer, indices = experts_layer(), routing(tokens)
    x = mx.array(activations(tokens))
    cotangent = mx.array(np.random.default_rng(3).standard_normal((tokens, TOP_K, HIDDEN)), dtype=mx.float32)

    def loss(params, x):
        layer.update(params)
        return (layer(x, mx.array(indices)) * cotangent).sum()

    def reference(params, x):
        return (naive_experts_mx(params, x, indices) * cotangent).sum()

    params = layer.trainable_parameters()
    grads, dx = mx.grad(loss, argnums=(0, 1))(params, x)
    ref_grads, ref_dx = mx.grad(reference, argnums=(0, 1))(params, x)

    np.testing.assert_allclose(np.array(dx), np.array(ref_dx), atol=1e-5, rtol=1e-4)
    unused = EXPERTS - 1
    for name in ("gate_proj", "up_proj", "down_proj"):
        g, ref = np.array(grads[name]["weight"]), np.array(ref_grads[name]["weight"])
        np.testing.assert_allclose(g, ref, atol=1e-5, rtol=1e-4)
        assert np.all(np.abs(g[:unused]).max(axis=(1, 2)) > 0), f"{name}: a chosen expert got none"
        assert np.all(g[unused] == 0), f"{name}: an expert nobody chose got a gradient"


def moe_args(norm_topk_prob: bool) -> MoEArgs:
    return MoEArgs(
        model_type="qwen3_moe",
        vocab_size=32,
        hidden_size=HIDDEN,
        num_layers=1,
        num_heads=2,
        num_kv_heads=2,
        head_dim=HIDDEN // 2,
        intermediate_size=0,
        rms_norm_eps=1e-6,
        rope_theta=1e4,
        rope_scaling=None,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        num_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        moe_intermediate_size=FFN,
        norm_topk_prob=norm_topk_prob,
    )


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_router_gradient_comes_through_the_routing_weights_only(norm_topk_prob):
    """The expert choice is a constant of the backward pass: differentiating the whole layer
    gives the same router gradient as differentiating it with the choice fixed beforehand."""
    mx.random.seed(4)
    moe = SparseMoE(moe_args(norm_topk_prob))
    moe.router.weight = mx.random.normal((EXPERTS, HIDDEN)) * 0.5
    x = mx.array(activations(MANY_TOKENS))
    _, chosen, _ = moe.router(x)
    chosen = np.array(chosen)

    def loss(params):
        moe.update(params)
        return moe(x)[0].sum()

    def fixed_choice(params):
        probs = mx.softmax(x @ params["router"]["weight"].T, axis=-1)
        weights = mx.take_along_axis(probs, mx.array(chosen), axis=-1)
        if norm_topk_prob:
            weights = weights / weights.sum(axis=-1, keepdims=True)
        ys = naive_experts_mx(params["experts"], x, chosen)
        return (ys * weights[..., None]).sum()

    params = moe.trainable_parameters()
    got = mx.grad(loss)(params)["router"]["weight"]
    want = mx.grad(fixed_choice)(params)["router"]["weight"]
    assert np.abs(np.array(want)).max() > 0
    np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("tokens", [FEW_TOKENS, MANY_TOKENS], ids=["in-place", "sorted"])
# Affine steps are 1/15 (4-bit) or 1/255 (8-bit) of each group's range: on these uniform
# random weights that is ~11% and ~0.6% relative error in the output.
@pytest.mark.parametrize("bits, max_rel_err", [(4, 0.15), (8, 0.01)])
def test_quantized_experts_stay_close_to_float(tokens, bits, max_rel_err):
    layer, x, indices = experts_layer(), mx.array(activations(tokens)), mx.array(routing(tokens))
    want = np.array(layer(x, indices))
    nn.quantize(layer, group_size=GROUP, bits=bits)
    got = np.array(layer(x, indices))
    rel_err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel_err < max_rel_err


# --- the dense dispatch: every expert on every token, weighted by the routing ---------------


def dense_and_gather_grads(
    moe: SparseMoE, x: mx.array, cotangent: mx.array, dispatches=("gather", "dense")
) -> dict:
    """{dispatch: (output, gradients of every trainable parameter)}."""
    out = {}
    for dispatch in dispatches:
        moe.dispatch = dispatch

        def loss(params):
            moe.update(params)
            return (moe(x)[0] * cotangent).sum()

        params = moe.trainable_parameters()
        _, grads = mx.value_and_grad(loss)(params)
        out[dispatch] = (moe(x)[0], grads)
    moe.dispatch = "gather"
    return out


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_dense_dispatch_computes_the_chosen_experts_only_with_their_gradients(norm_topk_prob):
    mx.random.seed(5)
    moe = SparseMoE(moe_args(norm_topk_prob))
    # Feature 0 is large in every token and pushes the last expert's logit far down: no
    # token chooses it, so its weights must get exactly no gradient.
    router = np.array(mx.random.normal((EXPERTS, HIDDEN))) * 0.5
    router[:, 0], router[-1, 0] = 1.0, -5.0
    moe.router.weight = mx.array(router)
    x_np = activations(MANY_TOKENS)
    x_np[:, 0] = 4.0
    x = mx.array(x_np)
    _, chosen, weights = moe.router(x)
    chosen = np.array(chosen)
    assert not (chosen == EXPERTS - 1).any()
    moe.dispatch = "dense"
    want = (naive_experts(moe.experts, np.array(x), chosen) * np.array(weights)[..., None]).sum(1)
    np.testing.assert_allclose(np.array(moe(x)[0]), want, atol=1e-5, rtol=1e-5)

    def fixed_choice(params):
        probs = mx.softmax(x @ params["router"]["weight"].T, axis=-1)
        w = mx.take_along_axis(probs, mx.array(chosen), axis=-1)
        if norm_topk_prob:
            w = w / w.sum(axis=-1, keepdims=True)
        return (naive_experts_mx(params["experts"], x, chosen) * w[..., None]).sum()

    def loss(params):
        moe.update(params)
        return moe(x)[0].sum()

    params = moe.trainable_parameters()
    got, ref = mx.grad(loss)(params), mx.grad(fixed_choice)(params)
    for name in ("gate_proj", "up_proj", "down_proj"):
        g = np.array(got["experts"][name]["weight"])
        np.testing.assert_allclose(g, np.array(ref["experts"][name]["weight"]), atol=1e-5, rtol=1e-4)
        unchosen = sorted(set(range(EXPERTS)) - set(chosen.flatten().tolist()))
        assert all(np.all(g[e] == 0) for e in unchosen), f"{name}: an unchosen expert got a gradient"
    np.testing.assert_allclose(
        np.array(got["router"]["weight"]), np.array(ref["router"]["weight"]), atol=1e-5, rtol=1e-4
    )


def test_dense_dispatch_equals_gather_with_expert_lora_and_a_shared_expert():
    from mlxmoe.adapt.lora import LoRAExperts

    mx.random.seed(6)
    args = moe_args(True)
    args.shared_expert_intermediate_size = FFN
    moe = SparseMoE(args)
    moe.router.weight = mx.random.normal((EXPERTS, HIDDEN)) * 0.5
    for name in ("gate_proj", "up_proj", "down_proj"):
        lora = LoRAExperts(moe.experts[name], rank=4, alpha=8)
        lora.lora_b = mx.random.normal(lora.lora_b.shape) * 0.1
        setattr(moe.experts, name, lora)
    moe.router.freeze()
    x = mx.array(activations(MANY_TOKENS))
    cotangent = mx.array(np.random.default_rng(7).standard_normal((MANY_TOKENS, HIDDEN)), mx.float32)
    runs = dense_and_gather_grads(moe, x, cotangent)
    (y_gather, g_gather), (y_dense, g_dense) = runs["gather"], runs["dense"]
    np.testing.assert_allclose(np.array(y_dense), np.array(y_gather), atol=1e-5, rtol=1e-5)
    from mlx.utils import tree_flatten

    flat_gather, flat_dense = dict(tree_flatten(g_gather)), dict(tree_flatten(g_dense))
    assert any("lora_a" in k for k in flat_gather) and flat_gather.keys() == flat_dense.keys()
    for key, value in flat_gather.items():
        np.testing.assert_allclose(
            np.array(flat_dense[key]), np.array(value), atol=1e-5, rtol=1e-4, err_msg=key
        )


@pytest.mark.skipif(
    mx.default_device() != mx.cpu,
    reason="auto is dense or grouped only on MLX's CPU backend (test_platform simulates both)",
)
def test_auto_dispatch_on_the_cpu_with_a_fast_blas_is_dense_for_large_float_experts_else_grouped(monkeypatch):
    from mlxmoe import blas
    from mlxmoe.nn.moe import set_dispatch

    wide = moe_args(True)
    wide.moe_intermediate_size = 16384  # 64 x 16384 experts: 4 MiB, beyond gather's cache
    moe = SparseMoE(wide)
    monkeypatch.setattr(blas, "loaded_blas", lambda: "bundled")
    assert set_dispatch(moe, "auto") == "gather" and moe.dispatch == "gather"
    monkeypatch.setattr(blas, "loaded_blas", lambda: "/usr/lib/libopenblas.so.0")
    assert set_dispatch(moe, "auto") == "dense" and moe.dispatch == "dense"
    assert set_dispatch(SparseMoE(moe_args(True)), "auto") == "grouped"  # 64 x 32: too small for dense
    mid = moe_args(True)
    mid.moe_intermediate_size = 2048  # 64 x 2048: 512 KiB, dense pays at E/k 3, not at 4
    assert set_dispatch(SparseMoE(mid), "auto") == "dense"
    mid.num_experts = 8
    assert set_dispatch(SparseMoE(mid), "auto") == "grouped"
    many = moe_args(True)
    many.moe_intermediate_size = 16384
    many.num_experts, many.num_experts_per_tok = 64, 2  # 32x the work of gather: not worth it
    assert set_dispatch(SparseMoE(many), "auto") == "grouped"
    quantized = SparseMoE(wide)
    nn.quantize(quantized.experts, group_size=GROUP, bits=4)
    assert set_dispatch(quantized, "auto") == "grouped"
    bfloat16 = SparseMoE(wide)
    bfloat16.set_dtype(mx.bfloat16)  # a BLAS multiplies float32 only: dense never pays
    assert set_dispatch(bfloat16, "auto") == "grouped"
    monkeypatch.setattr(blas, "loaded_blas", lambda: "bundled")
    assert set_dispatch(quantized, "auto") == "gather"
    with pytest.raises(ValueError, match="needs float experts"):
        set_dispatch(quantized, "dense")
    with pytest.raises(ValueError, match="auto, gather, dense, grouped"):
        set_dispatch(moe, "sparse")


def test_dense_dispatch_decodes_a_few_tokens_with_gather(gather_calls):
    """Decoding reads weights for a token or two: dense would read all E experts' weights."""
    moe = SparseMoE(moe_args(True))
    moe.dispatch = "dense"
    moe(mx.array(activations(FEW_TOKENS)))
    assert len(gather_calls) == 3  # gate, up, down through gather_mm
    gather_calls.clear()
    moe(mx.array(activations(MANY_TOKENS)))
    assert gather_calls == []
