"""Replay speed and memory: a 10,000-node run live on the memory store, then replayed
from its effect log (no node called), the log taken from memory, from its JSON-lines text
(parsing included) and from a FileStore (reading included); for a plain chain and for a
run with retries (every tenth node fails once), a budget and two hooks. And the memory
runs of growing length keep.

Targets: replay at least 10x faster than the live run from every source; the log and the
trace grow linearly with the run (memory per node about the same at every N).
"""

from __future__ import annotations

import gc
import shutil
import statistics
import tempfile
import tracemalloc
from time import perf_counter
from typing import Any

import anyio

from benchmarks.overhead import BUDGET, HOOKS, S, make_pipeline
from stroma import FileStore, StromaRunner
from stroma.failures import FailureClass, FailurePolicy
from stroma.plan import Plan
from stroma.runner import RunConfig, interpret, replay

SOURCES = ("memory", "JSON-lines text", "FileStore")


def _flaky_pipeline(n: int) -> Plan:
    """N nodes adding one; every tenth fails once (a ValueError: AMBIGUOUS, retried)."""
    runner = StromaRunner.quick()
    failed: set[int] = set()
    nodes = []

    def make(i: int) -> Any:
        async def step(state: S) -> dict[str, int]:
            if i % 10 == 0 and i not in failed:
                failed.add(i)
                raise ValueError(f"flaky {i}")
            return {"value": state.value + 1}
        return step

    for i in range(n):
        nodes.append(runner.node(f"n{i}", input=S, output=S)(make(i)))
    return runner.compile(nodes)


def _config(busy: bool) -> RunConfig:
    if not busy:
        return RunConfig()
    return RunConfig(budget=BUDGET, hooks=HOOKS, policy_map={
        FailureClass.AMBIGUOUS: FailurePolicy(max_retries=1, backoff_seconds=0.0)})


async def _live_then_replays(plan: Plan, config: RunConfig, folder: str,
                             ) -> tuple[float, dict[str, float], Any]:
    store = FileStore(folder)
    t0 = perf_counter()
    result = await interpret(plan, S(value=0), config=config)
    live = perf_counter() - t0
    text = result.log.to_jsonl()
    # The same run into a FileStore, so its log can be read back from disk.
    await interpret(plan, S(value=0), store=store,
                    config=config.model_copy(update={"run_id": "replayed"}))
    times: dict[str, float] = {}
    for source in SOURCES:
        gc.collect()
        t0 = perf_counter()
        if source == "memory":
            again = await replay(plan, result.log)
        elif source == "JSON-lines text":
            again = await replay(plan, text)
        else:
            again = await replay(plan, await FileStore(folder).read_log("replayed"))
        times[source] = perf_counter() - t0
        assert again.final_state == result.final_state and again.status == result.status
        del again
    assert result.final_state.value == len(plan.program), result.status  # ran to the end
    return live, times, result.status


def speed(n: int = 10_000, repeats: int = 3, *, busy: bool = False,
          ) -> tuple[float, dict[str, float]]:
    """Live microseconds per node (memory store) and, per source, replay's."""
    live_t: list[float] = []
    replay_t: dict[str, list[float]] = {source: [] for source in SOURCES}
    for _ in range(repeats):
        plan = _flaky_pipeline(n) if busy else make_pipeline(n)[0].compile(make_pipeline(n)[1])
        folder = tempfile.mkdtemp(prefix="stroma-replay-bench-")
        try:
            gc.collect()
            live, times, _ = anyio.run(_live_then_replays, plan, _config(busy), folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        live_t.append(live)
        for source, t in times.items():
            replay_t[source].append(t)
    return (statistics.median(live_t) / n * 1e6,
            {s: statistics.median(t) / n * 1e6 for s, t in replay_t.items()})


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


def main(argv: list[str] | None = None) -> dict[str, object]:
    n = int(argv[0]) if argv else 10_000
    print(f"replay of a {n:,}-node log vs the same run live (memory store), us/node; "
          "target: replay >= 10x faster")
    figures: dict[str, object] = {}
    for busy, what in ((False, "plain chain"), (True, "retries, budget, hooks")):
        live, reps = speed(n, busy=busy)
        print(f"  {what}: live {live:.2f}")
        for source, rep in reps.items():
            ratio = live / rep
            how = f"{ratio:.1f}x faster" if ratio >= 1 else f"{1 / ratio:.1f}x slower"
            print(f"    replay from {source:<16} {rep:>7.2f}: {how}")
        figures[what] = {"live_us": live, **{s: live / r for s, r in reps.items()}}
    mem = memory()
    print("memory of a run per node: peak while running; kept by the finished run (result "
          "and log), and with its trace read (target: kept <= 0.6 KiB)")
    for n, (peak, kept, traced) in mem.items():
        print(f"  N={n:>6}: peak {peak / 1024:.2f} KiB, kept {kept / 1024:.2f} KiB, "
              f"with the trace read {traced / 1024:.2f} KiB")
    sizes = sorted(mem)
    growth = mem[sizes[-1]][0] / mem[sizes[0]][0]
    print(f"  peak per node at N={sizes[-1]} / N={sizes[0]}: {growth:.2f} (linear: ~1)")
    figures["memory"] = mem
    return figures


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
