"""Sparse upcycling: a dense Llama becomes an MoE checkpoint that mlxmoe and transformers load.

In the Mixtral layout the upcycled model computes the dense model: k identical experts
weighted by renormalized top-k probabilities sum to the dense MLP. In the Qwen3-MoE layout
it cannot, because Qwen3 RMS-normalizes every query and key head (see mlxmoe.upcycle).
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers
from tiny_models import hf_forward, make_hf_model, save

import mlxmoe
from mlxmoe.errors import MlxMoeError
from mlxmoe.upcycle import upcycle

TEXT = "Sparse upcycling copies each dense MLP into every expert of a new router."
# Float32, logits up to ~40 in magnitude, 30 layers: measured 1.0e-4 (mlxmoe) and 1.4e-4
# (transformers) between the upcycled and the dense model.
SAME_MODEL = 1e-3
N_EXPERTS, TOP_K = 4, 2


@pytest.fixture(scope="module")
def smollm2_mixtral(smollm2_hf, tmp_path_factory):
    return upcycle(
        smollm2_hf,
        tmp_path_factory.mktemp("upcycled") / "mixtral",
        layout="mixtral",
        n_experts=N_EXPERTS,
        top_k=TOP_K,
    )


@pytest.fixture(scope="module")
def dense(smollm2_hf):
    return mlxmoe.load(smollm2_hf, dtype=mx.float32)


@pytest.fixture(scope="module")
def dense_token_ids(dense) -> list[int]:
    _, tokenizer = dense
    return tokenizer.encode(TEXT)


@pytest.mark.slow
def test_mixtral_upcycled_smollm2_computes_the_dense_model_in_mlxmoe(smollm2_mixtral, dense, dense_token_ids):
    dense_model, dense_tokenizer = dense
    moe, tokenizer = mlxmoe.load(smollm2_mixtral, dtype=mx.float32)
    tokens = mx.array([dense_token_ids])

    logits, router_logits = moe(tokens, return_router_logits=True)

    assert np.abs(np.array(logits) - np.array(dense_model(tokens))).max() < SAME_MODEL
    assert moe.moe_layers == list(range(30))
    assert len(router_logits) == 30
    assert all(r.shape == (1, len(dense_token_ids), N_EXPERTS) for r in router_logits)
    assert all(r.dtype == mx.float32 for r in router_logits)
    # The random router spreads tokens over every expert from the start.
    chosen = {int(e) for r in router_logits for e in np.array(r).argmax(-1).ravel()}
    assert chosen == set(range(N_EXPERTS))
    assert tokenizer.encode(TEXT) == dense_tokenizer.encode(TEXT)


@pytest.mark.slow
def test_mixtral_upcycled_smollm2_computes_the_dense_model_in_transformers(
    smollm2_mixtral, smollm2_hf, dense_token_ids
):
    ids = torch.tensor([dense_token_ids])
    with torch.no_grad():
        dense = transformers.LlamaForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32)
        expected = dense.eval()(ids).logits.numpy()
        del dense
        moe = transformers.MixtralForCausalLM.from_pretrained(smollm2_mixtral, dtype=torch.float32)
        out = moe.eval()(ids, output_router_logits=True)
    assert np.abs(out.logits.numpy() - expected).max() < SAME_MODEL
    assert len(out.router_logits) == 30


def weights(folder) -> dict[str, mx.array]:
    return mx.load(str(folder / "model.safetensors"))


@pytest.fixture
def tiny_dense(tmp_path):
    """A tiny random transformers Llama (random norms too), saved by transformers 5."""
    model = make_hf_model("llama")
    return model, save(model, tmp_path / "dense")


def test_every_expert_is_a_byte_for_byte_copy_of_the_dense_mlp_in_its_dtype(tmp_path):
    model = make_hf_model("llama").to(torch.bfloat16)
    dense_dir = save(model, tmp_path / "dense")
    out = upcycle(
        dense_dir, tmp_path / "moe", layout="qwen3_moe", n_experts=3, top_k=2, router_std=0.05, seed=1
    )
    dense, moe = weights(dense_dir), weights(out)
    layer = "model.layers.1.mlp"
    for proj in ("gate_proj", "up_proj", "down_proj"):
        for expert in range(3):
            copy = moe[f"{layer}.experts.{expert}.{proj}.weight"]
            assert copy.dtype == mx.bfloat16
            assert mx.array_equal(copy, dense[f"{layer}.{proj}.weight"])
    assert moe["lm_head.weight"].dtype == mx.bfloat16
    assert mx.array_equal(moe["lm_head.weight"], dense["lm_head.weight"])
    router = np.array(moe[f"{layer}.gate.weight"])
    assert router.shape == (3, 64) and router.dtype == np.float32
    assert 0.04 < router.std() < 0.06
    config = json.loads((out / "config.json").read_text())
    assert (config["num_experts"], config["num_experts_per_tok"]) == (3, 2)
    assert config["norm_topk_prob"] is True and config["mlp_only_layers"] == []
    assert config["moe_intermediate_size"] == 128 and config["head_dim"] == 16


def test_upcycling_is_deterministic_for_a_seed(tiny_dense, tmp_path):
    _, dense_dir = tiny_dense
    a = upcycle(dense_dir, tmp_path / "a", seed=3, expert_noise=0.01)
    b = upcycle(dense_dir, tmp_path / "b", seed=3, expert_noise=0.01)
    c = upcycle(dense_dir, tmp_path / "c", seed=4, expert_noise=0.01)
    files = [(folder / "model.safetensors").read_bytes() for folder in (a, b, c)]
    assert files[0] == files[1] != files[2]


def test_expert_noise_perturbs_each_copy_by_that_fraction_of_the_weight_std(tiny_dense, tmp_path):
    _, dense_dir = tiny_dense
    out = upcycle(dense_dir, tmp_path / "moe", n_experts=2, expert_noise=0.01)
    dense, moe = weights(dense_dir), weights(out)
    w = np.array(dense["model.layers.0.mlp.up_proj.weight"])
    experts = "model.layers.0.block_sparse_moe.experts"
    copies = [np.array(moe[f"{experts}.{e}.w3.weight"]) for e in (0, 1)]
    for copy in copies:
        assert 0.008 < (copy - w).std() / w.std() < 0.012
    assert not np.array_equal(copies[0], copies[1])


def test_qwen3_moe_upcycle_loads_as_qwen3_moe_but_is_not_the_dense_model(tiny_dense, tmp_path):
    dense_model, dense_dir = tiny_dense
    tokens = np.random.default_rng(0).integers(0, 96, size=(1, 12))
    dense_logits, _ = hf_forward(dense_model, tokens)
    out = upcycle(dense_dir, tmp_path / "moe", layout="qwen3_moe")
    reference = transformers.Qwen3MoeForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    expected, _ = hf_forward(reference, tokens)
    model, _ = mlxmoe.load(out, dtype=mx.float32)

    logits = np.array(model(mx.array(tokens)))

    assert np.abs(logits - expected).max() < 1e-4
    # Unit q/k norms still rescale every head: the scores are no longer Llama's.
    assert np.abs(logits - dense_logits).max() > 0.05
    mixtral, _ = mlxmoe.load(upcycle(dense_dir, tmp_path / "mixtral"), dtype=mx.float32)
    assert np.abs(np.array(mixtral(mx.array(tokens))) - dense_logits).max() < 1e-4


def test_only_dense_llama_checkpoints_are_upcycled(tmp_path):
    moe_dir = save(make_hf_model("mixtral"), tmp_path / "mixtral")
    with pytest.raises(MlxMoeError, match="model_type 'mixtral'"):
        upcycle(moe_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_top_k_must_fit_the_number_of_experts(tiny_dense, tmp_path):
    _, dense_dir = tiny_dense
    with pytest.raises(MlxMoeError, match="top_k"):
        upcycle(dense_dir, tmp_path / "out", n_experts=2, top_k=3)


@pytest.mark.slow
def test_cli_upcycles_the_shipped_smollm2_by_default(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "smol-moe"
    proc = subprocess.run(
        [sys.executable, "-m", "mlxmoe", "upcycle", "--out", str(out), "--experts", "2", "--top-k", "1"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["num_local_experts"] == 2
    assert (out / "tokenizer.json").is_file()
