"""Predicted against measured peak memory of real training steps (issue 6, part 2).

Each setting runs in a fresh process: a model built from a config (random weights, cast and
quantized as ``mlxmoe.load`` does), the recipe's adapters, mlxmoe's own ``Stepper`` and AdamW,
and one optimizer step on a [batch, seq_len] micro-batch of answer tokens. Measured are
``mx.get_peak_memory()`` over that step and the rise of the process's peak RSS above its
RSS before the model was built (Linux: VmHWM, reset through /proc/self/clear_refs). The
prediction is ``mlxmoe.plan.plan_training`` for the same recipe on this backend.

    .venv/bin/python bench/memory_plan.py            # every setting (a few minutes on 2 cores)
    .venv/bin/python bench/memory_plan.py --quick    # the tiny ones

MoE settings name their dispatch (gather or dense) explicitly, so the measured process runs it
whatever BLAS it loaded and the prediction assumes the same.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

TINY = dict(model_type="qwen3_moe", vocab_size=2048, hidden_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, intermediate_size=256,
            moe_intermediate_size=128, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
            max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=1e6,
            tie_word_embeddings=False)
SMALL = dict(model_type="mixtral", vocab_size=16000, hidden_size=512, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=4, intermediate_size=1024,
             num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=4096,
             rms_norm_eps=1e-5, rope_theta=1e6, tie_word_embeddings=False)
SMALL_SHARED = dict(model_type="qwen2_moe", vocab_size=16384, hidden_size=384, num_hidden_layers=6,
                    num_attention_heads=6, num_key_value_heads=6, intermediate_size=1024,
                    moe_intermediate_size=256, shared_expert_intermediate_size=1024,
                    num_experts=16, num_experts_per_tok=4, norm_topk_prob=False,
                    decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=4096,
                    rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False)
OLMOE = dict(model_type="olmoe", vocab_size=8192, hidden_size=256, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=8, intermediate_size=256,
             num_experts=16, num_experts_per_tok=4, norm_topk_prob=False, clip_qkv=None,
             max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=1e4,
             tie_word_embeddings=False)


def setting(name, config, bits=0, batch=2, seq=256, checkpoint=False, strategy="experts",
            accum=1, rank=8, dispatch="gather", dtype="auto", group=64):
    """``dispatch`` is set explicitly (never auto) so that the measured process, which runs
    MLX's bundled BLAS, and the prediction assume the same MoE dispatch."""
    return dict(name=name, config=config, bits=bits, batch=batch, seq=seq, checkpoint=checkpoint,
                strategy=strategy, accum=accum, rank=rank, dispatch=dispatch, dtype=dtype,
                group=group)


QUICK = [
    setting("tiny qwen3", TINY),
    setting("tiny qwen3", TINY, bits=4),
    setting("tiny qwen3", TINY, checkpoint=True),
    setting("tiny qwen3", TINY, batch=4, seq=512, strategy="attention"),
    setting("tiny qwen3", TINY, dispatch="dense"),
]
SETTINGS = QUICK + [
    setting("tiny qwen3", TINY, bits=8, strategy="experts+router", accum=2),
    setting("tiny qwen3", TINY, batch=1, seq=64, strategy="all", rank=128),  # update-bound
    setting("small mixtral", SMALL),
    setting("small mixtral", SMALL, bits=4),
    setting("small mixtral", SMALL, bits=8, checkpoint=True),
    setting("small mixtral", SMALL, batch=1, seq=1024),
    setting("small mixtral", SMALL, batch=2, seq=512, checkpoint=True, bits=4),
    setting("small mixtral", SMALL, strategy="all", rank=16),
    setting("small qwen2-moe", SMALL_SHARED),
    setting("small qwen2-moe", SMALL_SHARED, bits=4, strategy="shared", checkpoint=True),
    setting("small olmoe", OLMOE, batch=2, seq=512),
    # nn.moe's dense dispatch (every expert on every token), float experts only
    setting("tiny qwen3", TINY, checkpoint=True, dispatch="dense"),
    setting("small mixtral", SMALL, dispatch="dense"),
    setting("small mixtral", SMALL, strategy="all", rank=16, dispatch="dense"),
    setting("small qwen2-moe", SMALL_SHARED, dispatch="dense"),
]


def recipe_for(s: dict):
    from mlxmoe.recipe import load_recipe

    return load_recipe(
        None,
        lora={"strategy": s["strategy"], "rank": s["rank"]},
        train={"quantize": s["bits"], "group_size": s["group"], "batch_size": s["batch"],
               "max_seq_len": s["seq"], "grad_checkpoint": s["checkpoint"],
               "grad_accum": s["accum"], "moe_dispatch": s["dispatch"], "dtype": s["dtype"]},
    )


