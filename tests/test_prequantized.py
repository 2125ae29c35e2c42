"""Checkpoints that arrive quantized: mlx-lm's 4-bit format as a QLoRA base (its logits are
mlx-lm's own), exported through its full-precision release or its grid, and the formats
mlxmoe refuses with one error."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from assets import qwen3_tokenizer_folder
from tiny_models import make_hf_model, make_tokenizer, save, write_qa_data

import mlxmoe
from mlxmoe.errors import CheckpointError, MlxMoeError
from mlxmoe.gguf.export import export_gguf
from mlxmoe.gguf.llamacpp import logits as llama_cpp_logits
from mlxmoe.gguf.llamacpp import open_gguf
from mlxmoe.recipe import load_recipe
from mlxmoe.train import train

# Where mlx-lm 0.32.2 reads a config differently from transformers, the checkpoint avoids it
# (its OLMoE ignores clip_qkv, its Qwen2-MoE makes every layer sparse; its Granite MoE puts
# the experts' down projections in groups of 64 whatever the group size asked).
MLX_LM_COMPATIBLE = {
    "olmoe": {"clip_qkv": None},
    "qwen2_moe": {"mlp_only_layers": []},
    "granitemoe": {"intermediate_size": 64},
}


def mlx_lm_quantized(folder: Path, out: Path, bits: int = 4, group_size: int = 64) -> Path:
    """``mlx_lm.convert -q`` with mlx-lm's own per-model policy (Qwen3-MoE's routers at
    8 bits, Mixtral's at the default bits): the files Mac users download."""
    from mlx_lm.convert import convert

    convert(str(folder), str(out), quantize=True, q_bits=bits, q_group_size=group_size)
    return out


def float_checkpoint(family: str, folder: Path, seed: int = 0) -> Path:
    tokenizer = make_tokenizer(folder)
    model = make_hf_model(family, seed=seed, vocab_size=len(tokenizer), **MLX_LM_COMPATIBLE.get(family, {}))
    return save(model, folder, style="t4")  # mlx-lm reads no transformers-5 config


@pytest.mark.parametrize(
    "family, bits, group_size",
    [
        ("qwen3_moe", 4, 64),
        ("mixtral", 4, 32),
        ("qwen2_moe", 4, 64),
        ("olmoe", 4, 64),
        ("qwen2_moe", 8, 64),
        ("llama", 4, 64),
        ("granitemoe", 4, 64),
    ],
)
def test_an_mlx_lm_quantized_checkpoint_computes_what_mlx_lm_computes(family, bits, group_size, tmp_path):
    import mlx_lm

    folder = mlx_lm_quantized(float_checkpoint(family, tmp_path / "float"), tmp_path / "q", bits, group_size)
    reference, _ = mlx_lm.load(str(folder))
    ours, tokenizer = mlxmoe.load(folder, dtype="float32")
    assert ours.quantization.bits == bits and tokenizer is not None
    assert sum("scales" in m for _, m in ours.named_modules()) > 0
    if family != "llama":  # routers are dequantized: routing runs on floats
        assert ours.layers[0].moe.router.weight.dtype == mx.float32
    tokens = mx.array(np.random.default_rng(0).integers(0, ours.args.vocab_size, (2, 40)))
    ours_logits, ref_logits = ours(tokens), reference(tokens)
    mx.eval(ours_logits, ref_logits)
    diff = mx.abs(ours_logits - ref_logits).max().item()
    print(f"{family} {bits}-bit group {group_size}: max-abs {diff:.1e}")
    # the same kernels on the same arrays; Mixtral softmaxes its top-k differently (1e-6)
    assert diff < 1e-5


def test_a_quantized_checkpoint_is_never_requantized(tmp_path):
    folder = mlx_lm_quantized(float_checkpoint("qwen3_moe", tmp_path / "float"), tmp_path / "q")
    with pytest.raises(MlxMoeError, match="already quantized to 4 bits.*quantize=4"):
        mlxmoe.load(folder, quantize=8)


