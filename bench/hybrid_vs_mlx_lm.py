"""Training speed and memory of `mlxmoe train` against `mlx_lm lora` on a Qwen3-Next: Gated
DeltaNet layers, a softmax-attention layer every fourth, routed experts and a gated shared
expert in each. One run measures both tools (as bench/train_vs_mlx_lm.py does for Qwen3-MoE).

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        .venv/bin/python bench/hybrid_vs_mlx_lm.py [--iters 12] [--hidden 256] [--layers 4] ...

Same model (a random transformers Qwen3-Next with Mixtral's real 32000-token tokenizer), data,
LoRA rank and targets: the token mixers' projections (DeltaNet's in_proj_qkvz, in_proj_ba and
out_proj; q, k, v and o) and the routed experts, router and shared expert frozen. mlxmoe runs
DeltaNet chunked (chunk 64) and adds the load-balancing and z losses; mlx-lm's training path
runs the recurrence token by token (its Metal kernel is for inference) and computes neither.
Prints tokens/s (steady state, from each tool's own reports) and process max RSS, with the
ratios mlxmoe / mlx-lm.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_vs_mlx_lm import in_fresh_process, make_data, mlx_lm_run, mlxmoe_run  # noqa: E402

# mlx-lm's module names for the same targets as mlxmoe's "experts" strategy
MLX_LM_KEYS = [
    *(f"linear_attn.{p}" for p in ("in_proj_qkvz", "in_proj_ba", "out_proj")),
    *(f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")),
    *(f"mlp.switch_mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")),
]


def make_model(folder: Path, a: argparse.Namespace) -> Path:
    """A Qwen3-Next, config.json in the hub's transformers-4 spelling (mlx-lm 0.32 reads
    rope_theta and partial_rotary_factor at the top level)."""
    import torch
    import transformers

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from assets import mixtral_tokenizer_folder

    vocab = mixtral_tokenizer_folder(folder)
    heads = a.hidden // 64
    config = transformers.Qwen3NextConfig(
        vocab_size=vocab,
        hidden_size=a.hidden,
        intermediate_size=a.hidden * 2,
        moe_intermediate_size=a.hidden,
        shared_expert_intermediate_size=a.hidden,
        num_hidden_layers=a.layers,
        num_attention_heads=heads,
        num_key_value_heads=max(heads // 2, 1),
        head_dim=64,
        linear_num_key_heads=max(heads // 2, 1),
        linear_num_value_heads=heads,
        linear_key_head_dim=64,
        linear_value_head_dim=64,
        num_experts=a.experts,
        num_experts_per_tok=a.top_k,
        norm_topk_prob=True,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    transformers.Qwen3NextForCausalLM(config).save_pretrained(folder)
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope["rope_theta"]
    cfg["partial_rotary_factor"] = rope.get("partial_rotary_factor", 1.0)
    cfg.setdefault("decoder_sparse_step", 1)
    path.write_text(json.dumps(cfg, indent=2))
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=12)
    p.add_argument("--report", type=int, default=3)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4, help="a softmax-attention layer every fourth")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dispatch", default="auto", help="mlxmoe's MoE dispatch (train.moe_dispatch)")
    a = p.parse_args()
    a.quantize = 0  # a float32 base for both tools
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = in_fresh_process(make_model, tmp / "model", a)
        data = make_data(tmp / "data")
        ours = mlxmoe_run(model, data, tmp, a, env, a.dispatch)
        theirs = mlx_lm_run(model, data, tmp, a, env, keys=MLX_LM_KEYS)
    blas = env.get("LD_PRELOAD", "") or "MLX's bundled BLAS"
    print(
        f"model: qwen3_next hidden {a.hidden}, {a.layers} layers (every fourth softmax attention), "
        f"{a.experts} experts top-{a.top_k} + a shared expert, vocab 32000; LoRA r={a.rank} on the "
        f"token mixers + experts; batch {a.batch}, seq <= {a.seq}; {a.iters} iters; BLAS: {blas}"
    )
    print(f"{'':>22} {'mlxmoe':>10} {'mlx-lm':>10} {'ratio':>8}")
    for key, label in (("tokens_per_s", "tokens/s"), ("max_rss_gb", "process max RSS GB")):
        print(f"{label:>22} {ours[key]:>10.3f} {theirs[key]:>10.3f} {ours[key] / theirs[key]:>8.2f}")


if __name__ == "__main__":
    main()
