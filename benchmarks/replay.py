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


def memory(sizes: tuple[int, ...] = (1_000, 10_000)) -> dict[int, tuple[float, float, float]]:
    """Bytes per node of a run at each N: the peak while it runs, what the finished run
    keeps (result and log; the trace not read yet), and what it keeps once its trace is
    read (folded from the log on first read)."""
    anyio.run(interpret, make_pipeline(3)[0].compile(make_pipeline(3)[1]), S(value=0))
    out: dict[int, tuple[float, float, float]] = {}
    for n in sizes:
        runner, nodes, _ = make_pipeline(n)
        plan = runner.compile(nodes)
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        result = anyio.run(interpret, plan, S(value=0))
        gc.collect()
        kept, peak = tracemalloc.get_traced_memory()
        assert len(result.trace) == n  # the trace folded, kept alive with the log
        gc.collect()
        with_trace = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        out[n] = ((peak - base) / n, (kept - base) / n, (with_trace - base) / n)
        del result
    return out


def main() -> dict[str, object]:
    live, rep, ratio = speed()
    print("replay of a 10,000-node log vs the same run live (memory store)")
    print(f"  live {live:.2f} us/node, replay {rep:.2f} us/node: replay {ratio:.1f}x faster "
          "(target >= 10x)")
    mem = memory()
    print("memory of a run per node: peak while running; kept by the finished run (result "
          "and log), and with its trace read (target: kept <= 0.6 KiB)")
    for n, (peak, kept, traced) in mem.items():
        print(f"  N={n:>6}: peak {peak / 1024:.2f} KiB, kept {kept / 1024:.2f} KiB, "
              f"with the trace read {traced / 1024:.2f} KiB")
    sizes = sorted(mem)
    growth = mem[sizes[-1]][0] / mem[sizes[0]][0]
    print(f"  peak per node at N={sizes[-1]} / N={sizes[0]}: {growth:.2f} (linear: ~1)")
    return {"live_us": live, "replay_us": rep, "ratio": ratio, "memory": mem}


if __name__ == "__main__":
    main()
