"""The examples a user copies from run as they are."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

# End to end: runs the pipeline or a command (`pytest -m "not e2e"` leaves these out).
pytestmark = pytest.mark.e2e

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_the_quickstart_runs():
    done = subprocess.run([sys.executable, str(EXAMPLES / "quickstart.py")], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "reloaded dmil: P(tumoral) of" in done.stdout
