"""Qwen3-Next and Qwen3.5-MoE (its language model): float32 forward passes equal
transformers' on several layer patterns, cached generation equals the full forward pass,
the multimodal checkpoint loads its language model only, 4-bit bases load and run, and
LoRA reaches the linear attention's projections."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers
from mlx.utils import tree_flatten
from safetensors.torch import load_file, save_file

import mlxmoe
from mlxmoe.adapt import AdapterSpec, apply_adapters
from mlxmoe.nn import QuantizedExpertLinear
from mlxmoe.nn.gated_deltanet import DeltaNetCache

TOKENS = np.random.default_rng(7).integers(0, 96, size=(2, 21))
# Two value heads per key head and Dk != Dv, so a wrong head grouping shows
TEXT = dict(
    vocab_size=96,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=8,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=48,
    num_experts=6,
    num_experts_per_tok=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)
# A vision tower as small as transformers builds one: saved with the checkpoint, never read
VISION = dict(
    depth=1,
    hidden_size=32,
    intermediate_size=32,
    num_heads=2,
    out_hidden_size=64,
    patch_size=4,
    temporal_patch_size=2,
    num_position_embeddings=16,
)
# Layer patterns: "hub" configs say full_attention_interval and rope_theta /
# partial_rotary_factor at the top level, as the hub's Qwen3-Next does; the others are
# save_pretrained's (layer_types, rope_parameters).
PATTERNS = {
    "interval-2": (dict(num_hidden_layers=4, full_attention_interval=2), "hub"),
    "interval-4": (dict(num_hidden_layers=4), "hub"),
    "layer-types": (
        dict(
            num_hidden_layers=3,
            layer_types=["full_attention", "linear_attention", "linear_attention"],
            rope_parameters=dict(rope_type="default", rope_theta=5000.0, partial_rotary_factor=0.5),
        ),
        "t5",
    ),
}
# Qwen3-Next only: a dense layer among the sparse ones
NEXT_EXTRA = {"interval-4": dict(mlp_only_layers=[1], intermediate_size=40)}
FAMILIES = ("qwen3_next", "qwen3_5_moe")


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random values everywhere, none at its init: zero-centred norms off zero, decays from
    mild to strong, so that a wrong norm, decay or gate cannot hide."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("A_log"):
                param.copy_(torch.log(torch.empty_like(param).uniform_(0.05, 3.0)))
            elif name.endswith(("linear_attn.norm.weight", "dt_bias")):
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            elif "norm" in name:
                param.copy_(0.3 * torch.randn_like(param))
            else:
                param.copy_(0.08 * torch.randn_like(param))
    return model.eval()


def make_hf(family: str, pattern: str = "interval-2", seed: int = 0, **overrides) -> torch.nn.Module:
    config, _ = PATTERNS[pattern]
    text = {**TEXT, **config, **overrides}
    if family == "qwen3_next":
        text.setdefault("intermediate_size", 40)
        text.update(NEXT_EXTRA.get(pattern, {}))
        return randomize(transformers.Qwen3NextForCausalLM(transformers.Qwen3NextConfig(**text)), seed)
    config = transformers.Qwen3_5MoeConfig(text_config=text, vision_config=VISION)
    return randomize(transformers.Qwen3_5MoeForConditionalGeneration(config), seed)


def save(model: torch.nn.Module, folder: Path, style: str = "t5") -> Path:
    """``save_pretrained``; "hub" rewrites the language model's config as the hub spells it:
    ``full_attention_interval`` for ``layer_types``, rope keys at the top level."""
    model.save_pretrained(folder)
    if style == "hub":
        path = folder / "config.json"
        config = json.loads(path.read_text())
        text = config.get("text_config", config)
        types = text.pop("layer_types")
        interval = types.index("full_attention") + 1
        assert types == [
            "linear_attention" if (i + 1) % interval else "full_attention" for i in range(len(types))
        ]
        text["full_attention_interval"] = interval
        rope = text.pop("rope_parameters")
        text["rope_theta"], text["partial_rotary_factor"] = rope["rope_theta"], rope["partial_rotary_factor"]
        path.write_text(json.dumps(config, indent=2))
    return folder


def hf_forward(model: torch.nn.Module, tokens: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    with torch.no_grad():
        out = model(torch.tensor(tokens, dtype=torch.long), output_router_logits=True)
    return out.logits.numpy(), [r.reshape(*tokens.shape, -1).numpy() for r in out.router_logits]


def max_abs(a, b) -> float:
    return float(np.abs(np.array(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).max())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """Each family's interval-2 checkpoint and its transformers model, saved once."""
    out = {}
    for family in FAMILIES:
        hf = make_hf(family)
        out[family] = save(hf, tmp_path_factory.mktemp(family)), hf
    return out


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_router_logits_match_transformers(family, pattern, tmp_path):
    hf = make_hf(family, pattern)
    ref_logits, ref_routers = hf_forward(hf, TOKENS)
    model, _ = mlxmoe.load(save(hf, tmp_path, PATTERNS[pattern][1]), dtype=mx.float32)

    logits, routers = model(mx.array(TOKENS), return_router_logits=True)

    types = hf.config.get_text_config().layer_types
    assert ["linear_attn" in layer for layer in model.layers] == [t == "linear_attention" for t in types]
    assert logits.shape == ref_logits.shape
    assert max_abs(logits, ref_logits) < 1e-4
    assert len(routers) == len(ref_routers) == len(model.moe_layers)
    for ours, ref in zip(routers, ref_routers):
        assert ours.dtype == mx.float32
        assert max_abs(ours, ref) < 1e-4


