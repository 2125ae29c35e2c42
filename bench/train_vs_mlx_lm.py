"""Training speed and memory of `mlxmoe train` against `mlx_lm lora`, measured in one run.

Same Qwen3-MoE model, data, LoRA rank and targets (attention + routed experts, router
frozen), sequence length, batch and optimizer; both processes get the same environment
(so the same BLAS: set LD_PRELOAD before running this to compare under OpenBLAS).
mlxmoe also computes the load-balancing and z losses; mlx-lm computes neither.

    .venv/bin/python bench/train_vs_mlx_lm.py [--iters 30] [--hidden 256] ...

Prints tokens/s (steady state, from each tool's own reports) and process max RSS, with the
ratios mlxmoe / mlx-lm. (mlx-lm 0.32 no longer prints its peak MLX allocation.)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from mlxmoe.memory import maxrss_bytes

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

RUN_WITH_MAXRSS = (
    "import resource, runpy, sys\n"
    "sys.argv = sys.argv[1:]\n"
    "try:\n"
    "    runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n"
    "finally:\n"
    "    print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)\n"
)


def make_model(folder: Path, hidden: int, layers: int, experts: int, top_k: int) -> Path:
    """A Qwen3-MoE with Mixtral's real 32000-token tokenizer, config in the hub's
    transformers-4 spelling (mlx-lm 0.32 cannot read what transformers 5 writes)."""
    import torch
    import transformers
    from assets import mixtral_tokenizer_folder

    vocab = mixtral_tokenizer_folder(folder)
    config = transformers.Qwen3MoeConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        moe_intermediate_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        num_experts=experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=True,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    transformers.Qwen3MoeForCausalLM(config).save_pretrained(folder)
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]
    cfg["num_experts"] = cfg.pop("num_local_experts", experts)
    path.write_text(json.dumps(cfg, indent=2))
    return folder


def make_data(folder: Path, n: int = 400) -> Path:
    """Real text of varied length: CPython's own documentation topics as Q&A."""
    from pydoc_data.topics import topics

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, text in sorted(topics.items()):
        body = " ".join(text.split())[:1500]
        rows.append({"prompt": f"Explain the Python topic '{name}'.", "completion": body})
    rows = (rows * (n // len(rows) + 1))[:n]
    for split, part in (("train", rows), ("valid", rows[:16])):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return folder


def run(module_args: list[str], env: dict[str, str]) -> tuple[str, int]:
    proc = subprocess.run(
        [sys.executable, "-c", RUN_WITH_MAXRSS, *module_args], capture_output=True, text=True, env=env
    )
    out = proc.stdout + proc.stderr
    if os.environ.get("BENCH_VERBOSE"):
        print(out[-4000:])
    if proc.returncode != 0:
        raise SystemExit(f"{module_args[0]} failed:\n{out[-3000:]}")
    return out, maxrss_bytes(int(re.findall(r"MAXRSS (\d+)", out)[-1]))


def mlx_lm_run(model: Path, data: Path, out: Path, a: argparse.Namespace, env) -> dict:
    keys = [f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
        f"mlp.switch_mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")
    ]
    config = out / "mlx_lm.yaml"
    config.write_text(
        json.dumps(
            {"lora_parameters": {"keys": keys, "rank": a.rank, "scale": a.alpha / a.rank, "dropout": 0.0}}
        )
    )
    log, rss = run(
        [
            "mlx_lm",
            "lora",
            "--model",
            str(model),
            "--train",
            "--data",
            str(data),
            "--iters",
            str(a.iters),
            "--batch-size",
            str(a.batch),
            "--num-layers",
            "-1",
            "--max-seq-length",
            str(a.seq),
            "--learning-rate",
            "1e-4",
            "--mask-prompt",
            "--steps-per-report",
            str(a.report),
            "--steps-per-eval",
            str(a.iters * 10),
            "--val-batches",
            "1",
            "--optimizer",
            "adamw",
            "--adapter-path",
            str(out / "mlx_lm_adapter"),
            "-c",
            str(config),
        ],
        env,
    )
    # mlx-lm 0.32 prints a table: iter, train loss (with a trend arrow), tok/s, tokens
    plain = re.sub(r"\x1b\[[0-9;]*m", "", log)
    tps = [
        float(m) for m in re.findall(r"^\s*\d+\s+[\d.]+\s*[▼▲]?\s+([\d.]+)\s+[\d.]+k?\s*$", plain, flags=re.M)
    ]
    if not tps:
        raise SystemExit(f"no tokens/s in mlx-lm's output:\n{plain[-2000:]}")
    return {"tokens_per_s": sum(tps[1:]) / max(len(tps) - 1, 1), "max_rss_gb": rss / 1e9}


def mlxmoe_run(model: Path, data: Path, out: Path, a: argparse.Namespace, env) -> dict:
    recipe = out / "mlxmoe.yaml"
    recipe.write_text(
        json.dumps(
            {
                "lora": {"strategy": "experts", "rank": a.rank, "alpha": a.alpha},
                "train": {
                    "iters": a.iters,
                    "batch_size": a.batch,
                    "max_seq_len": a.seq,
                    "learning_rate": 1e-4,
                    "warmup": 0,
                    "quantize": 0,
                    "report_every": a.report,
                    "val_every": 0,
                    "save_every": 0,
                    "moe_dispatch": a.dispatch,
                },
            }
        )
    )
    _, rss = run(
        [
            "mlxmoe",
            "train",
            "--model",
            str(model),
            "--data",
            str(data),
            "--out",
            str(out / "mlxmoe_run"),
            "--recipe",
            str(recipe),
        ],
        env,
    )
    rows = [json.loads(x) for x in (out / "mlxmoe_run" / "metrics.jsonl").read_text().splitlines()]
    steady = rows[1:] or rows
    return {"tokens_per_s": sum(r["tokens_per_s"] for r in steady) / len(steady), "max_rss_gb": rss / 1e9}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=12)
    p.add_argument("--report", type=int, default=3)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=192)
    p.add_argument(
        "--dispatch",
        choices=("auto", "gather", "dense"),
        default="auto",
        help="mlxmoe's MoE dispatch (train.moe_dispatch)",
    )
    a = p.parse_args()
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_model(tmp / "model", a.hidden, a.layers, a.experts, a.top_k)
        data = make_data(tmp / "data")
        ours = mlxmoe_run(model, data, tmp, a, env)
        theirs = mlx_lm_run(model, data, tmp, a, env)
    blas = env.get("LD_PRELOAD", "") or "MLX's bundled BLAS"
    print(
        f"model: qwen3_moe hidden {a.hidden}, {a.layers} layers, {a.experts} experts top-{a.top_k}, "
        f"vocab 32000; LoRA r={a.rank} on attention + experts; batch {a.batch}, seq <= {a.seq}; "
        f"{a.iters} iters; BLAS: {blas}"
    )
    print(f"{'':>22} {'mlxmoe':>10} {'mlx-lm':>10} {'ratio':>8}")
    for key, label in (("tokens_per_s", "tokens/s"), ("max_rss_gb", "process max RSS GB")):
        print(f"{label:>22} {ours[key]:>10.3f} {theirs[key]:>10.3f} {ours[key] / theirs[key]:>8.2f}")


if __name__ == "__main__":
    main()
