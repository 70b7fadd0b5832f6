"""Runner overhead per node against a bare loop doing only the unavoidable work.

A linear pipeline of N trivial nodes (each takes ``S(value: int)`` and returns value + 1)
runs through ``StromaRunner.run`` with the default in-memory store. The baseline, in the
same process, does per node only: validate the input, await the function, validate the
output, serialize the output to JSON. Medians of several runs; the ratio is the figure.
Targets: ratio <= 4 at every N; per-node time at N=10,000 within 1.25x of N=100.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import sys
from time import perf_counter

from pydantic import BaseModel

from stroma import StromaRunner


class S(BaseModel):
    value: int


def make_pipeline(n: int) -> tuple[StromaRunner, list[object], list[object]]:
    runner = StromaRunner.quick()
    nodes = []
    fns = []
    for i in range(n):

        async def step(state: S) -> dict[str, int]:
            return {"value": state.value + 1}

        fns.append(step)
        nodes.append(runner.node(f"n{i}", input=S, output=S)(step))
    return runner, nodes, fns


async def bare(fns: list[object], initial: S) -> S:
    state: BaseModel = initial
    for fn in fns:
        inp = S.model_validate(state)
        raw = await fn(inp)  # type: ignore[operator]
        state = S.model_validate(raw)
        state.model_dump_json()
    return state  # type: ignore[return-value]


def measure(n: int, repeats: int) -> tuple[float, float]:
    runner, nodes, fns = make_pipeline(n)
    initial = S(value=0)
    stroma_times, bare_times = [], []
    for _ in range(repeats):
        gc.collect()
        t0 = perf_counter()
        out = asyncio.run(bare(fns, initial))
        bare_times.append(perf_counter() - t0)
        assert out.value == n
        gc.collect()
        t0 = perf_counter()
        result = asyncio.run(runner.run(nodes, initial))
        stroma_times.append(perf_counter() - t0)
        assert result.final_state.value == n, result.status  # type: ignore[attr-defined]
        del result  # so the next runs do not carry this one's log in the heap
    return statistics.median(stroma_times) / n * 1e6, statistics.median(bare_times) / n * 1e6


def main(argv: list[str] | None = None) -> dict[int, tuple[float, float, float]]:
    sizes = (100, 1_000, 10_000)
    rows: dict[int, tuple[float, float, float]] = {}
    print("runner overhead: microseconds per node (median of runs)")
    print(f"{'N':>8} {'stroma':>10} {'bare':>10} {'ratio':>7}")
    for n in sizes:
        repeats = 15 if n <= 1000 else 5
        s, b = measure(n, repeats)
        rows[n] = (s, b, s / b)
        print(f"{n:>8} {s:>10.2f} {b:>10.2f} {s / b:>7.2f}")
    growth = rows[10_000][0] / rows[100][0]
    print(f"per-node time at N=10,000 / N=100: {growth:.2f} (target <= 1.25)")
    worst = max(r[2] for r in rows.values())
    print(f"worst ratio: {worst:.2f} (target <= 4)")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
