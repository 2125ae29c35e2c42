"""Gemma-4's MoE text model: our float32 forward pass is transformers' across the shapes its
configs take (values from the keys or not, sliding windows shorter than the sequence,
several sliding/full patterns, proportional RoPE, soft-capped logits or not, top-k), as
transformers 5 saves it and as the hub spells config.json, text-only and inside the
multimodal checkpoint; what mlxmoe refuses to read; and training: the LoRA strategies, the
router losses, the expert monitor, QLoRA in float32 and in bfloat16 over 4 bits."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers
from mlx.utils import tree_flatten
from tiny_models import GEMMA4_TINY, make_gemma4_model, make_tokenizer, save, strategy_recipe, write_qa_data

import mlxmoe
from mlxmoe.adapt import AdapterSpec, apply_adapters
from mlxmoe.config import ConfigView
from mlxmoe.errors import CheckpointError, MlxMoeError
from mlxmoe.families.gemma4 import FAMILY
from mlxmoe.train import train

TOKENS = np.random.default_rng(7).integers(0, 96, size=(2, 21))
S, F = "sliding_attention", "full_attention"

SHAPES = {
    # the tiny config: values from the keys on full layers, a window of 8 over 21 tokens,
    # logits capped at 3
    "k-eq-v-capped": {},
    # full layers with their own v_proj and the sliding layers' key-value heads, no cap, tied
    "own-values-uncapped-tied": dict(
        attention_k_eq_v=False, final_logit_softcapping=None, tie_word_embeddings=True
    ),
    # four layers alternating, top 3 of 8 experts, a window of 4, half of each full head
    # rotated at frequencies divided by 2
    "alternating-top3": dict(
        num_hidden_layers=4,
        layer_types=[S, F, S, F],
        num_experts=8,
        top_k_experts=3,
        sliding_window=4,
        rope_parameters={
            S: {"rope_type": "default", "rope_theta": 500.0},
            F: {"rope_type": "proportional", "partial_rotary_factor": 0.5, "factor": 2.0, "rope_theta": 1e4},
        },
    ),
    # transformers' default pattern (every sixth layer full, the last forced full), one expert
    "default-pattern-top1": dict(num_hidden_layers=7, layer_types=None, top_k_experts=1),
}


def reference(hf, tokens: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """transformers' logits and each layer's router probabilities (what Gemma-4 records)."""
    with torch.no_grad():
        out = hf(torch.tensor(tokens, dtype=torch.long), output_router_logits=True)
    return out.logits.float().numpy(), [p.float().numpy() for p in out.router_logits]


def assert_matches_transformers(hf, folder: Path):
    ref_logits, ref_probs = reference(hf, TOKENS)
    model, _ = mlxmoe.load(folder, dtype=mx.float32)
    logits, routers = model(mx.array(TOKENS), return_router_logits=True)
    err = np.abs(np.array(logits) - ref_logits).max()
    print(f"max |logits - transformers| = {err:.2e}")
    assert err < 1e-4
    assert len(routers) == len(ref_probs) == model.args.num_layers
    for ours, ref in zip(routers, ref_probs):
        probs = np.array(mx.softmax(ours, axis=-1)).reshape(ref.shape)
        assert ours.dtype == mx.float32 and np.abs(probs - ref).max() < 1e-5
    return model


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_gemma4_matches_transformers_across_shapes(shape, tmp_path):
    hf = make_gemma4_model(**SHAPES[shape])
    model = assert_matches_transformers(hf, save(hf, tmp_path))
    args = model.args
    assert args.layer_types == hf.config.layer_types
    for i, layer in enumerate(model.layers):
        assert ("v_proj" in layer.attn) == (not (args.attention_k_eq_v and args.layer_types[i] == F))


def test_multimodal_checkpoint_loads_its_language_model_and_skips_the_vision_tower(tmp_path):
    hf = make_gemma4_model(vision=True)
    folder = save(hf, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "gemma4" and config["vision_config"]
    model = assert_matches_transformers(hf, folder)
    assert not any("vision" in k for k, _ in tree_flatten(model.parameters()))


def test_export_hf_of_the_multimodal_checkpoint_gives_transformers_its_language_model_back(tmp_path):
    """The fused experts are joined back as the hub stores them; the vision tower is not
    written (mlxmoe never reads it)."""
    from mlxmoe.gguf.merge import export_hf

    hf = make_gemma4_model(vision=True)
    out = export_hf(save(hf, tmp_path / "src"), tmp_path / "out")
    back = transformers.Gemma4ForConditionalGeneration.from_pretrained(out).eval()
    assert np.abs(reference(back, TOKENS)[0] - reference(hf, TOKENS)[0]).max() < 1e-6


def test_hub_config_spelling_of_the_full_layers_loads_as_transformers_computes(tmp_path):
    """The published config.json has global_head_dim and num_global_key_value_heads, not
    transformers 5's per_layer_config."""
    hf = make_gemma4_model()
    folder = save(hf, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    del config["per_layer_config"]
    config.update(global_head_dim=32, num_global_key_value_heads=1)
    (folder / "config.json").write_text(json.dumps(config))
    model = assert_matches_transformers(hf, folder)
    assert (model.args.global_head_dim, model.args.num_global_kv_heads) == (32, 1)


@pytest.mark.parametrize("seed", [0, 1])
def test_bfloat16_is_as_close_to_float32_as_transformers_own_bfloat16(seed, tmp_path):
    """Routing in float32 (and every norm, as Gemma computes them) keeps our bfloat16 model
    at least as close to the float32 reference as transformers' bfloat16 model is."""
    hf = make_gemma4_model(seed=seed)
    folder = save(hf, tmp_path)
    exact = reference(hf, TOKENS)[0]
    theirs = np.abs(reference(hf.to(torch.bfloat16), TOKENS)[0] - exact).max()
    model, _ = mlxmoe.load(folder, dtype=mx.bfloat16)
    ours = np.abs(np.array(model(mx.array(TOKENS)).astype(mx.float32)) - exact).max()
    print(f"bfloat16 vs float32: ours {ours:.3f}, transformers {theirs:.3f}")
    assert ours <= theirs


def test_generation_through_mlx_lm_kv_cache_computes_the_full_forward(tmp_path):
    """Sliding layers keep every key in the cache and mask the window: a prompt, then one
    token at a time past the window, gives the logits of one pass over the sequence."""
    from mlx_lm.models.cache import make_prompt_cache

    model, _ = mlxmoe.load(save(make_gemma4_model(), tmp_path), dtype=mx.float32)
    tokens = mx.array(TOKENS[:1])
    cache = make_prompt_cache(model)
    steps = [model(tokens[:, :5], cache=cache)]
    steps += [model(tokens[:, i : i + 1], cache=cache) for i in range(5, tokens.shape[1])]
    assert np.abs(np.array(mx.concatenate(steps, axis=1)) - np.array(model(tokens))).max() < 1e-5


def test_lora_with_zero_b_leaves_the_model_as_it_was(tmp_path):
    """Every adapter (the router's as a LoRA of its projection) starts at B = 0."""
    model, _ = mlxmoe.load(save(make_gemma4_model(), tmp_path), dtype=mx.float32)
    before = np.array(model(mx.array(TOKENS)))
    adapted = apply_adapters(model, AdapterSpec(strategy="all", rank=4, router_mode="lora"))
    targets = {p.split(".", 2)[2] for p in adapted}
    assert {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "moe.router", "moe.experts.up_proj"} <= targets
    assert np.abs(before - np.array(model(mx.array(TOKENS)))).max() < 1e-5


def test_dense_dispatch_computes_what_gather_computes(tmp_path):
    model, _ = mlxmoe.load(save(make_gemma4_model(), tmp_path), dtype=mx.float32)
    tokens = mx.array(np.random.default_rng(0).integers(0, 96, (2, 40)))  # 160 (token, expert) pairs
    out = {}
    for dispatch in ("gather", "dense"):
        for layer in model.layers:
            layer.moe.dispatch = dispatch
        out[dispatch] = np.array(model(tokens))
    assert np.abs(out["gather"] - out["dense"]).max() < 1e-5


def _text_config(**override) -> dict:
    return {"model_type": "gemma4_text", **GEMMA4_TINY, **override}


@pytest.mark.parametrize(
    "override, named",
    [
        ({"hidden_size_per_layer_input": 256}, "hidden_size_per_layer_input 256"),
        ({"hidden_size_per_layer_input": None}, "hidden_size_per_layer_input"),  # transformers: 256
        ({"num_kv_shared_layers": 2}, "num_kv_shared_layers 2"),
        ({"enable_moe_block": False}, "enable_moe_block false"),
        ({"use_bidirectional_attention": "all"}, "use_bidirectional_attention"),
        ({"hidden_activation": "silu"}, "hidden_activation 'silu'"),
        ({"attention_bias": True}, "attention_bias"),
        ({"rope_parameters": {S: {"rope_type": "yarn"}, F: {}}}, "rope_type 'yarn'"),
        ({"per_layer_config": {"0": {"head_dim": 32}}}, "per_layer_config"),
        ({"layer_types": [S, F]}, "layer_types must name 3 layers"),
    ],
)
def test_what_mlxmoe_cannot_compute_is_refused_by_name(override, named):
    with pytest.raises(CheckpointError, match=named):
        FAMILY.args_from_config(ConfigView(_text_config(**override)))


def test_the_published_26b_a4b_text_config_reads_as_its_architecture():
    args = FAMILY.args_from_config(ConfigView(json.loads(A4B_CONFIG.read_text())))
    assert (args.num_layers, args.hidden_size, args.intermediate_size) == (30, 2816, 2112)
    assert (args.num_experts, args.num_experts_per_tok, args.moe_intermediate_size) == (128, 8, 704)
    assert (args.head_dim, args.num_kv_heads) == (256, 8)
    assert (args.global_head_dim, args.num_global_kv_heads) == (512, 2)
    assert args.attention_k_eq_v and args.final_logit_softcapping == 30.0 and args.tie_word_embeddings
    assert args.layer_types.count(F) == 5 and args.sliding_window == 1024
    assert args.full_partial_rotary_factor == 0.25 and args.full_rope_theta == 1e6 and args.rope_theta == 1e4


A4B_CONFIG = Path(__file__).parent / "fixtures" / "configs" / "gemma-4-26b-a4b.json"


# --- training ---


@pytest.fixture(scope="module")
def gemma(tmp_path_factory) -> tuple[Path, Path]:
    """Dimensions divisible by 32, so that every projection quantizes in groups of 32."""
    root = tmp_path_factory.mktemp("gemma4-train")
    folder = root / "model"
    tokenizer = make_tokenizer(folder)
    hf = make_gemma4_model(vocab_size=len(tokenizer), intermediate_size=64, moe_intermediate_size=32)
    return save(hf, folder), write_qa_data(root / "data")


def test_strategies_adapt_attention_experts_router_and_dense_mlp_and_refuse_shared(gemma):
    model, _ = mlxmoe.load(gemma[0], dtype=mx.float32)
    adapted = apply_adapters(model, AdapterSpec(strategy="attention", rank=4))
    # q, k, o everywhere; v only in the sliding layer (the full layers' values are their keys)
    assert len(adapted) == 3 * 3 + 1 and "layers.0.attn.v_proj" in adapted
    model, _ = mlxmoe.load(gemma[0], dtype=mx.float32)
    with pytest.raises(MlxMoeError, match="shared"):
        apply_adapters(model, AdapterSpec(strategy="shared", rank=4))


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["experts", "experts+router", "all"])
def test_loss_falls_with_router_losses_and_monitor(gemma, tmp_path, strategy):
    result = train(strategy_recipe(*gemma, strategy, iters=10), tmp_path, show_progress=False)
    rows = _rows(tmp_path)
    print(f"gemma4 {strategy}: answer ce {rows[0]['ce']:.3f} -> {rows[-1]['ce']:.3f}")
    assert result.steps == 10
    assert rows[-1]["ce"] < rows[0]["ce"] - 0.3, [r["ce"] for r in rows]
    assert all(np.isfinite(r["aux"]) and r["aux"] > 0 and np.isfinite(r["z"]) and r["z"] > 0 for r in rows)
    layers = rows[-1]["experts"]["layers"]
    assert len(layers) == 3 and all(len(x["load"]) == 6 and abs(sum(x["load"]) - 1) < 1e-6 for x in layers)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_qlora_over_4_bits_trains(gemma, tmp_path, dtype):
    """The Mac's configuration is bfloat16 over 4 bits: the experts run through gather_qmm."""
    from mlxmoe.adapt.files import read_adapter_config

    r = strategy_recipe(*gemma, "all", iters=10)
    r.train.quantize, r.train.group_size, r.train.dtype = 4, 32, dtype
    r.train.moe_dispatch = "gather"  # gather_qmm, as on a Mac
    train(r, tmp_path, show_progress=False)
    rows = _rows(tmp_path)
    print(f"gemma4 QLoRA {dtype}: answer ce {rows[0]['ce']:.3f} -> {rows[-1]['ce']:.3f}")
    assert all(np.isfinite(r["ce"]) for r in rows)
    assert rows[-1]["ce"] < rows[0]["ce"] - 0.3, [r["ce"] for r in rows]
    config = read_adapter_config(tmp_path)
    assert config["dtype"] == dtype and config["quantization"] == {"bits": 4, "group_size": 32}
