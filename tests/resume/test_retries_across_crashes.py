"""A failed attempt is durable before its retry: a run that crashes during the retry
resumes with the failure counted, so crashes never give a node more retries than its
policy allows."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from pydantic import BaseModel

from stroma import FailureClass, FailurePolicy, FileStore, NodeContract, stroma_node
from stroma.runner import RunConfig, interpret
from stroma.trace import RunStatus

pytestmark = pytest.mark.anyio

ONE_RETRY = {c: FailurePolicy(max_retries=1, backoff_seconds=0.0) for c in FailureClass}


class Num(BaseModel):
    value: int


async def test_a_crash_during_a_retry_resumes_with_the_failure_counted(
        tmp_path: Path, anyio_backend: str) -> None:
    calls: list[int] = []

    async def flaky(s: Num) -> dict[str, int]:
        calls.append(len(calls) + 1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process is stopped during the retry
        raise ConnectionError(f"down (call {len(calls)})")

    node = stroma_node("flaky", NodeContract(node_id="flaky", input_schema=Num,
                                             output_schema=Num))(flaky)
    config = RunConfig(run_id="retried", policy_map=ONE_RETRY)
    with pytest.raises(KeyboardInterrupt):
        await interpret([node], Num(value=1), store=FileStore(tmp_path), config=config)
    stored = await FileStore(tmp_path).read_log("retried")
    assert stored is not None
    assert [e.attempt for e in stored.trace()] == [1]  # attempt 1's failure is kept

    result = await interpret([node], Num(value=1), store=FileStore(tmp_path), config=config)

    # The retry that was cut off runs again; it is the last the policy allows.
    assert result.status is RunStatus.PARTIAL
    assert calls == [1, 2, 3]
    assert [(e.attempt, e.failure) for e in result.trace] == [
        (1, FailureClass.AMBIGUOUS), (2, FailureClass.AMBIGUOUS)]
    assert "after 2 attempt(s)" in (result.stop_reason or "")


async def test_a_crash_during_a_retry_inside_a_sub_plan_child_counts_the_failure(
        tmp_path: Path, anyio_backend: str) -> None:
    """The same inside a fan-out child that is a whole plan: its failed attempt is kept as
    the group's progress in the run's log before the retry."""
    from stroma import parallel, seq

    calls: list[int] = []

    class Both(BaseModel):
        value: int = 0
        side: int = 0

    async def other(s: Both) -> dict[str, int]:
        return {"value": s.value + 1}

    stop = anyio.CancelScope()

    async def flaky(s: Both) -> dict[str, int]:
        calls.append(len(calls) + 1)
        if len(calls) == 2:  # the run is stopped from outside during the retry
            stop.cancel()
            await anyio.sleep_forever()
        raise ConnectionError(f"down (call {len(calls)})")

    async def side(s: Both) -> dict[str, int]:
        return {"side": 1}

    def node(node_id: str, fn: object) -> object:
        return stroma_node(node_id, NodeContract(node_id=node_id, input_schema=Both,
                                                 output_schema=Both))(fn)

    plan = parallel(seq(node("other", other), node("flaky", flaky)), node("side", side))
    config = RunConfig(run_id="child-retried", policy_map=ONE_RETRY)
    with stop:
        await interpret(plan, Both(), store=FileStore(tmp_path), config=config)
    assert stop.cancelled_caught and calls == [1, 2]

    result = await interpret(plan, Both(), store=FileStore(tmp_path), config=config)

    assert result.status is RunStatus.PARTIAL
    assert calls == [1, 2, 3]  # the cut-off retry again, and no more
    assert "'flaky' gave up after 2 attempt(s)" in (result.stop_reason or "")
