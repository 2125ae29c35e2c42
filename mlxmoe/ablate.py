"""Ablation: each LoRA strategy trained on the same data, budget and seed; each, and the
untouched base, evaluated on the same held-out file; the results side by side in the
columns MoE LoRA write-ups compare strategies by (ROUGE-L, perplexity, expert-utilization
spread, tokens/s).

``OUT/<strategy>/`` is that strategy's run (what ``train`` writes) plus ``eval.json``;
``OUT/base/eval.json`` is the base's evaluation. A configuration whose ``eval.json`` exists
is done, so a re-run reuses it, resumes a strategy that has a checkpoint and starts the rest:
an interrupted ablation loses at most the steps since a run's last checkpoint.
``OUT/ablation_settings.json`` pins the recipe and the evaluation settings, and a re-run with
other ones is refused: a table must not mix budgets.

The base is loaded as the recipe says (``train.quantize``) for every configuration, so the
base row is the very model the adapters were trained over. Evaluation truncates at the
recipe's ``max_seq_len``, as training did.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

from .adapt.strategies import STRATEGIES
from .atomic import write_text_atomic
from .config import MoEArgs
from .errors import MlxMoeError
from .evaluate import DEFAULT_MAX_NEW_TOKENS, eval_file, evaluate
from .families import family_for
from .info import read_config
from .quantize import quantization
from .recipe import Recipe
from .train import train
from .train.loop import METRICS_FILE, data_files
from .train.state import latest_checkpoint

DEFAULT_STRATEGIES = ("attention", "experts", "experts+router", "shared")
BASE = "base"
EVAL_FILE = "eval.json"
SETTINGS_FILE = "ablation_settings.json"
TABLE_JSON = "ablation.json"
TABLE_MD = "ablation.md"
BARS_PLOT = "ablation.png"
ABLATION_LOAD_PLOT = "ablation_expert_load.png"

# (row field, header, format) of the two tables, printed and in Markdown: the evaluation
# (quality, routing balance and speed, as MoE LoRA write-ups compare strategies) and the
# training of each strategy.
EVAL_COLUMNS = (
    ("name", "configuration", "s"),
    ("rouge_l", "ROUGE-L F1", ".4f"),
    ("perplexity", "perplexity", ".3f"),
    ("spread", "expert spread", ".3f"),
    ("generation_tps", "generation tok/s", ".1f"),
)
TRAIN_COLUMNS = (
    ("name", "strategy", "s"),
    ("trainable", "trainable", "trainable"),
    ("steps", "steps", "d"),
    ("final_loss", "final loss", ".4f"),
    ("train_tokens_per_s", "train tok/s", ".0f"),
)


@dataclass
class AblationRow:
    name: str  # "base" or a strategy
    rouge_l: float | None  # None when nothing was generated
    perplexity: float
    spread: float | None  # mean over MoE layers of the eval pass's expert-load spread
    generation_tps: float | None
    prompt_tps: float | None
    trainable: int | None = None  # adapter parameters (None for the base)
    trainable_percent: float | None = None
    steps: int | None = None
    final_loss: float | None = None  # the last report window's mean training loss
    train_tokens_per_s: float | None = None  # median over report windows
    stopped: str | None = None  # why training ended early, if it did

    def cell(self, key: str, spec: str) -> str:
        value = getattr(self, key)
        if value is None:
            return "-"
        if spec == "trainable":
            scaled = next(
                (
                    f"{value / size:.{digits}f} {unit}"
                    for size, unit, digits in ((1e9, "G", 2), (1e6, "M", 2), (1e3, "k", 1))
                    if value >= size
                ),
                str(value),
            )
            return f"{scaled} ({self.trainable_percent:.2f}%)"
        return format(value, spec)


@dataclass
class AblationResult:
    out_dir: Path
    eval_data: Path
    settings: dict[str, Any]
    rows: list[AblationRow]
    skipped: dict[str, str]  # strategy -> why it was not run
    reused: list[str]  # configurations a previous run had finished
    plots: list[Path] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)  # the table as JSON and Markdown

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "eval_data": str(self.eval_data),
            "settings": self.settings,
            "rows": [dataclasses.asdict(row) for row in self.rows],
            "skipped": self.skipped,
            "reused": self.reused,
            "plots": [str(p) for p in self.plots],
        }


def parse_strategies(text: str | Sequence[str]) -> list[str]:
    """ "attention,experts" (or a list) -> known strategy names, in order, without repeats."""
    names = text.split(",") if isinstance(text, str) else list(text)
    names = list(dict.fromkeys(n.strip() for n in names if n.strip()))
    if not names:
        raise MlxMoeError("no strategies to compare (e.g. --strategies attention,experts)")
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown:
        raise MlxMoeError(
            f"unknown strategies {', '.join(map(repr, unknown))} (choose from: {', '.join(STRATEGIES)})"
        )
    return names


def applicable_strategies(model: str, strategies: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """(strategies to run, {strategy: why skipped}), from the model's config.json alone."""
    cfg = read_config(model)
    family = family_for(cfg.raw.get("model_type"), cfg.source)
    args = family.args_from_config(cfg)
    if not isinstance(args, MoEArgs) or not args.moe_layers:
        raise MlxMoeError(
            f"{model}: a dense {family.name} model has no experts, so the strategies "
            "do not differ; ablate compares them on an MoE (upcycle a dense model first)"
        )
    skipped = {}
    if "shared" in strategies and not args.shared_expert_intermediate_size:
        skipped["shared"] = (
            f"this {family.name} model has no shared expert (Qwen2-MoE has one): "
            "'shared' would train attention alone, the same as 'attention'"
        )
    return [s for s in strategies if s not in skipped], skipped


