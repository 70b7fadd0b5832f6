"""A map_each run on a FileStore that never finishes its last child: the CLI crash test
SIGKILLs this process once the other children are durable.

Usage: python -m tests.cli.crash_worker STORE_DIR RUN_ID
"""

from __future__ import annotations

import sys

import anyio

from interpreters.stores.file import FileStore
from tests.timeline import pipelines as P


async def main(store_dir: str, run_id: str) -> None:
    calls: list[str] = []
    await P.run(P.crash_plan(calls, anyio.Event()), P.Urls(urls=P.CRASH_ITEMS),
                FileStore(store_dir), run_id)


if __name__ == "__main__":
    anyio.run(main, *sys.argv[1:3])
