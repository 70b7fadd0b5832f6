"""AsyncInMemoryStore: a run with an explicit id resumes in-process after being cancelled;
the in-memory stores lease a run to one session at a time."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydantic import BaseModel

from stroma import AsyncInMemoryStore, InMemoryStore, RunLocked, StromaRunner, replay
from stroma.errors import StromaError
from stroma.runner import RunConfig, interpret
from stroma.trace import RunStatus
from tests.resume.pipeline import POLICY, Num, Pipeline, config

pytestmark = pytest.mark.anyio

RUN = "in-memory"
FINAL = Num(value=23)


async def _cancel_at(
    nodes: list[Any], entered: anyio.Event, store: Any, cfg: RunConfig,
    ready: Callable[[], bool] = lambda: True,
) -> None:
    """Start the run, and cancel it from outside once the gated node has started (and
    ``ready()`` holds: polled, a bounded number of times)."""
    async with anyio.create_task_group() as tg:
        async def run() -> None:
            await interpret(nodes, Num(value=1), store=store, config=cfg)
            raise AssertionError("the gated run finished")

        tg.start_soon(run)
        await entered.wait()
        for _ in range(10_000):
            if ready():
                break
            await anyio.sleep(0)
        else:
            raise AssertionError("the run never got ready to be cancelled")
        tg.cancel_scope.cancel()


def _left_is_kept(store: Any) -> Callable[[], bool]:
    """Whether the fan-out child ``left`` finished and its outcome is in the run's log."""

    def ready() -> bool:
        log = store.get_log(RUN)
        return log is not None and any(
            getattr(call, "node_id", None) == "left" for _, _, call, _ in log.partials
        )

    return ready


@pytest.mark.parametrize(
    ("gate_at", "finished"),
    [("e", {"a", "flaky", "left", "right", "total"}), ("right", {"a", "flaky", "left"})],
)
async def test_a_cancelled_run_with_an_explicit_id_resumes_without_rerunning(
    gate_at: str, finished: set[str]
) -> None:
    """Cancelled while a node (or a fan-out child) runs, a run with an explicit id resumes
    from its in-memory log: RESUMED, same final state, finished nodes not called again."""
    store = AsyncInMemoryStore()
    entered, gate = anyio.Event(), anyio.Event()  # the gate is never opened
    first = Pipeline(gate=gate, entered=entered, gate_at=gate_at)
    await _cancel_at(first.nodes(), entered, store, config(RUN),
                     _left_is_kept(store) if gate_at == "right" else lambda: True)
    assert first.calls[gate_at] == 1

    second = Pipeline(flaky_failed=True)
    result = await interpret(second.nodes(), Num(value=1), store=store, config=config(RUN))
    assert result.status is RunStatus.RESUMED
    assert result.final_state == FINAL
    assert not second.called & finished
    assert second.calls[gate_at] == 1  # the node in flight runs again
    assert [e.node_id for e in result.trace].count("flaky") == 2  # the failure is kept

    log = store.get_log(RUN)
    assert log is not None and log.finish is not None
    replayed = await replay(Pipeline().nodes(), log)
    assert replayed.final_state == FINAL and replayed.trace.diff(result.trace) == []
    idle = Pipeline()
    again = await interpret(idle.nodes(), Num(value=1), store=store, config=config(RUN))
    assert again.status is RunStatus.RESUMED and not idle.called


async def test_with_an_implicit_run_id_no_log_is_kept_and_nothing_resumes() -> None:
    """Without an explicit run id no log is kept, so a second call runs every node again."""
    store = AsyncInMemoryStore()
    entered, gate = anyio.Event(), anyio.Event()
    first = Pipeline(gate=gate, entered=entered, gate_at="e")
    await _cancel_at(first.nodes(), entered, store,
                     RunConfig(policy_map=POLICY))
    assert all(store.get_log(run_id) is None for run_id in store.run_ids())

    second = Pipeline()
    result = await interpret(second.nodes(), Num(value=1), store=store,
                             config=RunConfig(policy_map=POLICY))
    assert result.status is RunStatus.COMPLETED and result.final_state == FINAL
    assert second.called == {"a", "flaky", "left", "right", "total", "e", "f"}
    assert all(store.get_log(run_id) is None for run_id in store.run_ids())


# --------------------------------------------------------------------------- leases

ROOT = Path(__file__).resolve().parents[2]


async def _holder(store: Any, run_id: str) -> str | None:
    holder = store.lease_holder(run_id)
    return await holder if inspect.isawaitable(holder) else holder


