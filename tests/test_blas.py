"""A fast BLAS under MLX on Linux: chosen by MLXMOE_BLAS (a system OpenBLAS, else the OpenBLAS
wheel pip installs with mlxmoe on Linux x86_64), preloaded by re-executing the command, checked
against numpy, and training computes the same losses with it; the demo's banner states the time
the README states for that BLAS.

The end-to-end tests need an OpenBLAS (on Linux x86_64 the wheel is a dependency; elsewhere
Debian's libopenblas0-pthread, which .ci/run installs) and skip where there is none; under
MLXMOE_REQUIRE=blas (.ci/run) they fail instead.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import make_trainable_checkpoint, write_qa_data

from mlxmoe import blas

OPENBLAS = blas.choose_library("auto")
README = Path(__file__).resolve().parent.parent / "README.md"
# pyproject.toml installs the wheel here: a missing one fails these tests, never skips them.
WHEEL_PLATFORM = sys.platform.startswith("linux") and platform.machine() == "x86_64"


def needs_openblas(test):
    """Skipped without an OpenBLAS, except under MLXMOE_REQUIRE=blas (.ci/run on Linux)."""
    skip = pytest.mark.skipif(
        OPENBLAS is None or not sys.platform.startswith("linux"),
        reason="no OpenBLAS (pip install ngsolve-openblas or apt-get install libopenblas0-pthread)",
    )
    return pytest.mark.proof("blas")(skip(test))


needs_wheel = pytest.mark.skipif(not WHEEL_PLATFORM, reason="the OpenBLAS wheel is for Linux x86_64")


# What a command sees after the re-exec: the BLAS mapped into it, the libgfortran it loaded,
# and the matmul check.
REPORT = """
import json, os
from mlxmoe import blas
blas.reexec_with_blas()
maps = open("/proc/self/maps").read().splitlines()
print(json.dumps({"blas": blas.loaded_blas(), "error": blas.check_matmul(),
                  "gfortran": sorted({m.split()[-1] for m in maps if "libgfortran" in m}),
                  "library_path": os.environ.get("LD_LIBRARY_PATH", ""),
                  "threads": os.environ.get("OPENBLAS_NUM_THREADS"),
                  "banner": blas.describe(), "demo_time": blas.demo_time()}))
