"""`python -m stroma demo` (what `make demo` runs) runs a real pipeline and replays it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_demo_completes_and_replays_identically() -> None:
    """The demo retries its flaky node, completes, prices its tokens and replays equal."""
    out = subprocess.run(
        [sys.executable, "-m", "stroma", "demo"], cwd=ROOT, capture_output=True, text=True,
        timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["status:", "COMPLETED"]
    tokens = next(line for line in lines if line.startswith("total tokens:"))
    assert int(tokens.split()[-1]) > 0
    fetch_rows = [line.split() for line in lines if line.startswith("fetch ")]
    assert [row[2] for row in fetch_rows] == ["RECOVERABLE", "RECOVERABLE", "ok"]
    assert "identical result" in lines[-1]
