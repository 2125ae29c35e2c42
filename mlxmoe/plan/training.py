"""Peak memory of a QLoRA run and of a GGUF export, predicted from config.json alone.

Weights and adapters are measured, not modelled: the model is built lazily from its config,
quantized by our quantizer and given the recipe's adapters, so their bytes are the sizes of
the arrays training holds. Activations are counted from what MLX keeps for the backward
pass: an array stays alive until the last operation that reads it has run, and the
gradient of an operation reads only some of its inputs (a frozen ``x @ W.T`` needs ``W``
for ``dx``, not ``x``; ``a * b`` needs both; softmax needs its output). The peak is reached
when the backward pass starts (every kept activation alive, plus the loss's gradient) or, with
large adapters, during the AdamW update. Each term (mlxmoe/plan/activations.py) names the
arrays it counts; where MLX's evaluation order decides what is alive at once, the term says
it was measured (bench/memory_plan.py compares the whole prediction with real steps).
Activations are in the recipe's ``train.dtype`` on the planned device; routing, LoRA
parameters and the loss's logits are float32 whatever it is, and MLX's CPU backend keeps
float32 copies in a 16-bit model (norm inputs, gather_mm operands, unquantized experts).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from math import prod
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from ..adapt import AdapterSpec, apply_adapters
from ..blas import choose_library
from ..config import MoEArgs
from ..dtypes import resolve_dtype
from ..errors import MlxMoeError
from ..families import family_for
from ..info import lazy_model, weight_bytes
from ..model import CausalLM
from ..nn.moe import choose_dispatch
from ..quantize import Quantization
from ..recipe import Recipe, TrainConfig
from .activations import Shape, activations

# Float32 adapter-sized arrays alive while AdamW updates, beyond the parameters and moments:
# the gradients, their clipped copy and the moments being rewritten (measured: bench/README.md).
UPDATE_COPIES = 3


@dataclass(frozen=True)
class LineItem:
    name: str
    bytes: int
    detail: str = ""


@dataclass(frozen=True)
class ModelMemory:
    """What the recipe's model holds before the first step."""

    model: CausalLM  # lazy: nothing allocated
    quantized: int  # packed weights, scales and biases of quantized layers
    unquantized: int
    unquantized_kinds: tuple[str, ...]
    adapters: int  # trainable parameters' bytes
    trainable: int  # trainable parameter count
    adapted: tuple[str, ...]  # module paths, ``layers.N.<target>``


def model_memory(cfg, dtype: mx.Dtype, scheme: Any, group_size: int, spec: AdapterSpec) -> ModelMemory:
    """Build the model lazily, cast and quantize it as ``mlxmoe info`` does (16-bit floats,
    float32 routers; ``scheme`` as ``quantize.quantization`` reads it) and attach the
    adapters; 16-bit arrays are counted at ``dtype``'s size (scales and biases follow the
    weights' dtype)."""
    model = lazy_model(cfg)
    weight_bytes(model, scheme, group_size)
    quantized = unquantized = 0
    kinds: list[str] = []
    for path, module in model.named_modules():
        own = {k: v for k, v in module.items() if isinstance(v, mx.array)}
        size = sum(_nbytes(v, dtype) for v in own.values())
        if "scales" in own:
            quantized += size
        elif own:
            unquantized += size
            kinds.append(_kind(path, module))
    adapted = apply_adapters(model, spec)
    params = [v for _, v in tree_flatten(model.trainable_parameters())]
    return ModelMemory(
        model,
        quantized,
        unquantized,
        tuple(dict.fromkeys(kinds)),
        sum(_nbytes(v, dtype) for v in params),
        sum(v.size for v in params),
        tuple(adapted),
    )


def _nbytes(v: mx.array, dtype: mx.Dtype) -> int:
    return prod(v.shape) * (dtype.size if v.dtype == mx.bfloat16 else v.dtype.size)


