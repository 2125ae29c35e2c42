"""Where LoRA goes: named strategies (the placements LoRA guides give for MoE models:
attention only, experts under a frozen router, the router too, the shared expert only) or an
explicit list of targets.

The default, ``experts``, adapts attention and the routed experts and freezes the router:
the usual advice for Mixtral QLoRA, since a LoRA over a Linear(dim, 8) router is larger than
the router and half-precision router updates destabilize training. ``experts+router`` exists
so users can measure the opposite claim (a domain needs the router trained to pick its
experts) on their own data.

What each strategy adapts (the groups of ``TARGET_GROUPS``), in layers that have them; a
strategy naming a group the model has in none of its adapted layers is refused (``shared``
on Mixtral, Granite or gpt-oss), but for ``all``:

- ``attention``: attention only;
- ``experts`` (default): attention and the routed experts;
- ``shared``: attention and the shared expert (Qwen2-MoE, Qwen3-Next, Qwen3.5, DeepSeek-V2);
- ``experts+router``: attention, the routed experts and the router;
- ``all``: attention, the routed and shared experts, dense MLPs and the router.

"attention" is the token mixer's projections: q, k, v and o of softmax attention (DeepSeek-V2's
latent attention: q or q_a and q_b, kv_a_proj_with_mqa, kv_b and o), and in the
linear-attention layers of Qwen3-Next and Qwen3.5 the Gated DeltaNet's input projections
(``in_proj_qkvz``, ``in_proj_ba``; Qwen3.5: ``in_proj_qkv``, ``in_proj_z``, ``in_proj_b``,
``in_proj_a``) and ``out_proj``. Its convolution, ``A_log``, ``dt_bias`` and norms are never
adapted, nor is the shared expert's gate.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from math import prod

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import MlxMoeError
from ..model import CausalLM
from ..nn.moe import ExpertLinear, QuantizedExpertLinear, Router
from .lora import LoRAExperts, LoRALinear, LoRARouter, linear_dims

log = logging.getLogger(__name__)

# Layer-relative module paths, grouped the way users think of them.
TARGET_GROUPS: dict[str, tuple[str, ...]] = {
    "attention": (
        "attn.q_proj",
        "attn.k_proj",
        "attn.v_proj",
        "attn.o_proj",
        # multi-head latent attention (DeepSeek-V2): the query and key-value low-rank projections
        "attn.q_a_proj",
        "attn.q_b_proj",
        "attn.kv_a_proj_with_mqa",
        "attn.kv_b_proj",
        # Gated DeltaNet (linear attention): Qwen3-Next's fused projections, Qwen3.5's apart
        "linear_attn.in_proj_qkvz",
        "linear_attn.in_proj_ba",
        "linear_attn.in_proj_qkv",
        "linear_attn.in_proj_z",
        "linear_attn.in_proj_b",
        "linear_attn.in_proj_a",
        "linear_attn.out_proj",
    ),
    "experts": ("moe.experts.gate_proj", "moe.experts.up_proj", "moe.experts.down_proj"),
    "shared_expert": (
        "moe.shared_expert.gate_proj",
        "moe.shared_expert.up_proj",
        "moe.shared_expert.down_proj",
    ),
    "dense_mlp": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    "router": ("moe.router",),
}

GROUP_NOUNS = {
    "attention": "attention",
    "experts": "routed experts",
    "shared_expert": "a shared expert (as Qwen2-MoE, Qwen3-Next, Qwen3.5 and DeepSeek-V2 have)",
    "dense_mlp": "dense MLPs",
    "router": "a router",
}

STRATEGIES: dict[str, tuple[str, ...]] = {
    "attention": ("attention",),
    "experts": ("attention", "experts"),
    "shared": ("attention", "shared_expert"),
    "experts+router": ("attention", "experts", "router"),
    "all": ("attention", "experts", "shared_expert", "dense_mlp", "router"),
}

ROUTER_MODES = ("full", "lora")


@dataclass
class AdapterSpec:
    strategy: str = "experts"
    targets: list[str] | None = None  # group names or layer-relative paths; overrides strategy
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    router_mode: str = "full"  # how a targeted router trains: all its weights, or a LoRA
    layers: list[int] | None = None  # adapt only these layers (None: all)


def target_paths(spec: AdapterSpec) -> list[str]:
    """The layer-relative module paths a spec asks for."""
    if spec.targets:
        names = list(spec.targets)
    elif spec.strategy in STRATEGIES:
        names = list(STRATEGIES[spec.strategy])
    else:
        raise MlxMoeError(f"strategy {spec.strategy!r} is unknown (choose from: {', '.join(STRATEGIES)})")
    known = {path for group in TARGET_GROUPS.values() for path in group}
    paths: list[str] = []
    for name in names:
        if name in TARGET_GROUPS:
            paths.extend(TARGET_GROUPS[name])
        elif name in known:
            paths.append(name)
        else:
            choices = ", ".join([*TARGET_GROUPS, *sorted(known)])
            raise MlxMoeError(f"LoRA target {name!r} is unknown (choose from: {choices})")
    return list(dict.fromkeys(paths))


def _find(layer: nn.Module, path: str) -> nn.Module | None:
    node = layer
    for part in path.split("."):
        if not isinstance(node, nn.Module) or part not in node:
            return None
        node = node[part]
    return node


def _set(layer: nn.Module, path: str, module: nn.Module) -> None:
    *parents, last = path.split(".")
    node = layer
    for part in parents:
        node = node[part]
    setattr(node, last, module)


def _wrap(module: nn.Module, spec: AdapterSpec) -> nn.Module:
    if isinstance(module, Router):
        return LoRARouter(module, spec.rank, spec.alpha, spec.dropout)
    if isinstance(module, (ExpertLinear, QuantizedExpertLinear)):
        return LoRAExperts(module, spec.rank, spec.alpha, spec.dropout)
    return LoRALinear(module, spec.rank, spec.alpha, spec.dropout)


def apply_adapters(model: CausalLM, spec: AdapterSpec) -> list[str]:
    """Freeze the model and attach adapters where ``spec`` says. Returns the adapted
    module paths (``layers.N.<target>``)."""
    if spec.router_mode not in ROUTER_MODES:
        raise MlxMoeError(f"router_mode {spec.router_mode!r} is unknown (choose from: full, lora)")
    if spec.rank < 1:
        raise MlxMoeError(f"LoRA rank must be >= 1, got {spec.rank}")
    paths = target_paths(spec)
    layers = range(len(model.layers)) if spec.layers is None else spec.layers
    model.freeze()
    adapted: list[str] = []
    for i in layers:
        layer = model.layers[i]
        for path in paths:
            module = _find(layer, path)
            if module is None:
                continue
            if isinstance(module, Router) and spec.router_mode == "full":
                module.unfreeze(keys=["weight"])
            else:
                _set(layer, path, _wrap(module, spec))
            adapted.append(f"layers.{i}.{path}")
    if not adapted:
        raise MlxMoeError(f"LoRA targets {paths} match no module of this {model.family} model")
    _refuse_a_group_the_strategy_cannot_adapt(spec, adapted, model.family)
    if any(p.endswith("moe.router") for p in adapted) and spec.router_mode == "lora":
        experts = model.args.num_experts
        if spec.rank >= experts:
            log.warning(
                "router LoRA rank %d >= %d experts: the adapter is larger than the router "
                "itself; train the router fully (router_mode: full) or lower the rank",
                spec.rank,
                experts,
            )
    return adapted


def _refuse_a_group_the_strategy_cannot_adapt(spec: AdapterSpec, adapted: list[str], family: str) -> None:
    """A named strategy adapts every group it names, or is refused: ``shared`` on a model
    without a shared expert would otherwise train attention alone, ``attention``'s run under
    another name. ``all`` takes what the model has; explicit targets are taken as given."""
    if spec.targets or spec.strategy == "all":
        return
    found = {path.split(".", 2)[2] for path in adapted}
    for group in STRATEGIES[spec.strategy]:
        if found.isdisjoint(TARGET_GROUPS[group]):
            where = "" if spec.layers is None else f" in layers {spec.layers}"
            raise MlxMoeError(
                f"strategy {spec.strategy!r} adapts {GROUP_NOUNS[group]}, and this {family} model "
                f"has none{where} (choose another strategy: {', '.join(STRATEGIES)})"
            )


def parameter_count(model: nn.Module) -> int:
    """Logical parameters (a quantized weight counts as its unpacked size)."""
    total = 0
    for _, module in model.named_modules():
        own = {k: v for k, v in module.items() if isinstance(v, mx.array)}
        if "scales" in own:
            out_dims, in_dims = linear_dims(module)
            total += prod(own["weight"].shape[:-2]) * out_dims * in_dims
            total += own["bias"].size if "bias" in own else 0
        else:
            total += sum(v.size for v in own.values())
    return total


def trainable_report(model: CausalLM) -> dict:
    """Trainable parameters: total, percent of the model, and per target group."""
    groups: dict[str, int] = {}
    trainable = 0
    for path, value in tree_flatten(model.trainable_parameters()):
        trainable += value.size
        group = next(
            (g for g, targets in TARGET_GROUPS.items() if any(f".{t}." in path for t in targets)),
            "other",
        )
        groups[group] = groups.get(group, 0) + value.size
    total = parameter_count(model)
    return {
        "trainable": trainable,
        "total": total,
        "percent": 100.0 * trainable / total if total else 0.0,
        "groups": groups,
    }
