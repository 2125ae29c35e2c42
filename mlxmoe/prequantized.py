"""Checkpoints that arrive quantized.

mlx-lm's format (``mlx_lm.convert -q``, what most Mac users download) is read as it is: the
``quantization`` block of config.json, ``<module>.weight`` packed into uint32 beside
``<module>.scales`` and ``<module>.biases``, experts stacked. Each module's bits and group
size follow from its shapes, so per-module overrides need no parsing. Routers (and
Qwen2-MoE's shared-expert gate) are dequantized to floats at load: routing runs on float
weights here, and dequantizing reproduces exactly the values mlx-lm computes with.

Other quantized formats (FP8 with ``weight_scale_inv``, GPTQ, AWQ, bitsandbytes...) are
refused with one error naming the format: mlxmoe reads float checkpoints and this one.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from .errors import CheckpointError

COMPONENTS = ("scales", "biases")
MLX_BITS = (2, 3, 4, 5, 6, 8)
# Tensor name suffixes of block-scaled formats we do not read.
FOREIGN_SCALES = ("weight_scale_inv", "weight_scale", "qweight", "qzeros", "weight_format")


@dataclass(frozen=True)
class CheckpointQuantization:
    """config.json's ``quantization`` block: the default bits and group size."""

    bits: int
    group_size: int


def checkpoint_quantization(raw: dict, source: str) -> CheckpointQuantization | None:
    """The checkpoint's MLX quantization, None for a float checkpoint; an error for any
    other quantized format."""
    hf = raw.get("quantization_config")
    if isinstance(hf, dict) and hf.get("quant_method"):
        raise CheckpointError(
            f"{source}: quantization_config.quant_method is {hf['quant_method']!r}; mlxmoe reads "
            "float checkpoints (F32, F16, BF16) and MLX's affine quantization (mlx-lm's format): "
            "use the model's float release")
    block = raw.get("quantization")
    if block is None:
        return None
    if not isinstance(block, dict) or "bits" not in block or "group_size" not in block:
        raise CheckpointError(f"{source}: key 'quantization' needs 'bits' and 'group_size'")
    mode = block.get("mode", "affine")
    if mode != "affine":
        raise CheckpointError(f"{source}: quantization.mode {mode!r} is not supported (only 'affine')")
    return CheckpointQuantization(int(block["bits"]), int(block["group_size"]))


def refuse_foreign_tensor(name: str, file) -> None:
    if name.endswith(FOREIGN_SCALES):
        raise CheckpointError(
            f"{file}: tensor {name!r} belongs to a block-scaled quantized format (FP8, GPTQ, AWQ); "
            "mlxmoe reads float checkpoints and MLX's affine quantization: use the float release")


def component(name: str) -> tuple[str, str]:
    """``x.scales`` -> (``x.weight``, "scales"); any other name -> (name, "weight")."""
    stem, _, last = name.rpartition(".")
    return (f"{stem}.weight", last) if last in COMPONENTS else (name, "weight")


def quantized_shape(ours: str, packed: tuple[int, ...], scales: tuple[int, ...],
                    want: tuple[int, ...], where: str) -> tuple[int, int]:
    """(bits, group size) of a quantized weight whose float shape is ``want``."""
    inputs = want[-1]
    bits, group = packed[-1] * 32 // inputs, inputs // max(scales[-1], 1)
    if (packed[:-1] != want[:-1] or scales[:-1] != want[:-1] or bits not in MLX_BITS
            or packed[-1] * 32 != bits * inputs or group * scales[-1] != inputs):
        raise CheckpointError(
            f"{where}: quantized tensor {ours!r} has shape {packed} (scales {scales}), which "
            f"quantizes no {want} weight")
    return bits, group


def dequantized(parts: dict[str, mx.array], bits: int, group: int) -> mx.array:
    return mx.dequantize(parts["weight"], parts["scales"], parts["biases"], group, bits)
