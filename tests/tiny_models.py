"""Tiny random Hugging Face checkpoints, written by transformers itself, and its outputs.

transformers is the independent reference every family must match.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import transformers

# Small but with every feature switched on: GQA, several experts, a dense layer in Qwen2-MoE.
TINY_CONFIGS: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(intermediate_size=128)),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            intermediate_size=128,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            num_experts=6,
            num_experts_per_tok=2,
            mlp_only_layers=[1],
            norm_topk_prob=False,
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            intermediate_size=128,
            moe_intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            head_dim=16,
        ),
    ),
}

COMMON = dict(
    vocab_size=96,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)

# What transformers 5 writes -> what hub checkpoints (transformers 4) carry.
T4_RENAMES = {"qwen2_moe": {"num_local_experts": "num_experts"},
              "qwen3_moe": {"num_local_experts": "num_experts"}}


def make_hf_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    config_cls, model_cls, extra = TINY_CONFIGS[family]
    config = getattr(transformers, config_cls)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            # Random values everywhere, so that a wrong norm or bias cannot hide behind 1s and 0s.
            if "norm" in name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
            else:
                param.copy_(0.08 * torch.randn_like(param))
    return model


def save(model: torch.nn.Module, folder: Path, style: str = "t5", shard_kb: int | None = None) -> Path:
    """Write with ``save_pretrained``; style "t4" rewrites config.json the way hub
    checkpoints spell it (rope_theta, num_experts)."""
    kwargs = {"max_shard_size": f"{shard_kb}KB"} if shard_kb else {}
    model.save_pretrained(folder, **kwargs)
    if style == "t4":
        path = folder / "config.json"
        config = json.loads(path.read_text())
        rope = config.pop("rope_parameters")
        config["rope_theta"] = rope["rope_theta"]
        for new, old in T4_RENAMES.get(config["model_type"], {}).items():
            if new in config:
                config[old] = config.pop(new)
        path.write_text(json.dumps(config, indent=2))
    return folder


def hf_forward(model: torch.nn.Module, tokens: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """transformers' logits [B, L, V] and router logits [B, L, E] per MoE layer."""
    ids = torch.tensor(tokens, dtype=torch.long)
    is_moe = hasattr(model.config, "num_experts_per_tok")
    with torch.no_grad():
        out = model(ids, output_router_logits=True) if is_moe else model(ids)
    batch, length = tokens.shape
    routers = [r.reshape(batch, length, -1).float().numpy() for r in (out.router_logits or [])] \
        if is_moe else []
    return out.logits.float().numpy(), routers
