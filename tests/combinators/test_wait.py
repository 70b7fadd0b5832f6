"""await_input: the state's field is checked at build; a run with no input ends WAITING
(its checkpoint and log durable, no lease held); an input given to interpret or sent with
send_input goes on from the wait without re-running anything before it; a wait past its
timeout fails with a TimeoutError the classifiers and policies handle; replay answers the
wait from the log. On the in-memory stores, FileStore, RedisStore and PostgresStore.

(What the stores promise about ``put_input``/``get_input`` and send_input's refusals on
each store are pinned in tests/stores/test_inputs.py.) Time is virtual: the timeout cases
run under ``interpreters.simulate`` with a ``VirtualClock`` that the test moves.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, Field

import stroma
from interpreters.simulate import VirtualClock, simulate
from interpreters.stores.file import FileStore
from stroma import (
    AsyncInMemoryStore,
    FailureClass,
    FailurePolicy,
    InMemoryStore,
    InputRefused,
    NodeContext,
    NodeContract,
    PlanError,
    RunConfig,
    StromaError,
    await_input,
    interpret,
    loop,
    replay,
    send_input,
    seq,
    stroma_node,
)
from stroma import effects as fx
from stroma.inputs import pending_wait
from stroma.trace import RunStatus
from tests.combinators.agentkit import Agent, Approval, Nodes
from tests.services import (
    POSTGRES_DSN,
    REDIS_URL,
    START_POSTGRES,
    START_REDIS,
    drop_postgres_tables,
    drop_redis_prefix,
    require,
    unique,
)

pytestmark = pytest.mark.anyio


async def call(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


def approval_plan(nodes: Nodes, timeout_ms: int | None = None) -> Any:
    """draft, review, wait for an approval, publish."""
    return seq(nodes.node("draft"), nodes.node("review"),
               await_input("approval", Approval, timeout_ms=timeout_ms), nodes.node("publish"))


# ------------------------------------------------------------------------- names


def test_the_names_import_from_stroma_and_waiting_from_trace() -> None:
    """loop, route, await_input, send_input from stroma; RunStatus.WAITING from both."""
    from stroma.trace import RunStatus as TraceStatus

    for name in ("loop", "route", "await_input", "send_input", "InputRefused"):
        assert name in stroma.__all__ and callable(getattr(stroma, name))
    assert TraceStatus.WAITING is stroma.RunStatus.WAITING
    assert str(TraceStatus.WAITING) == "WAITING"


# ------------------------------------------------------------------------- at build


class NoField(BaseModel):
    n: int = 0


class WrongType(BaseModel):
    n: int = 0
    approval: str | None = None


def _on(schema: type[BaseModel], node_id: str) -> Any:
    contract = NodeContract(node_id=node_id, input_schema=schema, output_schema=schema)

    async def same(s: Any) -> Any:
        return s

    return stroma_node(node_id, contract)(same)


def test_a_state_without_the_field_is_refused_naming_the_fix() -> None:
    """After a step whose output has no field ``approval``: a PlanError naming the wait,
    the state, the field and the line to add."""
    with pytest.raises(PlanError) as info:
        seq(_on(NoField, "before"), await_input("approval", Approval))
    message = str(info.value)
    assert "await_input(approval)" in message and "NoField" in message
    assert "no field 'approval'" in message
    assert "give NoField the field 'approval: Approval | None = None'" in message


def test_a_field_of_another_type_is_refused_naming_the_fix() -> None:
    """A field ``approval: str | None`` cannot take an Approval: refused, saying so."""
    with pytest.raises(PlanError, match=r"field 'approval' of WrongType is .*str.*does not "
                                        r"take a Approval.*approval: Approval \| None = None"):
        seq(_on(WrongType, "before"), await_input("approval", Approval))


def test_an_optional_field_of_the_schema_fits() -> None:
    """``approval: Approval | None = None`` is what a wait needs: the plan builds."""
    plan = seq(_on(Agent, "before"), await_input("approval", Approval))
    assert plan.step_ids() == ("before", "await_input(approval)")


@pytest.mark.parametrize(("args", "match"), [
    (("not an identifier", Approval), r"expected the name of a field"),
    ((3, Approval), r"expected the name of a field"),
    (("approval", dict), r"expected a pydantic BaseModel class"),
    (("approval", Approval(ok=True)), r"expected a pydantic BaseModel class"),
])
def test_await_input_misuse_names_what_is_expected(args: Any, match: str) -> None:
    """A name that is no identifier, or a schema that is no model class, is refused."""
    with pytest.raises(PlanError, match=match):
        await_input(*args)


@pytest.mark.parametrize("timeout", [0, -5, "10"])
def test_a_timeout_must_be_positive_milliseconds(timeout: Any) -> None:
    with pytest.raises(PlanError, match=r"timeout_ms=.*expected ms > 0"):
        await_input("approval", Approval, timeout_ms=timeout)


# --------------------------------------------------------------------------- stores


_BACKENDS = {"memory": ("asyncio", "trio"), "memory-async": ("asyncio", "trio"),
             "file": ("asyncio", "trio"), "redis": ("asyncio",), "postgres": ("asyncio",)}
_MARKS = {"redis": [pytest.mark.redis], "postgres": [pytest.mark.postgres]}


@pytest.fixture(params=[
    pytest.param((kind, backend), id=f"{kind}-{backend}", marks=_MARKS.get(kind, []))
    for kind, backends in _BACKENDS.items() for backend in backends
])
def case(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(store kind, anyio backend): redis.asyncio and asyncpg run on asyncio only."""
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def kind(case: tuple[str, str]) -> str:
    return case[0]


