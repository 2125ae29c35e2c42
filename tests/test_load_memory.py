"""Loading with quantization streams: the peak is the quantized model plus one module's
float weights, whatever the checkpoint's size (a 61 GB checkpoint must load on a 32 GB Mac)."""

from __future__ import annotations

import gc

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from tiny_models import make_hf_model, save

from mlxmoe.load import load_model

LAYERS = 8


@pytest.fixture(scope="module")
def qwen3_moe_checkpoint(tmp_path_factory):
    model = make_hf_model(
        "qwen3_moe",
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=256,
        num_experts=8,
        num_hidden_layers=LAYERS,
        head_dim=32,
        num_attention_heads=8,
        num_key_value_heads=4,
    )
    return save(model, tmp_path_factory.mktemp("qwen3_moe"))


def load_peak(folder, **kwargs) -> tuple[int, dict[str, mx.array]]:
    """Bytes allocated at the peak of a load beyond what was alive before it, and the model's
    parameters."""
    gc.collect()
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    model = load_model(folder, **kwargs)
    return mx.get_peak_memory() - before, dict(tree_flatten(model.parameters()))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_quantized_load_peaks_at_the_quantized_model_plus_about_a_layer(qwen3_moe_checkpoint, dtype):
    checkpoint_bytes = sum(p.stat().st_size for p in qwen3_moe_checkpoint.glob("*.safetensors"))  # float32
    _, stored = load_peak(qwen3_moe_checkpoint, dtype="float32")  # the checkpoint's tensors as stored
    layer = max(
        sum(v.nbytes for k, v in stored.items() if k.startswith(f"layers.{i}.")) for i in range(LAYERS)
    )
    module = max(v.nbytes for v in stored.values())
    del stored
    peak, params = load_peak(qwen3_moe_checkpoint, quantize=4, dtype=dtype)
    quantized = sum(v.nbytes for v in params.values())
    print(
        f"{dtype}: checkpoint {checkpoint_bytes / 2**20:.1f} MiB, largest layer {layer / 2**20:.1f} "
        f"MiB, largest module {module / 2**20:.1f} MiB, 4-bit model {quantized / 2**20:.1f} MiB, "
        f"load peak {peak / 2**20:.1f} MiB"
    )
    # a module's experts arrive one tensor per expert and are stacked (and cast): its stored
    # weights about twice; evaluating a layer at once (measured 1.9x a layer) exceeds it
    assert peak <= quantized + 2.5 * module
    assert peak < quantized + layer
    # materializing every float weight before quantizing (measured 69 and 50 MiB) exceeds it
    assert peak < 0.5 * checkpoint_bytes
