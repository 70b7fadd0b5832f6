"""User code that ``make lint`` checks under ``mypy --strict``: the names stroma exports
lazily (the stores, imported when first used) have their real types for a type checker,
and the 0.3.x-era API it calls is typed as a user would call it.

tests/api/test_readme.py also runs it, so it stays valid code.
"""

from __future__ import annotations

from pydantic import BaseModel

import stroma
from stroma import (
    CheckpointKey,
    CheckpointManager,
    FileStore,
    NodeUsage,
    PostgresStore,
    RedisStore,
    StromaRunner,
    SyncRedisStore,
    parallel,
)
from stroma.checkpoint import RedisStore as CheckpointRedisStore
from stroma.checkpoint import SyncRedisStore as CheckpointSyncRedisStore

__all__ = ("Left", "Right", "Seed", "merged", "stores", "summary")


def stores(folder: str) -> tuple[FileStore, RedisStore, SyncRedisStore, PostgresStore]:
    """Every store the facade names, constructed (not connected: nothing is sent)."""
    file_store: FileStore = stroma.FileStore(folder)
    redis_store: CheckpointRedisStore = RedisStore("redis://localhost:6379", ttl_seconds=60)
    sync_store: CheckpointSyncRedisStore = SyncRedisStore("redis://localhost:6379")
    CheckpointManager(file_store)
    return file_store, redis_store, sync_store, PostgresStore("postgresql://localhost/db")


class Seed(BaseModel):
    value: int


class Left(BaseModel):
    left: int


class Right(BaseModel):
    right: int


async def merged(seed: Seed) -> dict[str, object]:
    """A parallel group awaited on its own gives the merged dict."""
    runner = StromaRunner.quick()

    @runner.node("left", input=Seed, output=Left)
    async def left(state: Seed) -> dict[str, int]:
        return {"left": state.value}

    @runner.node("right", input=Seed, output=Right)
    async def right(state: Seed) -> dict[str, int]:
        return {"right": -state.value}

    result: dict[str, object] = await parallel(left, right)(seed)
    return result


def summary(key: CheckpointKey) -> dict[str, NodeUsage]:
    """A tracker's summary is NodeUsage by node id; a checkpoint key unpacks as a tuple."""
    _run_id, node_id = key
    tracker = stroma.CostTracker()
    tracker.record(NodeUsage(node_id, 1, 0.0, 1.0))
    return tracker.summary()