@pytest.fixture
def anyio_backend(case: tuple[str, str]) -> str:
    return case[1]


@pytest.fixture
async def stores(kind: str, tmp_path: Path) -> AsyncIterator[Callable[[], Any]]:
    """``stores()`` gives another worker's store object on one shared place (the in-memory
    stores: the same object, memory is not shared)."""
    made: list[Any] = []
    if kind in ("memory", "memory-async"):
        one = InMemoryStore() if kind == "memory" else AsyncInMemoryStore()
        yield lambda: one
        return
    if kind == "file":
        yield lambda: FileStore(tmp_path / "store")
        return
    if kind == "redis":
        from interpreters.stores.redis import RedisStore

        url = require("Redis", REDIS_URL, 6379, START_REDIS)
        prefix = unique("stroma-wait")

        def make_redis() -> Any:
            made.append(RedisStore(url, key_prefix=prefix, lease_ms=30_000))
            return made[-1]

        try:
            yield make_redis
        finally:
            for store in made:
                await store.close()
            await drop_redis_prefix(url, prefix)
        return
    from interpreters.stores.postgres import PostgresStore

    dsn = require("PostgreSQL", POSTGRES_DSN, 5432, START_POSTGRES)
    prefix = unique("wt")

    def make_pg() -> Any:
        made.append(PostgresStore(dsn, table_prefix=prefix, lease_seconds=30))
        return made[-1]

    try:
        yield make_pg
    finally:
        for store in made:
            await store.close()
        await drop_postgres_tables(dsn, PostgresStore(dsn, table_prefix=prefix).tables)


def answers(log: Any, effect_type: type) -> list[tuple[Any, Any]]:
    """The (effect, event) records of one effect type (resume markers skipped)."""
    return [r for r in log.records if isinstance(r, tuple) and isinstance(r[0], effect_type)]


async def read_log(store: Any, run_id: str) -> Any:
    if hasattr(store, "read_log"):
        return await call(store.read_log(run_id))
    return store.get_log(run_id)


