"""Hooks that never return (issue 10, item 4).

A hook is cancelled once its timeout passes (``RunConfig(hook_timeout_ms=...)``, by default
``stroma.machine.DEFAULT_HOOK_TIMEOUT_MS``): the timeout is recorded as the hook's error
(a ``HookFired`` whose error is a TimeoutError) and logged, and it changes nothing else:
the run ends as it would without the hook, and its log replays without calling it. The
tests use a 50 ms bound so that they stay fast.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import anyio
import pytest
from pydantic import BaseModel

from stroma import (
    FailureClass,
    FailurePolicy,
    NodeContract,
    RunStatus,
    StromaRunner,
    map_each,
    replay,
    seq,
    stroma_node,
)
from stroma import effects as fx
from stroma.machine import DEFAULT_HOOK_TIMEOUT_MS
from stroma.runner import NodeHooks, RunConfig, interpret

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """These runs use the memory store: asyncio and trio both."""
    return str(request.param)

BOUND_MS = 50
FAST = {c: FailurePolicy(max_retries=2, backoff_seconds=0) for c in FailureClass}


class Num(BaseModel):
    value: int


class Items(BaseModel):
    items: list[int]


class Item(BaseModel):
    item: int


def pipeline(calls: Counter[str]) -> Any:
    """a -> flaky (fails once, RECOVERABLE) -> b."""

    def node(node_id: str, body: Any) -> Any:
        async def fn(s: Num) -> Any:
            calls[node_id] += 1
            return await body(s)

        fn.__name__ = node_id
        return stroma_node(node_id, NodeContract(node_id=node_id, input_schema=Num,
                                                 output_schema=Num))(fn)

    async def add(s: Num) -> dict[str, int]:
        return {"value": s.value + 1}

    async def flaky(s: Num) -> dict[str, int]:
        if calls["flaky"] == 1:
            raise TimeoutError("upstream timed out")
        return {"value": s.value * 10}

    return seq(node("a", add), node("flaky", flaky), node("b", add))


class Hanging:
    """Hooks of the given kinds that never return; every call is counted."""

    def __init__(self, *kinds: str) -> None:
        self.calls: Counter[str] = Counter()
        self.kinds = kinds

    def hooks(self) -> NodeHooks:
        def make(kind: str) -> Any:
            async def hook(*args: Any) -> None:
                self.calls[kind] += 1
                await anyio.sleep_forever()

            return hook

        return NodeHooks(**{f"on_node_{k}": make(k) for k in self.kinds})


def hook_records(log: Any) -> list[tuple[fx.FireHook, fx.HookFired]]:
    return [(eff, ev) for eff, ev in (r for r in log.records if isinstance(r, tuple))
            if isinstance(eff, fx.FireHook)]


@pytest.mark.parametrize("kinds", [("start",), ("success",), ("failure",),
                                   ("start", "success", "failure")])
async def test_a_hook_that_never_returns_is_cancelled_and_changes_nothing(
    anyio_backend: str, kinds: tuple[str, ...], caplog: pytest.LogCaptureFixture
) -> None:
    """Hooks that hang are cancelled after hook_timeout_ms; each is recorded as a HookFired
    with a TimeoutError and logged as a warning, and the run's status, final state, trace
    and totals are those of the same run without hooks."""
    caplog.set_level(logging.WARNING, logger="stroma")
    plain_calls: Counter[str] = Counter()
    plain = await interpret(pipeline(plain_calls), Num(value=1),
                            config=RunConfig(policy_map=FAST))
    calls: Counter[str] = Counter()
    hanging = Hanging(*kinds)

    result = await interpret(pipeline(calls), Num(value=1), config=RunConfig(
        policy_map=FAST, hooks=hanging.hooks(), hook_timeout_ms=BOUND_MS))

    assert result.status is plain.status is RunStatus.COMPLETED
    assert result.final_state == plain.final_state == Num(value=21)
    assert not result.trace.diff(plain.trace)
    assert (result.total_tokens, result.total_cost_usd) == (plain.total_tokens,
                                                            plain.total_cost_usd)
    assert calls == plain_calls == {"a": 1, "flaky": 2, "b": 1}
    expected = {"start": 4, "success": 3, "failure": 1}
    assert hanging.calls == {k: expected[k] for k in kinds}
    fired = hook_records(result.log)
    assert sorted(eff.kind for eff, _ in fired) == sorted(hanging.calls.elements())
    for eff, ev in fired:
        assert eff.timeout_ms == BOUND_MS
        assert ev.error is not None and ev.error.type_name == "builtins.TimeoutError"
        assert f"did not return within {BOUND_MS} ms" in ev.error.message
    warnings = [r.getMessage() for r in caplog.records if "did not return within" in
                r.getMessage()]
    assert len(warnings) == len(fired)


async def test_a_timed_out_hook_replays_without_being_called(anyio_backend: str) -> None:
    """The log of a run whose hook timed out replays (from the log and its text) to the
    same result, with the hook not called again."""
    hanging = Hanging("start")
    plan = pipeline(Counter())
    result = await interpret(plan, Num(value=1), config=RunConfig(
        policy_map=FAST, hooks=hanging.hooks(), hook_timeout_ms=BOUND_MS))
    called = sum(hanging.calls.values())

    assert await replay(plan, result.log) == result
    assert await replay(plan, result.log.to_jsonl()) == result
    assert sum(hanging.calls.values()) == called
    assert result.log.header.config["hook_timeout_ms"] == BOUND_MS


async def test_the_runner_takes_the_hook_timeout_too(anyio_backend: str) -> None:
    """StromaRunner.quick(hook_timeout_ms=...) bounds the hooks of its runs."""
    hanging = Hanging("success")
    runner = StromaRunner.quick(hooks=hanging.hooks(), hook_timeout_ms=BOUND_MS)

    @runner.node("inc", input=Num, output=Num)
    async def inc(s: Num) -> dict[str, int]:
        return {"value": s.value + 1}

    result = await runner.run([inc], Num(value=1))

    assert result.status is RunStatus.COMPLETED and result.final_state == Num(value=2)
    ((eff, ev),) = hook_records(result.log)
    assert eff.timeout_ms == BOUND_MS and ev.error is not None


async def test_hooks_inside_a_fan_out_child_are_bounded_too(anyio_backend: str) -> None:
    """A sub-plan child of a map_each gets the run's hook bound: its hanging start hooks
    are cancelled, recorded in the child's own log, and the map completes."""
    hanging = Hanging("start")

    def node(node_id: str) -> Any:
        async def fn(i: Item) -> dict[str, int]:
            return {"item": i.item + 1}

        fn.__name__ = node_id
        return stroma_node(node_id, NodeContract(node_id=node_id, input_schema=Item,
                                                 output_schema=Item))(fn)

    plan = seq(map_each(seq(node("p"), node("q")), over="items", into="outs", input=Items))
    result = await interpret(plan, Items(items=[1, 2]), config=RunConfig(
        hooks=hanging.hooks(), hook_timeout_ms=BOUND_MS))

    assert result.status is RunStatus.COMPLETED
    assert [o["item"] for o in result.final_state.model_dump()["outs"]] == [3, 4]
    group = next(ev for eff, ev in (r for r in result.log.records if isinstance(r, tuple))
                 if isinstance(eff, fx.CallParallel))
    inner = [ev for outcome in group.outcomes for eff, ev in outcome.records
             if isinstance(eff, fx.FireHook)]
    assert len(inner) == 4 and all(ev.error is not None for ev in inner)
    # The group's own start hook (the map step is a step too) timed out as well.
    assert hanging.calls["start"] == 5


