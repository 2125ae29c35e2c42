"""Grouped-query attention with rotary embeddings (Hugging Face's rotate-half layout)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..config import DecoderArgs


def make_rope(args: DecoderArgs) -> nn.Module:
    """Plain (or linearly scaled) rotary embeddings ourselves; other scalings (llama3, yarn,
    longrope) from mlx-lm, imported only then: importing mlx-lm loads transformers (and
    torch where it is installed), hundreds of MB that export and training otherwise skip."""
    scaling = args.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in ("default", "linear"):
        scale = 1.0 / float(scaling.get("factor", 1.0)) if kind == "linear" else 1.0
        return nn.RoPE(args.head_dim, traditional=False, base=args.rope_theta, scale=scale)
    from mlx_lm.models.rope_utils import initialize_rope

    return initialize_rope(args.head_dim, args.rope_theta, False, args.rope_scaling,
                           args.max_position_embeddings)


class Attention(nn.Module):
    def __init__(self, args: DecoderArgs):
        super().__init__()
        self.num_heads = args.num_heads
        self.num_kv_heads = args.num_kv_heads
        self.head_dim = args.head_dim
        self.scale = args.head_dim**-0.5
        d, hd = args.hidden_size, args.head_dim
        self.q_proj = nn.Linear(d, args.num_heads * hd, bias=args.qkv_bias)
        self.k_proj = nn.Linear(d, args.num_kv_heads * hd, bias=args.qkv_bias)
        self.v_proj = nn.Linear(d, args.num_kv_heads * hd, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.num_heads * hd, d, bias=False)
        self.qk_norm, self.clip_qkv = args.qk_norm, args.clip_qkv
        if args.qk_norm == "head":
            self.q_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)
            self.k_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)
        elif args.qk_norm == "full":
            self.q_norm = nn.RMSNorm(args.num_heads * hd, eps=args.rms_norm_eps)
            self.k_norm = nn.RMSNorm(args.num_kv_heads * hd, eps=args.rms_norm_eps)
        self.rope = make_rope(args)

    def __call__(self, x: mx.array, mask: mx.array | str | None = "causal", cache=None) -> mx.array:
        """``cache``: an mlx-lm KV cache (generation); keys and values are appended to it."""
        batch, length, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (mx.clip(t, -self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.reshape(batch, length, self.num_heads, self.head_dim)
        k = k.reshape(batch, length, self.num_kv_heads, self.head_dim)
        v = v.reshape(batch, length, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        offset = cache.offset if cache is not None else 0
        q = self.rope(q.transpose(0, 2, 1, 3), offset=offset)
        k = self.rope(k.transpose(0, 2, 1, 3), offset=offset)
        v = v.transpose(0, 2, 1, 3)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, -1))