async def test_no_input_ends_waiting_durably_and_holding_no_lease(
    stores: Callable[[], Any], kind: str
) -> None:
    """With no input the run ends WAITING: the reason names the key and how to send it;
    another worker's store reads the log (finished WAITING, the wait pending, its digest)
    and the last checkpoint before the wait; and another process can lease the run at once
    (a lease kept for 30 s would refuse it with RunLocked)."""
    nodes = Nodes()
    first = await interpret(approval_plan(nodes), Agent(), store=stores(),
                            config=RunConfig(run_id="w1"))
    assert first.status is RunStatus.WAITING
    assert "waiting for input 'approval'" in (first.stop_reason or "")
    assert "send_input(store, run_id, 'approval'" in (first.stop_reason or "")
    assert first.final_state == Agent(n=2, path=["draft", "review"])
    other = stores()
    log = await read_log(other, "w1")
    assert log is not None and log.finish.status is RunStatus.WAITING
    [wait] = pending_wait(log)
    assert (wait.step_id, wait.key, wait.attempt) == ("await_input(approval)", "approval", 1)
    assert len(wait.digest) == 16
    checkpoint = await call(other.load("w1", "review"))
    assert checkpoint is not None and checkpoint.model_dump()["n"] == 2
    if kind in ("redis", "postgres"):
        # a holder of another process claims the run at once: no lease was kept (these
        # stores' leases last 30 s, and this process's own would be taken over silently)
        async with other.lease("w1", "another-host-4242/cafe0001"):
            pass
    # another worker runs it straight away: it still waits, nothing re-run
    again = await interpret(approval_plan(nodes), Agent(), store=other,
                            config=RunConfig(run_id="w1"))
    assert again.status is RunStatus.WAITING
    assert dict(nodes.calls) == {"draft": 1, "review": 1}


async def test_a_sent_input_resumes_the_run_without_rerunning_what_came_before(
    stores: Callable[[], Any],
) -> None:
    """send_input (with the wait's digest) then a run by another worker: RESUMED, the
    payload in the state, only ``publish`` called; the log then replays calling nothing."""
    nodes = Nodes()
    await interpret(approval_plan(nodes), Agent(), store=stores(),
                    config=RunConfig(run_id="w2"))
    [wait] = pending_wait(await read_log(stores(), "w2"))
    await send_input(stores(), "w2", "approval", Approval(ok=True, by="bo"), digest=wait.digest)
    done = await interpret(approval_plan(nodes), Agent(), store=stores(),
                           config=RunConfig(run_id="w2"))
    assert done.status is RunStatus.RESUMED, done.stop_reason
    assert done.final_state == Agent(n=3, path=["draft", "review", "publish"],
                                     approval=Approval(ok=True, by="bo"))
    assert dict(nodes.calls) == {"draft": 1, "review": 1, "publish": 1}
    events = [v for _, v in answers(done.log, fx.AwaitInput)]
    assert isinstance(events[0], fx.InputMissing) and isinstance(events[-1], fx.InputReceived)
    assert events[-1].payload == {"ok": True, "by": "bo"}
    nodes.replaying = True
    assert await replay(approval_plan(nodes), done.log) == done
    stored = await read_log(stores(), "w2")
    assert await replay(approval_plan(nodes), stored) == done


async def test_a_refused_input_changes_nothing(stores: Callable[[], Any]) -> None:
    """A payload missing a field, or sent with another request's digest, is refused naming
    the field / the digests; the run still waits and runs on when a good one comes."""
    nodes = Nodes()
    await interpret(approval_plan(nodes), Agent(), store=stores(),
                    config=RunConfig(run_id="w3"))
    [wait] = pending_wait(await read_log(stores(), "w3"))
    with pytest.raises(InputRefused, match=r"\bok: Field required.*the run still waits"):
        await send_input(stores(), "w3", "approval", {"by": "bo"})
    with pytest.raises(InputRefused, match=r"meant for another request.*"
                                           + wait.digest):
        await send_input(stores(), "w3", "approval", {"ok": True}, digest="f" * 16)
    still = await interpret(approval_plan(nodes), Agent(), store=stores(),
                            config=RunConfig(run_id="w3"))
    assert still.status is RunStatus.WAITING
    await send_input(stores(), "w3", "approval", {"ok": False}, digest=wait.digest)
    done = await interpret(approval_plan(nodes), Agent(), store=stores(),
                           config=RunConfig(run_id="w3"))
    assert done.status is RunStatus.RESUMED
    assert done.final_state.approval == Approval(ok=False)  # type: ignore[attr-defined]
    assert dict(nodes.calls) == {"draft": 1, "review": 1, "publish": 1}


