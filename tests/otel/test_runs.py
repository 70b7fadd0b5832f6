"""Traced runs of every entry point: spans on the run's own clock (virtual time under
``simulate``), the run's span under the caller's and around the spans its nodes make,
``execute_step``, a run whose log had finished, a cancelled run, branches and resumes."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

import stroma  # before interpreters.simulate, which imports stroma's modules
from interpreters.simulate import DEFAULT_START, VirtualClock, simulate
from stroma import (
    ExecutionBudget,
    ReliabilityContext,
    RunConfig,
    RunStatus,
    StromaRunner,
    branch,
    execute_step,
    interpret,
    loop,
    map_each,
    seq,
    stroma_node,
)
from stroma.cost import estimate_cost_usd
from stroma.otel import (
    ATTEMPT,
    BACKOFF_EVENT,
    BRANCH_EVENT,
    BRANCH_TAKEN,
    CHECKPOINT_FOUND,
    CHECKPOINT_LOADED_EVENT,
    COST_USD,
    LATENCY_MS,
    NODE_ID,
    OUTCOME,
    REPLAYED,
    RUN_ID,
    STATUS,
    TOTAL_TOKENS,
    UNFINISHED,
    WHERE,
    Tracing,
)
from tests.otel.telemetry import Telemetry, node
from tests.otel.test_spans import (
    Item,
    Items,
    Num,
    Out,
    assert_nested_in_time,
    contract,
    ran,
    retries,
    traced,
)

pytestmark = pytest.mark.anyio

_NS = 1_000_000_000


def ns(seconds: float) -> int:
    """Nanoseconds since the epoch of a moment ``seconds`` after the virtual clock's start."""
    return int(DEFAULT_START.timestamp()) * _NS + round(seconds * 1_000_000) * 1000


async def test_simulated_spans_are_on_the_virtual_clock(
    anyio_backend: str, telemetry: Telemetry
) -> None:
    """Under ``simulate`` every span and event is on the virtual clock: the run starts at
    the clock's start, each attempt spans the virtual time it took, each backoff event is
    where the attempt before it ended, and the next attempt starts after the backoff."""
    clock = VirtualClock()
    calls: list[int] = []

    @stroma_node("fetch", contract("fetch", Num, Num))
    async def fetch(state: Num) -> dict[str, int]:
        calls.append(1)
        await clock.sleep(2.5)
        if len(calls) <= 2:
            raise TimeoutError(f"call {len(calls)} timed out")
        return {"value": state.value + 1}

    config = traced(telemetry, policy_map=retries(3, backoff=30.0))
    result = await simulate([fetch], Num(value=1), config=config, clock=clock)

    assert result.status is RunStatus.COMPLETED
    assert len(clock.sleeps) == 2
    [run] = telemetry.named("stroma run")
    attempts = telemetry.named("stroma node fetch")
    assert run.start_time == ns(0)
    assert run.end_time == ns(clock.elapsed)
    began = 0.0
    for k, span in enumerate(attempts):
        assert span.start_time == ns(began)
        assert span.end_time == ns(began + 2.5)
        began += 2.5 + (clock.sleeps[k] if k < len(clock.sleeps) else 0.0)
    backoffs = [e for e in run.events if e.name == BACKOFF_EVENT]
    assert [e.timestamp for e in backoffs] == [a.end_time for a in attempts[:2]]
    assert [dict(e.attributes or {}) for e in backoffs] == [
        {"stroma.backoff_seconds": clock.sleeps[0], NODE_ID: "fetch", ATTEMPT: 2},
        {"stroma.backoff_seconds": clock.sleeps[1], NODE_ID: "fetch", ATTEMPT: 3},
    ]


