"""FileStore per-node cost beside a bare loop doing one append + fsync per node.

The pipeline of ``overhead.py`` (N trivial nodes) runs through ``interpret`` on a
``FileStore``; the baseline, in the same process, does per node the unavoidable work of
an async program that makes each node durable: the node's work (validate, await,
validate, serialize) and one append + fsync of the output, off the event loop through
the same thread hop the store uses. Medians of several runs; target ratio <= 1.5 at
N = 1,000.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
from time import perf_counter
from typing import Any

import anyio
import anyio.to_thread
from pydantic import BaseModel

from benchmarks.overhead import S, make_pipeline
from interpreters.stores.file import FileStore
from stroma.runner import RunConfig, interpret


async def bare(fns: list[Any], initial: S, path: str) -> S:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def append(data: bytes) -> None:
        os.write(fd, data)
        os.fsync(fd)

    try:
        state: BaseModel = initial
        for fn in fns:
            inp = S.model_validate(state)
            raw = await fn(inp)
            state = S.model_validate(raw)
            await anyio.to_thread.run_sync(append, state.model_dump_json().encode() + b"\n")
    finally:
        os.close(fd)
    return state  # type: ignore[return-value]


def main(n: int = 1_000, repeats: int = 7) -> tuple[float, float, float]:
    runner, nodes, fns = make_pipeline(n)
    plan = runner.compile(nodes)
    root = tempfile.mkdtemp(prefix="stroma-bench-")
    times_s, times_b = [], []
    try:
        for r in range(repeats):
            t0 = perf_counter()
            out = anyio.run(bare, fns, S(value=0), os.path.join(root, f"bare{r}.log"))
            times_b.append(perf_counter() - t0)
            assert out.value == n
            store = FileStore(os.path.join(root, "store"))
            config = RunConfig(run_id=f"bench{r}")
            t0 = perf_counter()
            result = anyio.run(
                lambda s=store, c=config: interpret(plan, S(value=0), store=s, config=c)
            )
            times_s.append(perf_counter() - t0)
            assert result.final_state.value == n  # type: ignore[attr-defined]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    s = statistics.median(times_s) / n * 1e6
    b = statistics.median(times_b) / n * 1e6
    print(f"FileStore: microseconds per node at N={n} (median of {repeats})")
    print(f"{'stroma+FileStore':>18} {'bare append+fsync':>18} {'ratio':>7}")
    print(f"{s:>18.1f} {b:>18.1f} {s / b:>7.2f}   (target <= 1.5)")
    return s, b, s / b


if __name__ == "__main__":
    main()
