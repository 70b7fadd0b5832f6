"""Replay and resume work across every combinator.

Replay feeds a recorded log back through the machine with nodes that raise if called; it
must give the same result. Resume picks a run cut short inside a fan-out back up from its
store: children that finished (made durable as they finished) are not run again.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

import stroma
from stroma import AsyncInMemoryStore, FileStore, RunStatus
from stroma.plan import Plan, branch, map_each, parallel, seq
from stroma.runner import RunConfig, interpret
from tests.combinators.kit import Item, Items, Num, Out, Script, field_model, stable_lines

FAST = {"RECOVERABLE": {"max_retries": 2, "backoff_seconds": 0},
        "AMBIGUOUS": {"max_retries": 1, "backoff_seconds": 0}}


def _add(k: int) -> Callable[[Any], Any]:
    async def body(s: Num) -> dict[str, int]:
        return {"value": s.value + k}

    return body


def _flaky(times: int, exc: type[BaseException] = TimeoutError) -> Callable[[Any], Any]:
    seen = {"n": 0}

    async def body(s: Any) -> Any:
        seen["n"] += 1
        if seen["n"] <= times:
            raise exc(f"attempt {seen['n']} fails")
        return {"value": s.value + 1} if hasattr(s, "value") else {"out": s.item}

    return body


def scenario(name: str, script: Script) -> tuple[Plan, Any]:
    n = script.node
    a, b = field_model("a"), field_model("b")

    async def to_a(s: Num) -> dict[str, int]:
        return {"a": s.value}

    async def to_b(s: Num) -> dict[str, int]:
        return {"b": s.value * 2}

    async def spread(s: Num) -> dict[str, list[int]]:
        return {"items": list(range(s.value))}

    async def sq(i: Item) -> dict[str, int]:
        await anyio.sleep(0)
        return {"out": i.item * i.item}

    async def bump(i: Item) -> dict[str, int]:
        return {"item": i.item + 1}

    async def terminal(s: Any) -> Any:
        return {"a": "not an int"}  # breaks the contract: TERMINAL

    if name == "seq":
        return seq(n("x", Num, Num, _add(1)), n("y", Num, Num, _add(2))), Num(value=1)
    if name == "parallel":
        return seq(n("x", Num, Num, _add(1)),
                   parallel(n("a", Num, a, to_a), n("b", Num, b, to_b),
                            max_concurrency=1)), Num(value=1)
    if name == "parallel-sub-plan-retry":
        child = seq(n("x", Num, Num, _add(1)), n("flaky", Num, Num, _flaky(2)))
        return seq(parallel(child, n("b", Num, b, to_b))), Num(value=3)
    if name == "parallel-group-retry":
        return seq(parallel(n("flaky", Num, Num, _flaky(1)), n("b", Num, b, to_b))), Num(value=3)
    if name == "branch-then":
        return seq(branch(lambda s: s.value > 0, then=n("x", Num, Num, _add(1)),
                          otherwise=n("y", Num, Num, _add(-1)), name="pos?")), Num(value=1)
    if name == "branch-otherwise":
        return seq(branch(lambda s: s.value > 0, then=n("x", Num, Num, _add(1)),
                          otherwise=[n("y", Num, Num, _add(-1)), n("z", Num, Num, _add(-1))],
                          name="pos?")), Num(value=-1)
    if name == "map":
        return seq(n("spread", Num, Items, spread),
                   map_each(n("sq", Item, Out, sq), over="items", into="outs",
                            max_concurrency=2)), Num(value=5)
    if name == "map-sub-plan-retry":
        body = seq(n("bump", Item, Item, bump), n("flaky", Item, Out, _flaky(1)))
        return seq(n("spread", Num, Items, spread),
                   map_each(body, over="items", into="outs")), Num(value=3)
    if name == "nested":
        body = parallel(n("sq", Item, Out, sq), n("bump", Item, Item, bump))
        inner = seq(n("spread", Num, Items, spread),
                    map_each(body, over="items", into="both"))
        return seq(
            n("x", Num, Num, _add(1)),
            branch(lambda s: s.value > 2, then=parallel(inner, n("a", Num, a, to_a)),
                   otherwise=n("y", Num, Num, _add(5)), name="big?"),
        ), Num(value=2)
    if name == "terminal-in-group":
        return seq(parallel(n("t", Num, a, terminal), n("b", Num, b, to_b))), Num(value=1)
    if name == "gives-up-in-map":
        body = n("always", Item, Out, _flaky(99))
        return seq(map_each(body, over="items", into="outs", input=Items)), Items(items=[1])
    raise AssertionError(name)


SCENARIOS = [
    "seq", "parallel", "parallel-sub-plan-retry", "parallel-group-retry", "branch-then",
    "branch-otherwise", "map", "map-sub-plan-retry", "nested", "terminal-in-group",
    "gives-up-in-map",
]
STATUS = {"terminal-in-group": RunStatus.FAILED, "gives-up-in-map": RunStatus.PARTIAL}


@pytest.mark.anyio
@pytest.mark.parametrize("name", SCENARIOS)
async def test_every_combinator_replays_to_the_same_result(anyio_backend: str,
                                                          name: str) -> None:
    """A recorded run replays (from the log and from its text) to an equal result with an
    empty trace diff, while every node raises if called."""
    script = Script()
    plan, initial = scenario(name, script)
    result = await interpret(plan, initial, config=RunConfig(policy_map=FAST, seed=3))
    assert result.status is STATUS.get(name, RunStatus.COMPLETED), result.stop_reason
    script.replaying = True
    for log in (result.log, result.log.to_jsonl()):
        replayed = await stroma.replay(plan, log)
        assert replayed == result
        assert replayed.trace.diff(result.trace) == []
        assert (replayed.total_tokens, replayed.total_cost_usd) == (
            result.total_tokens, result.total_cost_usd)


@pytest.mark.anyio
async def test_replay_with_a_changed_sub_plan_is_refused(anyio_backend: str) -> None:
    """Replaying a fan-out whose sub-plan now differs raises NondeterminismError."""
    plan, initial = scenario("parallel-sub-plan-retry", Script())
    result = await interpret(plan, initial, config=RunConfig(policy_map=FAST))
    other, _ = scenario("parallel", Script())
    with pytest.raises(stroma.NondeterminismError):
        await stroma.replay(other, result.log)


# ------------------------------------------------------------------------------ resume


class Fanout:
    """map_each over 10 items: items below ``finish`` return at once, the others wait on
    ``gate``; ``done`` is set once ``finish`` items have returned."""

    def __init__(self, finish: int | None) -> None:
        self.script = Script()
        self.calls: list[int] = []
        self.gate = anyio.Event()
        self.done = anyio.Event()
        self.finished = 0
        self.finish = finish

        async def body(i: Item) -> dict[str, int]:
            self.calls.append(i.item)
            if self.finish is not None and i.item >= self.finish:
                await self.gate.wait()
            for _ in range(i.item % 3):
                await anyio.sleep(0)
            self.finished += 1
            if self.finished == self.finish:
                self.done.set()
            return {"out": i.item * 11}

        async def prepare(s: Num) -> dict[str, list[int]]:
            self.calls.append(-1)
            return {"items": list(range(s.value))}

        self.plan = seq(
            branch(lambda s: s.value >= 0, then=self.script.node("prepare", Num, Items, prepare),
                   name="ok?"),
            map_each(self.script.node("work", Item, Out, body), over="items", into="outs",
                     max_concurrency=4, input=Items),
        )


async def crash_inside_the_fanout(store: Any, run_id: str) -> Fanout:
    """Run the fan-out until 7 items finished, then cancel the whole run from outside."""
    first = Fanout(finish=7)
    async with anyio.create_task_group() as tg:

        async def run() -> None:
            await interpret(first.plan, Num(value=10), store=store,
                            config=RunConfig(run_id=run_id, seed=5))
            raise AssertionError("the run was supposed to be cancelled")

        tg.start_soon(run)
        await first.done.wait()
        tg.cancel_scope.cancel()
    assert first.calls[0] == -1 and set(range(7)) <= set(first.calls) <= set(range(-1, 10))
    return first


async def uninterrupted() -> stroma.ExecutionResult:
    clean = Fanout(finish=None)
    return await interpret(clean.plan, Num(value=10), config=RunConfig(seed=5))


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["file", "memory"])
async def test_a_crash_inside_a_fanout_resumes_without_rerunning_finished_children(
    anyio_backend: str, kind: str, tmp_path: Path,
) -> None:
    """Cancelled from outside after 7 of 10 items finished, the run resumed on the same
    store and run id calls only the 3 unfinished items (not the finished ones, nor the
    step before), ends RESUMED, and its final state equals an uninterrupted run's."""
    memory = AsyncInMemoryStore()

    def store() -> Any:
        return FileStore(tmp_path) if kind == "file" else memory

    first = await crash_inside_the_fanout(store(), "fan")
    finished = [i for i in first.calls if i >= 0 and i < 7]
    assert sorted(finished) == list(range(7))
    second = Fanout(finish=None)
    resumed = await interpret(second.plan, Num(value=10), store=store(),
                              config=RunConfig(run_id="fan"))
    assert resumed.status is RunStatus.RESUMED, resumed.stop_reason
    assert sorted(second.calls) == [7, 8, 9]
    clean = await uninterrupted()
    assert resumed.final_state == clean.final_state
    assert resumed.trace.diff(clean.trace) == []
    # The finished run is now on record: asking again replays it and runs nothing.
    third = Fanout(finish=None)
    again = await interpret(third.plan, Num(value=10), store=store(),
                            config=RunConfig(run_id="fan"))
    assert again == resumed and third.calls == []
    third.script.replaying = True
    assert await stroma.replay(third.plan, resumed.log) == resumed


