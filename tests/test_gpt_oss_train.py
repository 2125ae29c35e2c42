"""gpt-oss training: every LoRA strategy that applies, over a float base and over the published
MXFP4 experts kept as the frozen base with the rest in 4 bits and bfloat16 activations (the
Mac's configuration), on chat data rendered in harmony by gpt-oss's official template.

The tokenizer is a small byte-level BPE trained here on harmony text, with the harmony special
tokens and the official template (llama.cpp's copy): the real o200k vocabulary would make the
embedding and head 3000 times the size of these tiny models' experts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from assets import HARMONY_TOKENS, llama_cpp_template
from safetensors.torch import load_file, save_file
from test_gpt_oss import SHAPES, encode_mxfp4, make_gpt_oss

import mlxmoe
from mlxmoe.adapt import AdapterSpec, apply_adapters
from mlxmoe.adapt.files import load_adapters, read_adapter_config
from mlxmoe.errors import MlxMoeError
from mlxmoe.nn.moe import QuantizedExpertLinear
from mlxmoe.recipe import load_recipe
from mlxmoe.thinking import for_training, render_chat
from mlxmoe.train import train

WORDS = ["red", "green", "blue", "cat", "dog", "fox", "list", "tuple", "dict", "set"]
MAC = dict(quantize=4, group_size=32, dtype="bfloat16")
FLOAT = dict(quantize=0, dtype="float32")


def conversation(word: str) -> dict:
    return {
        "messages": [
            {"role": "system", "content": "Repeat the user's word three times."},
            {"role": "user", "content": f"Repeat the word {word}."},
            {"role": "assistant", "content": f"{word} {word} {word}"},
        ]
    }


def harmony_tokenizer(folder: Path) -> int:
    """A byte-level byte-level BPE learnt from harmony renderings, carrying gpt-oss's template
    and special tokens (EOS ``<|return|>``, as gpt-oss's tokenizer_config). Returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    template = llama_cpp_template("openai-gpt-oss-120b.jinja")
    if template is None:
        pytest.skip("llama.cpp's gpt-oss chat template is not unpacked at LLAMA_CPP_SRC")
    special = ["<|endoftext|>", *HARMONY_TOKENS]
    probe = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), chat_template=template)
    rendered = [
        render_chat(probe, for_training(conversation(w)["messages"], "off", True), False, False, True)
        for w in WORDS
    ]
    corpus = [
        piece for text in rendered for piece in re.split("|".join(map(re.escape, special)), text) if piece
    ]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        corpus * 4,
        trainers.BpeTrainer(
            vocab_size=1000, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|return|>", pad_token="<|endoftext|>", chat_template=template
    )
    tokenizer.save_pretrained(folder)
    return len(tokenizer)


def mxfp4_experts(folder: Path) -> Path:
    """The checkpoint in ``folder`` with its experts stored as the hub publishes gpt-oss."""
    tensors = load_file(folder / "model.safetensors")
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        blocks, scales = encode_mxfp4(tensors.pop(name).transpose(-1, -2).float().numpy())
        tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = map(torch.from_numpy, (blocks, scales))
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


@pytest.fixture(scope="module")
def gpt_oss_train_folders(tmp_path_factory) -> dict[str, Path]:
    """{"float": folder, "mxfp4": folder, "data": folder}: one tiny gpt-oss (3 layers, 4
    experts, window 4), stored in float and with MXFP4 experts, and harmony chat data."""
    root = tmp_path_factory.mktemp("gpt-oss-train")
    folders = {}
    for kind in ("float", "mxfp4"):
        folder = root / kind
        vocab = harmony_tokenizer(folder)
        hf = make_gpt_oss(**{**SHAPES["gqa-window-4"], "vocab_size": vocab})
        hf.save_pretrained(folder)
        folders[kind] = mxfp4_experts(folder) if kind == "mxfp4" else folder
    rng = np.random.default_rng(0)
    data = root / "data"
    data.mkdir()
    for name, n in (("train.jsonl", 32), ("valid.jsonl", 4)):
        (data / name).write_text("".join(json.dumps(conversation(w)) + "\n" for w in rng.choice(WORDS, n)))
    folders["data"] = data
    return folders