def held_out_file(recipe: Recipe, eval_data: str | Path | None) -> Path:
    """The file every configuration is evaluated on: ``eval_data``, else DATA's test.jsonl
    (else valid.jsonl); never the training file."""
    data = recipe.data.path
    train_file, _ = data_files(data)
    if eval_data is None:
        if not Path(data).is_dir():
            raise MlxMoeError(
                f"{data}: ablate needs held-out data to evaluate on: pass "
                "--eval-data, or a data folder with test.jsonl or valid.jsonl"
            )
        eval_data = data
    path = eval_file(eval_data)
    if path.resolve() == train_file.resolve():
        raise MlxMoeError(f"{path} is the training file; evaluate on held-out data (--eval-data)")
    return path


def ablation_settings(
    recipe: Recipe, eval_path: Path, max_new_tokens: int, limit: int | None
) -> dict[str, Any]:
    """What every configuration shares: the recipe but its strategy, and the evaluation."""
    shared = recipe.to_dict()
    shared["lora"].pop("strategy")
    return json.loads(
        json.dumps(
            {
                "recipe": shared,
                "eval": {
                    "data": str(eval_path),
                    "max_new_tokens": max_new_tokens,
                    "limit": limit,
                    "max_seq_len": recipe.train.max_seq_len,
                },
            }
        )
    )


def pin_settings(out: Path, settings: dict[str, Any]) -> None:
    """Write OUT's settings, or refuse if OUT holds an ablation with other ones."""
    path = out / SETTINGS_FILE
    if not path.is_file():
        write_text_atomic(path, json.dumps(settings, indent=2) + "\n")
        return
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise MlxMoeError(f"{path}: not JSON ({exc.msg})") from exc
    before, now = _flatten(saved), _flatten(settings)
    changed = [
        f"{key}: {before.get(key)!r} before, {now.get(key)!r} now"
        for key in sorted(before.keys() | now.keys())
        if before.get(key) != now.get(key)
    ]
    if changed:
        raise MlxMoeError(
            f"{out} holds an ablation with other settings ({'; '.join(changed[:4])}"
            f"{'; ...' if len(changed) > 4 else ''}); use the same ones to continue "
            "it, or another --out"
        )


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else key))
    return flat


