"""Does a training plan fit a Mac, and which recipe changes would make it fit.

macOS lets the GPU wire only part of unified memory: Metal's
``recommendedMaxWorkingSetSize``, about 2/3 of RAM on Macs with up to 36 GB and about 3/4
above (MLX reports it as ``max_recommended_working_set_size``; newer Macs and macOS
versions report a little more). ``sudo sysctl iogpu.wired_limit_mb=N`` raises it until the
next reboot (0 restores the default).
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import MlxMoeError
from ..quantize import quantization
from ..recipe import Recipe
from .training import ModelMemory, TrainingPlan, model_memory, plan_training

GiB = 2**30
OS_HEADROOM = 4 * GiB  # what a raised wired limit should leave to macOS and other apps
_UNITS = {
    "": GiB,
    "g": GiB,
    "gb": GiB,
    "gib": GiB,
    "m": 2**20,
    "mb": 2**20,
    "mib": 2**20,
    "t": 2**40,
    "tb": 2**40,
    "tib": 2**40,
}


@dataclass(frozen=True)
class Budget:
    ram: int
    wired_default: int  # what the GPU may wire before the sysctl is raised
    source: str  # where both figures come from

    @property
    def wired_max(self) -> int:
        return self.ram - OS_HEADROOM


def parse_size(text: str) -> int:
    """'32GB', '24 GiB', '96g', '512MB' -> bytes (binary units: a Mac's "32 GB" is 32 GiB)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise MlxMoeError(f"--memory {text!r}: expected a size such as 32GB, 24GiB or 512MB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def default_wired_limit(ram: int) -> int:
    return ram * 2 // 3 if ram <= 36 * GiB else ram * 3 // 4


def budget(memory: str | None) -> Budget:
    """The Mac to plan for: ``memory`` of RAM, else this Mac (Metal's own figures), else 32 GB."""
    import mlx.core as mx

    info = mx.device_info() if memory is None and mx.metal.is_available() else {}
    if "memory_size" in info and "max_recommended_working_set_size" in info:
        return Budget(
            int(info["memory_size"]),
            int(info["max_recommended_working_set_size"]),
            "this Mac: Metal's recommended working set",
        )
    ram = parse_size(memory or "32GB")
    where = f"{ram / GiB:g} GB" + ("" if memory else " (default; set --memory)")
    share = "2/3" if ram <= 36 * GiB else "3/4"
    return Budget(ram, default_wired_limit(ram), f"a {where} Mac; macOS's default is ~{share} of RAM")


def wired_limit_mb(peak: int, b: Budget) -> int:
    """The sysctl value for a plan: its peak and 10% margin, in whole GiB, in MB."""
    # integer arithmetic: a float peak * 1.1 lands just above whole GiB (50 GiB -> 56, not 55)
    return 1024 * math.ceil(min(peak * 11 // 10, b.wired_max) / GiB)


@dataclass(frozen=True)
class Verdict:
    fits_default: bool  # under macOS's default GPU limit
    fits_raised: bool  # under a raised limit that leaves OS_HEADROOM
    sysctl: str | None  # the command that raises the limit enough, when that is what it takes


def verdict(peak: int, b: Budget) -> Verdict:
    if peak <= b.wired_default:
        return Verdict(True, True, None)
    if peak <= b.wired_max:
        return Verdict(False, True, f"sudo sysctl iogpu.wired_limit_mb={wired_limit_mb(peak, b)}")
    return Verdict(False, False, None)


EXPERT_ROLE = "ffn_up_exps"  # any role of the routed experts' group
FEWEST_EXPERT_BITS = 2


@dataclass(frozen=True)
class Change:
    what: str
    recipe: Recipe
    peak: int


def _halve_batch(r: Recipe) -> str | None:
    if r.train.batch_size < 2:
        return None
    r.train.batch_size //= 2
    r.train.grad_accum *= 2
    return f"batch_size {r.train.batch_size}, grad_accum {r.train.grad_accum} (same effective batch)"


def _checkpoint(r: Recipe) -> str | None:
    if r.train.grad_checkpoint:
        return None
    r.train.grad_checkpoint = True
    return "grad_checkpoint: true (recompute each layer in the backward pass, ~30% slower)"


def _gather(r: Recipe, dispatch: str) -> str | None:
    if dispatch != "dense" or r.train.moe_dispatch == "gather":
        return None
    r.train.moe_dispatch = "gather"
    return "moe_dispatch: gather (only the chosen experts run: slower with a fast CPU BLAS)"


def _four_bits(r: Recipe) -> str | None:
    q = r.train.quantization
    if 0 < q.bits <= 4:
        return None
    r.train.quantize = quantization({**q.overrides, "bits": 4}).written()
    if r.train.moe_dispatch == "dense":  # quantized experts run gather only
        r.train.moe_dispatch = "gather"
        return "quantize: 4, moe_dispatch: gather"
    return "quantize: 4"


def _experts_at(r: Recipe, bits: int) -> str | None:
    """The routed experts, most of an MoE's weights, at ``bits`` (quality per scheme:
    bench/quant_schemes.py); the other layers keep theirs."""
    q = r.train.quantization
    if not q or q.bits_for(EXPERT_ROLE) <= bits:
        return None
    r.train.quantize = quantization({**q.overrides, "bits": q.bits, "experts": bits}).written()
    return f"quantize: {r.train.quantize} (experts at {bits} bits)".replace("'", "")


def _halve_seq(r: Recipe) -> str | None:
    if r.train.max_seq_len <= 256:
        return None
    r.train.max_seq_len //= 2
    return f"max_seq_len: {r.train.max_seq_len} (longer samples are truncated)"


def _top_half(r: Recipe, num_layers: int) -> str | None:
    layers = r.lora.layers if r.lora.layers is not None else list(range(num_layers))
    if len(layers) < 2:
        return None
    r.lora.layers = layers[len(layers) // 2 :]
    return f"lora.layers: the top {len(r.lora.layers)} ({r.lora.layers[0]}-{r.lora.layers[-1]})"


def _attention_only(r: Recipe) -> str | None:
    if r.lora.strategy == "attention" and not r.lora.targets:
        return None
    r.lora.strategy, r.lora.targets = "attention", None
    return "lora.strategy: attention (experts stay frozen)"


def target(plan: TrainingPlan, b: Budget, cfg=None, recipe: Recipe | None = None) -> int:
    """The limit to aim for: the default one, unless the frozen base alone exceeds it even
    (given ``cfg`` and ``recipe``) with its experts at the fewest bits ``suggestions`` offers."""
    if _base(plan.memory) < b.wired_default:
        return b.wired_default
    if cfg is not None and recipe is not None:
        lowest = copy.deepcopy(recipe)
        _four_bits(lowest)
        _experts_at(lowest, FEWEST_EXPERT_BITS)
        memory = model_memory(
            cfg, plan.dtype, lowest.train.quantization, lowest.train.group_size, lowest.lora
        )
        if _base(memory) < b.wired_default:
            return b.wired_default
    return b.wired_max


def _base(memory: ModelMemory) -> int:
    return memory.quantized + memory.unquantized


def suggestions(cfg, recipe: Recipe, plan: TrainingPlan, limit: int, device: str = "gpu") -> list[Change]:
    """Recipe changes applied one after another, cheapest in quality first, each kept only if
    it lowers the peak, until the plan fits under ``limit``. Fewer bits for the experts come
    right after 4 bits when the frozen base alone is over ``limit``, else last."""
    models = {_model_key(recipe): plan.memory}  # only bits and adapters need another build

    def memory(r: Recipe) -> ModelMemory:
        key = _model_key(r)
        if key not in models:
            models[key] = model_memory(cfg, plan.dtype, r.train.quantization, r.train.group_size, r.lora)
        return models[key]

    def replan(r: Recipe) -> TrainingPlan:
        return plan_training(cfg, r, device, memory=memory(r))

    def experts_if_base_over(r: Recipe, bits: int) -> str | None:
        return _experts_at(r, bits) if _base(memory(r)) > limit else None

    num_layers = plan.memory.model.args.num_layers
    steps: list[Callable[[Recipe], str | None]] = [
        _checkpoint,
        lambda r: _gather(r, plan.dispatch),
        _halve_batch,
        _halve_batch,
        _halve_batch,
        _four_bits,
        # when the base alone is over, only fewer bits help; else they cost more than the rest
        lambda r: experts_if_base_over(r, 3),
        _halve_seq,
        _halve_seq,
        lambda r: _top_half(r, num_layers),
        _attention_only,
        lambda r: _experts_at(r, 3),
        lambda r: _experts_at(r, FEWEST_EXPERT_BITS),
    ]
    current, peak, out = recipe, plan.peak, []
    for step in steps:
        if peak <= limit:
            break
        candidate = copy.deepcopy(current)
        what = step(candidate)
        if what is None:
            continue
        new_peak = replan(candidate).peak
        if new_peak < peak:
            current, peak = candidate, new_peak
            out.append(Change(what, candidate, peak))
    return out


def _model_key(r: Recipe) -> tuple:
    return r.train.quantization, repr(r.lora)
