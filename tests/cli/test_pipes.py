"""Output piped into a reader that stops reading (`python -m stroma show ... | head -1`)
ends the command quietly, as `cat` and `grep` do: nothing on stderr and exit status 141
(128 + SIGPIPE, what the shell reports for a tool the closed pipe stopped), never
`stroma: error: [Errno 32] Broken pipe` with status 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from interpreters.stores.file import FileStore
from tests.cli.test_cli import ROOT
from tests.timeline import pipelines as P


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A FileStore with a run that retried and a map_each run."""
    path = tmp_path_factory.mktemp("pipes")

    async def record() -> None:
        fs = FileStore(path)
        await P.retries_run(fs)
        await P.map_run(fs)

    anyio.run(record)
    return path


def into_closed_pipe(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m stroma ARGS`` writing into a pipe whose reading end is closed before
    the command starts: every write meets a reader that is gone (no timing involved)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [sys.executable, "-m", "stroma", *args], cwd=ROOT, stdout=write_end,
            stderr=subprocess.PIPE, text=True, timeout=120,
            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    finally:
        os.close(write_end)


@pytest.mark.parametrize("args", [
    ("runs", "{store}"),
    ("runs", "{store}", "--json"),
    ("show", "{store}", "retries"),
    ("show", "{store}", "map", "--json"),
    ("show", "{store}", "map", "--svg", "-"),
    ("--help",),
])
def test_a_closed_pipe_ends_the_command_quietly(store: Path, args: tuple[str, ...]) -> None:
    """Each output command, its reader gone: exit 141 and not a word on stderr."""
    out = into_closed_pipe(*(a.format(store=store) for a in args))
    assert (out.returncode, out.stderr) == (141, ""), (out.returncode, out.stderr)


def test_errors_still_go_to_stderr_when_stdout_is_closed(store: Path) -> None:
    """A real error is still reported, one line with status 2, when stdout is closed."""
    out = into_closed_pipe("show", str(store), "no-such-run")
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("stroma: error: no run 'no-such-run'"), out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
