"""RedisStore and PostgresStore: per-node cost beside a bare loop doing the same writes.

The pipeline of ``overhead.py`` (N trivial nodes) runs through ``interpret`` on each
store. The baseline, in the same process and with the same client library, does per node
the node's own work (validate, await, validate, serialize) and the writes a durable node
needs: Redis, one MULTI/EXEC with the log lines (RPUSH), the checkpoint (HSET) and the
TTLs; PostgreSQL, one transaction with the run's advisory lock, the log rows and the
checkpoint upsert. Target ratio <= 1.5. Then 100 concurrent runs on one store, with the
throughput in nodes per second.

Needs the servers of the test suite (Redis 127.0.0.1:6379, PostgreSQL 127.0.0.1:5432,
database ``test``); a store whose server is down is skipped with a note.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import uuid
from time import perf_counter
from typing import Any

from pydantic import BaseModel

from benchmarks.overhead import S, make_pipeline
from stroma.runner import RunConfig, interpret

REDIS_URL = os.environ.get("STROMA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_DSN = os.environ.get("STROMA_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")


def _up(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _lines(i: int, state: BaseModel) -> list[str]:
    """About what a node writes to its log: the call, the trace record, the save."""
    data = state.model_dump_json()
    return [
        json.dumps({"i": 3 * i, "effect": {"t": "CallNode", "node_id": f"n{i}"},
                    "event": {"t": "NodeReturned", "output": json.loads(data)}}),
        json.dumps({"i": 3 * i + 1, "effect": {"t": "RecordAttempt", "event": {
            "node_id": f"n{i}", "input_state": {"value": i}, "output_state": json.loads(data)}},
            "event": None}),
        json.dumps({"i": 3 * i + 2, "effect": {"t": "SaveCheckpoint", "node_id": f"n{i}"},
                    "event": {"t": "CheckpointSaved", "node_id": f"n{i}"}}),
    ]


async def bare_redis(fns: list[Any], client: Any, run: str) -> S:
    state: BaseModel = S(value=0)
    log, ckpt = f"bench:{run}:log", f"bench:{run}:ckpt"
    for i, fn in enumerate(fns):
        inp = S.model_validate(state)
        state = S.model_validate(await fn(inp))
        async with client.pipeline(transaction=True) as pipe:
            pipe.rpush(log, *_lines(i, state))
            pipe.hset(ckpt, f"n{i}", state.model_dump_json())
            pipe.expire(log, 3600)
            pipe.expire(ckpt, 3600)
            await pipe.execute()
    await client.delete(log, ckpt)
    return state  # type: ignore[return-value]


async def bare_postgres(fns: list[Any], pool: Any, run: str) -> S:
    state: BaseModel = S(value=0)
    for i, fn in enumerate(fns):
        inp = S.model_validate(state)
        state = S.model_validate(await fn(inp))
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", run)
            await conn.execute(
                "INSERT INTO bench_log (run_id, seq, line) SELECT $1, $2 + t.o - 1, t.l "
                "FROM unnest($3::text[]) WITH ORDINALITY AS t(l, o)",
                run, 3 * i, _lines(i, state),
            )
            await conn.execute(
                "INSERT INTO bench_ckpt (run_id, node_id, state) VALUES ($1, $2, $3) "
                "ON CONFLICT (run_id, node_id) DO UPDATE SET state = EXCLUDED.state",
                run, f"n{i}", state.model_dump_json(),
            )
    return state  # type: ignore[return-value]


async def _compare(name: str, store: Any, bare: Any, n: int, repeats: int) -> tuple[float, float]:
    runner, nodes, fns = make_pipeline(n)
    plan = runner.compile(nodes)
    t_s, t_b = [], []
    for _ in range(repeats):
        t0 = perf_counter()
        out = await bare(fns, uuid.uuid4().hex)
        t_b.append(perf_counter() - t0)
        assert out.value == n
        t0 = perf_counter()
        result = await interpret(plan, S(value=0), store=store,
                                 config=RunConfig(run_id=f"bench-{uuid.uuid4().hex}"))
        t_s.append(perf_counter() - t0)
        assert result.final_state.value == n  # type: ignore[attr-defined]
        await store.delete(result.run_id)
    s, b = statistics.median(t_s) / n * 1e6, statistics.median(t_b) / n * 1e6
    print(f"{name:<14} {s:>10.1f} {b:>10.1f} {s / b:>7.2f}   (target <= 1.5)")
    return s, b


async def _concurrent(name: str, store: Any, runs: int = 100, n: int = 20) -> float:
    runner, nodes, _ = make_pipeline(n)
    plan = runner.compile(nodes)

    async def one(k: int) -> None:
        result = await interpret(plan, S(value=0), store=store,
                                 config=RunConfig(run_id=f"conc-{k}-{uuid.uuid4().hex}"))
        assert result.final_state.value == n  # type: ignore[attr-defined]
        await store.delete(result.run_id)

    t0 = perf_counter()
    await asyncio.gather(*(one(k) for k in range(runs)))
    elapsed = perf_counter() - t0
    rate = runs * n / elapsed
    print(f"{name:<14} {runs} concurrent runs x {n} nodes: {elapsed:.2f} s, {rate:,.0f} nodes/s")
    return rate


async def amain(n: int = 300, repeats: int = 3) -> dict[str, Any]:
    out: dict[str, Any] = {}
    print("durable stores: microseconds per node (median), stroma vs the same writes bare")
    print(f"{'store':<14} {'stroma':>10} {'bare':>10} {'ratio':>7}")
    if _up(6379):
        import redis.asyncio as aioredis

        from interpreters.stores.redis import RedisStore

        client = aioredis.from_url(REDIS_URL)
        store = RedisStore(REDIS_URL, key_prefix=f"bench{uuid.uuid4().hex[:6]}")
        out["redis"] = await _compare(
            "RedisStore", store, lambda f, r: bare_redis(f, client, r), n, repeats
        )
        out["redis_concurrent"] = await _concurrent("RedisStore", store)
        await store.close()
        await client.aclose()
    else:
        print("RedisStore     skipped: no server at 127.0.0.1:6379")
    if _up(5432):
        import asyncpg

        from interpreters.stores.postgres import PostgresStore

        pool = await asyncpg.create_pool(POSTGRES_DSN, min_size=1, max_size=10)
        async with pool.acquire() as conn:
            await conn.execute("CREATE TABLE IF NOT EXISTS bench_log (run_id text, seq bigint, "
                               "line text, PRIMARY KEY (run_id, seq))")
            await conn.execute("CREATE TABLE IF NOT EXISTS bench_ckpt (run_id text, node_id "
                               "text, state text, PRIMARY KEY (run_id, node_id))")
        pg = PostgresStore(POSTGRES_DSN, table_prefix=f"bench{uuid.uuid4().hex[:6]}")
        await pg.setup()
        out["postgres"] = await _compare(
            "PostgresStore", pg, lambda f, r: bare_postgres(f, pool, r), n, repeats
        )
        out["postgres_concurrent"] = await _concurrent("PostgresStore", pg)
        async with pool.acquire() as conn:
            await conn.execute("DROP TABLE IF EXISTS bench_log, bench_ckpt")
            for table in pg.tables:
                await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await pg.close()
        await pool.close()
    else:
        print("PostgresStore  skipped: no server at 127.0.0.1:5432")
    return out


def main() -> dict[str, Any]:
    return asyncio.run(amain())


if __name__ == "__main__":
    main()
