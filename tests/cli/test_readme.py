"""The README's "Command line" section names the keys `runs --json` gives for a WAITING
run's `waiting_for`, exactly the keys the JSON has."""

from __future__ import annotations

import json
import re
from pathlib import Path

import anyio
from pydantic import BaseModel

from interpreters.stores.file import FileStore
from stroma import await_input, seq
from stroma.runner import RunConfig, interpret
from tests.cli.test_cli import ROOT, cli


class Approval(BaseModel):
    approved: bool


class Ask(BaseModel):
    q: str = "?"
    approval: Approval | None = None


def command_line_section() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("\n## Command line\n")
    return text[start: text.index("\n## ", start + 1)]


def test_the_readme_names_the_waiting_for_keys_the_json_has(tmp_path: Path) -> None:
    """Each key of a `waiting_for` entry is named (as `key`) in the README's sentence,
    and the sentence names no key the JSON lacks."""
    async def record() -> None:
        await interpret(seq(await_input("approval", Approval, input=Ask)), Ask(),
                        store=FileStore(tmp_path), config=RunConfig(run_id="waits"))

    anyio.run(record)
    out = cli("runs", str(tmp_path), "--json")
    assert out.returncode == 0, out.stderr
    [run] = json.loads(out.stdout)
    [wait] = run["waiting_for"]
    sentence = re.search(r"`--json` gives\s+`waiting_for`(.*?);", command_line_section(), re.S)
    assert sentence is not None, "the README no longer describes waiting_for"
    named = set(re.findall(r"`(\w+)`", sentence.group(1)))
    assert named == set(wait), (named, set(wait))
