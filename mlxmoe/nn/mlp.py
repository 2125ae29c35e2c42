"""The SwiGLU feed-forward block of Llama-style decoders (also the shared expert)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def activation(self, gate: mx.array) -> mx.array:
        return nn.silu(gate)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self.activation(self.gate_proj(x)) * self.up_proj(x))
