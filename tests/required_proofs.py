"""Required proofs: a skipped test that proves a README claim fails the run where CI says so.

A test that needs something outside the package (llama.cpp's converter source or chat
templates, an OpenBLAS, Debian's Python FAQ) skips without it, so a laptop can run the suite. CI must not:
a skip there means a README claim went unchecked. Such a test carries
``@pytest.mark.proof(NAME)``; ``MLXMOE_REQUIRE=NAME,...`` (``.ci/run`` sets it) turns its skip
into a failure that names the proof and the skip's reason.

Loaded by ``tests/conftest.py``; ``pytest -p required_proofs`` loads it into any other run.
"""

from __future__ import annotations

import os

import pytest

SETTING = "MLXMOE_REQUIRE"
# Each proof a test may be marked with, and what it needs.
PROOFS = {
    "converter": "llama.cpp's convert_hf_to_gguf.py unpacked at LLAMA_CPP_SRC",
    "templates": "the gpt-oss, Qwen3.5, Gemma-4 and Granite 3.3/4.0/4.1 chat templates of "
    "llama.cpp's models/templates, unpacked at LLAMA_CPP_SRC",
    "blas": "an OpenBLAS: the system's (Debian: libopenblas0-pthread) or the ngsolve-openblas wheel",
    "faq": "Debian's python3.11-doc (the Python FAQ sources)",
}
_REQUIRED = pytest.StashKey[set]()


def required() -> set[str]:
    names = {name.strip() for name in os.environ.get(SETTING, "").split(",") if name.strip()}
    unknown = names - set(PROOFS)
    if unknown:
        raise pytest.UsageError(
            f"{SETTING}={os.environ[SETTING]}: unknown proof(s) "
            f"{', '.join(sorted(unknown))} (known: {', '.join(PROOFS)})"
        )
    return names


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"proof(name): the test proves a README claim and skips without the "
        f"prerequisite of proof name ({', '.join(PROOFS)}); {SETTING}=name fails it instead",
    )
    config.stash[_REQUIRED] = required()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for marker in item.iter_markers("proof"):
            if marker.args[0] not in PROOFS:
                raise pytest.UsageError(
                    f"{item.nodeid}: unknown proof {marker.args[0]!r} (known: {', '.join(PROOFS)})"
                )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if not report.skipped or hasattr(report, "wasxfail"):
        return report
    missing = [m.args[0] for m in item.iter_markers("proof") if m.args[0] in item.config.stash[_REQUIRED]]
    if missing:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = (
            f"required proof {', '.join(missing)} skipped ({SETTING}="
            f"{os.environ[SETTING]}; it needs {'; '.join(PROOFS[n] for n in missing)}): "
            f"{reason}"
        )
    return report
