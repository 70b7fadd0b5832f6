"""Real pipelines whose runs the timeline, CLI and UI tests read back.

Each ``*_run`` function runs its pipeline for real with ``interpret`` on the given store
(backoff sleeps skipped) and returns the result; the nodes are made afresh for each run,
so their failure scripts start over. ``crashed_fan_out`` leaves a run cut short inside a
``map_each``: it is cancelled once some children have finished.
"""

from __future__ import annotations

from typing import Any

import anyio
from pydantic import BaseModel

from stroma import NodeContract, stroma_node
from stroma.failures import FailureClass, FailurePolicy
from stroma.plan import await_input, loop, map_each, parallel, route, seq
from stroma.runner import NodeHooks, RunConfig, interpret
from stroma.trace import ExecutionResult


class Num(BaseModel):
    value: int


class Left(BaseModel):
    left: int


class Right(BaseModel):
    right: int


class Both(BaseModel):
    left: int
    right: int


class Urls(BaseModel):
    urls: list[str]


class Url(BaseModel):
    item: str


class Page(BaseModel):
    page: str


class Pages(BaseModel):
    urls: list[str]
    pages: list[Page]


class Draft(BaseModel):
    draft: str


class Polished(BaseModel):
    polished: str


class Tags(BaseModel):
    tags: list[str]


class Report(BaseModel):
    polished: str
    tags: list[str]


def node(node_id: str, inp: type[BaseModel], out: type[BaseModel]) -> Any:
    return stroma_node(node_id, NodeContract(node_id=node_id, input_schema=inp,
                                             output_schema=out))


async def no_sleep(seconds: float) -> None:
    """Backoffs are recorded but not waited for."""


RETRY_POLICY = {
    FailureClass.AMBIGUOUS: FailurePolicy(max_retries=2, backoff_seconds=0.5),
    FailureClass.RECOVERABLE: FailurePolicy(max_retries=2, backoff_seconds=2.0),
}


# -------------------------------------------------------------------- the pipelines


def retries_plan() -> Any:
    """flaky fails twice (AMBIGUOUS, then RECOVERABLE), then returns with usage; double."""
    seen = {"n": 0}

    @node("flaky", Num, Num)
    async def flaky(s: Num) -> Any:
        seen["n"] += 1
        if seen["n"] == 1:
            raise ValueError("malformed model output")
        if seen["n"] == 2:
            raise TimeoutError("upstream timeout")
        return {"value": s.value + 1}, 120, 30, "gpt-4o-mini"

    @node("double", Num, Num)
    async def double(s: Num) -> Any:
        return {"value": s.value * 2}, 50, "claude-haiku-4-5"

    return seq(flaky, double)


def timeout_plan() -> Any:
    """slow outlasts its 10 ms timeout once (it waits for nothing), then returns."""
    seen = {"n": 0}

    @node("slow", Num, Num)
    async def slow(s: Num) -> Any:
        seen["n"] += 1
        if seen["n"] == 1:
            await anyio.Event().wait()  # never set: only the timeout ends it
        return {"value": s.value + 10}

    return seq(slow).with_timeout("slow", 10)


def parallel_plan() -> Any:
    """right fails at once on the first group attempt, which cancels left (waiting)."""
    seen = {"right": 0, "left": 0}

    @node("left", Num, Left)
    async def left(s: Num) -> Any:
        seen["left"] += 1
        if seen["left"] == 1:
            await anyio.Event().wait()  # cancelled when right fails
        return {"left": s.value + 1}, 10

    @node("right", Num, Right)
    async def right(s: Num) -> Any:
        seen["right"] += 1
        if seen["right"] == 1:
            raise ConnectionError("right: connection reset")
        return {"right": s.value - 1}, 20

    @node("total", Both, Num)
    async def total(s: Both) -> Any:
        return {"value": s.left + s.right}

    return parallel(left, right) >> total


def map_plan(fail: str = "b", times: int = 2) -> Any:
    """fetch once per url; the url ``fail`` fails ``times`` times first (fetch retries on
    its own inside the map: it has a policy of its own)."""
    seen: dict[str, int] = {}

    @node("fetch", Url, Page)
    async def fetch(s: Url) -> Any:
        seen[s.item] = seen.get(s.item, 0) + 1
        if s.item == fail and seen[s.item] <= times:
            raise ConnectionError(f"503 from {s.item}")
        return {"page": f"page {s.item}"}, 100, 20, "gpt-4o-mini"

    plan = seq(map_each(fetch, over="urls", into="pages", input=Urls))
    return plan.with_retry("fetch", {FailureClass.AMBIGUOUS: FailurePolicy(
        max_retries=3, backoff_seconds=0.25)})


