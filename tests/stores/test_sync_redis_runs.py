"""SyncRedisStore under interpret: it holds the effect log (resume, finished results) and
leases a run to one worker, like RedisStore."""

from __future__ import annotations

import uuid
from typing import Any

import anyio
import pytest
from pydantic import BaseModel

from interpreters.stores.redis import SyncRedisStore
from stroma import NodeContract, RunLocked, RunStatus, stroma_node
from stroma.runner import RunConfig, interpret

pytestmark = pytest.mark.redis


class N(BaseModel):
    v: int


def pipeline(calls: list[str], gate: anyio.Event | None = None) -> list[Any]:
    def make(node_id: str) -> Any:
        async def step(state: N) -> dict[str, int]:
            calls.append(node_id)
            if gate is not None and node_id == "b":
                await gate.wait()
            return {"v": state.v + 1}

        contract = NodeContract(node_id=node_id, input_schema=N, output_schema=N)
        return stroma_node(node_id, contract)(step)

    return [make("a"), make("b"), make("c")]


@pytest.fixture
def store(redis_url: str) -> Any:
    s = SyncRedisStore(redis_url, key_prefix=f"syncrun{uuid.uuid4().hex[:8]}", lease_ms=2000)
    yield s
    for run in s.run_ids():
        s.delete(run)
    s.close()


@pytest.mark.anyio
async def test_a_finished_run_is_returned_without_running(store: Any) -> None:
    """With a SyncRedisStore, a second interpret on a finished run id runs nothing."""
    calls: list[str] = []
    first = await interpret(pipeline(calls), N(v=0), store=store,
                            config=RunConfig(run_id="done"))
    again: list[str] = []
    second = await interpret(pipeline(again), N(v=0), store=store,
                             config=RunConfig(run_id="done"))
    assert first.status is second.status is RunStatus.COMPLETED
    assert second.final_state == first.final_state == N(v=3)
    assert calls == ["a", "b", "c"] and again == []
    log = store.read_log("done")
    assert log is not None and log.finish is not None


@pytest.mark.anyio
async def test_a_second_worker_gets_run_locked(store: Any) -> None:
    """While one interpret holds the run, a second on the same run id gets RunLocked."""
    gate = anyio.Event()
    calls: list[str] = []
    errors: list[BaseException] = []

    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: interpret(pipeline(calls, gate), N(v=0), store=store,
                                        config=RunConfig(run_id="busy")))
        with anyio.fail_after(10):
            while "b" not in calls:  # the first worker holds the lease, inside node b
                await anyio.sleep(0)
        try:
            await interpret(pipeline([]), N(v=0), store=store, config=RunConfig(run_id="busy"))
        except RunLocked as e:
            errors.append(e)
        gate.set()
    assert len(errors) == 1
    assert "busy" in str(errors[0])
