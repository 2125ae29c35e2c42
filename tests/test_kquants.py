"""Our numpy block quantizers (K-quants, and the chunked legacy types) and Q4_K_M policy
against llama.cpp itself.

Two independent references: ggml's own quantizer (``ggml_quantize_chunk`` in the
libggml-base that llama-cpp-python ships, the function llama-quantize calls), and
``llama_model_quantize`` run on small float32 GGUFs, whose per-tensor types and bytes
we must reproduce for a q4_k_m export.
"""

from __future__ import annotations

import ctypes
import tracemalloc
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest
from llama_cpp._ctypes_extensions import load_shared_library

from mlxmoe.gguf.blocks import encode_blocks, quantize_legacy
from mlxmoe.gguf.kquants import (
    Q4_K_M_POLICY,
    QUANTIZERS,
    q4_k_m_type,
    quantize_q4_k,
    quantize_q5_k,
    quantize_q6_k,
)

Q = gguf.GGMLQuantizationType
K_QUANTS = [Q.Q4_K, Q.Q5_K, Q.Q6_K]
# RMSE / std of random normal data after a round trip, as llama.cpp's own encoder gives it
# (measured on 256 x 4096 normals: Q4_K 0.0715, Q5_K 0.0363, Q6_K 0.0178)
RELATIVE_RMSE = {Q.Q4_K: 0.075, Q.Q5_K: 0.038, Q.Q6_K: 0.019}


def _ggml_quantize_chunk():
    # llama-cpp-python's own loader: libggml-base.so on Linux, .dylib on macOS
    lib = load_shared_library("ggml-base", Path(llama_cpp.__file__).parent / "lib")
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    return fn


def llama_cpp_encode(x: np.ndarray, qtype: Q) -> np.ndarray:
    """ggml's encoder without an importance matrix (quantize_row_*_ref), as llama-quantize."""
    rows = np.ascontiguousarray(x, np.float32).reshape(-1, x.shape[-1])
    out = np.empty(gguf.quant_shape_to_byte_shape(rows.shape, qtype), np.uint8)
    _ggml_quantize_chunk()(
        int(qtype), rows.ctypes.data, out.ctypes.data, 0, rows.shape[0], rows.shape[1], None
    )
    return out.reshape(gguf.quant_shape_to_byte_shape(x.shape, qtype))


def different_blocks(ours: np.ndarray, theirs: np.ndarray, qtype: Q) -> int:
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    return int((ours.reshape(-1, size) != theirs.reshape(-1, size)).any(axis=1).sum())


def relative_rmse(encoded: np.ndarray, x: np.ndarray, qtype: Q) -> float:
    decoded = gguf.quants.dequantize(encoded, qtype)
    return float(np.sqrt(np.mean((decoded - x) ** 2)) / x.std())


RNG = np.random.default_rng(1234)
DATA = {
    "normal": RNG.standard_normal((64, 4096)),
    "row_scales_1e-8_to_1e3": RNG.standard_normal((64, 4096)) * np.exp(RNG.uniform(-18, 7, (64, 1))),
    "heavy_tailed": RNG.standard_t(3, (64, 4096)) * 0.02,
    "sub_block_scales_vary": RNG.standard_normal((16, 4096))
    * np.repeat(10.0 ** RNG.integers(-6, 3, (16, 256)), 16, axis=1),
    "sparse": RNG.standard_normal((16, 4096)) * (RNG.uniform(size=(16, 4096)) < 0.05),
    "half_integers_ties": RNG.integers(-64, 64, (16, 4096)) / 8,
    "uniform_positive": RNG.uniform(0, 1, (16, 4096)),
}


@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda q: q.name)
def test_dequantized_error_is_llama_cpps(qtype):
    x = np.random.default_rng(0).standard_normal((256, 4096)).astype(np.float32)
    ours = relative_rmse(QUANTIZERS[qtype](x), x, qtype)
    theirs = relative_rmse(llama_cpp_encode(x, qtype), x, qtype)
    assert ours <= RELATIVE_RMSE[qtype]
    assert ours == pytest.approx(theirs, rel=1e-6)


@pytest.mark.parametrize("distribution", DATA, ids=str)
@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda q: q.name)
def test_bytes_equal_llama_cpps_encoder(qtype, distribution):
    x = DATA[distribution].astype(np.float32)
    ours, theirs = QUANTIZERS[qtype](x), llama_cpp_encode(x, qtype)
    # every block is identical here; allow a stray float-rounding-order difference per 1000
    n_blocks = x.size // 256
    assert different_blocks(ours, theirs, qtype) <= n_blocks // 1000


_BASE = np.random.default_rng(7).standard_normal((8, 512)).astype(np.float32)
EDGE_CASES = {
    "all_zero": np.zeros((4, 512)),
    "constant_positive": np.full((4, 512), 0.37),
    "constant_negative": np.full((4, 512), -0.37),
    "negative_only": -np.abs(_BASE),
    "one_spike_in_zeros": np.eye(2, 512, 100) * 5,
    "huge_1e6": _BASE * 1e6,
    "tiny_1e-5": _BASE * 1e-5,
    "tiny_1e-30": _BASE * 1e-30,
    "denormal_1e-40": _BASE * np.float32(1e-40),
}


