"""DeepSeek-V2 to GGUF: our merged file is what llama.cpp's converter writes (its
DeepseekV2Model splits kv_b_proj per head into attn_k_b, transposed, and attn_v_b, and writes
MLA's ranks and head widths, one KV head, the leading dense layers, the routing scale and
YaRN's log multiplier), llama.cpp computes from it what our merged model computes, and its
Q4_K_M is llama-quantize's. Where llama.cpp 0.3.36 computes a config otherwise (or cannot
load it) the export refuses, and the slow tests show llama.cpp doing so on the converter's
own file.

Tiny models with Qwen3's tokenizer (the converter reads DeepSeek's BPE through the same
path); an adapter on every projection (latent attention included) for the merged files, and
one on what llama.cpp's deepseek2 graph applies LoRA to for the adapter GGUF.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
import torch
from assets import qwen3_tokenizer_folder
from test_convert_parity import CONVERTER, LLAMA_CPP_SRC, loading_kv, run_converter, tensors
from test_deepseek_v2 import SHAPES, V2_YARN
from test_export import (
    F16_MAX_ABS,
    HELD_OUT,
    Q8_MIN_TOP1,
    Q8_NEAR_TIE,
    ROUTING_NEAR_TIE,
    Exported,
    top1,
)
from tiny_models import make_hf_model, save, train_tiny_adapter, write_qa_data

import mlxmoe
from mlxmoe.errors import MlxMoeError
from mlxmoe.gguf.adapter import export_adapter_gguf
from mlxmoe.gguf.export import export_gguf
from mlxmoe.gguf.llamacpp import logits as llama_cpp_logits
from mlxmoe.gguf.llamacpp import open_gguf
from mlxmoe.recipe import load_recipe
from mlxmoe.train import train

# Each module fixture trains an adapter and exports it: the fast loop leaves these out.
pytestmark = pytest.mark.slow

needs_converter = pytest.mark.skipif(
    not CONVERTER.is_file(),
    reason=(f"llama.cpp's converter is not unpacked at {LLAMA_CPP_SRC} (LLAMA_CPP_SRC)"),
)
# DeepSeek-V2-Lite's shape as llama.cpp 0.3.36 recognizes it: 27 layers, no q_lora_rank, YaRN.
# 24 of them dense: across 26 random tiny MoE layers most positions have a near-tied expert
# choice somewhere (measured: 6 of 14 clear), which f16 weights may flip
LITE = dict(
    q_lora_rank=None,
    num_hidden_layers=27,
    first_k_dense_replace=24,
    rope_parameters=V2_YARN,
    routed_scaling_factor=1.0,
)
# What llama.cpp's deepseek2 graph applies a LoRA adapter to (it multiplies the latent
# attention's other projections with ggml_mul_mat, which takes no adapter)
LLAMA_CPP_LORA_TARGETS = ["attn.o_proj", "experts", "shared_expert", "dense_mlp", "router"]
TOKENS = [1, 17, 42, 99, 7, 256, 3, 1000, 5000, 77, 12, 9000, 31, 64]


def make_model(folder: Path, seed: int = 0, **overrides) -> Path:
    vocab = qwen3_tokenizer_folder(folder)
    hf = make_hf_model("deepseek_v2", seed=seed, vocab_size=vocab, **overrides)
    with torch.no_grad():
        hf.lm_head.weight.mul_(4.0)  # better-separated logits: top-1 is meaningful
    return save(hf, folder)


def ours_and_routing_margin(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Our float32 logits, and per position the smallest margin in any layer between the
    k-th and (k+1)-th routing probability (test_export's Exported.merged_mlx_and_routing)."""
    model, _ = mlxmoe.load(folder, dtype=mx.float32)
    logits, routers = model(mx.array([TOKENS]), return_router_logits=True)
    k = model.args.num_experts_per_tok
    probs = [mx.sort(mx.softmax(r[0], axis=-1), axis=-1)[:, ::-1] for r in routers]
    return np.array(logits[0]), np.min([np.array(p[:, k - 1] - p[:, k]) for p in probs], axis=0)


