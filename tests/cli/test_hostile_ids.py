"""Run ids (and other user text) holding control, format or wide characters are shown
escaped and aligned: a newline in an id prints no row of its own, a bidi override
(U+202E) or an escape sequence never reaches the terminal raw, and the columns of `runs`
and `show` line up as displayed (measured after escaping, a CJK character as 2 columns);
the send-input command `show` prints, pasted into bash, names the very run."""

from __future__ import annotations

import re
import shutil
import subprocess
import unicodedata
from pathlib import Path

import anyio
import pytest
from pydantic import BaseModel

from interpreters.stores.file import FileStore
from stroma import await_input, seq
from stroma.runner import RunConfig, interpret
from tests.cli.test_cli import cli
from tests.timeline import pipelines as P

FAKE_ROW = "evil\nfake-run   FAILED   2026-01-01T00:00:00"
IDS = ("ok-run", FAKE_ROW, "esc\x1b[31mred\x1b[0m", "rtl\u202egpj.exe", "tab\tid",
       "zero\u200bwidth", "日本語の実行")
WAITING_ID = "wait \u202e'x'\n$(no)"


class Approval(BaseModel):
    approved: bool


class Ask(BaseModel):
    q: str = "?"
    approval: Approval | None = None


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run that retried under each hostile id, and a WAITING run with one."""
    path = tmp_path_factory.mktemp("hostile")

    async def record() -> None:
        fs = FileStore(path)
        for run_id in IDS:
            await P.retries_run(fs, run_id)
        await interpret(seq(await_input("approval", Approval, input=Ask)), Ask(), store=fs,
                        config=RunConfig(run_id=WAITING_ID))

    anyio.run(record)
    return path


def raw_unsafe(text: str) -> list[str]:
    """The characters of ``text`` that must not reach a terminal (line breaks aside)."""
    return [c for c in text if c != "\n" and unicodedata.category(c) in
            ("Cc", "Cf", "Zl", "Zp", "Cs")]


def columns(text: str) -> int:
    """The terminal columns ``text`` takes (CJK wide characters two)."""
    return sum(2 if unicodedata.east_asian_width(c) in ("W", "F") else 1 for c in text)


def test_runs_shows_one_escaped_row_per_run_in_aligned_columns(store: Path) -> None:
    """`runs`: one row per run (no fake row), ids escaped, the status column at one
    display column in every row."""
    out = cli("runs", str(store))
    assert out.returncode == 0, out.stderr
    assert raw_unsafe(out.stdout) == []
    lines = out.stdout.rstrip("\n").split("\n")
    assert len(lines) == 2 + len(IDS) + 1, out.stdout  # header, rule, a row per run
    assert not any(line.startswith("fake-run") for line in lines)
    for shown in ("evil\\nfake-run", "esc\\x1b[31mred\\x1b[0m", "rtl\\u202egpj.exe",
                  "tab\\tid", "zero\\u200bwidth", "日本語の実行"):
        assert any(line.startswith(shown + " ") for line in lines), (shown, out.stdout)
    status_at = {columns(line[: m.start()]) for line in lines[2:]
                 if (m := re.search(r"\b(COMPLETED|WAITING)\b", line))}
    assert status_at == {columns(lines[0][: lines[0].index("status")])}, out.stdout


def test_show_escapes_the_run_id(store: Path) -> None:
    """`show`: the id's newline is escaped in the first line, so the id prints no line
    of its own."""
    out = cli("show", str(store), FAKE_ROW)
    assert out.returncode == 0, out.stderr
    assert raw_unsafe(out.stdout) == []
    assert out.stdout.startswith("run evil\\nfake-run   FAILED   2026-01-01T00:00:00: ")
    assert not any(line.startswith("fake-run") for line in out.stdout.splitlines())


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_send_it_command_pasted_into_bash_names_the_run(store: Path) -> None:
    """The WAITING run's `send it:` line is escaped on screen, and bash reads its run id
    word back as the run id itself (nothing in it runs)."""
    out = cli("show", str(store), WAITING_ID)
    assert out.returncode == 0, out.stderr
    assert raw_unsafe(out.stdout) == []
    line = next(x for x in out.stdout.splitlines() if x.startswith("send it: "))
    words = line.removeprefix("send it: python -m stroma send-input ")
    said = subprocess.run(["bash", "-c", f'set -- {words}; printf %s "$2"'],
                          capture_output=True, text=True, timeout=30)
    assert said.returncode == 0 and said.stdout == WAITING_ID, (words, said)
