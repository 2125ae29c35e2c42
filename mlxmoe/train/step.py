"""One optimizer step: micro-batches, the router-aware loss, accumulation, clipping.

Cross-entropy is token-weighted over the whole step (each micro-batch's mean scaled by its
share of the step's answer tokens, on all ranks), so accumulating K micro-batches of B equals
one batch of K*B, and N ranks of B equal one process of N*B. The router losses are averaged
over the K micro-steps; within a micro-step their scope is ``loss.balance_scope``: "global"
pools the micro-batches of every rank (exactly: see ``losses.load_balancing_share``), "micro"
averages each rank's own.

Why not pool over the K micro-steps too: the balance loss needs the step's expert counts
before the first micro-step's backward pass, which means a routing pre-pass (one more forward
of every micro-batch, about a third more compute) or keeping every micro-step's activations,
which accumulation exists to avoid. Across ranks the counts cost one all_sum of E numbers
inside the micro-step. The reported expert load counts the whole step on every rank.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from ..data.batches import Batch
from ..losses import (
    cross_entropy,
    expert_counts,
    head_cross_entropy,
    linear_cross_entropy,
    load_balancing_loss,
    load_balancing_share,
    router_entropy,
    router_z_loss,
    router_z_share,
)
from ..model import CausalLM
from ..recipe import LossConfig
from .distributed import World


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
    tokens: int  # real tokens of the step, all ranks
    rank_tokens: int = 0  # real tokens this rank trained on
    comm_s: float = 0.0  # seconds in the gradient all_sum, waiting for the slowest rank included


def make_loss(model: CausalLM, cfg: LossConfig, world: World | None = None) -> Callable:
    world = world or World()
    top_k = getattr(model.args, "num_experts_per_tok", 0)
    has_moe = bool(model.moe_layers)
    vocab_size = model.args.vocab_size
    # The chunked loss gives the LM head no gradient: only while no adapter trains it.
    frozen_head = not any(
        name.startswith(("lm_head", "embed_tokens")) for name, _ in tree_flatten(model.trainable_parameters())
    )

    def router_terms(routers, token_mask, total_tokens):
        """(aux, z, counts, entropy) as this rank's shares: summed over ranks, the values of
        the micro-step (alone, they are the values)."""
        counts = expert_counts(routers, top_k, token_mask)
        if world.size == 1:
            return (
                load_balancing_loss(routers, top_k, token_mask),
                router_z_loss(routers, token_mask),
                counts,
                router_entropy(routers, token_mask),
            )
        entropy = router_entropy(routers, token_mask) * (token_mask.sum() / total_tokens)
        if cfg.balance_scope == "micro":
            aux = load_balancing_loss(routers, top_k, token_mask) / world.size
            return aux, router_z_loss(routers, token_mask) / world.size, counts, entropy
        total_assignments = world.all_sum(counts.sum(axis=0))
        aux = load_balancing_share(routers, top_k, token_mask, total_assignments, total_tokens)
        return aux, router_z_share(routers, token_mask, total_tokens), counts, entropy

    def loss_fn(
        model,
        inputs,
        target_index,
        target_tokens,
        target_weight,
        token_mask,
        ce_weight,
        router_weight,
        total_tokens,
    ):
        h, routers = model.hidden_states(inputs)
        # Logits only where the loss counts (answer tokens): prompt and padding positions
        # would cost a vocab-sized matmul each and contribute nothing.
        h = h.reshape(-1, h.shape[-1])[target_index]
        if frozen_head:
            ce = linear_cross_entropy(
                h, model.project, target_tokens, target_weight, vocab_size
            ) / mx.maximum(target_weight.sum(), 1.0)
        else:
            ce = cross_entropy(model.project(h)[None], target_tokens[None], target_weight[None])
        if has_moe:
            aux, z, counts, entropy = router_terms(routers, token_mask, total_tokens)
        else:
            aux = z = mx.array(0.0)
            counts = entropy = mx.zeros((0,))
        total = ce * ce_weight + router_weight * (cfg.aux_coef * aux + cfg.z_coef * z)
        return total, (ce, aux, z, counts, entropy)

    return loss_fn


class Stepper:
    """Owns the (optionally compiled) loss-and-gradient function and applies updates. With
    several ranks, ``step`` takes this rank's shards and every rank applies the same update."""

    def __init__(
        self,
        model: CausalLM,
        optimizer: optim.Optimizer,
        cfg: LossConfig,
        grad_clip: float,
        compile: bool,
        world: World | None = None,
    ):
        self.model, self.optimizer, self.grad_clip = model, optimizer, grad_clip
        self.world = world or World()
        value_and_grad = nn.value_and_grad(model, make_loss(model, cfg, self.world))

        def micro(*arrays):
            return value_and_grad(model, *arrays)

        self.micro = (
            mx.compile(micro, inputs=[model.state, mx.random.state], outputs=[model.state, mx.random.state])
            if compile
            else micro
        )

    def step(self, batches: list[Batch]) -> StepOutput:
        world = self.world
        # [micro-batch, (answer tokens, real tokens)] of the step, all ranks
        sizes = [[b.num_target_tokens, b.num_tokens] for b in batches]
        if world.size > 1:
            sizes = np.array(world.all_sum(mx.array(sizes, mx.int32))).tolist()
        total_targets = sum(n for n, _ in sizes)
        grads, parts = None, []
        for batch, (_, real_tokens) in zip(batches, sizes):
            ce_weight = mx.array(batch.num_target_tokens / max(total_targets, 1), mx.float32)
            router_weight = mx.array(1.0 / len(batches), mx.float32)
            index, tokens, weight = answer_positions(batch)
            (loss, aux_out), g = self.micro(
                batch.inputs,
                index,
                tokens,
                weight,
                batch.token_mask,
                ce_weight,
                router_weight,
                mx.array(real_tokens, mx.float32),
            )
            grads = g if grads is None else tree_map(mx.add, grads, g)
            parts.append((loss, ce_weight, *aux_out))
            mx.eval(grads, loss)
        comm_s = 0.0
        if world.size > 1:
            started = time.perf_counter()
            grads = world.sum_tree(grads)
            mx.eval(grads)
            comm_s = time.perf_counter() - started
        grads, grad_norm = (
            optim.clip_grad_norm(grads, self.grad_clip)
            if self.grad_clip > 0
            else (grads, optim_grad_norm(grads))
        )
        loss = sum(p[0] for p in parts)
        ce = sum(p[2] * p[1] for p in parts)
        aux = sum(p[3] for p in parts) / len(parts)
        z = sum(p[4] for p in parts) / len(parts)
        counts = sum(p[5] for p in parts)
        entropy = sum(p[6] for p in parts) / len(parts)
        if world.size > 1:  # every term is this rank's share: the sums are the step's values
            loss, ce, aux, z, counts, entropy = world.sum_tree((loss, ce, aux, z, counts, entropy))
        mx.eval(loss, ce, aux, z, grad_norm, counts, entropy)
        finite = bool(mx.isfinite(loss).item() and mx.isfinite(grad_norm).item())
        if finite:
            self.optimizer.update(self.model, grads)
            mx.eval(self.model.trainable_parameters(), self.optimizer.state)
        return StepOutput(
            loss=loss.item(),
            ce=ce.item(),
            aux=aux.item(),
            z=z.item(),
            grad_norm=grad_norm.item(),
            finite=finite,
            counts=counts,
            entropy=entropy,
            target_tokens=total_targets,
            tokens=sum(n for _, n in sizes),
            rank_tokens=sum(b.num_tokens for b in batches),
            comm_s=comm_s,
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


def answer_cross_entropy(model: CausalLM, batch: Batch, hidden: mx.array) -> mx.array:
    """The cross-entropy summed over ``batch``'s answer tokens, from the model's final hidden
    states [B, L, D], without gradient: the LM head runs on answer positions only, a chunk
    of them at a time."""
    index, tokens, weight = answer_positions(batch)
    return head_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1])[index], model.project, tokens, weight, model.args.vocab_size
    )


def optim_grad_norm(grads) -> mx.array:
    from mlx.utils import tree_flatten

    return mx.sqrt(sum((g.astype(mx.float32) ** 2).sum() for _, g in tree_flatten(grads)))


def evaluate_loss(model: CausalLM, batches: list[Batch], world: World | None = None) -> float:
    """Token-weighted cross-entropy on answer tokens, no dropout or jitter. With several
    ranks, ``batches`` are this rank's shards and the result is that of the whole batches."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        h, _ = model.hidden_states(batch.inputs)
        total += answer_cross_entropy(model, batch, h).item()
        count += batch.num_target_tokens
    model.train(was_training)
    if world is not None and world.size > 1:
        total, count = np.array(world.all_sum(mx.array([total, count], mx.float32))).tolist()
    return total / max(count, 1)