def train_adapter(model: Path, root: Path, targets: list[str]) -> Path:
    r = load_recipe(
        None,
        train=dict(
            iters=3,
            batch_size=4,
            learning_rate=5e-3,
            warmup=0,
            quantize=0,
            report_every=3,
            val_every=0,
            max_seq_len=48,
        ),
        lora=dict(targets=targets, router_mode="lora", rank=4),
    )
    r.model, r.data = str(model), str(write_qa_data(root / "data", n_train=8, n_valid=4))
    train(r, root / "adapter-llama-cpp-targets", show_progress=False)
    return root / "adapter-llama-cpp-targets"


class DeepseekExported(Exported):
    """test_export's Exported (its llama.cpp and MLX logits) over DeepSeek-V2's shape: the
    query bottleneck, a dense first layer, scaled routing weights."""

    def __init__(self, root: Path):
        self.family, self.root = "deepseek_v2", root
        self.model = make_model(root / "model")
        self.adapter = train_tiny_adapter(self.model, root)  # every projection, the router
        self.gguf = {
            t: export_gguf(self.model, root / f"{t}.gguf", t, self.adapter).path for t in ("f16", "q8_0")
        }
        with open_gguf(self.gguf["f16"], vocab_only=True) as vocab:
            self.tokens = vocab.tokenize(HELD_OUT.encode(), add_bos=True, special=False)


@pytest.fixture(scope="module")
def deepseek_v2_exported(tmp_path_factory) -> DeepseekExported:
    return DeepseekExported(tmp_path_factory.mktemp("deepseek_v2"))


def assert_same_file(ours: gguf.GGUFReader, theirs: gguf.GGUFReader) -> None:
    a, b = tensors(ours), tensors(theirs)
    assert {n: (t.tensor_type.name, t.shape.tolist()) for n, t in a.items()} == {
        n: (t.tensor_type.name, t.shape.tolist()) for n, t in b.items()
    }
    assert [n for n in a if np.asarray(a[n].data).tobytes() != np.asarray(b[n].data).tobytes()] == []
    ours_kv, theirs_kv = loading_kv(ours), loading_kv(theirs)
    assert sorted(ours_kv) == sorted(theirs_kv)
    assert [k for k in ours_kv if ours_kv[k] != theirs_kv[k]] == []


@pytest.mark.proof("converter")
@needs_converter
def test_f16_tensors_and_metadata_equal_the_converters(deepseek_v2_exported):
    assert_same_file(*deepseek_v2_exported.converted)
    ours = tensors(deepseek_v2_exported.converted[0])
    # kv_b split per head: k_b [heads, latent, nope] and v_b [heads, v, latent] (GGUF order reversed)
    assert ours["blk.1.attn_k_b.weight"].shape.tolist() == [16, 32, 4]
    assert ours["blk.1.attn_v_b.weight"].shape.tolist() == [32, 16, 4]
    assert not any("attn_kv_b" in n for n in ours)
    kv = loading_kv(deepseek_v2_exported.converted[0])
    assert kv["deepseek2.attention.q_lora_rank"][1] == 32
    assert kv["deepseek2.leading_dense_block_count"][1] == 1
    assert kv["deepseek2.expert_weights_scale"][1] == 1.5


@pytest.mark.proof("converter")
@needs_converter
def test_q8_0_tensors_equal_the_converters_byte_for_byte(deepseek_v2_exported):
    theirs = run_converter(
        deepseek_v2_exported.merged, "q8_0", deepseek_v2_exported.root / "converter-q8_0.gguf"
    )
    ours, theirs = (tensors(gguf.GGUFReader(p)) for p in (deepseek_v2_exported.gguf["q8_0"], theirs))
    assert {n: (t.tensor_type.name, t.shape.tolist()) for n, t in ours.items()} == {
        n: (t.tensor_type.name, t.shape.tolist()) for n, t in theirs.items()
    }
    assert "Q8_0" in {t.tensor_type.name for t in ours.values()}
    assert [
        n for n in ours if np.asarray(ours[n].data).tobytes() != np.asarray(theirs[n].data).tobytes()
    ] == []


