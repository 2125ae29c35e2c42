"""`mlxmoe plan` on DeepSeek-V2's multi-head latent attention against real training steps on
MLX's CPU backend, each in a fresh process (tests/step_memory.py): V2-Lite's layout (queries
from q_proj) and V2's (queries through the q_a / q_b latent), float32 and the Mac's
configuration (bfloat16 over 4 bits), checkpointing on and off."""

from __future__ import annotations

import pytest
from step_memory import measure_fresh, predict, setting

# Each test measures a training step in a child process: the fast loop leaves these out.
pytestmark = pytest.mark.slow

LITE = dict(
    model_type="deepseek_v2",
    vocab_size=4096,
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=8,
    intermediate_size=512,
    moe_intermediate_size=128,
    n_routed_experts=16,
    num_experts_per_tok=4,
    n_shared_experts=2,
    first_k_dense_replace=1,
    q_lora_rank=None,
    kv_lora_rank=128,
    qk_nope_head_dim=64,
    qk_rope_head_dim=32,
    v_head_dim=64,
    routed_scaling_factor=1.0,
    topk_method="greedy",
    n_group=1,
    topk_group=1,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    rope_theta=1e4,
    tie_word_embeddings=False,
)
V2 = dict(LITE, q_lora_rank=96)
MAC = dict(bits=4, dtype="bfloat16", device="cpu")
F32 = dict(dtype="float32", device="cpu")

SETTINGS = [
    setting("deepseek-v2-lite", LITE, **F32),
    setting("deepseek-v2", V2, **F32),
    setting("deepseek-v2", V2, checkpoint=True, **F32),
    setting("deepseek-v2", V2, **MAC),
]


def _id(s: dict) -> str:
    return f"{s['name']}-{s['bits']}bit-{s['dtype']}-{'ckpt' if s['checkpoint'] else 'no-ckpt'}"


@pytest.mark.parametrize("s", SETTINGS, ids=_id)
def test_plan_with_latent_attention_is_within_10_percent_of_a_real_cpu_step(s):
    """The latent projections (q_a, q_b, kv_a, kv_b) are attention: the plan keeps what they
    feed for the backward pass whichever of them are adapted (it once counted nothing for a
    model without q_proj, 10% under)."""
    plan = predict(s)
    measured = measure_fresh(s)["mlx_peak"]
    assert plan.peak == pytest.approx(measured, rel=0.10), (plan.peak, measured)