def _rss_now_and_peak() -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return (int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024)


def measure(s: dict) -> dict:
    """Run in a fresh process: peak memory of two real training steps."""
    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np
    from mlx.utils import tree_flatten, tree_unflatten

    from mlxmoe.adapt import apply_adapters
    from mlxmoe.checkpoint import role_is_router
    from mlxmoe.config import ConfigView
    from mlxmoe.data import Batch
    from mlxmoe.info import lazy_model
    from mlxmoe.dtypes import resolve_dtype
    from mlxmoe.nn.moe import set_dispatch
    from mlxmoe.quantize import quantize_model
    from mlxmoe.train.step import Stepper

    recipe = recipe_for(s)
    t = recipe.train
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    rss_before, _ = _rss_now_and_peak()
    mx.random.seed(0)
    model = lazy_model(ConfigView(s["config"]))
    dtype = resolve_dtype(t.dtype)
    model.update(tree_unflatten([(k, v.astype(mx.float32 if role_is_router(k) else dtype))
                                 for k, v in tree_flatten(model.parameters())]))
    if t.quantize:
        quantize_model(model, t.quantize, t.group_size)
    mx.eval(model.parameters())
    apply_adapters(model, recipe.lora)
    set_dispatch(model, t.moe_dispatch)
    model.grad_checkpoint = t.grad_checkpoint
    model.train()
    optimizer = optim.AdamW(learning_rate=1e-4)
    optimizer.init(model.trainable_parameters())
    mx.eval(model.parameters(), optimizer.state)
    stepper = Stepper(model, optimizer, recipe.loss, t.grad_clip, t.compile)
    rng = np.random.default_rng(0)
    shape = (t.batch_size, t.max_seq_len)
    vocab = s["config"]["vocab_size"]
    batches = [Batch(mx.array(rng.integers(0, vocab, shape, dtype=np.int32)),
                     mx.array(rng.integers(0, vocab, shape, dtype=np.int32)),
                     mx.ones(shape), mx.ones(shape), shape[0] * shape[1], shape[0] * shape[1])
               for _ in range(t.grad_accum)]
    mx.eval([(b.inputs, b.targets, b.loss_mask, b.token_mask) for b in batches])
    mx.reset_peak_memory()
    stepper.step(batches)  # the first step: compiled, optimizer state written; later ones peak alike
    _, rss_peak = _rss_now_and_peak()
    return {"mlx_peak": mx.get_peak_memory(), "rss_rise": rss_peak - rss_before}


def predict(s: dict) -> tuple[int, str]:
    import mlx.core as mx

    from mlxmoe.config import ConfigView
    from mlxmoe.plan import plan_training

    device = "cpu" if mx.default_device() == mx.cpu else "gpu"
    plan = plan_training(ConfigView(s["config"]), recipe_for(s), device)
    return plan.peak, plan.phase


def run_all(settings: list[dict]) -> list[dict]:
    rows = []
    print_header()
    for s in settings:
        out = subprocess.run([sys.executable, __file__, "--one", json.dumps(s)],
                             capture_output=True, text=True, check=False)
        if out.returncode:
            raise SystemExit(f"{s['name']}: measurement failed\n{out.stderr[-2000:]}")
        measured = json.loads(out.stdout.strip().splitlines()[-1])
        predicted, phase = predict(s)
        rows.append({**s, **measured, "predicted": predicted, "phase": phase})
        print_row(rows[-1])
    worst = max(abs(r["predicted"] / r["mlx_peak"] - 1) for r in rows)
    print(f"\nlargest deviation from mx.get_peak_memory: {100 * worst:.1f}%")
    return rows


EXPORT_MODEL = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=2,
                    num_attention_heads=8, num_key_value_heads=4, num_local_experts=8)
EXPORTS = [("f16", False), ("q8_0", False), ("q8_0", True), ("q4_k_m", True)]


