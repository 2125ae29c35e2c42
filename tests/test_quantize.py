"""Quantized QLoRA bases stay close to float; routers, gates and norms stay float; a scheme
gives groups of roles (experts, shared experts, attention, embeddings) bits of their own."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlxmoe
from mlxmoe.errors import MlxMoeError
from mlxmoe.nn import QuantizedExpertLinear
from mlxmoe.quantize import Quantization, quantization
from mlxmoe.recipe import RecipeError, load_recipe

TOKENS = mx.array(np.random.default_rng(3).integers(0, 96, size=(2, 24)))


def kl_and_top1(ref: mx.array, got: mx.array) -> tuple[float, float]:
    p = mx.softmax(ref, axis=-1)
    kl = (p * (nn.log_softmax(ref, axis=-1) - nn.log_softmax(got, axis=-1))).sum(-1).mean()
    top1 = (ref.argmax(-1) == got.argmax(-1)).astype(mx.float32).mean()
    return kl.item(), top1.item()


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
    with pytest.raises(MlxMoeError, match="7 bits is not supported"):
        mlxmoe.load(qwen2_moe_folder, quantize=7)


MIXED = Quantization(8, 32, experts=3, shared_experts=5, attention=6, embeddings=2)


@pytest.mark.parametrize(
    "written, expected",
    [
        (4, Quantization(4)),
        ("4", Quantization(4)),
        ("none", Quantization(0)),
        (0, Quantization(0)),
        ({"bits": 4}, Quantization(4)),
        ("4,experts=3", Quantization(4, experts=3)),
        ({"bits": 4, "experts": 3}, Quantization(4, experts=3)),
        ({"bits": "none", "experts": 4}, Quantization(0, experts=4)),
        ("4, experts=4, attention=none", Quantization(4, attention=0)),  # the same as bits: dropped
    ],
)
def test_a_scheme_reads_the_same_from_bits_text_or_a_mapping(written, expected):
    assert quantization(written) == expected
    assert quantization(expected.written()) == expected


@pytest.mark.parametrize(
    "written, error",
    [
        (7, r"train\.quantize: 7 bits is not supported \(use none or one of 2, 3, 4, 5, 6, 8\)"),
        ({"bits": 4, "expert": 3}, r"train\.quantize: unknown key 'expert' \(known: bits, experts, "),
        ({"bits": 4, "attention": 1}, r"train\.quantize\.attention: 1 bits is not supported"),
        ({"experts": 3}, r"train\.quantize: no 'bits'"),
        ("4,experts", r"train\.quantize: 'experts' is not GROUP=BITS"),
        ("4,router=8", r"train\.quantize: unknown key 'router'"),
        (True, r"train\.quantize: True bits is not supported"),
    ],
)
def test_a_bad_scheme_in_a_recipe_is_refused_naming_the_key(written, error):
    with pytest.raises(RecipeError, match=error):
        load_recipe(None, train={"quantize": written})


def test_a_recipe_keeps_its_scheme_as_written_and_the_old_meanings():
    assert load_recipe(None).train.quantization == Quantization(4, 64)
    assert load_recipe(None, train={"quantize": "none"}).train.quantize == 0
    mixed = load_recipe(None, train={"quantize": "4,experts=3", "group_size": 32}).train
    assert mixed.quantize == {"bits": 4, "experts": 3}  # what checkpoints and resumes compare
    assert mixed.quantization == Quantization(4, 32, experts=3)
    assert load_recipe(None, train={"quantize": 8}).train.quantize == 8


def test_each_role_group_is_quantized_to_its_own_bits(qwen2_moe_folder):
    model, _ = mlxmoe.load(qwen2_moe_folder, quantize=MIXED, dtype=mx.float32)
    assert model.quantization == MIXED
    moe, attn = model.layers[0].moe, model.layers[0].attn
    bits = {
        "experts": {moe.experts.gate_proj.bits, moe.experts.up_proj.bits, moe.experts.down_proj.bits},
        "shared": {moe.shared_expert.gate_proj.bits, moe.shared_expert.down_proj.bits},
        "attention": {attn.q_proj.bits, attn.k_proj.bits, attn.v_proj.bits, attn.o_proj.bits},
        "embeddings": {model.embed_tokens.bits, model.lm_head.bits},
        "dense": {model.layers[1].mlp.gate_proj.bits, model.layers[1].mlp.down_proj.bits},
    }
    assert bits == {"experts": {3}, "shared": {5}, "attention": {6}, "embeddings": {2}, "dense": {8}}
    assert {m.group_size for m in (moe.experts.down_proj, attn.q_proj, model.lm_head)} == {32}
    assert moe.router.weight.dtype == mx.float32 and "scales" not in moe.router
    assert type(moe.shared_expert_gate) is nn.Linear


def test_a_group_at_none_stays_float(qwen2_moe_folder):
    model, _ = mlxmoe.load(qwen2_moe_folder, quantize="4,embeddings=none", group_size=32)
    assert type(model.embed_tokens) is nn.Embedding and type(model.lm_head) is nn.Linear
    assert model.layers[0].moe.experts.up_proj.bits == 4


@pytest.mark.slow
def test_qlora_over_a_mixed_scheme_in_bfloat16_trains_and_eval_reloads_the_same_scheme(
    qwen2_moe, data, tmp_path
):
    from mlxmoe.adapt.files import trained_quantization
    from mlxmoe.evaluate import evaluate
    from mlxmoe.train import train

    recipe = load_recipe(
        None,
        train=dict(
            iters=2,
            batch_size=2,
            quantize="4,experts=3,attention=8",
            group_size=32,
            dtype="bfloat16",
            report_every=1,
            val_every=0,
            save_every=0,
            max_seq_len=48,
        ),
    )
    recipe.model, recipe.data = str(qwen2_moe), str(data)
    result = train(recipe, tmp_path / "run", show_progress=False)
    assert not result.stopped and np.isfinite(result.loss)
    trained = Quantization(4, 32, experts=3, attention=8)
    assert trained_quantization(tmp_path / "run") == trained
    report = evaluate(
        qwen2_moe, data / "valid.jsonl", adapter=tmp_path / "run", generate=False, limit=2, dtype="bfloat16"
    )
    assert report.quantization == "4-bit, experts 3-bit, attention 8-bit, group 32"
    assert report.dtype == "bfloat16" and np.isfinite(report.perplexity)
