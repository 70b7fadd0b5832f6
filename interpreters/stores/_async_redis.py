# unasync: begin async-only
"""RedisStore, the async Redis store (asyncio only).

This file is the source of ``_sync_redis.py``: ``scripts/unasync.py`` rewrites it into
SyncRedisStore (``async``/``await`` dropped, async names swapped for their blocking twins).
Lines marked ``# unasync: async-only`` and blocks between ``# unasync: begin async-only``
and ``# unasync: end`` are left out of the sync store; a line marked ``# unasync: sync: X``
becomes ``X`` there; the commented lines of a ``begin sync-only`` block are uncommented.
After editing it, run ``python scripts/unasync.py`` (``make lint`` checks it was).
"""
# unasync: end
# unasync: begin sync-only
# """SyncRedisStore, the blocking Redis store, generated from ``_async_redis.py``."""
# unasync: end

from __future__ import annotations

# unasync: sync: import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import anyio  # unasync: async-only
from pydantic import BaseModel
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt

from interpreters.stores import _redis_base as _b
from interpreters.stores._checks import require_model_type
from interpreters.stores._common import RunInfo, check_input_text, check_lines, run_info
from interpreters.stores._common import check_state as _check_state
from interpreters.stores._redis_base import (
    _CLAIM,
    _DELETE,
    _PUT_INPUT,
    _RELEASE,
    _RENEW,
    _WRITE,
    _Base,
    _close_with_loop,  # unasync: async-only
    _decode_checkpoint,
    _encode_checkpoint,
    _glob_escape,
    _id_bytes,
    _is_transient,
    _Keys,
    _NoScriptError,
    _running_loop,  # unasync: async-only
    _Script,
)
from stroma.errors import LogCorrupted, StromaError
from stroma.schemas import declare_schema

if TYPE_CHECKING:
    from stroma.log import EffectLog

__all__ = ("RedisStore",)

_T = TypeVar("_T")