async def test_the_run_span_is_a_child_of_the_callers_span_and_a_parent_of_the_nodes(
    anyio_backend: str, telemetry: Telemetry
) -> None:
    """A run traced inside a span of the caller is that span's child, and a span a node
    makes while it runs (an instrumented HTTP or LLM client, say) is the run span's child;
    after the run the caller's span is current again."""
    tracer = telemetry.tracer_provider.get_tracer("app")

    @stroma_node("ask", contract("ask", Num, Num))
    async def ask(state: Num) -> dict[str, int]:
        with tracer.start_as_current_span("llm call"):
            return {"value": state.value}

    runner = StromaRunner.quick().with_tracing(telemetry.tracer_provider,
                                               telemetry.meter_provider)
    with tracer.start_as_current_span("request") as request:
        result = await runner.run([ask], Num(value=1))
        assert trace.get_current_span() is request

    assert result.status is RunStatus.COMPLETED
    [caller] = telemetry.named("request")
    [run] = telemetry.named("stroma run")
    [llm] = telemetry.named("llm call")
    [attempt] = telemetry.named("stroma node ask")
    assert run.parent is not None and run.parent.span_id == caller.context.span_id
    assert run.context.trace_id == caller.context.trace_id
    assert llm.parent is not None and llm.parent.span_id == run.context.span_id
    assert attempt.parent is not None and attempt.parent.span_id == run.context.span_id


async def test_execute_step_is_traced_as_a_run_of_one_step(
    anyio_backend: str, telemetry: Telemetry
) -> None:
    """``execute_step`` with tracing on gives a run span (the context's run id) with the
    step's attempts beneath it, retries as siblings."""
    calls: list[int] = []

    async def summarize(state: Num) -> dict[str, int]:
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("flaky")
        return {"value": state.value * 10}

    ctx = ReliabilityContext.for_run(traced(telemetry, run_id="ctx-run",
                                            policy_map=retries(1)))
    result = await execute_step("summarize", summarize, Num(value=2), ctx,
                                contract=contract("summarize", Num, Num))

    assert result.status is RunStatus.COMPLETED and result.final_state == Num(value=20)
    [run] = telemetry.tree()
    assert run["name"] == "stroma run" and run["attributes"][RUN_ID] == "ctx-run"
    assert [(c["name"], c["attributes"][ATTEMPT], c["attributes"][OUTCOME])
            for c in run["children"]] == [
        ("stroma node summarize", 1, "failed"), ("stroma node summarize", 2, "succeeded")
    ]


async def test_a_run_whose_log_had_finished_is_a_replayed_run_span(
    anyio_backend: str, telemetry: Telemetry
) -> None:
    """Interpreting a run id whose log already finished runs nothing: its traced span says
    it was replayed, with the recorded status and totals, and has no attempt spans."""

    @stroma_node("once", contract("once", Num, Num))
    async def once(state: Num) -> tuple[dict[str, int], int, str]:
        return {"value": 1}, 10, "gpt-4o"

    store = stroma.InMemoryStore()
    config = traced(telemetry, run_id="done-before")
    first = await interpret([once], Num(value=0), store=store, config=config)
    telemetry.exporter.clear()
    again = await interpret([once], Num(value=0), store=store, config=config)

    assert again.status is RunStatus.COMPLETED
    assert telemetry.tree() == [{
        "name": "stroma run", "status": "OK",
        "attributes": ran(first, telemetry, **{REPLAYED: True}), "events": [],
        "children": [],
    }]


