"""What differs between a Mac and Linux, simulated on either: RSS units, the GPU memory budget
Metal reports (and its fallback), the `iogpu.wired_limit_mb` advice, the BLAS re-exec that
only Linux does, and the MoE dispatch that only MLX's CPU backend changes."""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import pytest
from click.testing import CliRunner

from mlxmoe import blas, memory
from mlxmoe.cli import main
from mlxmoe.config import ConfigView, MoEArgs
from mlxmoe.info import lazy_model, read_config
from mlxmoe.nn.moe import SparseMoE, set_dispatch
from mlxmoe.plan.advice import GiB, Verdict, budget, default_wired_limit, verdict, wired_limit_mb
from mlxmoe.plan.training import plan_training, planned_dispatch
from mlxmoe.recipe import load_recipe

CONFIGS = Path(__file__).parent / "fixtures" / "configs"
RECIPES = Path(__file__).parent.parent / "recipes"
# What Metal reports on a 32 GB M2 Pro (llama.cpp logs it as 22906.50 MB): 2/3 of its RAM.
MAC_32GB = {"memory_size": 32 * GiB, "max_recommended_working_set_size": 22_906_503_168}


def on_platform(monkeypatch, platform: str, ru_maxrss: int) -> None:
    monkeypatch.setattr(sys, "platform", platform)
    monkeypatch.setattr(resource, "getrusage", lambda who: SimpleNamespace(ru_maxrss=ru_maxrss))


def test_peak_rss_is_read_as_bytes_on_macos_and_as_kib_on_linux(monkeypatch):
    on_platform(monkeypatch, "darwin", 3_000_000_000)
    assert memory.peak_rss_bytes() == 3_000_000_000
    on_platform(monkeypatch, "linux", 3_000_000)
    assert memory.peak_rss_bytes() == 3_072_000_000


def test_peak_memory_is_the_larger_of_mlx_peak_and_peak_rss_in_gb(monkeypatch):
    monkeypatch.setattr(mx, "get_peak_memory", lambda: 5_000_000_000)
    on_platform(monkeypatch, "darwin", 2_000_000_000)
    assert memory.peak_memory_gb() == 5.0
    on_platform(monkeypatch, "darwin", 7_000_000_000)  # 7 TB had it been read as KiB
    assert memory.peak_memory_gb() == 7.0
    on_platform(monkeypatch, "linux", 7_000_000)
    assert memory.peak_memory_gb() == 7.168


def simulate_metal(monkeypatch, info: dict | None) -> list[int]:
    """A Mac whose Metal reports ``info`` (None: no Metal); returns a list that counts the
    calls of ``mx.device_info``."""
    calls = []

    def device_info():
        calls.append(1)
        return info

    monkeypatch.setattr(mx.metal, "is_available", lambda: info is not None)
    monkeypatch.setattr(mx, "device_info", device_info)
    return calls


def test_on_a_mac_the_budget_is_metals_recommended_working_set(monkeypatch):
    simulate_metal(monkeypatch, {**MAC_32GB, "architecture": "applegpu_g14s"})
    b = budget(None)
    assert (b.ram, b.wired_default) == (32 * GiB, 22_906_503_168)
    assert b.source == "this Mac: Metal's recommended working set"
    assert b.wired_max == 28 * GiB


def test_memory_given_on_the_command_line_overrides_what_metal_reports(monkeypatch):
    calls = simulate_metal(monkeypatch, MAC_32GB)
    b = budget("64GB")
    assert calls == []
    assert (b.ram, b.wired_default) == (64 * GiB, 48 * GiB)
    assert b.source == "a 64 GB Mac; macOS's default is ~3/4 of RAM"


