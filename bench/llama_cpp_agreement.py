"""llama.cpp's top-1 token against our float32 model on real weights: how much of it our f16
and q8_0 GGUFs keep, and how much q8_0's weight rounding alone costs.

    python bench/llama_cpp_agreement.py [--demo DIR]

The model is the packaged SmolLM2-135M-Instruct upcycled into a 4-expert top-2 MoE (Mixtral
layout, seed 0: the model `mlxmoe demo` trains); the positions are the answer tokens of the
Python FAQ's held-out questions (`mlxmoe data python-faq`'s test split, rendered with the
chat template as training renders them: the positions `mlxmoe eval` scores). Rows:

- llama.cpp running our f16 and q8_0 GGUFs of the model;
- our model in MLX with its weights rounded as the q8_0 file stores them (q8_0 blocks, or
  f16 where a row does not split into blocks): the weights' share of q8_0's loss, since
  llama.cpp's q8_0 kernels also round the activations to 8 bits.

Each row gives the share of positions whose top-1 token equals our float32 model's, and the
largest margin (our float32 model's logit gap from its top token to the row's) among those
that differ: a small one means the disagreements are near ties.

``--demo DIR`` (a finished `mlxmoe demo --out DIR`) takes the model and data from DIR and adds
the demo's q8_0 GGUF (adapter merged) against its model with the adapter attached (not
merged), on the same positions.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlxmoe import blas


@dataclass
class Agreement:
    positions: int = 0
    equal: int = 0
    max_margin: float = 0.0  # over disagreements

    def add(self, ours: np.ndarray, theirs: np.ndarray) -> None:
        best, other = ours.argmax(-1), theirs.argmax(-1)
        differ = np.flatnonzero(best != other)
        self.positions += len(best)
        self.equal += len(best) - len(differ)
        if len(differ):
            margins = ours[differ, best[differ]] - ours[differ, other[differ]]
            self.max_margin = max(self.max_margin, float(margins.max()))

    def row(self, label: str) -> str:
        return (
            f"{label:<52} {100 * self.equal / self.positions:6.1f}%  "
            f"{self.positions - self.equal:>5} of {self.positions}  {self.max_margin:8.3f}"
        )


def prepare(tmp: Path, demo: Path | None) -> tuple[Path, Path]:
    """The upcycled model and the FAQ data set: the demo's, or made here as the demo makes them."""
    if demo is not None:
        return demo / "model", demo / "data"
    from mlxmoe.data.faq import build_dataset
    from mlxmoe.gguf.importer import gguf_to_hf
    from mlxmoe.upcycle import default_dense_gguf, upcycle

    dense = gguf_to_hf(default_dense_gguf(), tmp / "dense")
    model = upcycle(dense, tmp / "model", layout="mixtral", n_experts=4, top_k=2)
    build_dataset(tmp / "data")
    return model, tmp / "data"


def answer_positions(data: Path, tokenizer) -> list[tuple[list[int], np.ndarray]]:
    """(tokens, positions whose next token is an answer token) for each held-out sample."""
    from mlxmoe.data import load_dataset

    dataset = load_dataset(data / "test.jsonl", tokenizer, max_seq_len=4096)
    return [(e.tokens.tolist(), np.flatnonzero(e.loss_mask[1:])) for e in dataset.examples]


def mlx_logits(model, samples) -> list[np.ndarray]:
    import mlx.core as mx

    return [np.array(model(mx.array([tokens]))[0])[at] for tokens, at in samples]


def llama_cpp_agreement(gguf: Path, samples, reference: list[np.ndarray]) -> Agreement:
    from mlxmoe.gguf.llamacpp import logits, open_gguf

    result = Agreement()
    with open_gguf(gguf, n_ctx=max(len(t) for t, _ in samples)) as llm:
        for (tokens, at), ours in zip(samples, reference):
            result.add(ours, logits(llm, tokens)[at])
    return result


def round_as_q8_0_file(model, folder: Path) -> None:
    """Replace each weight by what our q8_0 GGUF stores for it, decoded to float32."""
    import gguf
    import mlx.core as mx

    from mlxmoe.gguf.export import plan_tensors
    from mlxmoe.gguf.merge import MergedWeights

    Q = gguf.GGMLQuantizationType
    weights = MergedWeights(folder)
    rounded = []
    for plan in plan_tensors(weights, "q8_0"):
        if plan.qtype == Q.F32:
            continue
        data = weights.tensor(plan.ours)
        data = (
            data.astype(np.float16)
            if plan.qtype == Q.F16
            else gguf.quants.dequantize(gguf.quants.quantize(data, plan.qtype), plan.qtype)
        )
        rounded.append((plan.ours, mx.array(data.astype(np.float32))))
    model.load_weights(rounded, strict=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, help="a finished `mlxmoe demo --out DIR`")
    args = parser.parse_args()
    blas.reexec_with_blas()
    import mlx.core as mx

    import mlxmoe
    from mlxmoe.adapt.files import load_adapters
    from mlxmoe.demo import GGUF_NAME
    from mlxmoe.gguf.export import export_gguf

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder, data = prepare(tmp, args.demo)
        model, tokenizer = mlxmoe.load(folder, dtype=mx.float32)
        model.eval()
        samples = answer_positions(data, tokenizer)
        n = sum(len(at) for _, at in samples)
        print(
            f"{blas.describe()}\nmodel: {folder} (float32)\npositions: {n} answer tokens of "
            f"{len(samples)} held-out FAQ questions ({data / 'test.jsonl'})\n"
        )
        print(f"{'against our float32 model':<52} {'top-1':>7}  {'differ':>14}  max margin")
        reference = mlx_logits(model, samples)
        for file_type in ("f16", "q8_0"):
            path = export_gguf(folder, tmp / f"{file_type}.gguf", file_type).path
            print(
                llama_cpp_agreement(path, samples, reference).row(f"llama.cpp, our {file_type} GGUF"),
                flush=True,
            )
            path.unlink()
        round_as_q8_0_file(model, folder)
        weights_only = Agreement()
        for ours, rounded in zip(reference, mlx_logits(model, samples)):
            weights_only.add(ours, rounded)
        print(weights_only.row("MLX, weights rounded as our q8_0 GGUF stores them"), flush=True)

        if args.demo is not None:
            tuned, _ = mlxmoe.load(folder, dtype=mx.float32)
            load_adapters(tuned, args.demo / "run")
            tuned.eval()
            print("\nthe fine-tuned model (the demo's adapter attached, float32):")
            print(
                llama_cpp_agreement(args.demo / GGUF_NAME, samples, mlx_logits(tuned, samples)).row(
                    "llama.cpp, the demo's q8_0 GGUF (adapter merged)"
                )
            )


if __name__ == "__main__":
    main()