def _kind(path: str, module) -> str:
    name = path.rsplit(".", 1)[-1]
    if "norm" in name:
        return "norms"
    if name == "router":
        return "routers (float32)"
    if name == "shared_expert_gate":
        return "shared-expert gates"
    if name.isdigit():  # a decoder layer's own array: Gemma-4's layer_scalar
        return "layer scalars"
    if name == "moe":  # Gemma-4's router input scale and per-expert scale
        return "router scales (float32)"
    if name == "rope":
        return "rotary frequencies"
    if path == "embed_tokens":
        return "embeddings"
    if path == "lm_head":
        return "output head"
    if "bias" in module:
        return "biases"
    return name


def fast_cpu_blas() -> bool:
    """Would ``mlxmoe train`` on this machine run MLX's CPU backend with a fast BLAS?"""
    return sys.platform.startswith("linux") and choose_library() is not None


def planned_dispatch(args, train: TrainConfig, device: str) -> str:
    """The MoE dispatch ``nn.moe.set_dispatch`` will choose for ``train.moe_dispatch`` when
    the run trains on ``device``, assuming it is this machine: ``auto`` is gather except on
    MLX's CPU backend with a fast BLAS (on Linux, the library ``mlxmoe train`` preloads):
    dense there for float32 experts whose size and E/k ``nn.moe.dense_pays`` accepts, else
    grouped."""
    moe = isinstance(args, MoEArgs) and bool(args.moe_layers)
    try:
        choice = choose_dispatch(
            train.moe_dispatch,
            args.num_experts if moe else 1,
            args.num_experts_per_tok if moe else 1,
            float_experts=not train.quantization.bits_for("ffn_up_exps") or not moe,
            fast_cpu=device == "cpu" and fast_cpu_blas(),
            expert_values=args.hidden_size * args.moe_intermediate_size if moe else 0,
            float32=resolve_dtype(train.dtype, device) == mx.float32,
        )
    except ValueError as exc:
        raise MlxMoeError(f"train.moe_dispatch: {exc}") from exc
    return choice if moe else "gather"


DISPATCH_DETAIL = {
    "gather": "gather dispatch: each token's k experts",
    "dense": "dense dispatch: every expert on every token",
    "grouped": "grouped dispatch: each expert's rows in blocks of one expert",
}


@dataclass(frozen=True)
class TrainingPlan:
    """The arrays alive at the peak of a training step, by line."""

    memory: ModelMemory
    shape: Shape
    quantization: Quantization
    checkpoint: bool
    dtype: mx.Dtype
    items: tuple[LineItem, ...]
    phase: str  # when the peak is reached
    dispatch: str = "gather"  # how the MoE layers run their experts (nn.moe.set_dispatch)

    @property
    def peak(self) -> int:
        return sum(item.bytes for item in self.items)


def plan_training(
    cfg,
    recipe: Recipe,
    device: str = "gpu",
    answer_tokens: int | None = None,
    memory: ModelMemory | None = None,
) -> TrainingPlan:
    """Peak memory of one training step of ``recipe`` on the model ``cfg`` describes.
    ``answer_tokens`` (per micro-batch) defaults to every position: the worst case."""
    t = recipe.train
    dtype = resolve_dtype(t.dtype, device)
    if memory is None:
        memory = model_memory(cfg, dtype, t.quantization, t.group_size, recipe.lora)
    dispatch = planned_dispatch(memory.model.args, t, device)
    shape = Shape(t.batch_size, t.max_seq_len, answer_tokens)
    acts = activations(
        memory.model,
        memory.adapted,
        shape,
        dtype,
        recipe.lora.rank,
        t.grad_checkpoint,
        t.compile,
        dispatch,
        device,
    )
    bits = str(t.quantization)
    if t.quantization and getattr(memory.model, "mxfp4", False):
        bits += "; experts MXFP4 as published"
    static = [
        LineItem("base weights (quantized)", memory.quantized, bits) if memory.quantized else None,
        LineItem("base weights (unquantized)", memory.unquantized, ", ".join(memory.unquantized_kinds)),
        LineItem(
            "LoRA parameters",
            memory.adapters,
            f"{memory.trainable:,} float32 in {len(memory.adapted)} modules",
        ),
        LineItem("AdamW state", 2 * memory.adapters, "first and second moments, float32"),
    ]
    static = [item for item in static if item is not None]
    # Gradients of the micro-batches accumulated so far are held through the next backward.
    held_grads = memory.adapters if t.grad_accum > 1 else 0
    details = {
        "MoE dispatch": DISPATCH_DETAIL[dispatch],
        "float experts, float32 copies": "unquantized experts, cast for the CPU's gather_mm",
    }
    backward = [
        LineItem(f"activations: {kind}", size, details.get(kind, ""))
        for kind, size in acts.kept.most_common()
        if size
    ]
    name, working = max(acts.working.items(), key=lambda kv: kv[1])
    backward.append(LineItem("backward working set", working, name))
    backward.append(
        LineItem(
            "LoRA gradients",
            memory.adapters + held_grads,
            "float32, this micro-batch's and the accumulated sum" if held_grads else "float32",
        )
    )
    update = [
        LineItem(
            "optimizer update",
            UPDATE_COPIES * memory.adapters,
            f"{UPDATE_COPIES} float32 copies of the adapters: gradients, clipped gradients, new moments",
        )
    ]
    phases = {"backward pass": backward, "optimizer update": update}
    phase = max(phases, key=lambda p: sum(i.bytes for i in phases[p]))
    return TrainingPlan(
        memory,
        shape,
        t.quantization,
        t.grad_checkpoint,
        dtype,
        tuple(static + phases[phase]),
        phase,
        dispatch,
    )


