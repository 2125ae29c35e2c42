"""The training loop, top to bottom: model, adapters, data, optimizer, steps, reports,
checkpoints.

Started by ``mlx.launch``, every rank runs this same loop on its shard of each global batch
(see ``distributed``); rank 0 alone reads and writes the run folder and reports progress."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

from ..adapt import apply_adapters, trainable_report
from ..adapt.files import adapter_config, adapter_tensors, save_adapters, weights_fingerprint
from ..atomic import write_text_atomic
from ..blas import describe as describe_blas
from ..data.batches import BatchSchedule
from ..data.tokenize_worker import TokenizeJob
from ..dtypes import dtype_name, resolve_dtype
from ..errors import MlxMoeError
from ..hub import resolve
from ..load import load_model
from ..memory import peak_memory_gb
from ..monitor import ExpertMonitor
from ..nn.moe import Router, set_dispatch
from ..recipe import Recipe
from .distributed import World, fingerprint, share_run
from .progress import TrainProgress
from .state import (
    RunState,
    check_resume,
    latest_checkpoint,
    load_checkpoint,
    read_checkpoint,
    remove_stale_checkpoints,
    save_checkpoint,
)
from .step import Stepper, evaluate_loss

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.jsonl"


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    loss: float | None  # mean loss of the last report window
    val_loss: float | None
    trainable: dict[str, Any]
    truncated: int
    stopped: str | None  # why the run ended early, or None
    rank: int = 0  # of a distributed run: only rank 0 wrote out_dir
    world_size: int = 1


def data_files(data: str | Path) -> tuple[Path, Path | None]:
    """A folder with train.jsonl (and optionally valid.jsonl), or one JSONL file."""
    path = Path(data)
    if path.is_dir():
        train = path / "train.jsonl"
        if not train.is_file():
            raise MlxMoeError(f"{path}: no train.jsonl")
        valid = path / "valid.jsonl"
        return train, (valid if valid.is_file() else None)
    if not path.is_file():
        raise MlxMoeError(f"{path}: no such data file or folder")
    return path, None


def learning_rate_schedule(cfg) -> optim.schedulers.Callable:
    decay = optim.cosine_decay(
        cfg.learning_rate, max(cfg.iters - cfg.warmup, 1), cfg.learning_rate * cfg.min_lr_ratio
    )
    if cfg.warmup <= 0:
        return decay
    warm = optim.linear_schedule(cfg.learning_rate / max(cfg.warmup, 1), cfg.learning_rate, cfg.warmup)
    return optim.join_schedules([warm, decay], [cfg.warmup])


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The RNG seed of one step: a resumed run draws the same dropout masks. Ranks draw
    different masks (their shards are different data), rank 0 those of a lone process."""
    return (seed * 1_000_003 + step + rank * 0x9E3779B9) % 2**32


def _rewind_metrics(path: Path, step: int) -> None:
    """Drop report lines past the checkpoint we resume from (the killed run's tail)."""
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
        if len(kept) < len(lines):  # atomic: a kill here must not cost the kept rows
            write_text_atomic(path, "".join(line + "\n" for line in kept))


