"""Tiny random Hugging Face checkpoints, written by transformers itself, and its outputs.

transformers is the independent reference every family must match.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import transformers

# Small but with every feature switched on: GQA, several experts, a dense layer in Qwen2-MoE.
TINY_CONFIGS: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(intermediate_size=128)),
    # every multiplier away from 1 (attention's from 1 / sqrt(head_dim) too), as Granite ships them
    "granitemoe": (
        "GraniteMoeConfig",
        "GraniteMoeForCausalLM",
        dict(
            intermediate_size=32,
            num_local_experts=6,
            num_experts_per_tok=2,
            embedding_multiplier=12.0,
            attention_multiplier=0.0625,
            residual_multiplier=0.22,
            logits_scaling=6.0,
        ),
    ),
    # latent attention with a query bottleneck, a dense first layer, 2 shared experts' worth
    # of shared expert, routing weights scaled (every head its own KV: MLA has no GQA)
    "deepseek_v2": (
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        dict(
            num_key_value_heads=4,
            intermediate_size=96,
            moe_intermediate_size=32,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=2,
            first_k_dense_replace=1,
            q_lora_rank=32,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            routed_scaling_factor=1.5,
        ),
    ),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
    ),
    "olmoe": (
        "OlmoeConfig",
        "OlmoeForCausalLM",
        dict(intermediate_size=32, num_experts=8, num_experts_per_tok=3, norm_topk_prob=False, clip_qkv=0.5),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            intermediate_size=128,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            num_experts=6,
            num_experts_per_tok=2,
            mlp_only_layers=[1],
            norm_topk_prob=False,
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            intermediate_size=128,
            moe_intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            head_dim=16,
        ),
    ),
}

COMMON = dict(
    vocab_size=96,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)

# What transformers 5 writes -> what hub checkpoints (transformers 4) carry.
T4_RENAMES = {
    "olmoe": {"num_local_experts": "num_experts"},
    "qwen2_moe": {"num_local_experts": "num_experts"},
    "qwen3_moe": {"num_local_experts": "num_experts"},
}


def make_hf_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    config_cls, model_cls, extra = TINY_CONFIGS[family]
    config = getattr(transformers, config_cls)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            # Random values everywhere, so that a wrong norm or bias cannot hide behind 1s and 0s.
            if "norm" in name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
            else:
                param.copy_(0.08 * torch.randn_like(param))
    return model


def save(model: torch.nn.Module, folder: Path, style: str = "t5", shard_kb: int | None = None) -> Path:
    """Write with ``save_pretrained``; style "t4" rewrites config.json the way hub
    checkpoints spell it (rope_theta, num_experts)."""
    kwargs = {"max_shard_size": f"{shard_kb}KB"} if shard_kb else {}
    model.save_pretrained(folder, **kwargs)
    if style == "t4":
        path = folder / "config.json"
        config = json.loads(path.read_text())
        rope = config.pop("rope_parameters")
        config["rope_theta"] = rope.pop("rope_theta")
        if rope.get("rope_type", "default") != "default":  # the hub spells scaling so
            config["rope_scaling"] = rope
        for new, old in T4_RENAMES.get(config["model_type"], {}).items():
            if new in config:
                config[old] = config.pop(new)
        path.write_text(json.dumps(config, indent=2))
    return folder


def hf_forward(model: torch.nn.Module, tokens: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """transformers' logits [B, L, V] and router logits [B, L, E] per MoE layer."""
    ids = torch.tensor(tokens, dtype=torch.long)
    is_moe = hasattr(model.config, "num_experts_per_tok")
    with torch.no_grad():
        out = model(ids, output_router_logits=True) if is_moe else model(ids)
    batch, length = tokens.shape
    routers = (
        [r.reshape(batch, length, -1).float().numpy() for r in (out.router_logits or [])] if is_moe else []
    )
    return out.logits.float().numpy(), routers


CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "How do I reverse a list in Python? Use reversed(items) or items[::-1].",
    "def add(a, b):\n    return a + b\n",
    "Mixture-of-experts models route each token to a few experts.",
    "The quick brown fox jumps over the lazy dog. 0123456789",
]


