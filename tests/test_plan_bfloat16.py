"""`mlxmoe plan` in the Mac's configuration: bfloat16 activations over a 4-bit base, float32
LoRA and routing, against real training steps on MLX's CPU backend (each in a fresh process:
tests/step_memory.py). Tiny models of five families (Qwen3.5's linear attention too), with
group sizes that divide every width and ones that leave some matrices float (the CPU runs
those experts in float32)."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import pytest
from click.testing import CliRunner
from step_memory import measure_fresh, predict, setting

from mlxmoe.cli import main

BASE = dict(
    vocab_size=2048,
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
    rope_theta=1e6,
    tie_word_embeddings=False,
)
QWEN3 = dict(
    BASE,
    model_type="qwen3_moe",
    head_dim=32,
    intermediate_size=256,
    moe_intermediate_size=128,
    num_experts=8,
    num_experts_per_tok=2,
    norm_topk_prob=True,
)
MIXTRAL = dict(BASE, model_type="mixtral", intermediate_size=192, num_local_experts=4, num_experts_per_tok=2)
QWEN2 = dict(
    BASE,
    model_type="qwen2_moe",
    num_key_value_heads=4,
    intermediate_size=256,
    moe_intermediate_size=64,
    shared_expert_intermediate_size=256,
    num_experts=8,
    num_experts_per_tok=2,
    decoder_sparse_step=1,
    mlp_only_layers=[],
)
OLMOE = dict(
    BASE,
    model_type="olmoe",
    hidden_size=96,
    num_key_value_heads=4,
    intermediate_size=128,
    num_experts=8,
    num_experts_per_tok=2,
)
# Gated DeltaNet in three layers of four (Qwen3.5's multimodal layout: text_config)
QWEN3_5 = dict(
    model_type="qwen3_5_moe",
    text_config=dict(
        BASE,
        head_dim=32,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=32,
        linear_value_head_dim=32,
        moe_intermediate_size=128,
        shared_expert_intermediate_size=128,
        num_experts=8,
        num_experts_per_tok=2,
        full_attention_interval=4,
    ),
)
MAC = dict(bits=4, dtype="bfloat16", device="cpu")

SETTINGS = [
    setting("qwen3_moe", QWEN3, **MAC),
    # expert FFN 96: group 64 leaves the down projections float
    setting("qwen3_moe F96", dict(QWEN3, moe_intermediate_size=96), checkpoint=True, **MAC),
    # expert FFN 192: group 128 leaves the down projections float
    setting("mixtral", MIXTRAL, group=128, **MAC),
    setting("mixtral", MIXTRAL, strategy="attention", **MAC),
    setting("qwen2_moe", QWEN2, strategy="shared", **MAC),
    setting("qwen2_moe", QWEN2, checkpoint=True, **MAC),
    # hidden 96: group 64 leaves attention, embeddings, head and gate/up experts float
    setting("olmoe D96", OLMOE, strategy="experts+router", **MAC),
    setting("qwen3_5_moe", QWEN3_5, **MAC),
    # the grouped dispatch: padded rows, quantized experts dequantized per product
    setting("qwen3_moe", QWEN3, dispatch="grouped", **MAC),
    setting("mixtral", MIXTRAL, group=128, dispatch="grouped", **MAC),
]


def _id(s: dict) -> str:
    ckpt = "ckpt" if s["checkpoint"] else "no-ckpt"
    return f"{s['name']}-{s['strategy']}-group{s['group']}-{ckpt}-{s['dispatch']}"


@pytest.mark.slow
@pytest.mark.parametrize("s", SETTINGS, ids=_id)
def test_bfloat16_4bit_plan_is_within_10_percent_of_a_real_cpu_step(s):
    plan = predict(s)
    assert plan.dtype == mx.bfloat16 and plan.quantization.bits == 4
    measured = measure_fresh(s)["mlx_peak"]
    assert plan.peak == pytest.approx(measured, rel=0.10), (plan.peak, measured)


# experts dominate the base (32 of FFN 256), attention-only LoRA and short sequences keep the
# adapters and activations small beside it
EXPERTS_HEAVY = dict(QWEN3, num_experts=32, moe_intermediate_size=256)


@pytest.mark.slow
@pytest.mark.parametrize("scheme", [{"bits": 4, "experts": 3}, {"bits": 8, "experts": 2, "embeddings": 6}])
def test_a_plan_with_experts_at_fewer_bits_is_within_10_percent_of_a_real_cpu_step(scheme):
    s = setting(
        "qwen3_moe E32", EXPERTS_HEAVY, batch=1, seq=64, strategy="attention", **dict(MAC, bits=scheme)
    )
    plan, four_bit = predict(s), predict(dict(s, bits=4))
    assert plan.memory.quantized < four_bit.memory.quantized
    measured = measure_fresh(s)["mlx_peak"]
    assert plan.peak == pytest.approx(measured, rel=0.10), (plan.peak, measured)


def test_a_cpu_plan_counts_the_float32_copies_a_gpu_does_not_make():
    s = SETTINGS[2]
    lines = {
        device: {i.name: i.bytes for i in predict(dict(s, device=device)).items} for device in ("cpu", "gpu")
    }
    experts, inter = MIXTRAL["num_local_experts"], MIXTRAL["intermediate_size"]
    # every layer's down projections [E, D, F]: attention's LoRA puts each MoE layer on the
    # gradient's path
    copies = BASE["num_hidden_layers"] * experts * BASE["hidden_size"] * inter * 4
    assert lines["cpu"]["activations: float experts, float32 copies"] == copies
    assert "activations: float experts, float32 copies" not in lines["gpu"]
    # the norms' inputs: float32 copies on the CPU (RMSNorm's fallback), bfloat16 on a GPU
    residual = {device: lines[device]["activations: residual stream"] for device in lines}
    assert residual["cpu"] == 2 * residual["gpu"]


def test_plan_command_follows_the_dtype_and_says_which():
    config = str(Path(__file__).parent / "fixtures" / "configs" / "olmoe-1b-7b.json")
    runs = {}
    for args in ([], ["--dtype", "float32"], ["--device", "cpu"], ["--device", "cpu", "--dtype", "bfloat16"]):
        result = CliRunner().invoke(main, ["plan", config, "--memory", "64GB", *args])
        assert result.exit_code == 0, result.output
        runs[" ".join(args)] = " ".join(result.output.split())
    assert "gpu, bfloat16 (train.dtype auto)" in runs[""]
    assert "gpu, float32," in runs["--dtype float32"]
    assert "cpu, float32 (train.dtype auto)" in runs["--device cpu"]
    assert "cpu, bfloat16," in runs["--device cpu --dtype bfloat16"]