@pytest.mark.parametrize("case", EDGE_CASES, ids=str)
@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda q: q.name)
def test_edge_case_blocks_equal_llama_cpps(qtype, case):
    x = EDGE_CASES[case].astype(np.float32)
    ours = QUANTIZERS[qtype](x)
    np.testing.assert_array_equal(ours, llama_cpp_encode(x, qtype))
    decoded = gguf.quants.dequantize(ours, qtype)
    assert np.isfinite(decoded).all()
    if not case.startswith(("tiny", "denormal")):  # below float16 scales: lossy in llama.cpp too
        assert np.abs(decoded - x).max() <= 0.1 * np.abs(x).max()


@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda q: q.name)
def test_all_zero_input_is_all_zero_bytes_and_decodes_to_zero(qtype):
    encoded = QUANTIZERS[qtype](np.zeros((3, 256), np.float32))
    assert not encoded.any()
    assert not gguf.quants.dequantize(encoded, qtype).any()


@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda q: q.name)
def test_values_beyond_float16_block_scales_raise(qtype):
    # llama.cpp writes an infinite scale and then fails ggml_validate_row_data
    with pytest.raises(ValueError, match="float16"):
        QUANTIZERS[qtype](_BASE * np.float32(1e12))


@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda q: q.name)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_input_raises(qtype, bad):
    x = _BASE.copy()
    x[3, 17] = bad
    with pytest.raises(ValueError, match="NaN or infinity"):
        QUANTIZERS[qtype](x)


@pytest.mark.parametrize("shape", [(4, 100), (4, 384), (255,), ()])
def test_rows_not_a_multiple_of_256_raise(shape):
    for encode in (quantize_q4_k, quantize_q5_k, quantize_q6_k):
        with pytest.raises(ValueError, match="multiple of 256"):
            encode(np.zeros(shape, np.float32))


@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda q: q.name)
def test_stacked_experts_keep_their_leading_axes_and_any_thread_count_gives_the_same_bytes(qtype):
    experts = np.random.default_rng(3).standard_normal((3, 700, 512)).astype(np.float32)
    one = QUANTIZERS[qtype](experts, threads=1)  # 4200 blocks: several chunks
    assert one.shape == gguf.quant_shape_to_byte_shape(experts.shape, qtype)
    assert one.dtype == np.uint8
    np.testing.assert_array_equal(one, QUANTIZERS[qtype](experts, threads=2))
    np.testing.assert_array_equal(one[1], QUANTIZERS[qtype](experts[1]))


def test_temporary_memory_does_not_grow_with_the_tensor():
    peaks = []
    for rows in (256, 2048):  # 4 MiB and 32 MiB of float32
        x = np.random.default_rng(0).standard_normal((rows, 4096)).astype(np.float32)
        tracemalloc.start()
        out = quantize_q4_k(x)
        peaks.append(tracemalloc.get_traced_memory()[1] - out.nbytes)
        tracemalloc.stop()
    assert peaks[1] < 2 * peaks[0] + (1 << 20)
    assert peaks[1] < 32 << 20


def test_policy_keeps_what_llama_cpp_does_not_quantize_in_f32():
    for name in (
        "blk.0.attn_norm.weight",
        "output_norm.weight",
        "blk.3.ffn_gate_inp.weight",
        "blk.0.attn_q.bias",
        "blk.1.ffn_gate_inp_shexp.weight",
    ):
        assert q4_k_m_type(name, 8, 8) == Q.F32
    assert Q4_K_M_POLICY is q4_k_m_type


# --- the whole of llama-quantize on small float32 GGUFs ---------------------------------------

MODELS = {
    # name: (n_layers, n_embd, n_ff, n_expert, tied embeddings)
    "dense_tied": (8, 256, 256, 0, True),
    "moe_8_experts_short_rows": (8, 256, 96, 8, False),  # ffn_down rows of 96: fallbacks
    "moe_4_experts": (8, 256, 256, 4, False),
    "dense_rows_of_96": (4, 96, 80, 0, False),  # 32-blocks for all, F16 for rows of 80
}


