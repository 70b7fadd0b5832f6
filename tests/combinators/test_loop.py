"""loop: the body's contract is checked at build, ``until`` is asked (and recorded) after
each iteration, running out is PARTIAL, and retries, timeouts, budgets, hooks, checkpoints,
the trace and resume work inside a loop as outside, each iteration told apart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
from pydantic import BaseModel

import stroma
from interpreters.stores.file import FileStore
from stroma import (
    AsyncInMemoryStore,
    FailureClass,
    FailurePolicy,
    InMemoryStore,
    NodeContext,
    NodeContract,
    NodeHooks,
    PlanError,
    RunConfig,
    RunStatus,
    interpret,
    loop,
    replay,
    seq,
    stroma_node,
)
from stroma import effects as fx
from tests.combinators.agentkit import Agent, Nodes, no_sleep, step

pytestmark = pytest.mark.anyio


def counting(fn: Any) -> Any:
    """A pure predicate that counts the states it was asked about."""
    seen: list[int] = []

    def until(state: Agent) -> bool:
        seen.append(state.n)
        return bool(fn(state))

    until.seen = seen  # type: ignore[attr-defined]
    return until


# ------------------------------------------------------------------------- at build


class Need(BaseModel):
    x: int
    y: int


class Give(BaseModel):
    x: int


def test_a_body_whose_output_does_not_feed_its_input_is_refused_naming_the_fields() -> None:
    """A body that outputs ``Give(x)`` but needs ``Need(x, y)`` is a PlanError when the
    plan is built, naming the loop, the missing field and both schemas, with the fix."""
    contract = NodeContract(node_id="half", input_schema=Need, output_schema=Give)

    @stroma_node("half", contract)
    async def half(s: Need) -> dict[str, int]:
        return {"x": s.x}

    with pytest.raises(PlanError) as info:
        seq(loop(half, until=lambda s: True, max_iterations=3, name="L"))
    message = str(info.value)
    assert message.startswith("L: ")
    assert "'y'" in message and "'x'" not in message
    assert "Give" in message and "Need" in message and "add them to Give" in message


def test_a_plan_body_is_checked_from_its_last_output_to_its_first_input() -> None:
    """In a seq body the last step's output must feed the first step's input."""
    first = NodeContract(node_id="first", input_schema=Need, output_schema=Need)
    last = NodeContract(node_id="last", input_schema=Need, output_schema=Give)

    @stroma_node("first", first)
    async def f(s: Need) -> Need:
        return s

    @stroma_node("last", last)
    async def g(s: Need) -> dict[str, int]:
        return {"x": s.x}

    with pytest.raises(PlanError, match=r"needs 'y'"):
        seq(loop(seq(f, g), until=lambda s: True, max_iterations=2))


async def test_a_loop_that_does_not_fit_is_refused_before_any_node_runs() -> None:
    """Given to interpret unbuilt, the loop is built (and refused) before anything runs."""
    calls: list[str] = []
    contract = NodeContract(node_id="half", input_schema=Need, output_schema=Give)

    @stroma_node("half", contract)
    async def half(s: Need) -> dict[str, int]:
        calls.append("half")
        return {"x": s.x}

    with pytest.raises(PlanError, match=r"feeds its own input"):
        await interpret(loop(half, until=lambda s: True, max_iterations=2), Need(x=1, y=2))
    assert calls == []


@pytest.mark.parametrize("bad", [0, -1, True, "3", 2.5, None])
def test_max_iterations_must_be_a_whole_number_of_at_least_one(bad: Any) -> None:
    """0, negatives, bools, strings, floats and None are refused saying what is expected."""
    nodes = Nodes()
    with pytest.raises(PlanError, match=r"max_iterations=.*expected a whole number >= 1"):
        loop(nodes.node("a"), until=lambda s: True, max_iterations=bad)


def test_max_iterations_is_required() -> None:
    """A loop without max_iterations cannot be made (no unbounded loops)."""
    nodes = Nodes()
    with pytest.raises(TypeError, match="max_iterations"):
        loop(nodes.node("a"), until=lambda s: True)  # type: ignore[call-arg]


def test_until_must_be_a_plain_function() -> None:
    """An async ``until`` or one that is not callable is refused naming the fix."""
    nodes = Nodes()

    async def later(state: Any) -> bool:
        return True

    with pytest.raises(PlanError, match=r"is async.*define it with 'def'"):
        loop(nodes.node("a"), until=later, max_iterations=2)
    with pytest.raises(PlanError, match="expected a function of the state"):
        loop(nodes.node("a"), until=True, max_iterations=2)  # type: ignore[arg-type]


# ------------------------------------------------------------------------- running


async def test_a_step_body_repeats_until_the_predicate_says_done() -> None:
    """``until`` is asked after each iteration, on that iteration's output; the run stops
    at the first True and the body ran exactly that often."""
    nodes = Nodes()
    until = counting(lambda s: s.n >= 3)
    result = await interpret(loop(nodes.node("a"), until=until, max_iterations=10, name="L"),
                             Agent())
    assert result.status is RunStatus.COMPLETED
    assert result.final_state == Agent(n=3, path=["a", "a", "a"])
    assert until.seen == [1, 2, 3]
    assert nodes.calls["a"] == 3


async def test_a_plan_body_runs_its_steps_in_order_every_iteration() -> None:
    """A seq body runs all its steps per iteration; ``until`` sees the state after the last."""
    nodes = Nodes()
    until = counting(lambda s: s.n >= 4)
    plan = loop(seq(nodes.node("think"), nodes.node("act")), until=until, max_iterations=5,
                name="L")
    result = await interpret(plan, Agent())
    assert result.status is RunStatus.COMPLETED
    assert result.final_state.path == ["think", "act", "think", "act"]  # type: ignore[attr-defined]
    assert until.seen == [2, 4]


async def test_every_answer_of_until_is_recorded_in_the_log() -> None:
    """Each iteration's ``until`` is one ChooseBranch record with its answer, False until
    the last."""
    nodes = Nodes()
    result = await interpret(
        loop(nodes.node("a"), until=lambda s: s.n >= 3, max_iterations=5, name="L"), Agent())
    answers = [(e, v) for e, v in result.log.records if isinstance(e, fx.ChooseBranch)]
    assert answers == [(fx.ChooseBranch("L"), fx.BranchChosen(False)),
                       (fx.ChooseBranch("L"), fx.BranchChosen(False)),
                       (fx.ChooseBranch("L"), fx.BranchChosen(True))]


async def test_running_out_of_iterations_is_partial_saying_so() -> None:
    """``until`` never true: the body ran max_iterations times, the run is PARTIAL with a
    stop reason naming the loop and max_iterations, the state the last iteration's."""
    nodes = Nodes()
    result = await interpret(
        loop(nodes.node("a"), until=lambda s: False, max_iterations=4, name="L"), Agent())
    assert result.status is RunStatus.PARTIAL
    assert result.stop_reason is not None
    assert "loop 'L' ran out of iterations" in result.stop_reason
    assert "max_iterations=4" in result.stop_reason
    assert result.final_state == Agent(n=4, path=["a"] * 4)
    assert nodes.calls["a"] == 4


