"""LoRA adapters for MoE models: where they go (strategies) and what they are (layers)."""

from .lora import LoRAExperts, LoRALinear, LoRARouter
from .strategies import STRATEGIES, AdapterSpec, apply_adapters, trainable_report

__all__ = [
    "STRATEGIES",
    "AdapterSpec",
    "LoRAExperts",
    "LoRALinear",
    "LoRARouter",
    "apply_adapters",
    "trainable_report",
]