async def test_a_cancelled_run_ends_its_span_with_the_cancellation(
    anyio_backend: str, telemetry: Telemetry
) -> None:
    """A run cancelled from outside ends its span ERROR with the cancellation recorded,
    ``stroma.status`` UNFINISHED and its totals so far (the attempts it finished); the
    attempt in flight is an ``unfinished`` span, from its start to the cancellation."""
    started = anyio.Event()

    @stroma_node("quick", contract("quick", Num, Num))
    async def quick(state: Num) -> tuple[dict[str, int], int, int, str]:
        await anyio.sleep(0.01)
        return {"value": state.value}, 100, 20, "gpt-4o"

    @stroma_node("hang", contract("hang", Num, Num))
    async def hang(state: Num) -> dict[str, int]:
        started.set()
        await anyio.sleep_forever()
        raise AssertionError("never")

    runner = StromaRunner.quick().with_tracing(telemetry.tracer_provider,
                                               telemetry.meter_provider)
    async with anyio.create_task_group() as tg:
        tg.start_soon(runner.run, [quick, hang], Num(value=1))
        await started.wait()
        await anyio.sleep(0.05)
        tg.cancel_scope.cancel()

    cancelled = "Cancelled" if anyio_backend == "trio" else "CancelledError"
    [run] = telemetry.tree()
    assert run["name"] == "stroma run" and run["status"].startswith(f"ERROR: {cancelled}")
    assert [e[0] for e in run["events"]] == ["exception"]
    quick_span, hang_span = run["children"]
    assert (quick_span["name"], quick_span["status"]) == ("stroma node quick", "OK")
    latency = run["attributes"][LATENCY_MS]
    assert run["attributes"] == {
        RUN_ID: run["attributes"][RUN_ID], STATUS: UNFINISHED, TOTAL_TOKENS: 120,
        COST_USD: estimate_cost_usd("gpt-4o", 100, 20), LATENCY_MS: latency,
    }
    quick_ran = telemetry.spans()[0]
    assert quick_ran.name == "stroma node quick"
    assert quick_ran.start_time is not None and quick_ran.end_time is not None
    assert latency == (quick_ran.end_time - quick_ran.start_time) // 1_000_000 >= 10
    assert hang_span == node("stroma node hang", "ERROR: the run ended before the "
                             f"attempt's account was recorded ({cancelled})", {
                                 RUN_ID: run["attributes"][RUN_ID], NODE_ID: "hang",
                                 ATTEMPT: 1, OUTCOME: "unfinished",
                             })
    spans = {s.name: s for s in telemetry.spans()}
    hang_ran = spans["stroma node hang"]
    assert hang_ran.start_time is not None and hang_ran.end_time is not None
    assert quick_ran.end_time <= hang_ran.start_time
    assert hang_ran.end_time - hang_ran.start_time >= 50_000_000  # it ran until cancelled
    assert_nested_in_time(telemetry)


async def test_a_run_cancelled_in_a_loop_ends_its_attempt_and_keeps_its_place(
    anyio_backend: str, telemetry: Telemetry
) -> None:
    """An agent loop cancelled from outside while a node runs in its second iteration: the
    attempt in flight is an unfinished span with that iteration's place; resumed, the run
    span is the resumed run's own, with its Finish."""
    calls: list[int] = []
    started = anyio.Event()

    @stroma_node("step", contract("step", Num, Num))
    async def step(state: Num) -> dict[str, int]:
        calls.append(state.value)
        if state.value == 1 and len(calls) == 2:
            started.set()
            await anyio.sleep_forever()
        return {"value": state.value + 1}

    agent = loop(step, until=lambda s: s.value >= 3, max_iterations=5, name="agent")
    store = stroma.InMemoryStore()
    config = traced(telemetry, run_id="looped")
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: interpret(agent, Num(value=0), store=store, config=config))
        await started.wait()
        tg.cancel_scope.cancel()

    [cut] = telemetry.tree()
    assert cut["attributes"][STATUS] == UNFINISHED
    assert [(c["name"], c["attributes"][OUTCOME], c["attributes"][WHERE])
            for c in cut["children"]] == [
        ("stroma node step", "succeeded", "agent#1"),
        ("stroma node step", "unfinished", "agent#2"),
    ]

    telemetry.exporter.clear()
    result = await interpret(agent, Num(value=0), store=store, config=config)
    assert result.status is RunStatus.RESUMED and result.final_state == Num(value=3)
    [run] = telemetry.tree()
    assert run["attributes"] == ran(result, telemetry)
    assert [(c["attributes"][OUTCOME], c["attributes"][WHERE]) for c in run["children"]] == [
        ("succeeded", "agent#2"), ("succeeded", "agent#3"),
    ]


