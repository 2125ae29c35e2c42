"""Qwen2-MoE (Qwen1.5-MoE): q/k/v biases, a shared expert behind a sigmoid gate, top-k not
renormalized by default, and dense layers where ``decoder_sparse_step``/``mlp_only_layers`` say."""

from __future__ import annotations

from ..config import ConfigView, MoEArgs
from ..tensor_names import HF_DECODER_TENSORS
from .base import Family, require_llama_cpp_routing

_L = "model.layers.{bid}"

# Shared with Qwen3-MoE, which names its dense and routed feed-forward tensors the same way.
HF_FFN_TENSORS = {
    "ffn_gate": f"{_L}.mlp.gate_proj.weight",
    "ffn_up": f"{_L}.mlp.up_proj.weight",
    "ffn_down": f"{_L}.mlp.down_proj.weight",
    "ffn_gate_inp": f"{_L}.mlp.gate.weight",
    # per expert as the hub stores them; stacked as mlx-lm saves them (read only)
    "ffn_gate_exps": (f"{_L}.mlp.experts.{{xid}}.gate_proj.weight", f"{_L}.mlp.switch_mlp.gate_proj.weight"),
    "ffn_up_exps": (f"{_L}.mlp.experts.{{xid}}.up_proj.weight", f"{_L}.mlp.switch_mlp.up_proj.weight"),
    "ffn_down_exps": (f"{_L}.mlp.experts.{{xid}}.down_proj.weight", f"{_L}.mlp.switch_mlp.down_proj.weight"),
}

HF_TENSORS = {
    **HF_DECODER_TENSORS,
    **HF_FFN_TENSORS,
    "attn_q.bias": f"{_L}.self_attn.q_proj.bias",
    "attn_k.bias": f"{_L}.self_attn.k_proj.bias",
    "attn_v.bias": f"{_L}.self_attn.v_proj.bias",
    "ffn_gate_shexp": f"{_L}.mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp": f"{_L}.mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp": f"{_L}.mlp.shared_expert.down_proj.weight",
    "ffn_gate_inp_shexp": f"{_L}.mlp.shared_expert_gate.weight",
}


def args_from_config(cfg: ConfigView) -> MoEArgs:
    return MoEArgs(
        **MoEArgs.base_fields(cfg, qkv_bias_default=True),
        num_experts=int(cfg.get("num_experts", "num_local_experts")),
        num_experts_per_tok=int(cfg.get("num_experts_per_tok")),
        moe_intermediate_size=int(cfg.get("moe_intermediate_size")),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", default=False)),
        shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size")),
        decoder_sparse_step=int(cfg.get("decoder_sparse_step", default=1)),
        mlp_only_layers=list(cfg.get("mlp_only_layers", default=[])),
    )


def gguf_hparams(args: MoEArgs, writer) -> None:
    # llama.cpp's qwen2moe graph: every layer sparse, top-k weights not renormalized.
    require_llama_cpp_routing(args, "qwen2moe", normalized=False)
    writer.add_expert_feed_forward_length(args.moe_intermediate_size)
    writer.add_expert_shared_feed_forward_length(args.shared_expert_intermediate_size)


FAMILY = Family("qwen2_moe", ("qwen2_moe",), "qwen2moe", HF_TENSORS, args_from_config, gguf_hparams)