def test_qwen3_next_places_dense_layers_where_config_says(tmp_path):
    hf = make_hf("qwen3_next", "interval-4")
    model, _ = mlxmoe.load(save(hf, tmp_path), dtype=mx.float32)
    assert model.moe_layers == [0, 2, 3]
    assert "mlp" in model.layers[1]


@pytest.mark.parametrize("family", FAMILIES)
def test_decoding_with_the_cache_equals_the_full_forward_pass(family, checkpoints):
    """A prompt, one token at a time, then a second multi-token chunk: the linear layers
    carry a DeltaNetCache, the attention layers mlx-lm's KVCache."""
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    model, _ = mlxmoe.load(checkpoints[family][0], dtype=mx.float32)
    tokens = mx.array(TOKENS)
    full = model(tokens)
    cache = make_prompt_cache(model)
    assert [type(c) for c in cache] == [DeltaNetCache, KVCache] * 2
    steps = [model(tokens[:, :6], cache=cache)]
    steps += [model(tokens[:, i : i + 1], cache=cache) for i in range(6, 14)]
    steps.append(model(tokens[:, 14:], cache=cache))
    assert max_abs(mx.concatenate(steps, axis=1), full) < 1e-4


def test_mlx_lm_greedy_generation_equals_the_uncached_argmax(checkpoints):
    from mlx_lm.generate import generate_step

    model, _ = mlxmoe.load(checkpoints["qwen3_5_moe"][0], dtype=mx.float32)
    prompt = [int(t) for t in TOKENS[0, :9]]
    generated = [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=6)]
    tokens = list(prompt)
    for _ in range(6):
        tokens.append(int(mx.argmax(model(mx.array([tokens]))[0, -1])))
    assert generated == tokens[len(prompt) :]


def test_other_families_keep_mlx_lm_default_cache(tmp_path):
    from tiny_models import make_hf_model
    from tiny_models import save as save_tiny

    model, _ = mlxmoe.load(save_tiny(make_hf_model("qwen3_moe"), tmp_path), dtype=mx.float32)
    assert not hasattr(model, "make_cache")


# --- the checkpoint as published ---------------------------------------------------------