async def test_a_branch_choice_is_an_event_on_the_run_span(
    anyio_backend: str, telemetry: Telemetry
) -> None:
    """A branch's choice is a ``stroma.branch`` event naming the branch and the arm taken;
    only the taken arm's node has an attempt span."""

    @stroma_node("big", contract("big", Num, Num))
    async def big(state: Num) -> dict[str, int]:
        return {"value": state.value - 100}

    @stroma_node("small", contract("small", Num, Num))
    async def small(state: Num) -> dict[str, int]:
        return {"value": state.value + 1}

    choice = branch(lambda s: s.value > 10, then=big, otherwise=small, name="size")
    runner = StromaRunner.quick().with_tracing(telemetry.tracer_provider,
                                               telemetry.meter_provider)
    result = await runner.run([choice], Num(value=3))

    assert result.final_state == Num(value=4)
    [run] = telemetry.tree()
    branch_events = [e for e in run["events"] if e[0] == BRANCH_EVENT]
    assert branch_events == [(BRANCH_EVENT, {NODE_ID: "size", BRANCH_TAKEN: False})]
    assert [c["name"] for c in run["children"]] == ["stroma node small"]


async def test_a_resume_from_a_checkpoint_is_an_event_on_the_run_span(
    anyio_backend: str, telemetry: Telemetry
) -> None:
    """A run restarted with ``resume_from`` has a ``stroma.checkpoint_loaded`` event for the
    checkpoint it starts from, and attempt spans only for the steps it runs."""

    @stroma_node("one", contract("one", Num, Num))
    async def one(state: Num) -> dict[str, int]:
        return {"value": state.value + 1}

    @stroma_node("two", contract("two", Num, Num))
    async def two(state: Num) -> dict[str, int]:
        return {"value": state.value * 2}

    store = stroma.InMemoryStore()
    await interpret([one, two], Num(value=1), store=store, config=RunConfig(run_id="r1"))
    config = traced(telemetry, run_id="r1", resume_from="two")
    result = await interpret([one, two], Num(value=1), store=store, config=config)

    assert result.status is RunStatus.RESUMED and result.final_state == Num(value=4)
    [run] = telemetry.tree()
    assert run["attributes"][STATUS] == "RESUMED"
    assert run["events"] == [(CHECKPOINT_LOADED_EVENT, {NODE_ID: "one", CHECKPOINT_FOUND: True})]
    assert [c["name"] for c in run["children"]] == ["stroma node two"]


async def test_tracing_changes_nothing_in_the_run(anyio_backend: str, telemetry: Telemetry) -> None:
    """The same run traced and untraced gives the same result, trace and log records (the
    tracing is told of the run and decides nothing)."""

    def pipeline() -> list[Any]:
        calls: list[int] = []

        @stroma_node("n", contract("n", Num, Num))
        async def n(state: Num) -> tuple[dict[str, int], int, str]:
            calls.append(1)
            if len(calls) == 1:
                raise ValueError("once")
            return {"value": state.value + 1}, 5, "gpt-4o"

        return [n]

    plain = RunConfig(run_id="same", policy_map=retries(2), seed=3,
                      budget=ExecutionBudget(max_tokens_total=50))
    with_tracing = plain.model_copy(update={
        "tracing": Tracing(telemetry.tracer_provider, telemetry.meter_provider)
    })
    a = await simulate(pipeline(), Num(value=1), config=plain)
    b = await simulate(pipeline(), Num(value=1), config=with_tracing)

    assert telemetry.named("stroma run")
    assert (b.status, b.final_state, b.total_tokens, b.total_cost_usd) == (
        a.status, a.final_state, a.total_tokens, a.total_cost_usd
    )
    assert [(e.node_id, e.attempt, e.failure) for e in b.trace] == [
        (e.node_id, e.attempt, e.failure) for e in a.trace
    ]
    assert a.log is not None and b.log is not None
    assert [r for r in b.log.records] == [r for r in a.log.records]