async def test_an_until_that_raises_fails_the_run_naming_the_loop() -> None:
    """An ``until`` that raises is a TERMINAL failure of the loop (FAILED), naming it and
    the error; the body is not run again."""
    nodes = Nodes()

    def broken(state: Agent) -> bool:
        raise KeyError("missing")

    result = await interpret(loop(nodes.node("a"), until=broken, max_iterations=3, name="L"),
                             Agent())
    assert result.status is RunStatus.FAILED
    assert "until function of 'L' raised" in (result.stop_reason or "")
    assert nodes.calls["a"] == 1
    [failure] = result.trace.failures()
    assert failure.node_id == "L" and failure.failure is FailureClass.TERMINAL


async def test_a_loop_after_and_before_other_steps() -> None:
    """Steps before a loop run once, steps after it once, on the loop's last state."""
    nodes = Nodes()
    plan = seq(nodes.node("setup"),
               loop(nodes.node("a"), until=lambda s: s.n >= 3, max_iterations=5, name="L"),
               nodes.node("after"))
    result = await interpret(plan, Agent())
    assert result.final_state.path == ["setup", "a", "a", "after"]  # type: ignore[attr-defined]
    assert [e.iteration for e in result.trace] == [None, 1, 2, None]


# ------------------------------------------------------ reliability inside a loop


