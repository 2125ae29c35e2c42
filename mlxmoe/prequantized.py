"""Checkpoints that arrive quantized.

mlx-lm's format (``mlx_lm.convert -q``, what most Mac users download) is read as it is: the
``quantization`` block of config.json, ``<module>.weight`` packed into uint32 beside
``<module>.scales`` and ``<module>.biases``, experts stacked. Each module's bits and group
size follow from its shapes, so per-module overrides need no parsing. Routers (and
Qwen2-MoE's shared-expert gate) are dequantized to floats at load: routing runs on float
weights here, and dequantizing reproduces exactly the values mlx-lm computes with.

gpt-oss publishes its experts in MXFP4 (``quantization_config.quant_method: mxfp4``):
``*_blocks`` hold 4-bit E2M1 values two a byte, ``*_scales`` a power-of-two exponent per 32
values. Those bytes are MLX's ``mxfp4`` mode as they are (``mxfp4_weight``), so the experts
either stay quantized, exactly, or dequantize to exactly the values transformers computes.
mlx-lm's own gpt-oss folders (``mlx_lm.convert`` of that release, as mlx-community publishes
them) keep those experts in MLX's mxfp4 mode: ``quantization.mode`` is ``mxfp4``, and the
layers ``-q`` quantized (affine) are per-module entries beside it.

Other quantized formats (FP8 with ``weight_scale_inv``, GPTQ, AWQ, bitsandbytes...) are
refused with one error naming the format: mlxmoe reads float checkpoints and these two.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from .errors import CheckpointError

COMPONENTS = ("scales", "biases")
MXFP4 = "mxfp4"
MLX_BITS = (2, 3, 4, 5, 6, 8)
# Tensor name suffixes of block-scaled formats we do not read.
FOREIGN_SCALES = ("weight_scale_inv", "weight_scale", "qweight", "qzeros", "weight_format")


@dataclass(frozen=True)
class CheckpointQuantization:
    """config.json's ``quantization`` block: the default bits and group size."""

    bits: int
    group_size: int


def checkpoint_quantization(
    raw: dict, source: str, mxfp4_experts: bool = False
) -> CheckpointQuantization | None:
    """The checkpoint's MLX quantization, None for a float checkpoint; an error for any
    other quantized format. ``mxfp4_experts``: the family reads MXFP4 experts (gpt-oss),
    so mlx-lm's mxfp4 default mode is its experts' (``mxfp4_beside_experts``)."""
    hf = raw.get("quantization_config")
    if isinstance(hf, dict) and hf.get("quant_method") and hf["quant_method"] != MXFP4:
        raise CheckpointError(
            f"{source}: quantization_config.quant_method is {hf['quant_method']!r}; mlxmoe reads "
            "float checkpoints (F32, F16, BF16), MLX's affine quantization (mlx-lm's format) and "
            "gpt-oss's MXFP4 experts: use the model's float release"
        )
    block = raw.get("quantization")
    if block is None:
        return None
    if not isinstance(block, dict) or "bits" not in block or "group_size" not in block:
        raise CheckpointError(f"{source}: key 'quantization' needs 'bits' and 'group_size'")
    mode = block.get("mode", "affine")
    if mode == MXFP4 and mxfp4_experts:
        return mxfp4_beside_experts(block, source)
    if mode != "affine":
        raise CheckpointError(f"{source}: quantization.mode {mode!r} is not supported (only 'affine')")
    return CheckpointQuantization(int(block["bits"]), int(block["group_size"]))


def mxfp4_beside_experts(block: dict, source: str) -> CheckpointQuantization | None:
    """mlx-lm's gpt-oss: the experts in mxfp4 (the default mode), each other quantized layer
    an entry of its own; their bits and group size are the checkpoint's, None where none is
    quantized. Routers aside: mlx-lm quantizes them to 8 bits, mlxmoe dequantizes them."""
    layers = {
        path: spec for path, spec in block.items() if isinstance(spec, dict) and not path.endswith(".router")
    }
    modes = sorted({spec.get("mode", "affine") for spec in layers.values()} - {"affine"})
    if modes:
        raise CheckpointError(
            f"{source}: quantization puts layers other than the experts in mode {modes[0]!r} "
            f"(mlx_lm.convert --q-mode {modes[0]}); mlxmoe reads gpt-oss's experts in MXFP4 and "
            "the other layers in affine mode (mlx_lm.convert -q)"
        )
    sizes = {(spec.get("bits"), spec.get("group_size")) for spec in layers.values()}
    if len(sizes) > 1 or any(None in size for size in sizes):
        raise CheckpointError(
            f"{source}: quantization gives the layers beside the experts "
            f"(bits, group_size) {sorted(sizes, key=str)}; mlxmoe reads one of them"
        )
    return CheckpointQuantization(*map(int, sizes.pop())) if sizes else None


