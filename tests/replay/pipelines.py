"""Pipelines shared by the replay tests and the golden-log generator.

Each builder returns a list of nodes or a plan. With ``live=True`` the nodes do their
scripted work; with ``live=False`` they have the same ids and contracts but raise if
called (and so do the loops' ``until`` and the routes' selectors), so a replay that calls
any user code fails loudly. ``SCENARIOS`` says how each is run: its builder and config;
``INITIAL`` and ``INPUTS`` the initial state and the inputs of the scenarios that need
others than ``Num(value=1)`` and none.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
from pydantic import BaseModel

from stroma import NodeContract, await_input, loop, parallel, route, seq, stroma_node
from stroma.failures import FailureClass, FailurePolicy
from stroma.runner import NodeHooks, RunConfig


class Num(BaseModel):
    value: int


class Left(BaseModel):
    left: int


class Right(BaseModel):
    right: int


class Both(BaseModel):
    left: int
    right: int


class Called(AssertionError):
    """A node, classifier or hook ran during a replay."""


def _node(node_id: str, inp: type[BaseModel], out: type[BaseModel], live: bool,
          body: Callable[..., Any]) -> Any:
    contract = NodeContract(node_id=node_id, input_schema=inp, output_schema=out)
    if live:
        return stroma_node(node_id, contract)(body)

    async def forbidden(state: Any) -> Any:
        raise Called(f"node {node_id!r} was called during replay")

    return stroma_node(node_id, contract)(forbidden)


def retries(live: bool) -> list[Any]:
    """A node failing twice (AMBIGUOUS, then RECOVERABLE), then succeeding with usage."""
    seen = {"n": 0}

    async def flaky(s: Num) -> Any:
        seen["n"] += 1
        if seen["n"] == 1:
            raise ValueError("malformed model output")
        if seen["n"] == 2:
            raise TimeoutError("upstream timeout")
        return {"value": s.value + 1}, 120, 30, "gpt-4o-mini"

    async def double(s: Num) -> Any:
        return {"value": s.value * 2}, 50, "claude-haiku-4-5"

    return [_node("flaky", Num, Num, live, flaky), _node("double", Num, Num, live, double)]


def fan_out(live: bool) -> list[Any]:
    """A parallel step whose right child fails once, so the whole group is retried."""
    seen = {"right": 0}

    async def left(s: Num) -> Any:
        await anyio.sleep(0)
        return {"left": s.value + 1}, 10

    async def right(s: Num) -> Any:
        seen["right"] += 1
        if seen["right"] == 1:
            raise TimeoutError("right timed out")
        return {"right": s.value - 1}, 20

    async def total(s: Both) -> Any:
        return {"value": s.left + s.right}

    return [
        parallel(_node("left", Num, Left, live, left), _node("right", Num, Right, live, right)),
        _node("total", Both, Num, live, total),
    ]


def terminal(live: bool) -> list[Any]:
    """The second node returns output that breaks its contract: FAILED at once."""

    async def ok(s: Num) -> Any:
        return {"value": s.value + 1}

    async def broken(s: Num) -> Any:
        return {"value": "not a number"}

    return [_node("ok", Num, Num, live, ok), _node("broken", Num, Num, live, broken)]


def budget(live: bool) -> list[Any]:
    """Three nodes of 60 tokens under a 100-token budget: the second exceeds it."""

    def make() -> Callable[..., Any]:
        async def spend(s: Num) -> Any:
            return {"value": s.value + 1}, 60

        return spend

    return [_node(f"spend{i}", Num, Num, live, make()) for i in range(3)]


def _pure(live: bool, name: str, fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A loop's ``until`` or a route's selector: ``fn``, or one that raises if called."""
    if live:
        return fn

    def forbidden(state: Any) -> Any:
        raise Called(f"{name} was called during replay")

    return forbidden


def loop_(live: bool) -> Any:
    """A loop of two nodes until value >= 7; ``count`` fails once in iteration 2 (retried
    inside the loop); every call reports tokens."""
    seen = {"count": 0}

    async def count(s: Num) -> Any:
        seen["count"] += 1
        if seen["count"] == 2:
            raise TimeoutError("model timed out")
        return {"value": s.value + 1}, 10, 5, "gpt-4o-mini"

    async def double(s: Num) -> Any:
        return {"value": s.value * 2 - 1}, 20

    return loop(seq(_node("count", Num, Num, live, count),
                    _node("double", Num, Num, live, double)),
                until=_pure(live, "until", lambda s: s.value >= 7), max_iterations=5,
                name="agent")


class Tool(BaseModel):
    value: int
    tool: str = ""


