"""Peak memory of one real training step, for comparing with ``mlxmoe.plan.training.plan_training``.

A setting is a plain dict (JSON, so that a fresh process can measure it): a config.json
dict and the recipe values that change memory. ``measure_fresh`` runs ``measure`` in a new
Python process: a model built from the config (random weights, cast and quantized as
``mlxmoe.load`` does), the recipe's adapters, mlxmoe's own ``Stepper`` and AdamW, and one
optimizer step on [batch, seq_len] micro-batches of answer tokens. Measured are
``mx.get_peak_memory()`` over that step and, on Linux, the rise of the process's peak RSS
above its RSS before the model was built (VmHWM, reset through /proc/self/clear_refs).
Used by bench/memory_plan.py and tests/test_plan_bfloat16.py.

    python tests/step_memory.py '{"config": {...}, "bits": 4, ...}'   # prints the JSON result
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CLEAR_REFS = Path("/proc/self/clear_refs")


def setting(
    name,
    config,
    bits=0,
    batch=2,
    seq=256,
    checkpoint=False,
    strategy="experts",
    accum=1,
    rank=8,
    dispatch="gather",
    dtype="auto",
    group=64,
    device=None,
) -> dict:
    """``dispatch`` is named (never auto) so that the measured process, whatever BLAS it
    loaded, and the prediction assume the same MoE dispatch. ``device`` "cpu" measures on
    MLX's CPU backend even where a GPU is the default (None: the default device)."""
    return dict(
        name=name,
        config=config,
        bits=bits,
        batch=batch,
        seq=seq,
        checkpoint=checkpoint,
        strategy=strategy,
        accum=accum,
        rank=rank,
        dispatch=dispatch,
        dtype=dtype,
        group=group,
        device=device,
    )


def recipe_for(s: dict):
    from mlxmoe.recipe import load_recipe

    return load_recipe(
        None,
        lora={"strategy": s["strategy"], "rank": s["rank"]},
        train={
            "quantize": s["bits"],
            "group_size": s["group"],
            "batch_size": s["batch"],
            "max_seq_len": s["seq"],
            "grad_checkpoint": s["checkpoint"],
            "grad_accum": s["accum"],
            "moe_dispatch": s["dispatch"],
            "dtype": s["dtype"],
        },
    )


def device_of(s: dict) -> str:
    """The backend the setting trains on: "cpu" or "gpu"."""
    import mlx.core as mx

    return s.get("device") or ("cpu" if mx.default_device() == mx.cpu else "gpu")


def predict(s: dict):
    """``mlxmoe.plan.training.plan_training`` for the setting, on the device it is measured on."""
    from mlxmoe.config import ConfigView
    from mlxmoe.plan.training import plan_training

    return plan_training(ConfigView(s["config"]), recipe_for(s), device_of(s))


def _rss_now_and_peak() -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return (int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024)


def prepared_step(s: dict, compiled: bool | None = None):
    """(model, Stepper, micro-batches) of one training step of setting ``s``, built as
    ``mlxmoe train`` builds them: a model from the config (random weights, cast and quantized
    as ``mlxmoe.load`` does), the recipe's adapters and dispatch, AdamW; ``compiled``
    overrides the recipe's train.compile."""
    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np
    from mlx.utils import tree_flatten, tree_unflatten

    from mlxmoe.adapt import apply_adapters
    from mlxmoe.checkpoint import role_is_router
    from mlxmoe.config import ConfigView
    from mlxmoe.data import Batch
    from mlxmoe.dtypes import resolve_dtype
    from mlxmoe.info import lazy_model
    from mlxmoe.nn.moe import set_dispatch
    from mlxmoe.quantize import quantize_model
    from mlxmoe.train.step import Stepper

    recipe = recipe_for(s)
    t = recipe.train
    mx.random.seed(0)
    model = lazy_model(ConfigView(s["config"]))
    dtype = resolve_dtype(t.dtype)
    model.update(
        tree_unflatten(
            [
                (k, v.astype(mx.float32 if role_is_router(k) else dtype))
                for k, v in tree_flatten(model.parameters())
            ]
        )
    )
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
    stepper = Stepper(model, optimizer, recipe.loss, t.grad_clip, t.compile if compiled is None else compiled)
    rng = np.random.default_rng(0)
    shape = (t.batch_size, t.max_seq_len)
    vocab = model.args.vocab_size  # Qwen3.5's sits in text_config
    batches = [
        Batch(
            mx.array(rng.integers(0, vocab, shape, dtype=np.int32)),
            mx.array(rng.integers(0, vocab, shape, dtype=np.int32)),
            mx.ones(shape),
            mx.ones(shape),
            shape[0] * shape[1],
            shape[0] * shape[1],
        )
        for _ in range(t.grad_accum)
    ]
    mx.eval([(b.inputs, b.targets, b.loss_mask, b.token_mask) for b in batches])
    return model, stepper, batches


def measure(s: dict) -> dict:
    """Peak memory of one real training step, in this process (a fresh one: see
    ``measure_fresh``)."""
    import mlx.core as mx

    if s.get("device") == "cpu":
        mx.set_default_device(mx.cpu)
    rss = CLEAR_REFS.exists()
    if rss:
        CLEAR_REFS.write_text("5")  # VmHWM := VmRSS
        rss_before, _ = _rss_now_and_peak()
    _, stepper, batches = prepared_step(s)
    mx.reset_peak_memory()
    stepper.step(batches)  # the first step (compiled, optimizer state written) peaks as later ones
    out = {"mlx_peak": mx.get_peak_memory(), "rss_rise": None}
    if rss:
        out["rss_rise"] = _rss_now_and_peak()[1] - rss_before
    return out


def measure_fresh(s: dict) -> dict:
    """``measure`` in a new process: nothing an earlier step cached counts."""
    out = subprocess.run(
        [sys.executable, __file__, json.dumps(s)], capture_output=True, text=True, check=False
    )
    if out.returncode:
        raise RuntimeError(f"{s['name']}: measurement failed\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))


# Qwen3-Next and Qwen3.5-MoE: Gated DeltaNet in three layers of four, gated attention in the
# fourth (the last), routed experts and a shared expert (bench/memory_plan.py and the tests)
LINEAR = dict(
    vocab_size=2048,
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    rope_theta=1e6,
    tie_word_embeddings=False,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=32,
    linear_value_head_dim=32,
    moe_intermediate_size=128,
    shared_expert_intermediate_size=128,
    num_experts=8,
    num_experts_per_tok=2,
    full_attention_interval=4,
)