def make_tokenizer(folder: Path, vocab_size: int = 320):
    """A small byte-level BPE trained here, with ChatML special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        chat_template=CHATML,
    )
    fast.save_pretrained(folder)
    return fast


def make_trainable_checkpoint(family: str, folder: Path, seed: int = 0, **overrides) -> Path:
    """A tiny random model with a real (small) tokenizer: what `mlxmoe train` needs."""
    tokenizer = make_tokenizer(folder)
    model = make_hf_model(family, seed=seed, vocab_size=len(tokenizer), **overrides)
    save(model, folder)
    return folder


def write_qa_data(folder: Path, n_train: int = 48, n_valid: int = 8) -> Path:
    """prompt/completion pairs with a pattern a tiny model can learn in a few steps."""
    import random

    rng = random.Random(0)
    words = ["red", "green", "blue", "cat", "dog", "fox", "list", "tuple", "dict", "set"]

    def sample() -> dict[str, str]:
        word = rng.choice(words)
        return {"prompt": f"Repeat the word {word}.", "completion": f"{word} {word} {word}"}

    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.jsonl", n_train), ("valid.jsonl", n_valid)):
        (folder / name).write_text("".join(json.dumps(sample()) + "\n" for _ in range(n)))
    return folder


def strategy_recipe(model: Path, data: Path, strategy: str, iters: int = 12):
    """A float32 recipe that trains ``strategy`` (the router as LoRA where it adapts it) on a
    tiny model for ``iters`` steps of 4 short samples: a loss that must fall."""
    from mlxmoe.recipe import load_recipe

    r = load_recipe(
        None,
        train=dict(
            iters=iters,
            batch_size=4,
            learning_rate=5e-3,
            warmup=0,
            quantize=0,
            report_every=1,
            val_every=0,
            max_seq_len=48,
            dtype="float32",
        ),
        lora=dict(strategy=strategy, rank=4, router_mode="lora"),
    )
    r.model, r.data = str(model), str(data)
    return r


def train_tiny_adapter(model: Path, root: Path) -> Path:
    """Three LoRA steps on every projection (the router as LoRA too): an adapter that every
    export must carry. Returns its run folder, ``root / "adapter"``."""
    from mlxmoe.recipe import load_recipe
    from mlxmoe.train import train

    r = load_recipe(
        None,
        train=dict(
            iters=3,
            batch_size=4,
            learning_rate=5e-3,
            warmup=0,
            quantize=0,
            report_every=3,
            val_every=0,
            max_seq_len=48,
        ),
        lora=dict(strategy="all", router_mode="lora", rank=4),
    )
    r.model, r.data = str(model), str(write_qa_data(root / "data", n_train=8, n_valid=4))
    train(r, root / "adapter", show_progress=False)
    return root / "adapter"


# Gemma-4's MoE text model: sliding layers with heads of 16, full ones with heads of 32 and one
# key-value head whose values are its keys (attention_k_eq_v), a dense MLP beside 6 experts.
# Kept out of TINY_CONFIGS: hf_forward and the t4 spelling do not apply (tests/test_gemma4.py).
GEMMA4_TINY = dict(
    COMMON,
    intermediate_size=48,
    head_dim=16,
    global_head_dim=32,
    num_global_key_value_heads=1,
    attention_k_eq_v=True,
    enable_moe_block=True,
    num_experts=6,
    top_k_experts=2,
    moe_intermediate_size=24,
    hidden_size_per_layer_input=0,
    sliding_window=8,
    layer_types=["sliding_attention", "full_attention", "full_attention"],
    final_logit_softcapping=3.0,
)


def make_gemma4_model(seed: int = 0, vision: bool = False, **overrides) -> torch.nn.Module:
    """A tiny random Gemma-4 (make_hf_model's random values): the text model alone, or
    (``vision``) inside Gemma4ForConditionalGeneration with a one-layer vision tower. Layer
    scalars near 1 (a random 0.08 would shrink each layer's output to nothing)."""
    config = transformers.Gemma4TextConfig(**{**GEMMA4_TINY, **overrides})
    torch.manual_seed(seed)
    text = transformers.Gemma4ForCausalLM(config).eval()
    model = text
    if vision:
        config = transformers.Gemma4Config(
            text_config=text.config.to_dict(),
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=2,
                head_dim=16,
                position_embedding_size=64,
            ),
            audio_config=None,
            tie_word_embeddings=text.config.tie_word_embeddings,
        )
        model = transformers.Gemma4ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(
                (1.0 + 0.2 * torch.randn_like(param)) if "norm" in name else 0.08 * torch.randn_like(param)
            )
        for name, buffer in model.named_buffers():
            if name.endswith("layer_scalar"):
                buffer.copy_(1.0 + 0.2 * torch.randn_like(buffer))
    return model
