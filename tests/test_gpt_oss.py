"""gpt-oss: float32 forward passes equal transformers' (several shapes, both config styles),
published MXFP4 experts load as transformers reads them, and bad layouts fail by name."""

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
from tiny_models import hf_forward
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

import mlxmoe
from mlxmoe.adapt import AdapterSpec, apply_adapters
from mlxmoe.errors import CheckpointError
from mlxmoe.nn.moe import QuantizedExpertLinear, set_dispatch
from mlxmoe.nn.rope import yarn_frequencies

TOKENS = np.random.default_rng(7).integers(0, 96, size=(2, 21))
COMMON = dict(vocab_size=96, max_position_embeddings=256, tie_word_embeddings=False)
# Each shape switches a feature on where the others leave it at its default: a window
# shorter than the 21-token sequence (1: each token sees only itself), MHA/GQA/MQA, one
# expert per token, a SwiGLU clamp tight enough to cut (0.5), another alpha, YaRN rounded.
SHAPES = {
    "gqa-window-4": dict(
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=32,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=4,
    ),
    "mha-clamped": dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=8,
        intermediate_size=24,
        num_local_experts=8,
        num_experts_per_tok=3,
        sliding_window=8,
        swiglu_limit=0.5,
        swiglu_alpha=1.2,
        layer_types=["full_attention", "sliding_attention"],
    ),
    "mqa-window-1": dict(
        hidden_size=48,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        intermediate_size=16,
        num_local_experts=6,
        num_experts_per_tok=1,
        sliding_window=1,
        rope_parameters=dict(
            rope_type="yarn",
            rope_theta=10000.0,
            factor=8.0,
            beta_fast=32.0,
            beta_slow=1.0,
            truncate=True,
            original_max_position_embeddings=64,
        ),
    ),
}


def make_gpt_oss(seed: int = 0, **config) -> torch.nn.Module:
    """A random GptOssForCausalLM; every bias and sink non-zero, so none can hide."""
    torch.manual_seed(seed)
    model = transformers.GptOssForCausalLM(transformers.GptOssConfig(**{**COMMON, **config})).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif name.endswith("bias") or name.endswith("sinks"):
                param.copy_(0.5 * torch.randn_like(param))
            else:
                param.copy_(0.15 * torch.randn_like(param))
    return model


def save(model: torch.nn.Module, folder: Path, style: str = "t5") -> Path:
    """``save_pretrained``; "t4" rewrites config.json as the hub's gpt-oss releases spell it:
    ``rope_theta`` beside ``rope_scaling``, no ``swiglu_alpha`` (transformers 4 fixed it)."""
    model.save_pretrained(folder)
    if style == "t4":
        path = folder / "config.json"
        config = json.loads(path.read_text())
        rope = config.pop("rope_parameters")
        config["rope_theta"] = rope.pop("rope_theta")
        config["rope_scaling"] = rope
        if config.pop("swiglu_alpha") != 1.702:
            config["swiglu_alpha"] = model.config.swiglu_alpha  # only the default can be left out
        path.write_text(json.dumps(config, indent=2))
    return folder


