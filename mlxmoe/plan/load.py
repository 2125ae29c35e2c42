"""Peak memory of loading a checkpoint for training, predicted from config.json alone.

``load.materialize`` evaluates the model a part at a time: the embeddings, each layer, then the
rest. While a part is evaluated, all of its checkpoint tensors are alive at once, with the
stacked copies of its experts (or the split halves of fused ones), the copies cast to the
model's dtype and its quantized arrays (measured on MLX 0.32: tests/test_plan_load.py holds the
prediction to the measured peak). The load peaks at the parts already loaded plus the part in
flight whose sum is the largest: on a quantized load, the last layers or the output head.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from math import prod
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from ..checkpoint import stays_float32
from ..config import ConfigView
from ..dtypes import dtype_name
from ..families import family_for
from ..info import MXFP4_ROLES, lazy_model, quantize_as_loaded
from ..load import load_order
from ..quantize import quantization
from ..tensor_names import role_of_path
from .training import LineItem

# The bytes of a weight as checkpoints store it (config.json's ``torch_dtype``)
STORED_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
MXFP4_BYTES = 4.25 / 8  # 4-bit values and one 8-bit scale per 32


@dataclass(frozen=True)
class LoadPlan:
    items: tuple[LineItem, ...]
    part: str  # the module in flight at the peak

    @property
    def peak(self) -> int:
        return sum(item.bytes for item in self.items)


def stored_dtype(cfg: ConfigView) -> str | None:
    """The checkpoint's float dtype as config.json declares it (a multimodal checkpoint may
    say it in its ``text_config``), or None."""
    text = cfg.raw.get("text_config") if isinstance(cfg.raw.get("text_config"), dict) else {}
    for raw in (cfg.raw, text):
        name = raw.get("torch_dtype") or raw.get("dtype")
        if name in STORED_BYTES:
            return name
    return None


def plan_load(cfg: ConfigView, scheme: Any, group_size: int, dtype: mx.Dtype) -> LoadPlan:
    """Peak of ``load_model(cfg's folder, quantize=scheme, group_size, dtype)``."""
    q = quantization(scheme, group_size)
    declared = stored_dtype(cfg)
    stored = STORED_BYTES[declared or "float32"]  # undeclared: the largest a checkpoint stores
    prequantized = isinstance(cfg.raw.get("quantization"), dict)  # mlx-lm's format: as stored
    floats = lazy_model(cfg)
    family = family_for(cfg.raw.get("model_type"), cfg.source)
    sharing = Counter(family.stored_in.values())  # checkpoint tensor -> how many of ours it holds
    sharing = {role: sharing[stored] for role, stored in family.stored_in.items()}
    mxfp4 = getattr(floats, "mxfp4", False)
    final = lazy_model(cfg)
    quantize_as_loaded(final, q)
    quantized = {path: module for path, module in final.named_modules() if "scales" in module}

    def float_bytes(path: str, shape) -> int:
        return prod(shape) * (4 if stays_float32(path) else dtype.size)

    def final_bytes(path: str, v: mx.array) -> int:
        if v.dtype in (mx.uint32, mx.uint8):  # packed weights, MXFP4 scales
            return v.nbytes
        return float_bytes(path, v.shape)  # floats, affine scales and biases follow the dtype

    def quantized_bytes(module: str) -> int:
        q = quantized[module]
        return sum(final_bytes(f"{module}.{k}", q[k]) for k in ("weight", "scales", "biases") if k in q)

    loaded: dict[str, int] = {}  # part -> bytes it holds once loaded
    for path, v in tree_flatten(final.parameters()):
        module = path.rsplit(".", 1)[0]
        loaded[module] = loaded.get(module, 0) + final_bytes(path, v)
    in_flight: dict[str, int] = {}  # part -> bytes alive while it is evaluated
    for path, v in tree_flatten(floats.parameters()):
        module = path.rsplit(".", 1)[0]
        role = role_of_path(path)
        n = prod(v.shape)
        q = quantized_bytes(module) if path.endswith(".weight") and module in quantized else 0
        if mxfp4 and role is not None and role[0] in MXFP4_ROLES:
            if q:  # kept as published
                size = int(n * MXFP4_BYTES) + q
            else:  # dequantized from a contiguous copy of its cut of the stored tensor
                size = int((sharing.get(role[0], 1) + 1) * n * MXFP4_BYTES) + float_bytes(path, v.shape)
        elif prequantized and q:
            size = q  # read as stored, never requantized
        else:
            cast = float_bytes(path, v.shape) if (4 if stays_float32(path) else dtype.size) != stored else 0
            if role is not None and role[0] in sharing:
                # cut from a checkpoint tensor that may hold several of ours, alive until the
                # last of them is evaluated; the cut is copied by the cast, or made contiguous
                size = sharing[role[0]] * n * stored + (cast or n * stored) + q
            else:  # a layer's experts are read one tensor each, then stacked
                expert = role is not None and "_exps" in role[0]
                size = n * stored * (2 if expert else 1) + cast + q
        in_flight[module] = in_flight.get(module, 0) + size
    best, done = ("", 0, 0), 0
    for part, _ in load_order(final):
        if done + in_flight.get(part, 0) > best[1] + best[2]:
            best = (part, done, in_flight.get(part, 0))
        done += loaded.get(part, 0)
    part, before, flight = best
    how = str(q)
    source = (
        "mlx-lm's quantized layers as stored"
        if prequantized
        else f"{declared} checkpoint"
        if declared
        else "config.json names no dtype: float32 assumed"
    )
    items = [
        LineItem("modules loaded before it", before, f"{how}, {dtype_name(dtype)}"),
        LineItem(f"{part} in flight", flight, f"{source}: read, experts stacked, cast and quantized at once"),
    ]
    return LoadPlan(tuple(items), part)
