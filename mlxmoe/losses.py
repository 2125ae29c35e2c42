"""Training losses and routing statistics, from the model's per-layer router logits.

Every function takes ``router_logits`` as ``model(tokens, return_router_logits=True)``
returns them: one float32 array [B, L, E] per MoE layer (any leading shape works, as long
as ``token_mask`` has that shape). ``token_mask`` marks real tokens (1) against padding (0);
None means every position is real. Everything is computed in float32.

Recommended coefficients (total = cross_entropy + aux_coef * aux + z_coef * z):

- ``DEFAULT_AUX_COEF = 1e-2``. Switch Transformer (Fedus et al. 2021, sec. 2.2) and ST-MoE
  (Zoph et al. 2022) trained with 1e-2; Mixtral's hub config ships ``router_aux_loss_coef``
  0.02. transformers' config classes default to 0.001 (as do the Qwen1.5-MoE and Qwen3-MoE
  hub configs), 10-20x below those. Caveat on scale: Switch adds its loss once per layer,
  whereas the definition here (transformers') pools all layers into one term, so 1e-2 here
  weighs balance less than 1e-2 did in Switch. Only matters while the router trains; a
  frozen router gets no gradient from it.
- ``DEFAULT_Z_COEF = 1e-3``: ST-MoE's c_z (sec. 3.1), which kept logits small and training
  stable without hurting quality.

Not to be confused: ``router_aux_loss_coef`` in transformers scales the load-balancing
loss, not the z-loss; transformers has no router z-loss for these families.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

DEFAULT_AUX_COEF = 1e-2
DEFAULT_Z_COEF = 1e-3


def cross_entropy(logits: mx.array, targets: mx.array, loss_mask: mx.array) -> mx.array:
    """Mean next-token cross-entropy over the positions where ``loss_mask`` is 1.

    ``logits`` [B, L, V] in any float dtype (upcast to float32), ``targets`` [B, L] token
    ids, ``loss_mask`` [B, L] (1 on answer tokens). Masked positions contribute nothing,
    whatever their logits or targets (ignore-ids such as -100 are fine there). An all-zero
    mask gives 0, not NaN.

        CE = sum_t m_t * (logsumexp(z_t) - z_t[y_t]) / max(sum_t m_t, 1)
    """
    _check_same_shape("loss_mask", loss_mask, "targets", targets)
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {logits.shape} do not fit targets {targets.shape}")
    mask = loss_mask.astype(mx.bool_)
    safe_targets = mx.where(mask, targets, 0)
    per_token = nn.losses.cross_entropy(logits.astype(mx.float32), safe_targets)
    per_token = mx.where(mask, per_token, 0.0)
    return per_token.sum() / mx.maximum(mask.astype(mx.float32).sum(), 1.0)


CE_CHUNK_VALUES = 1 << 21  # logits per chunk: 8 MiB of float32, ~8 such temporaries alive
CE_MIN_CHUNK_ROWS = 32


def linear_cross_entropy(
    hidden: mx.array,
    project: Callable[[mx.array], mx.array],
    targets: mx.array,
    weight: mx.array,
    vocab_size: int,
) -> mx.array:
    """sum_t w_t * CE(project(h_t), y_t) over hidden states [N, D], as ``cross_entropy``
    computes it on the full logits, without ever holding them: rows are taken in chunks,
    and each chunk's gradient with respect to its hidden states is computed in the forward
    pass, while its logits exist (the loss is the last node of the graph, so its cotangent
    only scales that gradient). Peak memory is a few chunks of logits instead of ~3 full
    [N, V] arrays (logits, softmax, their gradient): for Qwen's 152k vocabulary and 4096
    answer tokens, ~0.1 GB instead of ~7.5 GB.

    ``project`` (the LM head: linear, quantized or the tied embedding) must be linear and
    frozen: no gradient reaches its parameters. ``targets`` int [N], ``weight`` [N].
    """
    rows = ce_chunk_rows(vocab_size)
    n, dims = hidden.shape

    @mx.custom_function
    def loss_and_grad(h, targets, weight):
        pieces = []
        for start in range(0, n, rows):
            hc, yc, wc = (
                h[start : start + rows],
                targets[start : start + rows, None],
                weight[start : start + rows],
            )
            if pieces:  # one chunk after the other: MLX would otherwise schedule them together
                hc = mx.depends(hc, pieces[-1])
            logits = project(hc).astype(mx.float32)
            # One exp per logit, shared by softmax and log-sum-exp: exp dominates the loss
            # on MLX's CPU backend (bench/README.md).
            peak = mx.stop_gradient(logits.max(axis=-1, keepdims=True))
            e = mx.exp(logits - peak)
            total = e.sum(axis=-1, keepdims=True)
            lse = peak + mx.log(total)
            loss = (wc * (lse - mx.take_along_axis(logits, yc, axis=-1))[:, 0]).sum()
            dlogits = e * (wc[:, None] / total)  # softmax * w
            dlogits = mx.put_along_axis(  # minus w at the target
                dlogits, yc, mx.take_along_axis(dlogits, yc, axis=-1) - wc[:, None], axis=-1
            )
            _, (dh,) = mx.vjp(project, [hc], [dlogits.astype(hc.dtype)])  # project is linear
            pieces.append(mx.concatenate([dh.astype(mx.float32).reshape(-1), loss.reshape(1)]))
        loss = sum(piece[-1] for piece in pieces)
        grad = mx.concatenate([piece[:-1].reshape(-1, dims) for piece in pieces])
        return loss, grad.astype(h.dtype)

    @loss_and_grad.vjp
    def _(primals, cotangents, outputs):
        h, targets, weight = primals
        return (cotangents[0] * outputs[1]).astype(h.dtype), mx.zeros_like(targets), mx.zeros_like(weight)

    return loss_and_grad(hidden, targets, weight)[0]


def head_cross_entropy(
    hidden: mx.array,
    project: Callable[[mx.array], mx.array],
    targets: mx.array,
    weight: mx.array,
    vocab_size: int,
) -> mx.array:
    """``linear_cross_entropy``'s value without its gradient (evaluation): sum_t w_t *
    CE(project(h_t), y_t), one chunk of logits at a time."""
    rows = ce_chunk_rows(vocab_size)
    total = mx.array(0.0, mx.float32)
    for start in range(0, hidden.shape[0], rows):
        hc = mx.depends(hidden[start : start + rows], total) if start else hidden[:rows]
        logits = project(hc).astype(mx.float32)
        picked = mx.take_along_axis(logits, targets[start : start + rows, None], axis=-1)[:, 0]
        total = total + (weight[start : start + rows] * (mx.logsumexp(logits, axis=-1) - picked)).sum()
    return total


def ce_chunk_rows(vocab_size: int) -> int:
    """Rows of logits per chunk of the chunked losses (the planner models them too)."""
    return max(CE_MIN_CHUNK_ROWS, CE_CHUNK_VALUES // vocab_size)


def load_balancing_loss(
    router_logits: list[mx.array], top_k: int, token_mask: mx.array | None = None
) -> mx.array:
    """Switch/Mixtral auxiliary load-balancing loss over top-k routing, padding excluded.

    Exactly transformers' ``load_balancing_loss_func`` (mixtral and qwen2_moe modeling
    files, 5.23), which implements Switch Transformer eqs. (4)-(6) generalised to top-k:

        f_e = (number of top-k assignments to e) / R      # sums to top_k over experts
        P_e = (sum of softmax probability of e) / R       # sums to 1
        aux = E * sum_e f_e * P_e

    where counts and sums run over every (MoE layer, real token) pair and R = n_layers x
    n_real_tokens. Layers are pooled *before* the product: it is not the mean of per-layer
    losses. Consequence: a layer collapsed onto expert 0 and another collapsed onto expert 1
    can look balanced together (see the tests); ``ExpertMonitor`` watches layers one by one.

    Values: top_k when routing is balanced (uniform probabilities, or equal assignment counts
    with probabilities averaging 1/E); E when every token sends all its probability to the
    same top_k experts. It is not a lower bound: when f and P disagree it can go below top_k.

    The top-k choice is a stop_gradient; gradients reach the router through P only. With an
    all-padding batch the loss is 0 (transformers divides by zero there).
    """
    layers, mask = _layers_and_mask(router_logits, token_mask)
    num_experts = layers[0].shape[-1]
    _check_top_k(top_k, num_experts)
    probs = [mx.softmax(x, axis=-1, precise=True) for x in layers]
    assignments = sum(_assignments(p, top_k, mask) for p in probs)
    prob_sum = sum(_masked_token_sum(p, mask) for p in probs)
    rows = mx.maximum(len(layers) * _real_tokens(mask), 1.0)
    return num_experts * mx.sum((assignments / rows) * (prob_sum / rows))


def load_balancing_share(
    router_logits: list[mx.array],
    top_k: int,
    token_mask: mx.array | None,
    total_assignments: mx.array,
    total_tokens: mx.array,
) -> mx.array:
    """One shard's share of ``load_balancing_loss`` over a batch split into shards (the ranks
    of a data-parallel run): summed over the shards, value and gradient both equal
    ``load_balancing_loss`` of the concatenated batch.

    ``total_assignments`` [E]: top-k assignments summed over layers and over every shard
    (``expert_counts(...).sum(0)`` all-summed); ``total_tokens``: real tokens of every shard.
    With R = n_layers x total_tokens, F_e = total_assignments_e / R and p_e this shard's
    softmax probability of e summed over its (layer, real token) pairs:

        share = E * sum_e F_e * p_e / R

    Why the sum is exact: the whole-batch loss is E * sum_e F_e * P_e with P_e = (sum over
    shards of p_e) / R. F holds counts of top-k choices, which carry no gradient, so once F
    and R are known the loss is linear in each shard's p, and the gradient of the loss with
    respect to a shard's router logits is the gradient of that shard's share.
    """
    layers, mask = _layers_and_mask(router_logits, token_mask)
    num_experts = layers[0].shape[-1]
    _check_top_k(top_k, num_experts)
    prob_sum = sum(_masked_token_sum(mx.softmax(x, axis=-1, precise=True), mask) for x in layers)
    rows = mx.maximum(len(layers) * total_tokens.astype(mx.float32), 1.0)
    return num_experts * mx.sum((mx.stop_gradient(total_assignments) / rows) * (prob_sum / rows))


def router_z_loss(router_logits: list[mx.array], token_mask: mx.array | None = None) -> mx.array:
    """ST-MoE router z-loss (Zoph et al. 2022, eq. 5), averaged over layers and real tokens.

        z = mean over (layer, real token) of logsumexp_e(x_e)^2

    It penalises large router logits: ST-MoE (sec. 3.1) found that it cuts the roundoff
    error of the exponentials in the gate and removed training instabilities without hurting
    quality. Recommended coefficient ``DEFAULT_Z_COEF`` = 1e-3.
    """
    layers, mask = _layers_and_mask(router_logits, token_mask)
    total = sum(_masked_token_sum(mx.logsumexp(x, axis=-1) ** 2, mask) for x in layers)
    return total / mx.maximum(len(layers) * _real_tokens(mask), 1.0)


def router_z_share(
    router_logits: list[mx.array], token_mask: mx.array | None, total_tokens: mx.array
) -> mx.array:
    """One shard's share of ``router_z_loss`` over a batch split into shards: this shard's sum
    of logsumexp^2 over its (layer, real token) pairs, divided by n_layers x ``total_tokens``
    (real tokens of every shard). The shares add up, value and gradient, to ``router_z_loss``
    of the concatenated batch: the denominator counts tokens, which carry no gradient."""
    layers, mask = _layers_and_mask(router_logits, token_mask)
    total = sum(_masked_token_sum(mx.logsumexp(x, axis=-1) ** 2, mask) for x in layers)
    return total / mx.maximum(len(layers) * total_tokens.astype(mx.float32), 1.0)


def expert_counts(router_logits: list[mx.array], top_k: int, token_mask: mx.array | None = None) -> mx.array:
    """[n_layers, E] float32: how many real tokens each expert received (top-k assignments).

    Each row sums to top_k x n_real_tokens. These are also the tokens whose gradients reach
    that expert's LoRA adapter. No gradient flows through it.
    """
    layers, mask = _layers_and_mask(router_logits, token_mask)
    num_experts = layers[0].shape[-1]
    _check_top_k(top_k, num_experts)
    probs = [mx.softmax(x, axis=-1, precise=True) for x in layers]
    return mx.stop_gradient(mx.stack([_assignments(p, top_k, mask) for p in probs]))


def router_entropy(router_logits: list[mx.array], token_mask: mx.array | None = None) -> mx.array:
    """[n_layers]: mean over real tokens of H(softmax(x)) = -sum_e p_e log p_e, in nats.

    ln(E) means the router cannot tell experts apart; near 0, each token is sure of one
    expert. No gradient flows through it.
    """
    layers, mask = _layers_and_mask(router_logits, token_mask)
    real = mx.maximum(_real_tokens(mask), 1.0)
    values = []
    for x in layers:
        log_p = nn.log_softmax(x, axis=-1)
        per_token = -(mx.exp(log_p) * log_p).sum(axis=-1)
        values.append(_masked_token_sum(per_token, mask) / real)
    return mx.stop_gradient(mx.stack(values))


def _layers_and_mask(
    router_logits: list[mx.array], token_mask: mx.array | None
) -> tuple[list[mx.array], mx.array]:
    """float32 layers (checked to share one shape) and a boolean mask of their token shape."""
    if not isinstance(router_logits, (list, tuple)) or not router_logits:
        raise ValueError("router_logits must be a non-empty list with one array per MoE layer")
    layers = [x.astype(mx.float32) for x in router_logits]
    shape = layers[0].shape
    for i, x in enumerate(layers):
        if x.shape != shape:
            raise ValueError(f"router_logits[{i}] has shape {x.shape}, layer 0 has {shape}")
    if token_mask is None:
        return layers, mx.ones(shape[:-1], dtype=mx.bool_)
    if tuple(token_mask.shape) != tuple(shape[:-1]):
        raise ValueError(f"token_mask {token_mask.shape} does not fit router logits {shape}")
    return layers, token_mask != 0


def _masked_token_sum(values: mx.array, mask: mx.array) -> mx.array:
    """Sum over the token axes (those of mask) of values [*mask.shape, *rest], padding zeroed."""
    m = mask.reshape(mask.shape + (1,) * (values.ndim - mask.ndim))
    return mx.where(m, values, 0.0).sum(axis=tuple(range(mask.ndim)))


def _real_tokens(mask: mx.array) -> mx.array:
    return mask.astype(mx.float32).sum()


def _assignments(probs: mx.array, top_k: int, mask: mx.array) -> mx.array:
    """[E]: real tokens that picked each expert among their top_k (a choice has no gradient)."""
    # Top-k of the probabilities, as the router and transformers pick (same ties).
    chosen = mx.stop_gradient(mx.argpartition(-probs, kth=top_k - 1, axis=-1)[..., :top_k])
    one_hot = chosen[..., None] == mx.arange(probs.shape[-1])
    return _masked_token_sum(one_hot.astype(mx.float32).sum(axis=-2), mask)


def _check_top_k(top_k: int, num_experts: int) -> None:
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be between 1 and the {num_experts} experts, got {top_k}")


def _check_same_shape(name_a: str, a: mx.array, name_b: str, b: mx.array) -> None:
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"{name_a} {a.shape} and {name_b} {b.shape} must have the same shape")