def write_f32_gguf(path: Path, n_layers, n_embd, n_ff, n_expert, tied) -> dict[str, np.ndarray]:
    """A llama-architecture model with only what llama_model_quantize reads (no tokenizer)."""
    rng = np.random.default_rng(n_layers * 1000 + n_ff + n_expert)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(n_layers)
    writer.add_context_length(64)
    writer.add_embedding_length(n_embd)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    if n_expert:
        writer.add_expert_count(n_expert)
        writer.add_expert_used_count(2)
    vocab, kv = 320, n_embd // 2
    shapes = {"token_embd.weight": (vocab, n_embd), "output_norm.weight": (n_embd,)}
    if not tied:
        shapes["output.weight"] = (vocab, n_embd)
    for i in range(n_layers):
        p = f"blk.{i}."
        shapes |= {
            p + "attn_norm.weight": (n_embd,),
            p + "ffn_norm.weight": (n_embd,),
            p + "attn_q.weight": (n_embd, n_embd),
            p + "attn_k.weight": (kv, n_embd),
            p + "attn_v.weight": (kv, n_embd),
            p + "attn_output.weight": (n_embd, n_embd),
        }
        if n_expert:
            shapes |= {
                p + "ffn_gate_inp.weight": (n_expert, n_embd),
                p + "ffn_gate_exps.weight": (n_expert, n_ff, n_embd),
                p + "ffn_up_exps.weight": (n_expert, n_ff, n_embd),
                p + "ffn_down_exps.weight": (n_expert, n_embd, n_ff),
            }
        else:
            shapes |= {
                p + "ffn_gate.weight": (n_ff, n_embd),
                p + "ffn_up.weight": (n_ff, n_embd),
                p + "ffn_down.weight": (n_embd, n_ff),
            }
    tensors = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    for name, data in tensors.items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


@pytest.fixture(scope="module", params=MODELS, ids=str)
def llama_quantized(request, tmp_path_factory):
    """(our float32 tensors, config, llama.cpp's Q4_K_M file read back)."""
    config = MODELS[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    tensors = write_f32_gguf(folder / "f32.gguf", *config)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(
        str(folder / "f32.gguf").encode(), str(folder / "q4_k_m.gguf").encode(), ctypes.byref(params)
    )
    assert rc == 0
    return tensors, config, gguf.GGUFReader(folder / "q4_k_m.gguf")


def test_llama_quantize_picks_the_types_of_our_q4_k_m_policy(llama_quantized):
    tensors, (n_layers, _, _, n_expert, tied), reader = llama_quantized
    theirs = {t.name: t.tensor_type for t in reader.tensors}
    assert theirs.keys() == tensors.keys()
    ours = {
        name: q4_k_m_type(name, n_layers, n_expert or None, row_length=data.shape[-1], tied_embeddings=tied)
        for name, data in tensors.items()
    }
    assert {n: q.name for n, q in ours.items()} == {n: q.name for n, q in theirs.items()}


def test_llama_quantize_writes_our_bytes_for_every_tensor(llama_quantized):
    tensors, _, reader = llama_quantized
    seen = set()
    for t in reader.tensors:
        qtype = t.tensor_type
        if qtype == Q.F32:
            continue
        data = tensors[t.name]
        if qtype == Q.F16:
            np.testing.assert_array_equal(data.astype(np.float16), t.data, err_msg=t.name)
        else:
            encode = QUANTIZERS.get(qtype, lambda x, q=qtype: gguf.quants.quantize(x, q))
            ours = encode(data)
            assert different_blocks(ours, np.asarray(t.data), qtype) == 0, t.name
        seen.add(qtype)
    assert seen & {Q.Q4_K, Q.Q6_K, Q.Q5_0, Q.Q8_0}


# --- the legacy types (Q8_0, Q4_0): gguf-py's encoder, chunked and threaded -----------------

LEGACY = [Q.Q8_0, Q.Q4_0]


@pytest.mark.parametrize("qtype", LEGACY, ids=lambda q: q.name)
@pytest.mark.parametrize("distribution", ["normal", "heavy_tailed", "sparse", "half_integers_ties"])
def test_legacy_bytes_equal_llama_cpps_encoder(qtype, distribution):
    x = DATA[distribution].astype(np.float32)
    np.testing.assert_array_equal(quantize_legacy(x, qtype), llama_cpp_encode(x, qtype))


@pytest.mark.parametrize("qtype", LEGACY, ids=lambda q: q.name)
def test_legacy_chunks_and_threads_give_the_whole_tensor_bytes(qtype):
    experts = np.random.default_rng(4).standard_normal((3, 700, 512)).astype(np.float32)
    whole = gguf.quants.quantize(experts, qtype)
    chunked = encode_blocks(
        experts, qtype, lambda b: gguf.quants.quantize(b, qtype), threads=2, chunk_values=4096
    )  # 256+ chunks
    np.testing.assert_array_equal(chunked, whole)
    assert chunked.shape == whole.shape


def test_legacy_temporary_memory_does_not_grow_with_the_tensor():
    peaks = []
    for rows in (256, 2048):  # 4 MiB and 32 MiB of float32
        x = np.random.default_rng(0).standard_normal((rows, 4096)).astype(np.float32)
        tracemalloc.start()
        out = quantize_legacy(x, Q.Q8_0)
        peaks.append(tracemalloc.get_traced_memory()[1] - out.nbytes)
        tracemalloc.stop()
    assert peaks[1] < 2 * peaks[0] + (1 << 20)
    assert peaks[1] < 32 << 20


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_legacy_non_finite_input_raises(bad):
    x = np.zeros((2, 64), np.float32)
    x[1, 5] = bad
    with pytest.raises(ValueError, match="NaN or infinity"):
        quantize_legacy(x, Q.Q8_0)