class RedisStore(_Base):
    # unasync: begin async-only
    """Checkpoints, effect logs and leases in Redis, async (asyncio only).

    ``RedisStore(redis_url="redis://localhost:6379", ttl_seconds=3600, *, key_prefix="stroma",
    lease_ms=30000, max_attempts=5, socket_timeout=10.0, max_connections=64,
    pool_timeout=30.0)``.

    The client connects lazily, on the event loop of the first call, through a blocking
    connection pool of at most ``max_connections`` connections: under load a call waits up
    to ``pool_timeout`` seconds for a free connection (then the wait counts as a transient
    failure and is retried) instead of failing, so many concurrent runs share one store.
    Transient failures are retried up to ``max_attempts`` times; ``socket_timeout`` bounds
    each command. ``await store.close()`` (or ``async with RedisStore(...) as store:``)
    closes the pool; a store that is never closed is closed when its event loop shuts down
    (or when it is garbage collected), so it leaves no connection open.
    """
    # unasync: end
    # unasync: begin sync-only
    # """The blocking twin of RedisStore: checkpoints, effect logs and leases, same keys.
    #
    # ``SyncRedisStore(redis_url="redis://localhost:6379", ttl_seconds=3600, *,
    # key_prefix="stroma", lease_ms=30000, max_attempts=5, socket_timeout=10.0,
    # max_connections=64, pool_timeout=30.0)``. A RedisStore and a SyncRedisStore with the
    # same URL and prefix see the same runs and the same leases. Its connection pool is
    # bounded (a call waits up to ``pool_timeout`` for a free connection); ``store.close()``
    # (or ``with SyncRedisStore(...) as store:``) closes it. Its lease (for runs through
    # ``interpret``) is an async context manager whose Redis calls run in a worker thread,
    # on asyncio or trio. Generated from RedisStore by scripts/unasync.py.
    # """
    # unasync: end

    _cls_name = "RedisStore"
    # unasync: sync: _blocking = True

    def __init__(
        self,
        redis_url: str = "redis://localhost:6379",
        ttl_seconds: int | None = 3600,
        *,
        key_prefix: str = "stroma",
        lease_ms: int = 30000,
        max_attempts: int = 5,
        socket_timeout: float = 10.0,
        max_connections: int = 64,
        pool_timeout: float = 30.0,
    ) -> None:
        super().__init__(
            redis_url, ttl_seconds, key_prefix, lease_ms, max_attempts, socket_timeout,
            max_connections, pool_timeout,
        )
        self._client: Any = None
        self._client_loop: Any = None  # unasync: async-only
        self._closer: Any = None  # unasync: async-only

    async def __aenter__(self) -> RedisStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _redis(self) -> Any:
        loop = _running_loop(self._cls_name)  # unasync: async-only
        stale = self._client_loop is not loop  # unasync: sync: stale = False
        if self._client is None or stale:
            pool = _b._aioredis.BlockingConnectionPool.from_url(
                self.redis_url, **self._pool_kwargs(_b._AsyncRetry)
            )
            self._client = _b._aioredis.Redis.from_pool(pool)
            # unasync: begin async-only
            # redis.asyncio connections belong to the loop that opened them.
            self._client_loop = loop
            self._closer = _close_with_loop(self._client)
            # unasync: end
        return self._client

    async def close(self) -> None:
        """Close the connection pool (a later call opens a new one)."""
        client, self._client = self._client, None
        # unasync: begin async-only
        closer, self._closer = self._closer, None
        self._client_loop = None
        if closer is not None:
            await closer.aclose()  # its finally closes the client
            return
        # unasync: end
        if client is not None:
            await client.aclose()

    async def _run(
        self, op: str, run_id: str | None, fn: _b._AsyncOp[_T], key: str | None = None
    ) -> _T:
        """``fn(attempt)``, retried on transient errors; every failure becomes a StoreError
        (naming the operation, the run and, for an input, its ``key``).

        The first attempt runs without tenacity (a store call is on every node's path);
        only a transient failure starts the retry loop, which replays that failure as its
        own first attempt so the waits and the attempt count are tenacity's.
        """
        try:
            return await fn(1)
        except StromaError:
            raise
        except Exception as exc:
            if not _is_transient(exc):
                raise self._failure(op, run_id, exc, key) from exc
            first_failure = exc

        async def attempt_again(n: int) -> _T:
            if n == 1:
                raise first_failure
            return await fn(n)

        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.max_attempts),
            wait=self._wait(),
            retry=retry_if_exception(_is_transient),
            reraise=True,
            sleep=anyio.sleep,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await attempt_again(attempt.retry_state.attempt_number)
        except StromaError:
            raise
        except Exception as exc:
            raise self._failure(op, run_id, exc, key) from exc
        raise AssertionError("unreachable: tenacity neither returned nor raised")

    async def _eval(self, script: _Script, keys: Sequence[bytes], args: Sequence[Any]) -> Any:
        """Run a Lua script by its SHA1, loading it first if the server does not know it."""
        client = self._redis()
        try:
            return await client.evalsha(script.sha, len(keys), *keys, *args)
        except _NoScriptError:
            return await client.eval(script.source, len(keys), *keys, *args)

    # ---------------------------------------------------------------- the lease's calls

    async def _claim(
        self, run_id: str, keys: _Keys, who: bytes, takeover: str | None
    ) -> tuple[bool, str, int]:
        args = (who, self.lease_ms, (takeover or "").encode(), self._fence_ttl_arg)

        async def once(_: int) -> Any:
            return await _b._shielded(self._eval, _CLAIM, (keys.lease, keys.fence), args)

        ok, current, token = await self._run("lease", run_id, once)
        return bool(int(ok)), current.decode("utf-8", "replace"), int(token)

    async def _renew(self, keys: _Keys, who: bytes, token: int) -> tuple[bool, str]:
        args = (who, self.lease_ms, str(token).encode(), self._fence_ttl_arg)
        ok, current = await self._eval(_RENEW, (keys.lease, keys.fence), args)
        return bool(int(ok)), current.decode("utf-8", "replace")

    async def _release(self, run_id: str, keys: _Keys, who: bytes) -> None:
        # (not shielded round trip by round trip, as a claim is: a release cut off by its
        # time bound leaves the lease to expire, which is all a release that cannot be
        # answered can do)
        async def once(_: int) -> Any:
            return await self._eval(_RELEASE, (keys.lease,), (who,))

        await self._run("release", run_id, once)

    # ------------------------------------------------------------------ checkpoints

    async def _write(
        self, op: str, run_id: str, keys: _Keys, lines: Sequence[bytes],
        item: tuple[bytes, bytes] | None,
    ) -> None:
        """One fenced, atomic, idempotent write: the checkpoint and the log lines."""
        token, holder = self._fence_args(run_id)
        node, value = item if item is not None else (b"", b"")
        args = (token, holder, uuid.uuid4().hex.encode(), self._ttl_arg, node, value, *lines)

        async def once(_: int) -> Any:
            return await self._eval(_WRITE, keys.write, args)

        self._written(op, run_id, await self._run(op, run_id, once))

    async def save(self, run_id: str, node_id: str, state: BaseModel) -> None:
        keys = self._keys(run_id, "save")
        node = _id_bytes("node id", node_id, "RedisStore.save")
        value = _encode_checkpoint(
            _check_state(state, node_id, "RedisStore.save"), node_id, "RedisStore.save")
        await self._write("save", run_id, keys, (), (node, value))

    async def save_typed(self, run_id: str, node_id: str, state: BaseModel, schema: type) -> None:
        require_model_type("RedisStore.save_typed", schema)
        declare_schema(schema)
        await self.save(run_id, node_id, state)

    async def _load(
        self, run_id: str, node_id: str, schema: type[BaseModel] | None, op: str
    ) -> BaseModel | None:
        keys = self._keys(run_id, op)
        node = _id_bytes("node id", node_id, f"RedisStore.{op}")

        async def once(_: int) -> bytes | None:
            raw: bytes | None = await self._redis().hget(keys.ckpt, node)
            return raw

        raw = await self._run(op, run_id, once)
        if raw is None:
            return None
        return _decode_checkpoint(raw, schema, self._source(run_id, f"checkpoint {node_id!r}"))

    async def load(self, run_id: str, node_id: str) -> BaseModel | None:
        return await self._load(run_id, node_id, None, "load")

    async def load_typed(
        self, run_id: str, node_id: str, schema: type[BaseModel]
    ) -> BaseModel | None:
        require_model_type("RedisStore.load_typed", schema)
        declare_schema(schema)
        return await self._load(run_id, node_id, schema, "load_typed")

    async def delete(self, run_id: str) -> None:
        """Remove the run's checkpoints, log and inputs (its lease stays with its holder)."""
        keys = self._keys(run_id, "delete")
        args = self._fence_args(run_id)

        async def once(_: int) -> Any:
            return await self._eval(_DELETE, keys.write, args)

        self._written("delete", run_id, await self._run("delete", run_id, once))

    # ----------------------------------------------------------------------- inputs

    async def put_input(self, run_id: str, key: str, text: str) -> None:
        """Keep ``text`` (the input's JSON text) as the input ``key`` of run ``run_id``; a
        later put of the same key replaces it (the latest wins). Refreshes the TTL of the
        run's keys.

        Inputs are not part of the run's log, so a put is not fenced: it is allowed while a
        worker (this store object or another) holds the run's lease. It is one script that
        writes only the run's inputs hash (and the keys' expiry), so it never changes, or
        damages, the log or the checkpoints. ``send_input`` is the checked way to send one.
        """
        op = f"{self._cls_name}.put_input"
        keys = self._keys(run_id, "put_input")
        field = _id_bytes("input key", key, op)
        value = check_input_text(text, run_id, key, op).encode("utf-8")
        args = (field, value, self._ttl_arg)

        async def once(_: int) -> Any:
            return await self._eval(_PUT_INPUT, keys.put_input, args)

        await self._run("put_input", run_id, once, key)

    async def get_input(self, run_id: str, key: str) -> str | None:
        """The text last put as the input ``key`` of run ``run_id``, or None."""
        op = f"{self._cls_name}.get_input"
        keys = self._keys(run_id, "get_input")
        field = _id_bytes("input key", key, op)

        async def once(_: int) -> bytes | None:
            raw: bytes | None = await self._redis().hget(keys.inputs, field)
            return raw

        raw = await self._run("get_input", run_id, once, key)
        if raw is None:
            return None
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise LogCorrupted(
                self._source(run_id, f"input {key!r}"),
                "the input is not UTF-8 text (something else wrote it): send the input again",
            ) from None

    async def lease_holder(self, run_id: str) -> str | None:
        """The holder of run ``run_id``'s lease (a worker running it now), or None: nobody
        holds it (the run ended, waits, was never run here, or its worker died and the lease
        expired)."""
        keys = self._keys(run_id, "lease_holder")

        async def once(_: int) -> bytes | None:
            raw: bytes | None = await self._redis().get(keys.lease)
            return raw

        raw = await self._run("lease_holder", run_id, once)
        return None if raw is None else raw.decode("utf-8", "replace")

    # ------------------------------------------------------------------- effect log

    async def append_log(
        self, run_id: str, lines: Sequence[str], checkpoint: tuple[str, BaseModel] | None = None
    ) -> None:
        """Append JSON lines to the run's log and save ``checkpoint``, in one atomic write."""
        op = "RedisStore.append_log"
        keys = self._keys(run_id, "append_log")
        encoded = [line.encode() for line in check_lines(lines, op)]
        item: tuple[bytes, bytes] | None = None
        if checkpoint is not None:
            node_id, state = checkpoint
            item = (
                _id_bytes("node id", node_id, op),
                _encode_checkpoint(_check_state(state, node_id, op), node_id, op),
            )
        if not encoded and item is None:
            return
        await self._write("append_log", run_id, keys, encoded, item)

    async def read_log(self, run_id: str) -> EffectLog | None:
        """The run's effect log, or None if it has none."""
        from stroma.log import EffectLog

        keys = self._keys(run_id, "read_log")

        async def once(_: int) -> list[bytes]:
            raw: list[bytes] = await self._redis().lrange(keys.log, 0, -1)
            return raw

        raw = await self._run("read_log", run_id, once)
        if not raw:
            return None
        source = self._source(run_id, "effect log")
        try:
            lines = [line.decode("utf-8") for line in raw]
        except UnicodeDecodeError:
            raise LogCorrupted(source, "a log line is not UTF-8 text") from None
        return EffectLog.from_lines(lines, source=source, whole=True)

    # ---------------------------------------------------------------------- runs

    async def run_ids(self) -> list[str]:
        """The ids of the runs that have checkpoints or a log under this key prefix, sorted."""
        pattern = _glob_escape(self._head()) + b"*"

        async def once(_: int) -> set[str]:
            found: set[str] = set()
            async for key in self._redis().scan_iter(match=pattern, count=1000):
                run = self._parse_key(key)
                if run is not None:
                    found.add(run)
            return found

        return sorted(await self._run("run_ids", None, once))

    async def list_runs(self) -> list[RunInfo]:
        """A summary of every run under this key prefix (sorted by run id); see RunInfo."""
        infos: list[RunInfo] = []
        for run_id in await self.run_ids():
            keys = self._keys(run_id, "list_runs")
            log: EffectLog | LogCorrupted | None
            try:
                log = await self.read_log(run_id)
            except LogCorrupted as e:
                log = e

            async def count(_: int, key: bytes = keys.ckpt) -> int:
                return int(await self._redis().hlen(key))

            done = await self._run("list_runs", run_id, count)
            infos.append(run_info(run_id, log, done, self._source(run_id, "effect log")))
        return infos