async def test_a_fan_out_cut_short_and_resumed_shows_every_child(
    anyio_backend: str, telemetry: Telemetry
) -> None:
    """A run cancelled inside a map of sub-plans shows the group's attempt as an
    unfinished span with its children as ``stroma child`` spans beneath it (the one that
    finished OK, the one cut short unfinished, each with its node attempts: the one in
    flight unfinished too); resumed, the group's span has the child that finished before
    (read from the log) and the one that goes on from the progress the log kept of it:
    its ``first`` had committed and is not called again, so only ``second`` runs."""
    hang = [True]
    started = anyio.Event()

    @stroma_node("first", contract("first", Item, Item))
    async def first(item: Item) -> dict[str, int]:
        return {"item": item.item + 1}

    @stroma_node("second", contract("second", Item, Out))
    async def second(item: Item) -> dict[str, int]:
        if item.item == 3 and hang[0]:
            started.set()
            await anyio.sleep_forever()
        return {"out": item.item * 10}

    mapped = map_each(seq(first, second), over="items", into="outs", input=Items)
    store = stroma.InMemoryStore()
    config = traced(telemetry, run_id="cut")
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: interpret([mapped], Items(items=[1, 2]), store=store,
                                        config=config))
        await started.wait()
        tg.cancel_scope.cancel()

    [cut] = telemetry.tree()
    assert cut["status"].startswith("ERROR: Cancelled")
    step = mapped.step_id
    cancelled = "Cancelled" if anyio_backend == "trio" else "CancelledError"
    unfinished = f"ERROR: the run ended before the attempt's account was recorded ({cancelled})"
    [group] = cut["children"]
    assert (group["name"], group["status"], group["attributes"][OUTCOME]) == (
        f"stroma map {step}", unfinished, "unfinished")
    assert [(c["name"], c["status"], c["attributes"][OUTCOME],
             [(g["name"], g["attributes"][OUTCOME]) for g in c["children"]])
            for c in group["children"]] == [
        (f"stroma child {step}[0]", "OK", "succeeded",
         [("stroma node first", "succeeded"), ("stroma node second", "succeeded")]),
        (f"stroma child {step}[1]", f"ERROR: the run ended before the child did ({cancelled})",
         "unfinished", [("stroma node first", "succeeded"), ("stroma node second", "unfinished")]),
    ]
    assert_nested_in_time(telemetry)

    telemetry.exporter.clear()
    hang[0] = False
    result = await interpret([mapped], Items(items=[1, 2]), store=store, config=config)

    assert result.status is RunStatus.RESUMED
    [run] = telemetry.tree()
    [group] = run["children"]
    assert group["name"] == f"stroma map {step}" and group["status"] == "OK"
    assert [(c["name"], c["status"], c["attributes"]["stroma.outcome"],
             [(g["name"], g["status"]) for g in c["children"]])
            for c in group["children"]] == [
        (f"stroma child {step}[0]", "OK", "succeeded",
         [("stroma node first", "OK"), ("stroma node second", "OK")]),
        (f"stroma child {step}[1]", "OK", "succeeded", [("stroma node second", "OK")]),
    ]


class Faulty(SpanProcessor):
    """A span processor that raises when a span whose name starts with ``prefix`` starts
    (a broken processor or exporter of the application's SDK)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        if span.name.startswith(self.prefix):
            raise RuntimeError(f"processor broke on {span.name}")


@pytest.mark.parametrize("prefix", ["stroma run", "stroma node"])
async def test_a_broken_sdk_changes_nothing_in_the_run(
    anyio_backend: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """When the SDK raises making the run's span (the run goes on untraced) or an
    attempt's span (the run goes on), the run's result is what it is untraced, and the
    problem is logged as a warning."""
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(Faulty(prefix))
    calls: list[int] = []

    @stroma_node("n", contract("n", Num, Num))
    async def n(state: Num) -> dict[str, int]:
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("once")
        return {"value": state.value + 1}

    runner = StromaRunner.quick(policy_map=retries(1)).with_tracing(provider)
    result = await runner.run([n], Num(value=1))

    assert result.status is RunStatus.COMPLETED and result.final_state == Num(value=2)
    assert [(e.attempt, e.failure is None) for e in result.trace] == [(1, False), (2, True)]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(f"processor broke on {prefix}" in w for w in warnings)
    provider.shutdown()
