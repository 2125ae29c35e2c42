"""`mlxmoe plan`: the memory arithmetic against real arrays, and one real training step."""

from __future__ import annotations

import json
from math import prod
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten, tree_unflatten

from mlxmoe.adapt import AdapterSpec, apply_adapters
from mlxmoe.checkpoint import role_is_router
from mlxmoe.cli import main
from mlxmoe.config import ConfigView
from mlxmoe.data import Batch
from mlxmoe.errors import MlxMoeError
from mlxmoe.info import lazy_model
from mlxmoe.nn.grouped import padded_rows
from mlxmoe.nn.moe import set_dispatch
from mlxmoe.plan.advice import GiB, budget, parse_size, suggestions, target, verdict
from mlxmoe.plan.training import model_memory, plan_training, planned_dispatch
from mlxmoe.quantize import quantize_model
from mlxmoe.recipe import load_recipe
from mlxmoe.train.step import Stepper

CONFIGS = Path(__file__).parent / "fixtures" / "configs"
RECIPES = Path(__file__).parent.parent / "recipes"
PUBLIC = ["mixtral-8x7b", "qwen1.5-moe-a2.7b", "qwen3-30b-a3b", "olmoe-1b-7b", "granite-3.1-3b-a800m"]
EXPERT_KEYS = ("num_local_experts", "num_experts")


def _real_bytes(module: nn.Module) -> int:
    mx.eval(module.parameters())
    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def _quantized_layer_bytes(raw: dict, experts: int) -> int:
    """One real decoder layer of this config with ``experts`` experts: zero-filled bf16 arrays
    (float32 routers), quantized to 4 bits by our quantizer, at its model path."""
    raw = {
        **raw,
        **{k: experts for k in EXPERT_KEYS if k in raw},
        "num_experts_per_tok": 1,
        "num_hidden_layers": 1,
    }
    holder = nn.Module()
    holder.layers = [lazy_model(ConfigView(raw)).layers[0]]
    holder.update(
        tree_unflatten(
            [
                (k, mx.zeros(v.shape, mx.float32 if role_is_router(k) else mx.bfloat16))
                for k, v in tree_flatten(holder.parameters())
            ]
        )
    )
    quantize_model(holder, 4, 64)
    return _real_bytes(holder)


def _quantized_rows_bytes(module: nn.Module, rows: int) -> int:
    """Bytes per row of a real quantized embedding or head, times ``rows``."""
    module.update(
        tree_unflatten([(k, mx.zeros(v.shape, mx.bfloat16)) for k, v in tree_flatten(module.parameters())])
    )
    quantize_model(module, 4, 64)
    size = _real_bytes(module)
    return size // 64 * rows


@pytest.mark.parametrize("name", PUBLIC)
def test_4bit_weights_equal_our_quantizers_arrays_for_same_shape_layers(name):
    raw = json.loads((CONFIGS / f"{name}.json").read_text())
    experts = next(raw[k] for k in EXPERT_KEYS if k in raw)
    assert raw.get("decoder_sparse_step", 1) == 1 and not raw.get("mlp_only_layers")  # all MoE
    one, two = _quantized_layer_bytes(raw, 1), _quantized_layer_bytes(raw, 2)
    layer = one + (experts - 1) * (two - one)  # per-expert tensors and router rows scale
    hidden, vocab = raw["hidden_size"], raw["vocab_size"]
    holder = nn.Module()
    holder.embed_tokens = nn.Embedding(64, hidden)
    if not raw.get("tie_word_embeddings"):  # Granite's head is its embedding
        holder.lm_head = nn.Linear(hidden, 64, bias=False)
    expected = (
        raw["num_hidden_layers"] * layer + _quantized_rows_bytes(holder, vocab) + hidden * 2
    )  # the final norm
    memory = model_memory(ConfigView(raw), mx.bfloat16, 4, 64, AdapterSpec())
    assert memory.quantized + memory.unquantized == expected
    assert "routers (float32)" in memory.unquantized_kinds and "norms" in memory.unquantized_kinds


@pytest.mark.parametrize("name", PUBLIC)
def test_recipe_defaults_plan_is_above_the_base_and_checkpointing_lowers_it(name):
    recipe_file = {
        "mixtral-8x7b": "mixtral-8x7b-instruct",
        "granite-3.1-3b-a800m": "granite-moe-3b-a800m",
    }.get(name, name)
    recipe = load_recipe(RECIPES / f"{recipe_file}.yaml", train={"grad_checkpoint": False})
    cfg = ConfigView(json.loads((CONFIGS / f"{name}.json").read_text()))
    full = plan_training(cfg, recipe)
    recipe.train.grad_checkpoint = True
    ckpt = plan_training(cfg, recipe, memory=full.memory)
    base = full.memory.quantized + full.memory.unquantized
    assert base < ckpt.peak < full.peak
    # LoRA parameters, AdamW moments and gradients: four float32 copies at least
    assert ckpt.peak - base >= 4 * full.memory.adapters


