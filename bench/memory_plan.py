"""Predicted against measured peak memory of real training steps (issue 6, part 2; issue 16).

Each setting runs in a fresh process (tests/step_memory.py, shared with the tests): a model
built from a config (random weights, cast and quantized as ``mlxmoe.load`` does), the
recipe's adapters, mlxmoe's own ``Stepper`` and AdamW, and one optimizer step on a
[batch, seq_len] micro-batch of answer tokens. Measured are ``mx.get_peak_memory()`` over
that step and the rise of the process's peak RSS above its RSS before the model was built
(Linux: VmHWM, reset through /proc/self/clear_refs). The prediction is
``mlxmoe.plan.training.plan_training`` for the same recipe on the backend the step ran on.

Two profiles: the model's default dtype on this backend (float32 on MLX's CPU), and the
Mac's (bfloat16 activations over a 4-bit base, float32 LoRA and routing) run on the CPU,
with group sizes that divide every width and ones that leave some matrices float.

    .venv/bin/python bench/memory_plan.py                # every setting (~30 min on 2 busy cores)
    .venv/bin/python bench/memory_plan.py --quick        # the tiny ones
    .venv/bin/python bench/memory_plan.py --profile mac  # the Mac profile only

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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # shared helpers
from step_memory import LINEAR, measure_fresh, predict, setting  # noqa: E402

TINY = dict(
    model_type="qwen3_moe",
    vocab_size=2048,
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    intermediate_size=256,
    moe_intermediate_size=128,
    num_experts=8,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    rope_theta=1e6,
    tie_word_embeddings=False,
)
SMALL = dict(
    model_type="mixtral",
    vocab_size=16000,
    hidden_size=512,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    intermediate_size=1024,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_theta=1e6,
    tie_word_embeddings=False,
)
SMALL_SHARED = dict(
    model_type="qwen2_moe",
    vocab_size=16384,
    hidden_size=384,
    num_hidden_layers=6,
    num_attention_heads=6,
    num_key_value_heads=6,
    intermediate_size=1024,
    moe_intermediate_size=256,
    shared_expert_intermediate_size=1024,
    num_experts=16,
    num_experts_per_tok=4,
    norm_topk_prob=False,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    rope_theta=1e6,
    tie_word_embeddings=False,
)
OLMOE = dict(
    model_type="olmoe",
    vocab_size=8192,
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=8,
    intermediate_size=256,
    num_experts=16,
    num_experts_per_tok=4,
    norm_topk_prob=False,
    clip_qkv=None,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_theta=1e4,
    tie_word_embeddings=False,
)

SMALL_LINEAR = dict(
    LINEAR,
    vocab_size=16384,
    hidden_size=512,
    num_attention_heads=8,
    head_dim=64,
    linear_num_key_heads=4,
    linear_num_value_heads=8,
    linear_key_head_dim=64,
    linear_value_head_dim=64,
    moe_intermediate_size=256,
    shared_expert_intermediate_size=512,
    num_experts=16,
    num_experts_per_tok=4,
)
TINY_NEXT = dict(LINEAR, model_type="qwen3_next", intermediate_size=256, norm_topk_prob=True)
SMALL_NEXT = dict(SMALL_LINEAR, model_type="qwen3_next", intermediate_size=1024, norm_topk_prob=True)
TINY_QWEN3_5 = dict(model_type="qwen3_5_moe", text_config=LINEAR)
SMALL_QWEN3_5 = dict(model_type="qwen3_5_moe", text_config=SMALL_LINEAR)

QUICK = [
    setting("tiny qwen3", TINY),
    setting("tiny qwen3", TINY, bits=4),
    setting("tiny qwen3", TINY, checkpoint=True),
    setting("tiny qwen3", TINY, batch=4, seq=512, strategy="attention"),
    setting("tiny qwen3", TINY, dispatch="dense"),
    setting("tiny qwen3-next", TINY_NEXT),
    setting("tiny qwen3.5", TINY_QWEN3_5, checkpoint=True),
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
    setting("tiny qwen3-next", TINY_NEXT, bits=4, checkpoint=True),
    setting("tiny qwen3.5", TINY_QWEN3_5, strategy="attention"),
    setting("tiny qwen3-next", TINY_NEXT, strategy="all"),
    setting("small qwen3-next", SMALL_NEXT),
    setting("small qwen3.5", SMALL_QWEN3_5, bits=4),
    setting("small qwen3.5", SMALL_QWEN3_5, checkpoint=True),
]

# Widths a group size does not divide stay float (quantize.should_quantize): the CPU runs such
# experts through gather_mm in float32, a float32 copy of their weights per layer.
TINY_F96 = {**TINY, "moe_intermediate_size": 96}  # group 64: down projections float
SMALL_F960 = {**SMALL, "intermediate_size": 960}  # group 128: down projections float
SHARED_D320 = {
    **SMALL_SHARED,
    "hidden_size": 320,
    "num_attention_heads": 5,
    "num_key_value_heads": 5,
}  # group 128: all but the down projections float
OLMOE_F192 = {**OLMOE, "intermediate_size": 192}  # group 128: down projections float
MAC = dict(bits=4, dtype="bfloat16", device="cpu")
MAC_QUICK = [
    setting("tiny qwen3", TINY, **MAC),
    setting("tiny qwen3 F96", TINY_F96, checkpoint=True, **MAC),
    setting("tiny qwen3", TINY, strategy="all", accum=2, **MAC),
    setting("tiny qwen3.5", TINY_QWEN3_5, **MAC),
]
MAC_PROFILE = MAC_QUICK + [
    setting("small mixtral", SMALL, strategy="attention", **MAC),
    setting("small mixtral F960", SMALL_F960, group=128, **MAC),
    setting("small mixtral", SMALL, batch=2, seq=512, checkpoint=True, **MAC),
    setting("small qwen2-moe", SMALL_SHARED, strategy="shared", **MAC),
    setting("small qwen2-moe", SMALL_SHARED, strategy="shared", checkpoint=True, **MAC),
    setting("qwen2-moe D320", SHARED_D320, group=128, strategy="experts+router", **MAC),
    setting("qwen2-moe D320", SHARED_D320, group=128, checkpoint=True, **MAC),
    setting("small olmoe", OLMOE, batch=2, seq=512, strategy="experts+router", **MAC),
    setting("olmoe F192", OLMOE_F192, group=128, checkpoint=True, **MAC),
    setting("tiny qwen3-next", TINY_NEXT, checkpoint=True, **MAC),
    setting("tiny qwen3.5", TINY_QWEN3_5, checkpoint=True, **MAC),
    setting("small qwen3-next", SMALL_NEXT, **MAC),
    setting("small qwen3.5", SMALL_QWEN3_5, checkpoint=True, **MAC),
    setting("small qwen3.5", SMALL_QWEN3_5, strategy="shared", **MAC),
]


def run_all(settings: list[dict]) -> list[dict]:
    from mlxmoe.dtypes import dtype_name

    rows = []
    print_header()
    for s in settings:
        try:
            measured = measure_fresh(s)
        except RuntimeError as exc:
            raise SystemExit(str(exc)) from exc
        plan = predict(s)
        rows.append(
            {**s, **measured, "predicted": plan.peak, "phase": plan.phase, "dtype": dtype_name(plan.dtype)}
        )
        print_row(rows[-1])
    worst = max(abs(r["predicted"] / r["mlx_peak"] - 1) for r in rows)
    print(f"\nlargest deviation from mx.get_peak_memory: {100 * worst:.1f}%")
    return rows


EXPORT_MODEL = dict(
    hidden_size=512,
    intermediate_size=2048,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=4,
    num_local_experts=8,
)
EXPORTS = [("f16", False), ("q8_0", False), ("q8_0", True), ("q4_k_m", True)]


def make_export_model(root: Path) -> Path:
    """A float32 Mixtral-layout checkpoint with Mixtral's tokenizer, and a rank-8 adapter."""
    import mlx.core as mx
    from assets import mixtral_tokenizer_folder
    from tiny_models import make_hf_model, save

    from mlxmoe import load
    from mlxmoe.adapt import AdapterSpec, apply_adapters
    from mlxmoe.adapt.files import adapter_config, save_adapters

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
    import mlx.core as mx

    from mlxmoe.adapt import AdapterSpec
    from mlxmoe.info import read_config
    from mlxmoe.plan.training import model_memory, plan_export

    folder = make_export_model(root)
    cfg = read_config(folder)
    memory = model_memory(cfg, mx.float32, 0, 64, AdapterSpec())
    rows = []
    for file_type, with_adapter in EXPORTS:
        job = {
            "model": str(folder),
            "out": str(root / f"{file_type}.gguf"),
            "type": file_type,
            "adapter": str(root / "adapter") if with_adapter else None,
        }
        out = subprocess.run(
            [sys.executable, __file__, "--export", json.dumps(job)],
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode:
            raise SystemExit(f"export {file_type}: failed\n{out.stderr[-2000:]}")
        measured = json.loads(out.stdout.strip().splitlines()[-1])
        plan = plan_export(cfg, file_type, memory if with_adapter else None)
        rows.append({"type": file_type, "adapter": with_adapter, "predicted": plan.peak, **measured})
    return rows


def print_exports(rows: list[dict]) -> None:
    """Export reads and encodes with numpy (tracemalloc sees it); MLX only merges."""
    mib = MiB
    print(
        f"\n{'GGUF type':<10} {'adapter':<8} {'predicted':>10} {'numpy peak':>11} {'ratio':>6} {'mx peak':>9}"
    )
    for r in rows:
        print(
            f"{r['type']:<10} {'yes' if r['adapter'] else 'no':<8} {r['predicted'] / mib:>8.1f}Mi "
            f"{r['numpy_peak'] / mib:>9.1f}Mi {r['predicted'] / r['numpy_peak']:>6.3f} "
            f"{r['mlx_peak'] / mib:>7.1f}Mi"
        )


MiB = 2**20
HEADER = (
    f"{'model':<18} {'dtype':<8} {'bits':>4} {'group':>5} {'batch x seq':>11} {'ckpt':>4} "
    f"{'strategy':<15} {'accum':>5} {'dispatch':<8} "
    f"{'predicted':>10} {'mx peak':>10} {'ratio':>6} {'RSS rise':>10} {'ratio':>6}  phase"
)


def print_header() -> None:
    print(HEADER)
    print("-" * len(HEADER), flush=True)


def print_row(r: dict) -> None:
    rss = (
        f"{r['rss_rise'] / MiB:>8.1f}Mi {r['predicted'] / r['rss_rise']:>6.3f}"
        if r["rss_rise"]
        else f"{'-':>10} {'-':>6}"
    )
    print(
        f"{r['name']:<18} {r['dtype']:<8} {r['bits']:>4} {r['group']:>5} "
        f"{str(r['batch']) + ' x ' + str(r['seq']):>11} "
        f"{'on' if r['checkpoint'] else 'off':>4} {r['strategy']:<15} {r['accum']:>5} "
        f"{r['dispatch']:<8} {r['predicted'] / MiB:>8.1f}Mi {r['mlx_peak'] / MiB:>8.1f}Mi "
        f"{r['predicted'] / r['mlx_peak']:>6.3f} {rss}  {r['phase']}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the tiny settings")
    parser.add_argument(
        "--profile",
        choices=("both", "float32", "mac"),
        default="both",
        help="float32: this backend's default dtype; mac: bfloat16 over 4 bits",
    )
    parser.add_argument("--exports-only", action="store_true", help="only the GGUF exports")
    parser.add_argument("--export", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.export:
        print(json.dumps(measure_export(json.loads(args.export))))
        return
    if not args.exports_only:
        settings = {
            "float32": QUICK if args.quick else SETTINGS,
            "mac": MAC_QUICK if args.quick else MAC_PROFILE,
        }
        for profile, chosen in settings.items():
            if args.profile in (profile, "both"):
                print(f"\n{profile} profile")
                run_all(chosen)
    if args.profile != "mac":
        with tempfile.TemporaryDirectory() as tmp:
            print_exports(run_exports(Path(tmp)))


if __name__ == "__main__":
    main()
