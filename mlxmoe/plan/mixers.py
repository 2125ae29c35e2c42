"""What a layer's token mixer keeps for the backward pass where it is not softmax attention's
q, k and v alone (see activations.py): multi-head latent attention's latents, the Gated
DeltaNet's chunked recurrence. One micro-batch's ``Shape`` lives here too."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

ANSWER_MULTIPLE = 64  # train.step.answer_positions pads the answer positions to this
# Attention projections that read the layer's normed input, and all that make q, k and v
# (multi-head latent attention's up-projections too)
READ_THE_INPUT = {"q_proj", "k_proj", "v_proj", "q_a_proj", "kv_a_proj_with_mqa"}
MAKE_QKV = READ_THE_INPUT | {"q_b_proj", "kv_b_proj"}


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


def latent_kept(m, adapted: set[str], shape: Shape, widths: tuple[int, int]) -> Counter:
    """What multi-head latent attention (nn/mla.py) keeps beyond softmax attention's q, k, v:
    its latents' norm inputs (float32 on the CPU) and, where the up-projections are adapted,
    the normed latents their LoRAs read."""
    a, f = widths
    kept: Counter = Counter()
    latents = {"kv_b_proj": m.kv_lora_rank, "q_b_proj": m.q_lora_rank or 0}
    for up, width in latents.items():
        kept["attention"] += shape.tokens * width * (f + (a if up in adapted else 0))
    return kept


def linear_attention_kept(d, adapted: set[str], grad: bool, shape: Shape, a: int) -> Counter:
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
    T, D, C = shape.tokens, d.hidden_size, min(d.chunk_size, pow2_at_least(shape.seq_len))
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


def pow2_at_least(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()