# The encoded tensor over its float32 bytes (gguf/blocks.py encodes in chunks of a few MiB);
# q4_k_m mixes Q4_K and Q6_K, mxfp4 MXFP4 experts and f16 for the rest: the larger is taken.
ENCODE_WORKING = {
    "f32": 1.0,
    "f16": 0.5,
    "bf16": 0.5,
    "q8_0": 34 / 128,
    "q4_0": 18 / 128,
    "q4_k_m": 210 / 1024,
    "mxfp4": 0.5,
}


@dataclass(frozen=True)
class ExportPlan:
    file_type: str
    items: tuple[LineItem, ...]

    @property
    def peak(self) -> int:
        return sum(item.bytes for item in self.items)


def plan_export(cfg, file_type: str, memory: ModelMemory | None = None) -> ExportPlan:
    """Peak of ``export_gguf``, which streams one tensor at a time (mlxmoe/gguf/export.py,
    merge.MergedWeights reads each tensor from its safetensors file and keeps nothing): the
    adapter (read whole, float32) and the largest tensor's working set in float32: read and
    stacked (2x), merged (base, B @ A and its scaled copy: 3x) or encoded (1x plus the
    encoder's temporaries)."""
    if file_type not in ENCODE_WORKING:
        raise MlxMoeError(f"GGUF type {file_type!r} is unknown (choose from: {', '.join(ENCODE_WORKING)})")
    model = lazy_model(cfg)
    family = family_for(cfg.raw.get("model_type"), cfg.source)
    if file_type == "mxfp4" and not family.mxfp4_experts:  # as export_gguf refuses it
        raise MlxMoeError(
            f"GGUF type mxfp4 is for gpt-oss's experts; {family.name} is exported as f16, q8_0 or q4_k_m"
        )
    shapes = {k: v.shape for k, v in tree_flatten(model.parameters())}
    name = max(shapes, key=lambda k: prod(shapes[k]))
    largest = prod(shapes[name]) * 4
    copies = max(2.0, 1.0 + ENCODE_WORKING[file_type])
    merged = ("", 0)
    if memory is not None:  # the largest tensor an adapter changes
        adapted = [k for k in shapes if k.rsplit(".", 1)[0] in memory.adapted]
        if adapted:
            top = max(adapted, key=lambda k: prod(shapes[k]))
            merged = (top, prod(shapes[top]) * 4)
    items = []
    if memory is not None:
        items.append(LineItem("adapter", memory.adapters, "read whole, float32"))
    if 3 * merged[1] > copies * largest:
        items.append(
            LineItem(
                f"largest merged tensor ({merged[0]})",
                3 * merged[1],
                f"3 x {merged[1] / 2**20:.0f} MiB in float32: base, B @ A, scaled",
            )
        )
    else:
        items.append(
            LineItem(
                f"largest tensor ({name})",
                int(copies * largest),
                f"{copies:g} x {largest / 2**20:.0f} MiB in float32",
            )
        )
    return ExportPlan(file_type, tuple(items))
