"""Training speed and memory of `mlxmoe train` against `mlx_lm lora`, measured in one run.

Same Qwen3-MoE model, data, LoRA rank and targets (attention + routed experts, router
frozen), sequence length, batch and optimizer; both processes get the same environment
(so the same BLAS: set LD_PRELOAD before running this to compare under OpenBLAS).
mlxmoe also computes the load-balancing and z losses; mlx-lm computes neither.

    .venv/bin/python bench/train_vs_mlx_lm.py [--iters 30] [--hidden 256] ...
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \
        .venv/bin/python bench/train_vs_mlx_lm.py --quantize 4 --dispatch gather grouped

Prints tokens/s (steady state, from each tool's own reports), MFU and process max RSS, with
the ratios mlxmoe / mlx-lm, one row per mlxmoe setting (``--dispatch``: each a
train.moe_dispatch, ``:eager`` for train.compile off). (mlx-lm 0.32 no longer prints its
peak MLX allocation.) ``--quantize B``: both train on the B-bit model ``mlx_lm.convert -q``
writes (QLoRA).

MFU: the model's matmul FLOPs per token (2 per weight a token meets: attention, router, its
k experts, the output head; as many again for the input gradients of the backward pass,
the base being frozen, LoRA's own negligible) times tokens/s, over the dense float32
matmul rate this process measures (tokens x hidden by hidden x expert FFN, the experts'
shape). Both tools are charged the same FLOPs per token.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
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


def make_model(folder: Path, hidden: int, layers: int, experts: int, top_k: int, tokenizer: str) -> Path:
    """A Qwen3-MoE with a real tokenizer (Mixtral's 32000 tokens, or Qwen3's: vocabulary
    151936), config in the hub's transformers-4 spelling (mlx-lm 0.32 cannot read what
    transformers 5 writes)."""
    import torch
    import transformers
    from assets import mixtral_tokenizer_folder, qwen3_tokenizer_folder

    vocab = (qwen3_tokenizer_folder if tokenizer == "qwen3" else mixtral_tokenizer_folder)(folder)
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


def in_fresh_process(function, *args):
    """``function(*args)`` in a spawned interpreter. A child's max RSS on Linux starts at its
    parent's peak (the exec keeps the parent's high-water mark): building the model with torch
    here would set a floor under both tools' figures."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


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


def mlx_lm_run(model: Path, data: Path, out: Path, a: argparse.Namespace, env, keys=None) -> dict:
    """``keys``: mlx-lm's LoRA targets (default: attention and the experts of a Qwen3-MoE)."""
    keys = keys or [f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
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


def quantized_model(model: Path, bits: int, env) -> Path:
    folder = model.with_name(f"{model.name}-q{bits}")
    run(
        [
            "mlx_lm",
            "convert",
            "--hf-path",
            str(model),
            "--mlx-path",
            str(folder),
            "-q",
            "--q-bits",
            str(bits),
        ],
        env,
    )
    return folder


def flops_per_token(model: Path, a: argparse.Namespace) -> float:
    cfg = json.loads((model / "config.json").read_text())
    d, head = cfg["hidden_size"], cfg["head_dim"]
    attention = d * head * (2 * cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"])
    experts = a.top_k * 3 * d * cfg["moe_intermediate_size"]
    weights = cfg["num_hidden_layers"] * (attention + d * a.experts + experts) + d * cfg["vocab_size"]
    return 4.0 * weights


def dense_rate(rows: int, hidden: int, ffn: int, repeats: int = 10) -> float:
    """FLOP/s of a float32 [rows, hidden] x [hidden, ffn] matmul, best of ``repeats``."""
    import mlx.core as mx

    x, w = mx.random.normal((rows, hidden)), mx.random.normal((hidden, ffn))
    mx.eval(x @ w)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        mx.eval(x @ w)
        best = min(best, time.perf_counter() - started)
    return 2 * rows * hidden * ffn / best


def mlxmoe_run(model: Path, data: Path, out: Path, a: argparse.Namespace, env, setting: str) -> dict:
    dispatch, _, mode = setting.partition(":")
    out = out / setting.replace(":", "-")
    out.mkdir()
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
                    "quantize": a.quantize,
                    "report_every": a.report,
                    "val_every": 0,
                    "save_every": 0,
                    "moe_dispatch": dispatch,
                    "compile": mode != "eager",
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
        "--tokenizer", choices=["mixtral", "qwen3"], default="mixtral", help="vocab 32000 or 151936"
    )
    p.add_argument(
        "--quantize", type=int, default=0, metavar="BITS", help="QLoRA on mlx_lm.convert -q's model"
    )
    p.add_argument(
        "--dispatch",
        nargs="+",
        default=["auto"],
        metavar="SETTING",
        help="mlxmoe settings to run, each a train.moe_dispatch (auto, gather, dense, grouped), "
        "with ':eager' for train.compile off",
    )
    a = p.parse_args()
    env = dict(os.environ)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = in_fresh_process(
            make_model, tmp / "model", a.hidden, a.layers, a.experts, a.top_k, a.tokenizer
        )
        if a.quantize:
            model = quantized_model(model, a.quantize, env)
        data = make_data(tmp / "data")
        ours = {setting: mlxmoe_run(model, data, tmp, a, env, setting) for setting in a.dispatch}
        theirs = mlx_lm_run(model, data, tmp, a, env)
        flops = flops_per_token(model, a)
    rate = dense_rate(a.batch * a.seq, a.hidden, a.hidden)
    load = (*load, *os.getloadavg())
    blas = env.get("LD_PRELOAD", "") or "MLX's bundled BLAS"
    print(
        f"model: qwen3_moe hidden {a.hidden}, {a.layers} layers, {a.experts} experts top-{a.top_k}, "
        f"vocab {151936 if a.tokenizer == 'qwen3' else 32000}, "
        f"{f'{a.quantize}-bit' if a.quantize else 'float32'} base; LoRA r={a.rank} on "
        f"attention + experts; batch {a.batch}, seq <= {a.seq}; {a.iters} iters; BLAS: {blas}"
    )
    print(
        f"dense matmul {rate / 1e9:.1f} GFLOP/s; {flops / 1e6:.1f} MFLOP a token; load average "
        f"{load[0]:.1f} at the start, {load[3]:.1f} at the end ({os.cpu_count()} CPUs)"
    )
    print(
        f"{'mlxmoe setting':<18}{'tokens/s':>9}{'mlx-lm':>8}{'ratio':>7}{'MFU':>7}{'mlx-lm':>8}"
        f"{'RSS GB':>8}{'mlx-lm':>8}{'ratio':>7}"
    )
    tps, rss = theirs["tokens_per_s"], theirs["max_rss_gb"]
    for setting, r in ours.items():
        print(
            f"{setting:<18}{r['tokens_per_s']:>9.1f}{tps:>8.1f}{r['tokens_per_s'] / tps:>7.2f}"
            f"{r['tokens_per_s'] * flops / rate:>7.1%}{tps * flops / rate:>8.1%}"
            f"{r['max_rss_gb']:>8.2f}{rss:>8.2f}{r['max_rss_gb'] / rss:>7.2f}"
        )


if __name__ == "__main__":
    main()