async def test_a_wait_past_its_timeout_fails_with_a_timeout_error(
    stores: Callable[[], Any], kind: str
) -> None:
    """Resumed within its timeout the wait waits on; resumed after it, the wait's attempt
    fails with a TimeoutError (RECOVERABLE), and with no retries left the run is PARTIAL
    saying so. Time is a VirtualClock moved by the test."""
    nodes = Nodes()
    clock = VirtualClock()
    config = RunConfig(run_id="w4", policy_map={"RECOVERABLE": FailurePolicy(max_retries=0)})
    plan = approval_plan(nodes, timeout_ms=60_000)
    first = await simulate(plan, Agent(), store=stores(), clock=clock, config=config)
    assert first.status is RunStatus.WAITING
    clock.advance(59)
    within = await simulate(plan, Agent(), store=stores(), clock=clock, config=config)
    assert within.status is RunStatus.WAITING
    clock.advance(2)
    late = await simulate(plan, Agent(), store=stores(), clock=clock, config=config)
    assert late.status is RunStatus.PARTIAL
    assert "TimeoutError: the wait for 'approval' timed out" in (late.stop_reason or "")
    [failed] = late.trace.failures()
    assert failed.node_id == "await_input(approval)"
    assert failed.failure is FailureClass.RECOVERABLE
    assert "nothing was sent within 60000 ms" in (failed.failure_message or "")
    assert dict(nodes.calls) == {"draft": 1, "review": 1}


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_a_timed_out_wait_is_classified_and_retried_like_any_failure(
    anyio_backend: str,
) -> None:
    """A classifier sees a TimeoutError for the wait's attempt; a retry asks again (a
    fresh wait, attempt 2) whose timeout starts then; an input sent answers it."""
    nodes = Nodes()
    seen: list[tuple[str, NodeContext]] = []

    def classifier(exc: Exception, ctx: NodeContext) -> FailureClass | None:
        seen.append((type(exc).__name__, ctx))
        assert isinstance(exc, TimeoutError)
        return None  # the built-in rule: RECOVERABLE

    clock, store = VirtualClock(), InMemoryStore()
    config = RunConfig(run_id="w5", classifiers=[classifier],
                       policy_map={"RECOVERABLE": FailurePolicy(max_retries=1,
                                                                backoff_seconds=0)})
    plan = approval_plan(nodes, timeout_ms=1_000)
    assert (await simulate(plan, Agent(), store=store, clock=clock, config=config)).status \
        is RunStatus.WAITING
    clock.advance(5)
    retried = await simulate(plan, Agent(), store=store, clock=clock, config=config)
    assert retried.status is RunStatus.WAITING
    [wait] = pending_wait(retried.log)  # type: ignore[arg-type]
    assert wait.attempt == 2
    assert [(name, ctx.node_id, ctx.attempt) for name, ctx in seen] == [
        ("TimeoutError", "await_input(approval)", 1)]
    await send_input(store, "w5", "approval", {"ok": True})
    clock.advance(0.5)
    done = await simulate(plan, Agent(), store=store, clock=clock, config=config)
    assert done.status is RunStatus.RESUMED
    assert [e.attempt for e in done.trace.events_for("await_input(approval)")] == [1, 2]


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_a_terminal_classification_of_a_timed_out_wait_fails_the_run(
    anyio_backend: str,
) -> None:
    """A classifier that calls the wait's timeout TERMINAL ends the run FAILED."""
    nodes = Nodes()
    clock, store = VirtualClock(), InMemoryStore()
    config = RunConfig(run_id="w6", classifiers=[
        lambda exc, ctx: FailureClass.TERMINAL if isinstance(exc, TimeoutError) else None])
    plan = approval_plan(nodes, timeout_ms=1_000)
    await simulate(plan, Agent(), store=store, clock=clock, config=config)
    clock.advance(timedelta(hours=1).total_seconds())
    failed = await simulate(plan, Agent(), store=store, clock=clock, config=config)
    assert failed.status is RunStatus.FAILED
    assert "timed out" in (failed.stop_reason or "")


