"""The command line: runs, show and replay on a FileStore; bad input is one line, exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from interpreters.stores.file import FileStore
from stroma.runner import RunConfig, interpret
from tests.replay.pipelines import SCENARIOS, Num

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stroma", *args], cwd=ROOT, capture_output=True, text=True,
        timeout=60, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("clistore")

    async def record() -> None:
        for name in ("retries", "terminal"):
            build, config = SCENARIOS[name]

            async def no_sleep(seconds: float) -> None:
                return None

            cfg = config()
            await interpret(build(True), Num(value=1), store=FileStore(path),
                            config=RunConfig(**{**{k: getattr(cfg, k) for k in
                                                   cfg.model_fields_set}}),
                            sleep=no_sleep)

    anyio.run(record)
    return path


def test_runs_lists_every_run_with_status(store: Path) -> None:
    """`runs` lists each run id with its status and the number of nodes done."""
    out = cli("runs", str(store))
    assert out.returncode == 0, out.stderr
    assert "golden-retries" in out.stdout and "COMPLETED" in out.stdout
    assert "golden-terminal" in out.stdout and "FAILED" in out.stdout


def test_show_prints_the_trace_table(store: Path) -> None:
    """`show` prints one row per attempt with node, attempt and outcome."""
    out = cli("show", str(store), "golden-retries")
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("flaky")]
    assert [row.split()[1] for row in rows] == ["1", "2", "3"]
    assert "AMBIGUOUS" in rows[0] and "ok" in rows[2]


def test_replay_ok_and_divergence(store: Path) -> None:
    """`replay` prints OK for the recording plan and the first divergence for another."""
    ok = cli("replay", str(store), "golden-retries", "--plan",
             "tests.replay.test_replay:RETRIES_PLAN")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("OK")
    bad = cli("replay", str(store), "golden-retries", "--plan",
              "tests.replay.test_replay:REORDERED_PLAN")
    assert bad.returncode == 1
    assert "DIVERGED" in bad.stdout and "record 0" in bad.stdout


@pytest.mark.parametrize(
    "args",
    [
        ("runs", "/no/such/folder"),
        ("show", "{store}", "no-such-run"),
        ("replay", "{store}", "golden-retries", "--plan", "no.such.module:plan"),
        ("replay", "{store}", "golden-retries", "--plan", "not-a-reference"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(store: Path, args: tuple[str, ...]) -> None:
    """A wrong path, an unknown run id or a plan that does not import: one line, exit 2."""
    out = cli(*(a.format(store=store) for a in args))
    assert out.returncode == 2
    assert out.stderr.startswith("stroma: error:")
    assert len(out.stderr.strip().splitlines()) == 1
    assert "Traceback" not in out.stderr
