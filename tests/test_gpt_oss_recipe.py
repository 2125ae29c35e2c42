"""gpt-oss-20b from its public config.json: `mlxmoe info` counts the parameters OpenAI publishes,
quantized weights keep the experts in MXFP4 as `load_model` does, and recipes/gpt-oss-20b.yaml
plans under a 32 GB Mac's default GPU limit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from mlxmoe.config import ConfigView
from mlxmoe.info import lazy_model, model_info, quantize_as_loaded
from mlxmoe.plan.advice import budget
from mlxmoe.plan.training import plan_training
from mlxmoe.recipe import load_recipe

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "tests" / "fixtures" / "configs" / "gpt-oss-20b.json"
RECIPE = REPO / "recipes" / "gpt-oss-20b.yaml"


def test_info_counts_the_parameters_of_openais_model_card():
    info = model_info(CONFIG)
    assert (info.family, info.layers, info.moe_layers) == ("gpt_oss", 24, 24)
    assert (info.experts, info.experts_per_token) == (32, 4)
    # The gpt-oss model card: 20.91 B parameters, 3.61 B active per token (without the
    # embedding table, which ours counts: 201,088 x 2,880).
    assert round(info.total_params / 1e9, 2) == 20.91
    assert round((info.active_params - 201088 * 2880) / 1e9, 2) == 3.61


def test_quantized_weights_keep_the_published_mxfp4_experts_at_4_25_bits():
    raw = json.loads(CONFIG.read_text())
    small = {**raw, "num_hidden_layers": 2, "layer_types": raw["layer_types"][:2]}
    for bits in (4, 8):
        model = lazy_model(ConfigView(small))
        quantize_as_loaded(model, bits, 64)
        experts = model.layers[0].moe.experts
        for proj in ("gate_proj", "up_proj", "down_proj"):
            layer = getattr(experts, proj)
            # The hub's MXFP4 tensors: 16 bytes of E2M1 codes and one E8M0 scale per 32 inputs.
            assert layer.weight.nbytes + layer.scales.nbytes == 32 * 2880 * 2880 * 17 // 32
            assert layer.scales.dtype == mx.uint8 and "biases" not in layer
        attention = model.layers[0].attn.q_proj
        assert attention.bits == bits and attention.group_size == 64
    float_model = lazy_model(ConfigView({k: v for k, v in small.items() if k != "quantization_config"}))
    quantize_as_loaded(float_model, 4, 64)  # a float release is quantized like any model
    assert float_model.layers[0].moe.experts.gate_proj.group_size == 64


def test_recipe_plans_under_a_32gb_macs_default_gpu_limit():
    recipe = load_recipe(RECIPE)
    assert recipe.model == "openai/gpt-oss-20b" and recipe.train.quantize == 4
    plan = plan_training(ConfigView(json.loads(CONFIG.read_text()), CONFIG), recipe)
    mac = budget("32GB")
    assert plan.peak <= mac.wired_default
    assert plan.memory.quantized + plan.memory.unquantized < 11 * 2**30  # MXFP4 experts
    # Twice the batch would not fit: the recipe uses what the default limit allows.
    recipe.train.batch_size *= 2
    assert (
        plan_training(ConfigView(json.loads(CONFIG.read_text()), CONFIG), recipe, memory=plan.memory).peak
        > mac.wired_default
    )


@pytest.mark.slow
def test_cli_plan_says_the_recipe_fits():
    proc = subprocess.run(
        [sys.executable, "-m", "mlxmoe", "plan", str(CONFIG), "--recipe", str(RECIPE), "--memory", "32GB"],
        capture_output=True,
        text=True,
        env={"COLUMNS": "200", "PATH": ""},
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fits under the default GPU limit" in proc.stdout
    assert "experts MXFP4 as published" in proc.stdout
