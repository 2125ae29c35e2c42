"""Gemma-4's MoE decoder (transformers' Gemma4TextModel with ``enable_moe_block``).

Each layer: attention between an input norm and a post-attention norm; then a dense GELU MLP
and a mixture of GELU experts side by side, both fed by the residual stream, each with its
own norms, summed, normed once more and added back; the layer's output times a learned
scalar. The router reads the residual stream through a scale-free RMSNorm times a learned
per-channel scale and hidden_size ** -0.5; its top-k softmax weights, renormalized, are
multiplied by a learned scale per expert.

Attention differs between the two layer types: sliding-window layers have heads of
``head_dim`` and ``num_kv_heads`` key-value heads; full layers ``global_head_dim`` and
``num_global_kv_heads``, and with ``attention_k_eq_v`` no v_proj (the values are k_proj's
output before k_norm and RoPE). q and k are RMS-normed per head, v by a scale-free RMSNorm;
the scores are not scaled (scaling 1.0). RoPE is "proportional" on full layers: the first
``partial_rotary_factor`` of each half of a head rotates, at frequencies spaced over the
whole head, and the rest does not (transformers' _compute_proportional_rope_parameters).

Every RMSNorm computes in float32, as Gemma4RMSNorm does (``norm.OffsetRMSNorm`` with
offset 0); the embeddings are scaled by sqrt(hidden_size) in the model's dtype (the
``embedding_multiplier``) and the logits soft-capped: cap * tanh(logits / cap).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..config import MoEArgs
from ..model import CausalLM
from .attention import sliding_window_mask
from .mlp import GatedMLP
from .moe import DENSE_MIN_PAIRS, SORT_THRESHOLD, Router, SparseMoE, SwitchExperts
from .norm import OffsetRMSNorm

FULL = "full_attention"
SLIDING = "sliding_attention"


@dataclass
class Gemma4Args(MoEArgs):
    """``head_dim``, ``num_kv_heads``, ``rope_theta`` are the sliding layers'; the full
    layers' are the ``global_`` / ``full_`` fields. ``intermediate_size`` is the dense MLP's,
    ``moe_intermediate_size`` each expert's."""

    global_head_dim: int = 0
    num_global_kv_heads: int = 0
    attention_k_eq_v: bool = False  # full layers: no v_proj, values from k_proj
    full_rope_theta: float = 1_000_000.0
    full_partial_rotary_factor: float = 1.0  # proportional RoPE's rotated share of a head
    full_rope_factor: float = 1.0  # proportional RoPE's frequencies divided by it
    final_logit_softcapping: float | None = None

    def is_full(self, layer: int) -> bool:
        return self.layer_types[layer] == FULL

    def layer_head_dim(self, layer: int) -> int:
        return self.global_head_dim if self.is_full(layer) else self.head_dim

    def layer_kv_heads(self, layer: int) -> int:
        return self.num_global_kv_heads if self.is_full(layer) else self.num_kv_heads

    def has_v_proj(self, layer: int) -> bool:
        return not (self.attention_k_eq_v and self.is_full(layer))


def gemma_norm(dims: int, args: Gemma4Args) -> OffsetRMSNorm:
    return OffsetRMSNorm(dims, args.rms_norm_eps, offset=0.0)


def scale_free_norm(x: mx.array, eps: float) -> mx.array:
    """Gemma4RMSNorm(with_scale=False): x / rms(x), in float32, back in x's dtype."""
    return mx.fast.rms_norm(x.astype(mx.float32), None, eps).astype(x.dtype)


