"""Mixtral: every layer sparse, top-2 of 8 renormalized, experts named w1 (gate), w3 (up), w2 (down)."""

from __future__ import annotations

from ..config import ConfigView, MoEArgs
from ..tensor_names import HF_DECODER_TENSORS
from .base import Family

# llama.cpp runs Mixtral as its "llama" arch, renormalizing the top-k weights as Mixtral does.
from .llama import gguf_hparams

# transformers 5 renames block_sparse_moe to mlp in memory; read both.
_MOE = ("model.layers.{bid}.block_sparse_moe", "model.layers.{bid}.mlp")

# mlx-lm saves the experts stacked (read only)
_STACKED = "model.layers.{bid}.block_sparse_moe.switch_mlp"

HF_TENSORS = {
    **HF_DECODER_TENSORS,
    "ffn_gate_inp": tuple(f"{p}.gate.weight" for p in _MOE),
    "ffn_gate_exps": (*(f"{p}.experts.{{xid}}.w1.weight" for p in _MOE), f"{_STACKED}.gate_proj.weight"),
    "ffn_up_exps": (*(f"{p}.experts.{{xid}}.w3.weight" for p in _MOE), f"{_STACKED}.up_proj.weight"),
    "ffn_down_exps": (*(f"{p}.experts.{{xid}}.w2.weight" for p in _MOE), f"{_STACKED}.down_proj.weight"),
}


def args_from_config(cfg: ConfigView) -> MoEArgs:
    base = MoEArgs.base_fields(cfg)
    return MoEArgs(
        **base,
        num_experts=int(cfg.get("num_local_experts", "num_experts")),
        num_experts_per_tok=int(cfg.get("num_experts_per_tok")),
        moe_intermediate_size=base["intermediate_size"],
        norm_topk_prob=True,
    )


FAMILY = Family("mixtral", ("mixtral",), "llama", HF_TENSORS, args_from_config, gguf_hparams, permute_qk=True)
