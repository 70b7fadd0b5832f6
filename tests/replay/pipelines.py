"""Pipelines shared by the replay tests and the golden-log generator.

Each builder returns a list of nodes. With ``live=True`` the nodes do their scripted
work; with ``live=False`` they have the same ids and contracts but raise if called, so
a replay that calls any node fails loudly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
from pydantic import BaseModel

from stroma import NodeContract, parallel, stroma_node
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


async def _bad_hook(*args: Any) -> None:
    raise RuntimeError("telemetry backend down")


SCENARIOS: dict[str, tuple[Callable[[bool], list[Any]], Callable[[], RunConfig]]] = {
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
}


async def record(name: str) -> Any:
    """Run a scenario live (backoff sleeps skipped) and return its result."""
    from stroma.runner import interpret

    build, config = SCENARIOS[name]

    async def no_sleep(seconds: float) -> None:
        return None

    return await interpret(build(True), Num(value=1), config=config(), sleep=no_sleep)