async def test_retries_apply_to_each_iteration_afresh() -> None:
    """A node failing its first attempt in every iteration is retried in each (attempts 1
    and 2 per iteration): a policy of one retry is not used up by the first iteration."""
    nodes = Nodes()

    async def flaky(s: Agent, ctx: dict[str, Any]) -> Agent:
        if nodes.calls["flaky"] % 2 == 1:
            raise ValueError("malformed model output")
        return step(s, "flaky")

    config = RunConfig(policy_map={"AMBIGUOUS": FailurePolicy(max_retries=1,
                                                              backoff_seconds=0)})
    plan = loop(nodes.node("flaky", flaky), until=lambda s: s.n >= 3, max_iterations=5,
                name="L")
    result = await interpret(plan, Agent(), config=config, sleep=no_sleep)
    assert result.status is RunStatus.COMPLETED
    assert [(e.iteration, e.attempt, e.failure) for e in result.trace] == [
        (1, 1, FailureClass.AMBIGUOUS), (1, 2, None),
        (2, 1, FailureClass.AMBIGUOUS), (2, 2, None),
        (3, 1, FailureClass.AMBIGUOUS), (3, 2, None),
    ]


async def test_out_of_retries_inside_a_loop_is_partial_at_that_iteration() -> None:
    """A node that always fails in iteration 2 ends the run PARTIAL there, keeping
    iteration 1's state."""
    nodes = Nodes()

    async def second_fails(s: Agent, ctx: dict[str, Any]) -> Agent:
        if s.n >= 1:
            raise TimeoutError("upstream down")
        return step(s, "a")

    config = RunConfig(policy_map={"RECOVERABLE": FailurePolicy(max_retries=2,
                                                                backoff_seconds=0)})
    plan = loop(nodes.node("a", second_fails), until=lambda s: False, max_iterations=5,
                name="L")
    result = await interpret(plan, Agent(), config=config, sleep=no_sleep)
    assert result.status is RunStatus.PARTIAL
    assert result.final_state == Agent(n=1, path=["a"])
    assert [(e.iteration, e.attempt) for e in result.trace.failures()] == [(2, 1), (2, 2), (2, 3)]


async def test_a_node_timeout_inside_a_loop_cancels_that_iteration_and_retries() -> None:
    """A node that hangs in iteration 2 is cancelled by its timeout (a TimeoutError,
    RECOVERABLE), retried, and the loop goes on."""
    nodes = Nodes()

    async def hangs_once(s: Agent, ctx: dict[str, Any]) -> Agent:
        if nodes.calls["slow"] == 2:
            await anyio.sleep_forever()
        return step(s, "slow")

    config = RunConfig(node_timeouts={"slow": 5},
                       policy_map={"RECOVERABLE": FailurePolicy(max_retries=1,
                                                                backoff_seconds=0)})
    plan = loop(nodes.node("slow", hangs_once), until=lambda s: s.n >= 3, max_iterations=5,
                name="L")
    result = await interpret(plan, Agent(), config=config, sleep=no_sleep)
    assert result.status is RunStatus.COMPLETED
    [timed_out] = result.trace.failures()
    assert timed_out.iteration == 2 and timed_out.failure is FailureClass.RECOVERABLE
    assert "timed out after 5 ms" in (timed_out.failure_message or "")
    assert [e.attempt for e in result.trace.events_for("slow", iteration=2)] == [1, 2]


async def test_a_token_budget_spent_mid_loop_stops_the_run_with_the_budget_as_reason() -> None:
    """40 tokens an iteration under a 100-token budget: the third iteration goes over, the
    run stops PARTIAL saying the budget was spent, and no later iteration starts."""
    nodes = Nodes()

    async def spend(s: Agent, ctx: dict[str, Any]) -> Any:
        return step(s, "spend"), 40

    plan = loop(nodes.node("spend", spend), until=lambda s: False, max_iterations=10,
                name="L")
    result = await interpret(plan, Agent(), config=RunConfig(budget={"max_tokens_total": 100}),
                             sleep=no_sleep)
    assert result.status is RunStatus.PARTIAL
    assert "budget spent (tokens 120 of 100)" in (result.stop_reason or "")
    assert nodes.calls["spend"] == 3
    assert {e.iteration for e in result.trace} == {1, 2, 3}
    assert result.final_state == Agent(n=2, path=["spend", "spend"])


