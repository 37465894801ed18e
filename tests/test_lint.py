"""`make lint` as part of the suite: ruff and mypy stay clean in CI."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # mypy over the package takes a minute

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True)


def test_ruff_is_clean() -> None:
    r = _run("ruff", "check", "fewstep", "tests", "bench")
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_is_clean() -> None:
    r = _run("mypy", "fewstep")
    assert r.returncode == 0, r.stdout + r.stderr