@pytest.fixture(scope="module")
def quantized_run(tmp_path_factory):
    """A Qwen3-MoE with Qwen3's real tokenizer (llama.cpp must read it), its mlx-lm 4-bit
    conversion, and adapters trained over that 4-bit folder."""
    root = tmp_path_factory.mktemp("prequantized")
    vocab = qwen3_tokenizer_folder(root / "float")
    hf = make_hf_model("qwen3_moe", vocab_size=vocab)
    import torch

    with torch.no_grad():
        hf.lm_head.weight.mul_(4.0)  # better-separated logits: top-1 is meaningful
    float_folder = save(hf, root / "float", style="t4")
    quantized = mlx_lm_quantized(float_folder, root / "q4")
    recipe = load_recipe(
        None,
        train=dict(
            iters=6,
            batch_size=4,
            learning_rate=5e-3,
            warmup=0,
            quantize=4,
            report_every=3,
            val_every=0,
            max_seq_len=48,
        ),
        lora=dict(strategy="all", rank=4),
    )
    recipe.model, recipe.data = str(quantized), str(write_qa_data(root / "data", n_train=8, n_valid=4))
    train(recipe, root / "run", show_progress=False)
    return float_folder, quantized, root / "run"


@pytest.mark.slow
def test_qlora_over_an_mlx_lm_quantized_base_trains(quantized_run):
    _, _, run = quantized_run
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["ce"] < rows[0]["ce"]
    assert json.loads((run / "adapter_config.json").read_text())["quantization"]["bits"] == 4


@pytest.mark.slow
def test_export_with_base_weights_merges_into_the_full_precision_release(quantized_run, tmp_path):
    float_folder, quantized, run = quantized_run
    through = export_gguf(quantized, tmp_path / "through.gguf", "f16", run, base_weights=float_folder).path
    # the same merge done directly on the float folder (the adapter's fingerprint is the
    # quantized folder's, hence force), under the quantized folder's name (general.name)
    same_name = shutil.copytree(float_folder, tmp_path / quantized.name)
    direct = export_gguf(same_name, tmp_path / "direct.gguf", "f16", run, force=True).path
    assert through.read_bytes() == direct.read_bytes()


@pytest.mark.slow
def test_base_weights_of_another_model_are_refused(quantized_run, tmp_path):
    float_folder, quantized, run = quantized_run
    other = tmp_path / "other"
    shutil.copytree(float_folder, other)
    hf = make_hf_model("qwen3_moe", seed=1, vocab_size=151936)
    save(hf, other, style="t4")
    with pytest.raises(CheckpointError, match="does not quantize to the grid"):
        export_gguf(quantized, tmp_path / "x.gguf", "f16", run, base_weights=other)
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.slow
def test_export_from_the_grid_warns_and_llama_cpp_computes_it(quantized_run, tmp_path, caplog):
    _, quantized, run = quantized_run
    with caplog.at_level(logging.WARNING):
        gguf = export_gguf(quantized, tmp_path / "grid.gguf", "f16", run).path
    assert "arrived quantized" in caplog.text and "--base-weights" in caplog.text
    from mlxmoe.adapt.files import load_adapters

    model, tokenizer = mlxmoe.load(quantized, dtype="float32")
    load_adapters(model, run)
    model.eval()
    tokens = tokenizer.encode("Repeat the word fox. fox fox fox, and the experts route it.")
    ours = np.array(model(mx.array([tokens]))[0])
    with open_gguf(gguf, n_ctx=64) as llama:
        theirs = llama_cpp_logits(llama, tokens)
    print(f"grid f16 GGUF vs our 4-bit model + adapter: max-abs {np.abs(ours - theirs).max():.3f}")
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() == 1.0
    assert np.abs(ours - theirs).max() < 0.1  # f16 rounding of the merged grid


@pytest.mark.parametrize(
    "config, message",
    [
        (
            {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}},
            "quant_method is 'fp8'",
        ),
        ({"quantization": {"bits": 4, "group_size": 64, "mode": "mxfp4"}}, "mode 'mxfp4'"),
        ({"quantization": {"bits": 4}}, "needs 'bits' and 'group_size'"),
    ],
)
def test_other_quantized_formats_are_refused_naming_the_format(tmp_path, config, message):
    folder = save(make_hf_model("qwen3_moe"), tmp_path / "m")
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, **config}))
    with pytest.raises(CheckpointError, match=message):
        mlxmoe.load(folder)


def test_a_block_scaled_tensor_is_refused_naming_it(tmp_path):
    folder = save(make_hf_model("qwen3_moe"), tmp_path / "m")
    weights = mx.load(str(folder / "model.safetensors"))
    weights["model.layers.0.self_attn.q_proj.weight_scale_inv"] = mx.ones((1, 1))
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    with pytest.raises(CheckpointError, match="q_proj.weight_scale_inv.*block-scaled"):
        mlxmoe.load(folder)
