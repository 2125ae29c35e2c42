"""One optimizer step: micro-batches, the router-aware loss, accumulation, clipping.

Cross-entropy is token-weighted over the whole step (each micro-batch's mean scaled by its
share of the step's answer tokens), so accumulating K micro-batches of B equals one batch
of K*B. The router losses are averaged over micro-batches (their scope is a micro-batch).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map

from ..data import Batch
from ..losses import (
    cross_entropy,
    expert_counts,
    load_balancing_loss,
    router_entropy,
    router_z_loss,
)
from ..model import CausalLM
from ..recipe import LossConfig


@dataclass
class StepOutput:
    loss: float  # the optimized objective
    ce: float  # token-weighted cross-entropy on answer tokens
    aux: float
    z: float
    grad_norm: float
    finite: bool
    counts: mx.array  # [moe layers, E] routed real tokens
    entropy: mx.array  # [moe layers]
    target_tokens: int
    tokens: int


def make_loss(model: CausalLM, cfg: LossConfig) -> Callable:
    top_k = getattr(model.args, "num_experts_per_tok", 0)
    has_moe = bool(model.moe_layers)

    def loss_fn(model, inputs, target_index, target_tokens, target_weight, token_mask,
                ce_weight, router_weight):
        h, routers = model.hidden_states(inputs)
        # Logits only where the loss counts (answer tokens): prompt and padding positions
        # would cost a vocab-sized matmul each and contribute nothing.
        h = h.reshape(-1, h.shape[-1])[target_index]
        logits = model.project(h)[None]
        ce = cross_entropy(logits, target_tokens[None], target_weight[None])
        if has_moe:
            aux = load_balancing_loss(routers, top_k, token_mask)
            z = router_z_loss(routers, token_mask)
            counts = expert_counts(routers, top_k, token_mask)
            entropy = router_entropy(routers, token_mask)
        else:
            aux = z = mx.array(0.0)
            counts = entropy = mx.zeros((0,))
        total = ce * ce_weight + router_weight * (cfg.aux_coef * aux + cfg.z_coef * z)
        return total, (ce, aux, z, counts, entropy)

    return loss_fn


class Stepper:
    """Owns the (optionally compiled) loss-and-gradient function and applies updates."""

    def __init__(self, model: CausalLM, optimizer: optim.Optimizer, cfg: LossConfig,
                 grad_clip: float, compile: bool):
        self.model, self.optimizer, self.grad_clip = model, optimizer, grad_clip
        value_and_grad = nn.value_and_grad(model, make_loss(model, cfg))

        def micro(*arrays):
            return value_and_grad(model, *arrays)

        self.micro = (
            mx.compile(micro, inputs=[model.state, mx.random.state],
                       outputs=[model.state, mx.random.state])
            if compile else micro
        )

    def step(self, batches: list[Batch]) -> StepOutput:
        total_targets = sum(b.num_target_tokens for b in batches)
        grads, parts = None, []
        for batch in batches:
            ce_weight = mx.array(batch.num_target_tokens / max(total_targets, 1), mx.float32)
            router_weight = mx.array(1.0 / len(batches), mx.float32)
            index, tokens, weight = answer_positions(batch)
            (loss, aux_out), g = self.micro(
                batch.inputs, index, tokens, weight, batch.token_mask, ce_weight, router_weight,
            )
            grads = g if grads is None else tree_map(mx.add, grads, g)
            parts.append((loss, ce_weight, *aux_out))
            mx.eval(grads, loss)
        grads, grad_norm = optim.clip_grad_norm(grads, self.grad_clip) if self.grad_clip > 0 \
            else (grads, optim_grad_norm(grads))
        loss = sum(p[0] for p in parts)
        ce = sum(p[2] * p[1] for p in parts)
        aux = sum(p[3] for p in parts) / len(parts)
        z = sum(p[4] for p in parts) / len(parts)
        counts = sum(p[5] for p in parts)
        entropy = sum(p[6] for p in parts) / len(parts)
        mx.eval(loss, ce, aux, z, grad_norm, counts, entropy)
        finite = bool(mx.isfinite(loss).item() and mx.isfinite(grad_norm).item())
        if finite:
            self.optimizer.update(self.model, grads)
            mx.eval(self.model.trainable_parameters(), self.optimizer.state)
        return StepOutput(
            loss=loss.item(), ce=ce.item(), aux=aux.item(), z=z.item(),
            grad_norm=grad_norm.item(), finite=finite, counts=counts, entropy=entropy,
            target_tokens=total_targets, tokens=sum(b.num_tokens for b in batches),
        )


def answer_positions(batch: Batch, multiple: int = 64) -> tuple[mx.array, mx.array, mx.array]:
    """Flat indices, target tokens and weights of the positions the loss counts, padded to a
    multiple of ``multiple`` (weight 0) so that compiled steps see few distinct shapes."""
    mask = np.asarray(batch.loss_mask).reshape(-1) > 0
    index = np.flatnonzero(mask).astype(np.int32)
    padded = max(multiple, -(-len(index) // multiple) * multiple)
    weight = np.zeros(padded, np.float32)
    weight[: len(index)] = 1.0
    index = np.concatenate([index, np.zeros(padded - len(index), np.int32)])
    tokens = np.asarray(batch.targets).reshape(-1)[index]
    return mx.array(index), mx.array(tokens.astype(np.int32)), mx.array(weight)


def optim_grad_norm(grads) -> mx.array:
    from mlx.utils import tree_flatten

    return mx.sqrt(sum((g.astype(mx.float32) ** 2).sum() for _, g in tree_flatten(grads)))


def evaluate_loss(model: CausalLM, batches: list[Batch]) -> float:
    """Token-weighted cross-entropy on answer tokens, no dropout or jitter."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        logits = model(batch.inputs)
        ce = cross_entropy(logits, batch.targets, batch.loss_mask)
        total += ce.item() * batch.num_target_tokens
        count += batch.num_target_tokens
    model.train(was_training)
    return total / max(count, 1)