TINY = dict(
    model_type="qwen3_moe",
    vocab_size=2048,
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    intermediate_size=256,
    moe_intermediate_size=128,
    num_experts=8,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
    rope_theta=1e6,
    tie_word_embeddings=False,
)


def _tiny_training(recipe):
    mx.random.seed(0)
    model = lazy_model(ConfigView(TINY))
    model.update(tree_unflatten([(k, v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())]))
    if recipe.train.quantize:
        quantize_model(model, recipe.train.quantize, recipe.train.group_size)
    apply_adapters(model, recipe.lora)
    set_dispatch(model, recipe.train.moe_dispatch)
    model.grad_checkpoint = recipe.train.grad_checkpoint
    model.train()
    optimizer = optim.AdamW(learning_rate=1e-4)
    optimizer.init(model.trainable_parameters())
    mx.eval(model.parameters(), optimizer.state)
    return model, optimizer


def test_planned_adapters_and_optimizer_state_are_the_real_ones():
    recipe = load_recipe(RECIPES / "tiny-cpu-demo.yaml", train={"quantize": 4})
    model, optimizer = _tiny_training(recipe)
    plan = plan_training(ConfigView(TINY), recipe, "cpu")
    lora = sum(v.nbytes for _, v in tree_flatten(model.trainable_parameters()))
    state = sum(v.nbytes for k, v in tree_flatten(optimizer.state) if k.endswith((".m", ".v")))
    items = {i.name: i.bytes for i in plan.items}
    assert items["LoRA parameters"] == lora
    assert items["AdamW state"] == state
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters())) - lora
    assert items["base weights (quantized)"] + items["base weights (unquantized)"] == weights


def _measured_step_peak(recipe) -> int:
    model, optimizer = _tiny_training(recipe)
    stepper = Stepper(model, optimizer, recipe.loss, recipe.train.grad_clip, recipe.train.compile)
    rng = np.random.default_rng(0)
    shape = (recipe.train.batch_size, recipe.train.max_seq_len)
    tokens = [mx.array(rng.integers(0, TINY["vocab_size"], shape, dtype=np.int32)) for _ in range(2)]
    batch = Batch(tokens[0], tokens[1], mx.ones(shape), mx.ones(shape), prod(shape), prod(shape))
    mx.eval(batch.inputs, batch.targets, batch.loss_mask, batch.token_mask)
    mx.reset_peak_memory()
    stepper.step([batch])
    return mx.get_peak_memory()


# The dispatch is named, not auto: the test process runs MLX's bundled BLAS, where auto is
# gather, while a plan on a Linux machine with OpenBLAS installed assumes dense.
@pytest.mark.skipif(
    mx.default_device() != mx.cpu,
    reason="compares a plan for MLX's CPU backend with a step on the default device",
)
@pytest.mark.parametrize("dispatch", ["gather", "dense", "grouped"])
def test_planned_peak_is_within_10_percent_of_a_real_training_step(dispatch):
    recipe = load_recipe(
        RECIPES / "tiny-cpu-demo.yaml",
        train={"quantize": 0, "batch_size": 2, "max_seq_len": 256, "moe_dispatch": dispatch},
    )
    measured = _measured_step_peak(recipe)
    plan = plan_training(ConfigView(TINY), recipe, "cpu")
    assert plan.dispatch == dispatch
    assert plan.peak == pytest.approx(measured, rel=0.10), (plan.peak, measured)


def test_auto_dispatch_on_a_fast_blas_cpu_is_dense_for_large_float_experts_else_grouped(monkeypatch):
    def dispatch(device="cpu", fast=True, quantize=0, cfg=TINY, setting="auto"):
        monkeypatch.setattr("mlxmoe.plan.training.fast_cpu_blas", lambda: fast)
        recipe = load_recipe(None, train={"quantize": quantize, "moe_dispatch": setting})
        return planned_dispatch(lazy_model(ConfigView(cfg)).args, recipe.train, device)

    wide = {**TINY, "moe_intermediate_size": 8192}  # 128 x 8192 experts: dense's size at E/k 4
    assert dispatch(cfg=wide) == "dense"
    assert dispatch() == "grouped"  # 128 x 128 experts: too small for dense
    mid = {**TINY, "moe_intermediate_size": 1024}  # 128 x 1024: dense pays at E/k 3, not 4
    assert dispatch(cfg=mid) == "grouped" and dispatch(cfg={**mid, "num_experts": 6}) == "dense"
    assert dispatch(cfg=wide, device="gpu") == dispatch(cfg=wide, fast=False) == "gather"
    assert dispatch(cfg=wide, quantize=4) == "grouped"
    many = {**wide, "num_experts": 32}  # 16 experts per choice
    assert dispatch(cfg=many) == "grouped" and dispatch(cfg=many, setting="dense") == "dense"
    assert dispatch(fast=False, setting="dense") == "dense"
    with pytest.raises(MlxMoeError, match="float experts"):
        dispatch(quantize=4, setting="dense")