async def test_hooks_fire_once_per_iteration_with_the_node_ids() -> None:
    """on_node_start and on_node_success fire for every node of every iteration, in
    order, with the run id, the node id and that iteration's states."""
    nodes = Nodes()
    starts: list[tuple[str, str, int]] = []
    successes: list[tuple[str, int]] = []

    async def on_start(run_id: str, node_id: str, state: dict[str, Any]) -> None:
        starts.append((run_id, node_id, state["n"]))

    async def on_success(run_id: str, node_id: str, state: dict[str, Any], tokens: int) -> None:
        successes.append((node_id, state["n"]))

    config = RunConfig(run_id="hooked", hooks=NodeHooks(on_node_start=on_start,
                                                        on_node_success=on_success))
    plan = loop(seq(nodes.node("think"), nodes.node("act")), until=lambda s: s.n >= 6,
                max_iterations=5, name="L")
    await interpret(plan, Agent(), config=config)
    assert starts == [("hooked", nid, n) for n, nid in
                      enumerate(["think", "act"] * 3)]
    assert successes == [(nid, n + 1) for n, nid in enumerate(["think", "act"] * 3)]


async def test_a_store_loads_the_latest_iterations_checkpoint() -> None:
    """``store.load(run_id, node_id)`` of a node inside a loop is its last iteration's
    output."""
    nodes = Nodes()
    store = InMemoryStore()
    plan = loop(seq(nodes.node("think"), nodes.node("act")), until=lambda s: s.n >= 6,
                max_iterations=5, name="L")
    await interpret(plan, Agent(), store=store, config=RunConfig(run_id="ck"))
    think = store.load("ck", "think")
    assert think is not None and think.model_dump()["n"] == 5
    act = store.load("ck", "act")
    assert act is not None and act.model_dump()["n"] == 6


class KeyedStore:
    """A user's store: one state per (run_id, node_id), nothing else."""

    def __init__(self) -> None:
        self.data: dict[tuple[str, str], BaseModel] = {}
        self.saves: list[tuple[str, str, int]] = []

    def save(self, run_id: str, node_id: str, state: BaseModel) -> None:
        self.saves.append((run_id, node_id, state.model_dump()["n"]))
        self.data[(run_id, node_id)] = state

    def load(self, run_id: str, node_id: str) -> BaseModel | None:
        return self.data.get((run_id, node_id))

    def delete(self, run_id: str) -> None:
        for key in [k for k in self.data if k[0] == run_id]:
            del self.data[key]


async def test_a_custom_store_keyed_by_run_and_node_keeps_working() -> None:
    """A store that knows only (run_id, node_id) is saved every iteration and keeps the
    latest; the run completes as with a built-in store."""
    nodes = Nodes()
    store = KeyedStore()
    plan = loop(nodes.node("a"), until=lambda s: s.n >= 3, max_iterations=5, name="L")
    result = await interpret(plan, Agent(), store=store, config=RunConfig(run_id="mine"))
    assert result.status is RunStatus.COMPLETED
    assert store.saves == [("mine", "a", 1), ("mine", "a", 2), ("mine", "a", 3)]
    assert store.load("mine", "a") == Agent(n=3, path=["a"] * 3)
    assert isinstance(store, stroma.CheckpointStore)


# --------------------------------------------------------------- telling iterations apart


async def test_trace_events_carry_the_iteration() -> None:
    """Each event says its iteration (and ``where``: ``L#2``); ``events_for(node,
    iteration=k)`` keeps that iteration's attempts only."""
    nodes = Nodes()
    plan = loop(seq(nodes.node("think"), nodes.node("act")), until=lambda s: s.n >= 8,
                max_iterations=5, name="L")
    result = await interpret(plan, Agent())
    assert [(e.node_id, e.iteration, e.where) for e in result.trace][:4] == [
        ("think", 1, "L#1"), ("act", 1, "L#1"), ("think", 2, "L#2"), ("act", 2, "L#2")]
    [third] = result.trace.events_for("act", iteration=3)
    assert third.input_state["n"] == 5 and third.output_state == {
        "n": 6, "path": ["think", "act"] * 3, "tool": "", "approval": None}
    assert len(result.trace.events_for("act")) == 4
    assert result.trace.events_for("act", iteration=9) == []
    assert third.to_dict()["coords"] == [["loop", "L", 3]]


