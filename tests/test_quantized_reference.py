"""The quantized paths against independent references.

- QLoRA: LoRA gradients over a 4-bit base are those over its dequantized weights held as
  float layers (``gather_qmm`` against ``gather_mm``: the same function, float rounding apart).
- The 4- and 8-bit forward pass: our logits are those of mlx-lm's ``mlx_lm.convert -q`` of
  the same checkpoint (the same affine quantizer, so equal up to float rounding).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from tiny_models import TINY_CONFIGS, make_hf_model, make_tokenizer, save

import mlxmoe
from mlxmoe.adapt import AdapterSpec, apply_adapters
from mlxmoe.nn.moe import set_dispatch

# (batch, length): 2 x 40 tokens at top-2 are 160 token-expert pairs, which the MoE layers
# sort by expert; 1 x 6 are 12, which stay in token order.
SHAPES = {"sorted": (2, 40), "in-place": (1, 6)}
# Measured: bitwise equal on MLX's CPU backend, where the gradients of the float model the
# 4-bit one came from differ by up to 110% of their largest entry. The bound leaves room for
# kernels that accumulate in another order (a GPU's).
MAX_GRAD_REL_DIFF = 1e-5
# Both tools call the same MLX kernels (mx.quantize, quantized_matmul, gather_qmm) on the
# same float32 weights; only the code around them may order float operations differently
# (mlx-lm's Mixtral softmaxes the chosen experts' logits, we renormalize the full softmax).
# Measured max-abs over logits up to ~3: 1e-6 on Mixtral, 0 on the other families, where
# 4-bit logits differ from float by 0.7-1.4 and 8-bit ones by 0.07-0.5.
MAX_LOGIT_DIFF = 1e-5
# Where mlx-lm 0.32.2 reads a config differently from transformers, the checkpoint avoids it:
# its OLMoE ignores clip_qkv and its Qwen2-MoE makes every layer sparse (mlp_only_layers).
# Qwen3-MoE, which reads mlp_only_layers, keeps a dense layer.
# mlx-lm's DeepSeek-V2 builds no model without rope scaling (it reads rope_scaling["factor"]).
MLX_LM_COMPATIBLE = {
    "olmoe": {"clip_qkv": None},
    "qwen2_moe": {"mlp_only_layers": []},
    "qwen3_moe": {"mlp_only_layers": [1]},
    "deepseek_v2": {
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
            "original_max_position_embeddings": 64,
        }
    },
}


def tokens(shape: tuple[int, int], vocab_size: int, seed: int = 0) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(0, vocab_size, size=shape))


def with_random_lora_b(model: nn.Module) -> None:
    """B starts at zero, which would leave every A without a gradient."""
    mx.random.seed(1)
    for _, module in model.named_modules():
        if "lora_b" in module:
            module.lora_b = 0.1 * mx.random.normal(module.lora_b.shape)


def dequantized_copy(quantized: nn.Module, folder) -> nn.Module:
    """The float model holding ``quantized``'s dequantized weights and its LoRA parameters."""
    model, _ = mlxmoe.load(folder, dtype=mx.float32)
    apply_adapters(model, AdapterSpec(strategy="experts"))
    set_dispatch(model, "gather")
    weights = {}
    for path, module in quantized.named_modules():
        if "scales" in module:
            weights[f"{path}.weight"] = mx.dequantize(
                module.weight, module.scales, module.biases, module.group_size, module.bits
            )
    assert weights and weights.keys() <= dict(tree_flatten(model.parameters())).keys()
    model.load_weights(list(weights.items()), strict=False)
    model.update(tree_unflatten(tree_flatten(quantized.trainable_parameters())))
    mx.eval(model.parameters())
    return model


