"""Qwen3.5-35B-A3B from its public config.json: `mlxmoe info` counts the parameters Qwen
publishes for the language model, and recipes/qwen3.5-35b-a3b.yaml plans under a 32 GB Mac's
default GPU limit, its load included, where the default strategy (routed experts) would not."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from mlxmoe.cli import main
from mlxmoe.config import ConfigView
from mlxmoe.info import model_info
from mlxmoe.plan.advice import budget
from mlxmoe.plan.load import plan_load
from mlxmoe.plan.training import plan_training
from mlxmoe.recipe import load_recipe

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "tests" / "fixtures" / "configs" / "qwen3.5-35b-a3b.json"
RECIPE = REPO / "recipes" / "qwen3.5-35b-a3b.yaml"
GiB = 2**30


def _cfg() -> ConfigView:
    return ConfigView(json.loads(CONFIG.read_text()), CONFIG)


def test_info_counts_the_35b_total_and_3b_active_parameters_qwen_publishes():
    info = model_info(CONFIG)
    assert (info.family, info.layers, info.moe_layers) == ("qwen3_5_moe", 40, 40)
    assert (info.experts, info.experts_per_token) == (256, 8)
    # Qwen's model card: 35B in total, 3B activated (the language model; ours counts the
    # embedding table, 248,320 x 2,048, which a token reads one row of).
    assert round(info.total_params / 1e9) == 35
    assert round((info.active_params - 248320 * 2048) / 1e9) == 3


def test_recipe_plans_under_a_32gb_macs_default_gpu_limit_load_included():
    recipe = load_recipe(RECIPE)
    assert recipe.model == "Qwen/Qwen3.5-35B-A3B" and recipe.train.quantize == 4
    cfg = _cfg()
    plan = plan_training(cfg, recipe)
    mac = budget("32GB")
    assert plan.peak <= mac.wired_default
    assert plan_load(cfg, 4, recipe.train.group_size, plan.dtype).peak <= mac.wired_default
    # The routed experts at rank 2 would not fit: the recipe adapts the shared expert
    experts = load_recipe(RECIPE, lora={"strategy": "experts", "rank": 2})
    assert plan_training(cfg, experts).peak > mac.wired_default


def test_plan_command_says_the_recipe_fits():
    result = CliRunner().invoke(
        main, ["plan", str(CONFIG), "--recipe", str(RECIPE), "--memory", "32GB"], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "fits under the default GPU limit" in text
    assert "LoRA shared rank 8" in text and "bfloat16" in text
