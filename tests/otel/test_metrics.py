"""The metrics of a traced run, exactly: the node duration histogram and the attempts
counter by node, kind, outcome and failure class, and the token and cost counters by
node, model and token type; the counters add up to the run's totals."""

from __future__ import annotations

import pytest

import stroma  # before interpreters.simulate, which imports stroma's modules
from interpreters.simulate import VirtualClock, simulate
from stroma import RunStatus, map_each, stroma_node
from stroma import effects as fx
from stroma.cost import estimate_cost_usd
from stroma.otel import (
    COST,
    FAILURE_CLASS,
    KIND,
    MODEL,
    NODE_ATTEMPTS,
    NODE_DURATION,
    NODE_ID,
    OUTCOME,
    TOKEN_TYPE,
    TOKENS,
)
from tests.otel.telemetry import Telemetry
from tests.otel.test_spans import Item, Num, Out, contract, group_records, retries, traced

pytestmark = pytest.mark.anyio


class Doc(Num):
    items: list[int]


async def test_metrics_count_attempts_durations_tokens_and_cost(
    anyio_backend: str, telemetry: Telemetry
) -> None:
    """Two failed attempts and a success of ``fetch`` and a map over two items give one
    data point per (node, kind, outcome, failure class) with the attempts counted and their
    virtual durations summed, and token and cost counters per node and model that add up
    to the run's totals."""
    clock = VirtualClock()
    calls: list[int] = []

    @stroma_node("fetch", contract("fetch", Num, Doc))
    async def fetch(state: Num) -> tuple[dict[str, object], int, int, str]:
        calls.append(1)
        await clock.sleep(0.5)
        if len(calls) <= 2:
            raise ConnectionError("dropped")
        return {"value": state.value, "items": [1, 2]}, 120, 30, "gpt-4o"

    @stroma_node("double", contract("double", Item, Out))
    async def double(item: Item) -> tuple[dict[str, int], int, str]:
        await clock.sleep(0.25)
        return {"out": item.item * 2}, 10, "gpt-4o-mini"

    mapped = map_each(double, over="items", into="outs")
    config = traced(telemetry, policy_map=retries(2))
    result = await simulate([fetch, mapped], Num(value=1), config=config, clock=clock)

    assert result.status is RunStatus.COMPLETED
    [(_, group)] = group_records(result)
    assert isinstance(group, fx.ParallelReturned)
    step = mapped.step_id
    failed = {NODE_ID: "fetch", KIND: "node", OUTCOME: "failed", FAILURE_CLASS: "AMBIGUOUS"}
    fetched = {NODE_ID: "fetch", KIND: "node", OUTCOME: "succeeded"}
    doubled = {NODE_ID: "double", KIND: "node", OUTCOME: "succeeded"}
    grouped = {NODE_ID: step, KIND: "map", OUTCOME: "succeeded"}
    order = sorted([failed, fetched, doubled, grouped], key=lambda a: sorted(a.items()))

    counts = {str(failed): 2, str(fetched): 1, str(doubled): 2, str(grouped): 1}
    # The children share the virtual clock, so their recorded durations are the figures.
    children = sum(o.duration_ms for o in group.outcomes) / 1000
    sums = {str(failed): 1.0, str(fetched): 0.5, str(doubled): children,
            str(grouped): group.duration_ms / 1000}
    assert telemetry.points(NODE_ATTEMPTS) == [(a, counts[str(a)]) for a in order]
    assert telemetry.points(NODE_DURATION) == [
        (a, (counts[str(a)], pytest.approx(sums[str(a)]))) for a in order
    ]
    assert telemetry.points(TOKENS) == [
        ({NODE_ID: "fetch", MODEL: "gpt-4o", TOKEN_TYPE: "input"}, 120),
        ({NODE_ID: "fetch", MODEL: "gpt-4o", TOKEN_TYPE: "output"}, 30),
        ({NODE_ID: "double", MODEL: "gpt-4o-mini", TOKEN_TYPE: "input"}, 20),
    ]
    assert telemetry.points(COST) == [
        ({NODE_ID: "fetch", MODEL: "gpt-4o"}, estimate_cost_usd("gpt-4o", 120, 30)),
        ({NODE_ID: "double", MODEL: "gpt-4o-mini"},
         pytest.approx(2 * estimate_cost_usd("gpt-4o-mini", 10, 0))),
    ]
    assert sum(v for _, v in telemetry.points(TOKENS)) == result.total_tokens
    assert sum(v for _, v in telemetry.points(COST)) == pytest.approx(result.total_cost_usd)
    assert result.status is stroma.RunStatus.COMPLETED