def loss_and_lora_grads(model: nn.Module, batch: mx.array) -> tuple[float, dict[str, mx.array]]:
    def loss(inputs, targets):
        return nn.losses.cross_entropy(model(inputs), targets).mean()

    value, grads = nn.value_and_grad(model, loss)(batch[:, :-1], batch[:, 1:])
    mx.eval(value, grads)
    return value.item(), dict(tree_flatten(grads))


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_lora_gradients_over_a_4_bit_base_equal_those_over_its_dequantized_weights(qwen2_moe_folder, shape):
    quantized, _ = mlxmoe.load(qwen2_moe_folder, quantize=4, dtype=mx.float32)
    apply_adapters(quantized, AdapterSpec(strategy="experts"))
    with_random_lora_b(quantized)
    reference = dequantized_copy(quantized, qwen2_moe_folder)
    batch = tokens(shape, quantized.args.vocab_size)

    loss, grads = loss_and_lora_grads(quantized, batch)
    ref_loss, ref_grads = loss_and_lora_grads(reference, batch)

    assert grads.keys() == ref_grads.keys()
    assert any(k.endswith("experts.down_proj.lora_a") for k in grads)
    assert any(k.endswith("attn.q_proj.lora_b") for k in grads)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for key, ref in ref_grads.items():
        scale = mx.abs(ref).max().item()
        assert scale > 0, f"{key}: no gradient"
        diff = mx.abs(grads[key] - ref).max().item()
        assert diff <= MAX_GRAD_REL_DIFF * scale, f"{key}: {diff:.2e} of {scale:.2e}"


def keep_routers_float(path: str, module: nn.Module) -> bool:
    """mlxmoe's policy in mlx-lm's names: quantize everything but the routers
    (``*.gate``, Granite MoE's ``*.router.layer``) and Qwen2-MoE's shared-expert gate; norms
    cannot be quantized anyway."""
    return path.rsplit(".", 1)[-1] not in ("gate", "shared_expert_gate") and not path.endswith("router.layer")


def quantized_layers(model: nn.Module) -> int:
    return sum("scales" in module for _, module in model.named_modules())


@pytest.fixture(scope="module")
def checkpoint(request, tmp_path_factory):
    """A tiny checkpoint as hub checkpoints write it (mlx-lm reads no transformers-5 config),
    with a tokenizer, which mlx-lm's converter copies."""
    family = request.param
    folder = tmp_path_factory.mktemp(family)
    tokenizer = make_tokenizer(folder)
    model = make_hf_model(family, vocab_size=len(tokenizer), **MLX_LM_COMPATIBLE.get(family, {}))
    return family, save(model, folder, style="t4")


# every family at 4 bits; 8 bits on the one with a shared expert
@pytest.mark.parametrize(
    "checkpoint, bits", [*((f, 4) for f in sorted(TINY_CONFIGS)), ("qwen2_moe", 8)], indirect=["checkpoint"]
)
def test_quantized_logits_equal_mlx_lm_convert_of_the_same_checkpoint(checkpoint, bits, tmp_path):
    import mlx_lm
    from mlx_lm.convert import convert

    family, folder = checkpoint
    convert(
        str(folder),
        str(tmp_path / "mlx"),
        quantize=True,
        q_bits=bits,
        q_group_size=64,
        dtype="float32",
        quant_predicate=keep_routers_float,
    )
    reference, _ = mlx_lm.load(str(tmp_path / "mlx"))
    ours, _ = mlxmoe.load(folder, quantize=bits, group_size=64, dtype=mx.float32)

    assert quantized_layers(ours) == quantized_layers(reference) > 0
    for shape in SHAPES.values():
        batch = tokens(shape, ours.args.vocab_size)
        logits, ref_logits = ours(batch), reference(batch)
        mx.eval(logits, ref_logits)
        assert logits.dtype == ref_logits.dtype == mx.float32
        diff = mx.abs(logits - ref_logits).max().item()
        print(f"{family} {bits}-bit {shape}: max-abs {diff:.2e}")
        assert diff < MAX_LOGIT_DIFF
