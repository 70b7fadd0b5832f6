"""A parallel group resumed after a crash merges as the uninterrupted run does, whatever
fields pydantic counts as set: children that return ``state.model_copy(update=...)`` (the
README's idiom) pass the group's input on, and after a resume that input was read back
from JSON with every field set; what a child passed on unchanged never overwrites what an
earlier child changed. And a state going from one schema to another holds what its JSON
holds (dicts under ``Any``), live as in a replay or a resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
from pydantic import BaseModel

from stroma import (
    AsyncInMemoryStore,
    FileStore,
    InMemoryStore,
    NodeContract,
    RunConfig,
    RunStatus,
    interpret,
    map_each,
    parallel,
    replay,
    seq,
    stroma_node,
)

pytestmark = pytest.mark.anyio


class It(BaseModel):
    item: int


class S(BaseModel):
    n: int = 0
    tag: str = ""
    items: list[int] = []
    outs: list[It] = []


class Pipeline:
    """``seq(x, parallel(CHILD, b))``; ``b`` stops the run (a crash) the first time while
    the other child has finished."""

    def __init__(self, shape: str) -> None:
        self.calls: list[str] = []
        self.crash = True
        self.scope: anyio.CancelScope | None = None
        self.shape = shape

    def node(self, name: str, schema: type[BaseModel], fn: Any) -> Any:
        async def call(state: Any) -> Any:
            self.calls.append(name)
            if name == "b" and self.crash:
                self.crash = False
                await anyio.sleep(0.05)  # the other child finishes, durably, meanwhile
                assert self.scope is not None
                self.scope.cancel()
                await anyio.sleep(5)
            return fn(state)

        return stroma_node(name, NodeContract(node_id=name, input_schema=schema,
                                              output_schema=schema))(call)

    def plan(self) -> Any:
        x = self.node("x", S, lambda s: s.model_copy(update={"n": s.n + 1}))
        a = self.node("a", S, lambda s: s.model_copy(update={"n": s.n + 1}))
        f = self.node("f", It, lambda s: s)
        b = self.node("b", S, lambda s: s.model_copy(update={"tag": "b"}))
        child = {"node": a, "seqmap": seq(a, map_each(f, over="items", into="outs"))}
        return seq(x, parallel(child[self.shape], b))

    async def run(self, store: Any) -> Any:
        with anyio.CancelScope() as scope:
            self.scope = scope
            return await interpret(self.plan(), S(items=[1, 2]), store=store,
                                   config=RunConfig(run_id="r"))
        return None


@pytest.fixture(params=["memory", "async-memory", "file"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    kind = request.param
    return (InMemoryStore() if kind == "memory" else AsyncInMemoryStore()
            if kind == "async-memory" else FileStore(tmp_path))


@pytest.mark.parametrize("shape", ["node", "seqmap"])
async def test_a_resumed_group_merges_as_the_uninterrupted_one(
    anyio_backend: str, store: Any, shape: str
) -> None:
    reference = Pipeline(shape)
    reference.crash = False
    expected = await reference.run(InMemoryStore())
    assert expected.final_state.n == 2 and expected.final_state.tag == "b"

    crashed = Pipeline(shape)
    assert await crashed.run(store) is None  # stopped inside the group
    crashed.calls.clear()
    resumed = await crashed.run(store)
    assert resumed.status is RunStatus.RESUMED
    assert resumed.final_state == expected.final_state
    assert crashed.calls == ["b"]  # only the child in flight ran again
    again = await replay(crashed.plan(), resumed.log)
    assert again.final_state == expected.final_state


async def test_a_state_under_any_holds_what_its_json_holds(anyio_backend: str) -> None:
    class Out(BaseModel):
        v: int

    class Loose(BaseModel):
        items: list[int] = []
        outs: list[Any] = []

    f = stroma_node("f", NodeContract(node_id="f", input_schema=It, output_schema=Out))(
        _times_ten)
    g = stroma_node("g", NodeContract(node_id="g", input_schema=Loose,
                                      output_schema=Loose))(_same)
    plan = seq(map_each(f, over="items", into="outs", input=Loose), g)
    live = await interpret(plan, Loose(items=[1, 2]))
    assert live.final_state.outs == [{"v": 10}, {"v": 20}]
    assert (await replay(plan, live.log)).final_state == live.final_state


async def _times_ten(state: It) -> dict[str, int]:
    return {"v": state.item * 10}


async def _same(state: Any) -> Any:
    return state