@pytest.mark.parametrize("store_type", [InMemoryStore, AsyncInMemoryStore])
async def test_a_second_session_of_a_run_on_the_same_store_gets_run_locked(
    store_type: type[Any],
) -> None:
    """While one interpret call runs a run id, a second on the same in-memory store raises
    RunLocked naming the run and the holder and runs nothing (it used to run every node
    again into the same log); once the first ends, a third returns its result, calling no
    node, and the log replays."""
    store = store_type()
    entered, gate = anyio.Event(), anyio.Event()
    first = Pipeline(gate=gate, entered=entered, gate_at="e")
    results: list[Any] = []

    async def hold() -> None:
        results.append(await interpret(first.nodes(), Num(value=1), store=store,
                                       config=config(RUN)))

    async with anyio.create_task_group() as tg:
        tg.start_soon(hold)
        with anyio.fail_after(10):
            await entered.wait()
        holder = await _holder(store, RUN)
        assert holder is not None and f":{os.getpid()}:" in holder
        second = Pipeline()
        with pytest.raises(RunLocked, match="a session of this very process") as caught:
            await interpret(second.nodes(), Num(value=1), store=store, config=config(RUN))
        assert not second.called
        assert caught.value.run_id == RUN and caught.value.holder == holder
        gate.set()

    (done,) = results
    assert done.status is RunStatus.COMPLETED and done.final_state == FINAL
    assert first.calls["a"] == 1 and first.calls["e"] == 1
    assert await _holder(store, RUN) is None
    third = Pipeline()
    again = await interpret(third.nodes(), Num(value=1), store=store, config=config(RUN))
    assert not third.called
    assert again.final_state == FINAL and again.trace.diff(done.trace) == []
    log = store.get_log(RUN)
    assert log is not None
    replayed = await replay(Pipeline().nodes(), log)
    assert replayed.trace.diff(done.trace) == []


class _Unwritable(BaseModel):
    value: int
    extra: Any = None


async def test_the_lease_is_let_go_when_a_session_fails_or_is_cancelled() -> None:
    """A session that raises (an initial state the log cannot write) and one cancelled
    from outside both release the run: the next session with that id runs it, and a run
    cancelled mid-way resumes."""
    store = InMemoryStore()
    with pytest.raises(StromaError, match="cannot be written as JSON"):
        await interpret(Pipeline().nodes(), _Unwritable(value=1, extra=object()),
                        store=store, config=config(RUN))
    assert store.lease_holder(RUN) is None

    entered, gate = anyio.Event(), anyio.Event()  # the gate is never opened
    await _cancel_at(Pipeline(gate=gate, entered=entered, gate_at="e").nodes(), entered,
                     store, config(RUN))
    assert store.lease_holder(RUN) is None
    second = Pipeline(flaky_failed=True)
    result = await interpret(second.nodes(), Num(value=1), store=store, config=config(RUN))
    assert result.status is RunStatus.RESUMED and result.final_state == FINAL
    assert second.calls["e"] == 1 and "a" not in second.called


async def test_concurrent_runs_of_a_quick_runner_with_a_fixed_run_id_run_it_once() -> None:
    """``StromaRunner.quick(run_id=...)`` keeps its runs in one in-memory store: of three
    concurrent ``runner.run`` calls one runs the node, the others get RunLocked."""
    runner = StromaRunner.quick(run_id="fixed-id")
    calls: list[int] = []

    @runner.node("n", input=Num, output=Num)
    async def n(s: Num) -> dict[str, int]:
        calls.append(s.value)
        await anyio.sleep(0.01)
        return {"value": s.value * 10}

    outcomes: list[Any] = []

    async def one(value: int) -> None:
        try:
            outcomes.append((await runner.run([n], Num(value=value))).final_state)
        except RunLocked as e:
            outcomes.append(e)

    async with anyio.create_task_group() as tg:
        for value in (1, 2, 3):
            tg.start_soon(one, value)
    assert len(calls) == 1
    assert outcomes.count(Num(value=calls[0] * 10)) == 1
    assert sum(isinstance(o, RunLocked) for o in outcomes) == 2


_INTERRUPTED = textwrap.dedent("""
    import sys
    import anyio
    from pydantic import BaseModel
    from stroma import InMemoryStore, NodeContract, RunConfig, interpret, parallel, seq
    from stroma import stroma_node

    class S(BaseModel):
        n: int = 0

    calls = {"n": 0}

    def node(name):
        async def call(s: S) -> S:
            calls["n"] += 1
            if calls["n"] == 3 and sys.argv[1] == "interrupt":
                await anyio.sleep(0.03)
                raise KeyboardInterrupt
            await anyio.sleep(0.002)
            return s.model_copy(update={"n": s.n + 1})
        return stroma_node(name, NodeContract(node_id=name, input_schema=S, output_schema=S))(call)

    plan = seq(node("a"), parallel(seq(node("b1"), node("b2")),
                                   seq(parallel(node("c"), node("d"), node("e")))))
    store = InMemoryStore()
    run = lambda: anyio.run(lambda: interpret(plan, S(), store=store,
                                              config=RunConfig(run_id="r")))
    try:
        run()
    except KeyboardInterrupt:
        print("interrupted")
    sys.argv[1] = "go on"
    print(run().status.value)
""")


def test_a_session_an_interrupt_cut_off_lets_the_run_go_once_its_loop_is_closed() -> None:
    """A KeyboardInterrupt raised inside a nested group leaves asyncio's loop before the
    session can release its in-memory lease; a later ``anyio.run`` of the run on the same
    store resumes it instead of finding it locked for as long as the store lives."""
    out = subprocess.run([sys.executable, "-c", _INTERRUPTED, "interrupt"],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["interrupted", "RESUMED"], out.stderr[-2000:]
