"""Multi-head latent attention (DeepSeek-V2): keys and values rebuilt per head from one
compressed latent per token, and a rotary part of every query and key kept apart.

Per token: ``kv_a_proj_with_mqa`` yields the latent (``kv_lora_rank`` wide, RMS-normed by
``kv_a_norm``) and one rotary key shared by every head (``qk_rope_head_dim``); ``kv_b_proj``
expands the latent into each head's non-rotary key (``qk_nope_head_dim``) and value
(``v_head_dim``). Queries come from ``q_proj``, or through a low-rank bottleneck
(``q_a_proj`` -> ``q_a_norm`` -> ``q_b_proj``) where ``q_lora_rank`` is set; each head's
query is its non-rotary part, then its rotary part. RoPE rotates adjacent pairs (DeepSeek's
layout), with YaRN frequencies where the config scales it, and YaRN's ``mscale_all_dim``
enters the softmax scale squared (transformers' ``yarn_apply_mscale``).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..config import ConfigView, DecoderArgs
from .attention import make_rope
from .rope import yarn_mscale

# transformers' DeepseekV2RMSNorm default: the latent norms are built without the config's eps
LATENT_NORM_EPS = 1e-6


@dataclass(frozen=True)
class MLAArgs:
    q_lora_rank: int | None  # None: queries straight from q_proj (DeepSeek-V2-Lite)
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @classmethod
    def from_config(cls, cfg: ConfigView) -> MLAArgs:
        q_lora_rank = cfg.get("q_lora_rank", default=None)
        return cls(
            None if q_lora_rank is None else int(q_lora_rank),
            int(cfg.get("kv_lora_rank")),
            int(cfg.get("qk_nope_head_dim")),
            int(cfg.get("qk_rope_head_dim")),
            int(cfg.get("v_head_dim")),
        )


def softmax_scale(args: DecoderArgs) -> float:
    """1 / sqrt(query head width), times YaRN's mscale(factor, mscale_all_dim) squared."""
    scale = args.mla.qk_head_dim**-0.5
    scaling = args.rope_scaling or {}
    if scaling.get("mscale_all_dim"):
        scale *= yarn_mscale(float(scaling["factor"]), float(scaling["mscale_all_dim"])) ** 2
    return scale


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, args: DecoderArgs):
        super().__init__()
        m = args.mla
        self.num_heads, self.m = args.num_heads, m
        d, heads = args.hidden_size, args.num_heads
        if m.q_lora_rank is None:
            self.q_proj = nn.Linear(d, heads * m.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, m.q_lora_rank, bias=False)
            self.q_a_norm = nn.RMSNorm(m.q_lora_rank, eps=LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(m.q_lora_rank, heads * m.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, m.kv_lora_rank + m.qk_rope_head_dim, bias=False)
        self.kv_a_norm = nn.RMSNorm(m.kv_lora_rank, eps=LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(m.kv_lora_rank, heads * (m.qk_nope_head_dim + m.v_head_dim), bias=False)
        self.o_proj = nn.Linear(heads * m.v_head_dim, d, bias=False)
        self.scale = softmax_scale(args)
        self.rope = make_rope(args, m.qk_rope_head_dim, traditional=True)

    def queries(self, x: mx.array) -> mx.array:
        if "q_proj" in self:
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))

    def __call__(self, x: mx.array, mask: mx.array | str | None = "causal", cache=None) -> mx.array:
        """``cache``: an mlx-lm KV cache; it holds the expanded keys and values (the latent
        is not what it caches: simple, and generation is not what training needs fast)."""
        batch, length, _ = x.shape
        m, heads = self.m, self.num_heads
        q = self.queries(x).reshape(batch, length, heads, m.qk_head_dim).transpose(0, 2, 1, 3)
        q_nope, q_rot = mx.split(q, [m.qk_nope_head_dim], axis=-1)
        latent, k_rot = mx.split(self.kv_a_proj_with_mqa(x), [m.kv_lora_rank], axis=-1)
        kv = self.kv_b_proj(self.kv_a_norm(latent))
        kv = kv.reshape(batch, length, heads, m.qk_nope_head_dim + m.v_head_dim).transpose(0, 2, 1, 3)
        k_nope, v = mx.split(kv, [m.qk_nope_head_dim], axis=-1)
        offset = cache.offset if cache is not None else 0
        q_rot = self.rope(q_rot, offset=offset)
        k_rot = self.rope(
            k_rot.reshape(batch, length, 1, m.qk_rope_head_dim).transpose(0, 2, 1, 3), offset=offset
        )
        k_rot = mx.broadcast_to(k_rot, (batch, heads, length, m.qk_rope_head_dim))
        q = mx.concatenate([q_nope, q_rot], axis=-1)
        k = mx.concatenate([k_nope, k_rot], axis=-1)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, -1))