# ----------------------------------------------------------------- inputs= and replay


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.parametrize("payload", [
    Approval(ok=True, by="cy"), {"ok": True, "by": "cy"}, '{"ok": true, "by": "cy"}'])
async def test_an_input_given_to_interpret_answers_the_wait(anyio_backend: str,
                                                            payload: Any) -> None:
    """``inputs={name: payload}`` (a model, a dict or JSON text) answers the wait in the
    same run: COMPLETED, the payload in the state, the log holding it."""
    nodes = Nodes()
    result = await interpret(approval_plan(nodes), Agent(), inputs={"approval": payload})
    assert result.status is RunStatus.COMPLETED
    assert result.final_state.approval == Approval(ok=True, by="cy")  # type: ignore[attr-defined]
    [(effect, event)] = answers(result.log, fx.AwaitInput)
    assert effect.key == "approval"
    assert isinstance(event, fx.InputReceived) and event.payload == {"ok": True, "by": "cy"}


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_an_input_given_to_interpret_that_does_not_fit_keeps_the_run_waiting(
    anyio_backend: str,
) -> None:
    """A payload missing a required field leaves the run WAITING, the reason naming the
    field; the run goes on when a valid one is given."""
    nodes = Nodes()
    store = InMemoryStore()
    config = RunConfig(run_id="w7")
    bad = await interpret(approval_plan(nodes), Agent(), store=store, config=config,
                          inputs={"approval": {"by": "cy"}})
    assert bad.status is RunStatus.WAITING
    assert "does not fit Approval" in (bad.stop_reason or "")
    assert "ok" in (bad.stop_reason or "")
    good = await interpret(approval_plan(nodes), Agent(), store=store, config=config,
                           inputs={"approval": {"ok": True}})
    assert good.status is RunStatus.RESUMED
    assert dict(nodes.calls) == {"draft": 1, "review": 1, "publish": 1}


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_a_waiting_run_goes_on_without_its_initial_state_given_again(
    anyio_backend: str,
) -> None:
    """``interpret(plan, store=..., config=RunConfig(run_id=...))``, no initial state, goes
    on with the run the store holds (its log has the state it started from), re-running
    nothing; with no run of that id, or no run id at all, it is a TypeError that says to
    pass the initial state."""
    nodes = Nodes()
    store, config = InMemoryStore(), RunConfig(run_id="w-no-state")
    first = await interpret(approval_plan(nodes), Agent(), store=store, config=config)
    assert first.status is RunStatus.WAITING
    await send_input(store, "w-no-state", "approval", {"ok": True, "by": "ed"})
    done = await interpret(approval_plan(nodes), store=store, config=config)
    assert done.status is RunStatus.RESUMED
    assert done.final_state.approval == Approval(ok=True, by="ed")  # type: ignore[attr-defined]
    assert dict(nodes.calls) == {"draft": 1, "review": 1, "publish": 1}
    again = await interpret(approval_plan(nodes), store=store, config=config)
    assert again == done and dict(nodes.calls)["publish"] == 1
    with pytest.raises(TypeError, match=r"the store has no run 'other' to go on from; pass "
                                        r"one, e.g. interpret\(plan, Agent\(\.\.\.\)"):
        await interpret(approval_plan(nodes), store=store, config=RunConfig(run_id="other"))
    with pytest.raises(TypeError, match=r"initial_state is required to start a run"):
        await interpret(approval_plan(nodes), store=store)
    assert dict(nodes.calls) == {"draft": 1, "review": 1, "publish": 1}


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.parametrize("make_store", [InMemoryStore, AsyncInMemoryStore])
async def test_a_waiting_run_with_a_generated_run_id_takes_its_input_on_a_memory_store(
    anyio_backend: str, make_store: Callable[[], Any],
) -> None:
    """No run id given: the in-memory store keeps the log of a run that ends WAITING, so
    the id in its result is enough to send the input and go on, re-running nothing."""
    nodes = Nodes()
    store = make_store()
    first = await interpret(approval_plan(nodes), Agent(), store=store)
    assert first.status is RunStatus.WAITING
    assert first.run_id in await call(store.run_ids())
    await send_input(store, first.run_id, "approval", {"ok": True, "by": "fay"})
    done = await interpret(approval_plan(nodes), store=store,
                           config=RunConfig(run_id=first.run_id))
    assert done.status is RunStatus.RESUMED
    assert done.final_state.approval == Approval(ok=True, by="fay")  # type: ignore[attr-defined]
    assert dict(nodes.calls) == {"draft": 1, "review": 1, "publish": 1}


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_an_input_for_no_wait_of_the_plan_is_refused_before_anything_runs(
    anyio_backend: str,
) -> None:
    """``inputs=`` with a name no wait of the plan has (a typo) is refused, naming the
    waits there are and the closest one, before any node runs; a wait's key (its name,
    ``@`` and where it is) is taken."""
    nodes = Nodes()
    with pytest.raises(InputRefused) as caught:
        await interpret(approval_plan(nodes), Agent(), inputs={"aproval": {"ok": True}})
    assert "'aproval' is not the name of a wait" in str(caught.value)
    assert "its waits are 'approval'" in str(caught.value)
    assert "did you mean 'approval'?" in str(caught.value)
    assert isinstance(caught.value, StromaError)
    assert dict(nodes.calls) == {}
    keyed = await interpret(approval_plan(nodes), Agent(), inputs={"approval@x#1": {"ok": True}})
    assert keyed.status is RunStatus.WAITING  # (a key of no wait this run meets: it waits)


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_replay_answers_the_wait_from_the_log(anyio_backend: str) -> None:
    """Replaying a WAITING run gives WAITING; replaying the answered run gives its result
    with the logged payload, and no input needs to be there."""
    nodes = Nodes()
    store = InMemoryStore()
    config = RunConfig(run_id="w8")
    waiting = await interpret(approval_plan(nodes), Agent(), store=store, config=config)
    quiet = Nodes()
    quiet.replaying = True
    again = await replay(approval_plan(quiet), waiting.log)
    assert again.status is RunStatus.WAITING and again.final_state == waiting.final_state
    answered = await interpret(approval_plan(nodes), Agent(), store=store, config=config,
                               inputs={"approval": {"ok": True, "by": "dee"}})
    replayed = await replay(approval_plan(quiet), answered.log)
    assert replayed == answered
    assert replayed.final_state.approval == Approval(ok=True, by="dee")  # type: ignore[attr-defined]


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_a_wait_in_a_loop_asks_again_each_iteration(anyio_backend: str) -> None:
    """Inside a loop the wait's key carries the iteration (``approval@L#2``); answering
    both by key completes the run, each iteration's payload in its trace event."""
    nodes = Nodes()

    async def clear(s: Agent, ctx: dict[str, Any]) -> Agent:
        return s.model_copy(update={"n": s.n + 1, "approval": None})

    plan = loop(seq(await_input("approval", Approval, input=Agent), nodes.node("use", clear)),
                until=lambda s: s.n >= 2, max_iterations=3, name="L")
    store, config = InMemoryStore(), RunConfig(run_id="w9")
    first = await interpret(plan, Agent(), store=store, config=config)
    assert [w.key for w in pending_wait(first.log)] == ["approval@L#1"]  # type: ignore[arg-type]
    assert "approval@L#1" in (first.stop_reason or "")
    done = await interpret(plan, Agent(), store=store, config=config,
                           inputs={"approval@L#1": {"ok": True, "by": "one"},
                                   "approval@L#2": {"ok": False, "by": "two"}})
    assert done.status is RunStatus.RESUMED
    waits = done.trace.events_for("await_input(approval)")
    assert [(e.iteration, (e.output_state or {})["approval"]["by"]) for e in waits] == [
        (1, "one"), (2, "two")]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_resume_is_marked_at_the_runs_own_clock(anyio_backend: str) -> None:
    """Resumed under simulate, the log's resume marker has the virtual clock's time (not
    the machine's wall clock), so a simulated run's log reads the same on every machine."""
    from stroma.log import ResumeMarker

    nodes = Nodes()
    clock, store = VirtualClock(), InMemoryStore()
    config = RunConfig(run_id="marked")
    plan = approval_plan(nodes)
    assert (await simulate(plan, Agent(), store=store, clock=clock, config=config)).status \
        is RunStatus.WAITING
    await send_input(store, "marked", "approval", {"ok": True})
    clock.advance(60)
    done = await simulate(plan, Agent(), store=store, clock=clock, config=config)
    assert done.status is RunStatus.RESUMED and done.log is not None
    markers = [r for r in done.log.records if isinstance(r, ResumeMarker)]
    assert markers and all(
        datetime.fromisoformat(m.at) == clock.now() for m in markers)