def max_abs(a, b) -> float:
    return float(np.abs(np.array(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).max())


@pytest.mark.parametrize("style", ["t5", "t4"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_logits_and_router_logits_match_transformers(shape, style, tmp_path):
    hf = make_gpt_oss(**SHAPES[shape])
    ref_logits, ref_routers = hf_forward(hf, TOKENS)
    model, _ = mlxmoe.load(save(hf, tmp_path, style), dtype=mx.float32)

    logits, routers = model(mx.array(TOKENS), return_router_logits=True)

    assert logits.shape == ref_logits.shape
    assert max_abs(logits, ref_logits) < 1e-4
    assert len(routers) == len(ref_routers) == hf.config.num_hidden_layers
    for ours, ref in zip(routers, ref_routers):
        assert ours.dtype == mx.float32
        assert max_abs(ours, ref) < 1e-5


def test_the_dense_dispatch_adds_each_experts_bias_too(tmp_path):
    hf = make_gpt_oss(**SHAPES["gqa-window-4"])
    model, _ = mlxmoe.load(save(hf, tmp_path), dtype=mx.float32)
    assert set_dispatch(model, "dense") == "dense"
    assert max_abs(model(mx.array(TOKENS)), hf_forward(hf, TOKENS)[0]) < 1e-4


def test_affine_quantized_experts_keep_their_biases(tmp_path):
    folder = save(make_gpt_oss(**SHAPES["gqa-window-4"]), tmp_path)
    quantized, _ = mlxmoe.load(folder, quantize=8, group_size=32, dtype=mx.float32)
    reference, _ = mlxmoe.load(folder, dtype=mx.float32)
    x = mx.random.normal((2, 21, 64), key=mx.random.key(1))
    for q_layer, f_layer in zip(quantized.layers, reference.layers):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            module = q_layer.moe.experts[proj]
            assert isinstance(module, QuantizedExpertLinear) and module.mode == "affine"
            assert np.array_equal(np.array(module.bias), np.array(f_layer.moe.experts[proj].bias))
            f_layer.moe.experts[proj].weight = module.dequantized_weight()
        # the same layer: quantized, or in float with the values the quantized one holds
        assert max_abs(q_layer.moe(x)[0], f_layer.moe(x)[0]) < 1e-5


def test_decoding_with_a_kv_cache_equals_the_full_forward_pass(tmp_path):
    from mlx_lm.models.cache import make_prompt_cache

    hf = make_gpt_oss(**SHAPES["gqa-window-4"])
    model, _ = mlxmoe.load(save(hf, tmp_path), dtype=mx.float32)
    tokens = mx.array(TOKENS[:1])
    full = model(tokens)
    cache = make_prompt_cache(model)
    steps = [model(tokens[:, :6], cache=cache)]  # a prompt longer than the window, then one by one
    steps += [model(tokens[:, i : i + 1], cache=cache) for i in range(6, tokens.shape[1])]
    assert max_abs(mx.concatenate(steps, axis=1), full) < 1e-4


@pytest.mark.parametrize(
    "rope",
    [
        dict(
            factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False, original_max_position_embeddings=4096
        ),
        dict(factor=32.0, beta_fast=32.0, beta_slow=1.0, original_max_position_embeddings=4096),
        dict(factor=4.0, original_max_position_embeddings=64, attention_factor=1.3),
        dict(factor=4.0, original_max_position_embeddings=64, mscale=0.8, mscale_all_dim=0.5),
    ],
)
def test_yarn_frequencies_are_transformers_frequencies(rope):
    config = transformers.GptOssConfig(
        **COMMON, head_dim=16, rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, **rope)
    )
    inv_freq, attention = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["yarn"](config)
    ours, our_attention = yarn_frequencies(16, 150000.0, config.rope_parameters, 256)
    np.testing.assert_allclose(ours, inv_freq.numpy(), rtol=1e-6)
    assert our_attention == pytest.approx(attention, rel=1e-12)


def test_a_bfloat16_checkpoint_loads(tmp_path):
    folder = save(make_gpt_oss(**SHAPES["gqa-window-4"]).to(torch.bfloat16), tmp_path)
    # transformers' float32 model of the folder (not the bfloat16 model cast back: casting
    # rounded its RoPE frequencies too)
    hf = transformers.GptOssForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ref_logits, _ = hf_forward(hf, TOKENS)

    model, _ = mlxmoe.load(folder, dtype=mx.float32)
    assert max_abs(model(mx.array(TOKENS)), ref_logits) < 1e-4
    model, _ = mlxmoe.load(folder, dtype="bfloat16")  # routing stays float32
    assert model.layers[0].moe.experts.up_proj.weight.dtype == mx.bfloat16
    assert model.layers[0].attn.sinks.dtype == mx.bfloat16
    assert model.layers[0].moe.router.bias.dtype == mx.float32


# --- MXFP4, as gpt-oss is published --------------------------------------------------------

E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])  # OCP MX spec, FP4 E2M1 magnitudes


