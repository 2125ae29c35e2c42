"""Granite MoE to GGUF and through training: our merged file is what llama.cpp's converter
writes (its GraniteMoeModel splits ``input_linear`` into gate and up experts and writes the
four multipliers as attention.scale, embedding_scale, residual_scale and logit_scale), and
llama.cpp computes from it, and from base + adapter GGUF, what our merged model computes.

A tiny Granite MoE with every multiplier away from 1 and Mixtral's SentencePiece tokenizer
(Granite's own ships in no registry package), an adapter trained for a few steps on every
projection and the router. The converter is ``convert_hf_to_gguf.py`` from the
llama-cpp-python 0.3.36 sdist (LLAMA_CPP_SRC, as in test_convert_parity.py), run on
``export_hf``'s merged folder.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from assets import mixtral_tokenizer_folder
from test_convert_parity import (
    CONVERTER,
    LLAMA_CPP_SRC,
    assert_same_tensors,
    loading_kv,
    run_converter,
    tensors,
)
from test_export import (
    F16_MAX_ABS,
    Exported,
    assert_f16_gguf_computes_the_merged_model,
    assert_q8_0_gguf_agrees_on_top1,
)
from tiny_models import make_hf_model, make_trainable_checkpoint, save, strategy_recipe, write_qa_data

import mlxmoe
from mlxmoe.errors import MlxMoeError
from mlxmoe.gguf.export import export_gguf
from mlxmoe.gguf.merge import export_hf
from mlxmoe.train import train

# Each module fixture trains an adapter and exports it: the fast loop leaves these out.
pytestmark = pytest.mark.slow

needs_converter = pytest.mark.skipif(
    not CONVERTER.is_file(),
    reason=f"llama.cpp's converter is not unpacked at {LLAMA_CPP_SRC} (LLAMA_CPP_SRC)",
)


def make_model(folder: Path, seed: int = 0) -> Path:
    vocab = mixtral_tokenizer_folder(folder)
    hf = make_hf_model("granitemoe", seed=seed, vocab_size=vocab)
    with torch.no_grad():
        hf.lm_head.weight.mul_(24.0)  # logits_scaling 6 divides them: top-1 stays meaningful
    return save(hf, folder)


class GraniteExported(Exported):
    """test_export's Exported (its llama.cpp and MLX logits) over a Granite MoE."""

    def __init__(self, root: Path):
        super().__init__("granitemoe", root, make_model(root / "model"))


@pytest.fixture(scope="module")
def granite_exported(tmp_path_factory) -> GraniteExported:
    return GraniteExported(tmp_path_factory.mktemp("granitemoe"))


@pytest.mark.proof("converter")
@needs_converter
def test_f16_tensors_and_metadata_equal_the_converters(granite_exported):
    ours, theirs = (tensors(r) for r in granite_exported.converted)
    assert sorted(ours) == sorted(theirs)
    assert {n: (t.tensor_type.name, t.shape.tolist()) for n, t in ours.items()} == {
        n: (t.tensor_type.name, t.shape.tolist()) for n, t in theirs.items()
    }
    assert "blk.0.ffn_gate_exps.weight" in ours and "blk.0.ffn_up_exps.weight" in ours
    assert [
        n for n in ours if np.asarray(ours[n].data).tobytes() != np.asarray(theirs[n].data).tobytes()
    ] == []
    ours_kv, theirs_kv = (loading_kv(r) for r in granite_exported.converted)
    assert ours_kv["granitemoe.logit_scale"][1] == 6.0 and "granitemoe.attention.scale" in ours_kv
    assert sorted(ours_kv) == sorted(theirs_kv)
    assert [k for k in ours_kv if ours_kv[k] != theirs_kv[k]] == []


@pytest.mark.proof("converter")
@needs_converter
def test_q8_0_tensors_equal_the_converters_byte_for_byte(granite_exported):
    theirs = run_converter(granite_exported.merged, "q8_0", granite_exported.root / "converter-q8_0.gguf")
    assert_same_tensors(granite_exported.gguf["q8_0"], theirs, "Q8_0")


def test_q8_0_gguf_in_llama_cpp_agrees_on_top1(granite_exported):
    assert_q8_0_gguf_agrees_on_top1(granite_exported)


@pytest.mark.slow
def test_f16_gguf_in_llama_cpp_computes_the_merged_model(granite_exported):
    assert_f16_gguf_computes_the_merged_model(granite_exported)