def ablate(
    recipe: Recipe,
    out_dir: str | Path,
    strategies: Sequence[str] = DEFAULT_STRATEGIES,
    eval_data: str | Path | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    limit: int | None = None,
    plots: bool = True,
    show_progress: bool = True,
    note: Callable[[str], None] | None = None,
    eval_progress: Callable[[int, int], None] | None = None,
) -> AblationResult:
    """Train each strategy of ``strategies`` with ``recipe`` into OUT/<strategy>, evaluate it
    and the base on the held-out file, and write OUT/ablation.json, .md and the plots.

    ``note`` receives one line per configuration (started, resumed, reused, skipped);
    ``eval_progress`` is ``evaluate``'s progress callback."""
    say = note or (lambda message: None)
    if not recipe.model:
        raise MlxMoeError("no model: pass --model or set 'model' in the recipe")
    if not recipe.data.path:
        raise MlxMoeError("no data: pass --data or set 'data' in the recipe")
    if recipe.lora.targets:
        raise MlxMoeError(
            f"the recipe sets lora.targets {recipe.lora.targets}, which overrides "
            "every strategy; remove it to compare strategies"
        )
    strategies = parse_strategies(strategies)
    eval_path = held_out_file(recipe, eval_data)
    run, skipped = applicable_strategies(str(recipe.model), strategies)
    out = Path(out_dir)
    settings = ablation_settings(recipe, eval_path, max_new_tokens, limit)
    pin_settings(out, settings)
    for strategy, why in skipped.items():
        say(f"{strategy}: skipped: {why}")

    def evaluate_into(name: str, adapter: Path | None, trained: dict | None) -> None:
        say(f"{name}: evaluating on {eval_path}")
        report = evaluate(
            recipe.model,
            eval_path,
            adapter=adapter,
            max_new_tokens=max_new_tokens,
            limit=limit,
            max_seq_len=recipe.train.max_seq_len,
            quantize=recipe.train.quantize,
            group_size=recipe.train.group_size,
            dtype=recipe.train.dtype,
            progress=eval_progress,
        )
        record = {"configuration": name, "eval": report.to_dict(), "train": trained}
        write_text_atomic(out / name / EVAL_FILE, json.dumps(record, indent=2) + "\n")
        _release_memory()

    reused = []
    for name in (BASE, *run):
        run_dir = out / name
        if (run_dir / EVAL_FILE).is_file():
            say(f"{name}: done earlier, reusing {run_dir / EVAL_FILE}")
            reused.append(name)
            continue
        if name == BASE:
            evaluate_into(BASE, None, None)
            continue
        trained = _train_strategy(recipe, name, run_dir, show_progress, say)
        if plots:  # now, for a look while the next strategy trains
            _training_plots(run_dir, name, say)
        evaluate_into(name, run_dir, trained)

    records = [_read_record(out / name / EVAL_FILE) for name in (BASE, *run)]
    rows = [_row(record) for record in records]
    result = AblationResult(out, eval_path, settings, rows, skipped, reused)
    if plots:
        result.plots = _ablation_plots(out, run, rows, records, say)
    write_text_atomic(out / TABLE_JSON, json.dumps(result.to_dict(), indent=2) + "\n")
    write_text_atomic(out / TABLE_MD, markdown_table(result))
    result.files = [out / TABLE_JSON, out / TABLE_MD]
    return result


def _train_strategy(
    recipe: Recipe, strategy: str, run_dir: Path, show_progress: bool, say: Callable[[str], None]
) -> dict[str, Any]:
    """Train (or resume) one strategy; returns the training summary that goes in eval.json."""
    r = copy.deepcopy(recipe)
    r.lora = dataclasses.replace(recipe.lora, strategy=strategy)
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        # Rows a killed run reported before its first checkpoint: train appends to this file.
        (run_dir / METRICS_FILE).unlink(missing_ok=True)
        say(f"{strategy}: training {recipe.train.iters} steps into {run_dir}")
    else:
        say(f"{strategy}: resuming {run_dir} from {checkpoint.name}")
    result = train(r, run_dir, resume=checkpoint is not None, show_progress=show_progress)
    _release_memory()
    lines = (run_dir / METRICS_FILE).read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    speeds = [row["tokens_per_s"] for row in rows if row.get("tokens_per_s")]
    return {
        "steps": result.steps,
        "stopped": result.stopped,
        "trainable": result.trainable["trainable"],
        "trainable_percent": result.trainable["percent"],
        "final_loss": rows[-1]["loss"] if rows else None,
        "tokens_per_s": statistics.median(speeds) if speeds else None,
    }


def _release_memory() -> None:
    # One model at a time: the previous run's arrays go before the next load.
    gc.collect()
    mx.clear_cache()


