"""Peak memory of a QLoRA run and of a GGUF export, predicted from config.json alone.

Weights and adapters are measured, not modelled: the model is built lazily from its config,
quantized by our quantizer and given the recipe's adapters, so their bytes are the sizes of
the arrays training holds. Activations are counted from what MLX keeps for the backward
pass: an array stays alive until the last operation that reads it has run, and the
gradient of an operation reads only some of its inputs (a frozen ``x @ W.T`` needs ``W``
for ``dx``, not ``x``; ``a * b`` needs both; softmax needs its output). The peak is reached
when the backward pass starts (every kept activation alive, plus the loss's gradient) or, with
large adapters, during the AdamW update. Each term below names the arrays it counts; where
MLX's evaluation order decides what is alive at once, the term says it was measured
(bench/memory_plan.py compares the whole prediction with real steps).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from math import prod
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .adapt import AdapterSpec, apply_adapters
from .config import MoEArgs
from .errors import MlxMoeError
from .info import lazy_model, weight_bytes
from .model import CausalLM
from .recipe import Recipe

# What training computes in: load.default_dtype's choice for each backend.
DEVICE_DTYPE = {"gpu": mx.bfloat16, "cpu": mx.float32}
ANSWER_MULTIPLE = 64  # train.step.answer_positions pads the answer positions to this
# Float32 adapter-sized arrays alive while AdamW updates, beyond the parameters and moments:
# the gradients, their clipped copy and the moments being rewritten (measured on MLX 0.32 with
# adapters 40x larger than the activations: 2.8 copies).
UPDATE_COPIES = 3


@dataclass(frozen=True)
class LineItem:
    name: str
    bytes: int
    detail: str = ""


@dataclass(frozen=True)
class Shape:
    """One micro-batch: ``answer_tokens`` positions get logits (None: every position)."""

    batch: int
    seq_len: int
    answer_tokens: int | None = None

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    @property
    def logit_rows(self) -> int:
        n = self.tokens if self.answer_tokens is None else self.answer_tokens
        return max(ANSWER_MULTIPLE, -(-n // ANSWER_MULTIPLE) * ANSWER_MULTIPLE)


@dataclass
class Activations:
    """Bytes alive when the backward pass starts, by kind, and the largest working set a
    gradient computation adds on top of them."""

    kept: Counter = field(default_factory=Counter)
    working: dict[str, int] = field(default_factory=dict)

    @property
    def peak(self) -> int:
        return sum(self.kept.values()) + max(self.working.values(), default=0)


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


def model_memory(cfg, dtype: mx.Dtype, bits: int, group_size: int, spec: AdapterSpec) -> ModelMemory:
    """Build the model lazily, cast and quantize it as ``mlxmoe info`` does (16-bit floats,
    float32 routers) and attach the adapters; 16-bit arrays are counted at ``dtype``'s size
    (scales and biases follow the weights' dtype)."""
    model = lazy_model(cfg)
    weight_bytes(model, bits or 16, group_size)
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
        model, quantized, unquantized, tuple(dict.fromkeys(kinds)),
        sum(_nbytes(v, dtype) for v in params), sum(v.size for v in params), tuple(adapted),
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
    if path == "embed_tokens":
        return "embeddings"
    if path == "lm_head":
        return "output head"
    if "bias" in module:
        return "biases"
    return name


def _targets_by_layer(adapted: tuple[str, ...]) -> dict[int, set[str]]:
    out: dict[int, set[str]] = {}
    for path in adapted:
        _, index, target = path.split(".", 2)
        out.setdefault(int(index), set()).add(target)
    return out


def activations(model: CausalLM, adapted: tuple[str, ...], shape: Shape, dtype: mx.Dtype,
                rank: int, checkpoint: bool, compiled: bool = True) -> Activations:
    """Arrays the backward pass reads, for the layers at and above the lowest adapted one
    (below it nothing depends on a trainable parameter, so nothing is kept)."""
    args = model.args
    a = dtype.size
    T, D = shape.tokens, args.hidden_size
    by_layer = _targets_by_layer(adapted)
    out = Activations()
    grad = False  # does the residual stream depend on a trainable parameter yet?
    for i, layer in enumerate(model.layers):
        targets = by_layer.get(i, set())
        if not grad and not targets:
            continue
        saved = _layer_kept(args, layer.is_moe, targets, grad, shape, a, rank, compiled)
        if checkpoint:
            # mx.checkpoint keeps the layer's input (and its outputs: the router logits the
            # losses read); the rest is recomputed during this layer's backward.
            out.kept["residual stream"] += T * D * a
            if layer.is_moe:
                out.kept["router logits"] += _router_kept(args, T, compiled, checkpoint=True)
            recompute = sum(saved.values())
        else:
            out.kept.update(saved)
            recompute = 0
        out.working[f"layer {i} backward"] = recompute + _layer_backward_working(
            args, layer.is_moe, shape, a)
        grad = True
    # Final norm's input; logits only at answer positions (train.step), float32 for the
    # loss, kept for the softmax gradient. The loss's backward adds three [N, V] float32
    # arrays (the softmax, the scattered -1 of the target, their sum) and about eight [T, D]
    # ones (the final norm's and the row gather's gradients): measured on MLX 0.32, where
    # the order a graph is evaluated in keeps both sets alive at once.
    out.kept["residual stream"] += T * D * a
    rows, vocab = shape.logit_rows, args.vocab_size
    out.kept["logits"] += rows * vocab * 4
    loss_working = 3 * rows * vocab * 4 + 8 * T * D * a
    if checkpoint:
        # The top layer's recomputed forward is evaluated beside the loss's gradient.
        top = max(out.working.values(), default=0)
        out.working = {"cross-entropy + the largest layer, recomputed": loss_working + top}
    else:
        out.working["cross-entropy backward"] = loss_working
    return out


def _layer_kept(args, is_moe: bool, targets: set[str], grad: bool, shape: Shape, a: int,
                rank: int, compiled: bool) -> Counter:
    """Bytes one decoder layer keeps for the backward pass (see the module docstring)."""
    T, B, L, D = shape.tokens, shape.batch, shape.seq_len, args.hidden_size
    hd = args.head_dim
    q_width, kv_width = args.num_heads * hd, args.num_kv_heads * hd
    kept: Counter = Counter()
    attn = {t.split(".")[1] for t in targets if t.startswith("attn.")}
    kept["LoRA"] += len(attn) * T * rank * a  # x A^T, read by dB
    if grad:
        kept["residual stream"] += T * D * a  # layer input, read by the input norm's gradient
    if attn & {"q_proj", "k_proj", "v_proj"}:
        kept["attention"] += T * D * a  # normed input, read by dA of the q/k/v LoRAs
    if grad or attn & {"q_proj", "k_proj", "v_proj"}:
        if args.qk_norm:
            kept["attention"] += T * (q_width + kv_width) * a  # q, k before their norms
        if args.clip_qkv is not None:
            kept["attention"] += T * (q_width + 2 * kv_width) * a
        # scaled_dot_product_attention in training runs unfused (MLX's fallback, on Metal
        # too): q * scale, k and v feed matmuls, softmax keeps its output [B, H, L, L].
        kept["attention"] += T * (q_width + 2 * kv_width) * a
        kept["attention scores"] += B * args.num_heads * L * L * a
    if "o_proj" in attn:
        kept["attention"] += T * q_width * a  # o_proj's input, read by its dA
    grad = grad or bool(attn)
    if grad:
        kept["residual stream"] += T * D * a  # post-attention residual, read by its norm
    ffn = {t for t in targets if not t.startswith("attn.")}
    if is_moe:
        kept.update(_moe_kept(args, ffn, grad, shape, a, rank, compiled))
    elif grad or ffn:
        inter = args.intermediate_size
        kept["LoRA"] += len(ffn) * T * rank * a
        kept["feed-forward"] += 4 * T * inter * a  # gate, sigmoid(gate), silu(gate), up
        if ffn:
            kept["feed-forward"] += T * D * a
        if "mlp.down_proj" in ffn:
            kept["feed-forward"] += T * inter * a
    return kept


def _router_kept(args: MoEArgs, T: int, compiled: bool, checkpoint: bool = False) -> int:
    """float32 [T, E] arrays: the logits (read by the z-loss's logsumexp) and softmax outputs:
    the router's and the load-balancing loss's (one array when compiled: the same op on the
    same input, merged by mx.compile; only the loss's when the router is checkpointed)."""
    softmaxes = 1 if compiled or checkpoint else 2
    return (1 + softmaxes) * T * args.num_experts * 4


def _moe_kept(args: MoEArgs, ffn: set[str], grad: bool, shape: Shape, a: int, rank: int,
              compiled: bool) -> Counter:
    T, D, k, inter = shape.tokens, args.hidden_size, args.num_experts_per_tok, args.moe_intermediate_size
    rows = T * k
    kept: Counter = Counter()
    router_trained = "moe.router" in ffn
    experts = {t.rsplit(".", 1)[-1] for t in ffn if t.startswith("moe.experts.")}
    shared = {t.rsplit(".", 1)[-1] for t in ffn if t.startswith("moe.shared_expert.")}
    if not (grad or ffn):
        return kept
    if grad or router_trained:
        kept["router logits"] += _router_kept(args, T, compiled)
    if router_trained and (a != 4 or not shared):
        kept["router logits"] += T * D * 4  # the router's float32 input, read by dW / dA
    # Dispatch (nn.moe.SwitchExperts): token rows gathered in expert order [T*k, D], expert
    # outputs gathered back [T*k, D] (read by the routing weights' gradient) and the int32
    # permutations the gathers' gradients scatter with.
    if experts & {"gate_proj", "up_proj"}:
        kept["MoE dispatch"] += rows * D * a
    if grad or router_trained:
        kept["MoE dispatch"] += rows * D * a
    kept["MoE dispatch"] += 4 * rows * 4
    kept["experts"] += 4 * rows * inter * a  # gate, sigmoid(gate), silu(gate), up
    if "down_proj" in experts:
        kept["experts"] += rows * inter * a
    kept["LoRA"] += (len(experts) * rows + len(shared) * T) * rank * a
    if args.shared_expert_intermediate_size:
        s_inter = args.shared_expert_intermediate_size
        kept["feed-forward"] += 4 * T * s_inter * a + T * D * a  # SwiGLU + its output (gated)
        if shared:
            kept["feed-forward"] += T * D * a
        if "down_proj" in shared:
            kept["feed-forward"] += T * s_inter * a
    return kept


def _layer_backward_working(args, is_moe: bool, shape: Shape, a: int) -> int:
    """The largest transient of a layer's backward pass: the attention probabilities'
    gradient and one temporary beside it, or two feed-forward-sized gradients."""
    T, B, L = shape.tokens, shape.batch, shape.seq_len
    attn = 2 * B * args.num_heads * L * L * a
    if is_moe:
        ffn = 2 * T * args.num_experts_per_tok * args.moe_intermediate_size * a
    else:
        ffn = 2 * T * args.intermediate_size * a
    return max(attn, ffn)


@dataclass(frozen=True)
class TrainingPlan:
    """The arrays alive at the peak of a training step, by line."""

    memory: ModelMemory
    shape: Shape
    bits: int
    group_size: int
    checkpoint: bool
    dtype: mx.Dtype
    items: tuple[LineItem, ...]
    phase: str  # when the peak is reached

    @property
    def peak(self) -> int:
        return sum(item.bytes for item in self.items)


def plan_training(cfg, recipe: Recipe, device: str = "gpu", answer_tokens: int | None = None,
                  memory: ModelMemory | None = None) -> TrainingPlan:
    """Peak memory of one training step of ``recipe`` on the model ``cfg`` describes.
    ``answer_tokens`` (per micro-batch) defaults to every position: the worst case."""
    t = recipe.train
    dtype = DEVICE_DTYPE[device]
    if memory is None:
        memory = model_memory(cfg, dtype, t.quantize, t.group_size, recipe.lora)
    shape = Shape(t.batch_size, t.max_seq_len, answer_tokens)
    acts = activations(memory.model, memory.adapted, shape, dtype, recipe.lora.rank,
                       t.grad_checkpoint, t.compile)
    bits = f"{t.quantize}-bit, group {t.group_size}" if t.quantize else "not quantized"
    static = [
        LineItem("base weights (quantized)", memory.quantized, bits) if memory.quantized else None,
        LineItem("base weights (unquantized)", memory.unquantized, ", ".join(memory.unquantized_kinds)),
        LineItem("LoRA parameters", memory.adapters,
                 f"{memory.trainable:,} float32 in {len(memory.adapted)} modules"),
        LineItem("AdamW state", 2 * memory.adapters, "first and second moments, float32"),
    ]
    static = [item for item in static if item is not None]
    # Gradients of the micro-batches accumulated so far are held through the next backward.
    held_grads = memory.adapters if t.grad_accum > 1 else 0
    backward = [LineItem(f"activations: {kind}", size)
                for kind, size in acts.kept.most_common() if size]
    name, working = max(acts.working.items(), key=lambda kv: kv[1])
    backward.append(LineItem("backward working set", working, name))
    backward.append(LineItem("LoRA gradients", memory.adapters + held_grads,
                             "float32, this micro-batch's and the accumulated sum" if held_grads
                             else "float32"))
    update = [LineItem("optimizer update", UPDATE_COPIES * memory.adapters,
                       f"{UPDATE_COPIES} float32 copies of the adapters: gradients, clipped "
                       "gradients, new moments")]
    phases = {"backward pass": backward, "optimizer update": update}
    phase = max(phases, key=lambda p: sum(i.bytes for i in phases[p]))
    return TrainingPlan(memory, shape, t.quantize, t.group_size, t.grad_checkpoint, dtype,
                        tuple(static + phases[phase]), phase)


# Peak temporaries of encoding one float32 tensor, as a multiple of its size: tracemalloc
# over gguf-py's quantizers and ours (kquants) on a 2048 x 4096 tensor; q4_k_m mixes Q4_K
# and Q6_K, the larger is taken.
ENCODE_WORKING = {"f32": 1.0, "f16": 0.5, "bf16": 2.07, "q8_0": 1.57, "q4_0": 1.30, "q4_k_m": 1.69}
DEFAULT_SHARD = 5 * 10**9  # transformers' default max_shard_size, for a config without weights


@dataclass(frozen=True)
class ExportPlan:
    file_type: str
    items: tuple[LineItem, ...]

    @property
    def peak(self) -> int:
        return sum(item.bytes for item in self.items)


def plan_export(cfg, file_type: str, memory: ModelMemory | None = None,
                shard_bytes: int | None = None) -> ExportPlan:
    """Peak of ``export_gguf``, which streams one tensor at a time (mlxmoe/gguf/export.py):
    the adapter (read whole, float32), the arrays read so far from the current safetensors
    file (merge.MergedWeights keeps that file's loaded arrays) and the largest tensor's
    working set in float32: read and stacked (2x), merged (base, B @ A and its scaled copy:
    3x) or encoded (1x plus the encoder's temporaries)."""
    if file_type not in ENCODE_WORKING:
        raise MlxMoeError(f"GGUF type {file_type!r} is unknown (choose from: {', '.join(ENCODE_WORKING)})")
    model = lazy_model(cfg)
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
    shard = shard_bytes or min(2 * sum(prod(s) for s in shapes.values()), DEFAULT_SHARD)
    items = [LineItem("one checkpoint shard" + ("" if shard_bytes else " (5 GB assumed)"), shard,
                      "the loaded arrays of the file being read")]
    if memory is not None:
        items.append(LineItem("adapter", memory.adapters, "read whole, float32"))
    if 3 * merged[1] > copies * largest:
        items.append(LineItem(f"largest merged tensor ({merged[0]})", 3 * merged[1],
                              f"3 x {merged[1] / 2**20:.0f} MiB in float32: base, B @ A, scaled"))
    else:
        items.append(LineItem(f"largest tensor ({name})", int(copies * largest),
                              f"{copies:g} x {largest / 2**20:.0f} MiB in float32"))
    return ExportPlan(file_type, tuple(items))


def shard_bytes_of(path: str | Path) -> int | None:
    """The largest *.safetensors file of a checkpoint folder, or None without weights."""
    folder = Path(path)
    if folder.is_file():
        folder = folder.parent
    sizes = [f.stat().st_size for f in folder.glob("*.safetensors")] if folder.is_dir() else []
    return max(sizes, default=None)
