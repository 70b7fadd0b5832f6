"""What a fan-out child that is a sub-plan used before it was cancelled (a sibling failed,
or the group's deadline passed) is counted: its nodes that returned were paid for. The
run's totals hold it once, whether the group then gives up or goes on from the child's
records on its next attempt, and a budget sees it; replay and a resume count the same
from the log, and a log written before it was counted replays as it was."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
from pydantic import BaseModel

from stroma import (
    EffectLog,
    FailureClass,
    FailurePolicy,
    FileStore,
    NodeContract,
    RunConfig,
    RunStatus,
    interpret,
    parallel,
    replay,
    seq,
    stroma_node,
)
from stroma.cost import ExecutionBudget, estimate_cost_usd

pytestmark = pytest.mark.anyio

ONE_RETRY = {c: FailurePolicy(max_retries=1, backoff_seconds=0.0) for c in FailureClass}
MODEL = "gpt-4o"


class S(BaseModel):
    a: int = 0
    b: int = 0
    c: int = 0
    d: int = 0
    e: int = 0


class Pipeline:
    """``parallel(seq(first, second), ..., sibling)`` with ``pairs`` sub-plan children:
    each ``first`` reports 100 tokens; ``sibling`` fails once every ``second`` runs
    (``failures`` times), so the children are cancelled after their ``first`` committed."""

    def __init__(self, failures: int, pairs: int = 1) -> None:
        self.failures = failures
        self.pairs = pairs
        self.calls: list[str] = []
        self.running = 0
        self.all_running = anyio.Event()

    def plan(self, extra: tuple[Any, ...] = (), max_concurrency: int | None = None) -> Any:
        def first(field: str) -> Any:
            async def call(state: S) -> Any:
                self.calls.append("first")
                return {**state.model_dump(), field: 1}, 60, 40, MODEL
            return call

        def second(field: str) -> Any:
            async def call(state: S) -> Any:
                self.calls.append("second")
                if self.failures:
                    self.running += 1
                    if self.running == self.pairs:
                        self.all_running.set()
                    await anyio.sleep_forever()
                return {**state.model_dump(), field: 2}, 5, 5, MODEL
            return call

        async def sibling(state: S) -> Any:
            self.calls.append("sibling")
            if self.failures:
                await self.all_running.wait()
                self.failures -= 1
                self.running, self.all_running = 0, anyio.Event()
                raise ValueError("the sibling failed")
            return {"c": 3}

        def node(name: str, fn: Any) -> Any:
            return stroma_node(name, NodeContract(node_id=name, input_schema=S,
                                                  output_schema=S))(fn)

        fields = [("a", "b"), ("d", "e")]
        children = [seq(node(f"first{i}", first(fields[i][0])),
                        node(f"second{i}", second(fields[i][1])))
                    for i in range(self.pairs)]
        return [parallel(*children, node("sibling", sibling), *extra,
                         max_concurrency=max_concurrency)]


FIRST = (100, estimate_cost_usd(MODEL, 60, 40))
SECOND = (10, estimate_cost_usd(MODEL, 5, 5))


async def test_a_group_that_gives_up_counts_what_its_cancelled_child_used(
    anyio_backend: str, tmp_path: Path
) -> None:
    pipeline = Pipeline(failures=2)
    store = FileStore(tmp_path)
    result = await interpret(pipeline.plan(), S(), store=store,
                             config=RunConfig(run_id="r", policy_map=ONE_RETRY))
    assert result.status is RunStatus.PARTIAL
    # The child went on from its records on the group's second attempt: ``first`` ran
    # once, and is counted once.
    assert pipeline.calls.count("first") == 1
    assert result.total_tokens == FIRST[0]
    assert result.total_cost_usd == pytest.approx(FIRST[1])

    log = await store.read_log("r")
    assert log is not None
    pipeline.calls.clear()
    again = await replay(pipeline.plan(), EffectLog.from_jsonl(log.to_jsonl()))
    assert pipeline.calls == []
    assert (again.total_tokens, again.total_cost_usd) == (result.total_tokens,
                                                          result.total_cost_usd)


async def test_a_group_that_goes_on_counts_its_cancelled_child_once(
    anyio_backend: str,
) -> None:
    pipeline = Pipeline(failures=1)
    result = await interpret(pipeline.plan(), S(), config=RunConfig(policy_map=ONE_RETRY))
    assert result.status is RunStatus.COMPLETED
    assert result.final_state.model_dump() == S(a=1, b=2, c=3).model_dump()
    assert pipeline.calls.count("first") == 1
    assert result.total_tokens == FIRST[0] + SECOND[0]
    assert result.total_cost_usd == pytest.approx(FIRST[1] + SECOND[1])
    pipeline.calls.clear()
    again = await replay(pipeline.plan(), result.log)
    assert again.total_tokens == result.total_tokens and pipeline.calls == []


async def test_a_budget_sees_what_a_cancelled_child_used(anyio_backend: str) -> None:
    """Two cancelled children used 100 tokens each, under a budget of 150 that each alone
    stays within: the run has spent it, and the group is not tried again (it used to be,
    the budget blind to them, and each child went on spending)."""
    pipeline = Pipeline(failures=1, pairs=2)
    config = RunConfig(policy_map=ONE_RETRY, budget=ExecutionBudget(max_tokens_total=150))
    result = await interpret(pipeline.plan(), S(), config=config)
    assert result.status is RunStatus.PARTIAL
    assert result.total_tokens == 2 * FIRST[0]
    assert "budget" in (result.stop_reason or "")
    assert pipeline.calls.count("second") == 2  # no second attempt
    assert pipeline.calls.count("sibling") == 1


async def test_a_log_from_before_usage_of_cancelled_children_was_counted_replays(
    anyio_backend: str, tmp_path: Path
) -> None:
    """A log whose cancelled child says nothing of what it used (as logs written before
    it was counted) reads with none used, and replays to the totals it recorded."""
    pipeline = Pipeline(failures=2)
    result = await interpret(pipeline.plan(), S(),
                             config=RunConfig(run_id="r", policy_map=ONE_RETRY))
    text = result.log.to_jsonl()
    assert '"total_tokens":100,' in text
    # (the Finish as such a log has it, then the cancelled child as it has it)
    finish = f'"total_tokens":{FIRST[0]},"total_cost_usd":{FIRST[1]!r},"total_latency_ms"'
    before = text.replace(finish, '"total_tokens":0,"total_cost_usd":0.0,"total_latency_ms"')
    before = before.replace(f',"total_tokens":{FIRST[0]},"total_cost_usd":{FIRST[1]!r}', "")
    assert '"total_tokens":100' not in before
    old = await replay(pipeline.plan(), EffectLog.from_jsonl(before))
    assert old.total_tokens == 0 and old.status is RunStatus.PARTIAL


async def test_a_bounded_group_going_on_counts_its_cancelled_child_once_for_its_budget(
    anyio_backend: str,
) -> None:
    """On the group's second attempt the cancelled child goes on from its records and
    reports its whole use again: the check that starts no more children once the budget
    is spent counts it once too (it took the 100 tokens twice, started no ``third`` and
    the attempt failed with its children cancelled)."""
    pipeline = Pipeline(failures=1)
    third_calls: list[int] = []

    async def third(state: S) -> Any:
        third_calls.append(1)
        return {"c": 3}, 1, 0, MODEL

    node = stroma_node("third", NodeContract(node_id="third", input_schema=S,
                                             output_schema=S))(third)
    plan = pipeline.plan(extra=(node,), max_concurrency=2)
    config = RunConfig(policy_map=ONE_RETRY, budget=ExecutionBudget(max_tokens_total=150))
    result = await interpret(plan, S(), config=config)
    assert result.status is RunStatus.COMPLETED, result.stop_reason
    assert third_calls == [1]
    assert pipeline.calls.count("first") == 1
    assert result.total_tokens == FIRST[0] + SECOND[0] + 1