def _read_record(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MlxMoeError(f"{path}: unreadable ({exc}); delete it to evaluate again") from exc


def _row(record: dict[str, Any]) -> AblationRow:
    report, trained = record["eval"], record.get("train") or {}
    return AblationRow(
        name=record["configuration"],
        rouge_l=report["rouge_l"],
        perplexity=report["perplexity"],
        spread=(report.get("experts") or {}).get("spread"),
        generation_tps=report["generation_tps"],
        prompt_tps=report["prompt_tps"],
        trainable=trained.get("trainable"),
        trainable_percent=trained.get("trainable_percent"),
        steps=trained.get("steps"),
        final_loss=trained.get("final_loss"),
        train_tokens_per_s=trained.get("tokens_per_s"),
        stopped=trained.get("stopped"),
    )


def markdown_rows(columns, rows: Sequence[AblationRow]) -> list[str]:
    return [
        "| " + " | ".join(header for _, header, _ in columns) + " |",
        "| --- |" + " ---: |" * (len(columns) - 1),
        *("| " + " | ".join(row.cell(key, spec) for key, _, spec in columns) + " |" for row in rows),
    ]


def markdown_table(result: AblationResult) -> str:
    train = result.settings["recipe"]["train"]
    lora = result.settings["recipe"]["lora"]
    model = result.settings["recipe"]["model"]
    lines = [
        f"# Ablation: {model}",
        "",
        f"Evaluated on `{result.eval_data}`; every strategy trained on "
        f"`{result.settings['recipe']['data']['path']}` for {train['iters']} steps "
        f"(batch {train['batch_size']} x {train['grad_accum']} accumulated, "
        f"learning rate {train['learning_rate']:g}, seed {train['seed']}, LoRA rank {lora['rank']}, "
        f"base {_base_text(train)}).",
        "",
    ]
    lines += markdown_rows(EVAL_COLUMNS, result.rows)
    lines.append("")
    lines += markdown_rows(TRAIN_COLUMNS, [row for row in result.rows if row.name != BASE])
    lines.append("")
    lines.append(
        "Expert spread: std-dev of (load x experts) per MoE layer on the evaluation "
        "pass, mean of the layers; 0 = balanced."
    )
    for row in result.rows:
        if row.stopped:
            lines.append(f"- `{row.name}` stopped early: {row.stopped}")
    for strategy, why in result.skipped.items():
        lines.append(f"- `{strategy}` skipped: {why}")
    if result.plots:
        lines.append("")
        lines.extend(f"![{p.stem}]({p.relative_to(result.out_dir)})" for p in result.plots)
    return "\n".join(lines) + "\n"


def _training_plots(run_dir: Path, title: str, say: Callable[[str], None]) -> list[Path]:
    from .plots import training_plots

    try:
        return training_plots(run_dir, title)
    except MlxMoeError as exc:  # e.g. a run stopped before its first report
        say(f"{title}: no training plots: {exc}")
        return []


def _ablation_plots(
    out: Path, strategies: list[str], rows: list[AblationRow], records: list[dict], say: Callable[[str], None]
) -> list[Path]:
    """Each strategy's training plots (drawn now if a run with plots off left none), the
    bars, and every configuration's expert load on the evaluation pass."""
    from .plots import LOAD_PLOT, LOSS_PLOT, ablation_figure, load_heatmap_figure, load_matrix, save

    written = []
    for name in strategies:
        run_dir = out / name
        existing = [run_dir / f for f in (LOSS_PLOT, LOAD_PLOT) if (run_dir / f).is_file()]
        written.extend(existing or _training_plots(run_dir, name, say))
    written.append(
        save(
            ablation_figure(
                [dataclasses.asdict(r) for r in rows], f"ablation ({len(rows) - 1} strategies and the base)"
            ),
            out / BARS_PLOT,
        )
    )
    panels = []
    for record in records:
        experts = record["eval"].get("experts")
        if experts:
            layers, matrix = load_matrix(experts)
            spread = experts.get("spread")
            detail = f" (spread {spread:.2f})" if spread is not None else ""
            panels.append((f"{record['configuration']}{detail}", layers, matrix))
    if panels:
        written.append(save(load_heatmap_figure(panels), out / ABLATION_LOAD_PLOT))
    return written


def _base_text(train: dict) -> str:
    """The recorded recipe's base: "4-bit", "4-bit, experts 3-bit" or "float"."""
    q = quantization(train["quantize"], train.get("group_size", 64))
    return q.per_role() if q else "float"
