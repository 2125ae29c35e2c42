"""A fast BLAS under MLX on Linux.

MLX's Linux CPU wheel runs its matmuls through the reference BLAS it bundles: ~5 GFLOP/s for
a 1024x1024 float32 matmul on this project's 2-core machines, against 80-350 GFLOP/s when the
process loads an OpenBLAS first (its ``cblas_sgemm`` then wins symbol resolution).
``LD_PRELOAD`` works only from the start of a process, so ``mlxmoe``'s compute commands
re-execute themselves once with it set, and then check the matmul against numpy before any
real work.

The setting is the environment variable ``MLXMOE_BLAS`` (an environment variable, not a
recipe key: it is a property of the machine, and ``mlx.launch`` passes it to every rank):

- ``auto`` (default): a system OpenBLAS when one is installed (Debian/Ubuntu:
  ``apt-get install libopenblas0-pthread``), else the OpenBLAS wheel that pip installs with
  mlxmoe on Linux x86_64, else MLX's bundled BLAS;
- ``wheel``: that wheel's OpenBLAS, even where a system one is installed;
- ``bundled``: never preload anything;
- a path: that BLAS library (it must export the CBLAS interface).

The wheel is ``ngsolve-openblas``: OpenBLAS built for every x86_64 CPU (``DYNAMIC_ARCH``,
pthreads) under the standard CBLAS names. The other OpenBLAS builds on PyPI do not fit:
numpy's and scipy's (``scipy-openblas32``/``64``) prefix their symbols, so MLX never calls
them; ``cmeel-openblas`` is built for one CPU (AVX-512 Skylake-X; an illegal instruction on
others); Intel's ``mkl`` works but adds about 1 GB. ``ngsolve-openblas`` links
``libgfortran.so.5``, which a fresh machine lacks, so the re-exec also puts on
``LD_LIBRARY_PATH`` a private folder where the libgfortran that mlx-cpu's wheel bundles (for its
reference LAPACK, under a hashed name) answers to that name, and runs it on one thread
(``WHEEL_THREADS``).

macOS is untouched: MLX uses Accelerate and Metal there.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
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
# The OpenBLAS wheel in pyproject.toml's dependencies (Linux x86_64), as a module name.
WHEEL = "ngsolve_openblas"
WHEEL_DISTRIBUTION = "ngsolve-openblas"
GFORTRAN = "libgfortran.so.5"
# The wheel's OpenBLAS threads spin without yielding the CPU (the Debian build calls
# sched_yield): with two threads on 2 cores a demo training step took 3-5x longer than with one,
# which matched the system build. Preloading the wheel sets OPENBLAS_NUM_THREADS to this unless
# the user set it.
WHEEL_THREADS = "1"

# Where a BLAS comes from, as the banner says it.
ORIGINS = {
    "system": "the system's OpenBLAS",
    "wheel": f"OpenBLAS from the {WHEEL_DISTRIBUTION} wheel",
    "other": f"named by {SETTING} or LD_PRELOAD",
    "bundled": "MLX's bundled reference BLAS",
}
# `mlxmoe demo`'s wall time with each BLAS, in minutes, measured on the project's 2-core Linux
# box (README "Two commands" and "Linux CPU speed" quote these; tests/test_blas.py checks that).
DEMO_MINUTES = {"system": 5, "wheel": 5, "bundled": 45}


class BlasError(MlxMoeError):
    pass


def wheel_library() -> Path | None:
    """The OpenBLAS of the ``ngsolve-openblas`` wheel, when it is installed (found, not
    imported: importing it would load the library into this process)."""
    spec = importlib.util.find_spec(WHEEL)
    folders = spec.submodule_search_locations if spec else None
    if not folders or not sys.platform.startswith("linux"):
        return None
    return next(iter(sorted(Path(folders[0]).glob("libopenblas*.so*"))), None)


def choose_library(setting: str | None = None, candidates=CANDIDATES) -> Path | None:
    """The BLAS library to preload for ``setting`` (``MLXMOE_BLAS``'s value), or None for
    MLX's bundled one."""
    setting = (os.environ.get(SETTING, "auto") if setting is None else setting).strip() or "auto"
    if setting == "bundled":
        return None
    if setting == "auto":
        system = next((Path(c) for c in candidates if Path(c).is_file()), None)
        return system or wheel_library()
    if setting == "wheel":
        library = wheel_library()
        if library is None:
            raise BlasError(
                f"{SETTING}=wheel: the {WHEEL_DISTRIBUTION} wheel is not installed "
                f"(pip install {WHEEL_DISTRIBUTION}; Linux x86_64 only)"
            )
        return library
    path = Path(setting).expanduser()
    if not path.is_file():
        raise BlasError(
            f"{SETTING}={setting}: no such library (use auto, wheel, bundled or the "
            "path of a BLAS shared library such as OpenBLAS's libblas.so.3)"
        )
    return path


def origin(library: str | Path) -> str:
    """``system``, ``wheel`` or ``other`` for a preloaded library; ``bundled`` for none."""
    if str(library) == "bundled":
        return "bundled"
    real = os.path.realpath(library)
    if any(os.path.realpath(c) == real for c in CANDIDATES):
        return "system"
    wheel = wheel_library()
    return "wheel" if wheel and os.path.realpath(wheel) == real else "other"


def bundled_gfortran() -> Path | None:
    """A ``libgfortran.so.5`` that an installed wheel bundles under a hashed name (auditwheel
    renames it): mlx-cpu's first, the one mlxmoe's dependencies always bring on Linux."""
    spec = importlib.util.find_spec("mlx")
    if spec is None or not spec.submodule_search_locations:
        return None
    site = Path(spec.submodule_search_locations[0]).parent
    found = sorted(site.glob("*.libs/libgfortran*.so.5*"), key=lambda p: (p.parent.name != "mlx_cpu.libs", p))
    return found[0] if found else None


def gfortran_folder() -> Path | None:
    """A private folder (in the user's cache) where a wheel's bundled libgfortran answers to
    ``libgfortran.so.5``, beside links to the libraries it loads from its own folder (its RPATH
    is ``$ORIGIN``: the link's folder). None when there is none or the cache is not writable."""
    source = bundled_gfortran()
    if source is None:
        return None
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    folder = cache / "mlxmoe" / f"gfortran-{hashlib.sha256(str(source).encode()).hexdigest()[:12]}"
    links = {p.name: p for p in source.parent.iterdir() if p.is_file()} | {GFORTRAN: source}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, target in links.items():
            link = folder / name
            if os.path.realpath(link) != os.path.realpath(target):
                staged = folder / f".{name}.{os.getpid()}"
                staged.unlink(missing_ok=True)
                staged.symlink_to(target)
                os.replace(staged, link)  # atomic: another command may be starting too
    except OSError:
        return None
    return folder


def _system_loads(soname: str) -> bool:
    try:
        ctypes.CDLL(soname)
    except OSError:
        return False
    return True


def library_path(library: Path) -> Path | None:
    """The folder to put on ``LD_LIBRARY_PATH`` for ``library`` to load: the private
    ``libgfortran.so.5`` for the wheel's OpenBLAS (always, so it runs with the same libraries on
    every machine) and for a named library where the system has no libgfortran; None for a
    system OpenBLAS (its package brings libgfortran)."""
    kind = origin(library)
    if kind == "system" or (kind == "other" and _system_loads(GFORTRAN)):
        return None
    return gfortran_folder()


def preload_env(library: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) with ``library`` preloaded, what it needs to load,
    and, for the wheel's, its thread count."""
    env = dict(os.environ if env is None else env)

    def first(value: str, variable: str) -> None:
        env[variable] = f"{value}:{env[variable]}" if env.get(variable) else value

    first(str(library), "LD_PRELOAD")
    folder = library_path(library)
    if folder is not None:
        first(str(folder), "LD_LIBRARY_PATH")
    if origin(library) == "wheel":
        env.setdefault("OPENBLAS_NUM_THREADS", WHEEL_THREADS)
    env[PRELOADED] = str(library)
    return env


def reexec_with_blas(argv: list[str] | None = None) -> None:
    """Replaces this process by itself with the chosen BLAS preloaded; returns when there
    is nothing to do (not Linux, bundled, already preloaded, no library found)."""
    if not sys.platform.startswith("linux") or os.environ.get(PRELOADED):
        return
    library = choose_library()
    if library is None or str(library) in os.environ.get("LD_PRELOAD", "").split(":"):
        return
    env = preload_env(library)
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
        raise BlasError(
            f"MLX's matmul with {loaded_blas()} is wrong (relative error {error:.2e}); "
            f"set {SETTING}=bundled to run with MLX's own BLAS"
        )
    return error


def describe() -> str:
    """One line for progress output: the BLAS in use and how to change it."""
    used = loaded_blas()
    if used != "bundled":
        return f"BLAS: {used} ({ORIGINS[origin(used)]}, preloaded; {SETTING}=bundled turns it off)"
    if sys.platform.startswith("linux"):
        found = choose_library("auto")
        hint = (
            f"{SETTING}=auto preloads {found}"
            if found
            else f"no OpenBLAS found: pip install {WHEEL_DISTRIBUTION} (x86_64) or "
            "apt-get install libopenblas0-pthread"
        )
        return f"BLAS: {ORIGINS['bundled']} ({hint})"
    return "BLAS: the platform's (Accelerate/Metal)"


def demo_time() -> str | None:
    """What ``mlxmoe demo`` takes with the BLAS in use, as measured on the 2-core Linux box;
    None off Linux (never measured on Metal)."""
    if not sys.platform.startswith("linux"):
        return None
    kind = origin(loaded_blas())
    fast = f"about {DEMO_MINUTES['wheel']} minutes with OpenBLAS"
    if kind == "bundled":
        return (
            f"the demo takes about {DEMO_MINUTES['bundled']} minutes on 2 CPU cores with "
            f"{ORIGINS['bundled']} ({fast})"
        )
    if kind == "other":
        return f"the demo takes {fast} on 2 CPU cores"
    return f"the demo takes about {DEMO_MINUTES[kind]} minutes on 2 CPU cores with this BLAS"
