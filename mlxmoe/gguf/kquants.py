"""K-quant encoders (Q4_K, Q5_K, Q6_K) in numpy, and llama.cpp's Q4_K_M per-tensor policy.

gguf-py can read K-quants but not write them, so a ``q4_k_m`` export encodes them here.
The encoders follow llama.cpp's importance-matrix-free path (ggml/src/ggml-quants.c:
``quantize_q4_K`` -> ``quantize_row_q4_K_ref``, ``quantize_row_q5_K_ref``,
``quantize_row_q6_K_ref``) operation by operation in float32, including the order of every
sum, so the bytes equal llama-quantize's; tests/test_kquants.py checks that against
llama.cpp itself.

Work is vectorized over sub-blocks: a sub-block's elements lie along axis 0 (``[32, M]``
or ``[16, M]``), where numpy's ``add.reduce`` adds element by element in order, as the C
loops do (a reduction over a contiguous last axis would be pairwise and round
differently). Rows are encoded in chunks, so temporaries stay a few MiB whatever the
tensor size.
"""

from __future__ import annotations

import re

import gguf
import numpy as np

from .blocks import encode_blocks

Q = gguf.GGMLQuantizationType
QK_K = 256
F32 = np.float32


def _nearest_int(v: np.ndarray) -> np.ndarray:
    # ggml's nearest_int adds 1.5 * 2**23 in float32 and keeps the mantissa bits: round half
    # to even, i.e. rint, for |v| < 2**22. Arguments here stay below ~nmax + 1 (128 for Q6_K
    # scales) except where an inverse scale overflows, which _finite handles.
    return np.rint(v)


def _finite(iscale: np.ndarray) -> np.ndarray:
    """An inverse scale that overflowed (range below ~1e-37) as 0: nearest_int turns inf
    and NaN into numbers that the clamps make 0, which is what a factor of 0 gives."""
    return np.where(np.isinf(iscale), F32(0), iscale)


def _sum(terms: np.ndarray) -> np.ndarray:
    """Sum over axis 0 in element order, in float32 (the C accumulation order)."""
    return np.add.reduce(terms, axis=0, dtype=F32)


def _fp16(v: np.ndarray) -> np.ndarray:
    # numpy's float32 -> float16 rounds to nearest even like GGML_FP32_TO_FP16.
    return v.astype(np.float16)


# --- Q4_K / Q5_K: 8 sub-blocks of 32 with a 6-bit scale and a 6-bit min each -----------------


