"""LoRA layers: y = base(x) + (alpha / r) * B A x, with A [r, in] and B [out, r].

B starts at zero, so an adapted model starts as the base model. For stacked experts each
expert has its own A [E, r, in] and B [E, out, r], applied on the same routing (the same
gather kernels, the same sorted dispatch) as the base experts.

Biases (q/k/v/o in Qwen2-MoE and gpt-oss, gpt-oss's expert and router biases) stay frozen,
also under ``router_mode: full`` (which trains the router's weight): the base layer adds its
bias, LoRA adds only B A x, merging changes weights only, and an adapter-only GGUF (pairs of
matrices for llama.cpp) could not carry a trained bias.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from ..nn.grouped import Blocks, block_matmul
from ..nn.moe import ExpertLinear, QuantizedExpertLinear, Router, gather_matmul


def linear_dims(layer: nn.Module) -> tuple[int, int]:
    """(out, in) of a float or quantized linear layer (or stacked experts: the last two dims)."""
    if "scales" in layer:  # any quantized layer: weights packed, one scale per group
        return layer.weight.shape[-2], layer.scales.shape[-1] * layer.group_size
    return layer.weight.shape[-2], layer.weight.shape[-1]


def _init_a(shape: tuple[int, ...], in_dims: int) -> mx.array:
    bound = 1.0 / math.sqrt(in_dims)  # Kaiming-uniform-like, as in the LoRA paper's reference code
    return mx.random.uniform(-bound, bound, shape)


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        out_dims, in_dims = linear_dims(base)
        self.base = base
        self.base.freeze()
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.lora_a = _init_a((rank, in_dims), in_dims)
        self.lora_b = mx.zeros((out_dims, rank))

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        z = (self.dropout(x) @ self.lora_a.T.astype(x.dtype)) @ self.lora_b.T.astype(x.dtype)
        return y + self.scale * z

    def delta(self) -> mx.array:
        """The merged update scale * B A, [out, in]."""
        return self.scale * (self.lora_b @ self.lora_a)


class LoRAExperts(nn.Module):
    """LoRA on stacked experts (``ExpertLinear`` or its quantized form)."""

    def __init__(
        self, base: ExpertLinear | QuantizedExpertLinear, rank: int, alpha: float, dropout: float = 0.0
    ):
        super().__init__()
        out_dims, in_dims = linear_dims(base)
        num_experts = base.weight.shape[0]
        self.base = base
        self.base.freeze()
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.lora_a = _init_a((num_experts, rank, in_dims), in_dims)
        self.lora_b = mx.zeros((num_experts, out_dims, rank))

    def __call__(self, x: mx.array, indices: mx.array | None, sorted_indices: bool = False) -> mx.array:
        # A and B are float32 (AdamW's parameters); the update is computed in x's dtype, so
        # the residual stream keeps the model's dtype (bfloat16 on a Mac).
        y = self.base(x, indices, sorted_indices)
        a, b = self.lora_a.swapaxes(-1, -2), self.lora_b.swapaxes(-1, -2)
        if indices is None:  # the dense dispatch: every expert on every row
            z = (self.dropout(x) @ a.astype(x.dtype)) @ b.astype(x.dtype)
        else:
            h = gather_matmul(self.dropout(x), a, indices, sorted_indices)
            z = gather_matmul(h, b, indices, sorted_indices)
        return y + self.scale * z

    def grouped(self, x: mx.array, blocks: Blocks) -> mx.array:
        """The grouped dispatch (``nn.grouped``): rows in the blocked layout."""
        y = self.base.grouped(x, blocks)
        z = block_matmul(block_matmul(self.dropout(x), self.lora_a, blocks), self.lora_b, blocks)
        return y + self.scale * z

    def delta(self) -> mx.array:
        """Per-expert merged update, [E, out, in]."""
        return self.scale * (self.lora_b @ self.lora_a)


class LoRARouter(Router):
    """A low-rank update of the router, kept in float32 like the router itself."""

    def __init__(self, base: Router, rank: int, alpha: float, dropout: float = 0.0):
        num_experts, hidden = base.weight.shape
        super().__init__(
            hidden,
            num_experts,
            base.top_k,
            base.normalize_top_k,
            "bias" in base,
            base.softmax,
            base.scaling,
            base.groups,
            base.groups_used,
        )
        self.weight = base.weight
        if "bias" in base:
            self.bias = base.bias
        self.temperature, self.jitter = base.temperature, base.jitter
        self.freeze(keys=["weight", "bias"] if "bias" in base else ["weight"])
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.lora_a = _init_a((rank, hidden), hidden).astype(mx.float32)
        self.lora_b = mx.zeros((num_experts, rank), dtype=mx.float32)

    def raw_logits(self, x: mx.array) -> mx.array:
        x = x.astype(mx.float32)
        return super().raw_logits(x) + self.scale * (self.dropout(x) @ self.lora_a.T) @ self.lora_b.T

    def delta(self) -> mx.array:
        return self.scale * (self.lora_b @ self.lora_a)
