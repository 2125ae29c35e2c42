"""4- and 8-bit QLoRA bases stay close to float; routers, gates and norms stay float."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from tiny_models import make_hf_model, save

import mlxmoe
from mlxmoe.errors import MlxMoeError
from mlxmoe.nn import QuantizedExpertLinear

TOKENS = mx.array(np.random.default_rng(3).integers(0, 96, size=(2, 24)))


def kl_and_top1(ref: mx.array, got: mx.array) -> tuple[float, float]:
    p = mx.softmax(ref, axis=-1)
    kl = (p * (nn.log_softmax(ref, axis=-1) - nn.log_softmax(got, axis=-1))).sum(-1).mean()
    top1 = (ref.argmax(-1) == got.argmax(-1)).astype(mx.float32).mean()
    return kl.item(), top1.item()


@pytest.fixture(scope="module")
def qwen2_moe_folder(tmp_path_factory):
    # hidden 64 so that group sizes 32 and 64 both divide every input dimension
    return save(make_hf_model("qwen2_moe"), tmp_path_factory.mktemp("qwen2_moe"))


@pytest.mark.parametrize("bits, max_kl", [(8, 1e-3), (4, 5e-2)])
def test_quantized_model_stays_close_to_float(qwen2_moe_folder, bits, max_kl):
    ref, _ = mlxmoe.load(qwen2_moe_folder, dtype=mx.float32)
    quant, _ = mlxmoe.load(qwen2_moe_folder, quantize=bits, group_size=32, dtype=mx.float32)
    kl, top1 = kl_and_top1(ref(TOKENS), quant(TOKENS))
    print(f"{bits}-bit: KL {kl:.2e}, top-1 agreement {top1:.3f}")
    # Random tiny weights give near-flat logits, so top-1 is noise here; KL is the measure.
    # Top-1 on real weights: tests/test_real_weights.py.
    assert kl < max_kl


def test_quantization_covers_attention_experts_shared_embeddings_and_head(qwen2_moe_folder):
    model, _ = mlxmoe.load(qwen2_moe_folder, quantize=4, dtype=mx.float32)
    moe = model.layers[0].moe
    assert isinstance(model.layers[0].attn.q_proj, nn.QuantizedLinear)
    assert isinstance(moe.experts.gate_proj, QuantizedExpertLinear)
    assert isinstance(moe.shared_expert.up_proj, nn.QuantizedLinear)
    assert isinstance(model.embed_tokens, nn.QuantizedEmbedding)
    assert isinstance(model.lm_head, nn.QuantizedLinear)
    assert isinstance(model.layers[1].mlp.down_proj, nn.QuantizedLinear)  # the dense layer


def test_router_shared_expert_gate_and_norms_are_never_quantized(qwen2_moe_folder):
    model, _ = mlxmoe.load(qwen2_moe_folder, quantize=4, dtype=mx.float32)
    float_model, _ = mlxmoe.load(qwen2_moe_folder, dtype=mx.float32)
    reference = dict(tree_flatten(float_model.parameters()))
    for name, value in tree_flatten(model.parameters()):
        if name.endswith(("router.weight", "shared_expert_gate.weight", "norm.weight")):
            assert value.dtype == mx.float32, name
            assert mx.array_equal(value, reference[name]), name
    assert model.layers[0].moe.router.weight.dtype == mx.float32


@pytest.mark.parametrize("bits", [None, 4])
def test_router_stays_float32_in_a_bfloat16_model(qwen2_moe_folder, bits):
    # group 64 leaves the experts' down projections (width 32) in bfloat16 floats
    model, _ = mlxmoe.load(qwen2_moe_folder, quantize=bits, dtype=mx.bfloat16)
    assert model.layers[0].moe.router.weight.dtype == mx.float32
    logits, routers = model(TOKENS, return_router_logits=True)
    mx.eval(logits, routers)  # MLX is lazy: the graph must run, not just type-check
    assert logits.dtype == mx.bfloat16
    assert all(r.dtype == mx.float32 for r in routers)
    assert mx.isfinite(logits).all().item()


def test_unsupported_bits_are_refused(qwen2_moe_folder):
    with pytest.raises(MlxMoeError, match="3 bits"):
        mlxmoe.load(qwen2_moe_folder, quantize=3)
