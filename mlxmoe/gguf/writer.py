"""gguf-py's GGUFWriter with metadata arrays packed in one pass.

gguf-py packs an array item by item (a struct call and a bytearray append each, plus a type
check of every item): ~0.5 s for a BPE vocabulary's tokens, merges, scores and types. This
writer packs the same bytes with one join (strings) or one numpy cast (numbers); anything
else, and big-endian files, take gguf-py's own path.
"""

from __future__ import annotations

from typing import Any

import gguf
import numpy as np

V = gguf.GGUFValueType
NUMPY_TYPES = {
    V.UINT8: "<u1",
    V.INT8: "<i1",
    V.UINT16: "<u2",
    V.INT16: "<i2",
    V.UINT32: "<u4",
    V.INT32: "<i4",
    V.FLOAT32: "<f4",
    V.UINT64: "<u8",
    V.INT64: "<i8",
    V.FLOAT64: "<f8",
}


class GGUFWriter(gguf.GGUFWriter):
    def _pack_val(self, val: Any, vtype: V, add_vtype: bool, sub_type: V | None = None) -> bytes:
        body = None
        if (
            vtype == V.ARRAY
            and self.endianess == gguf.GGUFEndian.LITTLE
            and isinstance(val, (list, tuple))
            and len(val) > 0
        ):
            body = _pack_array(val, sub_type)
        if body is None:
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        return (np.uint32(vtype).tobytes() if add_vtype else b"") + body


def _pack_array(items: list | tuple, sub_type: V | None) -> bytes | None:
    """Item type, count and items, as gguf-py writes them; None where it must decide."""
    item_type = sub_type if sub_type is not None else V.get_type(items[0])
    if sub_type is None and set(map(type, items)) != {type(items[0])}:
        return None  # (mixed types) gguf-py raises its own error
    head = np.array([item_type], "<u4").tobytes() + np.array([len(items)], "<u8").tobytes()
    if item_type == V.STRING:
        if not all(isinstance(i, (str, bytes)) for i in items):
            return None
        encoded = (i.encode("utf-8") if isinstance(i, str) else i for i in items)
        return head + b"".join(len(e).to_bytes(8, "little") + e for e in encoded)
    if item_type in NUMPY_TYPES:
        return head + np.asarray(items, NUMPY_TYPES[item_type]).tobytes()
    return None