def route_(live: bool) -> Any:
    """A ReAct-shaped loop: ``think`` picks a tool, a route runs it (``twice`` is a seq of
    two; an unknown tool goes to the default), until the tool is ``done``."""
    plan_of = ["add", "twice", "unknown", "done"]

    async def think(s: Tool) -> Any:
        return {"value": s.value, "tool": plan_of[min(s.value, 3)]}, 30, "gpt-4o"

    async def add(s: Tool) -> Any:
        return {"value": s.value + 1, "tool": s.tool}

    async def first(s: Tool) -> Any:
        return {"value": s.value, "tool": "first"}

    async def second(s: Tool) -> Any:
        return {"value": s.value + 1, "tool": "second"}

    async def fallback(s: Tool) -> Any:
        return {"value": s.value + 1, "tool": "fallback"}

    async def answer(s: Tool) -> Any:
        return {"value": s.value * 100, "tool": "done"}

    tools = route(
        _pure(live, "selector", lambda s: s.tool),
        {"add": _node("add", Tool, Tool, live, add),
         "twice": seq(_node("first", Tool, Tool, live, first),
                      _node("second", Tool, Tool, live, second)),
         "done": _node("answer", Tool, Tool, live, answer)},
        default=_node("fallback", Tool, Tool, live, fallback), name="tool?",
    )
    return loop(seq(_node("think", Tool, Tool, live, think), tools),
                until=_pure(live, "until", lambda s: s.tool == "done"), max_iterations=6,
                name="react")


class Approval(BaseModel):
    approved: bool
    by: str


class Ask(BaseModel):
    value: int
    approval: Approval | None = None


def wait(live: bool) -> Any:
    """draft, a wait for a person's approval, publish: recorded as a run that ended
    WAITING and was then resumed with the input."""

    async def draft(s: Ask) -> Any:
        return {"value": s.value + 1}, 40, "gpt-4o-mini"

    async def publish(s: Ask) -> Any:
        assert s.approval is not None
        return {"value": s.value * 10, "approval": s.approval.model_dump()}

    return seq(_node("draft", Ask, Ask, live, draft), await_input("approval", Approval),
               _node("publish", Ask, Ask, live, publish))


async def _bad_hook(*args: Any) -> None:
    raise RuntimeError("telemetry backend down")


SCENARIOS: dict[str, tuple[Callable[[bool], Any], Callable[[], RunConfig]]] = {
    "retries": (retries, lambda: RunConfig(
        run_id="golden-retries", seed=7,
        policy_map={FailureClass.AMBIGUOUS: FailurePolicy(max_retries=2, backoff_seconds=0.5),
                    FailureClass.RECOVERABLE: FailurePolicy(max_retries=2, backoff_seconds=2)},
    )),
    "fan_out": (fan_out, lambda: RunConfig(
        run_id="golden-fan-out", seed=11,
        policy_map={FailureClass.RECOVERABLE: FailurePolicy(max_retries=1, backoff_seconds=1)},
    )),
    "terminal": (terminal, lambda: RunConfig(run_id="golden-terminal", seed=3)),
    "budget": (budget, lambda: RunConfig(
        run_id="golden-budget", seed=5,
        budget={"max_tokens_total": 100},  # type: ignore[arg-type]
        policy_map={FailureClass.RECOVERABLE: FailurePolicy(max_retries=2, backoff_seconds=0)},
    )),
    "hook_errors": (retries, lambda: RunConfig(
        run_id="golden-hooks", seed=13,
        hooks=NodeHooks(on_node_start=_bad_hook, on_node_success=_bad_hook,
                        on_node_failure=_bad_hook),
        policy_map={FailureClass.AMBIGUOUS: FailurePolicy(max_retries=2, backoff_seconds=0),
                    FailureClass.RECOVERABLE: FailurePolicy(max_retries=2, backoff_seconds=0)},
    )),
    "loop": (loop_, lambda: RunConfig(
        run_id="golden-loop", seed=17,
        policy_map={FailureClass.RECOVERABLE: FailurePolicy(max_retries=1, backoff_seconds=1)},
    )),
    "route": (route_, lambda: RunConfig(run_id="golden-route", seed=19)),
    "wait": (wait, lambda: RunConfig(run_id="golden-wait", seed=23)),
}
# The scenarios of the version 1 golden logs (tests/golden/v1/, recorded by stroma 0.2).
V1_SCENARIOS = ("budget", "fan_out", "hook_errors", "retries", "terminal")

INITIAL: dict[str, Callable[[], BaseModel]] = {
    "route": lambda: Tool(value=0),
    "wait": lambda: Ask(value=1),
}
# Inputs for a second run of the same run id, after the first ended WAITING.
INPUTS: dict[str, dict[str, Any]] = {
    "wait": {"approval": {"approved": True, "by": "ada"}},
}


def initial(name: str) -> BaseModel:
    """The scenario's initial state."""
    make = INITIAL.get(name)
    return Num(value=1) if make is None else make()


async def record(name: str) -> Any:
    """Run a scenario live (backoff sleeps skipped) and return its result."""
    from stroma.runner import interpret

    build, config = SCENARIOS[name]

    async def no_sleep(seconds: float) -> None:
        return None

    plan = build(True)
    if name not in INPUTS:
        return await interpret(plan, initial(name), config=config(), sleep=no_sleep)
    from stroma import InMemoryStore

    store = InMemoryStore()
    first = await interpret(plan, initial(name), store=store, config=config(), sleep=no_sleep)
    assert str(first.status) == "WAITING", first.stop_reason
    return await interpret(plan, initial(name), store=store, config=config(), sleep=no_sleep,
                           inputs=INPUTS[name])
