"""A traced agent run (a loop of think and a route, a map_each in iteration 2, a wait in
iteration 3): attempt spans say which iteration and item they ran in; the run's span has
the route choices, the loop's until answers and the wait as events, and status WAITING;
the resumed run's span has the input and the loop's last answer."""

from __future__ import annotations

from typing import Any

import pytest

from stroma import InMemoryStore, send_input
from stroma.otel import (
    ATTEMPT,
    BACKOFF_EVENT,
    DIGEST,
    INPUT_EVENT,
    INPUT_KEY,
    INPUT_NAME,
    ITEM,
    ITEM_INDEX,
    ITERATION,
    LOOP_DONE,
    LOOP_EVENT,
    NODE_ID,
    ROUTE_EVENT,
    ROUTE_KEY,
    RUN_SPAN,
    STATUS,
    WAIT_EVENT,
    WHERE,
    Tracing,
)
from tests.otel.telemetry import Telemetry
from tests.timeline import pipelines as P

pytestmark = pytest.mark.anyio

MAP = P.AGENT_MAP


def at(n: int) -> dict[str, Any]:
    return {WHERE: f"agent#{n}", ITERATION: n}


def events(span: Any, *skip: str) -> list[tuple[str, dict[str, Any]]]:
    return [(e.name, dict(e.attributes or {})) for e in span.events if e.name not in skip]


async def waiting_run(telemetry: Telemetry) -> tuple[InMemoryStore, Tracing, Any]:
    store = InMemoryStore()
    tracing = Tracing(telemetry.tracer_provider, telemetry.meter_provider)
    result = await P.run(P.agent_plan(), P.AGENT_START, store, "agent", seed=5,
                         tracing=tracing)
    assert result.status.value == "WAITING"
    return store, tracing, result


async def test_attempt_spans_carry_iteration_item_and_where(telemetry: Telemetry) -> None:
    """Each attempt in the loop has its iteration and where; a map item's span has its
    item too; spans outside any loop or map have none of them."""
    await waiting_run(telemetry)
    spans = [s for s in telemetry.spans() if s.name != RUN_SPAN]
    found = [(s.name, {k: v for k, v in (s.attributes or {}).items()
                       if k in (ATTEMPT, ITERATION, ITEM, WHERE, ITEM_INDEX)})
             for s in spans]
    assert found == [
        ("stroma node think", {ATTEMPT: 1, **at(1)}),
        ("stroma node work", {ATTEMPT: 1, **at(1)}),
        ("stroma node work", {ATTEMPT: 2, **at(1)}),
        ("stroma node think", {ATTEMPT: 1, **at(2)}),
        ("stroma node lookup", {ATTEMPT: 1, ITEM_INDEX: 0, ITEM: 0, ITERATION: 2,
                                WHERE: f"agent#2/{MAP}[0]"}),
        ("stroma node lookup", {ATTEMPT: 1, ITEM_INDEX: 1, ITEM: 1, ITERATION: 2,
                                WHERE: f"agent#2/{MAP}[1]"}),
        (f"stroma map {MAP}", {ATTEMPT: 1, **at(2)}),
        ("stroma node think", {ATTEMPT: 1, **at(3)}),
    ]
    (group,) = telemetry.named(f"stroma map {MAP}")
    items = [s for s in spans if s.name == "stroma node lookup"]
    assert all(s.parent is not None and s.parent.span_id == group.context.span_id
               for s in items)


async def test_the_run_span_has_routes_loops_and_the_wait(telemetry: Telemetry) -> None:
    """The run's span ends with status WAITING (not an error: UNSET) and has, in order,
    each route's key, each until answer and the wait, with where they were."""
    _, _, result = await waiting_run(telemetry)
    (run,) = telemetry.named(RUN_SPAN)
    assert (run.attributes or {})[STATUS] == "WAITING"
    assert run.status.status_code.name == "UNSET"
    (wait,) = _waits(result)
    assert events(run, BACKOFF_EVENT) == [
        (ROUTE_EVENT, {NODE_ID: "pick", ROUTE_KEY: "work", **at(1)}),
        (LOOP_EVENT, {NODE_ID: "agent", LOOP_DONE: False, **at(1)}),
        (ROUTE_EVENT, {NODE_ID: "pick", ROUTE_KEY: "search", **at(2)}),
        (LOOP_EVENT, {NODE_ID: "agent", LOOP_DONE: False, **at(2)}),
        (ROUTE_EVENT, {NODE_ID: "pick", ROUTE_KEY: "ship", **at(3)}),
        (WAIT_EVENT, {NODE_ID: P.AGENT_WAIT, INPUT_NAME: "approval", INPUT_KEY: P.AGENT_KEY,
                      DIGEST: wait.digest, **at(3)}),
    ]
    stamps = [e.timestamp for e in run.events]
    assert stamps == sorted(stamps)


async def test_the_resumed_run_has_the_input_and_the_last_answer(
    telemetry: Telemetry,
) -> None:
    """Run again after send_input, the run's span (status RESUMED, OK) has the input
    that answered the wait and the until answer that ended the loop; ship's span is in
    iteration 3."""
    store, tracing, result = await waiting_run(telemetry)
    (wait,) = _waits(result)
    telemetry.exporter.clear()
    await send_input(store, "agent", "approval", {"ok": True})
    again = await P.run(P.agent_plan(), P.AGENT_START, store, "agent", seed=5,
                        tracing=tracing)
    assert again.status.value == "RESUMED"
    (run,) = telemetry.named(RUN_SPAN)
    assert (run.attributes or {})[STATUS] == "RESUMED" and run.status.status_code.name == "OK"
    assert events(run) == [
        (INPUT_EVENT, {NODE_ID: P.AGENT_WAIT, INPUT_NAME: "approval", INPUT_KEY: P.AGENT_KEY,
                       DIGEST: wait.digest, **at(3)}),
        (LOOP_EVENT, {NODE_ID: "agent", LOOP_DONE: True, **at(3)}),
    ]
    (ship,) = telemetry.named("stroma node ship")
    assert {k: (ship.attributes or {})[k] for k in (ITERATION, WHERE)} == at(3)


def _waits(result: Any) -> list[Any]:
    from stroma.inputs import pending_wait

    return pending_wait(result.log)
