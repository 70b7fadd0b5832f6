"""1,000 concurrent runs on one RedisStore or PostgresStore all complete.

A store under load waits (bounded) for a connection of its pool instead of failing a run
because other runs are busy: redis-py's default pool raised "Too many connections" at once.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from stroma.runner import RunConfig, interpret
from tests.faults.kit import Acc, pipeline

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

RUNS = 1000


async def test_a_thousand_concurrent_runs_on_one_store_all_complete(
    server: tuple[str, str, str],
) -> None:
    """1,000 ``interpret`` runs of a 3-node plan at once, each with its own run id (so each
    takes a lease and reads its log), all end COMPLETED with the right state, on one store
    with its default pool."""
    kind, target, name = server
    store: Any
    if kind == "redis":
        from interpreters.stores.redis import RedisStore

        store = RedisStore(target, key_prefix=name)
    else:
        from interpreters.stores.postgres import PostgresStore

        store = PostgresStore(target, table_prefix=name)
    results: dict[int, Any] = {}
    errors: list[BaseException] = []

    async def one(n: int) -> None:
        try:
            results[n] = await interpret(pipeline(3), Acc(value=n), store=store,
                                         config=RunConfig(run_id=f"load-{n}"))
        except Exception as e:  # counted below, with the first one shown
            errors.append(e)

    async with store:
        with anyio.fail_after(240):
            async with anyio.create_task_group() as tg:
                for n in range(RUNS):
                    tg.start_soon(one, n)
        assert errors == [], f"{len(errors)} of {RUNS} runs failed, the first: {errors[0]!r}"
        assert len(results) == RUNS
        assert all(str(r.status) == "COMPLETED" and r.final_state == Acc(value=n + 3)
                   for n, r in results.items())
        assert len(await store.run_ids()) == RUNS
