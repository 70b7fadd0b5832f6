"""Failed attempts on the `stroma` logger (issue 9, item 11).

Each failed attempt is a WARNING on the ``stroma`` logger naming the run id, the node, the
attempt, the failure class and the message, so a user who configured logging sees retries
without writing a hook; successful attempts and replays log nothing. ``import stroma``
adds a NullHandler, so an application that configured no logging sees nothing at all.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from stroma import (
    FailureClass,
    FailurePolicy,
    NodeContract,
    RunStatus,
    map_each,
    replay,
    seq,
    stroma_node,
)
from stroma.runner import RunConfig, interpret

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
FAST = {c: FailurePolicy(max_retries=3, backoff_seconds=0) for c in FailureClass}


class Num(BaseModel):
    value: int


class Items(BaseModel):
    items: list[int]


class Item(BaseModel):
    item: int


def node(node_id: str, inp: type[BaseModel], out: type[BaseModel], body: Any) -> Any:
    body.__name__ = node_id
    return stroma_node(node_id, NodeContract(node_id=node_id, input_schema=inp,
                                             output_schema=out))(body)


def failures(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "stroma" and " failed (" in r.getMessage()]


async def test_each_failed_attempt_is_a_warning_naming_run_node_attempt_class_message(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A node failing AMBIGUOUS, then RECOVERABLE, then succeeding gives exactly two
    WARNING records on `stroma`, each naming the run id, node, attempt, class and message
    (and carrying run_id), in order; the success logs nothing."""
    caplog.set_level(logging.DEBUG, logger="stroma")
    calls = Counter[str]()

    async def flaky(s: Num) -> dict[str, int]:
        calls["flaky"] += 1
        if calls["flaky"] == 1:
            raise ValueError("malformed model output")
        if calls["flaky"] == 2:
            raise TimeoutError("upstream timed out")
        return {"value": s.value + 1}

    result = await interpret([node("flaky", Num, Num, flaky)], Num(value=1),
                             config=RunConfig(run_id="log-run-7", policy_map=FAST))

    assert result.status is RunStatus.COMPLETED
    records = failures(caplog)
    assert [r.levelno for r in records] == [logging.WARNING, logging.WARNING]
    for record, attempt, cls, message in (
        (records[0], 1, "AMBIGUOUS", "malformed model output"),
        (records[1], 2, "RECOVERABLE", "upstream timed out"),
    ):
        text = record.getMessage()
        assert "log-run-7" in text and "'flaky'" in text, text
        assert f"attempt {attempt}" in text and cls in text and message in text, text
        assert record.__dict__["run_id"] == "log-run-7"


async def test_terminal_failures_fan_out_children_and_sub_plans_are_logged(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A group's failed attempt is logged under the group's id, a failed node inside a
    sub-plan child under its own id, a TERMINAL contract violation under its node; all
    with the run's id."""
    caplog.set_level(logging.WARNING, logger="stroma")
    tries = Counter[int]()

    async def fetch(i: Item) -> dict[str, int]:
        tries[i.item] += 1
        if i.item == 2 and tries[i.item] == 1:
            raise TimeoutError("document server down")
        return {"item": i.item}

    async def parse(i: Item) -> dict[str, int]:
        return {"item": i.item}

    async def fetch2(i: Item) -> dict[str, int]:
        tries[-i.item] += 1
        if i.item == 2 and tries[-i.item] == 1:
            raise TimeoutError("document server down")
        return {"item": i.item}

    async def broken(s: Items) -> dict[str, Any]:
        return {"items": "not a list"}

    flat = map_each(node("fetch", Item, Item, fetch), over="items", into="got", input=Items)
    nested = map_each(seq(node("parse", Item, Item, parse), node("fetch2", Item, Item, fetch2)),
                      over="items", into="got2", input=Items)
    plan = seq(flat) >> nested >> node("broken", Items, Items, broken)

    result = await interpret(plan, Items(items=[1, 2]),
                             config=RunConfig(run_id="log-run-8", policy_map=FAST))

    assert result.status is RunStatus.FAILED
    texts = [r.getMessage() for r in failures(caplog)]
    assert len(texts) == 3, texts
    assert all("log-run-8" in t for t in texts)
    assert "map_each(fetch, over=items, into=got)" in texts[0] and "RECOVERABLE" in texts[0]
    assert "'fetch2' attempt 1" in texts[1] and "document server down" in texts[1]
    assert "'broken' attempt 1" in texts[2] and "TERMINAL" in texts[2]
    assert "Contract violation" in texts[2]


async def test_a_clean_run_and_a_replay_log_no_failures(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A run without failures logs no warning, and replaying a run that had failures logs
    none either: the warnings are the live run's, not the log's."""
    caplog.set_level(logging.WARNING, logger="stroma")
    calls = Counter[str]()

    async def flaky(s: Num) -> dict[str, int]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise TimeoutError("slow")
        return {"value": 2}

    async def fine(s: Num) -> dict[str, int]:
        return {"value": s.value}

    clean = await interpret([node("fine", Num, Num, fine)], Num(value=1))
    assert clean.status is RunStatus.COMPLETED and failures(caplog) == []

    plan = [node("flaky", Num, Num, flaky)]
    result = await interpret(plan, Num(value=1), config=RunConfig(policy_map=FAST))
    assert len(failures(caplog)) == 1
    caplog.clear()
    assert await replay(plan, result.log) == result
    assert failures(caplog) == []


SCRIPT = """
import sys
import anyio
from pydantic import BaseModel
if sys.argv[1] == "configured":
    import logging
    logging.basicConfig(format="%(levelname)s %(name)s %(message)s")
from stroma import NodeContract, RunConfig, interpret, stroma_node, FailurePolicy

class Num(BaseModel):
    value: int

async def flaky(s: Num) -> dict:
    raise TimeoutError("the document server is down")

node = stroma_node("flaky", NodeContract(node_id="flaky", input_schema=Num,
                                         output_schema=Num))(flaky)

async def main() -> None:
    policy = {"RECOVERABLE": FailurePolicy(max_retries=1, backoff_seconds=0)}
    result = await interpret([node], Num(value=1),
                             config=RunConfig(run_id="quiet-run", policy_map=policy))
    print(result.status)

for backend in ("asyncio", "trio"):
    anyio.run(main, backend=backend)
"""


@pytest.mark.parametrize("logging_setup", ["none", "configured"])
def test_import_stroma_is_silent_unless_the_application_configures_logging(
    logging_setup: str,
) -> None:
    """In a fresh process that configured no logging, failed attempts print nothing (the
    stroma logger has a NullHandler, so Python's last-resort handler stays quiet); once
    the application calls logging.basicConfig, each failed attempt is a WARNING line."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", SCRIPT, logging_setup], capture_output=True,
                         text=True, timeout=120, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["PARTIAL", "PARTIAL"]
    if logging_setup == "none":
        assert out.stderr == ""
    else:
        lines = out.stderr.splitlines()
        assert len(lines) == 4, out.stderr  # two attempts on each backend
        assert all(line.startswith("WARNING stroma ") and "quiet-run" in line
                   and "'flaky'" in line and "RECOVERABLE" in line
                   and "the document server is down" in line for line in lines), lines
        assert [("attempt 1" in line, "attempt 2" in line) for line in lines] == [
            (True, False), (False, True)] * 2


def test_the_stroma_logger_has_a_null_handler() -> None:
    """`import stroma` puts a NullHandler on the `stroma` logger."""
    import stroma  # noqa: F401

    handlers = logging.getLogger("stroma").handlers
    assert any(isinstance(h, logging.NullHandler) for h in handlers)