def test_f16_gguf_in_llama_cpp_computes_the_merged_model(deepseek_v2_exported):
    """test_export's check, but for top-1: on Qwen3's 152k-token vocabulary one held-out
    position is a tie of our own logits (top two 0.0025 apart, f16's error there 0.015), which
    llama.cpp may break the other way; every top-1 difference must be such a tie."""
    ours, margin = deepseek_v2_exported.merged_mlx_and_routing()
    theirs = deepseek_v2_exported.llama_cpp(deepseek_v2_exported.gguf["f16"])
    clear = margin >= ROUTING_NEAR_TIE
    diff = np.abs(ours - theirs).max(-1)
    print(
        f"deepseek_v2 f16: max-abs {diff[clear].max():.4f} at {clear.sum()} positions with a clear "
        f"expert choice ({diff.max():.4f} at all {len(diff)}), top-1 {top1(ours, theirs):.3f}"
    )
    assert clear.mean() >= 0.9 and diff[clear].max() < F16_MAX_ABS
    for position in np.nonzero(ours.argmax(-1) != theirs.argmax(-1))[0]:
        row = ours[position]
        assert row.max() - row[theirs[position].argmax()] < 2 * diff[position], position


def test_q8_0_gguf_agrees_on_top1(deepseek_v2_exported):
    ours, theirs = (
        deepseek_v2_exported.merged_mlx(),
        deepseek_v2_exported.llama_cpp(deepseek_v2_exported.gguf["q8_0"]),
    )
    print(f"deepseek_v2 q8_0: top-1 {top1(ours, theirs):.3f}, max-abs {np.abs(ours - theirs).max():.3f}")
    assert top1(ours, theirs) >= Q8_MIN_TOP1
    for position in np.nonzero(ours.argmax(-1) != theirs.argmax(-1))[0]:
        assert ours[position].max() - ours[position][theirs[position].argmax()] < Q8_NEAR_TIE


@pytest.mark.slow
def test_q4_k_m_is_what_llama_quantize_makes_of_our_f32_and_llama_cpp_runs_it(deepseek_v2_exported):
    import llama_cpp

    root = deepseek_v2_exported.root
    ours = export_gguf(
        deepseek_v2_exported.model, root / "q4_k_m.gguf", "q4_k_m", deepseek_v2_exported.adapter
    ).path
    f32 = export_gguf(deepseek_v2_exported.model, root / "f32.gguf", "f32", deepseek_v2_exported.adapter).path
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, 2
    assert (
        llama_cpp.llama_model_quantize(
            str(f32).encode(), str(root / "llama-q4_k_m.gguf").encode(), ctypes.byref(params)
        )
        == 0
    )
    a, b = (tensors(gguf.GGUFReader(p)) for p in (ours, root / "llama-q4_k_m.gguf"))
    assert {n: t.tensor_type.name for n, t in a.items()} == {n: t.tensor_type.name for n, t in b.items()}
    assert [n for n in a if np.asarray(a[n].data).tobytes() != np.asarray(b[n].data).tobytes()] == []
    logits = deepseek_v2_exported.llama_cpp(ours)
    assert np.isfinite(logits).all() and top1(logits, deepseek_v2_exported.merged_mlx()) >= 0.5


@pytest.mark.slow
def test_base_gguf_plus_adapter_gguf_equals_the_merged_gguf(deepseek_v2_exported):
    adapter = train_adapter(deepseek_v2_exported.model, deepseek_v2_exported.root, LLAMA_CPP_LORA_TARGETS)
    root = deepseek_v2_exported.root
    merged = deepseek_v2_exported.llama_cpp(
        export_gguf(deepseek_v2_exported.model, root / "m.gguf", "f16", adapter).path
    )
    base_gguf = export_gguf(deepseek_v2_exported.model, root / "base.gguf", "f16").path
    lora = export_adapter_gguf(deepseek_v2_exported.model, adapter, root / "adapter.gguf").path
    base_plus_lora, base = (
        deepseek_v2_exported.llama_cpp(base_gguf, lora=lora),
        deepseek_v2_exported.llama_cpp(base_gguf),
    )
    diff = np.abs(merged - base_plus_lora).max()
    print(
        f"deepseek_v2 base+lora vs merged: max-abs {diff:.4f}, "
        f"base vs merged {np.abs(base - merged).max():.4f}"
    )
    assert np.abs(base - merged).max() > 10 * diff  # the adapter matters
    assert diff < F16_MAX_ABS


