"""The model families mlxmoe knows, keyed by ``config.json``'s ``model_type``."""

from __future__ import annotations

from ..errors import CheckpointError
from .base import Family
from .deepseek_v2 import FAMILY as DEEPSEEK_V2
from .gemma4 import FAMILY as GEMMA4
from .gpt_oss import FAMILY as GPT_OSS
from .granitemoe import FAMILY as GRANITEMOE
from .llama import FAMILY as LLAMA
from .mixtral import FAMILY as MIXTRAL
from .olmoe import FAMILY as OLMOE
from .qwen2_moe import FAMILY as QWEN2_MOE
from .qwen3_5_moe import FAMILY as QWEN3_5_MOE
from .qwen3_moe import FAMILY as QWEN3_MOE
from .qwen3_next import FAMILY as QWEN3_NEXT

FAMILIES: dict[str, Family] = {
    model_type: family
    for family in (
        DEEPSEEK_V2,
        GEMMA4,
        GPT_OSS,
        GRANITEMOE,
        LLAMA,
        MIXTRAL,
        OLMOE,
        QWEN2_MOE,
        QWEN3_5_MOE,
        QWEN3_MOE,
        QWEN3_NEXT,
    )
    for model_type in family.model_types
}


def family_for(model_type: str | None, source: str = "config.json") -> Family:
    if model_type not in FAMILIES:
        supported = ", ".join(sorted(FAMILIES))
        raise CheckpointError(
            f"{source}: model_type {model_type!r} is not supported (supported: {supported})"
        )
    return FAMILIES[model_type]


__all__ = ["FAMILIES", "Family", "family_for"]