@pytest.mark.anyio
async def test_a_resumed_fanout_log_reads_back_and_replays(anyio_backend: str,
                                                          tmp_path: Path) -> None:
    """After crash and resume, the file log reads back equal to the in-memory one and
    replays to the resumed result."""
    await crash_inside_the_fanout(FileStore(tmp_path), "fan2")
    second = Fanout(finish=None)
    resumed = await interpret(second.plan, Num(value=10), store=FileStore(tmp_path),
                              config=RunConfig(run_id="fan2"))
    read = await FileStore(tmp_path).read_log("fan2")
    assert read is not None and read == resumed.log
    second.script.replaying = True
    assert await stroma.replay(second.plan, read) == resumed


@pytest.mark.anyio
async def test_a_crash_inside_a_sub_plan_fanout_resumes_finished_children(
    anyio_backend: str, tmp_path: Path,
) -> None:
    """A parallel of sub-plans cut short after one child finished resumes running only the
    unfinished child."""
    calls: list[str] = []
    gate, one_done = anyio.Event(), anyio.Event()

    def build(block: bool) -> Plan:
        script = Script()

        async def step(s: Num) -> dict[str, int]:
            calls.append("fast")
            return {"value": s.value + 1}

        async def fin(s: Num) -> dict[str, int]:
            calls.append("fin")
            one_done.set()
            return {"a": s.value}

        async def slow(s: Num) -> dict[str, int]:
            calls.append("slow")
            if block:
                await gate.wait()
            return {"b": s.value}

        return seq(parallel(
            seq(script.node("fast", Num, Num, step),
                script.node("fin", Num, field_model("a"), fin)),
            script.node("slow", Num, field_model("b"), slow),
        ))

    async with anyio.create_task_group() as tg:

        async def run() -> None:
            await interpret(build(True), Num(value=1), store=FileStore(tmp_path),
                            config=RunConfig(run_id="subs"))

        tg.start_soon(run)
        await one_done.wait()
        tg.cancel_scope.cancel()
    assert sorted(calls) == ["fast", "fin", "slow"]
    calls.clear()
    resumed = await interpret(build(False), Num(value=1), store=FileStore(tmp_path),
                              config=RunConfig(run_id="subs"))
    assert resumed.status is RunStatus.RESUMED
    assert calls == ["slow"]
    assert resumed.final_state.model_dump() == {"a": 2, "b": 1}


@pytest.mark.anyio
async def test_children_finishing_together_write_a_valid_durable_log(
    anyio_backend: str, tmp_path: Path,
) -> None:
    """Many children of a first-step fan-out (and of one after a branch) finishing at once
    on a FileStore append one header and no record twice: the log reads back and replays."""
    script = Script()

    async def body(i: Item) -> dict[str, int]:
        for _ in range(i.item % 3):
            await anyio.sleep(0)
        return {"out": i.item}

    first = seq(map_each(script.node("f", Item, Out, body), over="items", into="outs",
                         input=Items))
    after_branch = seq(branch(lambda s: True, then=[], name="noop"), first)
    for k, plan in enumerate((first, after_branch)):
        result = await interpret(plan, Items(items=list(range(30))), store=FileStore(tmp_path),
                                 config=RunConfig(run_id=f"many{k}"))
        assert result.status is RunStatus.COMPLETED
        read = await FileStore(tmp_path).read_log(f"many{k}")
        assert read is not None and read == result.log
        assert stable_lines(read.to_jsonl()) == stable_lines(result.log.to_jsonl())
        assert await stroma.replay(plan, read) == result