def recipe(model: Path, data: Path, strategy: str, base: dict):
    r = load_recipe(
        None,
        train=dict(
            iters=4,
            batch_size=4,
            learning_rate=1e-2,
            warmup=0,
            report_every=1,
            val_every=0,
            save_every=0,
            max_seq_len=128,
            **base,
        ),
        lora=dict(strategy=strategy, rank=4, router_mode="lora"),
    )
    r.model, r.data = str(model), str(data)
    return r


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_harmony_data_trains_the_final_answer_within_the_length(gpt_oss_train_folders):
    from mlxmoe.data import load_dataset
    from mlxmoe.load import load_tokenizer

    tokenizer = load_tokenizer(gpt_oss_train_folders["float"])
    ex = load_dataset(gpt_oss_train_folders["data"] / "train.jsonl", tokenizer, 128).examples[0]
    answer = tokenizer.decode(ex.tokens[ex.loss_mask])
    assert answer.startswith("<|channel|>final<|message|>") and answer.endswith("<|return|>"), answer
    assert "<|start|>assistant<|channel|>analysis<|message|><|end|>" in tokenizer.decode(ex.tokens)
    assert len(ex.tokens) <= 128


@pytest.mark.slow
@pytest.mark.parametrize("base", ["float", "mxfp4"])
@pytest.mark.parametrize("strategy", ["attention", "experts", "experts+router"])
def test_loss_falls_for_every_strategy_and_the_adapters_load_back(
    gpt_oss_train_folders, tmp_path, strategy, base
):
    settings = MAC if base == "mxfp4" else FLOAT
    result = train(
        recipe(gpt_oss_train_folders[base], gpt_oss_train_folders["data"], strategy, settings),
        tmp_path,
        show_progress=False,
    )
    rows = metrics(tmp_path)
    print(f"gpt_oss {base} {strategy}: answer ce {rows[0]['ce']:.3f} -> {rows[-1]['ce']:.3f}")
    assert result.steps == 4
    assert rows[-1]["ce"] < rows[0]["ce"] - 0.3, [r["ce"] for r in rows]
    assert all(
        np.isfinite(r["aux"]) and r["aux"] > 0 and np.isfinite(r["z"]) and r["z"] > 0 for r in rows
    )  # the router losses
    layers = rows[-1]["experts"]["layers"]
    assert len(layers) == 3 and all(abs(sum(x["load"]) - 1) < 1e-6 for x in layers)
    config = read_adapter_config(tmp_path)
    assert config["family"] == "gpt_oss" and config["strategy"] == strategy
    assert config["dtype"] == settings["dtype"]
    assert config["quantization"] == ({"bits": 4, "group_size": 32} if base == "mxfp4" else None)
    # the saved adapters, loaded back onto the base as trained: evaluated, changed, finite
    model, _ = mlxmoe.load(
        gpt_oss_train_folders[base],
        quantize=settings["quantize"] or None,
        group_size=32,
        dtype=settings["dtype"],
    )
    tokens = mx.array([[5, 17, 40, 2, 99, 120, 7, 33]])
    before = model(tokens).astype(mx.float32)
    load_adapters(model, tmp_path)
    after = model(tokens).astype(mx.float32)
    mx.eval(before, after)
    assert np.isfinite(np.array(after)).all()
    assert float(mx.abs(after - before).max()) > 1e-3
    if base == "mxfp4":
        experts = model.layers[0].moe.experts
        base_experts = getattr(experts.down_proj, "base", experts.down_proj)
        assert isinstance(base_experts, QuantizedExpertLinear) and base_experts.mode == "mxfp4"
    weights = mx.load(str(tmp_path / "adapters.safetensors"))
    assert any("experts" in k for k in weights) == (strategy != "attention")
    assert any("router" in k for k in weights) == (strategy == "experts+router")


def test_all_adapts_what_experts_plus_router_adapts(gpt_oss_train_folders):
    """gpt-oss has neither a shared expert nor dense MLPs: ``all`` trains experts+router's run."""
    adapted = {}
    for strategy in ("all", "experts+router"):
        model, _ = mlxmoe.load(gpt_oss_train_folders["float"], dtype=mx.float32)
        adapted[strategy] = apply_adapters(model, AdapterSpec(strategy=strategy, router_mode="lora"))
    assert adapted["all"] == adapted["experts+router"]
    assert len(adapted["all"]) == 3 * 8  # q, k, v, o, three expert projections, the router


def test_the_shared_strategy_is_refused_for_gpt_oss_which_has_no_shared_expert(gpt_oss_train_folders):
    model, _ = mlxmoe.load(gpt_oss_train_folders["float"], dtype=mx.float32)
    with pytest.raises(
        MlxMoeError,
        match=r"strategy 'shared' adapts a shared expert .* "
        r"gpt_oss model has none",
    ):
        apply_adapters(model, AdapterSpec(strategy="shared"))