@pytest.mark.parametrize(
    "info", [None, {"architecture": "x86_64", "device_name": "Intel"}], ids=["no Metal", "no memory figures"]
)
def test_without_metals_figures_the_budget_is_a_32gb_mac_by_macos_rule(monkeypatch, info):
    calls = simulate_metal(monkeypatch, info)
    b = budget(None)
    assert len(calls) == (info is not None)
    assert (b.ram, b.wired_default) == (32 * GiB, 32 * GiB * 2 // 3)
    assert b.source == "a 32 GB (default; set --memory) Mac; macOS's default is ~2/3 of RAM"


@pytest.mark.parametrize(
    "ram_gb, default_gib",
    [(8, 16 / 3), (16, 32 / 3), (24, 16), (32, 64 / 3), (36, 24), (48, 36), (64, 48), (96, 72), (128, 96)],
)
def test_macos_wires_two_thirds_of_ram_up_to_36gb_and_three_quarters_above(ram_gb, default_gib):
    assert default_wired_limit(ram_gb * GiB) == pytest.approx(default_gib * GiB, abs=1)


def test_the_rule_is_what_metal_reports_on_a_32gb_mac():
    assert default_wired_limit(MAC_32GB["memory_size"]) == pytest.approx(
        MAC_32GB["max_recommended_working_set_size"], rel=1e-5
    )


@pytest.mark.parametrize(
    "ram_gb, peak_gib, sysctl",
    [
        (32, 22, "sudo sysctl iogpu.wired_limit_mb=25600"),  # 22 GiB + 10% = 24.2 -> 25 GiB
        (32, 26, "sudo sysctl iogpu.wired_limit_mb=28672"),  # 28.6 GiB, capped at RAM - 4 GiB
        (64, 50, "sudo sysctl iogpu.wired_limit_mb=56320"),  # 55 GiB
        (64, 59, "sudo sysctl iogpu.wired_limit_mb=61440"),  # 64.9 GiB, capped at 60
        (128, 100, "sudo sysctl iogpu.wired_limit_mb=112640"),  # 110 GiB
    ],
)
def test_the_wired_limit_advice_covers_the_peak_with_a_margin_and_leaves_4gib(ram_gb, peak_gib, sysctl):
    b = budget(f"{ram_gb}GB")
    v = verdict(peak_gib * GiB, b)
    assert (v.fits_default, v.fits_raised, v.sysctl) == (False, True, sysctl)
    assert peak_gib * 1024 < wired_limit_mb(peak_gib * GiB, b) <= (ram_gb - 4) * 1024


def test_no_advice_under_the_default_limit_or_over_ram_less_4gib():
    b = budget("32GB")
    assert verdict(21 * GiB, b) == Verdict(True, True, None)
    assert verdict(28 * GiB + 1, b) == Verdict(False, False, None)


def test_plan_on_a_simulated_mac_uses_metals_limit_and_prints_the_sysctl(monkeypatch):
    recipe_file = RECIPES / "qwen3-30b-a3b.yaml"
    peak = plan_training(read_config(str(CONFIGS / "qwen3-30b-a3b.json")), load_recipe(recipe_file)).peak
    # Metal's working set just under the plan's peak, on a Mac large enough to raise it
    simulate_metal(monkeypatch, {"memory_size": 96 * GiB, "max_recommended_working_set_size": peak - GiB})
    result = CliRunner().invoke(
        main, ["plan", str(CONFIGS / "qwen3-30b-a3b.json"), "--recipe", str(recipe_file)]
    )
    assert result.exit_code == 0, result.output
    printed = " ".join(result.output.split())  # rich wraps lines at the terminal's width
    assert "this Mac: Metal's recommended working set" in printed
    expected_mb = 1024 * -(-(peak * 11 // 10) // GiB)  # peak + 10%, rounded up to whole GiB
    assert f"sudo sysctl iogpu.wired_limit_mb={expected_mb}" in printed


@pytest.fixture
def execs(monkeypatch, tmp_path) -> list[dict]:
    """A BLAS library the user named in MLXMOE_BLAS; records re-executions instead of doing them."""
    library = tmp_path / "libblas.so.3"
    library.write_bytes(b"")
    monkeypatch.setenv(blas.SETTING, str(library))
    monkeypatch.delenv(blas.PRELOADED, raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    calls = []
    monkeypatch.setattr(os, "execve", lambda path, argv, env: calls.append(env))
    return calls


def test_linux_reexecutes_with_the_chosen_blas_preloaded(monkeypatch, execs):
    monkeypatch.setattr(sys, "platform", "linux")
    blas.reexec_with_blas(["mlxmoe", "train"])
    assert [env["LD_PRELOAD"] for env in execs] == [os.environ[blas.SETTING]]


def test_macos_never_reexecutes_and_says_it_runs_the_platforms_blas(monkeypatch, execs):
    monkeypatch.setattr(sys, "platform", "darwin")
    blas.reexec_with_blas(["mlxmoe", "train"])
    assert execs == []
    assert blas.describe() == "BLAS: the platform's (Accelerate/Metal)"


def test_auto_dispatch_is_gather_on_a_gpu_even_with_a_fast_blas(monkeypatch):
    wide = MoEArgs(  # 64 x 16384 experts, E/k 3: dense on a CPU with a fast BLAS
        model_type="qwen3_moe",
        vocab_size=32,
        hidden_size=64,
        num_layers=1,
        num_heads=2,
        num_kv_heads=2,
        head_dim=32,
        intermediate_size=0,
        rms_norm_eps=1e-6,
        rope_theta=1e4,
        rope_scaling=None,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        num_experts=6,
        num_experts_per_tok=2,
        moe_intermediate_size=16384,
        norm_topk_prob=True,
    )
    moe = SparseMoE(wide)
    monkeypatch.setattr(blas, "loaded_blas", lambda: "/usr/lib/libopenblas.so.0")
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.cpu))
    assert set_dispatch(moe, "auto") == "dense"
    quantized = SparseMoE(wide)
    nn.quantize(quantized.experts, group_size=64, bits=4)
    assert set_dispatch(quantized, "auto") == "grouped"
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    assert set_dispatch(moe, "auto") == set_dispatch(quantized, "auto") == "gather"  # a Mac


def test_a_cpu_plan_assumes_dense_only_on_linux_where_openblas_is_preloaded(monkeypatch):
    wide = ConfigView(
        dict(  # 128 x 8192 experts at E/k 4: dense on a CPU with a fast BLAS
            model_type="qwen3_moe",
            vocab_size=2048,
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            intermediate_size=256,
            moe_intermediate_size=8192,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            max_position_embeddings=1024,
            rms_norm_eps=1e-6,
            rope_theta=1e6,
            tie_word_embeddings=False,
        )
    )
    args = lazy_model(wide).args
    train = load_recipe(None, train={"quantize": 0}).train
    monkeypatch.setattr("mlxmoe.plan.training.choose_library", lambda: Path("/usr/lib/libopenblas.so.0"))
    monkeypatch.setattr(sys, "platform", "linux")
    assert planned_dispatch(args, train, "cpu") == "dense"
    monkeypatch.setattr(sys, "platform", "darwin")
    assert planned_dispatch(args, train, "cpu") == "gather"