def subplan_plan() -> Any:
    """A parallel whose first child is a two-node sub-plan (polish fails once)."""
    seen = {"polish": 0}

    @node("draft", Num, Draft)
    async def draft(s: Num) -> Any:
        return {"draft": f"draft {s.value}"}, 300, 40, "gpt-4o"

    @node("polish", Draft, Polished)
    async def polish(s: Draft) -> Any:
        seen["polish"] += 1
        if seen["polish"] == 1:
            raise TimeoutError("polish: model busy")
        return {"polished": s.draft.upper()}

    @node("tag", Num, Tags)
    async def tag(s: Num) -> Any:
        return {"tags": ["a", "b"]}

    return seq(parallel(seq(draft, polish), tag))


def budget_plan() -> Any:
    """Three nodes of 60 tokens under a 100-token budget."""

    def make(i: int) -> Any:
        @node(f"spend{i}", Num, Num)
        async def spend(s: Num) -> Any:
            return {"value": s.value + 1}, 60

        return spend

    return seq(*(make(i) for i in range(3)))


def terminal_plan() -> Any:
    """broken returns output that breaks its contract: TERMINAL, the run FAILED."""

    @node("ok", Num, Num)
    async def ok(s: Num) -> Any:
        return {"value": s.value + 1}

    @node("broken", Num, Num)
    async def broken(s: Num) -> Any:
        return {"value": "not a number"}

    return seq(ok, broken)


async def _bad_hook(*args: Any) -> None:
    raise RuntimeError("telemetry backend down")


# ------------------------------------------------------------------------ the runs


async def run(plan: Any, state: BaseModel, store: Any, run_id: str, **config: Any,
              ) -> ExecutionResult:
    return await interpret(plan, state, store=store,
                           config=RunConfig(run_id=run_id, **config), sleep=no_sleep)


async def retries_run(store: Any, run_id: str = "retries") -> ExecutionResult:
    return await run(retries_plan(), Num(value=1), store, run_id, seed=7,
                     policy_map=RETRY_POLICY)


async def timeout_run(store: Any, run_id: str = "timeout") -> ExecutionResult:
    return await run(timeout_plan(), Num(value=1), store, run_id, policy_map=RETRY_POLICY)


async def parallel_run(store: Any, run_id: str = "parallel") -> ExecutionResult:
    return await run(parallel_plan(), Num(value=5), store, run_id, policy_map=RETRY_POLICY)


async def map_run(store: Any, run_id: str = "map") -> ExecutionResult:
    return await run(map_plan(), Urls(urls=["a", "b", "c"]), store, run_id, seed=3)


async def subplan_run(store: Any, run_id: str = "subplan") -> ExecutionResult:
    return await run(subplan_plan(), Num(value=2), store, run_id, policy_map=RETRY_POLICY)


async def budget_run(store: Any, run_id: str = "budget") -> ExecutionResult:
    return await run(budget_plan(), Num(value=0), store, run_id,
                     budget={"max_tokens_total": 100},
                     policy_map={FailureClass.RECOVERABLE: FailurePolicy(
                         max_retries=2, backoff_seconds=0)})


async def terminal_run(store: Any, run_id: str = "terminal") -> ExecutionResult:
    return await run(terminal_plan(), Num(value=1), store, run_id)


async def hooks_run(store: Any, run_id: str = "hooks") -> ExecutionResult:
    return await run(retries_plan(), Num(value=1), store, run_id, policy_map=RETRY_POLICY,
                     hooks=NodeHooks(on_node_start=_bad_hook, on_node_success=_bad_hook,
                                     on_node_failure=_bad_hook))


CRASH_ITEMS = ["a", "b", "c", "d", "e"]
CRASH_FINISHED = 4  # items a..d finish, e never does


