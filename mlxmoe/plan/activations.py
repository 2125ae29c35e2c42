"""What one micro-batch's forward pass keeps for the backward pass, and the backward's largest
transient, counted from the shapes of the arrays MLX keeps (see mlxmoe/plan/training.py)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import mlx.core as mx

from ..config import MoEArgs
from ..losses import ce_chunk_rows
from ..model import CausalLM
from ..nn.moe import DENSE_MIN_PAIRS

ANSWER_MULTIPLE = 64  # train.step.answer_positions pads the answer positions to this


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
        saved = _layer_kept(args, layer, targets, grad, shape, (a, f), rank, compiled, dispatch)
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
    loss_working = int(in_flight * chunk_bytes) + 8 * T * D * f
    if checkpoint:
        # MLX evaluates the chunked loss beside the top layer's recomputation (measured: the
        # larger of the two under-predicts by 25-33%) when the routed experts are adapted
        # and the router is not; with the router trained, or only attention or the shared
        # expert adapted, bench/memory_plan.py's steps (float32 and bfloat16, four families)
        # recompute after the loss: the sum over-predicts those by up to the smaller term.
        top = max(out.working.values(), default=0)
        out.working = {"cross-entropy + the largest layer, recomputed": loss_working + top}
    else:
        out.working["cross-entropy backward"] = loss_working
    return out


def _layer_kept(
    args,
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
        kept.update(_linear_attention_kept(args.linear_attention, attn, grad, shape, a))
    elif attn & {"q_proj", "k_proj", "v_proj"}:
        kept["attention"] += T * D * a  # normed input, read by dA of the q/k/v LoRAs
    if "linear_attn" not in layer and (grad or attn & {"q_proj", "k_proj", "v_proj"}):
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


def _linear_attention_kept(d, adapted: set[str], grad: bool, shape: Shape, a: int) -> Counter:
    """What a Gated DeltaNet layer (nn/gated_deltanet.py) keeps, by the arrays its backward
    reads; the recurrence runs in float32 whatever the model's dtype. Per token, with H value
    heads, C the chunk size, n = T / C chunks per sequence:

    - in-projections: their normed input (the LoRAs' dA); z, the norm's gate, in float32;
    - convolution: its float32 pre-activation, sigmoid (silu's gradient) and output, whose
      views q, k and v are read by the L2 norms and v * beta, and one more float32 [T,
      conv_dim] array that only the compiled step keeps (measured on one to three stacked
      layers, either projection layout, float32 and bfloat16: without it 5% under);
    - chunked delta rule, float32: q and k repeated to the value heads, k * beta, k * beta *
      exp(decay), q * exp(decay), k's decay to the chunk's end, w, v * beta and v_new
      ([T, H, Dk or Dv] each); [T, H, C] arrays: the pairwise decays, k_beta k^T, the
      strictly lower system, q k^T, the masked attention, the block inversion's stacked
      blocks, partial inverses and products (about C^2 + C^2 + C^2 / 2 a chunk) and the
      inverse; the state entering every chunk [B, H, Dk, Dv];
    - gated RMSNorm, float32: its input, the normed output, sigmoid(z) and silu(z);
      out_proj's input in the model's dtype (its LoRA's dA)."""
    T, D, C = shape.tokens, d.hidden_size, min(d.chunk_size, _pow2_at_least(shape.seq_len))
    H, dk, dv = d.num_value_heads, d.key_head_dim, d.value_head_dim
    kept: Counter = Counter()
    inputs = adapted - {"out_proj"}
    if inputs:
        kept["linear attention"] += T * D * a
    if grad or inputs:
        kept["linear attention"] += T * (d.value_dim + 4 * d.conv_dim) * 4
        kept["linear attention"] += T * H * (7 * dk + 2 * dv) * 4
        kept["linear attention"] += int(T * H * C * 8.5) * 4
        chunks = shape.batch * -(-shape.seq_len // C)
        kept["linear attention"] += chunks * H * dk * dv * 4
        kept["linear attention"] += 4 * T * d.value_dim * 4
    if "out_proj" in adapted:
        kept["linear attention"] += T * d.value_dim * a
    return kept


def _pow2_at_least(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


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
        rows = T * k
        if experts & {"gate_proj", "up_proj"}:
            kept["MoE dispatch"] += rows * D * f
        if grad or router_trained:
            kept["MoE dispatch"] += rows * D * a
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
    kept["experts"] += 4 * rows * inter * a  # gate, sigmoid(gate), silu(gate), up
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
        C = min(d.chunk_size, _pow2_at_least(L))
        attn = T * d.num_value_heads * (12 * C + 8 * d.key_head_dim) * 4
    if not layer.is_moe:
        return max(attn, 2 * T * args.intermediate_size * a)
    rows = T * (args.num_experts if dispatch == "dense" else args.num_experts_per_tok)
    F = args.moe_intermediate_size
    lora = sum(f"moe.experts.{p}" in targets for p in ("gate_proj", "up_proj"))
    ffn = 4 * rows * F * a + (4 + lora) * rows * args.hidden_size * a
    if dispatch == "gather" and f != a:
        cast = sum(
            f"moe.experts.{p}" in targets or _float_values(getattr(layer.moe.experts, p)) > 0
            for p in ("gate_proj", "up_proj", "down_proj")
        )
        ffn += cast * rows * F * (f + a)
    return max(attn, ffn)
