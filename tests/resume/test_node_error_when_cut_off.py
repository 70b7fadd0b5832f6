"""A run cancelled from outside while a node turns its cancellation into an error of its
own (an HTTP client's ConnectionError when its call is cut off) stops there: the error is
the cancellation's, not a failed attempt of the node.

It used to be reported as the node's failure: the run recorded a failed attempt (durable)
and went on, with nothing left to cancel it, to a Finish of its own (PARTIAL when the
policy allowed no retry): the run was not cancelled, and running it again gave that
PARTIAL instead of the uninterrupted run's end. The same inside a loop, as a parallel or
map_each child, and as a node of a sub-plan child; on FileStore (both backends), Redis and
PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydantic import BaseModel

from stroma import (
    FailureClass,
    FailurePolicy,
    FileStore,
    NodeContract,
    RunConfig,
    RunStatus,
    interpret,
    loop,
    map_each,
    parallel,
    seq,
    stroma_node,
)

pytestmark = pytest.mark.anyio

NO_RETRY = {c: FailurePolicy(max_retries=0, backoff_seconds=0.0) for c in FailureClass}


class Item(BaseModel):
    item: int


class S(BaseModel):
    n: int = 0
    items: list[int] = [1, 2]
    outs: list[Item] = []
    side: str = ""


class Nodes:
    """Nodes counting their calls; ``cut`` (once armed) blocks until cancelled, then raises
    ConnectionError, as a client cut off does."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.armed = True
        self.started = anyio.Event()

    async def _cut(self) -> None:
        if not self.armed:
            return
        self.started.set()
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            raise ConnectionError("connection closed") from None

    def add(self, node_id: str, *, cut: bool = False) -> Any:
        async def fn(s: S) -> dict[str, int]:
            self.calls.append(node_id)
            if cut:
                await self._cut()
            return {"n": s.n + 1}

        return stroma_node(node_id, NodeContract(node_id=node_id, input_schema=S,
                                                 output_schema=S))(fn)

    def side(self, node_id: str) -> Any:
        async def fn(s: S) -> dict[str, str]:
            self.calls.append(node_id)
            return {"side": node_id}

        return stroma_node(node_id, NodeContract(node_id=node_id, input_schema=S,
                                                 output_schema=S))(fn)

    def item(self, node_id: str) -> Any:
        async def fn(s: Item) -> dict[str, int]:
            self.calls.append(f"{node_id}{s.item}")
            if s.item == 2:
                await self._cut()
            return {"item": 10 * s.item}

        return stroma_node(node_id, NodeContract(node_id=node_id, input_schema=Item,
                                                 output_schema=Item))(fn)


def _plans(nodes: Nodes) -> dict[str, Any]:
    return {
        "node": lambda: seq(nodes.add("a"), nodes.add("b", cut=True), nodes.add("c")),
        "loop": lambda: seq(nodes.add("a"), loop(nodes.add("b", cut=True),
                                                  until=lambda s: s.n >= 3, max_iterations=3,
                                                  name="L"), nodes.add("c")),
        "parallel": lambda: seq(nodes.add("a"), parallel(nodes.add("b", cut=True),
                                                          nodes.side("x")), nodes.add("c")),
        "map_each": lambda: seq(nodes.add("a"), map_each(nodes.item("d"), over="items",
                                                          into="outs"), nodes.add("c")),
        "sub-plan": lambda: seq(nodes.add("a"), parallel(seq(nodes.add("y"),
                                                             nodes.add("b", cut=True)),
                                                         nodes.side("x")), nodes.add("c")),
    }


SHAPES = list(_plans(Nodes()))


async def _cut_run(nodes: Nodes, plan: Any, store: Any, config: RunConfig) -> Any:
    """Run until the cut node is blocked, then cancel the run from outside."""
    result: Any = None
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            async def stop() -> None:
                await nodes.started.wait()
                scope.cancel()

            tg.start_soon(stop)
            result = await interpret(plan, S(), store=store, config=config)
            tg.cancel_scope.cancel()
    assert scope.cancelled_caught, f"the run was not cancelled: it ended {result.status}"
    return result


async def _check(make_store: Callable[[], Any], shape: str) -> None:
    reference = Nodes()
    reference.armed = False
    expected = await interpret(_plans(reference)[shape](), S(), store=make_store(),
                               config=RunConfig(run_id="reference", policy_map=NO_RETRY))
    assert expected.status is RunStatus.COMPLETED

    nodes = Nodes()
    plan = _plans(nodes)[shape]()
    config = RunConfig(run_id="cut", policy_map=NO_RETRY)
    store = make_store()
    await _cut_run(nodes, plan, store, config)
    log = await store.read_log("cut")
    assert log is not None and log.finish is None
    assert [e.failure for e in log.trace() if e.failure is not None] == []  # no failure

    # Resumed, the run ends as the uninterrupted one did (the node cut off runs again).
    nodes.armed = False
    kept = len(nodes.calls)
    result = await interpret(plan, None, store=make_store(), config=config)
    assert result.status is RunStatus.RESUMED
    assert result.final_state == expected.final_state
    assert "a" not in nodes.calls[kept:]  # what committed before the cut is not run again


CASES = [("file", "asyncio"), ("file", "trio"), ("redis", "asyncio"),
         ("postgres", "asyncio")]


@pytest.fixture(params=[pytest.param(c, marks=[getattr(pytest.mark, c[0])] if c[0] != "file"
                                     else []) for c in CASES],
                ids=["-".join(c) for c in CASES])
def case(request: pytest.FixtureRequest) -> tuple[str, str]:
    return request.param


@pytest.fixture
def anyio_backend(case: tuple[str, str]) -> str:
    return case[1]


@pytest.fixture
def stores(case: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest,
           ) -> Callable[[], Any]:
    """A new store object on one shared place each time (as another process would make)."""
    if case[0] == "file":
        return lambda: FileStore(tmp_path / "store")
    made: Callable[[], Any] = request.getfixturevalue(f"{case[0]}_stores")
    return made


@pytest.mark.parametrize("shape", SHAPES)
async def test_a_run_cut_off_while_a_node_raises_on_its_cancellation_resumes_to_its_end(
    anyio_backend: str, stores: Callable[[], Any], shape: str
) -> None:
    await _check(stores, shape)


def test_a_run_under_asyncio_wait_for_stops_when_a_node_turns_its_cancel_into_an_error(
) -> None:
    """``asyncio.wait_for(runner.run(...), t)`` (the 0.3.x way to bound a run) cancels the
    task itself, not through an anyio scope: a node that turns that cancellation into an
    error of its own stops the run all the same (it was recorded as a failed attempt, the
    run retried the node and completed past the caller's deadline)."""
    import asyncio

    from stroma import StromaRunner

    class In(BaseModel):
        value: int

    calls: list[str] = []
    runner = StromaRunner.quick()

    @runner.node("slow", input=In, output=In)
    async def slow(state: In) -> dict[str, int]:
        calls.append("slow")
        try:
            await asyncio.sleep(30 if len(calls) == 1 else 0)
        except asyncio.CancelledError:
            raise ConnectionError("connection cut") from None
        return {"value": state.value + 1}

    async def main() -> None:
        with pytest.raises((asyncio.TimeoutError, TimeoutError)):
            await asyncio.wait_for(runner.run([slow], In(value=1)), 0.05)

    asyncio.run(main())
    assert calls == ["slow"]
