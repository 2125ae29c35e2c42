"""Building blocks shared by the model families."""

from .attention import Attention
from .mlp import GatedMLP
from .moe import ExpertLinear, QuantizedExpertLinear, Router, SparseMoE, SwitchExperts

__all__ = [
    "Attention",
    "ExpertLinear",
    "GatedMLP",
    "QuantizedExpertLinear",
    "Router",
    "SparseMoE",
    "SwitchExperts",
]
