"""mlx-lm's own gpt-oss folders (what mlx-community publishes): ``mlx_lm.convert`` of gpt-oss
as released, its experts in MXFP4, keeps them in MLX's mxfp4 mode (``quantization.mode:
mxfp4``) and quantizes the other layers affine with ``-q`` (routers at 8 bits). mlxmoe reads
them as a QLoRA base: the experts and the ``-q`` layers as they are, routers dequantized.

mlx-lm 0.32 converts only the MXFP4 release (its sanitize renames a float ``gate_up_proj``
without splitting it) and always rounds YaRN's correction range, as llama.cpp does: gpt-oss
ships ``truncate: false``, so logits are compared with mlx-lm's on ``truncate: true`` configs,
and with transformers' on gpt-oss's own."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from test_gpt_oss import SHAPES, make_gpt_oss
from test_gpt_oss import save as save_gpt_oss
from test_gpt_oss_train import mxfp4_experts
from tiny_models import hf_forward, make_tokenizer, write_qa_data

import mlxmoe
from mlxmoe.errors import CheckpointError
from mlxmoe.nn.moe import QuantizedExpertLinear

ROUNDED_YARN = dict(
    rope_type="yarn",
    rope_theta=150000.0,
    factor=32.0,
    beta_fast=32.0,
    beta_slow=1.0,
    truncate=True,
    original_max_position_embeddings=4096,
)
TOKENS = np.random.default_rng(0).integers(0, 300, (2, 40))


def published(folder: Path, **config) -> Path:
    """A tiny gpt-oss as the hub publishes it: MXFP4 experts, transformers-4 config keys."""
    tokenizer = make_tokenizer(folder)
    hf = make_gpt_oss(**{**SHAPES["gqa-window-4"], "vocab_size": len(tokenizer), **config})
    return mxfp4_experts(save_gpt_oss(hf, folder, style="t4"))


def mlx_lm_convert(folder: Path, out: Path, **options) -> Path:
    from mlx_lm.convert import convert

    convert(str(folder), str(out), **options)
    return out


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    return published(tmp_path_factory.mktemp("gpt-oss") / "hub", rope_parameters=ROUNDED_YARN)


@pytest.mark.parametrize(
    "options, stored",
    [
        (dict(quantize=True, q_bits=4, q_group_size=32), (4, 32)),
        (dict(quantize=True, q_bits=8, q_group_size=64), (8, 64)),
        (dict(dtype="float32"), None),  # experts in mxfp4, the rest float
    ],
)
def test_an_mlx_lm_gpt_oss_folder_computes_what_mlx_lm_computes(release, tmp_path, options, stored):
    import mlx_lm

    folder = mlx_lm_convert(release, tmp_path / "mlx", **options)
    assert json.loads((folder / "config.json").read_text())["quantization"]["mode"] == "mxfp4"
    reference, _ = mlx_lm.load(str(folder))
    ours, _ = mlxmoe.load(folder, dtype="float32")
    layer = ours.layers[0]
    assert layer.moe.router.weight.dtype == mx.float32  # mlx-lm's 8-bit router, dequantized
    experts = [layer.moe.experts[p] for p in ("gate_proj", "up_proj", "down_proj")]
    if stored is None:  # no -q: a float base whose experts arrive in MXFP4, as the hub's release
        assert ours.quantization is None and not any(isinstance(e, QuantizedExpertLinear) for e in experts)
    else:  # the frozen QLoRA base as stored: experts in mxfp4, the rest at -q's bits
        assert (ours.quantization.bits, ours.quantization.group_size) == stored
        assert all(isinstance(e, QuantizedExpertLinear) and e.mode == "mxfp4" for e in experts)
        saved = mx.load(str(folder / "model.safetensors"))
        assert np.array_equal(
            np.array(layer.moe.experts.down_proj.weight),
            np.array(saved["model.layers.0.mlp.experts.down_proj.weight"]),
        )
        q_proj = layer.attn.q_proj
        assert (q_proj.bits, q_proj.group_size, q_proj.mode) == (*stored, "affine")
    ours_logits, ref_logits = ours(mx.array(TOKENS)), reference(mx.array(TOKENS))
    mx.eval(ours_logits, ref_logits)
    diff = mx.abs(ours_logits - ref_logits).max().item()
    print(f"gpt-oss mlx-lm {stored or 'float'} folder: max-abs {diff:.1e} against mlx-lm")
    assert diff < 1e-5  # measured 3e-6 to 4e-6: the same kernels on the same arrays


def test_on_gpt_oss_own_yarn_the_mlx_lm_folder_computes_what_transformers_computes(tmp_path):
    """``truncate: false`` (gpt-oss's config): mlxmoe computes the reference's YaRN from mlx-lm's
    folder; mlx-lm itself rounds the correction range (measured max-abs 1.9 over 40 tokens)."""
    import mlx_lm
    import torch
    import transformers

    hub = published(tmp_path / "hub")
    folder = mlx_lm_convert(hub, tmp_path / "mlx", dtype="float32")
    hf = transformers.GptOssForCausalLM.from_pretrained(
        hub, quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.float32
    )
    ref_logits, _ = hf_forward(hf, TOKENS)
    ours, _ = mlxmoe.load(folder, dtype="float32")
    mlx_lm_logits = mlx_lm.load(str(folder))[0](mx.array(TOKENS))
    ours_diff = np.abs(np.array(ours(mx.array(TOKENS))) - ref_logits).max()
    print(
        f"gpt-oss truncate false: ours {ours_diff:.1e}, mlx-lm "
        f"{np.abs(np.array(mlx_lm_logits) - ref_logits).max():.2f} against transformers"
    )
    assert ours_diff < 1e-4


def test_mxfp4_beyond_the_experts_is_refused_naming_the_mode(release, tmp_path):
    folder = mlx_lm_convert(release, tmp_path / "mlx", quantize=True, q_mode="mxfp4")
    with pytest.raises(
        CheckpointError,
        match=r"layers other than the experts in mode 'mxfp4' "
        r"\(mlx_lm.convert --q-mode mxfp4\)",
    ):
        mlxmoe.load(folder)


@pytest.mark.slow
def test_qlora_over_an_mlx_lm_gpt_oss_folder_trains_the_adapters(release, tmp_path):
    from mlxmoe.adapt.files import load_adapters, read_adapter_config
    from mlxmoe.recipe import load_recipe
    from mlxmoe.train import train

    folder = mlx_lm_convert(release, tmp_path / "mlx", quantize=True, q_bits=4, q_group_size=32)
    r = load_recipe(
        None,
        train=dict(
            iters=8,
            batch_size=4,
            learning_rate=5e-3,
            warmup=0,
            quantize=4,
            dtype="bfloat16",
            report_every=1,
            val_every=0,
            max_seq_len=48,
        ),
        lora=dict(strategy="experts", rank=4),
    )
    r.model, r.data = str(folder), str(write_qa_data(tmp_path / "data", n_train=32, n_valid=4))
    train(r, tmp_path / "run", show_progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ce = [r["ce"] for r in rows]
    print("gpt-oss mlx-lm 4-bit QLoRA: ce", [round(c, 2) for c in ce])
    assert np.mean(ce[-4:]) < np.mean(ce[:2]) - 0.3  # batches differ: the trend, not one step
    assert all(np.isfinite(r["aux"]) and np.isfinite(r["z"]) for r in rows)
    assert read_adapter_config(tmp_path / "run")["quantization"] == {"bits": 4, "group_size": 32}
    model, _ = mlxmoe.load(folder, quantize=4, dtype="bfloat16")
    base = model(mx.array(TOKENS[:1]))
    load_adapters(model, tmp_path / "run")
    tuned = model(mx.array(TOKENS[:1]))
    mx.eval(base, tuned)
    assert mx.abs(tuned.astype(mx.float32) - base.astype(mx.float32)).max().item() > 1e-3
