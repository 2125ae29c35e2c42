"""Evaluate a model, with or without adapters, on a JSONL file of questions and answers.

What is measured, and how it relates to training:

- perplexity = exp(mean cross-entropy over answer tokens), token-weighted over the whole file:
  the same samples -> tokens -> loss mask as training (``samples.encode_sample``), the same
  shift into a ``Batch`` (``BatchSchedule``), the same loss (``train.step.answer_cross_entropy``).
  So exp(validation loss) of a training run on that file is this perplexity (up to truncation:
  ``max_seq_len``).
- ROUGE-L F1 (``rouge``) of a greedy answer against the reference answer: the completion,
  or the content of the last assistant message. The prompt is every token before the
  answer, i.e. what the chat template renders before the assistant turn. Samples are rendered
  as ``data.thinking: off`` trains them: reasoning in the data is dropped, and a thinking
  model's template prompts for an answer without reasoning (Qwen3's ends the prompt with
  its empty think block), so perplexity and ROUGE-L are of the answer alone (gpt-oss's prompt
  ends with an empty analysis message: its answer, scored, opens with the final channel's
  header, which ROUGE-L leaves out). Generation runs
  through mlx-lm's ``stream_generate`` (argmax sampling, stops at an end-of-turn token or
  after ``max_new_tokens``). Samples in the ``text`` format have no reference: they count
  for perplexity only.
- expert load per MoE layer, with ``monitor.ExpertMonitor``'s definitions (the training
  monitor's): top-k assignments of every real token of the teacher-forced pass (prompt and
  answer), one report window over the whole file. ``spread`` 0 is perfectly balanced.
- prompt and generation tokens/s as mlx-lm reports them per sample, pooled as total tokens
  over total time; peak memory is MLX's peak allocation over the whole run, model included.

Adapters are attached as trained (``adapters.load_adapters``), never merged, on a base
loaded with the quantization recorded in their ``adapter_config.json`` unless told otherwise.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from .adapt.files import check_adapter_base, load_adapters, trained_quantization
from .data.batches import BatchSchedule
from .data.samples import Dataset, Example, SampleEncoder, encode_sample, read_samples
from .dtypes import dtype_name
from .errors import MlxMoeError
from .hub import resolve
from .load import load_model, require_tokenizer
from .losses import expert_counts, router_entropy
from .monitor import CollapseRule, ExpertMonitor
from .quantize import NO_QUANTIZATION, Quantization, quantization
from .rouge import RougeL, rouge_l
from .thinking import answer_text, reply_answer
from .train.step import answer_cross_entropy

DEFAULT_MAX_NEW_TOKENS = 128
DEFAULT_MAX_SEQ_LEN = 2048
LAYER_FIELDS = ("layer", "tokens", "spread", "max_share", "busiest_expert", "dead_experts", "entropy", "load")


@dataclass
class SampleResult:
    where: str  # file:line
    answer_tokens: int  # answer tokens scored for perplexity (0: none within max_seq_len)
    cross_entropy: float | None  # mean over this sample's answer tokens
    reference: str | None = None
    generated: str | None = None
    rouge_l: float | None = None
    finish_reason: str | None = None  # "stop" (end of turn) or "length" (max_new_tokens)


@dataclass
class EvalReport:
    model: str
    adapter: str | None
    data: str
    samples: int
    answer_tokens: int
    cross_entropy: float
    perplexity: float
    rouge_l: float | None  # mean F1 over the samples with a reference
    rouge_l_precision: float | None
    rouge_l_recall: float | None
    generated_samples: int
    prompt_tokens: int
    prompt_tps: float | None
    generation_tokens: int
    generation_tps: float | None
    peak_memory_gb: float
    experts: dict[str, Any] | None  # overall spread and max_share, and per-layer entries
    truncated: int  # samples cut to max_seq_len for perplexity
    dtype: str = "float32"  # what the model computed in
    quantization: str = "none"  # the base's bits and group size, or "none"
    per_sample: list[SampleResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def eval_file(data: str | Path) -> Path:
    """A JSONL file, or a folder: its test.jsonl, else its valid.jsonl."""
    path = Path(data)
    if path.is_dir():
        for name in ("test.jsonl", "valid.jsonl"):
            if (path / name).is_file():
                return path / name
        raise MlxMoeError(f"{path}: no test.jsonl or valid.jsonl")
    if not path.is_file():
        raise MlxMoeError(f"{path}: no such data file or folder")
    return path


def evaluate(
    model_path: str | Path,
    data_path: str | Path,
    adapter: str | Path | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    limit: int | None = None,
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
    quantize: Any = None,
    group_size: int = 64,
    dtype: str | None = None,
    generate: bool = True,
    progress: Callable[[int, int], None] | None = None,
    generate_limit: int | None = None,
    force: bool = False,
) -> EvalReport:
    """Perplexity, ROUGE-L, expert load, speed and memory of a model on ``data_path``.

    ``quantize``: the base's scheme as ``load_model`` takes it (bits, ``NO_QUANTIZATION`` for
    float weights, ``"4,experts=3"``, ...); None, as the adapter was trained (float weights
    without an adapter). ``limit``
    keeps the first samples of the file. ``generate`` False skips generation (perplexity and
    experts only). ``progress`` is called with (samples done, samples in all) after each
    sample. ``generate_limit`` generates answers for the first N samples only (perplexity
    still covers all). ``dtype``: what the model computes in (``dtypes.DTYPE_CHOICES``; None
    is auto). An adapter trained on other base weights is refused unless ``force``.
    """
    if max_new_tokens < 1:
        raise MlxMoeError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if limit is not None and limit < 1:
        raise MlxMoeError(f"limit must be at least 1, got {limit}")
    path = eval_file(data_path)
    mx.reset_peak_memory()
    scheme = _quantization(adapter, quantize, group_size)
    if adapter is not None and not force:  # before the model loads: an error in seconds
        check_adapter_base(adapter, resolve(model_path))
    model = load_model(model_path, quantize=scheme, dtype=dtype)
    tokenizer = require_tokenizer(model.source)
    if adapter is not None:
        load_adapters(model, adapter, check_base=False)
    model.eval()

    encoder = SampleEncoder(tokenizer, thinking="off")
    samples = list(read_samples(path))[:limit]
    if not samples:
        raise MlxMoeError(f"{path}: no samples")
    results: list[SampleResult] = []
    examples: list[Example] = []
    owners: list[int] = []  # the sample of each example
    prompts: list[np.ndarray | None] = []
    truncated = 0
    for where, sample in samples:
        encoded = encode_sample(encoder, sample, where, max_seq_len)
        prompts.append(_generation_prompt(sample, encoded.tokens, encoded.loss_mask))
        truncated += int(encoded.truncated)
        results.append(SampleResult(where, encoded.target_tokens, None, _reference(sample)))
        if encoded.target_tokens:
            owners.append(len(results) - 1)
            examples.append(encoded.example)
    if not examples:
        raise MlxMoeError(f"{path}: no sample has an answer token within max_seq_len={max_seq_len}")
    if generate_limit is not None:
        prompts = [p if i < generate_limit else None for i, p in enumerate(prompts)]

    monitor = None
    if model.moe_layers:
        monitor = ExpertMonitor(
            model.moe_layers, model.args.num_experts, model.args.num_experts_per_tok, CollapseRule()
        )
    total = len(examples) + (sum(p is not None for p in prompts) if generate else 0)
    tick = _Ticker(progress, total)
    ce_sum = _score_answers(model, Dataset(examples, path, truncated, 0), owners, results, monitor, tick)
    answer_tokens = sum(r.answer_tokens for r in results if r.cross_entropy is not None)
    speed, scored = _Speed(), []
    if generate:
        scored = _generate_answers(model, tokenizer, prompts, results, max_new_tokens, speed, tick)

    ce_mean = ce_sum / max(answer_tokens, 1)
    return EvalReport(
        model=str(model_path),
        adapter=str(adapter) if adapter is not None else None,
        data=str(path),
        samples=len(results),
        answer_tokens=answer_tokens,
        cross_entropy=ce_mean,
        perplexity=math.exp(ce_mean),
        rouge_l=_mean([s.f1 for s in scored]),
        rouge_l_precision=_mean([s.precision for s in scored]),
        rouge_l_recall=_mean([s.recall for s in scored]),
        generated_samples=len(scored),
        prompt_tokens=speed.prompt_tokens,
        prompt_tps=speed.prompt_tps,
        generation_tokens=speed.generation_tokens,
        generation_tps=speed.generation_tps,
        peak_memory_gb=mx.get_peak_memory() / 1e9,
        experts=_expert_summary(monitor),
        truncated=truncated,
        dtype=dtype_name(model.compute_dtype),
        quantization=str(model.quantization) if model.quantization else "none",
        per_sample=results,
    )


def _score_answers(
    model,
    dataset: Dataset,
    owners: list[int],
    results: list[SampleResult],
    monitor: ExpertMonitor | None,
    tick,
) -> float:
    """Teacher-forced pass: each sample's answer cross-entropy (into ``results``) and expert
    counts (into ``monitor``); returns the sum of cross-entropy over all answer tokens."""
    # Batch size 1: every sample once, unpadded, shifted into inputs/targets as in training.
    schedule = BatchSchedule(dataset, batch_size=1, pad_multiple=1)
    ce_sum = 0.0
    for index in range(len(dataset.examples)):
        (row,), _ = schedule.samples(index)
        batch = schedule.batch(index)
        h, routers = model.hidden_states(batch.inputs)
        ce = answer_cross_entropy(model, batch, h) / max(batch.num_target_tokens, 1)
        if monitor is not None:
            counts = expert_counts(routers, monitor.top_k, batch.token_mask)
            entropy = router_entropy(routers, batch.token_mask)
            mx.eval(ce, counts, entropy)
            monitor.update(np.array(counts), np.array(entropy))
        results[owners[row]].cross_entropy = ce.item()
        ce_sum += ce.item() * batch.num_target_tokens
        tick()
    return ce_sum


def _generate_answers(
    model,
    tokenizer,
    prompts: list[np.ndarray | None],
    results: list[SampleResult],
    max_new_tokens: int,
    speed: _Speed,
    tick,
) -> list[RougeL]:
    """Greedy answers for the samples with a prompt, scored against their references."""
    from mlx_lm.generate import stream_generate

    scored = []
    for result, prompt in zip(results, prompts):
        if prompt is None:
            continue
        text, last = "", None
        for last in stream_generate(model, tokenizer, mx.array(prompt), max_tokens=max_new_tokens):
            text += last.text
        speed.add(last)
        result.generated = reply_answer(text).strip()
        result.finish_reason = last.finish_reason
        scored.append(rouge_l(result.reference, result.generated))
        result.rouge_l = scored[-1].f1
        tick()
    return scored


class _Ticker:
    def __init__(self, progress: Callable[[int, int], None] | None, total: int) -> None:
        self.progress, self.total, self.done = progress, total, 0

    def __call__(self) -> None:
        self.done += 1
        if self.progress:
            self.progress(self.done, self.total)


def _quantization(adapter, quantize: Any, group_size: int) -> Quantization:
    if quantize is not None:
        return quantization(quantize, group_size)
    if adapter is not None:
        return trained_quantization(adapter)
    return Quantization(NO_QUANTIZATION, group_size)


def _reference(sample: dict) -> str | None:
    if "completion" in sample:
        return answer_text(sample["completion"])
    messages = sample.get("messages")
    if messages and messages[-1]["role"] == "assistant":
        return answer_text(messages[-1]["content"])
    return None


def _generation_prompt(sample: dict, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    """The tokens before the reference answer (the last run of answer tokens), or None."""
    if _reference(sample) is None or not mask.any():
        return None
    end = int(np.flatnonzero(mask)[-1])
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return tokens[:start].astype(np.int32) if start > 0 else None


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


class _Speed:
    """Pools mlx-lm's per-sample rates into total tokens over total seconds."""

    def __init__(self) -> None:
        self.prompt_tokens = self.generation_tokens = 0
        self.prompt_seconds = self.generation_seconds = 0.0

    def add(self, response) -> None:
        self.prompt_tokens += response.prompt_tokens
        self.prompt_seconds += response.prompt_tokens / response.prompt_tps
        self.generation_tokens += response.generation_tokens
        self.generation_seconds += response.generation_tokens / response.generation_tps

    @property
    def prompt_tps(self) -> float | None:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else None

    @property
    def generation_tps(self) -> float | None:
        return self.generation_tokens / self.generation_seconds if self.generation_seconds else None


def _expert_summary(monitor: ExpertMonitor | None) -> dict[str, Any] | None:
    if monitor is None:
        return None
    report = monitor.report()
    return {
        "num_experts": monitor.num_experts,
        "top_k": monitor.top_k,
        "spread": report["spread"],
        "max_share": report["max_share"],
        "max_entropy": report["max_entropy"],
        "layers": [{k: layer[k] for k in LAYER_FIELDS} for layer in report["layers"]],
    }
