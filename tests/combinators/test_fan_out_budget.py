"""A budget inside a fan-out: once the children that finished have spent the run's budget,
no more children are started (those running finish and are counted), the group's attempt
fails with BudgetExceeded, and the run stops PARTIAL, as it does after a single node."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from stroma import BudgetExceeded, FailureClass, FailurePolicy, NodeContext, RunStatus
from stroma.cost import ExecutionBudget
from stroma.plan import map_each, parallel, seq
from stroma.runner import RunConfig, interpret, replay
from tests.combinators.kit import Gauge, Item, Script

pytestmark = pytest.mark.anyio

ONCE = {c: FailurePolicy(max_retries=0, backoff_seconds=0.0) for c in FailureClass}


class Summary(BaseModel):
    item: int
    words: int


class Docs(BaseModel):
    items: list[int]
    summaries: list[Summary] = []


def summarizer(script: Script, gauge: Gauge, tokens: int = 30, node_id: str = "summarize"
               ) -> Any:
    async def body(state: Item) -> tuple[dict[str, int], int]:
        await gauge.hold()
        return {"item": state.item, "words": state.item * 2}, tokens

    return script.node(node_id, Item, Summary, body)


def summaries(node: Any, concurrency: int | None = 2) -> Any:
    return map_each(node, over="items", into="summaries", max_concurrency=concurrency,
                    input=Docs)


async def test_a_bounded_map_starts_no_child_once_the_budget_is_spent(
        anyio_backend: str) -> None:
    script, gauge = Script(), Gauge()
    plan = [summaries(summarizer(script, gauge))]
    config = RunConfig(budget=ExecutionBudget(max_tokens_total=100), policy_map=ONCE)

    result = await interpret(plan, Docs(items=list(range(20))), config=config)

    called = script.calls["summarize"]
    # 100 tokens are spent by the fourth child of 30; at most the two places of the group
    # were taken when it was: four or five children ran, never the twenty.
    assert 4 <= called <= 5
    assert result.status is RunStatus.PARTIAL
    assert result.total_tokens == 30 * called  # each child that ran is counted
    failed = result.trace.failures()[0]
    assert failed.failure is FailureClass.RECOVERABLE
    assert f"{20 - called} of its children were not started" in (failed.failure_message or "")
    assert "budget spent (tokens" in (result.stop_reason or "")
    assert result.final_state == Docs(items=list(range(20)))  # the group did not finish


async def test_the_children_running_when_the_budget_is_spent_finish(
        anyio_backend: str) -> None:
    script, gauge = Script(), Gauge()
    finished: list[int] = []

    async def body(state: Item) -> tuple[dict[str, int], int]:
        await gauge.hold(checkpoints=3 + state.item)  # later items take longer
        finished.append(state.item)
        return {"item": state.item, "words": 1}, 60

    plan = [summaries(script.node("summarize", Item, Summary, body), concurrency=3)]
    config = RunConfig(budget=ExecutionBudget(max_tokens_total=100), policy_map=ONCE)

    result = await interpret(plan, Docs(items=list(range(10))), config=config)

    assert result.status is RunStatus.PARTIAL
    assert gauge.peak == 3
    assert script.calls["summarize"] == len(finished) < 10  # none was cut off
    assert result.total_tokens == 60 * len(finished)


async def test_the_replay_of_a_group_stopped_by_its_budget_is_the_run_again(
        anyio_backend: str) -> None:
    script, gauge = Script(), Gauge()
    plan = [summaries(summarizer(script, gauge))]
    config = RunConfig(budget=ExecutionBudget(max_tokens_total=100), policy_map=ONCE)
    result = await interpret(plan, Docs(items=list(range(12))), config=config)
    assert result.log is not None

    script.replaying = True
    again = await replay(plan, result.log.to_jsonl())

    assert (again.status, again.final_state, again.total_tokens, again.stop_reason) == (
        result.status, result.final_state, result.total_tokens, result.stop_reason)


async def test_a_classifier_is_asked_about_the_budget_exceeded(anyio_backend: str) -> None:
    """The group's failure is a BudgetExceeded like a node's: a classifier can make it
    TERMINAL (the run FAILED), and it says which dimension was spent."""
    script, gauge = Script(), Gauge()
    seen: list[BaseException] = []

    def budget_is_fatal(exc: Exception, ctx: NodeContext) -> FailureClass | None:
        seen.append(exc)
        return FailureClass.TERMINAL if isinstance(exc, BudgetExceeded) else None

    plan = [summaries(summarizer(script, gauge))]
    config = RunConfig(budget=ExecutionBudget(max_tokens_total=50), policy_map=ONCE,
                       classifiers=[budget_is_fatal])

    result = await interpret(plan, Docs(items=list(range(8))), config=config)

    assert result.status is RunStatus.FAILED
    assert len(seen) == 1 and isinstance(seen[0], BudgetExceeded)
    assert (seen[0].dimension, seen[0].limit) == ("tokens", 50)
    assert script.calls["summarize"] < 8


async def test_a_cost_budget_counts_sub_plan_children_by_their_totals(
        anyio_backend: str) -> None:
    script, gauge = Script(), Gauge()

    async def draft(state: Item) -> tuple[dict[str, int], int, str]:
        await gauge.hold()
        return {"item": state.item}, 1_000, "gpt-4o"  # $0.0025 of input tokens

    async def score(state: Item) -> dict[str, int]:
        return {"item": state.item, "words": 3}

    body = seq(script.node("draft", Item, Item, draft),
               script.node("score", Item, Summary, score))
    plan = [summaries(body)]
    config = RunConfig(budget=ExecutionBudget(max_cost_usd=0.006), policy_map=ONCE)

    result = await interpret(plan, Docs(items=list(range(10))), config=config)

    assert result.status is RunStatus.PARTIAL
    assert 3 <= script.calls["draft"] <= 4  # $0.0075 is spent by the third child
    assert script.calls["draft"] == script.calls["score"]  # each child ran to its end
    assert result.total_cost_usd == pytest.approx(0.0025 * script.calls["draft"])


async def test_a_group_within_its_budget_runs_every_child(anyio_backend: str) -> None:
    script, gauge = Script(), Gauge()
    plan = [summaries(summarizer(script, gauge))]
    config = RunConfig(budget=ExecutionBudget(max_tokens_total=1_000), policy_map=ONCE)

    result = await interpret(plan, Docs(items=list(range(10))), config=config)

    assert result.status is RunStatus.COMPLETED
    assert script.calls["summarize"] == 10
    assert [s.item for s in result.final_state.summaries] == list(range(10))


async def test_an_unbounded_group_starts_all_its_children_at_once(anyio_backend: str) -> None:
    """Without max_concurrency every child starts before any finishes: all run, and the
    budget stops the run after the group, as after a node."""
    script, gauge = Script(), Gauge()
    left = summarizer(script, gauge, node_id="left")
    right = summarizer(script, gauge, node_id="right")
    plan = [parallel(left, right), summarizer(script, gauge, node_id="after")]
    config = RunConfig(budget=ExecutionBudget(max_tokens_total=40), policy_map=ONCE)

    result = await interpret(plan, Item(item=1), config=config)

    assert result.status is RunStatus.PARTIAL
    assert (script.calls["left"], script.calls["right"], script.calls["after"]) == (1, 1, 0)
    assert result.total_tokens == 60


async def test_a_loop_inside_a_sub_plan_child_stops_once_the_budget_is_spent(
        anyio_backend: str) -> None:
    """A child that is a whole plan runs with the run's budget from the run's totals when
    the group began: its loop stops as a loop outside a group would, and the run stops
    PARTIAL saying which child spent it; the child reports its own usage, counted once."""
    from stroma import loop

    script = Script()

    class Work(BaseModel):
        item: int
        n: int = 0

    class Batch(BaseModel):
        items: list[int]
        done: list[Work] = []

    async def think(state: Work) -> tuple[dict[str, int], int]:
        return {"item": state.item, "n": state.n + 1}, 30

    agent = loop(script.node("think", Work, Work, think), until=lambda s: s.n >= 10,
                 max_iterations=10, name="agent")
    plan = [map_each(agent, over="items", into="done", max_concurrency=1, input=Batch)]
    config = RunConfig(budget=ExecutionBudget(max_tokens_total=100), policy_map=ONCE)

    result = await interpret(plan, Batch(items=[0, 1, 2]), config=config)

    assert result.status is RunStatus.PARTIAL
    assert script.calls["think"] == 4  # 120 tokens spend the 100: not the 10 iterations
    assert result.total_tokens == 120
    reason = result.stop_reason or ""
    assert "[0] PARTIAL" in reason  # the child that spent it
    assert "tokens budget exceeded after node 'think': the run has used 120 tokens" in reason
    script.replaying = True
    again = await replay(plan, result.log.to_jsonl())  # type: ignore[union-attr]
    assert (again.status, again.total_tokens) == (result.status, result.total_tokens)


class _Stopped(BaseException):
    """A BaseException from a node (as KeyboardInterrupt is): the run stops at once."""


async def test_no_child_starts_after_a_child_raised_a_base_exception(
        anyio_backend: str) -> None:
    """A bounded group whose running child raises (Ctrl-C, say) starts no more children,
    on trio too (whose new task would run up to its first checkpoint)."""
    script, gauge = Script(), Gauge()

    async def stops(state: Item) -> dict[str, int]:
        raise _Stopped

    async def body(state: Item) -> dict[str, int]:
        await gauge.hold()
        return {"item": state.item}

    plan = [parallel(script.node("stops", Item, Item, stops),
                     script.node("after", Item, Item, body), max_concurrency=1)]

    with pytest.raises(_Stopped):
        await interpret(plan, Item(item=1), config=RunConfig(policy_map=ONCE))

    assert script.calls == {"stops": 1}


async def test_a_sub_plan_child_falls_back_to_the_cheaper_model_as_the_run_does(
        anyio_backend: str) -> None:
    """Past the fallback threshold a node inside a loop inside a map gets the fallback
    model, as a node child of the map and a node outside any group do, and is priced
    with it; the replay of the run is the run again."""
    from stroma import NodeContract, loop, stroma_node
    from stroma.cost import FallbackPolicy, estimate_cost_usd

    class Work(BaseModel):
        item: int
        n: int = 0
        models: list[str | None] = []

    class Batch(BaseModel):
        items: list[int]
        done: list[Work] = []

    def node(node_id: str, inp: type[BaseModel], out: type[BaseModel], fn: Any) -> Any:
        return stroma_node(node_id, NodeContract(node_id=node_id, input_schema=inp,
                                                 output_schema=out))(fn)

    async def spend(state: Batch, ctx: dict[str, Any]) -> tuple[dict[str, Any], int, int, str]:
        return state.model_dump(), 100_000, 100_000, "gpt-4o"  # $1.25 of a $2.00 budget

    async def think(state: Work, ctx: dict[str, Any]) -> tuple[dict[str, Any], int, str]:
        used = ctx.get("_stroma_model")
        return ({"item": state.item, "n": state.n + 1, "models": [*state.models, used]},
                1_000, "gpt-4o")

    agent = loop(node("think", Work, Work, think), until=lambda s: s.n >= 2,
                 max_iterations=3, name="agent")
    plan = [node("spend", Batch, Batch, spend),
            map_each(agent, over="items", into="done", input=Batch)]
    config = RunConfig(
        budget=ExecutionBudget(max_cost_usd=2.0), context={},
        model_fallbacks=[FallbackPolicy("gpt-4o", "gpt-4o-mini", at_budget_pct=0.5)])

    result = await interpret(plan, Batch(items=[0, 1]), config=config)

    assert result.status is RunStatus.COMPLETED
    assert [w.models for w in result.final_state.done] == [["gpt-4o-mini"] * 2] * 2
    priced = estimate_cost_usd("gpt-4o", 100_000, 100_000) + 4 * estimate_cost_usd(
        "gpt-4o-mini", 1_000)
    assert result.total_cost_usd == pytest.approx(priced)
    again = await replay(plan, result.log.to_jsonl())  # type: ignore[union-attr]
    assert (again.status, again.final_state) == (result.status, result.final_state)
    assert again.total_cost_usd == pytest.approx(result.total_cost_usd)


@pytest.mark.parametrize("kind", ["parallel", "map"])
async def test_a_sub_plan_child_that_waited_for_input_is_counted_once(
        anyio_backend: str, kind: str) -> None:
    """A child that waits for input has its usage in the WAITING run's totals; when the run
    goes on, the child's totals hold that usage again: the run counts it once (it counted
    it twice, and a budget the run kept to stopped it)."""
    from stroma import InMemoryStore, await_input

    class Ok(BaseModel):
        ok: bool

    class Job(BaseModel):
        item: int = 0
        approval: Ok | None = None

    class Jobs(BaseModel):
        items: list[Job] = [Job(item=1), Job(item=2)]
        done: list[Job] = []

    script = Script()

    async def work(state: Job) -> tuple[Job, int]:
        return state, 1_000

    async def ship(state: Job) -> tuple[Job, int]:
        return state, 10

    async def side(state: Job) -> tuple[dict[str, int], int]:
        return {"item": 9}, 100

    body = seq(script.node("work", Job, Job, work), await_input("approval", Ok),
               script.node("ship", Job, Job, ship))
    if kind == "parallel":
        plan = [parallel(body, script.node("side", Job, Job, side))]
        state: BaseModel = Job()
        spent, sent = 1_110, {"approval": {"ok": True}}
    else:
        plan = [map_each(body, over="items", into="done", input=Jobs)]
        state = Jobs()
        spent = 2_020
        sent = {f"approval@map_each(seq(work, await_input(approval), ship), over=items, "
                f"into=done)[{j}]": {"ok": True} for j in (0, 1)}
    store = InMemoryStore()
    config = RunConfig(run_id=f"waited-{kind}", budget=ExecutionBudget(max_tokens_total=2_500))

    first = await interpret(plan, state, store=store, config=config)
    assert first.status is RunStatus.WAITING
    done = await interpret(plan, state, store=store, config=config, inputs=sent)

    assert done.status is RunStatus.RESUMED, done.stop_reason
    assert done.total_tokens == spent
    script.replaying = True
    again = await replay(plan, done.log)  # type: ignore[arg-type]
    assert again.total_tokens == spent


async def test_a_latency_budget_stops_a_bounded_group_as_it_runs(anyio_backend: str) -> None:
    """A group is one step as long as it runs: once its time so far spends the latency
    budget it starts no more children (it ran all twenty, then failed)."""
    from interpreters.simulate import VirtualClock, simulate

    clock = VirtualClock()
    script = Script()

    async def slow(state: Item) -> dict[str, int]:
        await clock.sleep(0.05)
        return {"item": state.item, "words": 1}

    plan = [summaries(script.node("summarize", Item, Summary, slow), concurrency=1)]
    config = RunConfig(budget=ExecutionBudget(max_latency_ms=200), policy_map=ONCE)

    result = await simulate(plan, Docs(items=list(range(20))), config=config, clock=clock)

    assert result.status is RunStatus.PARTIAL
    assert 4 <= script.calls["summarize"] <= 5  # 200 ms of 50 ms children, one at a time
    assert "latency" in (result.stop_reason or "")


async def test_a_cost_budget_spent_exactly_by_a_float_sum_is_not_over(
        anyio_backend: str) -> None:
    """Three calls of $0.003 sum to 0.009000000000000001 in floats: at a $0.009 limit, not
    over it (the third failed with "$0.009, over the limit of $0.009"); and $0.0024 of
    $0.003 is the 80% threshold (0.7999999999999999 in floats), where the fallback is
    told."""
    from stroma import NodeContract, stroma_node
    from stroma.cost import FallbackPolicy

    models: list[str | None] = []

    def node(node_id: str, tokens: int = 1_200) -> Any:
        async def ask(state: Item, ctx: dict[str, Any]) -> tuple[dict[str, int], int, str]:
            models.append(ctx.get("_stroma_model"))
            return {"item": state.item + 1}, tokens, "gpt-4o"  # 1,200 x $2.50/1M = $0.003

        contract = NodeContract(node_id=node_id, input_schema=Item, output_schema=Item)
        return stroma_node(node_id, contract)(ask)

    plan = [node("a"), node("b"), node("c")]
    spent = await interpret(plan, Item(item=0), config=RunConfig(
        budget=ExecutionBudget(max_cost_usd=0.009), context={}))
    assert spent.status is RunStatus.COMPLETED, spent.stop_reason

    models.clear()
    told = await interpret([node("d", 960), node("e", 960)], Item(item=0), config=RunConfig(
        budget=ExecutionBudget(max_cost_usd=0.003), context={},
        model_fallbacks=[FallbackPolicy("gpt-4o", "gpt-4o-mini", at_budget_pct=0.8)]))
    assert told.status is RunStatus.COMPLETED
    assert models == [None, "gpt-4o-mini"]  # $0.0024 of $0.003 is 80%


async def test_a_node_that_takes_no_context_is_priced_by_the_model_it_reports(
        anyio_backend: str) -> None:
    """Past the fallback threshold a node without a context parameter is never told the
    fallback, so its calls are priced by the model it reports, alone or as a fan-out
    child (they were priced as the fallback, claude-opus at gpt-4o-mini's rate, and the
    budget never stopped the run)."""
    from stroma.cost import FallbackPolicy, estimate_cost_usd

    script = Script()

    async def opus(state: Item) -> tuple[dict[str, int], int, str]:
        return {"item": state.item + 1}, 1_000, "claude-opus-4-6"

    async def words(state: Item) -> tuple[dict[str, int], int, str]:
        return {"item": state.item, "words": 1}, 1_000, "claude-opus-4-6"

    plan = [script.node("a", Item, Item, opus), script.node("b", Item, Item, opus),
            map_each(script.node("c", Item, Summary, words), over="items", into="summaries",
                     input=Docs)]
    config = RunConfig(
        budget=ExecutionBudget(max_cost_usd=1.0), context={},
        model_fallbacks=[FallbackPolicy("gpt-4o", "gpt-4o-mini", at_budget_pct=0.01)])

    result = await interpret(plan[:2], Item(item=0), config=config)
    assert result.total_cost_usd == pytest.approx(2 * estimate_cost_usd(
        "claude-opus-4-6", 1_000))
    mapped = await interpret([plan[2]], Docs(items=[1, 2]), config=RunConfig(
        budget=ExecutionBudget(max_cost_usd=0.001), context={},
        model_fallbacks=[FallbackPolicy("gpt-4o", "gpt-4o-mini", at_budget_pct=0.0)]))
    assert mapped.total_cost_usd == pytest.approx(2 * estimate_cost_usd(
        "claude-opus-4-6", 1_000))
