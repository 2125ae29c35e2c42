"""The Gated DeltaNet layer (Qwen3-Next, Qwen3.5) is transformers' layer, in both its forms."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from transformers.models.qwen3_5_moe import configuration_qwen3_5_moe, modeling_qwen3_5_moe
from transformers.models.qwen3_next import configuration_qwen3_next, modeling_qwen3_next

from mlxmoe.config import ConfigView
from mlxmoe.nn.gated_deltanet import DeltaNetArgs, DeltaNetCache, GatedDeltaNet, unit_lower_inverse

# family -> (config class, layer class, fused projections)
FAMILIES = {
    "qwen3_next": (
        configuration_qwen3_next.Qwen3NextConfig,
        modeling_qwen3_next.Qwen3NextGatedDeltaNet,
        True,
    ),
    "qwen3_5_moe": (
        configuration_qwen3_5_moe.Qwen3_5MoeTextConfig,
        modeling_qwen3_5_moe.Qwen3_5MoeGatedDeltaNet,
        False,
    ),
}
# Two value heads per key head and Dk != Dv, so that a wrong head grouping or split shows.
TINY = dict(
    hidden_size=48,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=8,
    linear_conv_kernel_dim=4,
    rms_norm_eps=1e-6,
    num_hidden_layers=1,
    layer_types=["linear_attention"],
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    vocab_size=32,
)
CHUNK = 64


def make_reference(family: str, seed: int = 0) -> tuple[torch.nn.Module, DeltaNetArgs]:
    config_cls, layer_cls, fused = FAMILIES[family]
    config = config_cls(**TINY)
    torch.manual_seed(seed)
    layer = layer_cls(config, layer_idx=0).float()
    with torch.no_grad():
        for name, param in layer.named_parameters():
            # Decays from mild to strong, so that state carried across chunks matters
            if name == "A_log":
                param.copy_(torch.log(torch.empty_like(param).uniform_(0.05, 3.0)))
            elif name in ("dt_bias", "norm.weight"):
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            elif name == "conv1d.weight":
                param.copy_(0.5 * torch.randn_like(param))
            else:
                param.copy_(torch.randn_like(param) / param.shape[1] ** 0.5)
    args = DeltaNetArgs.from_config(ConfigView(config.to_dict()), fused_projections=fused)
    return layer, args


def ours_from(reference: torch.nn.Module, args: DeltaNetArgs) -> GatedDeltaNet:
    """Our layer with the reference's weights, copied by name."""
    layer = GatedDeltaNet(args)
    weights = []
    for name, param in reference.named_parameters():
        value = param.detach().numpy()
        if name == "conv1d.weight":  # torch [C, 1, K] -> nn.Conv1d's [C, K, 1]
            value = value.transpose(0, 2, 1)
        weights.append((name, mx.array(value)))
    layer.load_weights(weights, strict=True)
    mx.eval(layer.parameters())
    return layer