def _rewrite(folder: Path, edit) -> Path:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_multimodal_checkpoint_loads_its_language_model_and_skips_vision_and_mtp(checkpoints, tmp_path):
    hf = checkpoints["qwen3_5_moe"][1]
    folder = save(hf, tmp_path)
    names = load_file(folder / "model.safetensors")
    assert any(n.startswith("model.visual.") for n in names)
    assert any(n.startswith("model.language_model.layers.0.linear_attn.") for n in names)

    def add_mtp(tensors):  # the multi-token-prediction layer the hub releases carry
        tensors["mtp.fc.weight"] = torch.randn(64, 128)
        tensors["mtp.layers.0.input_layernorm.weight"] = torch.zeros(64)

    _rewrite(folder, add_mtp)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "qwen3_5_moe" and "text_config" in config
    model, _ = mlxmoe.load(folder, dtype=mx.float32)
    assert not any("visual" in n or "mtp" in n for n, _ in tree_flatten(model.parameters()))
    assert max_abs(model(mx.array(TOKENS)), hf_forward(hf, TOKENS)[0]) < 1e-4


def test_text_only_qwen3_5_checkpoint_loads(tmp_path):
    text = transformers.Qwen3_5MoeTextConfig(**TEXT, num_hidden_layers=2, full_attention_interval=2)
    hf = randomize(transformers.Qwen3_5MoeForCausalLM(text), seed=3)
    folder = save(hf, tmp_path)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "qwen3_5_moe_text"
    model, _ = mlxmoe.load(folder, dtype=mx.float32)
    assert max_abs(model(mx.array(TOKENS)), hf_forward(hf, TOKENS)[0]) < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_experts_load_as_the_per_expert_tensors(family, checkpoints, tmp_path):
    """Some hub releases store each layer's experts fused: gate_up_proj [E, 2 * ffn, hidden]
    (gate rows first), down_proj [E, hidden, ffn], as transformers holds them."""
    folder, hf = checkpoints[family]
    import shutil

    folder = Path(shutil.copytree(folder, tmp_path / "fused"))

    def fuse(tensors):
        for stem in {n.rsplit(".experts.", 1)[0] for n in tensors if ".experts." in n}:
            experts = range(TEXT["num_experts"])
            gate, up, down = (
                [tensors.pop(f"{stem}.experts.{e}.{p}.weight") for e in experts]
                for p in ("gate_proj", "up_proj", "down_proj")
            )
            tensors[f"{stem}.experts.gate_up_proj"] = torch.cat([torch.stack(gate), torch.stack(up)], 1)
            tensors[f"{stem}.experts.down_proj"] = torch.stack(down)

    _rewrite(folder, fuse)
    model, _ = mlxmoe.load(folder, dtype=mx.float32)
    assert max_abs(model(mx.array(TOKENS)), hf_forward(hf, TOKENS)[0]) < 1e-4


# --- quantization and dtypes -------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_4bit_base_quantizes_projections_and_experts_and_keeps_the_rest_float(family, checkpoints):
    """Quantized: attention q/k/v/o, the linear attention's qkv(z) / z and out_proj, routed
    and shared experts, embeddings, head. Float: routers, the shared expert's gate, the
    beta/decay projections (ba, b, a), conv1d, A_log, dt_bias and every norm."""
    folder, _ = checkpoints[family]
    quant, _ = mlxmoe.load(folder, quantize=4, group_size=32, dtype=mx.float32)
    ref, _ = mlxmoe.load(folder, dtype=mx.float32)
    linear, full = quant.layers[0], quant.layers[1]
    fused = family == "qwen3_next"
    quantized = [
        full.attn.q_proj,
        full.attn.o_proj,
        linear.linear_attn.out_proj,
        linear.moe.shared_expert.up_proj,
        quant.embed_tokens,
        quant.lm_head,
    ]
    quantized += (
        [linear.linear_attn.in_proj_qkvz]
        if fused
        else [linear.linear_attn.in_proj_qkv, linear.linear_attn.in_proj_z]
    )
    assert all("scales" in m for m in quantized)
    assert isinstance(linear.moe.experts.down_proj, QuantizedExpertLinear)
    kept = [linear.moe.shared_expert_gate, linear.linear_attn.conv1d, linear.linear_attn.norm]
    kept += (
        [linear.linear_attn.in_proj_ba]
        if fused
        else [linear.linear_attn.in_proj_b, linear.linear_attn.in_proj_a]
    )
    assert not any("scales" in m for m in kept)

    # It computes what its 4-bit weights say: the float model holding their dequantized values
    float_modules = dict(ref.named_modules())
    for path, module in quant.named_modules():
        if "scales" in module and not isinstance(module, QuantizedExpertLinear):
            float_modules[path].weight = mx.dequantize(
                module.weight, module.scales, module.biases, module.group_size, module.bits
            )
        elif isinstance(module, QuantizedExpertLinear):
            float_modules[path].weight = module.dequantized_weight()
    tokens = mx.array(TOKENS)
    logits, routers = quant(tokens, return_router_logits=True)
    assert all(r.dtype == mx.float32 for r in routers)
    assert max_abs(logits, ref(tokens)) < 1e-5