def make_export_model(root: Path) -> Path:
    """A float32 Mixtral-layout checkpoint with Mixtral's tokenizer, and a rank-8 adapter."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import mlx.core as mx

    from assets import mixtral_tokenizer_folder
    from tiny_models import make_hf_model, save

    from mlxmoe import load
    from mlxmoe.adapt import AdapterSpec, apply_adapters
    from mlxmoe.adapters import adapter_config, save_adapters

    folder = root / "model"
    vocab = mixtral_tokenizer_folder(folder)
    save(make_hf_model("mixtral", vocab_size=vocab, **EXPORT_MODEL), folder)
    model, _ = load(folder)
    spec = AdapterSpec()
    adapted = apply_adapters(model, spec)
    for _, module in model.named_modules():
        if "lora_b" in module:
            module.lora_b = mx.random.normal(module.lora_b.shape) * 0.01
    save_adapters(model, root / "adapter", adapter_config(model, spec, adapted, str(folder)))
    return folder


def measure_export(job: dict) -> dict:
    """Run in a fresh process: one export_gguf call's peak of MLX memory (the checkpoint's
    loaded arrays) and of numpy memory (tracemalloc: merged tensors and encoder temporaries)."""
    import tracemalloc

    import mlx.core as mx

    from mlxmoe.gguf.export import export_gguf

    mx.reset_peak_memory()
    tracemalloc.start()
    export_gguf(job["model"], job["out"], job["type"], job["adapter"])
    numpy_peak = tracemalloc.get_traced_memory()[1]
    return {"mlx_peak": mx.get_peak_memory(), "numpy_peak": numpy_peak}


def run_exports(root: Path) -> list[dict]:
    from mlxmoe.adapt import AdapterSpec
    from mlxmoe.info import read_config
    from mlxmoe.plan import model_memory, plan_export

    import mlx.core as mx

    folder = make_export_model(root)
    cfg = read_config(folder)
    memory = model_memory(cfg, mx.float32, 0, 64, AdapterSpec())
    rows = []
    for file_type, with_adapter in EXPORTS:
        job = {"model": str(folder), "out": str(root / f"{file_type}.gguf"), "type": file_type,
               "adapter": str(root / "adapter") if with_adapter else None}
        out = subprocess.run([sys.executable, __file__, "--export", json.dumps(job)],
                             capture_output=True, text=True, check=False)
        if out.returncode:
            raise SystemExit(f"export {file_type}: failed\n{out.stderr[-2000:]}")
        measured = json.loads(out.stdout.strip().splitlines()[-1])
        plan = plan_export(cfg, file_type, memory if with_adapter else None)
        rows.append({"type": file_type, "adapter": with_adapter, "predicted": plan.peak, **measured})
    return rows


def print_exports(rows: list[dict]) -> None:
    """Export reads and encodes with numpy (tracemalloc sees it); MLX only merges."""
    mib = MiB
    print(f"\n{'GGUF type':<10} {'adapter':<8} {'predicted':>10} {'numpy peak':>11} {'ratio':>6} "
          f"{'mx peak':>9}")
    for r in rows:
        print(f"{r['type']:<10} {'yes' if r['adapter'] else 'no':<8} {r['predicted'] / mib:>8.1f}Mi "
              f"{r['numpy_peak'] / mib:>9.1f}Mi {r['predicted'] / r['numpy_peak']:>6.3f} "
              f"{r['mlx_peak'] / mib:>7.1f}Mi")


MiB = 2**20
HEADER = (f"{'model':<16} {'bits':>4} {'batch x seq':>11} {'ckpt':>4} {'strategy':<15} {'accum':>5} "
          f"{'dispatch':<8} "
          f"{'predicted':>10} {'mx peak':>10} {'ratio':>6} {'RSS rise':>10} {'ratio':>6}  phase")


def print_header() -> None:
    print(HEADER)
    print("-" * len(HEADER), flush=True)


def print_row(r: dict) -> None:
    print(f"{r['name']:<16} {r['bits']:>4} {str(r['batch']) + ' x ' + str(r['seq']):>11} "
          f"{'on' if r['checkpoint'] else 'off':>4} {r['strategy']:<15} {r['accum']:>5} "
          f"{r['dispatch']:<8} {r['predicted'] / MiB:>8.1f}Mi {r['mlx_peak'] / MiB:>8.1f}Mi "
          f"{r['predicted'] / r['mlx_peak']:>6.3f} {r['rss_rise'] / MiB:>8.1f}Mi "
          f"{r['predicted'] / r['rss_rise']:>6.3f}  {r['phase']}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the tiny settings")
    parser.add_argument("--exports-only", action="store_true", help="only the GGUF exports")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--export", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return
    if args.export:
        print(json.dumps(measure_export(json.loads(args.export))))
        return
    if not args.exports_only:
        run_all(QUICK if args.quick else SETTINGS)
    with tempfile.TemporaryDirectory() as tmp:
        print_exports(run_exports(Path(tmp)))


if __name__ == "__main__":
    main()