class ProportionalRoPE(nn.Module):
    """Rotate-half RoPE over the whole head: pair i (of dims / 2) turns at
    theta ** (-2i / dims) / factor for i < fraction * dims / 2, and not at all beyond
    (a zero frequency: an infinite period for mx.fast.rope). fraction 1 and factor 1 is
    the default RoPE."""

    def __init__(self, dims: int, theta: float, fraction: float = 1.0, factor: float = 1.0):
        super().__init__()
        rotated = int(fraction * dims // 2)
        inv_freq = np.zeros(dims // 2, dtype=np.float64)
        inv_freq[:rotated] = 1.0 / theta ** (np.arange(0, 2 * rotated, 2, dtype=np.float64) / dims)
        inv_freq /= factor
        with np.errstate(divide="ignore"):
            self._periods = mx.array(1.0 / inv_freq, dtype=mx.float32)
        self.dims = dims

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        return mx.fast.rope(
            x, self.dims, traditional=False, base=None, scale=1.0, offset=offset, freqs=self._periods
        )


class Gemma4Attention(nn.Module):
    def __init__(self, args: Gemma4Args, layer: int):
        super().__init__()
        d, hd = args.hidden_size, args.layer_head_dim(layer)
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.layer_kv_heads(layer), hd
        self.q_proj = nn.Linear(d, self.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, self.num_kv_heads * hd, bias=False)
        if args.has_v_proj(layer):
            self.v_proj = nn.Linear(d, self.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.num_heads * hd, d, bias=False)
        self.q_norm = gemma_norm(hd, args)
        self.k_norm = gemma_norm(hd, args)
        self.eps = args.rms_norm_eps
        if args.is_full(layer):
            self.window = None
            self.rope = ProportionalRoPE(
                hd, args.full_rope_theta, args.full_partial_rotary_factor, args.full_rope_factor
            )
        else:
            self.window = args.sliding_window
            self.rope = ProportionalRoPE(hd, args.rope_theta)

    def __call__(self, x: mx.array, mask: mx.array | str | None = "causal", cache=None) -> mx.array:
        batch, length, _ = x.shape
        heads = (batch, length, -1, self.head_dim)
        q = self.q_norm(self.q_proj(x).reshape(heads))
        k = self.k_proj(x).reshape(heads)
        v = self.v_proj(x).reshape(heads) if "v_proj" in self else k
        k = self.k_norm(k)
        v = scale_free_norm(v, self.eps).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q = self.rope(q.transpose(0, 2, 1, 3), offset=offset)
        k = self.rope(k.transpose(0, 2, 1, 3), offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        if self.window is not None and k.shape[2] > self.window:
            window = sliding_window_mask(length, k.shape[2], self.window)
            mask = window if mask is None or isinstance(mask, str) else mask & window
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, -1))


class GeluMLP(GatedMLP):
    """down(gelu_tanh(gate(x)) * up(x)): Gemma's dense feed-forward."""

    def activation(self, gate: mx.array) -> mx.array:
        return nn.gelu_approx(gate)


class GeluExperts(SwitchExperts):
    """SwitchExperts with gelu_pytorch_tanh (mx.nn.gelu_approx is the same tanh formula)."""

    def activation(self, gate: mx.array, up: mx.array) -> mx.array:
        return nn.gelu_approx(gate) * up


class Gemma4MoE(SparseMoE):
    """Gemma-4's experts on ``experts_norm(x)``, routed from x itself (the residual stream).
    ``router`` is a plain top-k softmax Router over the normed and scaled x, so its logits are
    transformers' ``router.proj`` output and a router LoRA adapts that projection. The
    dispatches are SparseMoE's (nn.moe), on the normed x."""

    def __init__(self, args: Gemma4Args):
        nn.Module.__init__(self)
        d, experts = args.hidden_size, args.num_experts
        self.router = Router(d, experts, args.num_experts_per_tok, normalize_top_k=True)
        self.router_scale = mx.ones((d,), dtype=mx.float32)
        self.per_expert_scale = mx.ones((experts,), dtype=mx.float32)
        self.experts = GeluExperts(d, args.moe_intermediate_size, experts)
        self.experts_norm = gemma_norm(d, args)
        self.root_size = d**-0.5
        self.eps = args.rms_norm_eps
        self.dispatch = "gather"

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array]:
        scale = self.router_scale.astype(mx.float32) * self.root_size
        logits, indices, weights = self.router(scale_free_norm(x.astype(mx.float32), self.eps) * scale)
        weights = weights * self.per_expert_scale.astype(mx.float32)[indices]
        h = self.experts_norm(x)
        if self.dispatch == "dense" and indices.size >= DENSE_MIN_PAIRS:
            chosen = indices[..., None] == mx.arange(logits.shape[-1])
            dense_weights = (weights[..., None] * chosen).sum(axis=-2)
            y = self.experts.all_experts(h)
            y = (y * mx.moveaxis(dense_weights, -1, 0)[..., None].astype(y.dtype)).sum(axis=0)
        elif self.dispatch == "grouped" and indices.size >= SORT_THRESHOLD:
            y = self.experts.grouped(h, indices, logits.shape[-1])
            y = (y * weights[..., None].astype(y.dtype)).sum(axis=-2)
        else:
            y = self.experts(h, indices)
            y = (y * weights[..., None].astype(y.dtype)).sum(axis=-2)
        return y, logits


class Gemma4DecoderLayer(nn.Module):
    """Module names follow tensor_names.ROLES: ``post_attn_norm`` is Gemma's
    pre_feedforward_layernorm (llama.cpp's ffn_norm)."""

    def __init__(self, args: Gemma4Args, layer: int):
        super().__init__()
        d = args.hidden_size
        self.input_norm = gemma_norm(d, args)
        self.attn = Gemma4Attention(args, layer)
        self.attn_post_norm = gemma_norm(d, args)
        self.post_attn_norm = gemma_norm(d, args)
        self.mlp = GeluMLP(d, args.intermediate_size)
        self.mlp_post_norm = gemma_norm(d, args)
        self.moe = Gemma4MoE(args)
        self.moe_post_norm = gemma_norm(d, args)
        self.ffn_post_norm = gemma_norm(d, args)
        self.layer_scalar = mx.ones((1,))

    @property
    def is_moe(self) -> bool:
        return True

    def __call__(
        self, x: mx.array, mask: mx.array | str | None = "causal", cache=None
    ) -> tuple[mx.array, mx.array]:
        h = x + self.attn_post_norm(self.attn(self.input_norm(x), mask, cache))
        dense = self.mlp_post_norm(self.mlp(self.post_attn_norm(h)))
        routed, router_logits = self.moe(h)
        out = h + self.ffn_post_norm(dense + self.moe_post_norm(routed))
        return out * self.layer_scalar.astype(out.dtype), router_logits


class Gemma4CausalLM(CausalLM):
    """CausalLM's embeddings (times ``embedding_multiplier``, sqrt(hidden_size)) and tied
    head, Gemma's float32 final norm, and the logits soft-capped."""

    def __init__(self, args: Gemma4Args, family: str):
        super().__init__(args, [Gemma4DecoderLayer(args, i) for i in range(args.num_layers)], family)
        self.norm = gemma_norm(args.hidden_size, args)

    def project(self, h: mx.array) -> mx.array:
        logits = super().project(h)
        cap = self.args.final_logit_softcapping
        return logits if cap is None else mx.tanh(logits / cap) * cap