@pytest.mark.slow
def test_base_gguf_plus_adapter_gguf_equals_the_merged_gguf(granite_exported):
    merged = granite_exported.llama_cpp(granite_exported.gguf["f16"])
    base_plus_lora = granite_exported.llama_cpp(
        granite_exported.base_gguf, lora=granite_exported.adapter_gguf
    )
    base = granite_exported.llama_cpp(granite_exported.base_gguf)
    diff = np.abs(merged - base_plus_lora).max()
    print(
        f"granitemoe base+lora vs merged: max-abs {diff:.4f}, base vs merged "
        f"{np.abs(base - merged).max():.4f}"
    )
    assert np.abs(base - merged).max() > 10 * diff  # the adapter matters
    assert diff < F16_MAX_ABS


def test_export_hf_writes_the_hub_layout_transformers_loads(tmp_path):
    """input_linear fused again (gate rows, then up): transformers computes from the written
    folder exactly what it computes from the original."""
    hf = make_hf_model("granitemoe")
    merged = export_hf(save(hf, tmp_path / "model"), tmp_path / "merged")
    again = type(hf).from_pretrained(merged).eval()
    tokens = torch.tensor([[1, 5, 9, 33, 2, 70]])
    with torch.no_grad():
        np.testing.assert_array_equal(again(tokens).logits.numpy(), hf(tokens).logits.numpy())


def test_export_refuses_heads_llama_cpp_would_size_otherwise(tmp_path):
    folder = save(make_hf_model("granitemoe", head_dim=8), tmp_path / "model")  # 4 x 8 != 64
    with pytest.raises(MlxMoeError, match="head_dim=8"):
        export_gguf(folder, tmp_path / "x.gguf", "f16")
    assert not (tmp_path / "x.gguf").exists()


# --- training: every strategy that applies (Granite MoE has no shared expert, no dense MLP) --


@pytest.fixture(scope="module")
def granite(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("granite-train")
    # logits divided by 2, not 6: a tiny random model's logits are small, and a sixth of them
    # leaves it a few steps too few to learn (the multipliers stay away from 1)
    return (
        make_trainable_checkpoint("granitemoe", root / "model", logits_scaling=2.0),
        write_qa_data(root / "data"),
    )


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["attention", "experts", "experts+router", "all"])
def test_loss_falls_for_every_strategy_that_applies(granite, tmp_path, strategy):
    import json

    result = train(strategy_recipe(*granite, strategy), tmp_path, show_progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    print(f"granitemoe {strategy}: answer ce {rows[0]['ce']:.3f} -> {rows[-1]['ce']:.3f}")
    assert result.steps == 12
    assert rows[-1]["ce"] < rows[0]["ce"] - 0.3, [r["ce"] for r in rows]
    assert all(np.isfinite(r["aux"]) and r["aux"] > 0 and np.isfinite(r["z"]) for r in rows)  # router losses
    # the monitor: every MoE layer's load over its 6 experts, summing to 1
    layers = rows[-1]["experts"]["layers"]
    assert len(layers) == 3 and all(len(x["load"]) == 6 and abs(sum(x["load"]) - 1) < 1e-6 for x in layers)


@pytest.mark.slow
def test_qlora_in_bfloat16_over_4_bits_trains(granite, tmp_path):
    """The Mac's configuration: bfloat16 activations over a 4-bit base, float32 adapters."""
    import json

    from mlxmoe.adapt.files import read_adapter_config

    r = strategy_recipe(*granite, "experts")
    r.train.quantize, r.train.group_size, r.train.dtype = 4, 32, "bfloat16"
    train(r, tmp_path, show_progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    print(f"granitemoe QLoRA: answer ce {rows[0]['ce']:.3f} -> {rows[-1]['ce']:.3f}")
    assert rows[-1]["ce"] < rows[0]["ce"] - 0.3, [r["ce"] for r in rows]
    config = read_adapter_config(tmp_path)
    assert config["dtype"] == "bfloat16" and config["quantization"] == {"bits": 4, "group_size": 32}


def test_loaded_model_routes_top_k_logits_softmaxed_among_themselves(granite):
    model, _ = mlxmoe.load(granite[0], dtype=mx.float32)
    args = model.args
    assert (args.router_softmax, args.norm_topk_prob, args.num_experts_per_tok) == ("top_k", True, 2)
    assert (
        args.embedding_multiplier,
        args.attention_multiplier,
        args.residual_multiplier,
        args.logits_scaling,
    ) == (12.0, 0.0625, 0.22, 2.0)
