"""Affine quantization of the base model (the "Q" in QLoRA): bits for the whole base, and
optionally other bits for a group of roles (experts at 3 bits, attention at 4, ...).

A scheme is written as bits (``4``; ``0`` or ``none``: float weights), as a mapping
(``{bits: 4, experts: 3}``, the recipe's form) or as text (``4,experts=3``, the command
line's); ``quantization`` reads all three, and ``Quantization.written`` gives the shortest.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import mlx.nn as nn

from .errors import MlxMoeError
from .tensor_names import QUANTIZATION_GROUPS, UNQUANTIZED_ROLES, role_of_path

# MLX's affine mode (mx.quantize); 0 keeps float weights (train.quantize: 0, --quantize none)
SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
NO_QUANTIZATION = 0
SUPPORTED_GROUP_SIZES = (32, 64, 128)
GROUPS = tuple(QUANTIZATION_GROUPS)  # experts, shared_experts, attention, embeddings
_GROUP_OF_ROLE = {role: group for group, roles in QUANTIZATION_GROUPS.items() for role in roles}


@dataclass(frozen=True)
class Quantization:
    """The frozen base's quantization: ``bits`` for every quantized layer whose group (see
    ``tensor_names.QUANTIZATION_GROUPS``) sets none of its own; routers and norms never."""

    bits: int
    group_size: int = 64
    experts: int | None = None  # the routed experts
    shared_experts: int | None = None
    attention: int | None = None  # softmax, latent (MLA) and linear attention projections
    embeddings: int | None = None  # the token embeddings and the output head

    def bits_for(self, role: str | None) -> int:
        group = _GROUP_OF_ROLE.get(role)
        own = getattr(self, group) if group else None
        return self.bits if own is None else own

    @property
    def overrides(self) -> dict[str, int]:
        return {g: getattr(self, g) for g in GROUPS if getattr(self, g) is not None}

    def __bool__(self) -> bool:
        """Whether any layer is quantized."""
        return any((self.bits, *self.overrides.values()))

    def written(self) -> int | dict[str, int]:
        """As a recipe writes it (without the group size, ``train.group_size``)."""
        return {"bits": self.bits, **self.overrides} if self.overrides else self.bits

    def to_dict(self) -> dict[str, int]:
        """As adapter_config.json records it."""
        return {"bits": self.bits, "group_size": self.group_size, **self.overrides}

    def per_role(self) -> str:
        """ "4-bit", "4-bit, experts 3-bit", "float, experts 4-bit"."""
        groups = [f"{g.replace('_', ' ')} {_bits_text(b)}" for g, b in self.overrides.items()]
        return ", ".join([_bits_text(self.bits), *groups])

    def __str__(self) -> str:
        return f"{self.per_role()}, group {self.group_size}" if self else "not quantized"


def _bits_text(bits: int) -> str:
    return f"{bits}-bit" if bits else "float"


def quantization(
    value: Any, group_size: int = 64, where: str = "quantize", error=MlxMoeError
) -> Quantization:
    """A scheme as written (bits, ``none``, a mapping, ``4,experts=3``, or a ``Quantization``,
    which keeps its own group size) -> ``Quantization``; ``error`` names ``where`` and the key."""
    if isinstance(value, Quantization):
        return value
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise error(f"group size {group_size} is not supported (use one of {SUPPORTED_GROUP_SIZES})")
    if value is None:
        return Quantization(NO_QUANTIZATION, group_size)
    if isinstance(value, str):
        value = _from_text(value, where, error)
    if isinstance(value, Mapping):
        unknown = [k for k in value if k not in ("bits", *GROUPS)]
        if unknown:
            raise error(f"{where}: unknown key {unknown[0]!r} (known: bits, {', '.join(GROUPS)})")
        if "bits" not in value:
            raise error(f"{where}: no 'bits' (the bits of every layer no group sets)")
        bits = _bits(value["bits"], f"{where}.bits", error)
        groups = {g: _bits(value[g], f"{where}.{g}", error) for g in GROUPS if g in value}
        return Quantization(bits, group_size, **{g: b for g, b in groups.items() if b != bits})
    return Quantization(_bits(value, where, error), group_size)


def _from_text(text: str, where: str, error) -> dict[str, Any]:
    """``4``, ``none`` or ``4,experts=3,attention=8``."""
    first, *rest = [part.strip() for part in text.split(",")]
    value: dict[str, Any] = {"bits": first}
    for part in rest:
        key, sep, bits = part.partition("=")
        if not sep:
            raise error(f"{where}: {part!r} is not GROUP=BITS (e.g. 4,experts=3)")
        value[key.strip()] = bits.strip()
    return value


def _bits(value: Any, where: str, error) -> int:
    if isinstance(value, str):
        value = value.strip().lower()
        value = NO_QUANTIZATION if value in ("none", "0") else int(value) if value.isdigit() else value
    if isinstance(value, bool) or value not in (NO_QUANTIZATION, *SUPPORTED_BITS):
        choices = ", ".join(map(str, SUPPORTED_BITS))
        raise error(f"{where}: {value!r} bits is not supported (use none or one of {choices})")
    return value


def quantize_spec(path: str, module: nn.Module, q: Quantization) -> dict | bool:
    """``nn.quantize``'s parameters for the module at ``path``, or False to keep it float:
    never routers or norms, nor a layer whose input width the group size does not divide."""
    if not hasattr(module, "to_quantized"):
        return False
    found = role_of_path(f"{path}.weight")
    role = found[0] if found else None
    if role in UNQUANTIZED_ROLES:
        return False
    bits = q.bits_for(role)
    if not bits or module.weight.shape[-1] % q.group_size:
        return False
    return {"bits": bits, "group_size": q.group_size}


def quantize_model(model: nn.Module, scheme: Any, group_size: int = 64) -> nn.Module:
    """Quantize ``model`` in place to ``scheme`` (anything ``quantization`` reads)."""
    q = quantization(scheme, group_size)
    if q:
        nn.quantize(model, class_predicate=lambda path, module: quantize_spec(path, module, q))
    return model
