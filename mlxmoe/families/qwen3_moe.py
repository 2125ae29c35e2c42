"""Qwen3-MoE: per-head q/k RMSNorm, no shared expert, ``norm_topk_prob`` renormalizes top-k."""

from __future__ import annotations

from dataclasses import replace

from ..config import ConfigView, MoEArgs
from ..errors import CheckpointError
from ..tensor_names import HF_DECODER_TENSORS
from .base import Family, require_llama_cpp_routing
from .qwen2_moe import HF_FFN_TENSORS

_L = "model.layers.{bid}"

HF_TENSORS = {
    **HF_DECODER_TENSORS,
    "attn_q_norm": f"{_L}.self_attn.q_norm.weight",
    "attn_k_norm": f"{_L}.self_attn.k_norm.weight",
    **HF_FFN_TENSORS,
}


def args_from_config(cfg: ConfigView) -> MoEArgs:
    if cfg.get("attention_bias", default=False):
        raise CheckpointError(f"{cfg.source}: attention_bias=true is not supported for qwen3_moe")
    args = MoEArgs(
        **MoEArgs.base_fields(cfg),
        num_experts=int(cfg.get("num_experts", "num_local_experts")),
        num_experts_per_tok=int(cfg.get("num_experts_per_tok")),
        moe_intermediate_size=int(cfg.get("moe_intermediate_size")),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", default=False)),
        decoder_sparse_step=int(cfg.get("decoder_sparse_step", default=1)),
        mlp_only_layers=list(cfg.get("mlp_only_layers", default=[])),
    )
    return replace(args, qk_norm="head")


def gguf_hparams(args: MoEArgs, writer) -> None:
    # llama.cpp's qwen3moe graph: every layer sparse, top-k weights renormalized.
    require_llama_cpp_routing(args, "qwen3moe", normalized=True)
    writer.add_expert_feed_forward_length(args.moe_intermediate_size)


FAMILY = Family("qwen3_moe", ("qwen3_moe",), "qwen3moe", HF_TENSORS, args_from_config, gguf_hparams)
