"""`python -m stroma demo` (what `make demo` runs) runs a real pipeline into `runs/`, replays
it, and ends with the command that shows it again; it can run again and again."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENV = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stroma", *args], cwd=cwd, capture_output=True, text=True,
        timeout=120, env=ENV,
    )


def test_demo_completes_and_replays_identically(tmp_path: Path) -> None:
    """The demo retries its flaky node, completes, prices its tokens and replays equal."""
    out = _run(["demo"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["status:", "COMPLETED"]
    tokens = next(line for line in lines if line.startswith("total tokens:"))
    assert int(tokens.split()[-1]) > 0
    fetch_rows = [line.split() for line in lines if line.startswith("fetch ")]
    assert [row[2] for row in fetch_rows] == ["RECOVERABLE", "RECOVERABLE", "ok"]
    assert any("identical result" in line for line in lines)


def test_demo_keeps_its_runs_and_ends_with_the_command_that_shows_the_run(
    tmp_path: Path,
) -> None:
    """Run twice, the demo keeps both runs (fresh run ids) in ``runs/`` of the current folder,
    and its last line is a ``python -m stroma show runs <run_id>`` command that works."""
    run_ids = []
    for _ in range(2):
        out = _run(["demo"], tmp_path)
        assert out.returncode == 0, out.stderr
        command = shlex.split(out.stdout.splitlines()[-1])
        assert command[:5] == ["python", "-m", "stroma", "show", "runs"] and len(command) == 6
        run_ids.append(command[5])
    assert run_ids[0] != run_ids[1]

    shown = _run(command[3:], tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[0] == f"run {run_ids[1]}: COMPLETED"
    assert "parallel(summarize, keywords)" in shown.stdout

    # The line before names the command that replays the run against its plan: OK.
    replay = shlex.split(out.stdout.splitlines()[-3])
    assert replay == ["python", "-m", "stroma", "replay", "runs", run_ids[1], "--plan",
                      "stroma.demo:plan"]
    replayed = _run(replay[3:], tmp_path)
    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stdout.startswith("OK: ") and "status COMPLETED" in replayed.stdout

    listed = _run(["runs", "runs"], tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert sorted(line.split()[0] for line in listed.stdout.splitlines()[2:]) == sorted(run_ids)
