"""A fast BLAS under MLX on Linux.

MLX's Linux CPU wheel runs its matmuls through the reference BLAS it bundles: ~5 GFLOP/s for
a 2048x2048 float32 matmul on this project's 2-core machines, against ~35 GFLOP/s when the
process loads a system OpenBLAS first (its ``cblas_sgemm`` then wins symbol resolution) and
2.2x faster ``mlxmoe train`` on a 135M MoE with the same losses. ``LD_PRELOAD`` works only
from the start of a process, so ``mlxmoe``'s compute commands re-execute themselves once
with it set, and then check the matmul against numpy before any real work.

The setting is the environment variable ``MLXMOE_BLAS`` (an environment variable, not a
recipe key: it is a property of the machine, and ``mlx.launch`` passes it to every rank):

- ``auto`` (default): a system OpenBLAS when one is installed (Debian/Ubuntu:
  ``apt-get install libopenblas0-pthread``), else MLX's bundled BLAS;
- ``bundled``: never preload anything;
- a path: that BLAS library (it must export the CBLAS interface).

macOS is untouched: MLX uses Accelerate and Metal there.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .errors import MlxMoeError

SETTING = "MLXMOE_BLAS"
# Set in the re-executed process: the library it preloaded (and no second re-exec).
PRELOADED = "MLXMOE_BLAS_PRELOADED"

# System OpenBLAS builds that export BLAS and CBLAS under their standard names. The pthread
# flavour first: the OpenMP one would add a second thread pool beside MLX's.
CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",  # Debian, Ubuntu
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib64/libopenblasp.so.0",  # Fedora, RHEL (pthread build)
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",  # Arch
    "/usr/lib/x86_64-linux-gnu/openblas-openmp/libblas.so.3",
)


class BlasError(MlxMoeError):
    pass


def choose_library(setting: str | None = None, candidates=CANDIDATES) -> Path | None:
    """The BLAS library to preload for ``setting`` (``MLXMOE_BLAS``'s value), or None for
    MLX's bundled one."""
    setting = (os.environ.get(SETTING, "auto") if setting is None else setting).strip() or "auto"
    if setting == "bundled":
        return None
    if setting == "auto":
        return next((Path(c) for c in candidates if Path(c).is_file()), None)
    path = Path(setting).expanduser()
    if not path.is_file():
        raise BlasError(f"{SETTING}={setting}: no such library (use auto, bundled or the path "
                        "of a BLAS shared library such as OpenBLAS's libblas.so.3)")
    return path


def reexec_with_blas(argv: list[str] | None = None) -> None:
    """Replaces this process by itself with the chosen BLAS preloaded; returns when there
    is nothing to do (not Linux, bundled, already preloaded, no library found)."""
    if not sys.platform.startswith("linux") or os.environ.get(PRELOADED):
        return
    library = choose_library()
    if library is None:
        return
    preload = os.environ.get("LD_PRELOAD", "")
    if str(library) in preload.split(":"):
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = f"{library}:{preload}" if preload else str(library)
    env[PRELOADED] = str(library)
    argv = list(sys.orig_argv if argv is None else argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv[1:]], env)


def loaded_blas() -> str:
    """Which BLAS this process runs: the preloaded library's path, or ``bundled``. Read
    from the libraries actually mapped into the process, not from the setting."""
    # Ours, or one the user preloaded by hand (it then comes first as well).
    preloaded = [os.environ.get(PRELOADED, ""), *os.environ.get("LD_PRELOAD", "").split(":")]
    for library in preloaded:
        if library and "blas" in Path(library).name and _mapped(library):
            return library
    return "bundled"


def _mapped(library: str) -> bool:
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    real = os.path.realpath(library)
    return library in maps or real in maps


def check_matmul() -> float:
    """Relative error of an MLX float32 matmul against numpy's float64 one; raises when a
    preloaded BLAS computes wrong results (a broken build must not train silently)."""
    import mlx.core as mx
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((257, 193)).astype(np.float32)
    b = rng.standard_normal((193, 131)).astype(np.float32)
    with mx.stream(mx.cpu):
        ours = np.array(mx.array(a) @ mx.array(b))
    exact = a.astype(np.float64) @ b.astype(np.float64)
    error = float(np.abs(ours - exact).max() / np.abs(exact).max())
    if not error < 1e-4:
        raise BlasError(f"MLX's matmul with {loaded_blas()} is wrong (relative error {error:.2e}); "
                        f"set {SETTING}=bundled to run with MLX's own BLAS")
    return error


def describe() -> str:
    """One line for progress output: the BLAS in use and how to change it."""
    used = loaded_blas()
    if used != "bundled":
        return f"BLAS: {used} (preloaded; {SETTING}=bundled turns it off)"
    if sys.platform.startswith("linux"):
        hint = ("install libopenblas0-pthread for ~2x faster training"
                if choose_library("auto") is None else f"{SETTING}=auto preloads OpenBLAS")
        return f"BLAS: MLX's bundled reference BLAS ({hint})"
    return "BLAS: the platform's (Accelerate/Metal)"
