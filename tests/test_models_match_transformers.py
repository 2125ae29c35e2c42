"""Every family's float32 forward pass is transformers' forward pass."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from tiny_models import TINY_CONFIGS, hf_forward, make_hf_model, save

import mlxmoe

FAMILIES = sorted(TINY_CONFIGS)
TOKENS = np.random.default_rng(7).integers(0, 96, size=(2, 21))


@pytest.mark.parametrize("style", ["t5", "t4"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_router_logits_match_transformers(family, style, tmp_path):
    hf = make_hf_model(family)
    ref_logits, ref_routers = hf_forward(hf, TOKENS)
    model, _ = mlxmoe.load(save(hf, tmp_path, style), dtype=mx.float32)

    logits, routers = model(mx.array(TOKENS), return_router_logits=True)

    assert logits.shape == ref_logits.shape
    assert np.abs(np.array(logits) - ref_logits).max() < 1e-4
    assert len(routers) == len(ref_routers)
    for ours, ref in zip(routers, ref_routers):
        assert ours.dtype == mx.float32
        assert ours.shape == ref.shape
        assert np.abs(np.array(ours) - ref).max() < 1e-5


def test_qwen2_moe_places_dense_layers_where_config_says(tmp_path):
    hf = make_hf_model("qwen2_moe", num_hidden_layers=4, mlp_only_layers=[0], decoder_sparse_step=2)
    model, _ = mlxmoe.load(save(hf, tmp_path), dtype=mx.float32)
    # sparse where (i + 1) % 2 == 0 and i not in mlp_only_layers
    assert model.moe_layers == [1, 3]
    ref_logits, _ = hf_forward(hf, TOKENS)
    assert np.abs(np.array(model(mx.array(TOKENS))) - ref_logits).max() < 1e-4


def test_sharded_checkpoint_with_index_loads(tmp_path):
    hf = make_hf_model("mixtral")
    folder = save(hf, tmp_path, shard_kb=200)
    assert (folder / "model.safetensors.index.json").exists()
    assert len(list(folder.glob("*.safetensors"))) > 1
    model, _ = mlxmoe.load(folder, dtype=mx.float32)
    ref_logits, _ = hf_forward(hf, TOKENS)
    assert np.abs(np.array(model(mx.array(TOKENS))) - ref_logits).max() < 1e-4


def test_tied_embeddings_use_the_embedding_as_head(tmp_path):
    hf = make_hf_model("llama", tie_word_embeddings=True)
    model, _ = mlxmoe.load(save(hf, tmp_path), dtype=mx.float32)
    assert "lm_head" not in model
    ref_logits, _ = hf_forward(hf, TOKENS)
    assert np.abs(np.array(model(mx.array(TOKENS))) - ref_logits).max() < 1e-4


GRANITE_SHAPES = {
    # multi-head (no GQA), top-1 of 4, transformers' default multipliers (all 1.0)
    "mha-top1-defaults": dict(
        num_key_value_heads=4,
        num_local_experts=4,
        num_experts_per_tok=1,
        embedding_multiplier=1.0,
        attention_multiplier=1.0,
        residual_multiplier=1.0,
        logits_scaling=1.0,
    ),
    # 8 heads sharing 2 KV heads, top-3 of 8, tied embeddings, 2 layers
    "gqa4-top3-tied": dict(
        num_attention_heads=8,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=3,
        tie_word_embeddings=True,
        num_hidden_layers=2,
        intermediate_size=48,
    ),
    # wider, longer RoPE base, 1 KV head
    "mqa-wide": dict(
        hidden_size=96,
        num_attention_heads=6,
        num_key_value_heads=1,
        intermediate_size=64,
        rope_parameters={"rope_type": "default", "rope_theta": 5e5},
    ),
}


@pytest.mark.parametrize("shape", sorted(GRANITE_SHAPES))
def test_granitemoe_matches_transformers_across_shapes(shape, tmp_path):
    hf = make_hf_model("granitemoe", **GRANITE_SHAPES[shape])
    ref_logits, ref_routers = hf_forward(hf, TOKENS)
    model, _ = mlxmoe.load(save(hf, tmp_path), dtype=mx.float32)
    logits, routers = model(mx.array(TOKENS), return_router_logits=True)
    assert np.abs(np.array(logits) - ref_logits).max() < 1e-4
    assert len(routers) == len(ref_routers) == hf.config.num_hidden_layers
    for ours, ref in zip(routers, ref_routers):
        assert np.abs(np.array(ours) - ref).max() < 1e-5