def test_adapter_gguf_refuses_lora_llama_cpp_would_not_apply(deepseek_v2_exported, tmp_path):
    latent = r"layers\.\d+\.attn\.(q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj)"
    with pytest.raises(MlxMoeError, match=latent):
        export_adapter_gguf(
            deepseek_v2_exported.model, deepseek_v2_exported.adapter, tmp_path / "adapter.gguf"
        )
    assert not (tmp_path / "adapter.gguf").exists()


@pytest.mark.slow
@pytest.mark.proof("converter")
@needs_converter
def test_v2_lite_shape_with_yarn_equals_the_converter_and_runs_in_llama_cpp(tmp_path):
    model = make_model(tmp_path / "model", **LITE)
    ours = export_gguf(model, tmp_path / "ours.gguf", "f16").path
    theirs = run_converter(model, "f16", tmp_path / "converter.gguf")
    assert_same_file(gguf.GGUFReader(ours), gguf.GGUFReader(theirs))
    assert "blk.0.attn_q.weight" in tensors(gguf.GGUFReader(ours))
    expected, margin = ours_and_routing_margin(model)
    with open_gguf(ours, n_ctx=128) as llm:
        computed = llama_cpp_logits(llm, TOKENS)
    clear = margin >= ROUTING_NEAR_TIE  # as test_export: a near tie may pick another expert
    diff = np.abs(expected - computed).max(-1)
    print(
        f"deepseek_v2 V2-Lite shape f16: max-abs {diff[clear].max():.4f} at {clear.sum()} positions "
        f"with a clear expert choice ({diff.max():.4f} at all {len(diff)}), "
        f"top-1 {top1(expected, computed):.3f}"
    )
    assert top1(expected, computed) == 1.0 and clear.mean() >= 0.9 and diff[clear].max() < F16_MAX_ABS


# --- what llama.cpp 0.3.36 computes otherwise: refused at export, shown on the converter's file --

REFUSED = {
    # no q_lora_rank outside 26 or 27 layers: llama.cpp reads the q_lora_rank key and fails to load
    "lite-queries-3-layers": (dict(q_lora_rank=None), "q_lora_rank=None"),
    # a q_lora_rank where llama.cpp takes the layer count for V2-Lite's: it looks for attn_q
    "bottleneck-27-layers": (dict(num_hidden_layers=27), "q_lora_rank=32"),
    "group-limited": (SHAPES["v2-groups"], "n_group=4"),
    "norm-topk-prob": (dict(norm_topk_prob=True), "norm_topk_prob"),
    "yarn-mscale-ratio": (SHAPES["yarn-mscale-ratio"], "mscale equal to mscale_all_dim"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_export_refuses_what_llama_cpp_computes_otherwise(case, tmp_path):
    overrides, named = REFUSED[case]
    folder = save(make_hf_model("deepseek_v2", **overrides), tmp_path / "model")
    with pytest.raises(MlxMoeError, match=named):
        export_gguf(folder, tmp_path / "x.gguf", "f16")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.slow
@pytest.mark.proof("converter")
@needs_converter
@pytest.mark.parametrize("case", sorted(REFUSED))
def test_llama_cpp_fails_or_disagrees_on_the_converters_file_where_export_refuses(case, tmp_path):
    model = make_model(tmp_path / "model", **REFUSED[case][0])
    theirs = run_converter(model, "f16", tmp_path / "converter.gguf")
    try:
        with open_gguf(theirs, n_ctx=128) as llm:
            computed = llama_cpp_logits(llm, TOKENS)
    except MlxMoeError as exc:
        print(f"deepseek_v2 {case}: {exc}")
        return
    expected, margin = ours_and_routing_margin(model)
    clear = margin >= ROUTING_NEAR_TIE
    diff = np.abs(expected - computed).max(-1)[clear].max()
    print(
        f"deepseek_v2 {case}: llama.cpp max-abs {diff:.3f} at {clear.sum()} positions with a clear "
        f"expert choice, top-1 {top1(expected, computed):.3f}"
    )
    assert diff > F16_MAX_ABS  # where the config is llama.cpp's, it agrees within F16_MAX_ABS
