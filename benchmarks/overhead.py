"""Runner overhead per node in every configuration, against a floor doing the same
unavoidable work in the same process.

A linear pipeline of N trivial nodes (each takes ``S(value: int)`` and returns value + 1)
runs through ``interpret``. Each configuration's floor does, per node, only what that
configuration cannot avoid:

* every floor: validate the input, await the function, validate the output, serialize the
  output to JSON (the checkpoint);
* budget: add up tokens, cost and latency and compare them with the limits;
* hooks: await the same two async hooks (start with the input dict, success with the
  output dict and the tokens);
* async store: await ``AsyncInMemoryStore.save`` of the output;
* fallback: work out whether the fallback applies (spend against the cost limit);
* timeouts: enter one ``anyio.fail_after`` per node around the call.

Medians of several runs; the ratio is the figure. Targets: ratio <= 2.0 at N = 100, 1,000
and 10,000 in every configuration; per-node time at N = 10,000 within 1.25x of N = 100.
"""

from __future__ import annotations

import gc
import statistics
import sys
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import Any

import anyio
from pydantic import BaseModel

from stroma import AsyncInMemoryStore, NodeHooks
from stroma.cost import ExecutionBudget, FallbackPolicy
from stroma.plan import Plan, compile_plan
from stroma.runner import RunConfig, StromaRunner, interpret


class S(BaseModel):
    value: int


def make_pipeline(n: int) -> tuple[StromaRunner, list[object], list[object]]:
    """A runner and N nodes adding one (also the bare functions, for a floor)."""
    runner = StromaRunner.quick()
    nodes = []
    fns = []
    for i in range(n):

        async def step(state: S) -> dict[str, int]:
            return {"value": state.value + 1}

        fns.append(step)
        nodes.append(runner.node(f"n{i}", input=S, output=S)(step))
    return runner, nodes, fns


async def _on_start(run_id: str, node_id: str, state: dict[str, Any]) -> None:
    return None


async def _on_success(run_id: str, node_id: str, state: dict[str, Any], tokens: int) -> None:
    return None


HOOKS = NodeHooks(on_node_start=_on_start, on_node_success=_on_success)
BUDGET = ExecutionBudget(max_tokens_total=10**12, max_cost_usd=10.0**9, max_latency_ms=10**12)
FALLBACK = FallbackPolicy("gpt-4o", "gpt-4o-mini", at_budget_pct=0.99)
TIMEOUT_MS = 60_000


class Config:
    """One configuration: how stroma is set up, and its floor."""

    def __init__(self, name: str, *, config: Callable[[], RunConfig],
                 store: Callable[[], Any] | None = None, plan: Callable[[Plan], Plan] | None = None,
                 floor: Callable[..., Awaitable[S]]) -> None:
        self.name = name
        self.config = config
        self.store = store
        self.plan = plan
        self.floor = floor


async def bare(fns: list[Any], initial: S) -> S:
    state: BaseModel = initial
    for fn in fns:
        inp = S.model_validate(state)
        raw = await fn(inp)
        state = S.model_validate(raw)
        state.model_dump_json()
    return state  # type: ignore[return-value]


async def bare_budget(fns: list[Any], initial: S) -> S:
    state: BaseModel = initial
    tokens, cost, latency = 0, 0.0, 0
    limits = (BUDGET.max_tokens_total, BUDGET.max_cost_usd, BUDGET.max_latency_ms)
    for fn in fns:
        inp = S.model_validate(state)
        t0 = perf_counter()
        raw = await fn(inp)
        latency += int((perf_counter() - t0) * 1000)
        state = S.model_validate(raw)
        state.model_dump_json()
        if tokens > limits[0] or cost > limits[1] or latency > limits[2]:
            raise AssertionError("over budget")
    return state  # type: ignore[return-value]


async def bare_hooks(fns: list[Any], initial: S) -> S:
    state: BaseModel = initial
    for i, fn in enumerate(fns):
        inp = S.model_validate(state)
        await _on_start("run", f"n{i}", inp.model_dump())
        raw = await fn(inp)
        state = S.model_validate(raw)
        state.model_dump_json()
        await _on_success("run", f"n{i}", state.model_dump(), 0)
    return state  # type: ignore[return-value]


