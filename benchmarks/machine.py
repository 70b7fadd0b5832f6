"""The pure machine alone: ``advance`` throughput with scripted events, no event loop.

Like h11's bench, this times only the state machine: what it costs to decide a node
(validate its output, record the attempt, emit the checkpoint and the next call), apart
from the interpreter's I/O.
"""

from __future__ import annotations

import statistics
from datetime import UTC, datetime
from time import perf_counter

from benchmarks.overhead import S, make_pipeline
from stroma import effects as fx
from stroma.machine import MachineConfig, advance, start


def main(n: int = 10_000, repeats: int = 5) -> float:
    runner, nodes, _ = make_pipeline(n)
    plan = runner.compile(nodes)
    config = MachineConfig(run_id="bench", seed=1, started_at=datetime.now(UTC))
    now = datetime.now(UTC)
    times = []
    for _ in range(repeats):
        t0 = perf_counter()
        state, effects = start(plan, S(value=0), config)
        value = 0
        while not isinstance(effects[-1], fx.Finish):
            value += 1
            state, effects = advance(state, fx.NodeReturned({"value": value}, now, 0))
        times.append(perf_counter() - t0)
    per = statistics.median(times) / n * 1e6
    print(f"machine: {per:.2f} us per node ({n:,} nodes, {1e6 / per:,.0f} nodes/s), "
          "scripted events, no I/O")
    return per


if __name__ == "__main__":
    main()
