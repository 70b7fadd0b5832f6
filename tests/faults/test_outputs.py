"""Outputs that cannot be stored (issue 10, item 3).

A node whose output keeps its contract but cannot be written as JSON (a ``bytes`` field
holding b"\\xff", which is not UTF-8; a list nested 3,000 deep; text with a lone
surrogate) has run, and its effect has
happened: the attempt is a failure (StateNotSerializable, TERMINAL, the message naming the
field), recorded in the log like any other, and the log stays whole: its text reads back,
replays to the same result, and a second ``interpret`` of the run id returns that result
without calling anything, on the memory store and on FileStore. The same holds inside a
fan-out, for a node child and for a sub-plan child.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from interpreters.stores.file import FileStore
from stroma import (
    EffectLog,
    FailureClass,
    FailurePolicy,
    NodeContext,
    NodeContract,
    RunStatus,
    map_each,
    parallel,
    replay,
    seq,
    stroma_node,
)
from stroma import effects as fx
from stroma.checkpoint import InMemoryStore
from stroma.errors import StateNotSerializable
from stroma.runner import NodeHooks, RunConfig, interpret

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """The memory store and FileStore run on asyncio and on trio."""
    return str(request.param)


class Num(BaseModel):
    value: int


class Blob(BaseModel):
    data: bytes


class Tree(BaseModel):
    tree: list[Any]


class Text(BaseModel):
    text: str


class Items(BaseModel):
    items: list[int]


class Item(BaseModel):
    item: int


class Left(BaseModel):
    left: int


def nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


# name: (output schema, what the node returns, the field at fault)
BAD: dict[str, tuple[type[BaseModel], Callable[[], Any], str]] = {
    "bytes": (Blob, lambda: {"data": b"\xff"}, "data"),
    "bytes-model": (Blob, lambda: Blob(data=b"\xff"), "data"),
    "deep": (Tree, lambda: {"tree": nested(3000)}, "tree"),
    # (text cut from UTF-16 data: Python's json writes it, the log's JSON does not)
    "surrogate": (Text, lambda: {"text": "a\ud800b"}, "text"),
}

FAST = {c: FailurePolicy(max_retries=2, backoff_seconds=0) for c in FailureClass}


class Calls:
    """Counts calls per node id; once ``forbidden`` is set, a call raises."""

    def __init__(self) -> None:
        self.count: Counter[str] = Counter()
        self.forbidden = False

    def node(self, node_id: str, inp: type[BaseModel], out: type[BaseModel],
             body: Callable[[Any], Any]) -> Any:
        async def fn(state: Any) -> Any:
            if self.forbidden:
                raise AssertionError(f"{node_id} ran during a replay or a finished run")
            self.count[node_id] += 1
            return body(state)

        fn.__name__ = fn.__qualname__ = node_id.replace("-", "_")
        return stroma_node(node_id, NodeContract(node_id=node_id, input_schema=inp,
                                                 output_schema=out))(fn)


def store_of(kind: str, tmp_path: Path) -> Any:
    return InMemoryStore() if kind == "memory" else FileStore(tmp_path / "runs")


def unwritable_answers(log: EffectLog) -> list[fx.ErrorInfo]:
    """The errors recorded for node outputs the log could not hold, groups' children too."""
    found: list[fx.ErrorInfo] = []
    for record in log.records:
        if not isinstance(record, tuple):
            continue
        _, event = record
        outcomes = event.outcomes if isinstance(event, fx.ParallelReturned) else (event,)
        for outcome in outcomes:
            if isinstance(outcome, fx.NodeReturned) and isinstance(outcome.output, fx.ErrorInfo):
                found.append(outcome.output)
    return found


async def check_log_stays_whole(plan: Any, state: BaseModel, result: Any, store: Any,
                                calls: Calls, tmp_path: Path) -> None:
    """The log's text reads back equal, replays to the same result, and (FileStore) a
    fresh store reads it; a second interpret of the run id returns the result, calling
    nothing."""
    text = result.log.to_jsonl()
    assert EffectLog.from_jsonl(text) == result.log
    calls.forbidden = True
    assert await replay(plan, result.log) == result
    assert await replay(plan, text) == result
    if isinstance(store, FileStore):
        for reader in (store, FileStore(tmp_path / "runs")):
            stored = await reader.read_log(result.run_id)
            assert stored is not None and stored.to_jsonl() == text
            assert await replay(plan, stored) == result
    again = await interpret(plan, state, store=store, config=RunConfig(run_id=result.run_id))
    assert again.status is result.status and again.final_state == result.final_state