def train(
    recipe: Recipe, out_dir: str | Path, resume: bool = False, show_progress: bool = True
) -> TrainResult:
    cfg = recipe.train
    if not recipe.model:
        raise MlxMoeError("no model: pass --model or set 'model' in the recipe")
    if not recipe.data.path:
        raise MlxMoeError("no data: pass --data or set 'data' in the recipe")
    world = World.init()
    if cfg.batch_size % world.size:
        raise MlxMoeError(
            f"batch_size {cfg.batch_size} does not split over {world.size} ranks: it is the global "
            f"batch, of which each rank takes batch_size / {world.size} sequences (e.g. double "
            "batch_size and halve grad_accum: the same sequences per step)"
        )
    out = Path(out_dir)
    previous = latest_checkpoint(out) if world.is_main else None  # only rank 0 sees the run
    if world.is_main and previous is not None and not resume:
        raise MlxMoeError(
            f"{out} already holds a run (at {previous.name}); pass --resume or use another --out"
        )
    if world.is_main and resume and previous is None:
        raise MlxMoeError(
            f"{out}: nothing to resume (no checkpoint yet); a run stopped before its "
            "first checkpoint starts over: run the same command without --resume"
        )
    if world.is_main:
        remove_stale_checkpoints(out)
    train_file, valid_file = data_files(recipe.data.path)
    recipe_dict = recipe.to_dict()
    saved = read_checkpoint(previous) if resume and world.is_main else None

    mx.random.seed(cfg.seed)
    folder = resolve(recipe.model)
    if saved is not None:  # settings, weights and dtype: refused before anything loads
        check_resume(
            previous,
            saved,
            recipe_dict,
            base=weights_fingerprint(folder),
            dtype=dtype_name(resolve_dtype(cfg.dtype)),
        )
    # The tokenizer (transformers, torch: ~300 MB) lives in a child process only, which
    # tokenizes while the model loads.
    with TokenizeJob(
        folder, [train_file, valid_file], cfg.max_seq_len, recipe.loss.mask_prompt, recipe.data.thinking
    ) as job:
        model = load_model(folder, quantize=cfg.quantize, group_size=cfg.group_size, dtype=cfg.dtype)
        train_set, valid_set = job.result()
    data_fingerprint = fingerprint([(e.tokens, e.loss_mask) for e in train_set.examples]).hex()[:32]
    if saved is not None:
        check_resume(previous, saved, recipe_dict, data=data_fingerprint)
    for _, module in model.named_modules():
        if isinstance(module, Router):
            module.temperature, module.jitter = recipe.loss.router_temperature, recipe.loss.router_jitter
    adapted = apply_adapters(model, recipe.lora)
    try:
        dispatch = set_dispatch(model, cfg.moe_dispatch)
    except ValueError as exc:
        raise MlxMoeError(f"train.moe_dispatch: {exc}") from exc
    model.grad_checkpoint = cfg.grad_checkpoint
    model.train()
    trainable = trainable_report(model)

    schedule = BatchSchedule(train_set, cfg.batch_size, seed=cfg.seed)
    optimizer = optim.AdamW(learning_rate=learning_rate_schedule(cfg), weight_decay=cfg.weight_decay)
    optimizer.init(model.trainable_parameters())
    stepper = Stepper(model, optimizer, recipe.loss, cfg.grad_clip, cfg.compile, world)

    monitor = None
    if model.moe_layers:
        monitor = ExpertMonitor(
            model.moe_layers, model.args.num_experts, model.args.num_experts_per_tok, recipe.collapse
        )
    state = RunState()
    if resume and world.is_main:
        state, _ = load_checkpoint(previous, model, optimizer)
    if world.is_main:  # a fresh start drops the rows of a run killed before its first checkpoint
        _rewind_metrics(out / METRICS_FILE, state.step)
    config = adapter_config(model, recipe.lora, adapted, str(recipe.model))
    # what a resume compares (state.check_resume)
    fingerprints = {"base": config["base_fingerprint"], "data": data_fingerprint, "dtype": config["dtype"]}

    def checkpoint() -> None:
        world.check_same(f"adapters at step {state.step}", adapter_tensors(model))
        if monitor is not None:
            state.lora_update_counts = {"counts": monitor.lora_update_counts.tolist()}
        if world.is_main:
            save_checkpoint(out, model, optimizer, state, recipe_dict, fingerprints)

    window = _Window()
    alarmed_seen: set[int] = set()
    last_loss = val_loss = None
    stopped = None
    progress = TrainProgress(cfg.iters, state.step, enabled=show_progress and world.is_main)

    def lost_rank() -> str:
        return _lost_rank_hint(out, state.step, world)

    with world.stop_together(lost_rank), progress, _metrics_log(out, world) as metrics:
        # Every rank takes the same steps on the same model and data (paths may differ between
        # machines, contents not), from rank 0's adapters, optimizer and run state.
        world.check_same(
            "the base model, data or recipe",
            config["base_fingerprint"],
            {k: v for k, v in recipe_dict.items() if k not in ("model", "data")},
            [(e.tokens, e.loss_mask) for e in train_set.examples],
            [(e.tokens, e.loss_mask) for e in valid_set.examples] if valid_set else None,
        )
        state = share_run(world, model, optimizer, state)
        if monitor is not None and state.lora_update_counts:
            monitor.lora_update_counts = np.array(state.lora_update_counts["counts"], np.int64)
        if model.moe_layers:
            progress.note(f"{describe_blas()}; MoE dispatch: {dispatch}")
        progress.note(
            f"trainable {trainable['trainable']:,} of {trainable['total']:,} parameters "
            f"({trainable['percent']:.2f}%): {trainable['groups']}"
        )
        if world.size > 1:
            progress.note(
                f"data-parallel on {world.size} ranks: each trains on "
                f"{cfg.batch_size // world.size} of the {cfg.batch_size} sequences "
                f"of every batch (balance scope: {recipe.loss.balance_scope})"
            )
        while state.step < cfg.iters:
            mx.random.seed(step_seed(cfg.seed, state.step, world.rank))
            first = state.step * cfg.grad_accum
            batches = [schedule.batch(first + j, world.rank, world.size) for j in range(cfg.grad_accum)]
            result = stepper.step(batches)
            state.step += 1
            if result.finite:
                state.nan_streak = 0
                state.trained_tokens += result.target_tokens
                window.add(result)
                if monitor is not None:
                    monitor.update(np.array(result.counts), np.array(result.entropy))
            else:
                state.skipped_steps += 1
                state.nan_streak += 1
                progress.note(f"step {state.step}: non-finite loss or gradient, update skipped")
                if state.nan_streak >= cfg.nan_patience:
                    checkpoint()
                    stopped = f"{state.nan_streak} non-finite steps in a row"
                    break
            at_end = state.step == cfg.iters
            if valid_set and cfg.val_every and (state.step % cfg.val_every == 0 or at_end):
                vs = BatchSchedule(valid_set, cfg.batch_size, seed=cfg.seed)
                val_loss = evaluate_loss(
                    model,
                    [
                        vs.batch(i, world.rank, world.size)
                        for i in range(min(cfg.val_batches, vs.batches_per_epoch()))
                    ],
                    world,
                )
            if state.step % cfg.report_every == 0 or at_end:
                row = window.close(state, optimizer, val_loss, world)
                if monitor is not None:
                    row["experts"] = monitor.report()
                last_loss = row.get("loss", last_loss)
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
                progress.report(row)
                alarm = row.get("experts", {}).get("alarm")
                # metrics.jsonl has every report's alarm; the screen, layers alarmed anew
                if alarm and (set(monitor.alarmed_layers) - alarmed_seen or monitor.should_stop):
                    progress.note(
                        f"[yellow]router collapse alarm:[/] {_short_alarm(alarm, row['experts'], monitor)}"
                    )
                    alarmed_seen.update(monitor.alarmed_layers)
                if alarm and monitor.should_stop:
                    checkpoint()
                    stopped = f"router collapse: {alarm}"
                    break
            if cfg.save_every and state.step % cfg.save_every == 0 and not at_end:
                checkpoint()
            progress.advance(state.step)
        else:
            checkpoint()
    if world.is_main:
        save_adapters(model, out, {**config, "steps": state.step, "truncated": train_set.truncated})
    return TrainResult(
        out, state.step, last_loss, val_loss, trainable, train_set.truncated, stopped, world.rank, world.size
    )