def encode_mxfp4(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[..., rows, cols] float -> (blocks [..., rows, cols/32, 16] uint8, scales [..., rows,
    cols/32] uint8), per the OCP MX spec: per 32 values one shared exponent floor(log2(amax))
    - 2 (E2M1's largest exponent), biased by 127; each value rounded to the nearest E2M1
    code, 3 magnitude bits plus a sign bit; two codes a byte, the first in the low nibble."""
    *lead, rows, cols = weight.shape
    groups = weight.reshape(*lead, rows, cols // 32, 32)
    amax = np.abs(groups).max(axis=-1, keepdims=True)
    exponent = np.floor(np.log2(np.maximum(amax, 2.0**-120))) - 2
    scaled = groups / 2.0**exponent
    magnitude = np.abs(np.abs(scaled)[..., None] - E2M1).argmin(axis=-1)
    codes = (magnitude | np.where(scaled < 0, 8, 0)).astype(np.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return (
        np.ascontiguousarray(blocks, dtype=np.uint8),
        np.ascontiguousarray(exponent[..., 0] + 127, dtype=np.uint8),
    )


def decode_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """What ``encode_mxfp4`` meant: [..., rows, cols] float32."""
    codes = np.stack([blocks & 15, blocks >> 4], axis=-1).reshape(*blocks.shape[:-1], 32)
    values = np.where(codes & 8, -1.0, 1.0) * E2M1[codes & 7]
    values = values * 2.0 ** (scales.astype(np.float64) - 127)[..., None]
    return values.reshape(*blocks.shape[:-2], -1).astype(np.float32)


def reference_dequantized(blocks: np.ndarray, scales: np.ndarray, dtype=torch.float32) -> np.ndarray:
    """transformers' own MXFP4 dequantization, [E, in, out] as its experts hold weights."""
    return (
        convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=dtype)
        .float()
        .numpy()
    )


@pytest.fixture(scope="module")
def mxfp4_checkpoint(tmp_path_factory):
    """(folder, hf model computing with the dequantized experts, {tensor: (blocks, scales)}):
    a tiny gpt-oss whose experts are stored as the hub stores them, MXFP4 with rows = outputs."""
    hf = make_gpt_oss(**SHAPES["gqa-window-4"])
    folder = tmp_path_factory.mktemp("gpt-oss-mxfp4")
    hf.save_pretrained(folder)
    tensors = load_file(folder / "model.safetensors")
    packed = {}
    with torch.no_grad():
        for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
            weight = tensors.pop(name)  # [E, in, out]
            blocks, scales = encode_mxfp4(weight.transpose(-1, -2).numpy())
            tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = map(torch.from_numpy, (blocks, scales))
            packed[name] = (blocks, scales)
            hf.get_parameter(name).copy_(torch.from_numpy(reference_dequantized(blocks, scales)))
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder, hf, packed


def test_mxfp4_blocks_written_here_are_what_transformers_reads(mxfp4_checkpoint):
    _, _, packed = mxfp4_checkpoint
    for blocks, scales in packed.values():
        assert np.array_equal(
            reference_dequantized(blocks, scales), decode_mxfp4(blocks, scales).swapaxes(-1, -2)
        )


def test_transformers_loads_the_mxfp4_folder_to_the_same_model(mxfp4_checkpoint):
    folder, hf, _ = mxfp4_checkpoint
    loaded = transformers.GptOssForCausalLM.from_pretrained(
        folder, quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.float32
    )
    assert max_abs(hf_forward(loaded, TOKENS)[0], hf_forward(hf, TOKENS)[0]) == 0.0


def _expert_weights(model, layer: int) -> dict[str, np.ndarray]:
    experts = model.layers[layer].moe.experts
    out = {}
    for proj in ("gate_proj", "up_proj", "down_proj"):
        module = experts[proj]
        weight = module.dequantized_weight() if isinstance(module, QuantizedExpertLinear) else module.weight
        out[proj] = np.array(weight.astype(mx.float32))
    return out


def _reference_expert_weights(packed, layer: int, dtype=torch.float32) -> dict[str, np.ndarray]:
    gate_up = reference_dequantized(*packed[f"model.layers.{layer}.mlp.experts.gate_up_proj"], dtype)
    down = reference_dequantized(*packed[f"model.layers.{layer}.mlp.experts.down_proj"], dtype)
    return {
        "gate_proj": gate_up[..., 0::2].swapaxes(-1, -2),
        "up_proj": gate_up[..., 1::2].swapaxes(-1, -2),
        "down_proj": down.swapaxes(-1, -2),
    }


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mxfp4_experts_dequantize_to_exactly_the_reference_values(mxfp4_checkpoint, dtype):
    folder, _, packed = mxfp4_checkpoint
    model, _ = mlxmoe.load(folder, dtype=dtype)
    for layer in range(len(model.layers)):
        ours = _expert_weights(model, layer)
        ref = _reference_expert_weights(packed, layer, getattr(torch, dtype))
        for proj in ours:
            assert np.array_equal(ours[proj], ref[proj]), (layer, proj)


def test_mxfp4_checkpoint_logits_match_transformers(mxfp4_checkpoint):
    folder, hf, _ = mxfp4_checkpoint
    model, _ = mlxmoe.load(folder, dtype=mx.float32)
    ref_logits, ref_routers = hf_forward(hf, TOKENS)
    logits, routers = model(mx.array(TOKENS), return_router_logits=True)
    assert max_abs(logits, ref_logits) < 1e-4
    assert max(max_abs(o, r) for o, r in zip(routers, ref_routers)) < 1e-5


def test_quantized_loading_keeps_mxfp4_experts_as_published(mxfp4_checkpoint):
    folder, _, packed = mxfp4_checkpoint
    kept, _ = mlxmoe.load(folder, quantize=4, dtype=mx.float32)
    dequantized, _ = mlxmoe.load(folder, dtype=mx.float32)
    experts = kept.layers[0].moe.experts
    assert all(
        isinstance(experts[p], QuantizedExpertLinear) and experts[p].mode == "mxfp4"
        for p in ("gate_proj", "up_proj", "down_proj")
    )
    blocks, scales = packed["model.layers.0.mlp.experts.down_proj"]
    assert np.array_equal(np.array(experts.down_proj.weight).view(np.uint8).reshape(blocks.shape), blocks)
    assert np.array_equal(np.array(experts.down_proj.scales), scales)
    for layer in range(len(kept.layers)):
        ours, ref = _expert_weights(kept, layer), _reference_expert_weights(packed, layer)
        assert all(np.array_equal(ours[p], ref[p]) for p in ours)
    assert "scales" in kept.layers[0].attn.q_proj  # the rest: affine 4-bit, as asked
    assert kept.layers[0].moe.router.weight.dtype == mx.float32
    # the same experts' outputs, computed from the mxfp4 bytes or from their float values
    x = mx.random.normal((2, 21, 64), key=mx.random.key(0))
    assert max_abs(kept.layers[0].moe(x)[0], dequantized.layers[0].moe(x)[0]) < 1e-5


@pytest.mark.parametrize("quantize", [None, 4])
def test_lora_attaches_to_biased_attention_and_experts_and_biases_stay_frozen(mxfp4_checkpoint, quantize):
    folder, _, _ = mxfp4_checkpoint
    model, _ = mlxmoe.load(folder, quantize=quantize, dtype=mx.float32)
    adapted = apply_adapters(model, AdapterSpec(strategy="experts+router", router_mode="lora"))
    assert {p.split(".", 2)[2] for p in adapted} == {
        "attn.q_proj",
        "attn.k_proj",
        "attn.v_proj",
        "attn.o_proj",
        "moe.experts.gate_proj",
        "moe.experts.up_proj",
        "moe.experts.down_proj",
        "moe.router",
    }
    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert trainable and all(k.endswith(("lora_a", "lora_b")) for k in trainable)
    before = model(mx.array(TOKENS))  # B = 0: the adapted model is the base model

    def loss(params):
        model.update(params)
        return model(mx.array(TOKENS)).astype(mx.float32).square().mean()

    grads = dict(tree_flatten(mx.grad(loss)(model.trainable_parameters())))
    assert all(float(mx.abs(g).max()) > 0 for k, g in grads.items() if k.endswith("lora_b"))
    assert max_abs(model(mx.array(TOKENS)), before) == 0.0


# --- what is refused ---------------------------------------------------------------------------


def _rewrite(folder: Path, edit_tensors=None, edit_config=None) -> Path:
    if edit_tensors:
        tensors = load_file(folder / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    if edit_config:
        config = json.loads((folder / "config.json").read_text())
        edit_config(config)
        (folder / "config.json").write_text(json.dumps(config))
    return folder


_BLOCKS = "model.layers.1.mlp.experts.gate_up_proj_blocks"
_SCALES = "model.layers.1.mlp.experts.gate_up_proj_scales"


@pytest.mark.parametrize(
    "case, edit_tensors, edit_config, message",
    [
        (
            "blocks without scales",
            lambda t: t.pop(_SCALES),
            None,
            rf"model\.safetensors: MXFP4 tensor '{_BLOCKS}' has no scales beside it",
        ),
        (
            "scales without blocks",
            lambda t: t.pop(_BLOCKS),
            None,
            rf"model\.safetensors: MXFP4 tensor '{_SCALES}' has no blocks beside it",
        ),
        (
            "blocks of 8 bytes",
            lambda t: t.update({_BLOCKS: t[_BLOCKS][..., :8].contiguous()}),
            None,
            rf"model\.safetensors: tensor '{_BLOCKS}' \(uint8, shape \(4, 64, 2, 8\)\) is no MXFP4 blocks",
        ),
        (
            "float blocks",
            lambda t: t.update({_BLOCKS: t[_BLOCKS].float()}),
            None,
            rf"model\.safetensors: tensor '{_BLOCKS}' \(float32, .*is no MXFP4 blocks",
        ),
        (
            "one scale too many",
            lambda t: t.update({_SCALES: torch.cat([t[_SCALES]] * 2, -1)}),
            None,
            rf"model\.safetensors: tensor '{_BLOCKS}': MXFP4 stores 4-bit values in groups of 32; its "
            r"shapes say 4 bits in groups of 16",
        ),
        (
            "a row too few",
            lambda t: t.update(
                {_BLOCKS: t[_BLOCKS][:, :-2].contiguous(), _SCALES: t[_SCALES][:, :-2].contiguous()}
            ),
            None,
            rf"model\.safetensors: tensor '{_BLOCKS}': quantized tensor .*quantizes no \(4, 32, 64\) weight",
        ),
        (
            "blocks, config without mxfp4",
            None,
            lambda c: c.pop("quantization_config"),
            r"model\.safetensors: tensor 'model\.layers\.\d\.mlp\.experts\.\w+_(blocks|scales)' "
            r"is packed \(uint8\), but config.json declares no quantization",
        ),
        (
            "another quant method",
            None,
            lambda c: c.update(quantization_config={"quant_method": "fp8"}),
            r"config\.json: quantization_config\.quant_method is 'fp8'",
        ),
    ],
)
def test_a_bad_mxfp4_layout_is_one_error_naming_file_and_tensor(
    mxfp4_checkpoint, tmp_path, case, edit_tensors, edit_config, message
):
    import shutil

    folder = Path(shutil.copytree(mxfp4_checkpoint[0], tmp_path / "bad"))
    _rewrite(folder, edit_tensors, edit_config)
    with pytest.raises(CheckpointError, match=message):
        mlxmoe.load(folder, dtype=mx.float32)


def test_fused_experts_of_the_wrong_shape_are_named(tmp_path):
    hf = make_gpt_oss(**SHAPES["gqa-window-4"])
    name = "model.layers.2.mlp.experts.gate_up_proj"
    folder = _rewrite(save(hf, tmp_path), lambda t: t.update({name: t[name][..., :48].contiguous()}))
    message = (
        rf"model\.safetensors: tensor '{name}' has shape \(4, 64, 48\) "
        r"\(its part .*\(4, 24, 64\)\), config\.json implies \(4, 32, 64\)"
    )
    with pytest.raises(CheckpointError, match=message):
        mlxmoe.load(folder, dtype=mx.float32)


def test_a_missing_fused_tensor_is_named_as_the_hub_stores_it(tmp_path):
    name = "model.layers.1.mlp.experts.gate_up_proj"
    folder = _rewrite(save(make_gpt_oss(**SHAPES["gqa-window-4"]), tmp_path), lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=rf"missing tensor '{name}'$"):
        mlxmoe.load(folder, dtype=mx.float32)


def test_mxfp4_is_refused_for_other_families(tmp_path):
    hf = transformers.MixtralForCausalLM(
        transformers.MixtralConfig(
            **COMMON,
            hidden_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=32,
            num_local_experts=4,
        )
    )
    folder = _rewrite(
        save(hf, tmp_path), edit_config=lambda c: c.update(quantization_config={"quant_method": "mxfp4"})
    )
    with pytest.raises(
        CheckpointError,
        match=r"config\.json: quantization_config\.quant_method 'mxfp4' "
        r"is read for gpt-oss's experts, not for mixtral",
    ):
        mlxmoe.load(folder)