def _tiny_cpu_plans(quantize: int, *dispatches: str) -> tuple[dict, dict]:
    """A plan of a batch of 2 x 256 tokens on the CPU, by dispatch, and its expert activations."""
    recipe = load_recipe(None, train={"quantize": quantize, "batch_size": 2, "max_seq_len": 256})
    plans = {}
    for d in dispatches:
        recipe.train.moe_dispatch = d
        plans[d] = plan_training(ConfigView(TINY), recipe, "cpu")
    experts = {d: {i.name: i.bytes for i in p.items}["activations: experts"] for d, p in plans.items()}
    return plans, experts


def test_dense_plan_keeps_every_experts_activations_and_says_so():
    plans, experts = _tiny_cpu_plans(0, "gather", "dense")
    choices = TINY["num_experts"] // TINY["num_experts_per_tok"]
    assert experts["dense"] == choices * experts["gather"]
    dispatch_line = {
        d: next(i.detail for i in p.items if i.name == "activations: MoE dispatch") for d, p in plans.items()
    }
    assert "dense" in dispatch_line["dense"] and "gather" in dispatch_line["gather"]
    result = CliRunner().invoke(
        main, ["plan", str(CONFIGS / "mixtral-8x7b.json"), "--device", "gpu", "--memory", "64GB"]
    )
    assert result.exit_code == 0 and "gather dispatch" in result.output, result.output


def test_sizes_parse_in_binary_units_and_refuse_nonsense():
    assert parse_size("32GB") == 32 * GiB == parse_size("32 gib") == parse_size("32")
    assert parse_size("512MB") == 512 * 2**20
    with pytest.raises(MlxMoeError, match="expected a size"):
        parse_size("lots")


def test_default_gpu_limit_is_two_thirds_up_to_36gb_and_three_quarters_above():
    assert budget("32GB").wired_default == 32 * GiB * 2 // 3
    assert budget("64GB").wired_default == 48 * GiB
    small = budget("32GB")
    assert verdict(20 * GiB, small).fits_default
    raised = verdict(26 * GiB, small)
    assert not raised.fits_default and raised.fits_raised
    assert raised.sysctl == "sudo sysctl iogpu.wired_limit_mb=28672"  # 26 GiB + 10%, capped at RAM - 4
    assert not verdict(30 * GiB, small).fits_raised


def test_suggestions_bring_qwen3_30b_under_the_limit_of_a_32gb_mac():
    recipe = load_recipe(RECIPES / "qwen3-30b-a3b.yaml", train={"grad_checkpoint": False})
    cfg = ConfigView(json.loads((CONFIGS / "qwen3-30b-a3b.json").read_text()))
    plan = plan_training(cfg, recipe)
    b = budget("32GB")
    limit = target(plan, b)
    assert plan.peak > limit
    changes = suggestions(cfg, recipe, plan, limit)
    assert changes[0].what.startswith("grad_checkpoint")
    peaks = [plan.peak] + [c.peak for c in changes]
    assert peaks == sorted(peaks, reverse=True) and peaks[-1] <= limit


def test_mixtral_on_a_32gb_mac_is_brought_under_the_default_limit_with_its_experts_at_3_bits():
    """The 4-bit base alone (24.47 GiB) is over the default limit (21.33 GiB): fewer bits for
    the experts are proposed before any change that costs sequence length or layers."""
    recipe = load_recipe(
        RECIPES / "mixtral-8x7b-instruct.yaml", train={"quantize": 4}, lora={"rank": 8, "alpha": 16}
    )
    cfg = ConfigView(json.loads((CONFIGS / "mixtral-8x7b.json").read_text()))
    plan = plan_training(cfg, recipe)
    b = budget("32GB")
    assert plan.memory.quantized > b.wired_default
    limit = target(plan, b, cfg, recipe)
    assert limit == b.wired_default and target(plan, b) == b.wired_max
    changes = suggestions(cfg, recipe, plan, limit)
    assert changes[0].what.startswith("quantize: {bits: 4, experts: 3}")
    assert changes[0].recipe.train.quantization.experts == 3
    assert changes[0].peak < plan.peak - 5 * GiB and changes[-1].peak <= limit