async def test_nested_loops_record_every_level() -> None:
    """In a loop inside a loop each event has both coordinates, outermost first, and
    ``iteration`` is the inner one."""
    nodes = Nodes()
    inner = loop(nodes.node("a"), until=lambda s: s.n % 2 == 0, max_iterations=3,
                 name="inner")
    plan = loop(inner, until=lambda s: s.n >= 4, max_iterations=3, name="outer")
    result = await interpret(plan, Agent())
    assert result.status is RunStatus.COMPLETED
    assert [e.coords for e in result.trace] == [
        (("loop", "outer", 1), ("loop", "inner", 1)),
        (("loop", "outer", 1), ("loop", "inner", 2)),
        (("loop", "outer", 2), ("loop", "inner", 1)),
        (("loop", "outer", 2), ("loop", "inner", 2)),
    ]
    assert [e.iteration for e in result.trace] == [1, 2, 1, 2]
    assert result.trace.events[2].where == "outer#2/inner#1"


async def test_diff_names_the_iteration_that_differs() -> None:
    """Two runs that differ only in iteration 2 give one diff line, naming ``L#2``."""

    def build(nodes: Nodes, bump: int) -> Any:
        async def add(s: Agent, ctx: dict[str, Any]) -> Agent:
            extra = bump if s.n == 1 else 0
            return s.model_copy(update={"n": s.n + 1 + extra})

        return loop(nodes.node("add", add), until=lambda s: s.n >= 3, max_iterations=5,
                    name="L")

    one = await interpret(build(Nodes(), 0), Agent())
    other = await interpret(build(Nodes(), 0), Agent())
    assert one.trace.diff(other.trace) == []
    changed = await interpret(build(Nodes(), 10), Agent())
    lines = one.trace.diff(changed.trace)
    assert lines[0].startswith("Difference for add at L#2 attempt 1: output_state:")
    assert "Missing event in other trace: add at L#3 attempt 1" in lines


async def test_a_classifier_is_told_the_iteration_of_the_attempt() -> None:
    """The NodeContext a classifier gets has the attempt's coordinates (its iteration)
    and the call's idempotency key."""
    nodes = Nodes()
    seen: list[NodeContext] = []

    def classifier(exc: Exception, ctx: NodeContext) -> FailureClass | None:
        seen.append(ctx)
        return FailureClass.RECOVERABLE

    async def fails_in_two(s: Agent, ctx: dict[str, Any]) -> Agent:
        if s.n == 1 and nodes.calls["a"] == 2:
            raise RuntimeError("flaky")
        return step(s, "a")

    config = RunConfig(run_id="cls", classifiers=[classifier],
                       policy_map={"RECOVERABLE": FailurePolicy(max_retries=1,
                                                                backoff_seconds=0)})
    plan = loop(nodes.node("a", fails_in_two), until=lambda s: s.n >= 3, max_iterations=5,
                name="L")
    result = await interpret(plan, Agent(), config=config, sleep=no_sleep)
    assert result.status is RunStatus.COMPLETED
    [ctx] = seen
    assert (ctx.node_id, ctx.attempt, ctx.run_id) == ("a", 1, "cls")
    assert ctx.coords == (("loop", "L", 2),)
    second_iteration_keys = {k for nid, k in nodes.keys[1:3]}
    assert second_iteration_keys == {ctx.idempotency_key}


# ----------------------------------------------------------------- replay and resume


async def test_a_loop_replays_without_calling_the_body_or_until() -> None:
    """Replay follows the recorded answers of ``until``: no node runs, ``until`` is not
    asked, and the result is equal."""
    nodes = Nodes()
    until = counting(lambda s: s.n >= 3)
    plan = loop(seq(nodes.node("think"), nodes.node("act")), until=until, max_iterations=4,
                name="L")
    live = await interpret(plan, Agent())
    nodes.replaying = True
    asked = len(until.seen)
    again = await replay(plan, live.log)
    assert again == live
    assert len(until.seen) == asked


