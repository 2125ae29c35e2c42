"""Qwen3-Next and Qwen3.5-MoE to GGUF: our merged file is what llama.cpp's converter writes,
and llama.cpp computes from it (and from base + adapter GGUF) what our merged model computes.

Each family gets a tiny model (two value heads per key head, so that Qwen3.5's value-head
reordering and Qwen3-Next's regrouping of in_proj_qkvz both show) with Qwen3's real tokenizer,
and an adapter trained for a few steps on every projection, the linear attention's included.
The converter is ``convert_hf_to_gguf.py --no-mtp`` from the llama-cpp-python 0.3.36 sdist
(LLAMA_CPP_SRC, as in test_convert_parity.py), run on ``export_hf``'s merged folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
import torch
from assets import qwen3_tokenizer_folder
from mlx.utils import tree_flatten
from test_convert_parity import (
    CONVERTER,
    LLAMA_CPP_SRC,
    assert_same_tensors,
    loading_kv,
    tensors,
)
from test_export import (
    F16_MAX_ABS,
    Q4_K_M_MAX_PPL_RATIO,
    Exported,
    assert_f16_gguf_computes_the_merged_model,
    perplexity,
    top1,
)
from test_qwen3_next import make_hf, save

import mlxmoe
from mlxmoe.errors import MlxMoeError
from mlxmoe.families import qwen3_5_moe, qwen3_next
from mlxmoe.gguf.export import export_gguf
from mlxmoe.gguf.merge import export_hf
from mlxmoe.tensor_names import ROLES

# Each module fixture trains an adapter and exports it: the fast loop leaves these out.
pytestmark = pytest.mark.slow

FAMILIES = ("qwen3_next", "qwen3_5_moe")
needs_converter = [
    pytest.mark.slow,
    pytest.mark.proof("converter"),
    pytest.mark.skipif(
        not CONVERTER.is_file(),
        reason=f"llama.cpp's converter is not unpacked at {LLAMA_CPP_SRC} (LLAMA_CPP_SRC)",
    ),
]


def make_model(family: str, folder: Path, seed: int = 0) -> Path:
    vocab = qwen3_tokenizer_folder(folder)
    # value heads as wide as key heads: llama.cpp's graphs assume it (a config without is refused)
    # (Qwen3.5: and multimodal RoPE sections that fit a tiny head's 2 rotary pairs)
    rope = (
        {}
        if family == "qwen3_next"
        else dict(
            rope_parameters=dict(
                rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.25, mrope_section=[1, 1, 0]
            )
        )
    )
    hf = make_hf(family, seed=seed, vocab_size=vocab, linear_value_head_dim=16, **rope)
    with torch.no_grad():
        hf.lm_head.weight.mul_(4.0)  # better-separated logits: top-1 is meaningful
    return save(hf, folder)


def run_converter(folder: Path, outtype: str, out: Path) -> Path:
    """``convert_hf_to_gguf.py --no-mtp`` (these checkpoints have no MTP layer)."""
    proc = subprocess.run(
        [
            sys.executable,
            str(CONVERTER),
            "--no-mtp",
            "--outtype",
            outtype,
            "--outfile",
            str(out),
            str(folder),
        ],
        cwd=out.parent,
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(LLAMA_CPP_SRC / "gguf-py"), os.environ.get("PYTHONPATH")) if p
            ),
        },
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return out


class HybridExported(Exported):
    """test_export's Exported (its llama.cpp and MLX logits) over these families' models."""

    def __init__(self, family: str, root: Path):
        super().__init__(family, root, make_model(family, root / "model"))

    def run_converter(self, folder: Path, outtype: str, out: Path) -> Path:
        return run_converter(folder, outtype, out)  # with --no-mtp

    def q8_0_rounded_mlx(self) -> np.ndarray:
        """Our float32 logits with the weights rounded as the q8_0 file stores them (every
        2-D matrix whose rows split into 32-blocks, but norms and routers), in the hub's
        layout: Qwen3.5's out_proj columns are grouped into blocks in the hub's value-head
        order, not llama.cpp's, which moves a few values of a block to another."""
        from safetensors.numpy import load_file, save_file

        folder = self.root / "merged-q8_0-weights"
        shutil.copytree(self.merged, folder, dirs_exist_ok=True)
        weights = load_file(folder / "model.safetensors")
        q8 = gguf.GGMLQuantizationType.Q8_0
        for name, value in weights.items():
            if value.ndim == 2 and value.shape[1] % 32 == 0 and not name.endswith(ROUTERS_AND_NORMS):
                rounded = gguf.quants.dequantize(gguf.quants.quantize(value, q8), q8)
                weights[name] = rounded.astype(value.dtype)
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
        model, _ = mlxmoe.load(folder, dtype=mx.float32)
        return np.array(model(mx.array([self.tokens]))[0])


