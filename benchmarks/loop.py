"""Per-iteration overhead of ``loop``, against a bare ``while`` loop doing the same
unavoidable work in the same process.

The plan is ``loop(step, until=lambda s: s.value >= N, max_iterations=N)`` where ``step``
adds one to ``S(value: int)``; it runs N iterations. The floor, per iteration: validate the
input, await the function, validate the output, serialize it to JSON (the checkpoint) and
evaluate the same ``until`` predicate. Configurations: plain, a budget set, two async hooks,
an async store. Medians of several runs; the ratio is the figure. Target (issue 12): ratio
<= 2.0, per-iteration time flat in N (10,000 within 1.25x of 10).
"""

from __future__ import annotations

import gc
import statistics
import sys
from collections.abc import Callable
from time import perf_counter
from typing import Any

import anyio

from benchmarks.overhead import BUDGET, HOOKS, S, _on_start, _on_success
from stroma import AsyncInMemoryStore, loop
from stroma.plan import Plan, compile_plan
from stroma.runner import RunConfig, StromaRunner, interpret


def make_loop(n: int) -> tuple[Plan, Any, Callable[[S], bool]]:
    runner = StromaRunner.quick()

    async def step(state: S) -> dict[str, int]:
        return {"value": state.value + 1}

    def until(state: S) -> bool:
        return state.value >= n

    node = runner.node("step", input=S, output=S)(step)
    return compile_plan([loop(node, until=until, max_iterations=n, name="agent")]), step, until


async def bare(fn: Any, until: Callable[[S], bool], initial: S, hooks: bool,
               store: Any) -> S:
    state = initial
    while True:
        inp = S.model_validate(state)
        if hooks:
            await _on_start("run", "step", inp.model_dump())
        raw = await fn(inp)
        state = S.model_validate(raw)
        if store is not None:
            await store.save("run", "step", state)
        else:
            state.model_dump_json()
        if hooks:
            await _on_success("run", "step", state.model_dump(), 0)
        if until(state):
            return state


CONFIGS: tuple[tuple[str, Callable[[], RunConfig], Callable[[], Any] | None, bool], ...] = (
    ("plain", RunConfig, None, False),
    ("budget", lambda: RunConfig(budget=BUDGET), None, False),
    ("two async hooks", lambda: RunConfig(hooks=HOOKS), None, True),
    ("async store", RunConfig, AsyncInMemoryStore, False),
)


async def _interpret(plan: Plan, initial: S, store: Any, config: RunConfig) -> Any:
    return await interpret(plan, initial, store=store, config=config)


def measure(name: str, n: int, repeats: int) -> tuple[float, float]:
    """Median microseconds per iteration: stroma, and the floor."""
    _, make_config, make_store, hooks = next(c for c in CONFIGS if c[0] == name)
    plan, fn, until = make_loop(n)
    initial = S(value=0)
    ours, floor = [], []
    for _ in range(repeats):
        gc.collect()
        t0 = perf_counter()
        out = anyio.run(bare, fn, until, initial, hooks,
                        make_store() if make_store is not None else None)
        floor.append(perf_counter() - t0)
        assert out.value == n
        store = make_store() if make_store is not None else None
        config = make_config()
        gc.collect()
        t0 = perf_counter()
        result = anyio.run(_interpret, plan, initial, store, config)
        ours.append(perf_counter() - t0)
        assert result.final_state.value == n, (result.status, result.stop_reason)
        del result, store
    return statistics.median(ours) / n * 1e6, statistics.median(floor) / n * 1e6


SIZES = (10, 1_000, 10_000)


def main(argv: list[str] | None = None) -> dict[str, dict[int, float]]:
    names = set(argv or ()) or {c[0] for c in CONFIGS}
    print("loop overhead: microseconds per iteration (median of runs), ratio to a bare "
          "while loop")
    print(f"{'configuration':<16} {'iterations':>10} {'stroma':>9} {'floor':>9} {'ratio':>6}")
    table: dict[str, dict[int, float]] = {}
    for name, *_ in CONFIGS:
        if name not in names:
            continue
        rows: dict[int, tuple[float, float]] = {}
        for n in SIZES:
            repeats = 41 if n <= 10 else (11 if n <= 1000 else 5)
            rows[n] = measure(name, n, repeats)
            s, b = rows[n]
            print(f"{name:<16} {n:>10} {s:>9.2f} {b:>9.2f} {s / b:>6.2f}")
        growth = rows[10_000][0] / rows[1_000][0]
        print(f"{name:<16} per-iteration time at 10,000 / 1,000: {growth:.2f} "
              "(target <= 1.25)")
        table[name] = {n: s / b for n, (s, b) in rows.items()}
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
