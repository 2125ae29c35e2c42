"""The Mac's configuration, run on the CPU: bfloat16 activations over a 4-bit base
(``gather_qmm``), float32 LoRA, float32 routing, as every shipped recipe trains on Metal.

Each test evaluates what it builds and records every decoder layer's output dtype while it
runs: the residual stream must stay bfloat16 from the embeddings to the head. Tiny models
with widths the group size divides (every matrix quantized) and ones it does not (the
experts' down projections stay bfloat16 floats, run by ``gather_mm`` on the CPU in float32).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from assets import mixtral_tokenizer_folder
from local_ranks import LAUNCH, TRAIN_KEEPING_EACH_RANKS_ADAPTERS, launch
from mlx.utils import tree_flatten, tree_map
from test_gpt_oss import mxfp4_checkpoint  # noqa: F401  (a fixture)
from tiny_models import make_hf_model, make_trainable_checkpoint, save, write_qa_data

import mlxmoe
from mlxmoe.ablate import ablate
from mlxmoe.adapt import AdapterSpec, apply_adapters
from mlxmoe.adapt.files import read_adapter_config
from mlxmoe.dtypes import resolve_dtype
from mlxmoe.errors import MlxMoeError
from mlxmoe.evaluate import evaluate
from mlxmoe.gguf.export import export_gguf
from mlxmoe.gguf.llamacpp import logits as llama_cpp_logits
from mlxmoe.gguf.llamacpp import open_gguf
from mlxmoe.model import DecoderLayer
from mlxmoe.nn import QuantizedExpertLinear
from mlxmoe.nn.moe import set_dispatch
from mlxmoe.recipe import RecipeError, load_recipe
from mlxmoe.train import train

MAC = {"quantize": 4, "dtype": "bfloat16"}
STRATEGIES = ["attention", "experts", "shared", "experts+router", "all"]
# Measured 1e-4 to 1e-3 on the tiny models: bfloat16 rounding, a few routing flips.
MAX_BFLOAT16_KL = 5e-3


@pytest.fixture
def layer_dtypes(monkeypatch) -> list[tuple]:
    """(input, output, router logits) dtypes of every decoder layer call from now on."""
    seen: list[tuple] = []
    call = DecoderLayer.__call__

    def recording(self, x, *args, **kwargs):
        out, logits = call(self, x, *args, **kwargs)
        seen.append((x.dtype, out.dtype, None if logits is None else logits.dtype))
        return out, logits

    monkeypatch.setattr(DecoderLayer, "__call__", recording)
    return seen


def assert_bfloat16_stream(seen: list[tuple]) -> None:
    assert seen, "no decoder layer ran"
    for x, out, logits in seen:
        assert (x, out) == (mx.bfloat16, mx.bfloat16), seen
        assert logits is None or logits == mx.float32, seen


def recipe(model: Path, data: Path, **train_overrides):
    lora = train_overrides.pop("lora", {})
    settings = dict(
        iters=12,
        batch_size=4,
        learning_rate=2e-3,
        warmup=0,
        report_every=4,
        val_every=6,
        save_every=0,
        max_seq_len=64,
        **MAC,
    )
    settings.update(train_overrides)
    r = load_recipe(None, train=settings, lora=lora)
    r.model, r.data = str(model), str(data)
    return r


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "family, group_size",
    [
        ("qwen2_moe", 32),
        ("qwen2_moe", 64),
        ("qwen3_moe", 64),
        ("mixtral", 32),
        ("olmoe", 64),
        ("granitemoe", 32),
    ],
)
def test_a_bfloat16_4bit_model_with_expert_lora_keeps_bfloat16_hidden_states(
    family, group_size, tmp_path, layer_dtypes
):
    folder = save(make_hf_model(family), tmp_path / family)
    model, _ = mlxmoe.load(folder, quantize=4, group_size=group_size, dtype="bfloat16")
    apply_adapters(model, AdapterSpec(strategy="all", rank=4))
    for name, value in tree_flatten(model.trainable_parameters()):
        assert value.dtype == mx.float32, name  # AdamW updates float32 adapters
    tokens = mx.array(np.random.default_rng(0).integers(0, 96, (2, 40)))  # sorted dispatch
    logits, routers = model(tokens, return_router_logits=True)
    mx.eval(logits, routers)
    assert logits.dtype == mx.bfloat16 and all(r.dtype == mx.float32 for r in routers)
    assert_bfloat16_stream(layer_dtypes)
    # expert FFN 32 (Mixtral 48, OLMoE 32): where the group size does not divide it, the
    # down projections stay bfloat16 floats
    width = model.layers[0].moe.experts.down_proj.lora_a.shape[-1]
    down = model.layers[0].moe.experts.down_proj.base
    assert isinstance(down, QuantizedExpertLinear) == (width % group_size == 0)
    # the same weights (bfloat16 values, 4-bit grid) computed in float32
    model.update(
        tree_map(lambda v: v.astype(mx.float32) if v.dtype == mx.bfloat16 else v, model.parameters())
    )
    ref = model(tokens)
    p = mx.softmax(ref, axis=-1)
    kl = (p * (nn.log_softmax(ref, axis=-1) - nn.log_softmax(logits.astype(mx.float32), axis=-1))).sum(-1)
    print(f"{family} group {group_size}: KL(float32 || bfloat16) mean {kl.mean().item():.1e}")
    assert kl.mean().item() < MAX_BFLOAT16_KL


def gpt_oss_folder(folder: Path, _) -> Path:
    from test_gpt_oss import SHAPES, make_gpt_oss
    from test_gpt_oss import save as save_gpt_oss

    return save_gpt_oss(make_gpt_oss(**SHAPES["gqa-window-4"]), folder)


def hybrid_folder(family: str):
    def build(folder: Path, _) -> Path:
        from test_qwen3_next import make_hf
        from test_qwen3_next import save as save_hybrid

        return save_hybrid(make_hf(family), folder)

    return build


def mlx_lm_folder(folder: Path, _) -> Path:
    from test_prequantized import float_checkpoint, mlx_lm_quantized

    return mlx_lm_quantized(float_checkpoint("qwen3_moe", folder / "float"), folder / "q4")


def mxfp4_folder(folder: Path, request) -> Path:
    return request.getfixturevalue("mxfp4_checkpoint")[0]


def deepseek_v2_folder(folder: Path, _) -> Path:
    return save(make_hf_model("deepseek_v2"), folder)


# The families and formats added beside the first five: each in the Mac's configuration.
MAC_BASES = {
    "gpt_oss": gpt_oss_folder,
    "gpt_oss-mxfp4": mxfp4_folder,
    "qwen3_next": hybrid_folder("qwen3_next"),
    "qwen3_5_moe": hybrid_folder("qwen3_5_moe"),
    "mlx-lm-4bit": mlx_lm_folder,
    "deepseek_v2": deepseek_v2_folder,
}


@pytest.mark.parametrize("base", sorted(MAC_BASES))
def test_every_family_and_format_runs_in_bfloat16_over_4_bits(base, tmp_path, request, layer_dtypes):
    folder = MAC_BASES[base](tmp_path / base, request)
    model, _ = mlxmoe.load(folder, quantize=4, group_size=32, dtype="bfloat16")
    assert model.quantization.bits == 4
    apply_adapters(model, AdapterSpec(strategy="all", rank=4))
    for module in (m for _, m in model.named_modules() if "lora_b" in m):
        module.lora_b = 0.05 * mx.random.normal(module.lora_b.shape)  # adapters that change things
    tokens = mx.array(np.random.default_rng(0).integers(0, 96, (2, 40)))
    logits, routers = model(tokens, return_router_logits=True)
    mx.eval(logits, routers)
    assert logits.dtype == mx.bfloat16 and all(r.dtype == mx.float32 for r in routers)
    assert_bfloat16_stream(layer_dtypes)
    # the same weights (bfloat16 values, 4-bit grids, float32 adapters) computed in float32
    model.update(
        tree_map(lambda v: v.astype(mx.float32) if v.dtype == mx.bfloat16 else v, model.parameters())
    )
    ref = model(tokens)
    p = mx.softmax(ref, axis=-1)
    kl = (p * (nn.log_softmax(ref, axis=-1) - nn.log_softmax(logits.astype(mx.float32), axis=-1))).sum(-1)
    print(f"{base}: KL(float32 || bfloat16) mean {kl.mean().item():.1e}")
    # measured 7e-4 (mlx-lm 4-bit) to 2e-2 (Qwen3-Next): non-zero adapters, rounded to bfloat16
    # with the activations, and larger random weights than the first five families' tests
    assert kl.mean().item() < 5e-2


@pytest.mark.parametrize("cpu, computed_in", [(True, mx.float32), (False, mx.bfloat16)])
def test_expert_lora_and_float_experts_run_gather_mm_in_the_backends_dtype(
    qwen2_moe, monkeypatch, cpu, computed_in
):
    """On a GPU (simulated: the kernel is only recorded, not run) gather_mm gets bfloat16;
    on the CPU, whose kernel is float32-only, float32, cast back to bfloat16 after."""
    model, _ = mlxmoe.load(qwen2_moe, quantize=4, group_size=64, dtype="bfloat16")
    apply_adapters(model, AdapterSpec(strategy="experts", rank=4))
    calls = []
    gather_mm = mx.gather_mm

    def recording(a, b, *args, **kwargs):
        calls.append((a.dtype, b.dtype))
        return gather_mm(a.astype(mx.float32), b.astype(mx.float32), *args, **kwargs).astype(a.dtype)

    monkeypatch.setattr("mlxmoe.dtypes.on_cpu", lambda: cpu)
    monkeypatch.setattr(mx, "gather_mm", recording)
    out = model(mx.array([[1, 2, 3, 4, 5, 6, 7, 8]] * 8))
    mx.eval(out)
    # expert FFN 32 < group 64: the down projections are float; every expert LoRA gathers
    assert len(calls) >= 2 * 3 * 2 + 2
    assert set(calls) == {(computed_in, computed_in)}
    assert out.dtype == mx.bfloat16


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_loss_falls_for_every_strategy_in_bfloat16_over_4_bits(
    qwen2_moe, data, tmp_path, strategy, layer_dtypes
):
    result = train(recipe(qwen2_moe, data, lora={"strategy": strategy}), tmp_path, show_progress=False)
    rows = metrics(tmp_path)
    assert result.steps == 12
    assert rows[-1]["ce"] < rows[0]["ce"] - 0.3, [r["ce"] for r in rows]
    assert np.isfinite(result.val_loss)
    assert_bfloat16_stream(layer_dtypes)
    config = read_adapter_config(tmp_path)
    assert config["dtype"] == "bfloat16" and config["quantization"]["bits"] == 4


@pytest.mark.slow
def test_every_matrix_quantized_trains_in_bfloat16(tmp_path, data, layer_dtypes):
    # hidden 64, expert FFN 32, dense FFN 128: group 32 divides every input width
    model = make_trainable_checkpoint("qwen3_moe", tmp_path / "qwen3_moe")
    train(recipe(model, data, group_size=32, val_every=0), tmp_path / "run", show_progress=False)
    rows = metrics(tmp_path / "run")
    assert rows[-1]["ce"] < rows[0]["ce"] - 0.3, [r["ce"] for r in rows]
    assert_bfloat16_stream(layer_dtypes)


@pytest.mark.slow
def test_resume_in_bfloat16_continues_exactly(qwen2_moe, data, tmp_path):
    r = recipe(qwen2_moe, data, iters=8, save_every=4, val_every=0, lora={"dropout": 0.1})
    train(r, tmp_path / "one_run", show_progress=False)
    resumed = tmp_path / "resumed" / "checkpoints"
    resumed.mkdir(parents=True)
    shutil.copytree(tmp_path / "one_run" / "checkpoints" / "step-000004", resumed / "step-000004")
    (resumed / "latest").write_text("step-000004\n")
    train(r, tmp_path / "resumed", resume=True, show_progress=False)
    one = mx.load(str(tmp_path / "one_run" / "adapters.safetensors"))
    two = mx.load(str(tmp_path / "resumed" / "adapters.safetensors"))
    assert one.keys() == two.keys()
    for name in one:
        assert mx.array_equal(one[name], two[name]).item(), name


@pytest.mark.slow
def test_eval_in_bfloat16_matches_float32_eval_of_the_same_adapter(qwen2_moe, data, tmp_path, layer_dtypes):
    train(recipe(qwen2_moe, data, iters=6, val_every=0), tmp_path, show_progress=False)
    mac = evaluate(
        qwen2_moe, data / "valid.jsonl", adapter=tmp_path, dtype="bfloat16", max_new_tokens=8, limit=4
    )
    assert_bfloat16_stream(layer_dtypes)
    cpu = evaluate(
        qwen2_moe, data / "valid.jsonl", adapter=tmp_path, dtype="float32", max_new_tokens=8, limit=4
    )
    assert mac.generated_samples == 4 and mac.rouge_l is not None
    # the same 4-bit weights; bfloat16 rounds activations to 8 bits of mantissa
    assert mac.perplexity == pytest.approx(cpu.perplexity, rel=0.05)


@pytest.mark.slow
def test_ablate_runs_in_bfloat16_over_4_bits(qwen2_moe, data, tmp_path, layer_dtypes):
    test = data.parent / "mac-ablate-data"
    shutil.copytree(data, test)
    (test / "test.jsonl").write_text("".join((data / "valid.jsonl").read_text().splitlines(True)[:3]))
    r = recipe(qwen2_moe, test, iters=4, val_every=0, save_every=2)
    result = ablate(r, tmp_path, ["attention", "experts"], max_new_tokens=6, plots=False, show_progress=False)
    assert [row.name for row in result.rows] == ["base", "attention", "experts"]
    assert all(np.isfinite(row.perplexity) for row in result.rows)
    assert result.settings["recipe"]["train"]["dtype"] == "bfloat16"
    assert_bfloat16_stream(layer_dtypes)


@pytest.mark.slow
def test_a_qlora_run_in_bfloat16_exports_a_q8_0_gguf_that_llama_cpp_runs(tmp_path):
    vocab = mixtral_tokenizer_folder(tmp_path / "model")
    hf = make_hf_model("mixtral", vocab_size=vocab)
    import torch

    with torch.no_grad():
        hf.lm_head.weight.mul_(4.0)  # better-separated logits: top-1 is meaningful
    model = save(hf, tmp_path / "model")
    data = write_qa_data(tmp_path / "data", n_train=8, n_valid=4)
    train(
        recipe(
            model,
            data,
            iters=3,
            val_every=0,
            report_every=3,
            max_seq_len=48,
            lora={"strategy": "all", "rank": 4},
        ),
        tmp_path / "run",
        show_progress=False,
    )
    gguf = export_gguf(model, tmp_path / "q8_0.gguf", "q8_0", adapter=tmp_path / "run").path

    merged, tokenizer = mlxmoe.load(model, dtype="float32")
    from mlxmoe.adapt.files import load_adapters

    load_adapters(merged, tmp_path / "run")
    merged.eval()
    tokens = tokenizer.encode("Repeat the word fox. fox fox fox, and the experts route it.")
    ours = np.array(merged(mx.array([tokens]))[0])
    with open_gguf(gguf, n_ctx=64) as llama:
        theirs = llama_cpp_logits(llama, tokens)
    agree = float((ours.argmax(-1) == theirs.argmax(-1)).mean())
    print(f"q8_0 of a bfloat16 QLoRA run: top-1 {agree:.3f}")
    assert agree >= 0.85  # tests/test_export.py's q8_0 bound: the format's near ties


@pytest.mark.slow
@pytest.mark.skipif(not LAUNCH.is_file(), reason="mlx.launch is not installed")
def test_two_ranks_train_in_bfloat16_over_4_bits(qwen2_moe, data, tmp_path):
    settings = {
        "lora": {"strategy": "experts"},
        "train": dict(
            iters=4,
            batch_size=4,
            learning_rate=2e-3,
            warmup=0,
            report_every=1,
            val_every=0,
            save_every=4,
            max_seq_len=64,
            **MAC,
        ),
    }
    script = tmp_path / "run.py"
    script.write_text(TRAIN_KEEPING_EACH_RANKS_ADAPTERS)
    output = launch(str(script), str(qwen2_moe), str(data), str(tmp_path / "two"), json.dumps(settings))
    assert "rank 0 of 2 finished 4 steps" in output and "rank 1 of 2 finished 4 steps" in output, output
    rank0 = mx.load(str(tmp_path / "two.rank0.safetensors"))
    rank1 = mx.load(str(tmp_path / "two.rank1.safetensors"))
    assert all(mx.array_equal(rank0[k], rank1[k]).item() for k in rank0)
    r = load_recipe(None, **settings)
    r.model, r.data = str(qwen2_moe), str(data)
    train(r, tmp_path / "one", show_progress=False)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [row["step"] for row in two] == [1, 2, 3, 4]
    for a, b in zip(one, two):  # bfloat16 sums in another order: close, not equal
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-2), (a["step"], a["loss"], b["loss"])


@pytest.mark.slow
def test_cli_train_and_eval_take_the_dtype(qwen2_moe, data, tmp_path):
    def mlxmoe_cli(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "mlxmoe", *args], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    mlxmoe_cli(
        "train",
        "--model",
        str(qwen2_moe),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "run"),
        "--iters",
        "2",
        "--max-seq-len",
        "64",
        "--quantize",
        "4",
        "--dtype",
        "bfloat16",
        "--no-plots",
    )
    assert read_adapter_config(tmp_path / "run")["dtype"] == "bfloat16"
    out = mlxmoe_cli(
        "eval",
        "--model",
        str(qwen2_moe),
        "--adapter",
        str(tmp_path / "run"),
        "--data",
        str(data),
        "--limit",
        "2",
        "--max-new-tokens",
        "2",
        "--dtype",
        "bfloat16",
        "--json",
        str(tmp_path / "eval.json"),
        "--no-plots",
    )
    assert "bfloat16, base 4-bit, group 64" in out
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["dtype"] == "bfloat16" and report["quantization"] == "4-bit, group 64"


def test_a_dtype_that_is_not_a_model_dtype_is_refused_naming_the_key():
    with pytest.raises(RecipeError, match=r"train\.dtype must be one of auto, bfloat16, float16, float32"):
        load_recipe(None, train={"dtype": "float64"})
    with pytest.raises(MlxMoeError, match="dtype must be one of"):
        resolve_dtype("int8")
    assert resolve_dtype("auto", "gpu") == mx.bfloat16 and resolve_dtype("auto", "cpu") == mx.float32


@pytest.mark.parametrize("dtype, expected", [("float32", "dense"), ("bfloat16", "grouped")])
def test_auto_dispatch_is_dense_only_for_float32_experts(qwen2_moe, monkeypatch, dtype, expected):
    """A BLAS multiplies float32 only: dense would run bfloat16 experts in MLX's slow kernel;
    the grouped dispatch computes them in float32 blocks."""
    monkeypatch.setattr("mlxmoe.nn.moe.on_cpu", lambda: True)
    monkeypatch.setattr("mlxmoe.blas.loaded_blas", lambda: "/usr/lib/libopenblas.so")
    monkeypatch.setattr("mlxmoe.nn.moe.dense_pays", lambda *args: True)  # tiny experts pay too
    model, _ = mlxmoe.load(qwen2_moe, dtype=dtype)
    assert set_dispatch(model, "auto") == expected