ROUTERS_AND_NORMS = ("norm.weight", "mlp.gate.weight", "shared_expert_gate.weight")


@pytest.fixture(scope="module", params=FAMILIES)
def hybrid_exported(request, tmp_path_factory) -> HybridExported:
    return HybridExported(request.param, tmp_path_factory.mktemp(request.param))


def converter_test(fn):
    for mark in needs_converter:
        fn = mark(fn)
    return fn


@converter_test
def test_f16_tensors_equal_the_converters(hybrid_exported):
    ours, theirs = (tensors(r) for r in hybrid_exported.converted)
    assert sorted(ours) == sorted(theirs)
    assert {n: (t.tensor_type.name, t.shape.tolist()) for n, t in ours.items()} == {
        n: (t.tensor_type.name, t.shape.tolist()) for n, t in theirs.items()
    }
    assert any(".attn_qkv." in n for n in ours) and any(".attn_gate." in n for n in ours)
    differ = [
        n
        for n in ours
        if not n.endswith(".ssm_a")
        and np.asarray(ours[n].data).tobytes() != np.asarray(theirs[n].data).tobytes()
    ]
    assert differ == []
    # ssm_a = -exp(A_log): ours correctly rounded, the converter's torch.exp within one ulp
    for name in (n for n in ours if n.endswith(".ssm_a")):
        a, b = (np.asarray(t[name].data).view(np.int32) for t in (ours, theirs))
        assert np.abs(a - b).max() <= 1, name


@converter_test
def test_loading_metadata_equals_the_converters(hybrid_exported):
    ours, theirs = (loading_kv(r) for r in hybrid_exported.converted)
    arch = ours["general.architecture"][1]
    assert f"{arch}.ssm.group_count" in ours and f"{arch}.full_attention_interval" in ours
    assert sorted(ours) == sorted(theirs)
    assert [k for k in ours if ours[k] != theirs[k]] == []


@pytest.mark.slow
def test_f16_gguf_in_llama_cpp_computes_the_merged_model(hybrid_exported):
    assert_f16_gguf_computes_the_merged_model(hybrid_exported)


@pytest.mark.slow
def test_base_gguf_plus_adapter_gguf_equals_the_merged_gguf(hybrid_exported):
    merged = hybrid_exported.llama_cpp(hybrid_exported.gguf["f16"])
    base_plus_lora = hybrid_exported.llama_cpp(hybrid_exported.base_gguf, lora=hybrid_exported.adapter_gguf)
    base = hybrid_exported.llama_cpp(hybrid_exported.base_gguf)
    print(
        f"{hybrid_exported.family} base+lora vs merged: max-abs {np.abs(merged - base_plus_lora).max():.4f}"
    )
    assert np.abs(base - merged).max() > 10 * np.abs(merged - base_plus_lora).max()
    assert np.abs(merged - base_plus_lora).max() < F16_MAX_ABS


@pytest.mark.slow
def test_q8_0_gguf_loads_and_its_disagreement_is_the_rounded_weights(hybrid_exported):
    """On these random tiny hybrids q8_0 moves the logits far more than on the other families
    (measured top-1 0.62 / 0.82 against our float model, qwen3_next / qwen3_5_moe; max-abs 9.6
    / 4.0): the rounding of the weights alone moves our own model almost as far (0.68 / 0.82),
    and llama.cpp's q8_0 file computes that rounded model more closely than the rounding moves
    it (0.82 / 0.97; llama.cpp also rounds its activations to 8 bits, which the recurrence
    compounds). The bytes are the converter's (test_q8_0_tensors_equal_...)."""
    ours = hybrid_exported.merged_mlx()
    rounded = hybrid_exported.q8_0_rounded_mlx()
    theirs = hybrid_exported.llama_cpp(hybrid_exported.gguf["q8_0"])
    print(
        f"{hybrid_exported.family} q8_0: top-1 {top1(ours, theirs):.3f} "
        f"(max-abs {np.abs(ours - theirs).max():.3f}); "
        f"our model with q8_0-rounded weights: top-1 {top1(ours, rounded):.3f} against ours, "
        f"{top1(rounded, theirs):.3f} against llama.cpp's q8_0 "
        f"(max-abs {np.abs(rounded - theirs).max():.3f})"
    )
    assert np.isfinite(theirs).all()
    assert top1(rounded, theirs) > top1(ours, rounded)
    assert top1(ours, theirs) >= top1(ours, rounded) - 0.1


@converter_test
def test_q8_0_tensors_equal_the_converters_byte_for_byte(hybrid_exported):
    theirs = run_converter(hybrid_exported.merged, "q8_0", hybrid_exported.root / "converter-q8_0.gguf")
    assert_same_tensors(hybrid_exported.gguf["q8_0"], theirs, "Q8_0")