def _short_alarm(alarm: str, experts: dict, monitor: ExpertMonitor, shown: int = 2) -> str:
    """The alarm of a few layers in full; of many, one line: which layers, how busy."""
    alarmed = monitor.alarmed_layers
    if len(alarmed) <= shown:
        return alarm
    shares = [e["max_share"] for e in experts["layers"] if e["layer"] in alarmed and e["max_share"]]
    busiest = (
        (
            f"the busiest expert sees {min(shares):.0%}-{max(shares):.0%} of a layer's tokens "
            f"(max_expert_share {monitor.max_expert_share:g}) or the spread is over "
            f"{monitor.rule.max_spread:g}"
        )
        if shares
        else "over the thresholds"
    )
    verdict = "stopping training" if monitor.should_stop else "continuing (action warn)"
    return (
        f"{len(alarmed)} of {len(experts['layers'])} MoE layers ({', '.join(map(str, alarmed))}): "
        f"{busiest}, for {monitor.rule.patience}+ reports; {verdict}; each report's details "
        "are in metrics.jsonl"
    )


def _metrics_log(out: Path, world: World):
    """metrics.jsonl, appended to by rank 0; the other ranks write their rows nowhere."""
    if not world.is_main:
        return open(os.devnull, "w")
    out.mkdir(parents=True, exist_ok=True)
    return (out / METRICS_FILE).open("a")