class Crash:
    """A loop whose node ``work`` blocks at iteration ``at`` until the run is cancelled."""

    def __init__(self, at: int | None) -> None:
        self.at = at
        self.inside = anyio.Event()
        self.nodes = Nodes()

        async def work(s: Agent, ctx: dict[str, Any]) -> Agent:
            if self.at is not None and s.n // 2 + 1 == self.at:
                self.inside.set()
                await anyio.sleep_forever()
            return step(s, "work")

        self.plan = seq(
            self.nodes.node("setup", lambda s, c: _same(s)),
            loop(seq(self.nodes.node("think"), self.nodes.node("work", work)),
                 until=lambda s: s.n >= 8, max_iterations=6, name="L"),
        )


async def _same(s: Agent) -> Agent:
    return s


async def crash_at(store: Any, run_id: str, at: int) -> Crash:
    first = Crash(at)
    async with anyio.create_task_group() as tg:

        async def run() -> None:
            await interpret(first.plan, Agent(), store=store,
                            config=RunConfig(run_id=run_id, seed=3))
            raise AssertionError("the run was supposed to be cancelled")

        tg.start_soon(run)
        await first.inside.wait()
        tg.cancel_scope.cancel()
    return first


@pytest.mark.parametrize("kind", ["file", "memory"])
async def test_a_run_cancelled_mid_loop_resumes_without_rerunning_earlier_iterations(
    kind: str, tmp_path: Path
) -> None:
    """Cancelled inside iteration 3's ``work``, the run resumed with the same run id ends
    RESUMED equal to an uninterrupted run; only the in-flight call and what follows run."""
    memory = AsyncInMemoryStore()

    def store() -> Any:
        return FileStore(tmp_path / "store") if kind == "file" else memory

    first = await crash_at(store(), "mid", 3)
    assert first.nodes.calls == {"setup": 1, "think": 3, "work": 3}
    second = Crash(None)
    resumed = await interpret(second.plan, Agent(), store=store(),
                              config=RunConfig(run_id="mid"))
    assert resumed.status is RunStatus.RESUMED, resumed.stop_reason
    assert second.nodes.calls == {"work": 2, "think": 1}  # iteration 3's work, then 4
    clean = Crash(None)
    uninterrupted = await interpret(clean.plan, Agent(), config=RunConfig(seed=3))
    assert resumed.final_state == uninterrupted.final_state
    assert resumed.trace.diff(uninterrupted.trace) == []
    assert [e.iteration for e in resumed.trace.events_for("work")] == [1, 2, 3, 4]
    # the in-flight call got the same idempotency key as before the crash
    key_before = first.nodes.keys[-1]
    assert key_before[0] == "work" and second.nodes.keys[0] == key_before
    # and the finished run replays from its log, calling nothing
    second.nodes.replaying = True
    assert await replay(second.plan, resumed.log) == resumed


async def test_a_group_takes_with_retry_and_with_timeout_as_a_plan_does() -> None:
    """``loop(...).with_retry(...)`` is ``seq(loop(...)).with_retry(...)``: a group is a
    plan of one step (before, an AttributeError)."""
    seen: list[int] = []

    class N(BaseModel):
        n: int = 0

    async def work(s: N) -> dict[str, int]:
        seen.append(s.n)
        if len(seen) == 2:
            raise ConnectionError("flaky")
        return {"n": s.n + 1}

    node = stroma_node("work", NodeContract(node_id="work", input_schema=N,
                                            output_schema=N))(work)
    agent = loop(node, until=lambda s: s.n >= 3, max_iterations=5, name="agent")
    plan = agent.with_retry(
        "work", {"AMBIGUOUS": FailurePolicy(max_retries=1, backoff_seconds=0)},
    ).with_timeout("work", 5_000)

    result = await interpret(plan, N())

    assert result.status is RunStatus.COMPLETED and result.final_state == N(n=3)
    assert seen == [0, 1, 1, 2]  # the failed call in iteration 2 was retried
    body = plan.steps[0].body.steps[0]  # type: ignore[attr-defined]
    assert (body.timeout_ms, body.policies) == (5_000, ((FailureClass.AMBIGUOUS, 1, 0.0),))
    with pytest.raises(PlanError, match="no step 'nope'"):
        agent.with_timeout("nope", 10)
    with pytest.raises(PlanError, match=r"'agent' is a loop, route or branch, which takes no "
                       r"retry policy or timeout of its own.*other steps: 'work'"):
        agent.with_retry("agent", {"AMBIGUOUS": FailurePolicy(max_retries=1)})
