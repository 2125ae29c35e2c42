"""Grouped-query attention with rotary embeddings (Hugging Face's rotate-half layout), and
gpt-oss's options: attention sinks, a sliding window on some layers, a bias on the output;
Qwen3-Next's: a sigmoid gate on each head's output, RoPE on part of each head."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..config import DecoderArgs
from .norm import rms_norm
from .rope import YarnRoPE


def make_rope(args: DecoderArgs, dims: int | None = None, traditional: bool = False) -> nn.Module:
    """Plain, linearly scaled and YaRN rotary embeddings ourselves (YaRN as transformers
    computes it: see ``rope.py``); other scalings (llama3, longrope) from mlx-lm, imported
    only then: importing mlx-lm loads transformers (and torch where it is installed),
    hundreds of MB that export and training otherwise skip. ``dims``: the rotated width
    (default ``args.rotary_dims``); ``traditional``: pairs of adjacent dimensions rotate
    (DeepSeek's MLA), not the two halves."""
    dims = args.rotary_dims if dims is None else dims
    scaling = args.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in ("default", "linear"):
        scale = 1.0 / float(scaling.get("factor", 1.0)) if kind == "linear" else 1.0
        return nn.RoPE(dims, traditional=traditional, base=args.rope_theta, scale=scale)
    if kind == "yarn":
        return YarnRoPE(dims, args.rope_theta, scaling, args.max_position_embeddings, traditional)
    from mlx_lm.models.rope_utils import initialize_rope

    return initialize_rope(
        dims, args.rope_theta, traditional, args.rope_scaling, args.max_position_embeddings
    )


def sliding_window_mask(queries: int, keys: int, window: int) -> mx.array:
    """[queries, keys] bool: key j is seen by query i iff i - window < j <= i (transformers'
    sliding window: the query and the window - 1 positions before it). The queries are the
    last of the keys' positions, as with a KV cache that keeps every key."""
    q = mx.arange(keys - queries, keys)[:, None]
    k = mx.arange(keys)[None]
    return (k <= q) & (k > q - window)


class Attention(nn.Module):
    """``window``: attend to that many positions only (a sliding-window layer), None: all.

    With ``args.attn_sinks`` each head has a learned logit ``sinks[h]`` that joins every
    softmax over the keys and takes its share of the probability mass, attending to
    nothing (gpt-oss; MLX's fused attention takes it as ``sinks``).

    With ``args.attn_output_gate`` q_proj yields twice the queries' width: per head, the
    query and then a gate, and each head's output is multiplied by sigmoid(gate) before
    o_proj (Qwen3-Next's and Qwen3.5's full-attention layers)."""

    def __init__(self, args: DecoderArgs, window: int | None = None):
        super().__init__()
        self.num_heads = args.num_heads
        self.num_kv_heads = args.num_kv_heads
        self.head_dim = args.head_dim
        # Granite scales the scores by a multiplier of its own, not 1 / sqrt(head_dim)
        self.scale = args.head_dim**-0.5 if args.attention_multiplier is None else args.attention_multiplier
        d, hd = args.hidden_size, args.head_dim
        self.output_gate = args.attn_output_gate
        self.q_proj = nn.Linear(d, args.num_heads * hd * (2 if self.output_gate else 1), bias=args.qkv_bias)
        self.k_proj = nn.Linear(d, args.num_kv_heads * hd, bias=args.qkv_bias)
        self.v_proj = nn.Linear(d, args.num_kv_heads * hd, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.num_heads * hd, d, bias=args.o_bias)
        if args.attn_sinks:
            self.sinks = mx.zeros((args.num_heads,))
        self.window = window
        self.qk_norm, self.clip_qkv = args.qk_norm, args.clip_qkv
        if args.qk_norm == "head":
            self.q_norm = rms_norm(hd, args)
            self.k_norm = rms_norm(hd, args)
        elif args.qk_norm == "full":
            self.q_norm = nn.RMSNorm(args.num_heads * hd, eps=args.rms_norm_eps)
            self.k_norm = nn.RMSNorm(args.num_kv_heads * hd, eps=args.rms_norm_eps)
        self.rope = make_rope(args)

    def __call__(self, x: mx.array, mask: mx.array | str | None = "causal", cache=None) -> mx.array:
        """``cache``: an mlx-lm KV cache (generation); keys and values are appended to it."""
        batch, length, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.output_gate:
            q, gate = mx.split(q.reshape(batch, length, self.num_heads, 2 * self.head_dim), 2, axis=-1)
            q = q.reshape(batch, length, -1)
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
        if self.window is not None and k.shape[2] > self.window:
            window = sliding_window_mask(length, k.shape[2], self.window)
            mask = window if mask is None or isinstance(mask, str) else mask & window
        sinks = self.sinks.astype(q.dtype) if "sinks" in self else None
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask, sinks=sinks)
        out = out.transpose(0, 2, 1, 3)
        if self.output_gate:
            out = out * mx.sigmoid(gate)
        return self.o_proj(out.reshape(batch, length, -1))
