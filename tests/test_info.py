"""`mlxmoe info`: parameters and weight memory from config.json alone."""

from __future__ import annotations

from math import prod
from pathlib import Path

import mlx.core as mx
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten
from tiny_models import make_hf_model, save

import mlxmoe
from mlxmoe.cli import main
from mlxmoe.commands._ui import console
from mlxmoe.info import model_info

CONFIGS = Path(__file__).parent / "fixtures" / "configs"


@pytest.mark.parametrize(
    "config, total_b, active_b",
    [
        # Published sizes: Mixtral 46.7B/12.9B, Qwen1.5-MoE 14.3B/2.7B, Qwen3 30.5B/3.3B,
        # OLMoE 6.9B/1.3B.
        ("mixtral-8x7b.json", 46.7, 12.9),
        ("qwen1.5-moe-a2.7b.json", 14.3, 2.7),
        ("qwen3-30b-a3b.json", 30.5, 3.3),
        ("olmoe-1b-7b.json", 6.9, 1.3),
    ],
)
def test_parameter_counts_match_the_published_sizes(config, total_b, active_b):
    info = model_info(CONFIGS / config)
    assert info.total_params / 1e9 == pytest.approx(total_b, abs=0.05)
    assert info.active_params / 1e9 == pytest.approx(active_b, abs=0.1 * active_b)


def test_mixtral_weight_memory_at_each_precision():
    info = model_info(CONFIGS / "mixtral-8x7b.json")
    assert info.experts == 8 and info.experts_per_token == 2 and info.moe_layers == 32
    gib = {bits: size / 2**30 for bits, size in info.weight_bytes.items()}
    # 4 bits + one 16-bit scale and bias per 64 weights = 4.5 bits per quantized weight
    assert gib[16] == pytest.approx(87.0, abs=0.1)
    assert gib[4] == pytest.approx(87.0 * 4.5 / 16, rel=0.01)


@pytest.mark.parametrize("bits", [4, 8])
def test_memory_equals_the_arrays_our_quantizer_produces(bits, tmp_path):
    folder = save(make_hf_model("qwen2_moe"), tmp_path)
    model, _ = mlxmoe.load(folder, quantize=bits, dtype=mx.bfloat16)
    actual = sum(prod(v.shape) * v.dtype.size for _, v in tree_flatten(model.parameters()))
    assert model_info(folder).weight_bytes[bits] == actual


def test_memory_of_a_scheme_equals_the_arrays_our_quantizer_produces(tmp_path, monkeypatch):
    folder = save(make_hf_model("qwen2_moe"), tmp_path)
    scheme = "4,experts=3,shared_experts=2,attention=8,embeddings=none"
    model, _ = mlxmoe.load(folder, quantize=scheme, group_size=32, dtype=mx.bfloat16)
    actual = sum(prod(v.shape) * v.dtype.size for _, v in tree_flatten(model.parameters()))
    info = model_info(folder, group_size=32, quantize=scheme)
    assert info.scheme_bytes == actual < info.weight_bytes[16]
    # the CLI's console took its width when first imported, whichever test that was
    monkeypatch.setattr(console, "width", 200)
    result = CliRunner().invoke(
        main, ["info", str(folder), "--group-size", "32", "--quantize", "4,experts=3"]
    )
    assert result.exit_code == 0 and "weights at 4-bit, experts 3-bit (group 32)" in result.output, (
        result.output
    )
    bad = CliRunner().invoke(main, ["info", str(folder), "--quantize", "4,expert=3"])
    assert bad.exit_code == 2 and "unknown key 'expert'" in bad.output


def test_info_command_prints_the_summary():
    result = CliRunner().invoke(main, ["info", str(CONFIGS / "qwen1.5-moe-a2.7b.json")])
    assert result.exit_code == 0, result.output
    assert "qwen2_moe" in result.output
    assert "60 routed + 1 shared, 4 active per token" in result.output
