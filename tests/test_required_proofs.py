"""MLXMOE_REQUIRE: a skipped test marked as a required proof fails the run (tests/required_proofs.py).

Each case runs pytest in a child process, with the plugin, on a small test file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
PROOF_TESTS = """
import pytest

@pytest.mark.proof("converter")
@pytest.mark.skipif(True, reason="llama.cpp's converter is not unpacked")
def test_marked_skipif():
    pass

@pytest.mark.proof("faq")
def test_marked_skip_in_the_body():
    pytest.skip("python3.X-doc is not installed")

def test_unmarked_skip():
    pytest.skip("nothing proven here")

@pytest.mark.proof("blas")
def test_marked_and_run():
    pass
"""


def run_pytest(tmp_path: Path, require: str | None, source: str = PROOF_TESTS) -> subprocess.CompletedProcess:
    (tmp_path / "test_sample.py").write_text(source)
    env = {k: v for k, v in os.environ.items() if k != "MLXMOE_REQUIRE"}
    if require is not None:
        env["MLXMOE_REQUIRE"] = require
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH")) if p)
    env["COLUMNS"] = "300"  # whole lines in the short test summary
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "required_proofs",
            "-p",
            "no:cacheprovider",
            "-rA",
            "--rootdir",
            str(tmp_path),
            str(tmp_path),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )


@pytest.mark.slow
def test_without_the_setting_a_marked_test_skips_and_the_run_passes(tmp_path):
    proc = run_pytest(tmp_path, None)
    assert proc.returncode == 0, proc.stdout
    assert "1 passed, 3 skipped" in proc.stdout


@pytest.mark.slow
def test_a_required_proof_that_skips_fails_the_run_with_its_reason(tmp_path):
    proc = run_pytest(tmp_path, "converter,faq")
    assert proc.returncode == 1, proc.stdout
    # skipif is decided at setup (reported as an error), pytest.skip in the body (a failure)
    assert "ERROR test_sample.py::test_marked_skipif - required proof converter skipped" in proc.stdout
    assert "FAILED test_sample.py::test_marked_skip_in_the_body - required proof faq skipped" in proc.stdout
    assert "llama.cpp's converter is not unpacked" in proc.stdout
    assert "python3.X-doc is not installed" in proc.stdout
    assert "SKIPPED [1] test_sample.py" in proc.stdout and "nothing proven here" in proc.stdout


@pytest.mark.slow
def test_a_proof_not_required_may_skip(tmp_path):
    proc = run_pytest(tmp_path, "blas")
    assert proc.returncode == 0, proc.stdout
    assert "1 passed, 3 skipped" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    "source, require",
    [
        (PROOF_TESTS, "converter,blsa"),
        ("import pytest\n@pytest.mark.proof('blsa')\ndef test_x():\n    pass\n", "blas"),
    ],
    ids=["setting", "marker"],
)
def test_an_unknown_proof_name_is_a_usage_error(tmp_path, source, require):
    proc = run_pytest(tmp_path, require, source)
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR, proc.stdout + proc.stderr
    assert "unknown proof" in proc.stdout + proc.stderr and "blsa" in proc.stdout + proc.stderr


def test_ci_on_linux_requires_the_converter_templates_blas_and_faq_proofs():
    ci = (TESTS.parent / ".ci" / "run").read_text()
    assert 'export MLXMOE_REQUIRE="${MLXMOE_REQUIRE-converter,templates,blas,faq}"' in ci
