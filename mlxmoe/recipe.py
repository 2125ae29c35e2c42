"""Recipes: the user-facing configuration of a training run, one dataclass tree.

Defaults are the safe choices: router frozen (strategy ``experts``), aux and z losses
on, float32 routing, gradient clipping at 1.0. A YAML recipe sets any subset; command-line
flags override the recipe.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from .adapt import AdapterSpec
from .dtypes import DEFAULT_DTYPE, DTYPE_CHOICES
from .errors import MlxMoeError
from .losses import DEFAULT_AUX_COEF, DEFAULT_Z_COEF
from .monitor import CollapseRule
from .quantize import SUPPORTED_GROUP_SIZES, Quantization, quantization
from .thinking import DEFAULT_THINKING, check_thinking_mode


class RecipeError(MlxMoeError):
    pass


BALANCE_SCOPES = ("global", "micro")
FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


@dataclass
class DataConfig:
    """``data: PATH`` is short for ``data: {path: PATH}``."""

    path: str | None = None  # a folder with train.jsonl (and valid.jsonl), or one JSONL file
    # What training makes of reasoning in the data (mlxmoe.thinking): off drops it and trains
    # every answer after the template's non-thinking prompt; keep trains an answer given with
    # reasoning with its think block, after the thinking prompt.
    thinking: str | bool = DEFAULT_THINKING

    def __post_init__(self):
        if self.thinking is False:  # YAML 1.1 reads a bare `off` as false
            self.thinking = "off"
        check_thinking_mode(self.thinking, RecipeError)


@dataclass
class LossConfig:
    mask_prompt: bool = True  # cross-entropy on answer tokens only
    aux_coef: float = DEFAULT_AUX_COEF  # load-balancing loss (Switch/Mixtral form)
    z_coef: float = DEFAULT_Z_COEF  # router z-loss (ST-MoE)
    router_temperature: float = 1.0
    router_jitter: float = 0.0
    # Tokens the load-balancing (and z) loss pools when training on several ranks: "global",
    # the micro-batch of every rank together, or "micro", each rank's own. Global is the
    # default because balance is a property of the whole batch: a rank's few sequences are
    # legitimately skewed (all code, say), and penalizing that pushes experts towards uniform
    # routing within every small batch, against specialization (Qiu et al., "Demons in the
    # Detail", ACL 2025, arXiv 2501.11873: global-batch balancing gave more specialized experts
    # and lower perplexity). It also makes N ranks of B train exactly like one process of N*B.
    # In one process both scopes are the same.
    balance_scope: str = "global"

    def __post_init__(self):
        if self.balance_scope not in BALANCE_SCOPES:
            raise RecipeError(
                f"loss.balance_scope must be one of {', '.join(BALANCE_SCOPES)}, got {self.balance_scope!r}"
            )


@dataclass
class TrainConfig:
    iters: int = 200
    batch_size: int = 4
    grad_accum: int = 1  # MoE routing wants an effective batch of 64-128 sequences (ST-MoE)
    learning_rate: float = 1e-4
    warmup: int = 10
    min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_seq_len: int = 512
    seed: int = 0
    # The frozen base's bits (QLoRA; mlxmoe.quantize): 2, 3, 4, 5, 6 or 8, or 0 (none) to train
    # over float weights; or a mapping that gives groups of roles their own, e.g.
    # {bits: 4, experts: 3} (groups: experts, shared_experts, attention, embeddings).
    quantize: Any = 4
    group_size: int = 64
    # What the model computes in (mlxmoe.dtypes): auto = bfloat16 on a GPU, float32 on the CPU.
    dtype: str = DEFAULT_DTYPE
    grad_checkpoint: bool = False
    compile: bool = True
    report_every: int = 10
    val_every: int = 50
    val_batches: int = 8
    save_every: int = 100
    nan_patience: int = 5  # stop (with a checkpoint) after this many non-finite steps in a row
    # How MoE layers run their experts: gather (the chosen experts only), dense (every expert,
    # weighted by the routing), grouped (the chosen experts' rows in blocks of one expert) or
    # auto (see nn.moe.choose_dispatch: gather on a GPU).
    moe_dispatch: str = "auto"

    def __post_init__(self):
        if self.dtype not in DTYPE_CHOICES:
            raise RecipeError(f"train.dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}")
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise RecipeError(
                f"train.group_size must be one of {', '.join(map(str, SUPPORTED_GROUP_SIZES))}, "
                f"got {self.group_size!r}"
            )
        if self.quantize is None:
            raise RecipeError("train.quantize: must not be empty (none or 0: float weights)")
        # kept as written at its shortest (4, or {bits: 4, experts: 3}): what checkpoints record
        self.quantize = self.quantization.written()

    @property
    def quantization(self) -> Quantization:
        return quantization(self.quantize, self.group_size, "train.quantize", RecipeError)


@dataclass
class Recipe:
    model: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    lora: AdapterSpec = field(default_factory=AdapterSpec)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    collapse: CollapseRule = field(default_factory=CollapseRule)

    def __setattr__(self, name: str, value: Any) -> None:
        # As in YAML, a path for data is its path: `recipe.data = "data/faq"` keeps the rest.
        if name == "data" and isinstance(value, (str, os.PathLike)):
            value = dataclasses.replace(getattr(self, "data", DataConfig()), path=str(value))
        super().__setattr__(name, value)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls: type, values: Any, where: str) -> Any:
    if not isinstance(values, dict):
        raise RecipeError(f"{where}: expected a mapping, got {type(values).__name__}")
    hints = get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            known = ", ".join(f.name for f in dataclasses.fields(cls))
            raise RecipeError(f"{where}: unknown key {key!r} (known: {known})")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{where}.{key}")
        else:
            kwargs[key] = _coerce(value, hint, f"{where}.{key}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    if hint is Any:  # the dataclass checks it itself
        return value
    allowed = getattr(hint, "__args__", (hint,))
    if value is None:
        if type(None) in allowed:
            return None
        raise RecipeError(f"{where}: must not be empty")
    for kind in allowed:
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is float and isinstance(value, str) and FLOAT.fullmatch(value.strip()):
            return float(value)  # PyYAML reads YAML 1.1: `1e-4` (no dot) is a string there
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind in (bool, str) and isinstance(value, kind):
            return value
        if getattr(kind, "__origin__", None) is list and isinstance(value, list):
            return value
    names = " or ".join(getattr(k, "__name__", str(k)) for k in allowed if k is not type(None))
    raise RecipeError(f"{where}: expected {names}, got {value!r}")


def recipes_dir() -> Path:
    """The installed package's recipes, or recipes/ itself in a source checkout."""
    installed = Path(__file__).with_name("recipes")
    return installed if installed.is_dir() else Path(__file__).resolve().parent.parent / "recipes"


def load_recipe(path: str | Path | None = None, **sections: dict[str, Any]) -> Recipe:
    """A recipe from YAML (or the defaults), then ``sections`` (e.g. train={"iters": 10})
    applied on top: the command line's overrides."""
    values: dict[str, Any] = {}
    where = "recipe"
    if path is not None:
        path = Path(path)
        where = str(path)
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError as exc:
            raise RecipeError(f"{path}: no such recipe file") from exc
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = f": {exc.problem}" if getattr(exc, "problem", None) else ""
            raise RecipeError(f"{path}: invalid YAML{line}{problem}") from exc
        if not isinstance(values, dict):
            raise RecipeError(f"{path}: expected a mapping at the top level")
    if isinstance(values.get("data"), str) or values.get("data", {}) is None:
        values["data"] = {"path": values["data"]}
    for section, overrides in sections.items():
        clean = {k: v for k, v in overrides.items() if v is not None}
        if clean:
            values[section] = {**(values.get(section) or {}), **clean}
    return _build(Recipe, values, where)
