"""``mlxmoe demo``: the whole pipeline on real weights and real data, from nothing.

The Python FAQ (``faq``) -> SmolLM2-135M-Instruct upcycled into a 4-expert MoE (``upcycle``)
-> evaluated -> LoRA-trained with the default strategy (``train``) -> evaluated again ->
merged into a q8_0 GGUF (``gguf.export``) -> answered by a real llama.cpp -> an Ollama
Modelfile (``ollama``). Every stage is the same Python API the other commands call.

Stages whose output exists are reused (the dataset, the upcycled model, a finished or
interrupted training run), so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .atomic import write_text_atomic
from .errors import MlxMoeError
from .recipe import Recipe, load_recipe, recipes_dir
from .rouge import rouge_l

DEMO_RECIPE = "smollm2-faq-demo.yaml"
GGUF_NAME = "smollm2-moe-faq-q8_0.gguf"


@dataclass
class DemoSettings:
    out: Path = Path("demo")
    recipe: Path | None = None  # default: the packaged recipes/smollm2-faq-demo.yaml
    iters: int | None = None  # overrides the recipe's
    dtype: str | None = None  # overrides the recipe's train.dtype (mlxmoe.dtypes)
    eval_answers: int = 4  # held-out questions answered (greedily) before and after training
    max_new_tokens: int = 64
    question: int = 0  # which held-out question llama.cpp answers
    ollama_name: str = "smollm2-moe-faq"


@dataclass
class DemoReport:
    out: str
    blas: str
    stages_s: dict[str, float] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    base: dict[str, Any] = field(default_factory=dict)
    tuned: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    gguf: dict[str, Any] = field(default_factory=dict)
    llama_cpp: dict[str, Any] = field(default_factory=dict)
    modelfile: str = ""
    ollama: str = ""
    plots: list[str] = field(default_factory=list)

    @property
    def perplexity_fell(self) -> bool:
        return self.tuned["perplexity"] < self.base["perplexity"]

    @property
    def llama_cpp_answered(self) -> bool:
        return bool(self.llama_cpp.get("answer", "").strip())


Say = Callable[[str], None]
# (label, done, total): progress within a stage (evaluation samples, exported tensors)
Tick = Callable[[str, int, int], None]


def _no_tick(label: str, done: int, total: int) -> None:
    pass


def demo_recipe(settings: DemoSettings, model: Path, data: Path) -> Recipe:
    recipe = load_recipe(
        settings.recipe or recipes_dir() / DEMO_RECIPE,
        train={"iters": settings.iters, "dtype": settings.dtype},
    )
    recipe.model, recipe.data.path = str(model), str(data)
    return recipe


def run_demo(settings: DemoSettings, say: Say = print, tick: Tick = _no_tick) -> DemoReport:
    from .blas import demo_time, describe
    from .plots import training_plots

    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    report = DemoReport(str(out), describe())
    say(report.blas)
    expected = demo_time()  # None off Linux: never measured on Metal
    if expected:
        say(expected)
    data, model, run = out / "data", out / "model", out / "run"
    recipe = demo_recipe(settings, model, data)  # a bad recipe fails before any work

    with _Stage(report, "data", say, "building the Python FAQ dataset"):
        report.data = _dataset(data, say)
    with _Stage(report, "upcycle", say, "upcycling SmolLM2-135M-Instruct into a 4-expert MoE"):
        _upcycled_model(model, say)
    with _Stage(report, "eval base", say, "evaluating the base model on the held-out questions"):
        report.base = _evaluate(model, data, None, recipe.train.dtype, settings, tick)
    with _Stage(
        report,
        "train",
        say,
        f"training LoRA ({recipe.lora.strategy} strategy, "
        f"{recipe.train.iters} steps of {recipe.train.batch_size})",
    ):
        report.training = _train(recipe, run, say)
        report.plots = [str(p) for p in training_plots(run, "mlxmoe demo: SmolLM2 MoE on the Python FAQ")]
    with _Stage(report, "eval tuned", say, "evaluating the fine-tuned model"):
        report.tuned = _evaluate(model, data, run, recipe.train.dtype, settings, tick)
    gguf_path = out / GGUF_NAME
    with _Stage(report, "export", say, "merging the adapters into a q8_0 GGUF"):
        report.gguf = _export(model, run, gguf_path, tick)
    with _Stage(report, "llama.cpp", say, "asking llama.cpp a held-out question"):
        report.llama_cpp = _ask_llama_cpp(gguf_path, model, data, settings)
    with _Stage(report, "ollama", say, "writing the Ollama Modelfile"):
        report.modelfile, report.ollama = _modelfile(out, gguf_path, model, settings.ollama_name)
    write_text_atomic(out / "demo.json", json.dumps(asdict(report), indent=2) + "\n")
    return report


class _Stage:
    """Times one stage into ``report.stages_s`` and announces it."""

    def __init__(self, report: DemoReport, name: str, say: Say, what: str):
        self.report, self.name, self.say, self.what = report, name, say, what

    def __enter__(self):
        self.say(f"[{len(self.report.stages_s) + 1}/8] {self.what}")
        self.started = time.perf_counter()

    def __exit__(self, *exc):
        self.report.stages_s[self.name] = round(time.perf_counter() - self.started, 1)


def _dataset(folder: Path, say: Say) -> dict[str, Any]:
    from .data.faq import build_dataset

    info = folder / "info.json"
    if not info.is_file():
        build_dataset(folder)
    else:
        say(f"  reusing {folder}")
    meta = json.loads(info.read_text())
    return {"source": meta["source"], "origin": meta["origin"], "counts": meta["counts"]}


def _upcycled_model(folder: Path, say: Say) -> None:
    import tempfile

    from .gguf.importer import gguf_to_hf
    from .upcycle import default_dense_gguf, upcycle

    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        say(f"  reusing {folder}")  # upcycle writes the folder atomically: complete if present
        return
    with tempfile.TemporaryDirectory() as tmp:
        dense = gguf_to_hf(default_dense_gguf(), Path(tmp) / "dense")
        upcycle(dense, folder, layout="mixtral", n_experts=4, top_k=2)


def _evaluate(
    model: Path, data: Path, adapter: Path | None, dtype: str, settings: DemoSettings, tick: Tick
) -> dict:
    from .evaluate import evaluate

    report = evaluate(
        model,
        data / "test.jsonl",
        adapter=adapter,
        dtype=dtype,
        max_new_tokens=settings.max_new_tokens,
        generate_limit=settings.eval_answers,
        progress=lambda done, total: tick("eval", done, total),
    )
    answered = [s for s in report.per_sample if s.generated is not None]
    return {
        "perplexity": report.perplexity,
        "rouge_l": report.rouge_l,
        "samples": report.samples,
        "answer_tokens": report.answer_tokens,
        "generated": report.generated_samples,
        "generation_tps": report.generation_tps,
        "spread": (report.experts or {}).get("spread"),
        "answers": [
            {"reference": s.reference, "generated": s.generated, "rouge_l": s.rouge_l} for s in answered
        ],
    }


def _train(recipe: Recipe, run: Path, say: Say) -> dict[str, Any]:
    from .train import train
    from .train.state import latest_checkpoint

    config = run / "adapter_config.json"
    if config.is_file() and json.loads(config.read_text()).get("steps") == recipe.train.iters:
        say(f"  reusing the finished run in {run}")
    else:
        result = train(recipe, run, resume=latest_checkpoint(run) is not None)
        if result.stopped:
            raise MlxMoeError(f"training stopped early: {result.stopped}")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    return {
        "steps": rows[-1]["step"],
        "first_loss": rows[0]["loss"],
        "last_loss": rows[-1]["loss"],
        "val_loss": next((r["val_loss"] for r in reversed(rows) if "val_loss" in r), None),
        "tokens_per_s": sum(speeds) / len(speeds) if speeds else None,
        "peak_memory_gb": max(r["peak_memory_gb"] for r in rows),
        "adapters": str(run / "adapters.safetensors"),
    }


def _export(model: Path, run: Path, path: Path, tick: Tick) -> dict[str, Any]:
    from .gguf.export import export_gguf

    result = export_gguf(
        model, path, "q8_0", adapter=run, on_tensor=lambda done, total, name: tick("export", done, total)
    )
    return {"path": str(result.path), "bytes": result.bytes, "seconds": result.seconds}


def held_out_question(data: Path, index: int) -> dict[str, str]:
    lines = (data / "test.jsonl").read_text().splitlines()
    if not 0 <= index < len(lines):
        raise MlxMoeError(f"{data / 'test.jsonl'}: no question {index} (it has {len(lines)})")
    return json.loads(lines[index])


def _ask_llama_cpp(gguf_path: Path, model: Path, data: Path, settings: DemoSettings) -> dict:
    from .gguf.llamacpp import open_gguf
    from .gguf.ollama import chat_formats, detect_chat_format
    from .load import load_tokenizer
    from .thinking import non_thinking_prompt, reply_answer

    sample = held_out_question(data, settings.question)
    tokenizer = load_tokenizer(model)
    # The prompt `mlxmoe eval` scores answers after: a thinking model answers without a think block.
    prompt = non_thinking_prompt(tokenizer, [{"role": "user", "content": sample["prompt"]}])
    started = time.perf_counter()
    with open_gguf(gguf_path, n_ctx=1024, logits_all=False) as llm:
        result = llm.create_completion(
            prompt,
            max_tokens=settings.max_new_tokens,
            temperature=0.0,
            stop=chat_formats()[detect_chat_format(model)]["stop"],
        )
    answer = reply_answer(result["choices"][0]["text"]).strip()
    return {
        "question": sample["prompt"],
        "reference": sample["completion"],
        "answer": answer,
        "rouge_l": rouge_l(sample["completion"], answer).f1,
        "tokens": result["usage"]["completion_tokens"],
        "seconds": round(time.perf_counter() - started, 2),
    }


def _modelfile(out: Path, gguf_path: Path, model: Path, name: str) -> tuple[str, str]:
    from .gguf.ollama import (
        create_model,
        default_system_prompt,
        detect_chat_format,
        model_parameters,
        write_modelfile,
    )

    path = write_modelfile(
        out,
        gguf_path,
        detect_chat_format(model),
        system=default_system_prompt(model),
        params=model_parameters(model),
    )
    return str(path), create_model(path, name)
