"""Affine 4/8-bit quantization of the base model (the "Q" in QLoRA)."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.nn as nn

from .errors import MlxMoeError
from .tensor_names import UNQUANTIZED_ROLES, role_of_path

SUPPORTED_BITS = (4, 8)
# bits 0: the frozen base keeps float weights (train.quantize: 0, --quantize none)
NO_QUANTIZATION = 0
SUPPORTED_GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class Quantization:
    bits: int
    group_size: int


def should_quantize(path: str, module: nn.Module, group_size: int) -> bool:
    """Attention, experts, shared experts, embeddings and the head; never routers or norms."""
    if not hasattr(module, "to_quantized"):
        return False
    found = role_of_path(f"{path}.weight")
    if found is not None and found[0] in UNQUANTIZED_ROLES:
        return False
    return module.weight.shape[-1] % group_size == 0


def quantize_model(model: nn.Module, bits: int, group_size: int = 64) -> nn.Module:
    if bits not in SUPPORTED_BITS:
        raise MlxMoeError(f"quantize: {bits} bits is not supported (use one of {SUPPORTED_BITS})")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise MlxMoeError(
            f"quantize: group size {group_size} is not supported (use one of {SUPPORTED_GROUP_SIZES})"
        )
    nn.quantize(
        model,
        group_size=group_size,
        bits=bits,
        class_predicate=lambda path, module: should_quantize(path, module, group_size),
    )
    return model
