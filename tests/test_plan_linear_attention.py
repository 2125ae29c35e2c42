"""`mlxmoe plan` on Qwen3-Next and Qwen3.5-MoE (Gated DeltaNet layers in three of four, gated
attention in the fourth) against real training steps on MLX's CPU backend, each in a fresh
process (tests/step_memory.py): float32, float and 4-bit bases, with and without gradient
checkpointing. The Mac's configuration (bfloat16 over 4 bits) is in test_plan_bfloat16.py."""

from __future__ import annotations

import pytest
from step_memory import LINEAR, measure_fresh, predict, setting

# Each test measures a training step in a child process: the fast loop leaves these out.
pytestmark = pytest.mark.slow

QWEN3_NEXT = dict(LINEAR, model_type="qwen3_next", intermediate_size=256, norm_topk_prob=True)
QWEN3_5 = dict(model_type="qwen3_5_moe", text_config=LINEAR)  # the multimodal config's layout

SETTINGS = [
    setting("qwen3_next", QWEN3_NEXT, device="cpu", dtype="float32"),
    setting("qwen3_5_moe", QWEN3_5, device="cpu", dtype="float32", strategy="attention"),
    setting("qwen3_next", QWEN3_NEXT, bits=4, checkpoint=True, device="cpu", dtype="float32"),
]


def _id(s: dict) -> str:
    return f"{s['name']}-{s['bits']}bit-{s['strategy']}-{'ckpt' if s['checkpoint'] else 'no-ckpt'}"


@pytest.mark.parametrize("s", SETTINGS, ids=_id)
def test_plan_with_linear_attention_is_within_10_percent_of_a_real_cpu_step(s):
    plan = predict(s)
    lines = {i.name for i in plan.items}
    assert s["checkpoint"] or "activations: linear attention" in lines
    measured = measure_fresh(s)["mlx_peak"]
    assert plan.peak == pytest.approx(measured, rel=0.10), (plan.peak, measured)
