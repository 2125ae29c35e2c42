"""Expert load, dead experts and router collapse, watched layer by layer during training.

The trainer feeds ``ExpertMonitor.update`` the ``losses.expert_counts`` of each micro-batch
and calls ``report`` at each logging step. Every quantity is per MoE layer, because the
load-balancing loss pools layers (two layers collapsed onto different experts can look
balanced to it) and because LoRA adapters are per layer and expert.

Definitions, for one layer over one report window, with c_e the top-k assignments of
expert e, E experts, k = top_k and N real tokens (sum_e c_e = k N):

- load_e = c_e / (k N): the fraction of routed assignments; sums to 1, 1/E when balanced.
- spread = population std-dev of (E x load), i.e. the coefficient of variation of the
  load. 0 when balanced; sqrt(E/k - 1) when all tokens go to the same k experts
  (sqrt(E - 1) for top-1).
- max_share = max_e c_e / N: the fraction of the layer's tokens that visited the busiest
  expert; k/E when balanced, 1 when every token visits it. It is the load scaled by k, so
  that one threshold means the same for top-1 and top-8 (a load can never pass 1/k).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .errors import MlxMoeError

ACTIONS = ("warn", "stop")


class CollapseRuleError(MlxMoeError, ValueError):
    """A collapse rule (from a recipe) with an impossible threshold or an unknown action."""


@dataclass
class CollapseRule:
    """When to raise the router-collapse alarm (the recipe's ``collapse`` section)."""

    # Alarm when one expert sees more than this fraction of a layer's tokens. None: halfway
    # between the balanced share k/E and 1, so the default means the same for top-2 of 4
    # (balanced 0.5) and top-8 of 128 (balanced 0.0625).
    max_expert_share: float | None = None
    max_spread: float = 1.5  # alarm when a layer's spread exceeds this
    patience: int = 3  # consecutive reports over a threshold before the alarm fires
    action: str = "warn"  # "warn" or "stop"

    def __post_init__(self):
        if self.max_expert_share is not None and not 0.0 < self.max_expert_share <= 1.0:
            raise CollapseRuleError(
                f"collapse max_expert_share must be in (0, 1], got {self.max_expert_share}"
            )
        if not self.max_spread > 0.0:
            raise CollapseRuleError(f"collapse max_spread must be positive, got {self.max_spread}")
        patience = self.patience
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise CollapseRuleError(f"collapse patience must be an integer >= 1, got {patience!r}")
        if self.action not in ACTIONS:
            raise CollapseRuleError(
                f"collapse action must be one of {', '.join(ACTIONS)}, got {self.action!r}"
            )


class ExpertMonitor:
    """Accumulates per-layer expert counts into report windows and raises the collapse alarm.

    A layer breaches the rule in a report when its max_share exceeds ``max_expert_share`` or
    its spread exceeds ``max_spread``. The alarm fires once some layer has breached in
    ``patience`` consecutive reports; a report in which the layer is within both thresholds
    resets its streak, and a report window in which the layer saw no tokens leaves it as is.
    """

    def __init__(self, moe_layers: list[int], num_experts: int, top_k: int, rule: CollapseRule):
        if not moe_layers:
            raise ValueError("ExpertMonitor needs at least one MoE layer")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be between 1 and the {num_experts} experts, got {top_k}")
        self.moe_layers = [int(i) for i in moe_layers]
        self.num_experts = num_experts
        self.top_k = top_k
        self.rule = rule
        shape = (len(self.moe_layers), num_experts)
        self.lora_update_counts = np.zeros(shape, dtype=np.int64)
        self._window = np.zeros(shape, dtype=np.float64)
        self._entropy_weighted = np.zeros(len(self.moe_layers), dtype=np.float64)
        self._entropy_tokens = np.zeros(len(self.moe_layers), dtype=np.float64)
        self._streaks = np.zeros(len(self.moe_layers), dtype=np.int64)
        self._reports = 0
        self._stopped = False
        self.alarmed_layers: list[int] = []  # the layers the last report's alarm names

    def update(self, counts: mx.array | np.ndarray, entropy: mx.array | np.ndarray | None = None):
        """Adds one micro-batch: counts [n_layers, E] from ``expert_counts``, and optionally the
        [n_layers] mean routing entropy from ``router_entropy`` (weighted by its tokens)."""
        counts = np.asarray(counts, dtype=np.float64)
        if counts.shape != self._window.shape:
            raise ValueError(f"counts must be [n_layers, E] = {self._window.shape}, got {counts.shape}")
        self._window += counts
        self.lora_update_counts += np.rint(counts).astype(np.int64)
        if entropy is not None:
            entropy = np.asarray(entropy, dtype=np.float64)
            if entropy.shape != (len(self.moe_layers),):
                raise ValueError(f"entropy must be [{len(self.moe_layers)}], got {entropy.shape}")
            tokens = counts.sum(axis=1) / self.top_k
            self._entropy_weighted += entropy * tokens
            self._entropy_tokens += tokens

    def report(self) -> dict:
        """Closes the window and describes it (JSON-serialisable); see the module docstring."""
        self._reports += 1
        layers = [self._layer_report(i) for i in range(len(self.moe_layers))]
        alarm = self._check_rule(layers)
        seen = [entry for entry in layers if entry["tokens"] > 0]
        result = {
            "report": self._reports,
            "tokens": max((entry["tokens"] for entry in layers), default=0),
            "spread": float(np.mean([e["spread"] for e in seen])) if seen else None,
            "max_share": max((e["max_share"] for e in seen), default=None),
            "max_entropy": math.log(self.num_experts),
            "layers": layers,
            "alarm": alarm,
        }
        self._window[:] = 0
        self._entropy_weighted[:] = 0
        self._entropy_tokens[:] = 0
        return result

    @property
    def should_stop(self) -> bool:
        """True once the alarm has fired under a rule whose action is "stop"."""
        return self._stopped

    def _layer_report(self, i: int) -> dict:
        counts = self._window[i]
        routed = counts.sum()
        tokens = int(round(routed / self.top_k))
        entry = {
            "layer": self.moe_layers[i],
            "tokens": tokens,
            "load": None,
            "spread": None,
            "max_share": None,
            "busiest_expert": None,
            "entropy": None,
            "dead_experts": [],
            "lora_update_counts": self.lora_update_counts[i].tolist(),
            "never_updated": np.flatnonzero(self.lora_update_counts[i] == 0).tolist(),
        }
        if routed > 0:
            load = counts / routed
            busiest = int(np.argmax(load))
            entry.update(
                load=load.tolist(),
                spread=float(np.std(load * self.num_experts)),
                max_share=float(load[busiest] * self.top_k),
                busiest_expert=busiest,
                dead_experts=np.flatnonzero(counts == 0).tolist(),
            )
        if self._entropy_tokens[i] > 0:
            entry["entropy"] = float(self._entropy_weighted[i] / self._entropy_tokens[i])
        return entry

    @property
    def max_expert_share(self) -> float:
        """The rule's share threshold, or its default for this model's k and E."""
        if self.rule.max_expert_share is not None:
            return self.rule.max_expert_share
        balanced = self.top_k / self.num_experts
        return balanced + (1.0 - balanced) / 2

    def _check_rule(self, layers: list[dict]) -> str | None:
        rule = self.rule
        for i, entry in enumerate(layers):
            if entry["tokens"] == 0:
                continue
            too_busy = entry["max_share"] > self.max_expert_share
            breached = too_busy or entry["spread"] > rule.max_spread
            self._streaks[i] = self._streaks[i] + 1 if breached else 0
        fired = [
            i for i, entry in enumerate(layers) if entry["tokens"] > 0 and self._streaks[i] >= rule.patience
        ]
        self.alarmed_layers = [layers[i]["layer"] for i in fired]
        if not fired:
            return None
        if rule.action == "stop":
            self._stopped = True
        return "; ".join(self._alarm_message(layers[i], int(self._streaks[i])) for i in fired)

    def _alarm_message(self, entry: dict, streak: int) -> str:
        rule = self.rule
        reasons = []
        if entry["max_share"] > self.max_expert_share:
            reasons.append(
                f"expert {entry['busiest_expert']} saw {entry['max_share']:.0%} of the layer's "
                f"tokens (max_expert_share {self.max_expert_share:g})"
            )
        if entry["spread"] > rule.max_spread:
            reasons.append(f"spread {entry['spread']:.2f} (max_spread {rule.max_spread:g})")
        dead = f", {len(entry['dead_experts'])} dead experts" if entry["dead_experts"] else ""
        verdict = "stopping training" if rule.action == "stop" else "continuing (action warn)"
        return (
            f"router collapse in layer {entry['layer']}: {' and '.join(reasons)}{dead}, "
            f"for {streak} consecutive reports (patience {rule.patience}); {verdict}"
        )