"""


def report_env(setting: str, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "LD_LIBRARY_PATH", blas.PRELOADED)}
    return {**env, blas.SETTING: setting, **extra}


def run_report(setting: str, **extra: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", REPORT],
        env=report_env(setting, **extra),
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout.splitlines()[-1])


def test_bundled_means_no_library_and_auto_takes_a_system_openblas_before_the_wheel(tmp_path, monkeypatch):
    present, wheel = tmp_path / "libblas.so.3", tmp_path / "libopenblasp-r0.3.33.so"
    present.write_bytes(b"")
    candidates = (str(tmp_path / "missing.so"), str(present))
    monkeypatch.setattr(blas, "wheel_library", lambda: wheel)
    assert blas.choose_library("bundled", candidates) is None
    assert blas.choose_library("auto", candidates) == present
    assert blas.choose_library("auto", (str(tmp_path / "missing.so"),)) == wheel
    assert blas.choose_library("wheel", candidates) == wheel
    assert blas.choose_library(str(present)) == present
    monkeypatch.setattr(blas, "wheel_library", lambda: None)
    assert blas.choose_library("auto", (str(tmp_path / "missing.so"),)) is None


def test_a_library_path_that_does_not_exist_is_one_clear_error(tmp_path):
    with pytest.raises(blas.BlasError, match=r"MLXMOE_BLAS=.*nope\.so: no such library"):
        blas.choose_library(str(tmp_path / "nope.so"))


def test_asking_for_the_wheel_where_it_is_not_installed_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(blas, "wheel_library", lambda: None)
    with pytest.raises(
        blas.BlasError, match="MLXMOE_BLAS=wheel: the ngsolve-openblas wheel is not installed"
    ):
        blas.choose_library("wheel")


@pytest.mark.slow
@needs_wheel
def test_the_wheel_is_installed_with_mlxmoe_and_exports_the_cblas_names_mlx_calls(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    library = blas.wheel_library()
    assert library is not None, "pyproject.toml installs ngsolve-openblas on Linux x86_64"
    folder = blas.gfortran_folder()
    assert folder is not None
    assert (folder / blas.GFORTRAN).resolve() == blas.bundled_gfortran().resolve()
    names = ["cblas_sgemm", "cblas_dgemm", "cblas_cgemm"]  # what libmlx.so imports from a BLAS
    code = f"import ctypes; lib = ctypes.CDLL({str(library)!r}); print(all(hasattr(lib, n) for n in {names}))"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env=report_env("bundled", LD_LIBRARY_PATH=str(folder)),
    )
    assert proc.stdout.strip() == "True"


@pytest.mark.slow
@needs_openblas
def test_auto_reexecutes_with_openblas_mapped_and_its_matmul_checked():
    report = run_report("auto")
    assert report["blas"] == str(OPENBLAS)
    assert report["error"] < 1e-5


@pytest.mark.slow
@needs_wheel
def test_the_wheel_is_preloaded_with_the_libgfortran_mlx_bundles_and_checked(tmp_path):
    report = run_report("wheel", XDG_CACHE_HOME=str(tmp_path))
    assert report["blas"] == str(blas.wheel_library())
    assert report["error"] < 1e-5
    # its libgfortran.so.5 is mlx-cpu's, through the private folder, even where the system has one
    assert report["library_path"].startswith(str(tmp_path / "mlxmoe" / "gfortran-"))
    assert report["gfortran"] and all(".libs/" in path for path in report["gfortran"])
    assert f"({blas.ORIGINS['wheel']}, preloaded;" in report["banner"]
    assert report["threads"] == blas.WHEEL_THREADS


def test_the_wheel_runs_one_thread_unless_the_user_set_openblas_num_threads(tmp_path, monkeypatch):
    wheel, system = tmp_path / "libopenblasp-r0.3.33.so", Path(blas.CANDIDATES[0])
    monkeypatch.setattr(blas, "wheel_library", lambda: wheel)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    env = blas.preload_env(wheel, {"LD_PRELOAD": "/opt/other.so"})
    assert env["LD_PRELOAD"] == f"{wheel}:/opt/other.so" and env[blas.PRELOADED] == str(wheel)
    assert env["OPENBLAS_NUM_THREADS"] == blas.WHEEL_THREADS
    assert blas.preload_env(wheel, {"OPENBLAS_NUM_THREADS": "4"})["OPENBLAS_NUM_THREADS"] == "4"
    assert "OPENBLAS_NUM_THREADS" not in blas.preload_env(system, {})  # the system's keeps its own
    assert "LD_LIBRARY_PATH" not in blas.preload_env(system, {})  # its package brings libgfortran


def system_libraries() -> list[str]:
    """The system OpenBLAS builds and libgfortran.so.5 files on this machine (real paths)."""
    gfortran = [
        p
        for folder in ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib", "/lib64")
        for p in Path(folder).glob(f"{blas.GFORTRAN}*")
    ]
    found = [*(Path(c) for c in blas.CANDIDATES), *gfortran]
    return sorted({os.path.realpath(p) for p in found if p.is_file()})


def run_without_system_libraries(code: str, env: dict) -> subprocess.CompletedProcess:
    """Runs ``code`` where the system's OpenBLAS and libgfortran read as empty (a private mount
    namespace with /dev/null bound over each), as on a fresh machine; skips where that needs
    privileges this run lacks."""
    if (
        shutil.which("unshare") is None
        or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0
    ):
        pytest.skip("no mount namespace here (unshare -m needs root)")
    hide = 'for f in $HIDE; do mount --bind /dev/null "$f" || exit 97; done; exec "$@"'
    return subprocess.run(
        ["unshare", "-m", "sh", "-c", hide, "sh", sys.executable, "-c", code],
        env={**env, "HIDE": " ".join(system_libraries())},
        capture_output=True,
        text=True,
    )


@pytest.mark.slow
@needs_wheel
def test_on_a_machine_without_system_openblas_or_libgfortran_auto_preloads_the_wheel(tmp_path):
    proc = run_without_system_libraries(REPORT, report_env("auto", XDG_CACHE_HOME=str(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report["blas"] == str(blas.wheel_library()) and report["error"] < 1e-5
    assert report["gfortran"] and all(".libs/" in path for path in report["gfortran"])
    assert report["demo_time"] == (
        f"the demo takes about {blas.DEMO_MINUTES['wheel']} minutes on 2 CPU cores with this BLAS"
    )


@pytest.mark.slow
@needs_openblas
def test_bundled_runs_mlx_own_blas():
    assert run_report("bundled")["blas"] == "bundled"


@pytest.mark.slow
@needs_openblas
def test_a_blas_the_user_preloaded_by_hand_is_recognised_and_checked():
    folder = blas.library_path(OPENBLAS)
    report = run_report(
        "bundled", LD_PRELOAD=str(OPENBLAS), **({"LD_LIBRARY_PATH": str(folder)} if folder else {})
    )
    assert report["blas"] == str(OPENBLAS) and report["error"] < 1e-5


def readme_row(first_cell: str) -> str:
    rows = [line for line in README.read_text().splitlines() if line.startswith(f"| {first_cell}")]
    assert len(rows) == 1, f"README has no single table row for {first_cell!r}"
    return rows[0]


@pytest.mark.parametrize("kind", ["system", "wheel", "bundled"])
def test_the_banner_names_the_blas_and_the_demo_time_the_readme_states_for_it(monkeypatch, kind):
    libraries = {
        "system": blas.CANDIDATES[0],
        "bundled": "bundled",
        "wheel": "/venv/site-packages/ngsolve_openblas/libopenblasp-r0.3.33.so",
    }
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(blas, "loaded_blas", lambda: libraries[kind])
    monkeypatch.setattr(blas, "wheel_library", lambda: Path(libraries["wheel"]))
    banner, demo_time = blas.describe(), blas.demo_time()
    minutes = f"about {blas.DEMO_MINUTES[kind]} minutes"
    assert blas.ORIGINS[kind] in banner
    assert demo_time.startswith(f"the demo takes {minutes} on 2 CPU cores")
    assert minutes in readme_row(blas.ORIGINS[kind])  # README's table of demo times by BLAS
    if kind == "bundled":
        assert f"about {blas.DEMO_MINUTES['wheel']} minutes with OpenBLAS" in demo_time
    readme = " ".join(README.read_text().split())
    if kind == "system":  # the demo output README shows was measured with the system's
        assert f"{banner}\n{demo_time}" in README.read_text()
    if kind == "wheel":  # what README's first command gets on a fresh Linux x86_64 machine
        assert f"({minutes} on 2 CPU cores with the OpenBLAS that pip installs" in readme


@needs_openblas
@pytest.mark.slow
def test_training_with_openblas_and_the_dense_dispatch_gives_the_bundled_losses(tmp_path):
    model = make_trainable_checkpoint("mixtral", tmp_path / "model")
    data = write_qa_data(tmp_path / "data")
    rows, notes = {}, {}
    # the tiny model's experts are small enough for auto to gather: dense is asked for
    dense = tmp_path / "dense.yaml"
    dense.write_text(json.dumps({"train": {"moe_dispatch": "dense"}}))
    for setting, recipe in (("bundled", []), ("auto", ["--recipe", str(dense)])):
        out = tmp_path / setting
        env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", blas.PRELOADED)}
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "mlxmoe",
                "train",
                "--model",
                str(model),
                "--data",
                str(data),
                "--out",
                str(out),
                "--iters",
                "4",
                "--batch-size",
                "4",
                "--quantize",
                "none",
                "--no-plots",
                *recipe,
            ],
            env={**env, blas.SETTING: setting, "COLUMNS": "200"},
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        notes[setting] = " ".join((proc.stdout + proc.stderr).split())
        rows[setting] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "BLAS: MLX's bundled reference BLAS" in notes["bundled"]
    assert "MoE dispatch: gather" in notes["bundled"]
    assert f"BLAS: {OPENBLAS} ({blas.ORIGINS[blas.origin(OPENBLAS)]}, preloaded;" in notes["auto"]
    assert "MoE dispatch: dense" in notes["auto"]
    assert [r["step"] for r in rows["auto"]] == [r["step"] for r in rows["bundled"]]
    for fast, slow in zip(rows["auto"], rows["bundled"]):
        for key in ("loss", "ce", "aux", "z", "grad_norm"):
            assert fast[key] == pytest.approx(slow[key], rel=1e-4, abs=1e-6), (fast["step"], key)
        assert fast["experts"]["layers"][0]["load"] == pytest.approx(
            slow["experts"]["layers"][0]["load"], abs=1e-6
        )
    assert Path(tmp_path / "auto" / "adapters.safetensors").is_file()