async def bare_async_store(fns: list[Any], initial: S) -> S:
    store = AsyncInMemoryStore()
    state: BaseModel = initial
    for i, fn in enumerate(fns):
        inp = S.model_validate(state)
        raw = await fn(inp)
        state = S.model_validate(raw)
        await store.save("run", f"n{i}", state)
    return state  # type: ignore[return-value]


async def bare_fallback(fns: list[Any], initial: S) -> S:
    state: BaseModel = initial
    spent, limit = 0.0, BUDGET.max_cost_usd
    assert limit is not None
    for fn in fns:
        inp = S.model_validate(state)
        if spent / limit >= FALLBACK.at_budget_pct:
            raise AssertionError("fell back")
        raw = await fn(inp)
        state = S.model_validate(raw)
        state.model_dump_json()
    return state  # type: ignore[return-value]


async def bare_timeouts(fns: list[Any], initial: S) -> S:
    state: BaseModel = initial
    for fn in fns:
        inp = S.model_validate(state)
        with anyio.fail_after(TIMEOUT_MS / 1000):
            raw = await fn(inp)
        state = S.model_validate(raw)
        state.model_dump_json()
    return state  # type: ignore[return-value]


CONFIGS = (
    Config("plain", config=RunConfig, floor=bare),
    Config("budget", config=lambda: RunConfig(budget=BUDGET), floor=bare_budget),
    Config("two async hooks", config=lambda: RunConfig(hooks=HOOKS), floor=bare_hooks),
    Config("async store", config=RunConfig, store=AsyncInMemoryStore, floor=bare_async_store),
    Config("model fallback", config=lambda: RunConfig(
        budget=BUDGET, model_fallbacks=[FALLBACK], context={"model": "gpt-4o"}),
        floor=bare_fallback),
    Config("node timeouts", config=RunConfig,
           plan=lambda p: _with_timeouts(p), floor=bare_timeouts),
)


def _with_timeouts(plan: Plan) -> Plan:
    for node in list(plan.nodes()):
        plan = plan.with_timeout(node.node_id, TIMEOUT_MS)
    return plan


def measure(config: Config, n: int, repeats: int) -> tuple[float, float]:
    """Median microseconds per node: stroma, and the floor."""
    _, nodes, fns = make_pipeline(n)
    plan = compile_plan(nodes)
    if config.plan is not None:
        plan = config.plan(plan)
    initial = S(value=0)
    stroma_times, floor_times = [], []
    for _ in range(repeats):
        gc.collect()
        t0 = perf_counter()
        out = anyio.run(config.floor, fns, initial)
        floor_times.append(perf_counter() - t0)
        assert out.value == n
        store = config.store() if config.store is not None else None
        run_config = config.config()
        gc.collect()
        t0 = perf_counter()
        result = anyio.run(_interpret, plan, initial, store, run_config)
        stroma_times.append(perf_counter() - t0)
        assert result.final_state.value == n, result.status  # type: ignore[attr-defined]
        del result, store  # so the next runs do not carry this one's log in the heap
    return (statistics.median(stroma_times) / n * 1e6,
            statistics.median(floor_times) / n * 1e6)


async def _interpret(plan: Plan, initial: S, store: Any, config: RunConfig) -> Any:
    return await interpret(plan, initial, store=store, config=config)


SIZES = (100, 1_000, 10_000)


def main(argv: list[str] | None = None) -> dict[str, dict[int, tuple[float, float, float]]]:
    names = set(argv or ()) or {c.name for c in CONFIGS}
    table: dict[str, dict[int, tuple[float, float, float]]] = {}
    print("runner overhead: microseconds per node (median of runs), ratio to the floor")
    print(f"{'configuration':<16} {'N':>7} {'stroma':>9} {'floor':>9} {'ratio':>6}")
    for config in CONFIGS:
        if config.name not in names:
            continue
        rows: dict[int, tuple[float, float, float]] = {}
        for n in SIZES:
            repeats = 15 if n <= 1000 else 5
            s, b = measure(config, n, repeats)
            rows[n] = (s, b, s / b)
            print(f"{config.name:<16} {n:>7} {s:>9.2f} {b:>9.2f} {s / b:>6.2f}")
        growth = rows[10_000][0] / rows[100][0]
        print(f"{config.name:<16} per-node time at N=10,000 / N=100: {growth:.2f} "
              "(target <= 1.25)")
        table[config.name] = rows
    worst = max(r[2] for rows in table.values() for r in rows.values())
    print(f"worst ratio: {worst:.2f} (target <= 2.0)")
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