def test_the_shipped_mixtral_recipe_fits_the_default_limit_in_every_phase():
    """No sysctl: the recipe's experts at 3 bits and rank 4 keep the load and the training
    under a 32 GB Mac's default GPU limit, and the export needs far less."""
    from mlxmoe.plan.load import plan_load

    recipe = load_recipe(RECIPES / "mixtral-8x7b-instruct.yaml")
    cfg = ConfigView(json.loads((CONFIGS / "mixtral-8x7b.json").read_text()))
    plan = plan_training(cfg, recipe)
    q = recipe.train.quantization
    load = plan_load(cfg, q, q.group_size, plan.dtype)
    limit = budget("32GB").wired_default
    assert q.experts == 3 and plan.memory.quantized < limit
    assert plan.peak <= limit and load.peak <= limit
    result = CliRunner().invoke(
        main,
        ["plan", str(CONFIGS / "mixtral-8x7b.json"), "--recipe", str(RECIPES / "mixtral-8x7b-instruct.yaml")],
    )
    assert result.exit_code == 0 and "fits under the default GPU limit" in result.output, result.output


def test_plan_command_prints_the_breakdown_and_the_verdict():
    result = CliRunner().invoke(
        main,
        [
            "plan",
            str(CONFIGS / "mixtral-8x7b.json"),
            "--recipe",
            str(RECIPES / "mixtral-8x7b-instruct.yaml"),
            "--quantize",
            "4",
            "--rank",
            "8",
            "--memory",
            "36GB",
        ],
    )
    assert result.exit_code == 0, result.output
    for text in (
        "base weights (quantized)",
        "AdamW state",
        "peak",
        "export to GGUF q8_0",
        "sysctl iogpu.wired_limit_mb=",
    ):
        assert text in result.output
    bad = CliRunner().invoke(main, ["plan", str(CONFIGS / "mixtral-8x7b.json"), "--memory", "big"])
    assert bad.exit_code == 2 and "expected a size" in bad.output


def test_the_verdict_is_taken_on_the_largest_phase_load_training_or_export():
    """A 4-bit Mixtral with a tiny adapter and short sequences trains in less than it takes
    to load: the load's peak (the 4-bit model and the last layer's float experts in flight)
    decides whether it fits."""
    from mlxmoe.plan.load import plan_load

    cfg = ConfigView(json.loads((CONFIGS / "mixtral-8x7b.json").read_text()))
    recipe = load_recipe(
        None,
        lora={"strategy": "attention", "rank": 1},
        train={"batch_size": 1, "max_seq_len": 64, "quantize": 4},
    )
    training = plan_training(cfg, recipe)
    load = plan_load(cfg, 4, 64, training.dtype)
    assert load.peak > training.peak
    result = CliRunner().invoke(
        main,
        [
            "plan",
            str(CONFIGS / "mixtral-8x7b.json"),
            "--memory",
            "32GB",
            "--strategy",
            "attention",
            "--rank",
            "1",
            "--batch-size",
            "1",
            "--max-seq-len",
            "64",
            "--quantize",
            "4",
        ],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert f"the largest phase is the load, {load.peak / GiB:.2f} GiB" in text
    assert "layers.31.moe.experts.down_proj in flight" in text
    # 26.15 GiB: over the default limit of a 32 GB Mac, under the raised one
    assert "sysctl iogpu.wired_limit_mb=28672" in text


def test_the_mxfp4_export_is_planned_for_gpt_oss_and_refused_for_other_families():
    ok = CliRunner().invoke(
        main, ["plan", str(CONFIGS / "gpt-oss-20b.json"), "--gguf-type", "mxfp4"], env={"COLUMNS": "200"}
    )
    assert ok.exit_code == 0 and "export to GGUF mxfp4: peak" in ok.output, ok.output
    refused = CliRunner().invoke(main, ["plan", str(CONFIGS / "mixtral-8x7b.json"), "--gguf-type", "mxfp4"])
    assert refused.exit_code == 2, refused.output  # a user error: no traceback
    assert "mxfp4 is for gpt-oss's experts; mixtral is exported as" in " ".join(refused.output.split())


def test_grouped_plan_counts_the_experts_padded_rows(tmp_path):
    _, experts = _tiny_cpu_plans(4, "gather", "grouped")
    pairs = 2 * 256 * TINY["num_experts_per_tok"]
    assert experts["grouped"] * pairs == experts["gather"] * padded_rows(pairs, TINY["num_experts"])
    (tmp_path / "r.yaml").write_text("train:\n  moe_dispatch: grouped\n")
    result = CliRunner().invoke(
        main, ["plan", str(CONFIGS / "qwen3-30b-a3b.json"), "--recipe", str(tmp_path / "r.yaml")]
    )
    assert result.exit_code == 0, result.output
    assert "grouped dispatch" in " ".join(result.output.split())