@pytest.mark.parametrize("bits", [None, 4])
def test_bfloat16_model_keeps_routers_and_a_log_in_float32(checkpoints, bits):
    model, _ = mlxmoe.load(checkpoints["qwen3_next"][0], quantize=bits, dtype=mx.bfloat16)
    deltanet = model.layers[0].linear_attn
    assert deltanet.A_log.dtype == mx.float32 and model.layers[0].moe.router.weight.dtype == mx.float32
    assert deltanet.dt_bias.dtype == mx.bfloat16 and model.layers[0].input_norm.weight.dtype == mx.bfloat16
    logits = model(mx.array(TOKENS))
    mx.eval(logits)
    assert logits.dtype == mx.bfloat16 and mx.isfinite(logits).all().item()


# --- LoRA ---------------------------------------------------------------------------------

LINEAR_TARGETS = {
    "qwen3_next": {"linear_attn.in_proj_qkvz", "linear_attn.in_proj_ba", "linear_attn.out_proj"},
    "qwen3_5_moe": {
        "linear_attn.in_proj_qkv",
        "linear_attn.in_proj_z",
        "linear_attn.in_proj_b",
        "linear_attn.in_proj_a",
        "linear_attn.out_proj",
    },
}
ATTENTION_TARGETS = {"attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj"}


@pytest.mark.parametrize("quantize", [None, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_adapts_the_linear_attention_projections_and_gradients_reach_them(family, quantize, checkpoints):
    model, _ = mlxmoe.load(checkpoints[family][0], quantize=quantize, group_size=32, dtype=mx.float32)
    adapted = apply_adapters(model, AdapterSpec(strategy="attention"))

    by_layer = {}
    for path in adapted:
        _, layer, target = path.split(".", 2)
        by_layer.setdefault(int(layer), set()).add(target)
    assert by_layer == {i: LINEAR_TARGETS[family] if i % 2 == 0 else ATTENTION_TARGETS for i in range(4)}
    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert trainable and all(k.endswith(("lora_a", "lora_b")) for k in trainable)
    tokens = mx.array(TOKENS)
    before = model(tokens)  # B = 0: the adapted model is the base model

    def loss(params):
        model.update(params)
        return model(tokens).astype(mx.float32).square().mean()

    grads = dict(tree_flatten(mx.grad(loss)(model.trainable_parameters())))
    assert all(float(mx.abs(g).max()) > 0 for k, g in grads.items() if k.endswith("lora_b")), [
        k for k, g in grads.items() if k.endswith("lora_b") and float(mx.abs(g).max()) == 0
    ]
    assert max_abs(model(tokens), before) == 0.0


def test_an_mlx_lm_conversion_is_refused_by_name(checkpoints, tmp_path):
    """mlx-lm saves conv1d [C, K, 1] and the norms as 1 + w: read as ours they would be off by one."""
    import shutil

    from mlxmoe.errors import CheckpointError

    folder = Path(shutil.copytree(checkpoints["qwen3_next"][0], tmp_path / "mlx-lm"))
    name = "model.layers.0.linear_attn.conv1d.weight"
    _rewrite(folder, lambda t: t.update({name: t[name].transpose(1, 2).contiguous()}))
    with pytest.raises(
        CheckpointError,
        match=rf"model\.safetensors: tensor '{name}' has shape "
        r"\(96, 4, 1\), the layout mlx-lm saves",
    ):
        mlxmoe.load(folder, dtype=mx.float32)