async def test_a_name_that_waits_in_several_places_is_refused_naming_each_key() -> None:
    """A wait inside a map_each waits once per item, each with its own key: the bare name
    is ambiguous, and the error lists the keys to send by (nothing sent)."""

    class Ok(BaseModel):
        ok: bool

    class Doc(BaseModel):
        item: str
        ok: Ok | None = None

    class Docs(BaseModel):
        items: list[Doc]
        outs: list[Doc] = []

    async def use(d: Doc) -> Doc:
        return d

    node = stroma.stroma_node("use", stroma.NodeContract(
        node_id="use", input_schema=Doc, output_schema=Doc))(use)
    plan = seq(stroma.map_each(seq(await_input("ok", Ok, input=Doc), node), over="items",
                        into="outs", input=Docs))
    store = InMemoryStore()
    waiting = await interpret(plan, Docs(items=[Doc(item="a"), Doc(item="b")]), store=store,
                              config=RunConfig(run_id="two-waits"))
    assert waiting.status is RunStatus.WAITING

    with pytest.raises(stroma.InputRefused) as caught:
        await stroma.send_input(store, "two-waits", "ok", {"ok": True})
    message = str(caught.value)
    assert "waits for 'ok' in 2 places" in message
    assert "[0]" in message and "[1]" in message and "nothing was sent" in message
    key = re.search(r"e\.g\. send_input\(store, 'two-waits', '([^']+)'", message)
    assert key is not None
    await stroma.send_input(store, "two-waits", key[1], {"ok": True})  # the key is taken