def crash_plan(calls: list[str], gate: anyio.Event | None = None) -> Any:
    """fetch once per url (appending it to ``calls``); every url but the last returns at
    once, the last waits for ``gate`` (None: it returns at once too, as on a resume)."""

    @node("fetch", Url, Page)
    async def fetch(s: Url) -> Any:
        calls.append(s.item)
        if s.item == CRASH_ITEMS[-1] and gate is not None:
            await gate.wait()
        return {"page": f"page {s.item}"}, 100, 20, "gpt-4o-mini"

    return seq(map_each(fetch, over="urls", into="pages", input=Urls))


async def crashed_fan_out(store: Any, run_id: str = "crashed") -> list[str]:
    """Start the map and cancel the run once every child but the last has finished (a
    crash inside the fan-out): the log ends with the finished children. Returns the
    items the nodes were called with."""
    gate = anyio.Event()  # never set
    calls: list[str] = []
    plan = crash_plan(calls, gate)
    async with anyio.create_task_group() as tg:

        async def go() -> None:
            await run(plan, Urls(urls=CRASH_ITEMS), store, run_id)

        tg.start_soon(go)
        with anyio.fail_after(20):
            while True:  # until the finished children are durable
                await anyio.sleep(0.001)
                log = await store.read_log(run_id)
                if log is not None and len(log.pending_children()) == CRASH_FINISHED:
                    break
        tg.cancel_scope.cancel()
    return calls


# Plans for `--plan tests.timeline.pipelines:NAME` (replay calls no node, so these nodes'
# failure scripts never run there).
RETRIES_PLAN = retries_plan()
MAP_PLAN = map_plan()
PARALLEL_PLAN = parallel_plan()


# ------------------------------------------------------------- an agent: loop, route, wait


class Approval(BaseModel):
    ok: bool
    by: str = ""


class Query(BaseModel):
    item: str


class Hit(BaseModel):
    hit: str


class Agent(BaseModel):
    todo: list[str]
    done: list[str] = []
    tool: str = ""
    queries: list[str] = []
    hits: list[Hit] = []
    approval: Approval | None = None


AGENT_LOOP = "agent"
AGENT_MAP = "map_each(lookup, over=queries, into=hits)"
AGENT_WAIT = "await_input(approval)"
AGENT_KEY = "approval@agent#3"  # the wait is in iteration 3


def agent_plan() -> Any:
    """A loop of think and a route to a tool: iteration 1 works (work fails once, then
    succeeds), iteration 2 searches (a map_each of two lookups), iteration 3 waits for an
    approval and ships; the loop's until is true once it has shipped."""
    seen = {"work": 0}

    @node("think", Agent, Agent)
    async def think(s: Agent) -> Any:
        tool = "work" if s.todo else ("search" if not s.hits else "ship")
        return s.model_copy(update={"tool": tool, "queries": ["x", "y"]}), 10, 5, "gpt-4o"

    @node("work", Agent, Agent)
    async def work(s: Agent) -> Any:
        seen["work"] += 1
        if seen["work"] == 1:
            raise ConnectionError("tool reset")
        return s.model_copy(update={"todo": s.todo[1:], "done": [*s.done, s.todo[0]]})

    @node("lookup", Query, Hit)
    async def lookup(s: Query) -> Any:
        return {"hit": s.item.upper()}

    @node("ship", Agent, Agent)
    async def ship(s: Agent) -> Any:
        ok = s.approval is not None and s.approval.ok
        return s.model_copy(update={"done": [*s.done, "shipped" if ok else "refused"]})

    return seq(loop(
        seq(think, route(lambda s: s.tool, {
            "work": work,
            "search": map_each(lookup, over="queries", into="hits"),
            "ship": seq(await_input("approval", Approval), ship),
        }, name="pick")),
        until=lambda s: bool(s.done) and s.done[-1] in ("shipped", "refused"),
        max_iterations=5, name=AGENT_LOOP,
    )).with_retry("work", {FailureClass.AMBIGUOUS: FailurePolicy(max_retries=2,
                                                                 backoff_seconds=0.5)})


AGENT_START = Agent(todo=["a"])


async def agent_run(store: Any, run_id: str = "agent") -> ExecutionResult:
    """The agent up to its wait: the run ends WAITING for AGENT_KEY."""
    return await run(agent_plan(), AGENT_START, store, run_id, seed=5)


async def agent_resumed(store: Any, run_id: str = "agent") -> ExecutionResult:
    """The WAITING agent run again with the same run id (after its input was sent)."""
    return await run(agent_plan(), AGENT_START, store, run_id, seed=5)


AGENT_PLAN = agent_plan()