def _lost_rank_hint(out: Path, step: int, world: World) -> str:
    if not world.is_main:
        return f"after {step} steps; rank 0 holds the checkpoints"
    last = latest_checkpoint(out)
    if last is None:
        return (
            f"after {step} steps; no checkpoint was written yet. Run the same command "
            "(without --resume) to start over."
        )
    return (
        f"after {step} steps; the last checkpoint is {last}. Run the same command with --resume to continue."
    )


class _Window:
    """Sums over one report window."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.steps, self.loss, self.ce, self.aux, self.z, self.grad_norm = 0, 0.0, 0.0, 0.0, 0.0, 0.0
        self.tokens, self.rank_tokens, self.comm_s = 0, 0, 0.0
        self.started = time.perf_counter()

    def add(self, r) -> None:
        self.steps += 1
        self.loss += r.loss
        self.ce += r.ce
        self.aux += r.aux
        self.z += r.z
        self.grad_norm += r.grad_norm
        self.tokens += r.tokens
        self.rank_tokens += r.rank_tokens
        self.comm_s += r.comm_s

    def close(self, state: RunState, optimizer, val_loss: float | None, world: World) -> dict[str, Any]:
        n = max(self.steps, 1)
        elapsed = time.perf_counter() - self.started
        row = {
            "step": state.step,
            "loss": self.loss / n,
            "ce": self.ce / n,
            "aux": self.aux / n,
            "z": self.z / n,
            "grad_norm": self.grad_norm / n,
            "learning_rate": float(optimizer.learning_rate.item()),
            "tokens_per_s": self.tokens / elapsed if elapsed > 0 else 0.0,
            "step_s": elapsed / n,
            "peak_memory_gb": peak_memory_gb(),
            "mlx_peak_memory_gb": mx.get_peak_memory() / 1e9,
            "trained_tokens": state.trained_tokens,
            "skipped_steps": state.skipped_steps,
        }
        if val_loss is not None:
            row["val_loss"] = val_loss
        if world.size > 1:  # tokens_per_s above counts every rank's tokens
            row["comm_s"] = self.comm_s / n
            per_rank = world.gather(
                [
                    self.rank_tokens / elapsed if elapsed > 0 else 0.0,
                    peak_memory_gb(),
                    mx.get_peak_memory() / 1e9,
                ]
            )
            row["ranks"] = [
                {
                    "rank": r,
                    "tokens_per_s": float(tps),
                    "peak_memory_gb": float(mem),
                    "mlx_peak_memory_gb": float(mlx_mem),
                }
                for r, (tps, mem, mlx_mem) in enumerate(per_rank)
            ]
        self.reset()
        return row