def hidden(batch: int, length: int, seed: int = 1) -> np.ndarray:
    shape = (batch, length, TINY["hidden_size"])
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def reference_forward(reference: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return reference(torch.from_numpy(x)).numpy()


def max_abs(a, b) -> float:
    a, b = (np.array(t.astype(mx.float32) if isinstance(t, mx.array) else t) for t in (a, b))
    return float(np.abs(a - b).max())


@pytest.mark.parametrize("length", [1, 37, CHUNK, 2 * CHUNK + 22])
@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_form_matches_transformers(family, length):
    reference, args = make_reference(family)
    layer = ours_from(reference, args)
    x = hidden(3, length)

    out = layer(mx.array(x))
    mx.eval(out)

    assert out.shape == x.shape and out.dtype == mx.float32
    assert max_abs(out, reference_forward(reference, x)) < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_token_by_token_recurrence_equals_the_chunked_form(family):
    reference, args = make_reference(family)
    layer = ours_from(reference, args)
    x = hidden(2, CHUNK + 11)
    cache = DeltaNetCache()

    steps = [layer(mx.array(x[:, t : t + 1]), cache=cache) for t in range(x.shape[1])]
    stepped = mx.concatenate(steps, axis=1)
    mx.eval(stepped)

    assert cache.offset == x.shape[1] and cache.recurrent_state.dtype == mx.float32
    assert max_abs(stepped, layer(mx.array(x))) < 1e-5
    assert max_abs(stepped, reference_forward(reference, x)) < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_then_decode_then_prefill_equals_the_full_sequence(family):
    """A prompt longer than a chunk, three decoded tokens, then a second prompt: the chunked
    form starts from the cached conv and recurrent states, the recurrence continues them."""
    reference, args = make_reference(family)
    layer = ours_from(reference, args)
    x = hidden(2, CHUNK + 9 + 3 + 20)
    cache = DeltaNetCache()

    pieces = [layer(mx.array(x[:, : CHUNK + 9]), cache=cache)]
    pieces += [layer(mx.array(x[:, t : t + 1]), cache=cache) for t in range(CHUNK + 9, CHUNK + 12)]
    pieces.append(layer(mx.array(x[:, CHUNK + 12 :]), cache=cache))
    out = mx.concatenate(pieces, axis=1)
    mx.eval(out)

    assert cache.offset == x.shape[1]
    assert cache.conv_state.shape == (2, args.conv_kernel_size - 1, args.conv_dim)
    assert max_abs(out, reference_forward(reference, x)) < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_match_torch_autograd(family):
    """mx.grad through the chunked form (two chunk boundaries, a padded last chunk) equals the
    gradient torch's autograd takes through transformers' layer, for every parameter and x."""
    reference, args = make_reference(family)
    layer = ours_from(reference, args)
    x = hidden(2, 2 * CHUNK + 22)
    cotangent = np.random.default_rng(2).standard_normal(x.shape).astype(np.float32)

    x_torch = torch.from_numpy(x).requires_grad_()
    (reference(x_torch) * torch.from_numpy(cotangent)).sum().backward()
    expected = {name: p.grad.numpy() for name, p in reference.named_parameters()}
    expected["conv1d.weight"] = expected["conv1d.weight"].transpose(0, 2, 1)
    expected["x"] = x_torch.grad.numpy()

    def loss(params, inputs):
        layer.update(params)
        return (layer(inputs) * mx.array(cotangent)).sum()

    param_grads, x_grad = mx.grad(loss, argnums=(0, 1))(layer.trainable_parameters(), mx.array(x))
    grads = dict(tree_flatten(param_grads), x=x_grad)
    mx.eval(grads)

    assert set(grads) == set(expected)
    for name, grad in grads.items():
        assert mx.all(mx.isfinite(grad)).item(), name
        scale = np.abs(expected[name]).max()
        assert max_abs(grad, expected[name]) < 1e-4 * max(scale, 1.0), name


def test_compiled_training_step_equals_the_eager_one():
    """The training loop compiles its step (``train.compile``): the layer must trace."""
    reference, args = make_reference("qwen3_next")
    layer = ours_from(reference, args)
    weights = layer.trainable_parameters()
    x = mx.array(hidden(2, CHUNK + 5))

    def loss(params, inputs):
        layer.update(params)
        out = layer(inputs)
        layer.update(weights)
        return (out * out).sum()

    step = mx.value_and_grad(loss)
    eager, compiled = step(weights, x), mx.compile(step)(weights, x)
    mx.eval(eager, compiled)

    for a, b in zip(tree_flatten(eager), tree_flatten(compiled)):
        assert a[0] == b[0] and max_abs(a[1], b[1]) < 1e-4 * max(float(mx.abs(a[1]).max()), 1.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_in_bfloat16_out_as_close_to_float32_as_transformers(family):
    """Weights and input in bfloat16; the state stays float32 (in the cache too)."""
    reference, args = make_reference(family)
    half = ours_from(reference, args)
    half.set_dtype(mx.bfloat16)
    x = hidden(2, CHUNK + 30)
    expected = reference_forward(reference, x)
    with torch.no_grad():
        reference_half = reference.to(torch.bfloat16)(torch.from_numpy(x).to(torch.bfloat16))
    reference_error = max_abs(reference_half.float().numpy(), expected)

    out = half(mx.array(x, dtype=mx.bfloat16))
    cache = DeltaNetCache()
    half(mx.array(x[:, :-1], dtype=mx.bfloat16), cache=cache)
    last = half(mx.array(x[:, -1:], dtype=mx.bfloat16), cache=cache)
    mx.eval(out, last)

    assert out.dtype == mx.bfloat16 and last.dtype == mx.bfloat16
    assert cache.recurrent_state.dtype == mx.float32
    assert cache.conv_state.dtype == mx.bfloat16
    assert max_abs(out, expected) < 2 * reference_error
    assert max_abs(last, expected[:, -1:]) < 2 * reference_error


class _TinyLM(nn.Module):
    """Embedding, one residual Gated DeltaNet, head: what mlx-lm's generation loop drives."""

    def __init__(self, layer: GatedDeltaNet, vocab: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab, TINY["hidden_size"])
        self.layers = [layer]
        self.head = nn.Linear(TINY["hidden_size"], vocab)

    def make_cache(self):
        return [DeltaNetCache()]

    def __call__(self, tokens, cache=None):
        x = self.embed(tokens)
        return self.head(x + self.layers[0](x, cache=cache[0] if cache else None))


def test_mlx_lm_generation_with_the_cache_gives_the_uncached_greedy_tokens():
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import can_trim_prompt_cache

    reference, args = make_reference("qwen3_5_moe")
    model = _TinyLM(ours_from(reference, args))
    mx.eval(model.parameters())
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9]

    generated = [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=6)]
    tokens = list(prompt)
    for _ in range(6):
        tokens.append(int(mx.argmax(model(mx.array([tokens]))[0, -1])))

    assert generated == tokens[len(prompt) :]
    assert not can_trim_prompt_cache(model.make_cache())  # a recurrent state cannot rewind


def test_block_inverse_equals_numpy_inverse():
    rng = np.random.default_rng(3)
    lower = np.tril(rng.uniform(-1, 1, (3, CHUNK, CHUNK)), -1).astype(np.float32) * 0.2
    expected = np.linalg.inv(np.eye(CHUNK) + lower.astype(np.float64))

    inverse = unit_lower_inverse(mx.array(lower))

    assert max_abs(inverse, expected) < 1e-5
