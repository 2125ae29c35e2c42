"""`mlxmoe eval`: perplexity against transformers, greedy answers, adapters, the JSON report."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import write_qa_data

from mlxmoe.evaluate import evaluate


@pytest.fixture(scope="module")
def eval_qa_data(tmp_path_factory) -> Path:
    return write_qa_data(tmp_path_factory.mktemp("data"), n_train=48, n_valid=6)


def hf_answer_cross_entropy(folder: Path, samples: list[dict]) -> tuple[float, int, list[int]]:
    """Token-weighted cross-entropy of the answers (completion + <|im_end|>) by transformers,
    the answer located by rendering the prompt alone; and each conversation's length."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    total, count, lengths = 0.0, 0, []
    for sample in samples:
        user = [{"role": "user", "content": sample["prompt"]}]
        prompt_text = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        prompt = tok.encode(prompt_text, add_special_tokens=False)
        answer = tok.encode(sample["completion"] + "<|im_end|>", add_special_tokens=False)
        whole = tok.apply_chat_template(
            [*user, {"role": "assistant", "content": sample["completion"]}], tokenize=False
        )
        ids = tok.encode(whole, add_special_tokens=False)
        assert ids[: len(prompt) + len(answer)] == prompt + answer  # the answer is where we think
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        predicted = logits[len(prompt) - 1 : len(prompt) + len(answer) - 1]
        loss = torch.nn.functional.cross_entropy(predicted, torch.tensor(answer), reduction="sum")
        total += loss.item()
        count += len(answer)
        lengths.append(len(ids))
    return total / count, count, lengths


def test_perplexity_is_exp_of_the_answer_cross_entropy_transformers_computes(qwen2_moe, eval_qa_data):
    samples = [json.loads(line) for line in (eval_qa_data / "valid.jsonl").read_text().splitlines()]
    # float32 as transformers: auto is bfloat16 on a Mac's GPU
    report = evaluate(qwen2_moe, eval_qa_data / "valid.jsonl", max_new_tokens=6, dtype="float32")
    ce, count, lengths = hf_answer_cross_entropy(qwen2_moe, samples)
    assert report.samples == len(samples) and report.answer_tokens == count
    assert report.cross_entropy == pytest.approx(ce, rel=1e-4)
    assert report.perplexity == pytest.approx(math.exp(ce), rel=1e-4)
    # Every input token of the teacher-forced pass (all but each sample's last) is routed once
    # per MoE layer; the overall spread is the mean of the layers', as in training's monitor.
    assert report.experts is not None and report.experts["top_k"] == 2
    assert [layer["layer"] for layer in report.experts["layers"]] == [0, 2]  # layer 1 is dense
    for layer in report.experts["layers"]:
        assert layer["tokens"] == sum(n - 1 for n in lengths)
        assert sum(layer["load"]) == pytest.approx(1.0)
        load = np.array(layer["load"])
        assert layer["spread"] == pytest.approx(np.std(load * len(load)))
    assert report.experts["spread"] == pytest.approx(
        np.mean([layer["spread"] for layer in report.experts["layers"]])
    )


def test_greedy_answers_match_transformers_greedy_decoding(qwen2_moe, eval_qa_data):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report = evaluate(qwen2_moe, eval_qa_data / "valid.jsonl", max_new_tokens=5, limit=2, dtype="float32")
    tok = AutoTokenizer.from_pretrained(qwen2_moe)
    model = AutoModelForCausalLM.from_pretrained(qwen2_moe, dtype=torch.float32).eval()
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    samples = [json.loads(line) for line in (eval_qa_data / "valid.jsonl").read_text().splitlines()][:2]
    assert [r.reference for r in report.per_sample] == [s["completion"] for s in samples]
    for sample, result in zip(samples, report.per_sample):
        text = tok.apply_chat_template(
            [{"role": "user", "content": sample["prompt"]}], tokenize=False, add_generation_prompt=True
        )
        ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=5, do_sample=False, eos_token_id=eos, pad_token_id=eos)
        new = [t for t in out[0, ids.shape[1] :].tolist() if t != eos]
        assert result.generated == tok.decode(new).strip()
        assert 0.0 <= result.rouge_l <= 1.0
    assert report.generated_samples == 2 and report.generation_tokens > 0
    assert report.prompt_tps > 0 and report.generation_tps > 0 and report.peak_memory_gb > 0


@pytest.mark.slow
def test_a_trained_adapter_is_attached_and_lowers_perplexity(qwen2_moe, eval_qa_data, tmp_path):
    from mlxmoe.recipe import load_recipe
    from mlxmoe.train import train

    recipe = load_recipe(
        None,
        train=dict(
            iters=12,
            batch_size=4,
            learning_rate=2e-3,
            warmup=0,
            quantize=0,
            report_every=12,
            val_every=0,
            save_every=0,
            max_seq_len=64,
        ),
    )
    recipe.model, recipe.data = str(qwen2_moe), str(eval_qa_data)
    train(recipe, tmp_path / "run", show_progress=False)
    base = evaluate(qwen2_moe, eval_qa_data / "valid.jsonl", generate=False)
    tuned = evaluate(qwen2_moe, eval_qa_data / "valid.jsonl", adapter=tmp_path / "run", generate=False)
    assert tuned.adapter == str(tmp_path / "run")
    assert tuned.perplexity < 0.7 * base.perplexity, (base.perplexity, tuned.perplexity)


@pytest.mark.slow
def test_cli_prints_a_table_and_writes_the_json_report(qwen2_moe, eval_qa_data, tmp_path):
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlxmoe",
            "eval",
            "--model",
            str(qwen2_moe),
            "--data",
            str(eval_qa_data),
            "--max-new-tokens",
            "3",
            "--limit",
            "3",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for label in ("perplexity", "ROUGE-L F1", "generation", "peak memory", "expert load"):
        assert label in proc.stdout, label
    report = json.loads(out.read_text())
    assert report["data"] == str(eval_qa_data / "valid.jsonl")  # a folder without test.jsonl: valid
    for key in (
        "perplexity",
        "cross_entropy",
        "answer_tokens",
        "rouge_l",
        "rouge_l_precision",
        "rouge_l_recall",
        "prompt_tps",
        "generation_tps",
        "peak_memory_gb",
    ):
        assert isinstance(report[key], (int, float)) and math.isfinite(report[key]), key
    assert report["samples"] == len(report["per_sample"]) == 3
    assert {"spread", "max_share", "layers"} <= set(report["experts"])
    assert {"layer", "spread", "max_share", "dead_experts", "load"} <= set(report["experts"]["layers"][0])
    assert {"reference", "generated", "rouge_l", "cross_entropy"} <= set(report["per_sample"][0])
