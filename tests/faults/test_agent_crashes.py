"""Agents survive SIGKILL: a run killed inside a loop, and a WAITING run resumed by other
processes, on FileStore (asyncio and trio), RedisStore and PostgresStore.

Each process is a real ``python -m tests.faults.agent_worker``; node calls are counted in
files (one per process), and the kill lands deterministically: the node of the chosen
iteration writes a marker file and blocks until it is killed. Redis and PostgreSQL are the
shared servers, under a key prefix / table prefix of the test's own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from stroma.inputs import pending_wait
from stroma.log import ResumeMarker
from stroma.trace import ExecutionTrace, RunStatus
from tests.faults.agent_worker import LOOP_ITERATIONS, WAIT_ITERATIONS, Agent, Approval
from tests.services import (
    POSTGRES_DSN,
    REDIS_URL,
    START_POSTGRES,
    START_REDIS,
    drop_postgres_tables,
    require,
    unique,
)

ROOT = Path(__file__).resolve().parents[2]
Place = tuple[str, str, str, str]  # kind, target, name, backend


@pytest.fixture(params=[
    pytest.param(("file", "asyncio"), id="file-asyncio"),
    pytest.param(("file", "trio"), id="file-trio"),
    pytest.param(("redis", "asyncio"), id="redis", marks=pytest.mark.redis),
    pytest.param(("postgres", "asyncio"), id="postgres", marks=pytest.mark.postgres),
])
def place(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Place]:
    """Where the workers keep the run: a fresh folder, key prefix or table prefix (emptied or
    dropped afterwards), and the anyio backend they run on."""
    kind, backend = request.param
    if kind == "file":
        yield kind, str(tmp_path / "store"), "-", backend
        return
    if kind == "redis":
        import redis

        url = require("Redis", REDIS_URL, 6379, START_REDIS)
        prefix = unique("stroma-agent")
        try:
            yield kind, url, prefix, backend
        finally:
            client = redis.Redis.from_url(url)
            try:
                for key in client.scan_iter(match=prefix.encode() + b":*", count=1000):
                    client.delete(key)
            finally:
                client.close()
        return
    from interpreters.stores.postgres import PostgresStore

    dsn = require("PostgreSQL", POSTGRES_DSN, 5432, START_POSTGRES)
    prefix = unique("agent")
    try:
        yield kind, dsn, prefix, backend
    finally:
        tables = PostgresStore(dsn, table_prefix=prefix).tables
        anyio.run(drop_postgres_tables, dsn, tables, backend="asyncio")


def _start(mode: str, place: Place, run_id: str, folder: Path, label: str,
           *payloads: str) -> subprocess.Popen[str]:
    kind, target, name, backend = place
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.faults.agent_worker", mode, kind, target, name, run_id,
         str(folder), label, backend, *payloads],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _finish(process: subprocess.Popen[str]) -> list[str]:
    """The lines the worker printed; it must exit cleanly."""
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    return out.splitlines()


def _done(lines: list[str], status: str) -> Agent:
    """The final state of a worker that printed ``DONE <status> <state>``."""
    assert len(lines) == 1 and lines[0].startswith(f"DONE {status} "), lines
    return Agent.model_validate_json(lines[0].split(" ", 2)[2])


def _calls(folder: Path, label: str) -> list[tuple[str, int, str]]:
    """The node calls a process made: (node, iteration, idempotency key), in order."""
    path = folder / f"calls.{label}"
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        node, iteration, key = line.split()
        out.append((node, int(iteration), key))
    return out


def _iterations(*nodes: str, through: int, start: int = 1) -> list[tuple[str, int]]:
    return [(node, n) for n in range(start, through + 1) for node in nodes]


async def _read(place: Place, run_id: str, key: str | None = None) -> tuple[Any, str | None]:
    """The run's log and (with ``key``) its input, read by this test process."""
    from tests.faults.agent_worker import make_store

    kind, target, name, _ = place
    store = make_store(kind, target, name)
    try:
        log = await store.read_log(run_id)
        text = None if key is None else await store.get_input(run_id, key)
    finally:
        if hasattr(store, "close"):
            await store.close()
    return log, text


def read(place: Place, run_id: str, key: str | None = None) -> tuple[Any, str | None]:
    return anyio.run(_read, place, run_id, key, backend="asyncio")


def _trace(log: Any) -> ExecutionTrace:
    trace = ExecutionTrace()
    for event in log.trace():
        trace.append(event)
    return trace


