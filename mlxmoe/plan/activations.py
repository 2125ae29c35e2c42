"""What one micro-batch's forward pass keeps for the backward pass, and the backward's largest
transient, counted from the shapes of the arrays MLX keeps (see mlxmoe/plan/training.py)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import mlx.core as mx

from ..config import MoEArgs
from ..losses import ce_chunk_rows
from ..model import CausalLM
from ..nn.gemma4_block import Gemma4Args
from ..nn.grouped import padded_rows
from ..nn.moe import DENSE_MIN_PAIRS
from .mixers import MAKE_QKV, READ_THE_INPUT, Shape, latent_kept, linear_attention_kept, pow2_at_least

# [chunk, V] arrays (in the model's dtype) the soft-capped head adds to each loss chunk
# (measured, Gemma-4)
SOFTCAP_ARRAYS = 1
# [T, F] arrays a gelu_approx(gate) * up block keeps (measured, Gemma-4's MLP and experts)
GELU_ARRAYS = 6


@dataclass
class Activations:
    """Bytes alive when the backward pass starts, by kind, and the largest working set a
    gradient computation adds on top of them."""

    kept: Counter = field(default_factory=Counter)
    working: dict[str, int] = field(default_factory=dict)

    @property
    def peak(self) -> int:
        return sum(self.kept.values()) + max(self.working.values(), default=0)


def _targets_by_layer(adapted: tuple[str, ...]) -> dict[int, set[str]]:
    out: dict[int, set[str]] = {}
    for path in adapted:
        _, index, target = path.split(".", 2)
        out.setdefault(int(index), set()).add(target)
    return out


def activations(
    model: CausalLM,
    adapted: tuple[str, ...],
    shape: Shape,
    dtype: mx.Dtype,
    rank: int,
    checkpoint: bool,
    compiled: bool = True,
    dispatch: str = "gather",
    device: str = "gpu",
) -> Activations:
    """Arrays the backward pass reads, for the layers at and above the lowest adapted one
    (below it nothing depends on a trainable parameter, so nothing is kept). ``dispatch``
    is how the MoE layers run their experts (nn.moe.set_dispatch); ``model`` is quantized
    as training will be (its float expert matrices are the ones gather_mm runs).

    Arrays are ``dtype`` wide (``a`` bytes a value) except where they are float32 whatever
    the dtype: routing, the loss's logits, and, on MLX's CPU backend (``device`` "cpu"),
    ``f``: the inputs of RMSNorm (its CPU fallback normalizes a float32 copy and its
    gradient reads it) and both operands of gather_mm (dtypes.gather_dtype: float32-only
    on the CPU), so a 16-bit model keeps float32 copies where a GPU keeps 16-bit arrays."""
    args = model.args
    a = dtype.size
    f = 4 if device == "cpu" else a
    T, D = shape.tokens, args.hidden_size
    if isinstance(args, MoEArgs) and T * args.num_experts_per_tok < DENSE_MIN_PAIRS:
        dispatch = "gather"  # SparseMoE falls back to gather for so few (token, expert) pairs
    by_layer = _targets_by_layer(adapted)
    out = Activations()
    grad = False  # does the residual stream depend on a trainable parameter yet?
    for i, layer in enumerate(model.layers):
        targets = by_layer.get(i, set())
        if not grad and not targets:
            continue
        kept_by = _gemma4_layer_kept if isinstance(args, Gemma4Args) else _layer_kept
        saved = kept_by(args, i, layer, targets, grad, shape, (a, f), rank, compiled, dispatch)
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
            args, layer, targets, shape, (a, f), dispatch
        )
        grad = True
    # Final norm's input. Logits only at answer positions (train.step), and in chunks
    # (losses.linear_cross_entropy): what stays is the hidden-state gradient of the answer
    # rows, in the model's dtype. The working set, measured on MLX 0.32: 4 float32
    # [chunk, V] arrays a chunk (logits, exp, their gradient before and after the target's
    # correction), plus in a 16-bit model 2 16-bit ones (the head's logits and the gradient
    # cast back); the chunks overlap: 1 or 2 chunks all alive, ~2.5 chunks' worth with more
    # (10.0 float32 arrays at 256-1024 x 32000 and 512 x 152064, 12.5-14 float32-sized in
    # bfloat16 at 512-4096 rows x 2048-32000); plus about eight [T, D] arrays (the final
    # norm's and the row gather's gradients, float32 on the CPU).
    out.kept["residual stream"] += T * D * f
    rows, vocab = shape.logit_rows, args.vocab_size
    out.kept["answer rows (loss gradient)"] += rows * D * a
    chunk_rows = ce_chunk_rows(vocab)
    chunks = -(-rows // chunk_rows)
    in_flight = chunks if chunks <= 2 else 2.5
    chunk_bytes = min(rows, chunk_rows) * vocab * (4 * 4 + (2 * a if a < 4 else 0))
    if getattr(args, "final_logit_softcapping", None):  # Gemma-4: cap * tanh(logits / cap)
        chunk_bytes += min(rows, chunk_rows) * vocab * SOFTCAP_ARRAYS * a
    loss_working = int(in_flight * chunk_bytes) + 8 * T * D * f
    if checkpoint:
        # MLX evaluates the chunked loss beside the top layer's recomputation (measured: the
        # larger of the two under-predicts by 25-33%) when the routed experts are adapted
        # and the router is not; with the router trained, or only attention or the shared
        # expert adapted, bench/memory_plan.py's steps (float32 and bfloat16, four families)
        # recompute after the loss: the sum over-predicts those by up to the smaller term.
        top = max(out.working.values(), default=0)
        both = loss_working + top
        if isinstance(args, Gemma4Args):  # measured: the larger and 0.36-0.73 of the smaller
            both = max(loss_working, top) + min(loss_working, top) // 2
        out.working = {"cross-entropy + the largest layer, recomputed": both}
    else:
        out.working["cross-entropy backward"] = loss_working
    return out


def _layer_kept(
    args,
    index: int,
    layer,
    targets: set[str],
    grad: bool,
    shape: Shape,
    widths: tuple[int, int],
    rank: int,
    compiled: bool,
    dispatch: str,
) -> Counter:
    """Bytes one decoder layer keeps for the backward pass (see mlxmoe/plan/training.py's docstring);
    ``widths``: bytes a value of the model's dtype and of the arrays the CPU keeps in float32
    (``a`` and ``f`` in ``activations``)."""
    a, f = widths
    T, B, L, D = shape.tokens, shape.batch, shape.seq_len, args.hidden_size
    hd = args.head_dim
    q_width, kv_width = args.num_heads * hd, args.num_kv_heads * hd
    kept: Counter = Counter()
    attn = {t.split(".")[1] for t in targets if t.startswith(("attn.", "linear_attn."))}
    kept["LoRA"] += len(attn) * T * rank * a  # x A^T, read by dB
    if grad:
        kept["residual stream"] += T * D * f  # layer input, read by the input norm's gradient
    if "linear_attn" in layer:
        kept.update(linear_attention_kept(args.linear_attention, attn, grad, shape, a))
    elif attn & READ_THE_INPUT:
        kept["attention"] += T * D * a  # normed input, read by dA of the q/k/v LoRAs
    if "linear_attn" not in layer and (grad or attn & MAKE_QKV):
        if args.mla is not None:
            kept.update(latent_kept(args.mla, attn, shape, widths))
        if args.qk_norm:
            kept["attention"] += T * (q_width + kv_width) * f  # q, k before their norms
        if args.clip_qkv is not None:
            kept["attention"] += T * (q_width + 2 * kv_width) * a
        # scaled_dot_product_attention in training runs unfused (MLX's fallback, on Metal
        # too): q * scale, k and v feed matmuls, softmax keeps its output [B, H, L, L].
        kept["attention"] += T * (q_width + 2 * kv_width) * a
        kept["attention scores"] += B * args.num_heads * L * L * a
        if args.attn_output_gate:  # Qwen3-Next: out * sigmoid(gate) reads both
            kept["attention"] += 2 * T * q_width * a
    if "o_proj" in attn:
        kept["attention"] += T * q_width * a  # o_proj's input, read by its dA
    grad = grad or bool(attn)
    if grad:
        kept["residual stream"] += T * D * f  # post-attention residual, read by its norm
    ffn = {t for t in targets if not t.startswith("attn.")}
    if layer.is_moe:
        kept.update(_moe_kept(args, layer.moe.experts, ffn, grad, shape, widths, rank, compiled, dispatch))
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


def _moe_kept(
    args: MoEArgs,
    experts_module,
    ffn: set[str],
    grad: bool,
    shape: Shape,
    widths: tuple[int, int],
    rank: int,
    compiled: bool,
    dispatch: str,
) -> Counter:
    a, f = widths
    T, D, k, inter = shape.tokens, args.hidden_size, args.num_experts_per_tok, args.moe_intermediate_size
    E = args.num_experts
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
    if dispatch == "dense":
        # nn.moe.SparseMoE's dense branch: every expert runs on the normed input [1, T, D]
        # (read by the experts' dA unless the shared expert's LoRA or the router keeps it),
        # the outputs [E, T, D] are read by the routing weights' gradient, the [T, E]
        # weights by the outputs' gradient.
        rows = E * T
        if experts & {"gate_proj", "up_proj"} and not shared and not (router_trained and a == 4):
            kept["MoE dispatch"] += T * D * a
        if grad or router_trained:
            kept["MoE dispatch"] += rows * D * a
        kept["MoE dispatch"] += T * E * 4 + T * k * 4  # routing weights, expert indices
    else:
        # nn.moe.SwitchExperts: token rows gathered in expert order [T*k, D], expert
        # outputs gathered back [T*k, D] (read by the routing weights' gradient) and the
        # int32 permutations the gathers' gradients scatter with.
        # The expert LoRAs read gather_mm's operands: on the CPU, float32 copies (one for
        # gate and up: mx.compile merges the two identical casts).
        # The grouped dispatch (nn.grouped) runs the same on its padded rows, gathered back
        # to the pairs' [T*k, D].
        rows = expert_rows(args, T, dispatch)
        if experts & {"gate_proj", "up_proj"}:
            kept["MoE dispatch"] += rows * D * f
        if grad or router_trained:
            kept["MoE dispatch"] += T * k * D * a
        kept["MoE dispatch"] += 4 * rows * 4
        # gather_mm's input gradient reads the float experts' weights, cast per call
        needs_dx = {
            "gate_proj": grad,
            "up_proj": grad,
            "down_proj": grad or bool(experts & {"gate_proj", "up_proj"}),
        }
        copies = (
            sum(_float_values(getattr(experts_module, p)) for p, needed in needs_dx.items() if needed)
            if f != a
            else 0
        )
        kept["float experts, float32 copies"] += copies * 4
    lora_in = a if dispatch == "dense" else f
    # gate, sigmoid(gate), silu(gate), up. The grouped dispatch's SwiGLU keeps gate and up only;
    # measured, a compiled step saved less than the two arrays (1.6 of 5 MB on test_plan's
    # tiny model, 66 of 167 MB at 4 bits in bench/README.md's), so the plan keeps four.
    kept["experts"] += 4 * rows * inter * a
    if "down_proj" in experts:
        kept["experts"] += rows * inter * lora_in
    kept["LoRA"] += len(experts) * rows * rank * lora_in + len(shared) * T * rank * a
    if args.shared_expert_intermediate_size:
        s_inter = args.shared_expert_intermediate_size
        kept["feed-forward"] += 4 * T * s_inter * a + T * D * a  # SwiGLU + its output (gated)
        if shared:
            kept["feed-forward"] += T * D * a
        if "down_proj" in shared:
            kept["feed-forward"] += T * s_inter * a
    return kept


def expert_rows(args: MoEArgs, tokens: int, dispatch: str) -> int:
    """Rows the experts run on: each token's k (gather), every expert on every token (dense),
    or the k padded to the grouped dispatch's blocks."""
    E, k = args.num_experts, args.num_experts_per_tok
    if dispatch == "dense":
        return E * tokens
    return padded_rows(tokens * k, E) if dispatch == "grouped" else tokens * k


def _float_values(experts) -> int:
    """Values of a stacked expert matrix left unquantized (0 for a quantized one)."""
    base = experts.base if "base" in experts else experts  # a LoRA wrapper's frozen layer
    return 0 if "scales" in base else base.weight.size


def _layer_backward_working(
    args, layer, targets: set[str], shape: Shape, widths: tuple[int, int], dispatch: str
) -> int:
    """The largest transient of a layer's backward pass: the attention probabilities'
    gradient and one temporary beside it, or the feed-forward's gradients. For MoE experts
    (``rows`` = T*k gathered or E*T dense) measured on one MoE layer under MLX's
    breadth-first evaluation: four [rows, F] arrays (down_proj's input gradient, those of
    silu(gate) and up, gate's) and [rows, D] ones beside them (the outputs' gradient, the
    product the routing weights' gradient sums, and gate's and up's input gradients,
    frozen and LoRA parts, before they are summed per token). Where gather_mm runs in
    float32 for a 16-bit model (the CPU), each expert projection it runs (adapted or left
    float) adds a float32 [rows, F] gradient and its 16-bit cast (measured: 26 bytes per
    [rows, F] value with gate, up and down adapted, 8 without)."""
    a, f = widths
    T, B, L = shape.tokens, shape.batch, shape.seq_len
    attn = 2 * B * args.num_heads * L * L * a
    if "linear_attn" in layer:
        # The chunked delta rule's backward, float32 (measured on single layers: 12 [T, H, C]
        # arrays and 8 [T, H, Dk], within 15% over chunk sizes 32-128, 4-8 heads, Dk 32-64)
        d = args.linear_attention
        C = min(d.chunk_size, pow2_at_least(L))
        attn = T * d.num_value_heads * (12 * C + 8 * d.key_head_dim) * 4
    if isinstance(args, Gemma4Args):  # its widest heads, and the dense MLP's gradients too
        attn = 2 * B * args.num_heads * L * L * a
        dense = 2 * T * args.intermediate_size * a
    else:
        dense = 0
    if not layer.is_moe:
        return max(attn, 2 * T * args.intermediate_size * a)
    rows = expert_rows(args, T, dispatch)
    F = args.moe_intermediate_size
    lora = sum(f"moe.experts.{p}" in targets for p in ("gate_proj", "up_proj"))
    ffn = 4 * rows * F * a + (4 + lora) * rows * args.hidden_size * a
    if dispatch == "grouped":
        # quantized experts are dequantized whole for each product, one projection at a time
        quantized = [
            p
            for p in ("gate_proj", "up_proj", "down_proj")
            if not _float_values(getattr(layer.moe.experts, p))
        ]
        if quantized:
            ffn += args.num_experts * F * args.hidden_size * f
    if dispatch == "grouped" and f != a:  # every product runs gather_mm, quantized or not
        ffn += 3 * rows * F * (f + a)
    if dispatch == "gather" and f != a:
        cast = sum(
            f"moe.experts.{p}" in targets or _float_values(getattr(layer.moe.experts, p)) > 0
            for p in ("gate_proj", "up_proj", "down_proj")
        )
        ffn += cast * rows * F * (f + a)
    return max(attn, ffn + dense)


def _gemma4_layer_kept(
    args: Gemma4Args,
    index: int,
    layer,
    targets: set[str],
    grad: bool,
    shape: Shape,
    widths: tuple[int, int],
    rank: int,
    compiled: bool,
    dispatch: str,
) -> Counter:
    """What a Gemma-4 layer (nn/gemma4_block.py) keeps: ``_layer_kept``'s attention terms at
    this layer's head size and key-value heads, the float32 inputs of its eight RMSNorms
    (every Gemma norm computes in float32, on any device), the dense GELU MLP, and the
    experts (``_moe_kept``) beside it."""
    a, f = widths
    T, B, L, D = shape.tokens, shape.batch, shape.seq_len, args.hidden_size
    q_width = args.num_heads * args.layer_head_dim(index)
    kv_width = args.layer_kv_heads(index) * args.layer_head_dim(index)
    values = kv_width if args.has_v_proj(index) else 0  # k_eq_v: the values are k_proj's output
    kept: Counter = Counter()
    attn = {t.split(".")[1] for t in targets if t.startswith("attn.")}
    kept["LoRA"] += len(attn) * T * rank * a
    if grad:
        kept["residual stream"] += T * D * 4  # the input norm's float32 input
    if attn & {"q_proj", "k_proj", "v_proj"}:
        kept["attention"] += T * D * a
    if grad or attn & {"q_proj", "k_proj", "v_proj"}:
        kept["attention"] += T * (q_width + kv_width + values) * 4  # q, k, v into their norms
        kept["attention"] += T * (q_width + 2 * kv_width) * a  # unfused attention's q, k, v
        kept["attention scores"] += B * args.num_heads * L * L * a
    if "o_proj" in attn:
        kept["attention"] += T * q_width * a
    grad = grad or bool(attn)
    ffn = {t for t in targets if not t.startswith("attn.")}
    dense = {t for t in ffn if t.startswith("mlp.")}
    if not (grad or ffn):
        return kept
    # float32 inputs: the post-attention norm's, the residual's (pre-MLP norm and router),
    # the experts' norm's, the two branch norms' and their sum's
    kept["norms (float32 inputs)"] += 6 * T * D * 4
    inter = args.intermediate_size
    kept["LoRA"] += len(dense) * T * rank * a
    kept["feed-forward"] += GELU_ARRAYS * T * inter * a
    if dense & {"mlp.gate_proj", "mlp.up_proj"}:
        kept["feed-forward"] += T * D * a
    if "mlp.down_proj" in dense:
        kept["feed-forward"] += T * inter * a
    moe = _moe_kept(args, layer.moe.experts, ffn - dense, grad, shape, widths, rank, compiled, dispatch)
    rows = expert_rows(args, T, dispatch)
    moe["experts"] += (GELU_ARRAYS - 4) * rows * args.moe_intermediate_size * a
    kept.update(moe)
    return kept
