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

SAFETENSORS_ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
MX_DTYPES = {"F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16}
NUMPY_DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U8": "u1",
    "BOOL": "?",
}


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
        header[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
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


def save_arrays(path: Path, arrays: dict[str, mx.array], metadata: dict[str, str] | None = None) -> None:
    """``mx.save_safetensors`` through a Python file: a failed write (a full disk) raises
    ``OSError`` with its errno, where MLX's own file writer raises a bare ``RuntimeError``."""
    with open(path, "wb") as f:
        mx.save_safetensors(f, arrays, metadata=metadata)


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

    def float32(self) -> np.ndarray:
        """The tensor as float32; stored as float32, it is read straight into its array."""
        if self.dtype != "F32":
            return to_float32(self.read(), self.dtype, self.shape)
        out = np.empty(self.shape, np.float32)
        with open(self.file, "rb") as f:
            f.seek(self.start)
            if f.readinto(memoryview(out).cast("B")) != self.nbytes:
                raise CheckpointError(f"{self.file}: tensor {self.name!r} is truncated")
        return out


def safetensors_index(folder: Path) -> list[TensorIn]:
    index = folder / INDEX_FILE
    if index.is_file():
        files = sorted({folder / n for n in read_json(index).get("weight_map", {}).values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors weight files")
    return [t for file in files for t in safetensors_header(file)]


def safetensors_header(file: Path) -> list[TensorIn]:
    """Every tensor of one file, located by its header alone."""
    try:
        with open(file, "rb") as f:
            size = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(size))
        file_size = file.stat().st_size
        out = []
        for name, spec in header.items():
            if name == "__metadata__":
                continue
            begin, end = spec["data_offsets"]
            tensor = TensorIn(name, spec["dtype"], tuple(spec["shape"]), file, 8 + size + begin, end - begin)
            if tensor.start + tensor.nbytes > file_size:
                raise ValueError(f"tensor {name!r} lies past the end of the file")
            out.append(tensor)
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise CheckpointError(f"{file}: cannot read safetensors ({exc})") from exc
    return out


def to_float32(data: bytes, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    if dtype == "BF16":  # numpy has no bfloat16: its bits are a float32's upper half
        wide = np.frombuffer(data, dtype="<u2").astype(np.uint32)
        wide <<= 16
        return wide.view(np.float32).reshape(shape)
    if dtype not in NUMPY_DTYPES:
        raise CheckpointError(f"cannot read safetensors dtype {dtype} as float32")
    return np.frombuffer(data, dtype=NUMPY_DTYPES[dtype]).astype(np.float32).reshape(shape)


def from_float32(array: np.ndarray, dtype: str) -> bytes:
    return np.array(mx.array(array).astype(MX_DTYPES[dtype]).view(mx.uint8)).tobytes()
