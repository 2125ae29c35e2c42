"""Safetensors streamed one tensor at a time: headers read without loading, files written
from producers so that nothing beyond one tensor is held in memory."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from .checkpoint import INDEX_FILE, read_json
from .errors import CheckpointError, MlxMoeError

SAFETENSORS_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
                        "I8": 1, "U8": 1, "BOOL": 1}
MX_DTYPES = {"F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16}


# --- writing, one tensor at a time -------------------------------------------------------


def fresh_output(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not overwrite:
        raise MlxMoeError(f"{out_dir}: already exists (pass overwrite=True to replace it)")


@dataclass(frozen=True)
class TensorOut:
    """A tensor to write: its name, safetensors dtype ("F32", "BF16", ...), shape, and a
    function that produces its bytes when its turn comes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    produce: Callable[[], bytes]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * SAFETENSORS_ITEMSIZE[self.dtype]


def write_safetensors(path: Path, tensors: Iterable[TensorOut]) -> None:
    """The safetensors format, streamed: the header (names, shapes, offsets) is known before
    any data, so each tensor is produced, written and dropped in turn."""
    tensors = list(tensors)
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for t in tensors:
            data = t.produce()
            if len(data) != t.nbytes:
                raise AssertionError(f"{t.name}: produced {len(data)} bytes, expected {t.nbytes}")
            f.write(data)


# --- reading the dense checkpoint without converting anything ---------------------------


@dataclass(frozen=True)
class TensorIn:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset in the file
    nbytes: int

    def read(self) -> bytes:
        with open(self.file, "rb") as f:
            f.seek(self.start)
            return f.read(self.nbytes)


def safetensors_index(folder: Path) -> list[TensorIn]:
    index = folder / INDEX_FILE
    if index.is_file():
        files = sorted({folder / n for n in read_json(index).get("weight_map", {}).values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors weight files")
    out = []
    for file in files:
        with open(file, "rb") as f:
            size = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(size))
        for name, spec in header.items():
            if name == "__metadata__":
                continue
            begin, end = spec["data_offsets"]
            out.append(TensorIn(name, spec["dtype"], tuple(spec["shape"]), file,
                                8 + size + begin, end - begin))
    return out


def to_float32(data: bytes, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    # Through MLX because numpy has no bfloat16.
    raw = mx.array(np.frombuffer(data, dtype=np.uint8))
    return np.array(raw.view(MX_DTYPES[dtype]).astype(mx.float32)).reshape(shape)


def from_float32(array: np.ndarray, dtype: str) -> bytes:
    return np.array(mx.array(array).astype(MX_DTYPES[dtype]).view(mx.uint8)).tobytes()