async def test_a_run_that_took_an_input_that_does_not_fit_is_sent_a_valid_one(
    stores: Callable[[], Any],
) -> None:
    """A run that found an input that does not fit waits on for a valid one: send_input
    takes it (it used to say the run was not waiting), and the run goes on with it."""
    nodes = Nodes()
    store = stores()
    config = RunConfig(run_id="w-bad")
    bad = await interpret(approval_plan(nodes), Agent(), store=store, config=config,
                          inputs={"approval": {"by": "cy"}})
    assert bad.status is RunStatus.WAITING and "does not fit" in (bad.stop_reason or "")
    [wait] = pending_wait(await read_log(store, "w-bad"))
    assert wait.key == "approval"

    await send_input(store, "w-bad", "approval", {"ok": True, "by": "cy"},
                     digest=wait.digest)
    done = await interpret(approval_plan(nodes), Agent(), store=store, config=config)

    assert done.status is RunStatus.RESUMED
    assert done.final_state.approval == Approval(ok=True, by="cy")  # type: ignore[attr-defined]
    assert dict(nodes.calls) == {"draft": 1, "review": 1, "publish": 1}


async def test_an_input_sent_twice_before_the_run_takes_it_is_refused_unless_replaced(
    stores: Callable[[], Any],
) -> None:
    """Two answers to one request (ann approves, bob declines): the second is refused
    naming the first, the first stays; with replace=True the second takes its place."""
    nodes = Nodes()
    store = stores()
    await interpret(approval_plan(nodes), Agent(), store=store,
                    config=RunConfig(run_id="w-twice"))
    await send_input(store, "w-twice", "approval", {"ok": True, "by": "ann"})

    with pytest.raises(InputRefused, match=r"sent to run 'w-twice' already.*ann.*replace=True"):
        await send_input(store, "w-twice", "approval", {"ok": False, "by": "bob"})
    assert '"ann"' in await call(store.get_input("w-twice", "approval"))

    await send_input(store, "w-twice", "approval", {"ok": False, "by": "bob"}, replace=True)
    done = await interpret(approval_plan(nodes), Agent(), store=store,
                           config=RunConfig(run_id="w-twice"))
    assert done.final_state.approval == Approval(ok=False, by="bob")  # type: ignore[attr-defined]


