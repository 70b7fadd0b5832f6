"""Replay speed and memory: a 10,000-node run live on the memory store, then replayed
from its effect log (no node called); and the peak memory of runs of growing length.

Targets: replay at least 10x faster than the live run; the log and the trace grow
linearly with the run (memory per node about the same at every N).
"""

from __future__ import annotations

import gc
import statistics
import tracemalloc
from time import perf_counter

import anyio

from benchmarks.overhead import S, make_pipeline
from stroma.runner import interpret, replay


def speed(n: int = 10_000, repeats: int = 3) -> tuple[float, float, float]:
    runner, nodes, _ = make_pipeline(n)
    plan = runner.compile(nodes)
    live_t, replay_t = [], []
    for _ in range(repeats):
        gc.collect()
        t0 = perf_counter()
        result = anyio.run(interpret, plan, S(value=0))
        live_t.append(perf_counter() - t0)
        gc.collect()
        t0 = perf_counter()
        again = anyio.run(replay, plan, result.log)
        replay_t.append(perf_counter() - t0)
        assert again.final_state == result.final_state and again.status == result.status
        del result, again  # keep the heap the same size for every run
    live = statistics.median(live_t) / n * 1e6
    rep = statistics.median(replay_t) / n * 1e6
    return live, rep, live / rep


def memory(sizes: tuple[int, ...] = (1_000, 10_000)) -> dict[int, float]:
    """Peak bytes per node of a run (result, log and trace kept), at each N."""
    out: dict[int, float] = {}
    for n in sizes:
        runner, nodes, _ = make_pipeline(n)
        plan = runner.compile(nodes)
        gc.collect()
        tracemalloc.start()
        result = anyio.run(interpret, plan, S(value=0))
        assert len(result.trace) == n  # the trace folded, kept alive with the log
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        out[n] = peak / n
        del result
    return out


def main() -> dict[str, object]:
    live, rep, ratio = speed()
    print("replay of a 10,000-node log vs the same run live (memory store)")
    print(f"  live {live:.2f} us/node, replay {rep:.2f} us/node: replay {ratio:.1f}x faster "
          "(target >= 10x)")
    mem = memory()
    print("peak memory of a run (result, effect log and trace kept)")
    for n, per in mem.items():
        print(f"  N={n:>6}: {per / 1024:.2f} KiB per node, {per * n / 2**20:.1f} MiB in all")
    sizes = sorted(mem)
    growth = mem[sizes[-1]] / mem[sizes[0]]
    print(f"  per-node memory at N={sizes[-1]} / N={sizes[0]}: {growth:.2f} (linear: ~1)")
    return {"live_us": live, "replay_us": rep, "ratio": ratio, "memory": mem}


if __name__ == "__main__":
    main()
