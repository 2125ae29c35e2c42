"""Training losses: the aux loss is transformers' own, z-loss and cross-entropy match numpy,
the chunked LM-head loss matches torch."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from transformers.models.mixtral import modeling_mixtral
from transformers.models.qwen2_moe import modeling_qwen2_moe

from mlxmoe.losses import (
    cross_entropy,
    expert_counts,
    head_cross_entropy,
    linear_cross_entropy,
    load_balancing_loss,
    router_entropy,
    router_z_loss,
)
from mlxmoe.nn.moe import Router

B, L = 3, 7


def random_router_logits(n_layers: int, num_experts: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=(n_layers, B, L, num_experts)) * 2).astype(np.float32)


def padding_mask(seed: int = 1) -> np.ndarray:
    mask = (np.random.default_rng(seed).random((B, L)) > 0.3).astype(np.int64)
    mask[:, 0] = 1
    mask[1, -3:] = 0  # right padding
    mask[2, :2] = 0  # left padding
    return mask


def ours(x: np.ndarray) -> list[mx.array]:
    return [mx.array(layer) for layer in x]


def transformers_aux(func, x: np.ndarray, top_k: int, mask: np.ndarray | None) -> float:
    n_layers, b, seq, num_experts = x.shape
    gate_logits = tuple(torch.from_numpy(layer.reshape(b * seq, num_experts)) for layer in x)
    attention_mask = None if mask is None else torch.from_numpy(mask)
    return func(gate_logits, num_experts, top_k, attention_mask).item()


@pytest.mark.parametrize("module", [modeling_mixtral, modeling_qwen2_moe], ids=["mixtral", "qwen2"])
@pytest.mark.parametrize("padded", [False, True], ids=["no-padding", "padding"])
@pytest.mark.parametrize("n_layers, num_experts, top_k", [(1, 4, 1), (3, 8, 2), (2, 60, 4), (4, 128, 8)])
def test_load_balancing_loss_equals_transformers(module, padded, n_layers, num_experts, top_k):
    x = random_router_logits(n_layers, num_experts, seed=num_experts)
    mask = padding_mask() if padded else None
    expected = transformers_aux(module.load_balancing_loss_func, x, top_k, mask)
    got = load_balancing_loss(ours(x), top_k, None if mask is None else mx.array(mask)).item()
    # float32 sums in another order: a few ulp apart (worst seen 4.7e-7 relative)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_load_balancing_loss_gradient_reaches_router_logits_but_not_padding():
    x = random_router_logits(3, 8)
    mask = mx.array(padding_mask())
    grads = mx.grad(lambda logits: load_balancing_loss(logits, 2, mask))(ours(x))
    for g in grads:
        g = np.array(g)
        assert np.isfinite(g).all()
        assert np.abs(g[np.array(mask) == 1]).max() > 1e-4
        assert np.abs(g[np.array(mask) == 0]).max() == 0.0


@pytest.mark.parametrize("num_experts, top_k", [(4, 1), (8, 2), (60, 4)])
def test_load_balancing_loss_is_top_k_for_balanced_routing(num_experts, top_k):
    # Uniform probabilities: P_e = 1/E whatever the tie-break, so aux = E * sum_e f_e / E = k.
    uniform = [mx.zeros((B, L, num_experts))]
    assert load_balancing_loss(uniform, top_k).item() == pytest.approx(top_k, abs=1e-6)
    # Token t prefers experts t..t+k-1 (mod E): every expert gets k tokens, P averages 1/E.
    logits = np.zeros((1, num_experts, num_experts), dtype=np.float32)
    for t in range(num_experts):
        logits[0, t, [(t + j) % num_experts for j in range(top_k)]] = 5.0
    assert load_balancing_loss([mx.array(logits)], top_k).item() == pytest.approx(top_k, abs=1e-5)


@pytest.mark.parametrize("num_experts, top_k", [(4, 1), (8, 2), (60, 4)])
def test_load_balancing_loss_is_num_experts_when_routing_collapses(num_experts, top_k):
    logits = np.zeros((B, L, num_experts), dtype=np.float32)
    logits[..., :top_k] = 40.0  # every token: probability 1/k on experts 0..k-1
    got = load_balancing_loss([mx.array(logits)], top_k).item()
    assert got == pytest.approx(num_experts, rel=1e-5)


def test_load_balancing_loss_pools_layers_so_opposite_collapses_look_balanced():
    # transformers' definition: layer 0 all on expert 0, layer 1 all on expert 1 reads as balanced.
    to_0 = np.tile(np.array([20.0, -20.0], dtype=np.float32), (B, L, 1))
    layers = np.stack([to_0, to_0[..., ::-1]])
    assert load_balancing_loss(ours(layers[:1]), 1).item() == pytest.approx(2.0, abs=1e-6)
    assert load_balancing_loss(ours(layers), 1).item() == pytest.approx(1.0, abs=1e-6)
    expected = transformers_aux(modeling_mixtral.load_balancing_loss_func, layers, 1, None)
    assert expected == pytest.approx(1.0, abs=1e-6)


def test_load_balancing_loss_can_go_below_its_balanced_value():
    # 60% of tokens barely pick expert 0, 40% surely pick expert 1: f=(.6,.4), P~(.3,.7) -> 0.92.
    logits = np.zeros((1, 10, 2), dtype=np.float32)
    logits[0, :6] = [1e-3, 0.0]
    logits[0, 6:] = [-20.0, 20.0]
    assert load_balancing_loss([mx.array(logits)], 1).item() == pytest.approx(0.92, abs=1e-3)


def test_router_z_loss_matches_numpy_and_ignores_padding():
    x = random_router_logits(3, 8) * 3
    mask = padding_mask()
    lse = np.log(np.exp(x.astype(np.float64)).sum(-1))  # [layers, B, L]
    expected = (lse**2 * mask).sum() / (3 * mask.sum())
    got = router_z_loss(ours(x), mx.array(mask)).item()
    assert got == pytest.approx(expected, rel=1e-5)
    x[:, mask == 0] = 1e4  # what the padding holds must not matter
    assert router_z_loss(ours(x), mx.array(mask)).item() == pytest.approx(expected, rel=1e-5)


def test_router_z_loss_of_equal_logits_is_log_num_experts_squared():
    logits = [mx.zeros((B, L, 8)), mx.zeros((B, L, 8))]
    assert router_z_loss(logits).item() == pytest.approx(math.log(8) ** 2, rel=1e-6)


def numpy_cross_entropy(logits: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> float:
    z = logits.astype(np.float64)
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    picked = np.take_along_axis(z, targets[..., None], axis=-1)[..., 0]
    return float(((lse - picked) * mask).sum() / mask.sum())


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
def test_cross_entropy_equals_numpy_over_answer_tokens(dtype):
    rng = np.random.default_rng(5)
    logits = mx.array(rng.normal(size=(B, L, 50)).astype(np.float32) * 4).astype(dtype)
    targets = rng.integers(0, 50, size=(B, L))
    mask = padding_mask(seed=6)
    expected = numpy_cross_entropy(np.array(logits.astype(mx.float32)), targets, mask)
    got = cross_entropy(logits, mx.array(targets), mx.array(mask))
    assert got.dtype == mx.float32
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_cross_entropy_ignores_masked_positions():
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(B, L, 50)).astype(np.float32)
    targets = rng.integers(0, 50, size=(B, L))
    mask = padding_mask(seed=8)
    before = cross_entropy(mx.array(logits), mx.array(targets), mx.array(mask)).item()
    logits[mask == 0] = rng.normal(size=logits[mask == 0].shape) * 100
    targets[mask == 0] = -100  # an ignore id on masked positions is fine
    after = cross_entropy(mx.array(logits), mx.array(targets), mx.array(mask)).item()
    assert after == before


def test_expert_counts_sum_to_top_k_per_real_token_and_follow_the_top_k():
    x = random_router_logits(3, 8)
    mask = padding_mask()
    counts = np.array(expert_counts(ours(x), 2, mx.array(mask)))
    assert counts.shape == (3, 8) and counts.dtype == np.float32
    np.testing.assert_array_equal(counts.sum(axis=1), 2 * mask.sum())
    top2 = np.argsort(-x, axis=-1)[..., :2]  # [layers, B, L, 2]
    for layer in range(3):
        expected = np.bincount(top2[layer][mask == 1].ravel(), minlength=8)
        np.testing.assert_array_equal(counts[layer], expected)


def test_expert_counts_count_the_experts_the_router_picks():
    router = Router(hidden_size=16, num_experts=6, top_k=2, normalize_top_k=False)
    router.weight = mx.random.normal((6, 16), key=mx.random.key(0))
    logits, indices, _ = router(mx.random.normal((B, L, 16), key=mx.random.key(1)))
    expected = np.bincount(np.array(indices).ravel(), minlength=6)
    np.testing.assert_array_equal(np.array(expert_counts([logits], 2))[0], expected)


def test_router_entropy_is_log_e_when_undecided_and_near_zero_when_sure():
    sure = np.full((B, L, 8), -30.0, dtype=np.float32)
    sure[..., 3] = 30.0
    entropy = np.array(router_entropy([mx.zeros((B, L, 8)), mx.array(sure)]))
    assert entropy.shape == (2,)
    assert entropy[0] == pytest.approx(math.log(8), rel=1e-6)
    assert entropy[1] < 1e-6


def test_all_padding_gives_zero_not_nan():
    mask = mx.zeros((B, L))
    logits = [mx.array(random_router_logits(1, 4)[0])]
    assert load_balancing_loss(logits, 2, mask).item() == 0.0
    assert router_z_loss(logits, mask).item() == 0.0
    assert cross_entropy(mx.zeros((B, L, 5)), mx.zeros((B, L), mx.int32), mask).item() == 0.0


def test_bad_shapes_and_top_k_are_refused():
    logits = [mx.zeros((B, L, 4))]
    with pytest.raises(ValueError, match="top_k"):
        load_balancing_loss(logits, 5)
    with pytest.raises(ValueError, match="token_mask"):
        router_z_loss(logits, mx.ones((B, L + 1)))
    with pytest.raises(ValueError, match="layer 0"):
        expert_counts([mx.zeros((B, L, 4)), mx.zeros((B, L, 6))], 2)


# --- the chunked LM-head loss ----------------------------------------------------------------

N_ROWS, HIDDEN, VOCAB = 300, 64, 5000  # 300 rows: 10 chunks of 32, the last one short


def lm_heads() -> dict[str, tuple[object, np.ndarray]]:
    """Each kind of LM head the model can have, with its weight [V, D] as float32."""
    mx.random.seed(3)
    linear = nn.Linear(HIDDEN, VOCAB, bias=False)
    quantized = nn.QuantizedLinear.from_linear(linear, group_size=64, bits=4)
    embedding = nn.Embedding(VOCAB, HIDDEN)
    q_embedding = nn.QuantizedEmbedding.from_embedding(embedding, group_size=64, bits=8)

    def dequantized(layer) -> np.ndarray:
        return np.array(mx.dequantize(layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits))

    return {
        "linear": (linear, np.array(linear.weight)),
        "4-bit linear": (quantized, dequantized(quantized)),
        "tied embedding": (embedding.as_linear, np.array(embedding.weight)),
        "8-bit tied embedding": (q_embedding.as_linear, dequantized(q_embedding)),
    }


def torch_weighted_ce_and_grad(x, a, head_weight, targets, weight):
    """sum_t w_t * CE(head(x_t @ A), y_t) and its gradient with respect to A, in torch."""
    a_t = torch.tensor(a, dtype=torch.float64, requires_grad=True)
    logits = (torch.tensor(x, dtype=torch.float64) @ a_t) @ torch.tensor(head_weight, dtype=torch.float64).T
    per_token = torch.nn.functional.cross_entropy(logits, torch.tensor(targets).long(), reduction="none")
    loss = (per_token * torch.tensor(weight, dtype=torch.float64)).sum()
    loss.backward()
    return loss.item(), a_t.grad.numpy()


@pytest.mark.parametrize("head", ["linear", "4-bit linear", "tied embedding", "8-bit tied embedding"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_linear_cross_entropy_value_and_gradient_equal_torch(head, compiled):
    project, head_weight = lm_heads()[head]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N_ROWS, HIDDEN)).astype(np.float32)
    a = (rng.normal(size=(HIDDEN, HIDDEN)) * 0.3).astype(np.float32)
    targets = rng.integers(0, VOCAB, N_ROWS).astype(np.int32)
    weight = (rng.random(N_ROWS) > 0.2).astype(np.float32)  # padding rows weigh 0

    def loss(a_mx):
        h = mx.array(x) @ a_mx
        return linear_cross_entropy(h, project, mx.array(targets), mx.array(weight), VOCAB)

    value_and_grad = mx.value_and_grad(loss)
    if compiled:
        value_and_grad = mx.compile(value_and_grad)
    value, grad = value_and_grad(mx.array(a))
    expected_value, expected_grad = torch_weighted_ce_and_grad(x, a, head_weight, targets, weight)
    assert value.item() == pytest.approx(expected_value, rel=1e-5)
    np.testing.assert_allclose(
        np.array(grad), expected_grad, rtol=1e-4, atol=1e-4 * np.abs(expected_grad).max()
    )


@pytest.mark.slow
def test_linear_cross_entropy_memory_does_not_grow_with_the_answer_tokens():
    vocab, hidden = 32000, 8  # a narrow head: the memory is the logits', the time the matmuls'

    def peaks(rows: int) -> tuple[int, int]:
        """Peak bytes of the gradient computation: chunked loss, loss on full logits."""
        mx.random.seed(0)
        head = nn.Linear(hidden, vocab, bias=False)
        h = mx.random.normal((rows, hidden))
        targets = mx.random.randint(0, vocab, (rows,)).astype(mx.int32)
        weight = mx.ones((rows,))
        mx.eval(head.parameters(), h, targets)

        def peak(loss) -> int:
            mx.synchronize()
            mx.reset_peak_memory()
            before = mx.get_active_memory()
            mx.eval(mx.grad(loss)(h))
            return mx.get_peak_memory() - before

        return (
            peak(lambda h: linear_cross_entropy(h, head, targets, weight, vocab)),
            peak(lambda h: cross_entropy(head(h)[None], targets[None], weight[None])),
        )

    (chunked_1k, full_1k), (chunked_4k, full_4k) = peaks(1024), peaks(4096)
    logits_4k = 4096 * vocab * 4  # 500 MiB of float32
    print(
        f"gradient peak at 4096 answer tokens x {vocab} vocabulary: chunked {chunked_4k / 2**20:.0f} MiB, "
        f"full logits {full_4k / 2**20:.0f} MiB "
        f"(1024 tokens: {chunked_1k / 2**20:.0f} / {full_1k / 2**20:.0f})"
    )
    assert full_4k > 2 * logits_4k and full_4k > 3.5 * full_1k  # logits, softmax, gradient
    assert chunked_4k - chunked_1k < 16 << 20  # a few MiB of gradient rows, no logits
    assert chunked_4k < logits_4k / 4


def test_head_cross_entropy_is_linear_cross_entropys_value():
    project, head_weight = lm_heads()["4-bit linear"]
    rng = np.random.default_rng(5)
    x = rng.normal(size=(N_ROWS, HIDDEN)).astype(np.float32)
    targets = rng.integers(0, VOCAB, N_ROWS).astype(np.int32)
    weight = (rng.random(N_ROWS) > 0.2).astype(np.float32)
    expected, _ = torch_weighted_ce_and_grad(
        x, np.eye(HIDDEN, dtype=np.float32), head_weight, targets, weight
    )
    value = head_cross_entropy(mx.array(x), project, mx.array(targets), mx.array(weight), VOCAB)
    assert value.item() == pytest.approx(expected, rel=1e-5)