async def test_a_digest_of_fewer_than_8_characters_is_refused_asking_for_more(
    stores: Callable[[], Any],
) -> None:
    nodes = Nodes()
    store = stores()
    await interpret(approval_plan(nodes), Agent(), store=store,
                    config=RunConfig(run_id="w-short"))
    [wait] = pending_wait(await read_log(store, "w-short"))

    with pytest.raises(InputRefused, match=r"at least its first 8 characters") as caught:
        await send_input(store, "w-short", "approval", {"ok": True}, digest=wait.digest[:4])

    assert wait.digest[:8] in str(caught.value)
    assert await call(store.get_input("w-short", "approval")) is None


class Signed(BaseModel):
    approved_by: str = Field(alias="approvedBy")  # (no populate_by_name)
    at: datetime
    window: tuple[int, int] = (0, 0)


class Contract(BaseModel):
    n: int = 0
    signed: Signed | None = None


@pytest.mark.parametrize("payload", [
    Signed(approvedBy="ann", at=datetime(2026, 1, 2, 3, 4), window=(1, 2)),
    {"approvedBy": "ann", "at": datetime(2026, 1, 2, 3, 4), "window": (1, 2)},
    '{"approvedBy": "ann", "at": "2026-01-02T03:04:00", "window": [1, 2]}',
], ids=["model", "dict", "text"])
async def test_a_payload_is_taken_as_its_json_reads(
    stores: Callable[[], Any], payload: Any,
) -> None:
    """A model with an aliased field, a dict holding a datetime and a tuple, and JSON text
    all send the same input, which the run takes and a replay reads the same."""
    nodes = Nodes()

    async def count(state: Contract, ctx: dict[str, Any]) -> Contract:
        return state.model_copy(update={"n": state.n + 1})

    def plan() -> Any:
        return seq(nodes.node("draft", count, schema=Contract), await_input("signed", Signed),
                   nodes.node("file", count, schema=Contract))

    store = stores()
    await interpret(plan(), Contract(), store=store, config=RunConfig(run_id="w-sign"))
    await send_input(store, "w-sign", "signed", payload)
    done = await interpret(plan(), Contract(), store=store, config=RunConfig(run_id="w-sign"))

    assert done.status is RunStatus.RESUMED, done.stop_reason
    assert done.final_state == Contract(n=2, signed=Signed(
        approvedBy="ann", at=datetime(2026, 1, 2, 3, 4), window=(1, 2)))
    nodes.replaying = True
    assert await replay(plan(), done.log) == done