def _fit_scale_min(x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """make_qkx2_quants over columns of x [32, M]; weights as quantize_row_q4_K_ref sets them.

    Returns (scale [M], min [M] (the positive offset, ``the_min``), levels [32, M] float32).
    """
    n = x.shape[0]
    av_x = np.sqrt(_sum(x * x) / F32(n))
    w = av_x + np.abs(x)
    lo = np.minimum(x.min(axis=0), F32(0))
    hi = x.max(axis=0)
    sum_w = _sum(w)
    sum_x = _sum(w * x)
    flat = hi == lo

    cand, wl, tmp = np.empty_like(x), np.empty_like(x), np.empty_like(x)

    def levels_for(iscale, lo):
        np.subtract(x, lo, out=cand)
        np.multiply(cand, iscale, out=cand)
        np.rint(cand, out=cand)
        return np.clip(cand, 0, nmax, out=cand)

    def error(scale, lo):
        np.multiply(cand, scale, out=tmp)
        np.add(tmp, lo, out=tmp)
        np.subtract(tmp, x, out=tmp)
        np.square(tmp, out=tmp)
        return _sum(np.multiply(w, tmp, out=tmp))

    iscale = F32(nmax) / (hi - lo)
    scale = F32(1) / iscale
    best_iscale, best_lo = _finite(iscale), lo  # levels are recomputed from these at the end
    levels_for(best_iscale, lo)
    best = error(scale, lo)
    for step in range(nstep + 1):
        # the C loop reads `min` after earlier steps may have replaced it
        iscale = _finite((F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / (hi - lo))
        levels_for(iscale, lo)
        np.multiply(w, cand, out=wl)
        sum_l = _sum(wl)
        sum_l2 = _sum(np.multiply(wl, cand, out=tmp))
        sum_xl = _sum(np.multiply(wl, x, out=tmp))
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = this_min > 0
        this_min = np.where(positive, F32(0), this_min)
        this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
        err = error(this_scale, this_min)
        better = (det > 0) & (err < best) & ~flat
        best = np.where(better, err, best)
        best_iscale = np.where(better, iscale, best_iscale)
        best_lo = np.where(better, lo, best_lo)
        scale = np.where(better, this_scale, scale)
        lo = np.where(better, this_min, lo)
    levels = levels_for(best_iscale, best_lo)
    scale = np.where(flat, F32(0), scale)
    levels = np.where(flat, F32(0), levels)
    return scale, -lo, levels


def _k_with_min(blocks: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """The shared part of quantize_row_q{4,5}_K_ref for blocks [nb, 256].

    Returns d, dmin (float16 [nb]), packed 12-byte scales [nb, 12], levels [nb, 8, 32] uint8.
    """
    nb = blocks.shape[0]
    x = np.ascontiguousarray(blocks.reshape(nb * 8, 32).T)  # [32, nb*8]
    scales, mins, levels = _fit_scale_min(x, nmax, rmin, rdelta, nstep)
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)

    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    inv_scale = _finite(np.where(max_scale > 0, F32(63) / max_scale, F32(0)))
    inv_min = _finite(np.where(max_min > 0, F32(63) / max_min, F32(0)))
    # stored through a uint8 (wrapping) before MIN(63, .)
    ls = np.minimum(_nearest_int(inv_scale[:, None] * scales).astype(np.int32) & 0xFF, 63)
    lm = np.minimum(_nearest_int(inv_min[:, None] * mins).astype(np.int32) & 0xFF, 63)
    d = _fp16(max_scale / F32(63))
    dmin = _fp16(max_min / F32(63))

    # requantize with the rounded scales; a sub-block whose scale rounded to 0 keeps its levels
    sub_d = (d.astype(F32)[:, None] * ls.astype(F32)).reshape(1, nb * 8)
    sub_dm = (dmin.astype(F32)[:, None] * lm.astype(F32)).reshape(1, nb * 8)
    nonzero = sub_d != 0
    requant = np.clip(_nearest_int((x + sub_dm) / np.where(nonzero, sub_d, F32(1))), 0, nmax)
    levels = np.where(nonzero, requant, levels)
    levels = levels.T.reshape(nb, 8, 32).astype(np.uint8)

    ls, lm = ls.astype(np.uint8), lm.astype(np.uint8)
    packed = np.empty((nb, 12), np.uint8)
    packed[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    packed[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return d, dmin, packed, levels


def _q4_k_blocks(blocks: np.ndarray) -> np.ndarray:
    d, dmin, scales, levels = _k_with_min(blocks, 15, -1.0, 0.1, 20)
    pairs = levels.reshape(-1, 4, 2, 32)  # [nb, 64-value chunk, low/high nibble, 32]
    qs = pairs[:, :, 0] | (pairs[:, :, 1] << 4)
    return np.concatenate([_bytes(d), _bytes(dmin), scales, qs.reshape(-1, 128)], axis=1)


def _q5_k_blocks(blocks: np.ndarray) -> np.ndarray:
    d, dmin, scales, levels = _k_with_min(blocks, 31, -0.5, 0.1, 15)
    low = levels & 0xF
    qs = (low[:, 0::2] | (low[:, 1::2] << 4)).reshape(-1, 128)
    high = (levels >> 4).astype(np.uint8)  # [nb, 8, 32]: sub-block j sets bit j of qh
    qh = np.zeros((levels.shape[0], 32), np.uint8)
    for j in range(8):
        qh |= high[:, j] << j
    return np.concatenate([_bytes(d), _bytes(dmin), scales, qh, qs], axis=1)


# --- Q6_K: 16 sub-blocks of 16 with a signed 8-bit scale each ---------------------------------


def _fit_symmetric(x: np.ndarray, nmax: int = 32):
    """make_qx_quants(n, nmax, x, L, rmse_type=1, NULL) over columns of x [16, M].

    Returns (scale [M], levels [16, M] float32, already offset by +nmax).
    """
    first_max = np.argmax(np.abs(x), axis=0)[None]  # C keeps the first of equal |x|
    peak = np.take_along_axis(x, first_max, axis=0)[0]
    zero = np.abs(peak) < F32(1e-15)  # GROUP_MAX_EPS
    peak = np.where(zero, F32(1), peak)
    w = x * x
    wx = w * x
    cand, tmp = np.empty_like(x), np.empty_like(x)

    def levels_for(iscale):
        np.multiply(x, iscale, out=cand)
        np.rint(cand, out=cand)
        return np.clip(cand, -nmax, nmax - 1, out=cand)

    def sums(iscale):
        levels_for(iscale)
        sumlx = _sum(np.multiply(wx, cand, out=tmp))
        np.multiply(w, cand, out=tmp)
        return sumlx, _sum(np.multiply(tmp, cand, out=tmp))

    best_iscale = F32(-nmax) / peak  # levels are recomputed from it at the end
    sumlx, suml2 = sums(best_iscale)
    scale = np.where(suml2 != 0, sumlx / np.where(suml2 != 0, suml2, F32(1)), F32(0))
    best = scale * sumlx
    for step in (*range(-9, 0), *range(1, 10)):
        iscale = -(F32(nmax) + F32(0.1) * F32(step)) / peak
        sumlx, suml2 = sums(iscale)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        best_iscale = np.where(better, iscale, best_iscale)
        scale = np.where(better, sumlx / np.where(better, suml2, F32(1)), scale)
        best = np.where(better, scale * sumlx, best)
    levels = levels_for(best_iscale) + F32(nmax)
    return np.where(zero, F32(0), scale), np.where(zero, F32(0), levels)


def _q6_k_blocks(blocks: np.ndarray) -> np.ndarray:
    nb = blocks.shape[0]
    x = np.ascontiguousarray(blocks.reshape(nb * 16, 16).T)  # [16, nb*16]
    scales, levels = _fit_symmetric(x)
    scales = scales.reshape(nb, 16)

    first_max = np.argmax(np.abs(scales), axis=1)[:, None]
    max_scale = np.take_along_axis(scales, first_max, axis=1)[:, 0]
    empty = np.abs(max_scale) < F32(1e-15)  # written as an all-zero block
    iscale = F32(-128) / np.where(empty, F32(1), max_scale)
    d = _fp16(F32(1) / iscale)
    # int -> int8 wraps, as the C store does
    sc = np.minimum(_nearest_int(iscale[:, None] * scales), 127).astype(np.int32).astype(np.int8)

    sub_d = (d.astype(F32)[:, None] * sc.astype(F32)).reshape(1, nb * 16)
    nonzero = sub_d != 0
    requant = np.clip(_nearest_int(x / np.where(nonzero, sub_d, F32(1))), -32, 31) + F32(32)
    levels = np.where(nonzero, requant, levels).T.astype(np.uint8).reshape(nb, 2, 4, 32)

    ql = np.empty((nb, 2, 2, 32), np.uint8)  # per 128-value half: values [0,64) | [64,128) << 4
    ql[:, :, 0] = (levels[:, :, 0] & 0xF) | ((levels[:, :, 2] & 0xF) << 4)
    ql[:, :, 1] = (levels[:, :, 1] & 0xF) | ((levels[:, :, 3] & 0xF) << 4)
    high = levels >> 4
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    out = np.concatenate([ql.reshape(nb, 128), qh.reshape(nb, 64), sc.view(np.uint8), _bytes(d)], axis=1)
    out[empty] = 0
    return out


# --- driver ----------------------------------------------------------------------------------


def _bytes(half: np.ndarray) -> np.ndarray:
    return half.astype("<f2").view(np.uint8).reshape(-1, 2)


def quantize_q4_k(x: np.ndarray, *, threads: int | None = None) -> np.ndarray:
    """x float [..., n], n % 256 == 0 -> uint8 [..., n // 256 * 144] in ggml's block_q4_K layout.

    Byte for byte what llama-quantize writes without an importance matrix. ``threads``
    (default: all cores) encode chunks of rows in parallel. ValueError for rows that do not
    split into 256-blocks, for NaN/inf, and for values whose scales overflow float16.
    """
    return encode_blocks(x, Q.Q4_K, _q4_k_blocks, threads)


def quantize_q5_k(x: np.ndarray, *, threads: int | None = None) -> np.ndarray:
    """Like quantize_q4_k, in ggml's block_q5_K layout (176 bytes per 256 values)."""
    return encode_blocks(x, Q.Q5_K, _q5_k_blocks, threads)


def quantize_q6_k(x: np.ndarray, *, threads: int | None = None) -> np.ndarray:
    """Like quantize_q4_k, in ggml's block_q6_K layout (210 bytes per 256 values)."""
    return encode_blocks(x, Q.Q6_K, _q6_k_blocks, threads)


QUANTIZERS = {Q.Q4_K: quantize_q4_k, Q.Q5_K: quantize_q5_k, Q.Q6_K: quantize_q6_k}


# --- Q4_K_M: which type llama-quantize gives each tensor -------------------------------------
# src/llama-quant.cpp (llama-cpp-python 0.3.36), ftype LLAMA_FTYPE_MOSTLY_Q4_K_M, no imatrix,
# no --tensor-type overrides. Arch-specific branches (Falcon, GLM5-next, 70B Llama/Qwen2)
# are not mirrored.

# tensor_allows_quantization: names llama.cpp copies unchanged (1-D tensors are the caller's)
# (ffn_gate_inp_shexp is [1, n_embd]: ggml_n_dims 1, which llama.cpp does not quantize either)
_KEPT = (
    "_norm.weight",
    "ffn_gate_inp.weight",
    "ffn_gate_inp_shexp.weight",
    "ffn_gate_tid2eid.weight",
    "ssm_conv1d",
    "shortconv.conv.weight",
    "attn_rel_b.weight",
    "position_embd",
    "token_types.weight",
)
# tensor_type_fallback: the type used when a row does not split into the target's blocks
_FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}
# tensor_get_category, in its order of tests (first match wins)
_CATEGORIES = (
    ("attn_qkv.weight", "attn_v"),
    ("attn_kv_b.weight", "attn_v"),
    ("attn_v.weight", "attn_v"),
    ("attn_k.weight", "attn_k"),
    ("attn_q.weight", "attn_q"),
    ("attn_output.weight", "attn_output"),
    ("ffn_up", "ffn_up"),
    ("ffn_gate", "ffn_gate"),
    ("ffn_down", "ffn_down"),
)


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama_tensor_get_type_impl's lambda: the first and last eighth, and every third between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    return next((cat for key, cat in _CATEGORIES if key in name), "other")


def q4_k_m_type(
    gguf_name: str,
    n_layers: int,
    n_experts: int | None,
    *,
    row_length: int | None = None,
    tied_embeddings: bool = False,
) -> Q:
    """The type ``llama_model_quantize`` with LLAMA_FTYPE_MOSTLY_Q4_K_M gives a tensor.

    ``row_length`` (the GGUF ne[0], i.e. the last numpy axis) turns on llama.cpp's fallback
    for rows that are not a multiple of the block size; ``tied_embeddings`` says the file has
    no ``output.weight``, so ``token_embd.weight`` is quantized like the output.
    Tensors llama.cpp does not quantize (norms, routers, non-``weight``) give F32.
    """
    name = gguf_name
    if not name.endswith("weight") or any(k in name for k in _KEPT):
        return Q.F32  # tensor_allows_quantization: copied as they are (we write them F32)
    cat = _category(name)
    n_expert = n_experts or 0
    layer_match = re.match(r"blk\.(\d+)\.", name)
    layer = int(layer_match.group(1)) if layer_match else 0
    qtype = Q.Q4_K  # llama_ftype_get_default_type
    if cat == "output" or (cat == "token_embd" and tied_embeddings):
        # the OUTPUT branch: Q8_0 when rows do not split into 256-blocks
        qtype = Q.Q8_0 if row_length is not None and row_length % QK_K else Q.Q6_K
    elif cat == "attn_v":
        # counts attn_v/attn_qkv/attn_kv_b tensors in layer order: one per layer assumed
        if use_more_bits(layer, n_layers):
            qtype = Q.Q6_K
        if n_expert == 8:  # "for the 8-expert model, bumping this to Q8_0 trades just ~128MB"
            qtype = Q.Q8_0
    elif cat == "attn_k" and n_expert == 8:
        qtype = Q.Q8_0
    elif cat == "ffn_down" and use_more_bits(layer, n_layers):
        qtype = Q.Q6_K  # experts, shared experts and dense FFNs alike, by layer
    elif cat == "attn_output" and n_expert == 8:
        qtype = Q.Q5_K
    if row_length is not None:
        qtype = _fallback(qtype, row_length)
    return qtype


def _fallback(qtype: Q, row_length: int) -> Q:
    """tensor_type_fallback: K-quants -> 32-blocks, then F16 if even that does not fit."""
    if row_length % gguf.GGML_QUANT_SIZES[qtype][0] == 0:
        return qtype
    qtype = _FALLBACK.get(qtype, qtype)
    return qtype if row_length % gguf.GGML_QUANT_SIZES[qtype][0] == 0 else Q.F16


Q4_K_M_POLICY = q4_k_m_type  # the policy as a value, for callers that take one per file type
