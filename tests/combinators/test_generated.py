"""Generated plans: random nesting of seq, parallel, branch and map_each over scripted
nodes with scripted failures, run live and then replayed with identical results."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

import stroma
from stroma import EffectLog, FailureClass, FailurePolicy, RunStatus
from stroma.plan import Plan, branch, map_each, parallel, seq
from stroma.runner import RunConfig, interpret
from tests.combinators.kit import Called


class Leaf(BaseModel):
    value: int


class St(BaseModel):
    value: int
    items: list[Leaf] = []


# A spec is a tree of tuples:
#   ("node", add, n_items, fail_times, fail_kind)   fail_kind: timeout | value | contract
#   ("seq", [spec, ...]) | ("par", [spec, ...], limit) | ("branch", mod, then, otherwise)
#   ("map", body, limit)

FAIL_KINDS = ("timeout", "value", "contract")
node_specs = st.tuples(
    st.just("node"), st.integers(-3, 5), st.integers(0, 3), st.sampled_from([0, 0, 0, 1, 2]),
    st.sampled_from(FAIL_KINDS),
)
limits = st.sampled_from([None, 1, 2])


def _extend(children: Any) -> Any:
    lists = st.lists(children, min_size=1, max_size=3)
    return st.one_of(
        st.tuples(st.just("seq"), lists),
        st.tuples(st.just("par"), lists, limits),
        st.tuples(st.just("branch"), st.integers(2, 3), children,
                  st.one_of(st.none(), children)),
        st.tuples(st.just("map"), children, limits),
    )


specs = st.recursive(node_specs, _extend, max_leaves=6)


class Builder:
    """Turns a spec into a plan of scripted nodes; counts calls per (node, input)."""

    def __init__(self) -> None:
        self.calls: Counter[tuple[str, int]] = Counter()
        self.replaying = False
        self.count = 0
        self.node_ids: list[str] = []

    def _id(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def node(self, spec: tuple[Any, ...]) -> Any:
        _, add, n_items, fail_times, fail_kind = spec
        node_id = self._id("n")
        self.node_ids.append(node_id)

        async def fn(s: St) -> Any:
            if self.replaying:
                raise Called(f"{node_id} ran during replay")
            key = (node_id, s.value)
            self.calls[key] += 1
            if self.calls[key] <= fail_times:
                if fail_kind == "timeout":
                    raise TimeoutError(f"{node_id} timed out")
                if fail_kind == "value":
                    raise ValueError(f"{node_id} is unsure")
                return {"value": "not an int"}  # a contract violation: TERMINAL
            value = s.value + add
            return {"value": value, "items": [{"value": value + j} for j in range(n_items)]}, 3

        fn.__name__ = fn.__qualname__ = node_id
        return stroma.stroma_node(node_id, stroma.NodeContract(
            node_id=node_id, input_schema=St, output_schema=St))(fn)

    def build(self, spec: tuple[Any, ...]) -> Any:
        kind = spec[0]
        if kind == "node":
            return self.node(spec)
        if kind == "seq":
            return seq(*(self.build(s) for s in spec[1]))
        if kind == "par":
            return parallel(*(self.build(s) for s in spec[1]), max_concurrency=spec[2])
        if kind == "branch":
            mod = spec[1]
            then = self.build(spec[2])
            otherwise = self.build(spec[3]) if spec[3] is not None else ()
            return branch(lambda s: s.value % mod == 0, then=then, otherwise=otherwise,
                          name=self._id("b"))
        assert kind == "map"
        return map_each(self.build(spec[1]), over="items", into=self._id("outs"),
                        max_concurrency=spec[2], input=St)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    spec=st.lists(specs, min_size=1, max_size=3),
    start=st.integers(0, 6),
    recoverable=st.integers(0, 2),
    ambiguous=st.integers(0, 1),
    retried=st.integers(0, 3),
    seed=st.integers(0, 2**32),
)
@pytest.mark.anyio
async def test_generated_plans_replay_to_identical_results(
    anyio_backend: str, spec: list[Any], start: int, recoverable: int, ambiguous: int,
    retried: int, seed: int,
) -> None:
    """Any generated plan, run live, replays (from the log and from its text, with every
    node and predicate forbidden to run) to the same status, final state, trace, totals."""
    builder = Builder()
    plan: Plan = seq(*(builder.build(s) for s in spec))
    if builder.node_ids:
        target = builder.node_ids[retried % len(builder.node_ids)]
        plan = plan.with_retry(target, {FailureClass.RECOVERABLE: FailurePolicy(
            max_retries=recoverable + 1, backoff_seconds=0)})
    policy = {
        FailureClass.RECOVERABLE: FailurePolicy(max_retries=recoverable, backoff_seconds=0),
        FailureClass.AMBIGUOUS: FailurePolicy(max_retries=ambiguous, backoff_seconds=0),
    }
    result = await interpret(plan, St(value=start), config=RunConfig(policy_map=policy,
                                                                       seed=seed))
    assert result.status in (RunStatus.COMPLETED, RunStatus.PARTIAL, RunStatus.FAILED)
    builder.replaying = True
    text = result.log.to_jsonl()
    assert EffectLog.from_jsonl(text).to_jsonl() == text
    for log in (result.log, text):
        replayed = await stroma.replay(plan, log)
        assert replayed.status is result.status
        assert replayed.stop_reason == result.stop_reason
        assert replayed.final_state.model_dump() == result.final_state.model_dump()
        assert replayed.trace == result.trace and replayed.trace.diff(result.trace) == []
        assert (replayed.total_tokens, replayed.total_cost_usd) == (
            result.total_tokens, result.total_cost_usd)
        assert replayed == result
