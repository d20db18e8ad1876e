"""CI's smoke run (``.ci/smoke``: fit + validate through ``cli.py``), with this Python.

CI runs the same script on the minimum dependency stack (``constraints/minimum.txt``); running it here first
keeps its command line in step with the CLI (a renamed option fails here, not after a 3 GB install).
"""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_smoke_script_fits_and_validates() -> None:
    result = subprocess.run(
        ["bash", str(ROOT / ".ci" / "smoke"), sys.executable], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "smoke run passed" in result.stdout
    assert "val/mIoU" in result.stdout
