"""Fan-out overhead per child against a bare anyio task group with a CapacityLimiter.

A ``map_each`` over 1,000 items with ``max_concurrency=50`` runs through ``interpret`` on
the default in-memory store. The baseline, in the same process, runs the same node
function for each item in an anyio task group, at most 50 at once through a
``CapacityLimiter``, doing per child only: validate the input, await the function,
validate the output (and collect the outputs in item order). Medians of several runs;
the ratio is the figure. Target: ratio <= 3.

Run: ``python -m benchmarks.fanout [--backend trio] [--children N] [--repeats K]``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
from time import perf_counter
from typing import Any

import anyio
from pydantic import BaseModel

from stroma import NodeContract, stroma_node
from stroma.plan import Plan, map_each, seq
from stroma.runner import RunConfig, interpret

CHILDREN = 1_000
LIMIT = 50


class Batch(BaseModel):
    items: list[int]


class Item(BaseModel):
    item: int


class Result(BaseModel):
    value: int


async def work(inp: Item) -> dict[str, int]:
    """The node: trivial, with one checkpoint, like an awaited call that answers at once."""
    await anyio.sleep(0)
    return {"value": inp.item * 2}


def make_plan() -> Plan:
    node = stroma_node("work", NodeContract(node_id="work", input_schema=Item,
                                            output_schema=Result))(work)
    return seq(map_each(node, over="items", into="results", max_concurrency=LIMIT,
                        input=Batch))


async def bare(batch: Batch) -> list[Result]:
    """Only the unavoidable work per child, on a task group with a capacity limiter."""
    limiter = anyio.CapacityLimiter(LIMIT)
    out: list[Any] = [None] * len(batch.items)

    async def child(i: int, raw: int) -> None:
        async with limiter:
            inp = Item.model_validate({"item": raw})
            out[i] = Result.model_validate(await work(inp))

    async with anyio.create_task_group() as tg:
        for i, raw in enumerate(batch.items):
            tg.start_soon(child, i, raw)
    return out


async def timed(n: int, repeats: int) -> tuple[float, float]:
    plan = make_plan()
    batch = Batch(items=list(range(n)))
    config = RunConfig(seed=1)
    stroma_times: list[float] = []
    bare_times: list[float] = []
    for _ in range(repeats):
        gc.collect()
        t0 = perf_counter()
        outs = await bare(batch)
        bare_times.append(perf_counter() - t0)
        assert outs[-1].value == 2 * (n - 1)
        gc.collect()
        t0 = perf_counter()
        result = await interpret(plan, batch, config=config)
        stroma_times.append(perf_counter() - t0)
        assert result.final_state.results[-1].value == 2 * (n - 1), result.status  # type: ignore[attr-defined]
    return statistics.median(stroma_times) / n * 1e6, statistics.median(bare_times) / n * 1e6


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Print the table and return ``{"stroma_us", "bare_us", "ratio", "children",
    "max_concurrency"}``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="asyncio", choices=("asyncio", "trio"))
    parser.add_argument("--children", type=int, default=CHILDREN)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    s, b = anyio.run(timed, args.children, args.repeats, backend=args.backend)
    print(f"fan-out overhead: {args.children} children, max_concurrency={LIMIT}, "
          f"{args.backend}, median of {args.repeats} runs")
    print(f"{'':>24} {'us/child':>10}")
    print(f"{'stroma map_each':>24} {s:>10.2f}")
    print(f"{'bare task group':>24} {b:>10.2f}")
    print(f"{'ratio':>24} {s / b:>10.2f}  (target <= 3)")
    return {"stroma_us": s, "bare_us": b, "ratio": s / b, "children": args.children,
            "max_concurrency": LIMIT}


if __name__ == "__main__":
    main(sys.argv[1:])