def mxfp4_checkpoint(raw: dict) -> bool:
    """Whether config.json declares experts in MXFP4: the hub's quantization (gpt-oss as
    published) or mlx-lm's mxfp4 mode (its conversion of that release)."""
    hf, mlx = raw.get("quantization_config"), raw.get("quantization")
    return (isinstance(hf, dict) and hf.get("quant_method") == MXFP4) or (
        isinstance(mlx, dict) and mlx.get("mode") == MXFP4
    )


def dtype_str(array: mx.array) -> str:
    return str(array.dtype).rpartition(".")[2]  # "uint8", not "mlx.core.uint8"


def mxfp4_weight(blocks: mx.array, name: str, file) -> mx.array:
    """MXFP4 blocks [..., out, in / 32, 16] uint8 (two E2M1 codes a byte, the first in the
    low nibble) as MLX's mxfp4 weight [..., out, in / 8] uint32: the same bytes, four at a
    time, in the order MLX unpacks them (little-endian, low bits first)."""
    if blocks.dtype != mx.uint8 or blocks.ndim < 3 or blocks.shape[-1] != 16:
        raise CheckpointError(
            f"{file}: tensor {name!r} ({dtype_str(blocks)}, shape {tuple(blocks.shape)}) is no MXFP4 "
            "blocks tensor: expected uint8 [..., out, in / 32, 16]"
        )
    return blocks.view(mx.uint32).flatten(-2)


def mxfp4_scales(scales: mx.array, name: str, file) -> mx.array:
    """MXFP4 scales [..., out, in / 32]: uint8 exponents e, each group's scale 2^(e - 127)."""
    if scales.dtype != mx.uint8 or scales.ndim < 2:
        raise CheckpointError(
            f"{file}: tensor {name!r} ({dtype_str(scales)}, shape {tuple(scales.shape)}) is no MXFP4 "
            "scales tensor: expected uint8 [..., out, in / 32]"
        )
    return scales


def refuse_foreign_tensor(name: str, file) -> None:
    if name.endswith(FOREIGN_SCALES):
        raise CheckpointError(
            f"{file}: tensor {name!r} belongs to a block-scaled quantized format (FP8, GPTQ, AWQ); "
            "mlxmoe reads float checkpoints and MLX's affine quantization: use the float release"
        )


def component(name: str) -> tuple[str, str]:
    """``x.scales`` -> (``x.weight``, "scales"); any other name -> (name, "weight")."""
    stem, _, last = name.rpartition(".")
    return (f"{stem}.weight", last) if last in COMPONENTS else (name, "weight")


def quantized_shape(
    ours: str, packed: tuple[int, ...], scales: tuple[int, ...], want: tuple[int, ...], where: str
) -> tuple[int, int]:
    """(bits, group size) of a quantized weight whose float shape is ``want``."""
    inputs = want[-1]
    bits, group = packed[-1] * 32 // inputs, inputs // max(scales[-1], 1)
    if (
        packed[:-1] != want[:-1]
        or scales[:-1] != want[:-1]
        or bits not in MLX_BITS
        or packed[-1] * 32 != bits * inputs
        or group * scales[-1] != inputs
    ):
        raise CheckpointError(
            f"{where}: quantized tensor {ours!r} has shape {packed} (scales {scales}), which "
            f"quantizes no {want} weight"
        )
    return bits, group


def dequantized(
    parts: dict[str, mx.array], bits: int, group: int, mode: str = "affine", dtype: mx.Dtype = mx.float32
) -> mx.array:
    if mode == MXFP4:
        # float32 and bfloat16 hold every MXFP4 value exactly (a 2-bit significand, their
        # exponent range); float16 does not, so it is reached through float32
        exact = dtype if dtype in (mx.float32, mx.bfloat16) else mx.float32
        return mx.dequantize(parts["weight"], parts["scales"], None, group, bits, mode=mode, dtype=exact)
    return mx.dequantize(parts["weight"], parts["scales"], parts["biases"], group, bits)
