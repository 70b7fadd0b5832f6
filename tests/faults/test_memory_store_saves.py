"""An in-memory store whose checkpoint save fails: the commit is not kept in the log it
holds by reference, so resuming commits the recorded output again (its checkpoint then
there) instead of counting a node committed whose checkpoint was never saved."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from stroma import AsyncInMemoryStore, InMemoryStore, RunStatus, StromaRunner
from stroma.errors import StoreError
from stroma.runner import RunConfig, interpret

pytestmark = pytest.mark.anyio


class S(BaseModel):
    v: int = 0


def failing(base: type, fail_at: int) -> Any:
    """A ``base`` store whose ``fail_at``-th checkpoint save raises (once)."""
    count = [0]

    def counted() -> None:
        count[0] += 1
        if count[0] == fail_at:
            raise StoreError(f"injected: save {fail_at} failed")

    if base is AsyncInMemoryStore:
        class FailingAsync(AsyncInMemoryStore):
            async def save_state_json(self, run_id: str, node_id: str, data: bytes,
                                      schema: Any) -> None:
                counted()
                await super().save_state_json(run_id, node_id, data, schema)

        return FailingAsync()

    class Failing(InMemoryStore):
        def save_state_json(self, run_id: str, node_id: str, data: bytes,
                            schema: Any) -> None:
            counted()
            super().save_state_json(run_id, node_id, data, schema)

    return Failing()


@pytest.mark.parametrize("base", [InMemoryStore, AsyncInMemoryStore])
@pytest.mark.parametrize("fail_at", [1, 3, 4])
async def test_a_failed_save_is_committed_again_on_resume(
    anyio_backend: str, base: type, fail_at: int
) -> None:
    runner = StromaRunner.quick()
    calls: list[str] = []

    def make(i: int) -> Any:
        @runner.node(f"n{i}", input=S, output=S)
        async def node(state: S) -> dict[str, int]:
            calls.append(f"n{i}")
            return {"v": state.v + 1}
        return node

    nodes = [make(i) for i in range(4)]
    store = failing(base, fail_at)
    with pytest.raises(StoreError, match="injected"):
        await interpret(nodes, S(), store=store, config=RunConfig(run_id="r"))
    assert len(calls) == fail_at  # the node whose save failed had run

    result = await interpret(nodes, S(), store=store, config=RunConfig(run_id="r"))
    assert result.status is RunStatus.RESUMED and result.final_state == S(v=4)
    assert len(calls) == 4  # no node ran twice: the failed one's output was recorded
    for i in range(4):
        saved = store.load("r", f"n{i}")
        if base is AsyncInMemoryStore:
            saved = await saved
        assert saved == S(v=i + 1)  # every checkpoint there, the failed one included
    again = await interpret(nodes, S(), store=store,
                            config=RunConfig(run_id="r2", resume_from="n2"))
    assert again.status is not RunStatus.RESUMED  # (another run id: nothing to resume)
    resumed = await interpret(nodes, S(), store=store,
                              config=RunConfig(run_id="r", resume_from="n2"))
    assert resumed.status is RunStatus.RESUMED and resumed.final_state == S(v=4)
