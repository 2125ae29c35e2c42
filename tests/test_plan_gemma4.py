"""`mlxmoe plan` on Gemma-4 (a dense GELU MLP beside the experts in every layer, sliding and
full attention of different head sizes, soft-capped logits) against real training steps on
MLX's CPU backend, each in a fresh process (tests/step_memory.py); and the recipe for a 32 GB
Mac, sized by the plan on the published 26B-A4B config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from step_memory import measure_fresh, predict, setting

from mlxmoe.config import ConfigView
from mlxmoe.recipe import load_recipe

pytestmark = pytest.mark.slow

S, F = "sliding_attention", "full_attention"
GEMMA4 = dict(
    model_type="gemma4_text",
    vocab_size=2048,
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    global_head_dim=64,
    num_global_key_value_heads=1,
    attention_k_eq_v=True,
    intermediate_size=256,
    moe_intermediate_size=128,
    num_experts=8,
    top_k_experts=2,
    enable_moe_block=True,
    hidden_size_per_layer_input=0,
    sliding_window=64,  # the sequences are 256 long
    layer_types=[S, F, S, F],
    final_logit_softcapping=30.0,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)

SETTINGS = [
    setting("gemma4", GEMMA4, device="cpu", dtype="float32"),
    setting("gemma4", GEMMA4, device="cpu", dtype="float32", strategy="all"),  # the dense MLP too
    setting("gemma4", GEMMA4, device="cpu", dtype="float32", checkpoint=True),
    setting("gemma4", dict(GEMMA4, final_logit_softcapping=None), device="cpu", dtype="float32"),
    # the Mac's configuration: bfloat16 over 4 bits
    setting("gemma4", GEMMA4, bits=4, group=32, device="cpu", dtype="bfloat16"),
    setting("gemma4", GEMMA4, bits=4, group=32, checkpoint=True, device="cpu", dtype="bfloat16"),
]


def _id(s: dict) -> str:
    cap = "capped" if s["config"]["final_logit_softcapping"] else "uncapped"
    return f"{s['dtype']}-{s['bits']}bit-{s['strategy']}-{'ckpt' if s['checkpoint'] else 'no-ckpt'}-{cap}"


@pytest.mark.parametrize("s", SETTINGS, ids=_id)
def test_plan_is_within_10_percent_of_a_real_cpu_step(s):
    plan = predict(s)
    lines = {i.name for i in plan.items}
    assert s["checkpoint"] or {"activations: feed-forward", "activations: norms (float32 inputs)"} <= lines
    measured = measure_fresh(s)["mlx_peak"]
    print(f"{_id(s)}: plan {plan.peak / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB")
    assert plan.peak == pytest.approx(measured, rel=0.10), (plan.peak, measured)


FIXTURE = Path(__file__).parent / "fixtures" / "configs" / "gemma-4-26b-a4b.json"
RECIPE = Path(__file__).parent.parent / "recipes" / "gemma-4-26b-a4b.yaml"


def test_26b_a4b_recipe_fits_a_32_gb_mac_with_checkpointing_and_not_without():
    from mlxmoe.plan.advice import budget, verdict
    from mlxmoe.plan.training import plan_training

    cfg = ConfigView(json.loads(FIXTURE.read_text()))
    recipe = load_recipe(RECIPE)
    assert recipe.train.grad_checkpoint and "dense_mlp" in recipe.lora.targets
    ckpt = plan_training(cfg, recipe)
    recipe.train.grad_checkpoint = False
    full = plan_training(cfg, recipe, memory=ckpt.memory)
    mac = budget("32GB")
    base = ckpt.memory.quantized + ckpt.memory.unquantized
    print(
        f"gemma-4-26b-a4b recipe: base {base / 2**30:.2f} GiB, peak {ckpt.peak / 2**30:.2f} GiB "
        f"({full.peak / 2**30:.2f} without checkpointing), default limit {mac.wired_default / 2**30:.2f}"
    )
    assert 13 * 2**30 < base < 14 * 2**30  # 25.2B parameters at 4 bits and a bit
    assert verdict(ckpt.peak, mac).fits_default and not verdict(full.peak, mac).fits_default
    text = RECIPE.read_text()
    assert f"{ckpt.peak / 2**30:.1f} GiB peak ({full.peak / 2**30:.1f} without)" in text
