"""DeepSeek-V2 / V2-Lite: our float32 forward pass is transformers' across the shapes its
configs take (queries with and without the low-rank bottleneck, dense first layers, greedy
and group-limited routing, YaRN with its mscale, scaled routing weights), what mlxmoe refuses
to read, and every LoRA strategy, router losses, monitor and QLoRA through training."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from tiny_models import (
    hf_forward,
    make_hf_model,
    make_trainable_checkpoint,
    save,
    strategy_recipe,
    write_qa_data,
)

import mlxmoe
from mlxmoe.config import ConfigView
from mlxmoe.errors import CheckpointError
from mlxmoe.families.deepseek_v2 import FAMILY
from mlxmoe.recipe import load_recipe
from mlxmoe.train import train

TOKENS = np.random.default_rng(7).integers(0, 96, size=(2, 21))
# DeepSeek-V2's and V2-Lite's YaRN (factor 40 over 4096 positions), scaled down to the tiny
# models' 256 positions: frequencies ramp within the 8 rotary dimensions
V2_YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
    "original_max_position_embeddings": 64,
}

SHAPES = {
    # V2-Lite's: queries straight from q_proj, a dense first layer, greedy top-k, YaRN
    "lite-yarn": dict(q_lora_rank=None, rope_parameters=V2_YARN, routed_scaling_factor=1.0),
    # V2's: the query bottleneck, group-limited routing (4 groups of 2, the best 2 groups, top 3),
    # routing weights times 16, every layer sparse
    "v2-groups": dict(
        topk_method="group_limited_greedy",
        n_group=4,
        topk_group=2,
        num_experts_per_tok=3,
        routed_scaling_factor=16.0,
        first_k_dense_replace=0,
    ),
    # YaRN with mscale != mscale_all_dim: q and k's rotary parts scaled by their ratio as well
    "yarn-mscale-ratio": dict(rope_parameters={**V2_YARN, "mscale": 1.0, "mscale_all_dim": 0.5}),
    # wider heads, values wider than the keys' non-rotary part, two dense layers, one shared
    # expert, tied embeddings, norm_topk_prob true (which transformers reads and never uses)
    "wide-two-dense-tied": dict(
        hidden_size=96,
        num_attention_heads=6,
        num_key_value_heads=6,
        qk_nope_head_dim=8,
        qk_rope_head_dim=16,
        v_head_dim=24,
        kv_lora_rank=48,
        q_lora_rank=40,
        num_hidden_layers=4,
        first_k_dense_replace=2,
        n_shared_experts=1,
        tie_word_embeddings=True,
        norm_topk_prob=True,
    ),
}


def assert_matches_transformers(hf, folder: Path) -> mlxmoe.model.CausalLM:
    ref_logits, ref_routers = hf_forward(hf, TOKENS)
    model, _ = mlxmoe.load(folder, dtype=mx.float32)
    logits, routers = model(mx.array(TOKENS), return_router_logits=True)
    assert np.abs(np.array(logits) - ref_logits).max() < 1e-4
    assert len(routers) == len(ref_routers) == hf.config.num_hidden_layers - hf.config.first_k_dense_replace
    for ours, ref in zip(routers, ref_routers):
        assert ours.dtype == mx.float32 and np.abs(np.array(ours) - ref).max() < 1e-5
    return model


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_deepseek_v2_matches_transformers_across_shapes(shape, tmp_path):
    hf = make_hf_model("deepseek_v2", **SHAPES[shape])
    model = assert_matches_transformers(hf, save(hf, tmp_path))
    assert model.moe_layers == list(range(hf.config.first_k_dense_replace, hf.config.num_hidden_layers))


def test_hub_config_spelling_with_yarn_loads_as_transformers_computes(tmp_path):
    """rope_theta and rope_scaling ("type": "yarn") at the top level, as DeepSeek's releases
    write config.json."""
    hf = make_hf_model("deepseek_v2", q_lora_rank=None, rope_parameters=V2_YARN)
    folder = save(hf, tmp_path, style="t4")
    config = json.loads((folder / "config.json").read_text())
    config["rope_scaling"]["type"] = config["rope_scaling"].pop("rope_type")
    (folder / "config.json").write_text(json.dumps(config))
    assert "rope_parameters" not in config and config["rope_scaling"]["factor"] == 4.0
    model = assert_matches_transformers(hf, folder)
    assert model.layers[0].attn.rope.attention_factor == 1.0  # mscale == mscale_all_dim
    assert model.layers[0].attn.scale > (8 + 16) ** -0.5  # mscale_all_dim enters the softmax scale


def test_group_limited_routing_and_yarn_change_what_is_computed(tmp_path):
    """The shapes above would pass with either switch ignored if they changed nothing."""
    hf = make_hf_model("deepseek_v2", **SHAPES["v2-groups"])
    model, _ = mlxmoe.load(save(hf, tmp_path / "groups"), dtype=mx.float32)
    grouped = np.array(model(mx.array(TOKENS)))
    for layer in model.layers:
        layer.moe.router.groups = 1
    assert np.abs(grouped - np.array(model(mx.array(TOKENS)))).max() > 1e-2
    plain = make_hf_model("deepseek_v2", q_lora_rank=None)
    yarn = make_hf_model("deepseek_v2", **SHAPES["lite-yarn"])
    assert np.abs(hf_forward(plain, TOKENS)[0] - hf_forward(yarn, TOKENS)[0]).max() > 1e-2


def test_generation_through_mlx_lm_kv_cache_computes_the_full_forward(tmp_path):
    """Latent attention caches the expanded keys and values, rotated at their positions:
    a prompt then one token at a time gives the logits of one pass over the whole sequence."""
    from mlx_lm.models.cache import make_prompt_cache

    model, _ = mlxmoe.load(
        save(make_hf_model("deepseek_v2", **SHAPES["lite-yarn"]), tmp_path), dtype=mx.float32
    )
    tokens = mx.array(TOKENS[:1])
    cache = make_prompt_cache(model)
    steps = [model(tokens[:, :15], cache=cache)]
    steps += [model(tokens[:, i : i + 1], cache=cache) for i in range(15, tokens.shape[1])]
    assert np.abs(np.array(mx.concatenate(steps, axis=1)) - np.array(model(tokens))).max() < 1e-5


def test_lora_with_zero_b_leaves_group_limited_scaled_routing_as_it_was(tmp_path):
    """A router LoRA (and every other adapter) starts at B = 0: the model computes what it
    computed, groups and routing scale included."""
    from mlxmoe.adapt import AdapterSpec, apply_adapters

    folder = save(make_hf_model("deepseek_v2", **SHAPES["v2-groups"]), tmp_path)
    model, _ = mlxmoe.load(folder, dtype=mx.float32)
    before = np.array(model(mx.array(TOKENS)))
    apply_adapters(model, AdapterSpec(strategy="all", rank=4, router_mode="lora"))
    assert np.abs(before - np.array(model(mx.array(TOKENS)))).max() < 1e-5


@pytest.mark.parametrize(
    "override, named",
    [
        ({"topk_method": "noaux_tc"}, "topk_method 'noaux_tc'"),
        ({"moe_layer_freq": 2}, "moe_layer_freq 2"),
        ({"scoring_func": "sigmoid"}, "scoring_func 'sigmoid'"),
        ({"num_key_value_heads": 2}, "num_key_value_heads"),
        ({"attention_bias": True}, "attention_bias=true"),
        ({"topk_method": "group_limited_greedy", "n_group": 3, "topk_group": 1}, "n_group=3"),
    ],
)
def test_configs_transformers_computes_otherwise_are_refused_by_name(override, named):
    config = make_hf_model("deepseek_v2").config.to_dict()
    with pytest.raises(CheckpointError, match=named):
        FAMILY.args_from_config(ConfigView({**config, **override}))


# --- training: every strategy applies (latent attention, routed and shared experts, a dense
# first layer, the router) ---


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("deepseek-train")
    return make_trainable_checkpoint("deepseek_v2", root / "model"), write_qa_data(root / "data")


def test_attention_strategy_adapts_every_latent_attention_projection(deepseek):
    from mlxmoe.adapt import AdapterSpec, apply_adapters

    model, _ = mlxmoe.load(deepseek[0], dtype=mx.float32)
    adapted = apply_adapters(model, AdapterSpec(strategy="attention", rank=4))
    assert {p.split(".", 2)[2] for p in adapted} == {
        "attn.q_a_proj",
        "attn.q_b_proj",
        "attn.kv_a_proj_with_mqa",
        "attn.kv_b_proj",
        "attn.o_proj",
    }
    assert len(adapted) == 5 * model.args.num_layers


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["attention", "experts", "shared", "experts+router", "all"])
def test_loss_falls_for_every_strategy(deepseek, tmp_path, strategy):
    result = train(strategy_recipe(*deepseek, strategy), tmp_path, show_progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    print(f"deepseek_v2 {strategy}: answer ce {rows[0]['ce']:.3f} -> {rows[-1]['ce']:.3f}")
    assert result.steps == 12
    assert rows[-1]["ce"] < rows[0]["ce"] - 0.3, [r["ce"] for r in rows]
    assert all(np.isfinite(r["aux"]) and r["aux"] > 0 and np.isfinite(r["z"]) for r in rows)
    # the monitor: the two MoE layers (layer 0 is dense), each's load over 8 experts summing to 1
    layers = rows[-1]["experts"]["layers"]
    assert len(layers) == 2 and all(len(x["load"]) == 8 and abs(sum(x["load"]) - 1) < 1e-6 for x in layers)


@pytest.mark.slow
def test_qlora_in_bfloat16_over_4_bits_trains(deepseek, tmp_path):
    from mlxmoe.adapt.files import read_adapter_config

    r = strategy_recipe(*deepseek, "experts")  # latent attention and experts: the default
    r.train.quantize, r.train.group_size, r.train.dtype = 4, 32, "bfloat16"
    train(r, tmp_path, show_progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    print(f"deepseek_v2 QLoRA: answer ce {rows[0]['ce']:.3f} -> {rows[-1]['ce']:.3f}")
    assert rows[-1]["ce"] < rows[0]["ce"] - 0.3, [r["ce"] for r in rows]
    config = read_adapter_config(tmp_path)
    assert config["dtype"] == "bfloat16" and config["quantization"] == {"bits": 4, "group_size": 32}


# --- the recipe for a 32 GB Mac, sized by `mlxmoe plan` on DeepSeek-V2-Lite's config ---

FIXTURE = Path(__file__).parent / "fixtures" / "configs" / "deepseek-v2-lite.json"
RECIPE = Path(__file__).parent.parent / "recipes" / "deepseek-v2-lite.yaml"


def test_v2_lite_recipe_fits_a_32_gb_mac_with_checkpointing_and_not_without():
    from mlxmoe.plan.advice import budget, verdict
    from mlxmoe.plan.training import plan_training

    cfg = ConfigView(json.loads(FIXTURE.read_text()))
    recipe = load_recipe(RECIPE)
    assert recipe.train.grad_checkpoint
    ckpt = plan_training(cfg, recipe)
    recipe.train.grad_checkpoint = False
    full = plan_training(cfg, recipe, memory=ckpt.memory)
    mac = budget("32GB")
    base = ckpt.memory.quantized + ckpt.memory.unquantized
    print(
        f"deepseek-v2-lite recipe: base {base / 2**30:.2f} GiB, peak {ckpt.peak / 2**30:.2f} GiB "
        f"({full.peak / 2**30:.2f} without checkpointing), default limit {mac.wired_default / 2**30:.2f}"
    )
    assert 8 * 2**30 < base < 9 * 2**30  # 15.7B parameters at 4 bits and a bit
    assert verdict(ckpt.peak, mac).fits_default and not verdict(full.peak, mac).fits_default
    # the recipe's comment quotes the plan
    assert f"{ckpt.peak / 2**30:.1f} GiB peak" in RECIPE.read_text()
    assert f"({full.peak / 2**30:.1f} without)" in RECIPE.read_text()
