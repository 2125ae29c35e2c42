"""Reading ``config.json`` in both styles Hugging Face has written.

Checkpoints on the hub use transformers-4 keys (``num_experts``, ``rope_theta``);
``save_pretrained`` in transformers 5 writes ``num_local_experts`` and a
``rope_parameters`` dict. Families ask for a value by its possible names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CheckpointError

if TYPE_CHECKING:
    from .nn.gated_deltanet import DeltaNetArgs
    from .nn.mla import MLAArgs

_MISSING = object()


class ConfigView:
    def __init__(self, config: dict[str, Any], source: str | Path = "config.json"):
        self.raw = config
        self.source = str(source)

    def get(self, *keys: str, default: Any = _MISSING) -> Any:
        for key in keys:
            if key in self.raw and self.raw[key] is not None:
                return self.raw[key]
        if default is _MISSING:
            names = " or ".join(repr(k) for k in keys)
            raise CheckpointError(f"{self.source}: missing key {names}")
        return default

    def rope(self) -> tuple[float, dict[str, Any] | None]:
        """(theta, scaling config or None) from either style."""
        params = self.raw.get("rope_parameters")
        if isinstance(params, dict) and "rope_theta" in params:
            kind = params.get("rope_type", params.get("type", "default"))
            return float(params["rope_theta"]), (None if kind == "default" else dict(params))
        scaling = self.raw.get("rope_scaling")
        if isinstance(scaling, dict):
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            scaling = None if kind == "default" else scaling
        return float(self.get("rope_theta", default=10000.0)), scaling


@dataclass
class DecoderArgs:
    """What every decoder here shares; families add their feed-forward fields."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    qk_norm: str | None = None  # "head": RMSNorm per head (Qwen3); "full": over all heads (OLMoE)
    clip_qkv: float | None = None  # OLMoE clamps q, k and v to +-clip_qkv
    o_bias: bool = False  # a bias on the attention output too (gpt-oss)
    attn_sinks: bool = False  # a learned logit per head in every attention softmax (gpt-oss)
    sliding_window: int | None = None  # keys a "sliding_attention" layer sees, its own included
    # per layer: "sliding_attention" or "full_attention" (gpt-oss), "linear_attention" or
    # "full_attention" (Qwen3-Next, Qwen3.5)
    layer_types: list[str] | None = None
    # q_proj yields, per head, the query and then a gate: attention output * sigmoid(gate)
    attn_output_gate: bool = False
    partial_rotary_factor: float = 1.0  # RoPE rotates the first head_dim * factor dims only
    # RMSNorms scale by offset + weight: 1.0 where weights are stored zero-centred (Qwen3-Next)
    norm_weight_offset: float = 0.0
    linear_attention: DeltaNetArgs | None = None  # the Gated DeltaNet of "linear_attention" layers
    mla: MLAArgs | None = None  # multi-head latent attention in every layer (DeepSeek-V2)
    # Granite's multipliers (transformers' names): the embeddings times embedding_multiplier,
    # attention scores times attention_multiplier (None: head_dim ** -0.5), each block's
    # output times residual_multiplier before it joins the residual stream, logits divided
    # by logits_scaling
    embedding_multiplier: float = 1.0
    attention_multiplier: float | None = None
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0

    @property
    def rotary_dims(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def is_linear_attention(self, layer: int) -> bool:
        return self.layer_types is not None and self.layer_types[layer] == "linear_attention"

    def attention_window(self, layer: int) -> int | None:
        """How many positions ``layer`` attends to (None: all before it)."""
        if self.sliding_window is None or self.layer_types is None:
            return None
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    @classmethod
    def base_fields(cls, cfg: ConfigView, *, qkv_bias_default: bool = False) -> dict[str, Any]:
        hidden = int(cfg.get("hidden_size"))
        heads = int(cfg.get("num_attention_heads"))
        theta, scaling = cfg.rope()
        return dict(
            model_type=cfg.get("model_type"),
            vocab_size=int(cfg.get("vocab_size")),
            hidden_size=hidden,
            num_layers=int(cfg.get("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads", default=heads)),
            head_dim=int(cfg.get("head_dim", default=hidden // heads)),
            intermediate_size=int(cfg.get("intermediate_size", default=0)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", default=1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", default=4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", default=False)),
            qkv_bias=bool(cfg.get("qkv_bias", "attention_bias", default=qkv_bias_default)),
        )


@dataclass
class MoEArgs(DecoderArgs):
    num_experts: int = 0
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int = 0
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    router_bias: bool = False
    # "all": softmax over every expert, then top-k (Mixtral, Qwen, OLMoE); "top_k": the k
    # largest logits, softmaxed among themselves (gpt-oss)
    router_softmax: str = "all"
    expert_bias: bool = False
    # Set both for gpt-oss's clamped SwiGLU (nn.moe.clamped_swiglu); None: silu(gate) * up
    swiglu_alpha: float | None = None
    swiglu_limit: float | None = None
    # The shared expert's output times sigmoid(shared_expert_gate(x)) (Qwen); False: added as
    # it is (DeepSeek-V2)
    shared_expert_gate: bool = True
    # DeepSeek-V2: the top-k routing weights times routed_scaling_factor; experts in
    # expert_groups groups, the top-k taken from the expert_groups_used groups whose best
    # expert scores highest (topk_method "group_limited_greedy"; 1 group: plain top-k)
    routed_scaling_factor: float = 1.0
    expert_groups: int = 1
    expert_groups_used: int = 1

    def is_moe_layer(self, layer: int) -> bool:
        return (
            layer not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if self.is_moe_layer(i)]
