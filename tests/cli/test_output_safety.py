"""What the tools print of a run's text is safe for where it goes: control characters
never reach the terminal raw and leave the SVG well-formed XML, the UI's embedded JSON
stays JSON whatever the text holds ("<!--", "</script>"), --json and /api are strict JSON
(no bare NaN); and the figures the tools name are the ones to act on: a damaged line by
the file's own number, the short digest that `runs` shows."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import anyio
import pytest
from pydantic import BaseModel

from interpreters.stores.file import FileStore
from interpreters.ui.pages import run_page
from stroma import FailureClass, FailurePolicy, StromaRunner, await_input, seq
from stroma.runner import RunConfig, interpret
from stroma.timeline import timeline

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stroma", *args], cwd=ROOT, capture_output=True, text=True,
        timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )


class Note(BaseModel):
    note: str = ""
    score: float = 0.0


class Approval(BaseModel):
    approved: bool


class Ask(BaseModel):
    q: str = "?"
    approval: Approval | None = None


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Runs whose text is hostile: an error with terminal colour codes, a state holding
    "<!--" and "</script>" and a NaN; a WAITING run; a finished chain."""
    path = tmp_path_factory.mktemp("unsafe")
    runner = StromaRunner.quick()

    @runner.node("colour", input=Note, output=Note)
    async def colour(state: Note) -> dict[str, str]:
        raise ValueError("\x1b[31mred\x1b[0m and a bell \x07")

    @runner.node("markup", input=Note, output=Note)
    async def markup(state: Note) -> dict[str, object]:
        return {"note": "a <!-- comment --> and </script>", "score": math.nan}

    async def record() -> None:
        fs = FileStore(path)
        await interpret(seq(colour), Note(), store=fs, config=RunConfig(
            run_id="colour", policy_map={FailureClass.AMBIGUOUS: FailurePolicy(
                max_retries=0, backoff_seconds=0)}))
        await interpret(seq(markup), Note(), store=fs, config=RunConfig(run_id="markup"))
        await interpret(seq(await_input("approval", Approval, input=Ask)), Ask(), store=fs,
                        config=RunConfig(run_id="waits"))

    anyio.run(record)
    return path


def test_control_characters_reach_neither_the_terminal_nor_the_svg(store: Path) -> None:
    shown = cli("show", str(store), "colour")
    assert shown.returncode == 0, shown.stderr
    assert "\x1b" not in shown.stdout and "\x07" not in shown.stdout
    assert "\\x1b[31mred" in shown.stdout  # shown, as an escape
    svg = cli("show", str(store), "colour", "--svg", "-")
    assert svg.returncode == 0, svg.stderr
    ET.fromstring(svg.stdout)  # well-formed XML
    assert "\ufffd[31mred" in svg.stdout


def test_json_output_is_strict_json(store: Path) -> None:
    out = cli("show", str(store), "markup", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout, parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert "NaN" in json.dumps(data)  # the NaN, as text
    both = cli("show", str(store), "markup", "--json", "--svg", "-")
    assert both.returncode == 2 and "would both write to standard output" in both.stderr


def test_the_run_page_embeds_json_whatever_the_state_holds(store: Path) -> None:
    async def page() -> str:
        log = await FileStore(store).read_log("markup")
        assert log is not None
        return run_page(str(store), timeline(log), ("none", ""))

    html = anyio.run(page)
    data = re.search(r'<script type="application/json" id="timeline-data">(.*?)</script>',
                     html, re.S)
    assert data is not None
    assert "<" not in data.group(1)  # nothing in it can end or bend the script
    parsed = json.loads(data.group(1))
    assert "a <!-- comment --> and </script>" in json.dumps(parsed, ensure_ascii=False)


def test_send_input_takes_the_short_digest_runs_shows(store: Path) -> None:
    listed = cli("runs", str(store))
    short = re.search(r"digest ([0-9a-f]{8})", listed.stdout)
    assert short is not None, listed.stdout
    sent = cli("send-input", str(store), "waits", "approval", '{"approved": true}',
               "--digest", short.group(1))
    assert sent.returncode == 0, sent.stderr
    wrong = cli("send-input", str(store), "waits", "approval", '{"approved": true}',
                "--digest", "00000000")
    assert wrong.returncode == 2 and "meant for another request" in wrong.stderr


def test_a_damaged_line_is_named_by_the_file_s_own_number(tmp_path: Path) -> None:
    """The log file holds checkpoint lines too; the damaged line is named as the file
    numbers it, to be found and repaired there."""
    runner = StromaRunner.quick()

    @runner.node("a", input=Note, output=Note)
    async def a(state: Note) -> dict[str, str]:
        return {"note": "a"}

    @runner.node("b", input=Note, output=Note)
    async def b(state: Note) -> dict[str, str]:
        return {"note": "b"}

    anyio.run(lambda: interpret(seq(a, b), Note(), store=FileStore(tmp_path),
                                config=RunConfig(run_id="chain")))
    log = tmp_path / "runs" / "chain" / "log.jsonl"
    lines = log.read_text().splitlines()
    assert any(line.startswith('{"ckpt":1,') for line in lines)
    last_commit = max(i for i, line in enumerate(lines) if '"t":"Commit"' in line)
    lines[last_commit] = lines[last_commit].replace('"attempt":1,', '"attempt":1,,,', 1)
    log.write_text("\n".join(lines) + "\n")
    out = cli("show", str(tmp_path), "chain")
    assert out.returncode == 2
    assert f"line {last_commit + 1}: not JSON" in out.stderr, out.stderr


def test_a_store_url_that_cannot_be_read_is_one_line() -> None:
    out = cli("runs", "redis://[bad")
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "cannot read the store URL" in out.stderr and "Traceback" not in out.stderr