@pytest.mark.slow
def test_a_run_killed_inside_a_loop_resumes_to_the_uninterrupted_result(
    place: Place, tmp_path: Path
) -> None:
    """A run SIGKILLed during iteration 4 of 8 and resumed by a new process ends equal to an
    uninterrupted run: no committed node runs again, the iterations go on from 4, and the
    call cut off by the kill keeps its idempotency key."""
    folder = tmp_path / "marks"
    folder.mkdir()
    reference = _done(_finish(_start("loop", place, "ref", folder, "ref")), "COMPLETED")
    assert reference.n == LOOP_ITERATIONS

    (folder / "block").write_text("act 4", encoding="utf-8")
    first = _start("loop", place, "agent", folder, "first")
    deadline = time.monotonic() + 60
    while not (folder / "blocked").exists():
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline, "the worker never reached iteration 4"
        time.sleep(0.01)
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=30)
    assert first.returncode == -signal.SIGKILL

    log, _ = read(place, "agent")
    committed = [(e.node_id, e.iteration) for e in log.trace()]
    assert committed == [*_iterations("think", "act", through=3), ("think", 4)]
    assert log.finish is None

    (folder / "block").unlink()
    resumed = _done(_finish(_start("loop", place, "agent", folder, "second")), "RESUMED")
    assert resumed == reference

    before, after = _calls(folder, "first"), _calls(folder, "second")
    assert [(n, i) for n, i, _ in before] == [*_iterations("think", "act", through=4)]
    assert [(n, i) for n, i, _ in after] == [
        ("act", 4), *_iterations("think", "act", start=5, through=LOOP_ITERATIONS)]
    assert before[-1][2] == after[0][2]  # act of iteration 4: the same logical call
    keys = Counter(key for _, _, key in before[:-1] + after)
    assert len(keys) == 2 * LOOP_ITERATIONS and set(keys.values()) == {1}

    log, _ = read(place, "agent")
    reference_log, _ = read(place, "ref")
    assert log.finish is not None and log.finish.status is RunStatus.RESUMED
    assert sum(isinstance(r, ResumeMarker) for r in log.records) == 1
    full = [(e.node_id, e.iteration) for e in log.trace()]
    assert full == [(e.node_id, e.iteration) for e in reference_log.trace()]
    assert full == _iterations("think", "act", through=LOOP_ITERATIONS)
    assert _trace(log).diff(_trace(reference_log)) == []


@pytest.mark.slow
def test_a_waiting_run_is_sent_its_input_and_resumed_by_other_processes(
    place: Place, tmp_path: Path
) -> None:
    """Process 1 ends WAITING and exits; process 2 sends the input (a bad payload refused,
    naming the field, then a good one); process 3 resumes the run to RESUMED with the input
    in its state, no node before the wait run again."""
    folder = tmp_path / "marks"
    folder.mkdir()
    waiting = _done(_finish(_start("wait", place, "approve", folder, "first")), "WAITING")
    assert waiting.n == WAIT_ITERATIONS and waiting.approval is None
    log, _ = read(place, "approve")
    [wait] = pending_wait(log)
    assert wait.key == "approval"

    sent = _finish(_start("send", place, "approve", folder, "send",
                          '{"approved": "maybe", "by": "ada"}',
                          '{"approved": true, "by": "ada"}'))
    assert len(sent) == 2 and sent[1] == "SENT approval", sent
    # (checked against the JSON Schema the log keeps: the sender does not import the plan)
    assert sent[0].startswith("REFUSED ") and "approved: expected boolean" in sent[0], sent
    log, text = read(place, "approve", "approval")
    assert [w.key for w in pending_wait(log)] == ["approval"]  # still waiting, until resumed
    assert text is not None and json.loads(text) == {"approved": True, "by": "ada"}

    done = _done(_finish(_start("wait", place, "approve", folder, "third")), "RESUMED")
    assert done.approval == Approval(approved=True, by="ada")
    assert done.notes == [*(f"{node}{n}" for node, n in _iterations(
        "think", "act", through=WAIT_ITERATIONS)), f"publish{WAIT_ITERATIONS + 1}"]

    assert [(n, i) for n, i, _ in _calls(folder, "first")] == _iterations(
        "think", "act", through=WAIT_ITERATIONS)
    assert _calls(folder, "send") == []
    assert [(n, i) for n, i, _ in _calls(folder, "third")] == [("publish", WAIT_ITERATIONS + 1)]
    log, _ = read(place, "approve")
    assert log.finish is not None and log.finish.status is RunStatus.RESUMED
    assert pending_wait(log) == []