@pytest.mark.parametrize("store_kind", ["memory", "file"])
@pytest.mark.parametrize("bad", sorted(BAD))
async def test_a_node_output_that_cannot_be_stored_is_a_recorded_terminal_failure(
    anyio_backend: str, store_kind: str, bad: str, tmp_path: Path
) -> None:
    """An output with non-UTF-8 bytes or 3,000-deep nesting fails its attempt with a
    TERMINAL StateNotSerializable naming the field; the run ends FAILED with the last good
    state, the failure is in the log, and the log reads back and replays."""
    schema, output, field = BAD[bad]
    calls = Calls()
    first = calls.node("first", Num, Num, lambda s: {"value": s.value + 1})
    writer = calls.node("writer", Num, schema, lambda s: output())
    plan = seq(first, writer)
    store = store_of(store_kind, tmp_path)

    result = await interpret(plan, Num(value=1), store=store,
                             config=RunConfig(run_id=f"unstorable-{bad}", policy_map=FAST))

    assert result.status is RunStatus.FAILED
    assert result.final_state == Num(value=2)
    assert calls.count == {"first": 1, "writer": 1}  # it ran once, and was not retried
    failed = result.trace.failures()
    assert [(e.node_id, e.failure) for e in failed] == [("writer", FailureClass.TERMINAL)]
    message = failed[0].failure_message or ""
    assert "cannot be stored" in message and f"field {field!r}" in message
    assert "StateNotSerializable" in (result.stop_reason or "")
    (error,) = unwritable_answers(result.log)
    assert error.type_name == "stroma.errors.StateNotSerializable"
    assert result.log.finish is not None and result.log.finish.status is RunStatus.FAILED
    await check_log_stays_whole(plan, Num(value=1), result, store, calls, tmp_path)


@pytest.mark.parametrize("store_kind", ["memory", "file"])
@pytest.mark.parametrize("bad", ["bytes", "deep", "surrogate"])
async def test_an_unstorable_output_inside_a_fan_out_fails_the_group(
    anyio_backend: str, store_kind: str, bad: str, tmp_path: Path
) -> None:
    """A map item and a parallel child whose output cannot be stored fail their group's
    attempt (TERMINAL, naming the field): recorded, read back and replayed; no retry."""
    schema, output, field = BAD[bad]
    calls = Calls()
    item = calls.node("item", Item, schema,
                      lambda i: output() if i.item == 2
                      else {"data": b"ok", "tree": [], "text": "ok"})
    left = calls.node("left", Num, Left, lambda s: {"left": s.value})
    writer = calls.node("writer", Num, schema, lambda s: output())
    store = store_of(store_kind, tmp_path)
    plans: dict[str, tuple[Any, BaseModel]] = {
        "map": (seq(map_each(item, over="items", into="outs", input=Items)),
                Items(items=[1, 2, 3])),
        "parallel": (seq(parallel(left, writer)), Num(value=1)),
    }
    for name, (plan, state) in plans.items():
        calls.forbidden = False
        calls.count.clear()
        result = await interpret(plan, state, store=store,
                                 config=RunConfig(run_id=f"{name}-{bad}", policy_map=FAST))

        assert result.status is RunStatus.FAILED, name
        (event,) = result.trace.failures()
        assert event.failure is FailureClass.TERMINAL and event.attempt == 1
        assert f"field {field!r}" in (event.failure_message or "")
        # Each child ran once (the unstorable one did not cancel its siblings): no retry.
        assert sum(calls.count.values()) == len(getattr(state, "items", (0, 0)))
        assert [e.type_name for e in unwritable_answers(result.log)] == [
            "stroma.errors.StateNotSerializable"
        ]
        await check_log_stays_whole(plan, state, result, store, calls, tmp_path)


@pytest.mark.parametrize("store_kind", ["memory", "file"])
async def test_an_unstorable_output_inside_a_sub_plan_child_ends_the_run_failed(
    anyio_backend: str, store_kind: str, tmp_path: Path
) -> None:
    """A map body that is a sub-plan, whose second node's output cannot be stored: the
    child ends FAILED, the run too, and the child's own log records the failure."""
    calls = Calls()
    parse = calls.node("parse", Item, Item, lambda i: {"item": i.item + 1})
    write = calls.node("write", Item, Blob,
                       lambda i: {"data": b"\xff" if i.item == 3 else b"fine"})
    plan = seq(map_each(seq(parse, write), over="items", into="blobs", input=Items))
    store = store_of(store_kind, tmp_path)

    result = await interpret(plan, Items(items=[1, 2]), store=store,
                             config=RunConfig(run_id="sub-plan", policy_map=FAST))

    assert result.status is RunStatus.FAILED
    assert "cannot be stored" in (result.stop_reason or "")
    group = next(ev for eff, ev in (r for r in result.log.records if isinstance(r, tuple))
                 if isinstance(eff, fx.CallParallel))
    failed = [o for o in group.outcomes if isinstance(o, fx.PlanFinished)
              and o.status is RunStatus.FAILED]
    assert len(failed) == 1
    inner = [eff.event for eff, _ in failed[0].records if isinstance(eff, fx.RecordAttempt)]
    assert [(e.node_id, e.failure) for e in inner] == [("write", FailureClass.TERMINAL)]
    await check_log_stays_whole(plan, Items(items=[1, 2]), result, store, calls, tmp_path)


