"""An input whose key is no field of the wait's schema but close to one it lacks
(``{"ok": true, "bY": "ann"}`` for ``by``) was taken, the key dropped by pydantic and the
field left at its default: a person's answer changed without a word. send_input (and the
CLI, which checks against the wait's JSON Schema) refuses it, naming the key and the
field; nothing is written and the run still waits. A key close to no field, or one whose
field is there too, is taken as before."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from interpreters.stores.file import FileStore
from stroma import InputRefused, send_input
from tests.timeline import pipelines as P

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def waiting(tmp_path: Path) -> FileStore:
    store = FileStore(tmp_path)
    assert anyio.run(P.agent_run, store).status.value == "WAITING"
    return store


@pytest.fixture
def folder(waiting: FileStore, tmp_path: Path) -> Path:
    return tmp_path


def stored(store: FileStore) -> str | None:
    async def read() -> str | None:
        return await store.get_input("agent", P.AGENT_KEY)

    return anyio.run(read)


@pytest.mark.parametrize(("payload", "said"), [
    ({"ok": True, "bY": "ann"}, "'bY' (did you mean 'by'?)"),
    ({"ok": False, "byy": "ann"}, "'byy' (did you mean 'by'?)"),
])
def test_a_near_miss_key_is_refused_and_nothing_is_written(
    waiting: FileStore, payload: dict[str, Any], said: str
) -> None:
    with pytest.raises(InputRefused) as info:
        anyio.run(lambda: send_input(waiting, "agent", "approval", payload))
    message = str(info.value)
    assert message.startswith(f"send_input: the input {P.AGENT_KEY!r} has the key {said}, "
                              "which Approval has no field for")
    assert "nothing was sent; the run still waits" in message
    assert stored(waiting) is None


@pytest.mark.parametrize("payload", [
    {"ok": True, "by": "ann", "note": "an extra key, close to no field"},
    {"ok": True, "by": "ann", "By": "the field is there too"},
])
def test_other_extra_keys_are_taken(waiting: FileStore, payload: dict[str, Any]) -> None:
    assert anyio.run(lambda: send_input(waiting, "agent", "approval", payload)) == P.AGENT_KEY
    assert json.loads(stored(waiting) or "null") == payload


def test_the_cli_refuses_a_near_miss_key_too(waiting: FileStore, folder: Path) -> None:
    """The CLI has no schema class, only the wait's JSON Schema: the same refusal."""
    done = subprocess.run(
        [sys.executable, "-m", "stroma", "send-input", str(folder), "agent",
         "approval", '{"ok": true, "By": "ann"}'],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2 and done.stdout == "", done
    assert done.stderr.startswith(f"stroma: error: send_input: the input {P.AGENT_KEY!r} has "
                                  "the key 'By' (did you mean 'by'?), which Approval has no "
                                  "field for")
    assert len(done.stderr.splitlines()) == 1
    assert stored(waiting) is None


@pytest.mark.parametrize("key", ["approval", P.AGENT_KEY])
def test_interpret_refuses_a_near_miss_key_in_its_inputs_before_running(
    tmp_path: Path, key: str
) -> None:
    """``interpret(inputs=...)`` refuses the same near misses, by the wait's name or its
    key, before anything runs (nothing is written to the store)."""
    from stroma import interpret

    store = FileStore(tmp_path)

    async def go() -> None:
        await interpret(P.agent_plan(), P.AGENT_START, store=store,
                        inputs={key: {"ok": True, "bY": "ann"}})

    with pytest.raises(InputRefused) as info:
        anyio.run(go)
    message = str(info.value)
    assert message.startswith(f"interpret(inputs=...): the input {key!r} has the key "
                              "'bY' (did you mean 'by'?), which Approval has no field for")
    assert message.endswith("(nothing was run)")
    assert list(tmp_path.iterdir()) == []


def test_interpret_takes_inputs_whose_keys_are_fields_or_close_to_none(
    tmp_path: Path,
) -> None:
    from stroma import interpret

    async def go() -> Any:
        return await interpret(P.agent_plan(), P.AGENT_START,
                               inputs={"approval": {"ok": True, "by": "ann", "note": "x"}})

    assert anyio.run(go).status.value in ("COMPLETED", "RESUMED")