async def test_the_default_bound_and_no_bound(anyio_backend: str) -> None:
    """By default a hook is bounded by DEFAULT_HOOK_TIMEOUT_MS; hook_timeout_ms=None runs
    hooks unbounded, recorded as such in the log's header, and replays."""
    seen: list[str] = []

    async def quick(run_id: str, node_id: str, state: dict[str, Any]) -> None:
        seen.append(node_id)

    plan = pipeline(Counter())
    assert RunConfig().hook_timeout_ms == DEFAULT_HOOK_TIMEOUT_MS
    by_default = await interpret(plan, Num(value=1), config=RunConfig(
        policy_map=FAST, hooks=NodeHooks(on_node_start=quick)))
    assert {eff.timeout_ms for eff, _ in hook_records(by_default.log)} == {
        DEFAULT_HOOK_TIMEOUT_MS}

    unbounded = await interpret(pipeline(Counter()), Num(value=1), config=RunConfig(
        policy_map=FAST, hooks=NodeHooks(on_node_start=quick), hook_timeout_ms=None))
    assert {eff.timeout_ms for eff, _ in hook_records(unbounded.log)} == {None}
    assert unbounded.log.header.config["hook_timeout_ms"] is None
    assert all(ev.error is None for _, ev in hook_records(unbounded.log))
    assert await replay(plan, unbounded.log.to_jsonl()) == unbounded
    assert seen == ["a", "flaky", "flaky", "b"] * 2


@pytest.mark.parametrize("bad", [0, -5])
def test_a_hook_timeout_that_is_not_positive_is_refused(bad: int) -> None:
    """hook_timeout_ms must be a positive number of milliseconds (or None): anything else
    is an error naming the field and giving an example."""
    with pytest.raises(ValueError, match="hook_timeout_ms must be a number of milliseconds"):
        RunConfig(hook_timeout_ms=bad)