async def test_classifiers_and_the_failure_hook_see_a_state_not_serializable(
    anyio_backend: str, tmp_path: Path
) -> None:
    """The user's classifier and on_node_failure get a StateNotSerializable for such an
    attempt; a classifier that calls it RECOVERABLE retries it, and the run replays."""
    seen: list[tuple[str, str]] = []
    tries = Counter[str]()

    def classify(exc: Exception, ctx: NodeContext) -> FailureClass | None:
        seen.append(("classifier", type(exc).__name__))
        return FailureClass.RECOVERABLE if isinstance(exc, StateNotSerializable) else None

    async def on_failure(run_id: str, node_id: str, exc: Exception,
                         failure: FailureClass) -> None:
        seen.append(("hook", f"{type(exc).__name__} {failure}"))

    def body(s: Num) -> Any:
        tries["writer"] += 1
        return {"data": b"\xff" if tries["writer"] == 1 else b"ok"}

    calls = Calls()
    plan = seq(calls.node("writer", Num, Blob, body))
    store = FileStore(tmp_path / "runs")
    config = RunConfig(run_id="classified", policy_map=FAST, classifiers=[classify],
                       hooks=NodeHooks(on_node_failure=on_failure))

    result = await interpret(plan, Num(value=1), store=store, config=config)

    assert result.status is RunStatus.COMPLETED and result.final_state == Blob(data=b"ok")
    assert seen == [("classifier", "StateNotSerializable"),
                    ("hook", "StateNotSerializable RECOVERABLE")]
    assert [(e.attempt, e.failure) for e in result.trace] == [
        (1, FailureClass.RECOVERABLE), (2, None)
    ]
    await check_log_stays_whole(plan, Num(value=1), result, store, calls, tmp_path)


class Opaque:
    """Something JSON has no form for (a client, a response object)."""

    def __repr__(self) -> str:
        return "<opaque client>"


@pytest.mark.parametrize("store_kind", ["memory", "file"])
async def test_a_value_json_cannot_hold_in_a_field_the_contract_ignores_changes_nothing(
    anyio_backend: str, store_kind: str, tmp_path: Path
) -> None:
    """A node, a map item and a parallel child returning an extra key the contract ignores
    whose value JSON cannot hold (an object) succeed as without it; so does a node whose
    budget stop comes with such an output (it stays a RECOVERABLE BudgetExceeded); the
    logs read back and replay."""
    calls = Calls()
    node = calls.node("node", Num, Num, lambda s: {"value": s.value + 1, "raw": Opaque()})
    item = calls.node("item", Item, Item, lambda i: {"item": i.item * 2, "raw": Opaque()})
    left = calls.node("left", Num, Left, lambda s: {"left": s.value, "raw": Opaque()})

    async def spend_body(s: Num) -> Any:
        return {"value": s.value, "raw": Opaque()}, 60

    spend = stroma_node("spend", NodeContract(node_id="spend", input_schema=Num,
                                              output_schema=Num))(spend_body)
    store = store_of(store_kind, tmp_path)
    cases: dict[str, tuple[Any, BaseModel, dict[str, Any], RunStatus]] = {
        "node": (seq(node), Num(value=1), {}, RunStatus.COMPLETED),
        "map": (seq(map_each(item, over="items", into="outs", input=Items)),
                Items(items=[1, 2]), {}, RunStatus.COMPLETED),
        "parallel": (seq(parallel(left, calls.node("other", Num, Blob,
                                                   lambda s: {"data": b"fine"}))),
                     Num(value=3), {}, RunStatus.COMPLETED),
        "budget": (seq(spend), Num(value=1), {"budget": {"max_tokens_total": 50}},
                   RunStatus.PARTIAL),
    }
    for name, (plan, state, extra, status) in cases.items():
        calls.forbidden = False
        result = await interpret(plan, state, store=store, config=RunConfig(
            run_id=f"ignored-{name}", policy_map=FAST, **extra))

        assert result.status is status, (name, result.stop_reason)
        assert unwritable_answers(result.log) == []
        if name == "budget":  # exceeded on the attempt, then not started again
            failures = result.trace.failures()
            assert [e.failure for e in failures] == [FailureClass.RECOVERABLE] * 2
            assert "budget exceeded" in (failures[0].failure_message or "")
        await check_log_stays_whole(plan, state, result, store, calls, tmp_path)
