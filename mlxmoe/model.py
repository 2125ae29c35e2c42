"""The causal language model every family builds: embeddings, decoder layers, head."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .config import DecoderArgs, MoEArgs
from .nn import Attention, GatedMLP, SparseMoE
from .nn.gated_deltanet import DeltaNetCache, GatedDeltaNet
from .nn.mla import MultiHeadLatentAttention
from .nn.norm import rms_norm


class DecoderLayer(nn.Module):
    """Pre-norm token mixing, then pre-norm feed-forward: dense ``mlp`` or sparse ``moe``.
    The mixer is ``attn`` (softmax attention; multi-head latent attention where ``args.mla``
    is set), or ``linear_attn`` (Gated DeltaNet) where ``args.layer_types`` says
    "linear_attention"."""

    def __init__(
        self, args: DecoderArgs, ffn: GatedMLP | SparseMoE, window: int | None = None, linear: bool = False
    ):
        super().__init__()
        self.input_norm = rms_norm(args.hidden_size, args)
        if linear:
            self.linear_attn = GatedDeltaNet(args.linear_attention)
        elif args.mla is not None:
            self.attn = MultiHeadLatentAttention(args)
        else:
            self.attn = Attention(args, window)
        self.post_attn_norm = rms_norm(args.hidden_size, args)
        self.residual_multiplier = args.residual_multiplier
        if isinstance(ffn, SparseMoE):
            self.moe = ffn
        else:
            self.mlp = ffn

    @property
    def is_moe(self) -> bool:
        return "moe" in self

    def __call__(self, x: mx.array, mask: Any = "causal", cache=None) -> tuple[mx.array, mx.array | None]:
        mixer = self.linear_attn if "linear_attn" in self else self.attn
        h = x + self.scaled(mixer(self.input_norm(x), mask, cache))
        if self.is_moe:
            out, router_logits = self.moe(self.post_attn_norm(h))
            return h + self.scaled(out), router_logits
        return h + self.scaled(self.mlp(self.post_attn_norm(h))), None

    def scaled(self, branch: mx.array) -> mx.array:
        """A block's output as it joins the residual stream (Granite: times residual_multiplier)."""
        r = self.residual_multiplier
        return branch if r == 1.0 else branch * r


class CausalLM(nn.Module):
    def __init__(self, args: DecoderArgs, layers: list[DecoderLayer], family: str):
        super().__init__()
        self.args = args
        self.family = family
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = layers
        self.norm = rms_norm(args.hidden_size, args)
        self.grad_checkpoint = False  # recompute each layer's activations in the backward pass
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    @property
    def moe_layers(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers) if layer.is_moe]

    def hidden_states(self, tokens: mx.array, cache=None) -> tuple[mx.array, list[mx.array]]:
        """Final-norm hidden states [B, L, D] and the router logits of each MoE layer."""
        x = self.embed_tokens(tokens)
        if self.args.embedding_multiplier != 1.0:  # Granite
            x = x * self.args.embedding_multiplier
        router_logits = []
        if cache is not None:
            mask = "causal" if x.shape[1] > 1 else None  # one new token sees the whole cache
            for layer, layer_cache in zip(self.layers, cache):
                x, logits = layer(x, mask, layer_cache)
                if logits is not None:
                    router_logits.append(logits)
            return self.norm(x), router_logits
        for layer in self.layers:
            x, logits = _checkpointed(layer, x) if self.grad_checkpoint else layer(x)
            if logits is not None:
                router_logits.append(logits)
        return self.norm(x), router_logits

    def project(self, h: mx.array) -> mx.array:
        logits = self.lm_head(h) if "lm_head" in self else self.embed_tokens.as_linear(h)
        if self.args.logits_scaling != 1.0:  # Granite divides its logits
            logits = logits / self.args.logits_scaling
        return logits

    def __call__(self, tokens: mx.array, return_router_logits: bool = False, cache=None):
        """tokens [B, L] int -> logits [B, L, vocab] (and router logits [B, L, E] per MoE layer).

        ``cache`` (mlx-lm's ``make_prompt_cache(model)``) makes the model usable by mlx-lm's
        generation utilities."""
        h, router_logits = self.hidden_states(tokens, cache)
        logits = self.project(h)
        return (logits, router_logits) if return_router_logits else logits


class HybridCausalLM(CausalLM):
    """Linear-attention layers among the attention ones (Qwen3-Next, Qwen3.5): their
    generation state is a ``DeltaNetCache``, which mlx-lm's ``make_prompt_cache`` takes from
    ``make_cache``."""

    def make_cache(self) -> list:
        from mlx_lm.models.cache import KVCache

        return [DeltaNetCache() if "linear_attn" in layer else KVCache() for layer in self.layers]


def build_decoder(args: DecoderArgs, family: str) -> CausalLM:
    """Dense layers, or sparse ones wherever the MoE config places them; linear attention
    where ``layer_types`` places it."""

    def ffn(layer: int) -> GatedMLP | SparseMoE:
        if isinstance(args, MoEArgs) and args.is_moe_layer(layer):
            return SparseMoE(args)
        return GatedMLP(args.hidden_size, args.intermediate_size)

    layers = [
        DecoderLayer(args, ffn(i), args.attention_window(i), args.is_linear_attention(i))
        for i in range(args.num_layers)
    ]
    hybrid = any("linear_attn" in layer for layer in layers)
    return (HybridCausalLM if hybrid else CausalLM)(args, layers, family)


def _checkpointed(layer: DecoderLayer, x: mx.array) -> tuple[mx.array, mx.array | None]:
    """Run a layer under ``mx.checkpoint``: its activations are recomputed, not stored."""

    def run(params, x):
        layer.update(params)
        out, logits = layer(x)
        return [out] if logits is None else [out, logits]

    outs = mx.checkpoint(run)(layer.trainable_parameters(), x)
    return outs[0], (outs[1] if len(outs) > 1 else None)
