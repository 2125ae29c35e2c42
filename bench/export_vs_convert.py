"""`mlxmoe export` against llama.cpp's `convert_hf_to_gguf.py` on the same model folder:
wall time and peak RSS of each, run as a subprocess and measured the same way (os.wait4).

    LLAMA_CPP_SRC=DIR python bench/export_vs_convert.py [--model DIR] [--types f16 q8_0]

LLAMA_CPP_SRC (or --llama-cpp-src) is llama.cpp's tree holding convert_hf_to_gguf.py,
conversion/ and gguf-py/ (.ci/run unpacks it from the llama-cpp-python 0.3.36 sdist). Without
--model, the packaged SmolLM2-135M-Instruct is upcycled into a 4-expert Mixtral-layout MoE in
a temporary folder (float32, ~1.5 GB). The "startup" rows are each side's imports alone
(`import mlxmoe.cli`; the converter's --help), part of every run above them. Goal (issue 4):
>= 2x faster, peak RSS <= 25% of the model's size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlxmoe.memory import maxrss_bytes


def measure(cmd: list[str], env: dict | None = None) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one child process."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # wait4 reports this child's own rusage, unlike RUSAGE_CHILDREN's maximum over all of them
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    stderr = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{stderr[-3000:]}")
    return seconds, maxrss_bytes(usage.ru_maxrss)


def model_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="an HF-format model folder (merged)")
    parser.add_argument("--llama-cpp-src", type=Path, default=os.environ.get("LLAMA_CPP_SRC"))
    parser.add_argument("--types", nargs="+", default=["f16", "q8_0"])
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    args = parser.parse_args()
    if args.llama_cpp_src is None or not (args.llama_cpp_src / "convert_hf_to_gguf.py").is_file():
        raise SystemExit(
            "set LLAMA_CPP_SRC (or --llama-cpp-src) to llama.cpp's tree with convert_hf_to_gguf.py"
        )
    src = args.llama_cpp_src.resolve()
    converter_env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(src / "gguf-py"), os.environ.get("PYTHONPATH")) if p),
    }

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model
        if model is None:
            model = tmp / "smollm2-moe"
            subprocess.run(
                [sys.executable, "-m", "mlxmoe", "upcycle", "--out", str(model)],
                check=True,
                stdout=subprocess.DEVNULL,
            )
        size = model_bytes(model)
        print(f"model: {model} ({size / 2**20:.0f} MiB of safetensors)")
        rows = {
            ("mlxmoe", "startup"): measure([sys.executable, "-c", "import mlxmoe.cli"]),
            ("convert", "startup"): measure(
                [sys.executable, str(src / "convert_hf_to_gguf.py"), "--help"], converter_env
            ),
        }
        for file_type in args.types:
            out = tmp / f"{file_type}.gguf"
            rows[("mlxmoe", file_type)] = measure(
                [
                    sys.executable,
                    "-m",
                    "mlxmoe",
                    "export",
                    "--model",
                    str(model),
                    "--gguf",
                    str(out),
                    "--type",
                    file_type,
                ]
            )
            ours_bytes = out.stat().st_size
            out.unlink()
            rows[("convert", file_type)] = measure(
                [
                    sys.executable,
                    str(src / "convert_hf_to_gguf.py"),
                    "--outtype",
                    file_type,
                    "--outfile",
                    str(out),
                    str(model),
                ],
                converter_env,
            )
            print(
                f"{file_type}: GGUF {ours_bytes / 2**20:.1f} MiB (mlxmoe), "
                f"{out.stat().st_size / 2**20:.1f} MiB (convert_hf_to_gguf.py)"
            )
            out.unlink()

    print(f"\n{'tool':<8} {'type':<8} {'seconds':>8} {'peak RSS MiB':>13} {'% of model':>11}")
    for (tool, kind), (seconds, rss) in rows.items():
        print(f"{tool:<8} {kind:<8} {seconds:>8.1f} {rss / 2**20:>13.0f} {100 * rss / size:>10.0f}%")
    print()
    for file_type in args.types:
        (ours_s, ours_rss), (their_s, their_rss) = rows[("mlxmoe", file_type)], rows[("convert", file_type)]
        print(
            f"{file_type}: {their_s / ours_s:.2f}x faster (goal >= 2x), peak RSS "
            f"{ours_rss / their_rss:.2f}x the converter's and {100 * ours_rss / size:.0f}% of the "
            f"model (goal <= 25%)"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "model_bytes": size,
                    "rows": [
                        {"tool": t, "type": k, "seconds": s, "peak_rss": r} for (t, k), (s, r) in rows.items()
                    ],
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
