"""Block-quantizing a tensor in chunks of rows, on every core.

A whole-tensor encode holds several float32 temporaries of the tensor's size (the blocks,
their scaled values, the rounded codes); a chunk of 2^18 values keeps them to a few MiB,
and numpy releases the GIL inside each chunk's work, so threads share the cores.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType
CHUNK_VALUES = 1 << 18  # 1 MiB of float32 per chunk

# The float16 scales inside each block (d, and dmin where the type has one)
HALF_BYTES = {
    Q.Q8_0: slice(0, 2),
    Q.Q4_0: slice(0, 2),
    Q.Q4_K: slice(0, 4),
    Q.Q5_K: slice(0, 4),
    Q.Q6_K: slice(208, 210),
}


@lru_cache(maxsize=None)
def _pool(threads: int) -> ThreadPoolExecutor:
    """One pool per thread count for the process: an export encodes hundreds of tensors, and
    a pool started for each costs ~1.5 ms (measured: 300 pools 0.49 s, one shared 0.07 s)."""
    return ThreadPoolExecutor(threads, thread_name_prefix="mlxmoe-blocks")


def _each(run: Callable[[int], None], starts: range, threads: int | None) -> None:
    """run(start) for every chunk start, on ``threads`` threads (default: every core)."""
    threads = threads or os.cpu_count() or 1
    if threads > 1 and len(starts) > 1:
        list(_pool(threads).map(run, starts))  # list(): re-raises a chunk's exception
    else:
        for start in starts:
            run(start)


def encode_blocks(
    x: np.ndarray,
    qtype: Q,
    encode: Callable[[np.ndarray], np.ndarray],
    threads: int | None = None,
    chunk_values: int = CHUNK_VALUES,
) -> np.ndarray:
    """x float [..., n] -> uint8 [..., n // block * type_size]: ``encode`` maps float32
    blocks [m, block] to their bytes [m, type_size]. ValueError for rows that do not split
    into blocks, for NaN/inf, and for values whose scales overflow float16."""
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[-1] % block:
        raise ValueError(
            f"{qtype.name} needs rows whose length is a multiple of {block}, got shape {x.shape}"
        )
    blocks = x.reshape(-1, block)
    chunk_blocks = max(1, chunk_values // block)
    out = np.empty((blocks.shape[0], type_size), np.uint8)

    def run(start: int) -> None:
        chunk = blocks[start : start + chunk_blocks].astype(np.float32)
        if not np.isfinite(chunk).all():
            raise ValueError(f"{qtype.name}: the tensor holds NaN or infinity")
        with np.errstate(all="ignore"):
            out[start : start + chunk_blocks] = encode(chunk)

    _each(run, range(0, blocks.shape[0], chunk_blocks), threads)
    if qtype in HALF_BYTES and not np.isfinite(out[:, HALF_BYTES[qtype]].copy().view("<f2")).all():
        # an infinite block scale: llama.cpp's ggml_validate_row_data rejects the row too
        raise ValueError(
            f"{qtype.name}: values too large for the float16 block scales "
            f"(max |x| = {max(-float(x.min()), float(x.max())):.3g})"
        )
    return out.reshape(*x.shape[:-1], x.shape[-1] // block * type_size)


def cast(
    x: np.ndarray, dtype: np.dtype, threads: int | None = None, chunk_values: int = CHUNK_VALUES
) -> np.ndarray:
    """x.astype(dtype), chunked over the cores (numpy's float16 cast runs on one core, at
    ~250 M values/s here)."""
    x = np.ascontiguousarray(x)
    out = np.empty(x.shape, dtype)
    flat_in, flat_out = x.reshape(-1), out.reshape(-1)

    def run(start: int) -> None:
        with np.errstate(over="ignore"):  # the exporter refuses what overflows (export.produce)
            flat_out[start : start + chunk_values] = flat_in[start : start + chunk_values]

    _each(run, range(0, flat_in.size, chunk_values), threads)
    return out


def quantize_legacy(x: np.ndarray, qtype: Q, threads: int | None = None) -> np.ndarray:
    """Q8_0, Q4_0, ...: gguf-py's own block encoder (the converter's), chunked and threaded;
    bytes equal to llama-quantize's."""

    def encode(blocks: np.ndarray) -> np.ndarray:
        if qtype == Q.Q4_0:
            # An all-zero block whose largest-magnitude entry is -0.0 gets scale +0.0 from
            # gguf-py but -0.0 from ggml (which starts its max at +0.0): make zeros +0.0.
            blocks = blocks + np.float32(0.0)
        # one row: gguf-py loops in Python over groups of 16 rows, which here would be blocks
        return gguf.quants.quantize(blocks.reshape(1, -1), qtype).reshape(len(blocks), -1)

    return encode_blocks(x, qtype, encode, threads)


def mxfp4_from_hub(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The hub's MXFP4 (blocks [..., n / 32, 16], value 2k in byte k's low nibble, 2k + 1 in
    its high one; scales [..., n / 32]) as ggml's block_mxfp4 rows [..., n / 32 * 17]: the
    exponent, then value j in byte j's low nibble and j + 16 in its high one. The same codes
    and exponents, moved (the converter's GptOssModel.repack_mxfp4)."""
    codes = np.stack([blocks & 15, blocks >> 4], axis=-1).reshape(*blocks.shape[:-1], 32)
    packed = np.concatenate([scales[..., None], codes[..., :16] | (codes[..., 16:] << 4)], axis=-1)
    return packed.reshape(*packed.shape[:-2], -1).astype(np.uint8)