@pytest.mark.slow
def test_q4_k_m_gguf_loads_and_stays_within_the_perplexity_bound(hybrid_exported):
    f16 = perplexity(hybrid_exported.llama_cpp(hybrid_exported.gguf["f16"]), hybrid_exported.tokens)
    q4 = perplexity(hybrid_exported.llama_cpp(hybrid_exported.gguf["q4_k_m"]), hybrid_exported.tokens)
    print(f"{hybrid_exported.family} perplexity f16 {f16:.2f}, q4_k_m {q4:.2f}")
    assert q4 / f16 < Q4_K_M_MAX_PPL_RATIO


@pytest.mark.slow
def test_q4_k_m_types_are_the_ones_llama_quantize_picks(hybrid_exported):
    """llama_model_quantize (Q4_K_M, no imatrix) on our f16 file picks each tensor's type as
    our q4_k_m export does: attn_qkv counted with attn_v, ssm_conv1d kept, ssm_a and the
    biases left float (rows of 64 here: K-quants fall back to 32-blocks, as llama.cpp's do)."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, 2
    out = hybrid_exported.root / "llama-quantize-q4_k_m.gguf"
    assert (
        llama_cpp.llama_model_quantize(
            str(hybrid_exported.gguf["f16"]).encode(), str(out).encode(), ctypes.byref(params)
        )
        == 0
    )
    ours, theirs = (
        {t.name: t.tensor_type.name for t in gguf.GGUFReader(p).tensors}
        for p in (hybrid_exported.gguf["q4_k_m"], out)
    )
    assert ours == theirs


# --- fast: the layouts and the refusals ----------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_factors_become_the_gguf_tensors_own_as_the_weight_does(family, tmp_path):
    """Rows picked from B and columns from A give the delta of each GGUF tensor made of an
    adapted one: Qwen3-Next's in_proj_qkvz regrouped and split in two, Qwen3.5's value heads
    reordered (rows of in_proj_qkv / z / b / a, columns of out_proj)."""
    module = {"qwen3_next": qwen3_next, "qwen3_5_moe": qwen3_5_moe}[family]
    model, _ = mlxmoe.load(save(make_hf(family, linear_value_head_dim=16), tmp_path), dtype=mx.float32)
    args, shapes = model.args, {k: v.shape for k, v in tree_flatten(model.parameters())}
    rng = np.random.default_rng(0)
    roles = (
        ("ssm_in", "ssm_ba", "ssm_out")
        if family == "qwen3_next"
        else ("attn_qkv", "attn_gate", "ssm_beta", "ssm_alpha", "ssm_out")
    )
    for role in roles:
        out, inp = shapes[ROLES[role].ours.format(bid=0)]
        a, b = rng.standard_normal((4, inp)), rng.standard_normal((out, 4))
        parts = module.FAMILY.gguf_tensor_parts(role, args)
        assert (len(parts) == 2) == (role == "ssm_in")
        for part in parts:
            part_a, part_b = part.lora(a, b)
            np.testing.assert_allclose(part_b @ part_a, part.apply(b @ a), rtol=1e-12, atol=1e-12)


def test_export_refuses_value_heads_narrower_than_key_heads(tmp_path):
    folder = save(make_hf("qwen3_next"), tmp_path / "model")  # key heads 16 wide, value heads 8
    with pytest.raises(MlxMoeError, match="linear_key_head_dim=16, linear_value_head_dim=8"):
        export_gguf(folder, tmp_path / "x.gguf", "f16")
    assert not (tmp_path / "x.gguf").exists()


def test_qwen3_5_export_refuses_rope_sections_wider_than_a_head(tmp_path):
    # transformers' default sections (11, 11, 10) on a 16-wide head rotating a quarter of it
    folder = save(make_hf("qwen3_5_moe", linear_value_head_dim=16), tmp_path / "model")
    with pytest.raises(MlxMoeError, match="RoPE sections"):
        export_gguf(folder, tmp_path / "x.gguf", "f16")


@pytest.mark.parametrize("family", FAMILIES)
def test_export_hf_writes_the_hub_layout_transformers_loads(family, tmp_path):
    """conv1d as torch's [C, 1, K], Qwen3.5 under model.language_model with its text_config:
    transformers computes from the written folder what it computes from the original."""
    hf = make_hf(family)
    merged = export_hf(save(hf, tmp_path / "model"), tmp_path / "merged")
    cls = type(hf)
    again = cls.from_pretrained(merged).eval()
    tokens = torch.tensor([[1, 5, 9, 33, 2, 70]])
    with torch.no_grad():
        np.testing.assert_array_equal(again(tokens).logits.numpy(), hf(tokens).logits.numpy())
