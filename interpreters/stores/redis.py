"""Redis stores: checkpoints, the effect log and run leases on a Redis server.

``RedisStore`` is async (``redis.asyncio``, which runs on **asyncio only**: under trio every
operation raises a StoreError saying so) and ``SyncRedisStore`` is its blocking twin. Both
need the optional ``redis`` extra (``pip install 'stroma[redis]'``); importing this module
works without it, constructing a store does not.

Key layout (all of one run's keys share one prefix, and one Redis Cluster hash slot)::

    {prefix}:run:{<n>:<run id>}:ckpt    hash   node id -> {"schema": "mod:Qual", "data": {...}}
    {prefix}:run:{<n>:<run id>}:log     list   the effect log, one JSON line per item
    {prefix}:run:{<n>:<run id>}:tok     string id of the last append (makes retries idempotent)
    {prefix}:run:{<n>:<run id>}:lease   string the holder of the run's lease (own expiry)

``<n>`` is the byte length of the UTF-8 run id, so the encoding is injective: no run's keys
are ever another run's keys (run ``a`` vs ``a:b`` vs ``a}:ckpt``), and ``delete`` removes a
fixed set of keys instead of matching a pattern. Every write refreshes the TTL of all of the
run's data keys. ``append_log`` writes the log lines and the checkpoint in one MULTI/EXEC
transaction. The lease key is not part of ``delete``: it belongs to whoever holds it and
expires on its own ``lease_ms``.

Transient failures (connection refused/reset, timeouts, an aborted WATCH) are retried with
tenacity, a bounded number of times with jittered exponential waits; anything else, or a
failure that outlasts the retries, is a ``StoreError`` naming the operation, the run and the
server. A retried append is applied once: the transaction records its append id, and a retry
first checks (under WATCH) whether the earlier attempt landed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import anyio
from pydantic import BaseModel, ValidationError
from tenacity import (
    AsyncRetrying,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)
from tenacity.wait import wait_base

from interpreters.stores._common import check_lines
from interpreters.stores._common import check_state as _check_state
from interpreters.stores._common import resolve as _resolve
from interpreters.stores._lease import hold_lease
from stroma.errors import LogCorrupted, StoreError
from stroma.schemas import _schema_ref, declare_schema, state_json

if TYPE_CHECKING:
    from stroma.log import EffectLog

try:
    import redis as _redis
    import redis.asyncio as _aioredis
    from redis.asyncio.retry import Retry as _AsyncRetry
    from redis.backoff import NoBackoff as _NoBackoff
    from redis.retry import Retry as _SyncRetry
except ImportError:  # the optional extra is missing: constructing a store says how to fix it
    _redis = None  # type: ignore[assignment]

__all__ = ("RedisStore", "SyncRedisStore")

_log = logging.getLogger("stroma.stores.redis")
_T = TypeVar("_T")

_MAX_ID_BYTES = 1024
_INSTALL_HINT = "RedisStore needs the 'redis' package: pip install 'stroma[redis]'"

# KEYS[1] = lease key, ARGV = holder, lease ms. Claims (or renews) if free or already ours.
_CLAIM = """
local cur = redis.call('GET', KEYS[1])
if (not cur) or cur == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return {1, ARGV[1]}
end
return {0, cur}
"""
# Deletes the lease only if we still hold it.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


# ----------------------------------------------------------------------------- helpers


def _require_redis(cls_name: str) -> None:
    if _redis is None:
        raise ImportError(_INSTALL_HINT.replace("RedisStore", cls_name))


def _redact(url: str) -> str:
    """The URL without its password, for error messages."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.rsplit("@", 1)[1]
        user = parts.username or ""
        return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))
    except ValueError:
        return "<unparsable redis url>"


def _require_asyncio(what: str) -> None:
    import sniffio

    try:
        library: str | None = sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        library = None
    if library != "asyncio":
        raise StoreError(
            f"{what} needs the asyncio backend: redis.asyncio runs on asyncio only, but this "
            f"code runs on {library or 'no async library'}. Run it under asyncio "
            "(anyio.run(main, backend='asyncio')), or use FileStore, which also works on trio."
        )


def _id_bytes(kind: str, value: object, op: str) -> bytes:
    """A run or node id as UTF-8 bytes, or a StoreError saying what is wrong with it."""
    if not isinstance(value, str):
        raise StoreError(
            f"{op}: the {kind} must be a str, got {value!r} (a {type(value).__name__}); "
            f"pass the {kind} as text"
        )
    if not value:
        raise StoreError(f"{op}: the {kind} is empty; pass a non-empty {kind}")
    try:
        raw = value.encode("utf-8")
    except UnicodeEncodeError:
        raise StoreError(
            f"{op}: the {kind} {value!r} is not valid Unicode text (it has a lone surrogate); "
            "pass text that encodes as UTF-8"
        ) from None
    if len(raw) > _MAX_ID_BYTES:
        raise StoreError(
            f"{op}: the {kind} is {len(raw)} bytes long (UTF-8), more than the {_MAX_ID_BYTES} "
            f"allowed; use a shorter {kind} (a hash of it, for example)"
        )
    return raw






def _encode_checkpoint(state: BaseModel) -> bytes:
    cls = type(state)
    declare_schema(cls)
    ref = json.dumps(_schema_ref(cls)).encode()
    return b'{"schema":' + ref + b',"data":' + state_json(state) + b"}"




def _decode_checkpoint(raw: bytes, schema: type[BaseModel] | None, source: str) -> BaseModel:
    try:
        envelope = json.loads(raw)
    except ValueError:
        raise LogCorrupted(source, "the checkpoint is not JSON") from None
    if not isinstance(envelope, dict) or "schema" not in envelope or "data" not in envelope:
        raise LogCorrupted(source, 'the checkpoint is not a {"schema": ..., "data": ...} object')
    cls = schema if schema is not None else _resolve(envelope["schema"], source)
    try:
        return cls.model_validate_json(json.dumps(envelope["data"]))
    except ValidationError as e:
        raise LogCorrupted(
            source, f"the checkpoint does not validate as {_schema_ref(cls)}: {e}"
        ) from None


def _is_transient(exc: BaseException) -> bool:
    if _redis is None:
        return False
    if isinstance(exc, _redis.exceptions.AuthenticationError):
        return False
    return isinstance(
        exc,
        _redis.exceptions.ConnectionError
        | _redis.exceptions.TimeoutError
        | _redis.exceptions.WatchError
        | _redis.exceptions.TryAgainError
        | ConnectionError
        | TimeoutError,
    )


def _glob_escape(raw: bytes) -> bytes:
    out = bytearray()
    for byte in raw:
        if byte in b"*?[]\\":
            out += b"\\"
        out.append(byte)
    return bytes(out)


class _Keys:
    """The fixed set of keys of one run."""

    __slots__ = ("ckpt", "lease", "log", "tok")

    def __init__(self, prefix: bytes, run: bytes) -> None:
        base = prefix + b":run:{" + str(len(run)).encode() + b":" + run + b"}:"
        self.ckpt = base + b"ckpt"
        self.log = base + b"log"
        self.tok = base + b"tok"
        self.lease = base + b"lease"

    @property
    def data(self) -> tuple[bytes, bytes, bytes]:
        return (self.ckpt, self.log, self.tok)


class _Base:
    """What the sync and async stores share: configuration, keys, messages."""

    _cls_name = "RedisStore"

    def __init__(
        self,
        redis_url: str,
        ttl_seconds: int | None,
        key_prefix: str,
        lease_ms: int,
        max_attempts: int,
        socket_timeout: float,
    ) -> None:
        _require_redis(self._cls_name)
        name = self._cls_name
        if not isinstance(redis_url, str) or not redis_url:
            raise ValueError(
                f"{name}: redis_url must be a URL like 'redis://localhost:6379/0', "
                f"got {redis_url!r}"
            )
        if ttl_seconds is not None and (
            isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int) or ttl_seconds <= 0
        ):
            raise ValueError(
                f"{name}: ttl_seconds must be a positive int (seconds) or None for no expiry, "
                f"got {ttl_seconds!r}"
            )
        if (
            not isinstance(key_prefix, str)
            or not key_prefix
            or "{" in key_prefix
            or "}" in key_prefix
        ):
            raise ValueError(
                f"{name}: key_prefix must be a non-empty str without '{{' or '}}' (they mark "
                f"Redis Cluster hash tags), got {key_prefix!r}"
            )
        if isinstance(lease_ms, bool) or not isinstance(lease_ms, int) or lease_ms < 10:
            raise ValueError(
                f"{name}: lease_ms must be an int of at least 10 (milliseconds), got {lease_ms!r}"
            )
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise ValueError(f"{name}: max_attempts must be an int >= 1, got {max_attempts!r}")
        self.redis_url = redis_url
        self.ttl_seconds = ttl_seconds
        self.key_prefix = key_prefix
        self.lease_ms = lease_ms
        self.max_attempts = max_attempts
        self.socket_timeout = socket_timeout
        self._prefix = key_prefix.encode("utf-8")
        self._where = _redact(redis_url)

    def __repr__(self) -> str:
        return f"{self._cls_name}({self._where!r}, key_prefix={self.key_prefix!r})"

    def _keys(self, run_id: str, op: str) -> _Keys:
        return _Keys(self._prefix, _id_bytes("run id", run_id, f"{self._cls_name}.{op}"))

    def _source(self, run_id: str, what: str) -> str:
        return f"{self._cls_name} at {self._where}, run {run_id!r}, {what}"

    def _client_kwargs(self) -> dict[str, Any]:
        return {
            "socket_timeout": self.socket_timeout,
            "socket_connect_timeout": min(self.socket_timeout, 5.0),
        }

    def _failure(self, op: str, run_id: str | None, exc: BaseException) -> StoreError:
        about = f"{self._cls_name}.{op}" + (f" for run {run_id!r}" if run_id is not None else "")
        if _is_transient(exc):
            return StoreError(
                f"{about} failed against {self._where} after {self.max_attempts} "
                f"attempt{'s' if self.max_attempts != 1 else ''}: "
                f"{type(exc).__name__}: {exc}. Is the Redis server running and reachable?"
            )
        return StoreError(
            f"{about} failed against {self._where}: {type(exc).__name__}: {exc} (a permanent "
            "error, not retried). Check the server, its credentials and that no other program "
            f"writes under the key prefix {self.key_prefix!r}."
        )

    def _wait(self) -> wait_base:
        # Exponential from 50 ms, capped at 2 s, plus up to 50 ms of jitter.
        return wait_exponential(multiplier=0.05, max=2.0) + wait_random(0, 0.05)

    def _expire(self, pipe: Any, keys: _Keys) -> None:
        if self.ttl_seconds is not None:
            for key in keys.data:
                pipe.expire(key, self.ttl_seconds)

    def _head(self) -> bytes:
        return self._prefix + b":run:{"

    def _parse_key(self, key: bytes) -> str | None:
        """The run id of one of this store's data keys, or None."""
        head = self._head()
        if not key.startswith(head):
            return None
        rest = key[len(head) :]
        colon = rest.find(b":")
        if colon <= 0 or not rest[:colon].isdigit():
            return None
        size = int(rest[:colon])
        run = rest[colon + 1 : colon + 1 + size]
        tail = rest[colon + 1 + size :]
        if len(run) != size or tail not in (b"}:ckpt", b"}:log"):
            return None
        return run.decode("utf-8", "replace")


# ------------------------------------------------------------------------ async store


class RedisStore(_Base):
    """Checkpoints, effect logs and leases in Redis, async (asyncio only).

    ``RedisStore(redis_url="redis://localhost:6379", ttl_seconds=3600, *, key_prefix="stroma",
    lease_ms=30000)``. The client connects lazily, on the event loop of the first call.
    """

    _cls_name = "RedisStore"

    def __init__(
        self,
        redis_url: str = "redis://localhost:6379",
        ttl_seconds: int | None = 3600,
        *,
        key_prefix: str = "stroma",
        lease_ms: int = 30000,
        max_attempts: int = 5,
        socket_timeout: float = 10.0,
    ) -> None:
        super().__init__(redis_url, ttl_seconds, key_prefix, lease_ms, max_attempts, socket_timeout)
        self._client: Any = None
        self._client_loop: asyncio.AbstractEventLoop | None = None

    def _redis(self) -> Any:
        _require_asyncio(self._cls_name)
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            # redis.asyncio connections belong to the loop that opened them.
            self._client = _aioredis.Redis.from_url(
                self.redis_url, retry=_AsyncRetry(_NoBackoff(), 0), **self._client_kwargs()
            )
            self._client_loop = loop
        return self._client

    async def _run(self, op: str, run_id: str | None, fn: Callable[[int], Awaitable[_T]]) -> _T:
        """``fn(attempt)``, retried on transient errors; failures become StoreError.

        The first attempt runs without tenacity (a store call is on every node's path);
        only a transient failure starts the retry loop, which replays that failure as its
        own first attempt so the waits and the attempt count are tenacity's.
        """
        try:
            return await fn(1)
        except StoreError:
            raise
        except Exception as exc:
            if not _is_transient(exc):
                if isinstance(exc, _redis.exceptions.RedisError):
                    raise self._failure(op, run_id, exc) from exc
                raise
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
        except StoreError:
            raise
        except Exception as exc:
            if _is_transient(exc) or isinstance(exc, _redis.exceptions.RedisError):
                raise self._failure(op, run_id, exc) from exc
            raise
        raise AssertionError("unreachable: tenacity neither returned nor raised")

    # ------------------------------------------------------------------ checkpoints

    async def save(self, run_id: str, node_id: str, state: BaseModel) -> None:
        keys = self._keys(run_id, "save")
        node = _id_bytes("node id", node_id, "RedisStore.save")
        value = _encode_checkpoint(_check_state(state, node_id, "RedisStore.save"))

        async def once(_: int) -> None:
            async with self._redis().pipeline(transaction=True) as pipe:
                pipe.hset(keys.ckpt, node, value)
                self._expire(pipe, keys)
                await pipe.execute()

        await self._run("save", run_id, once)

    async def save_typed(self, run_id: str, node_id: str, state: BaseModel, schema: type) -> None:
        if isinstance(schema, type) and issubclass(schema, BaseModel):
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
        declare_schema(schema)
        return await self._load(run_id, node_id, schema, "load_typed")

    async def delete(self, run_id: str) -> None:
        keys = self._keys(run_id, "delete")

        async def once(_: int) -> None:
            await self._redis().delete(*keys.data)

        await self._run("delete", run_id, once)

    # ------------------------------------------------------------------- effect log

    async def append_log(
        self, run_id: str, lines: Sequence[str], checkpoint: tuple[str, BaseModel] | None = None
    ) -> None:
        """Append JSON lines to the run's log and save ``checkpoint`` in one transaction."""
        op = "RedisStore.append_log"
        keys = self._keys(run_id, "append_log")
        encoded = [line.encode() for line in check_lines(lines, op)]
        item: tuple[bytes, bytes] | None = None
        if checkpoint is not None:
            node_id, state = checkpoint
            item = (
                _id_bytes("node id", node_id, op),
                _encode_checkpoint(_check_state(state, node_id, op)),
            )
        if not encoded and item is None:
            return
        token = uuid.uuid4().hex.encode()

        async def once(attempt: int) -> None:
            async with self._redis().pipeline(transaction=True) as pipe:
                if encoded and attempt > 1:
                    # An earlier attempt may have committed before its reply was lost.
                    await pipe.watch(keys.tok)
                    if await pipe.get(keys.tok) == token:
                        return
                    pipe.multi()
                if encoded:
                    pipe.rpush(keys.log, *encoded)
                    pipe.set(keys.tok, token)
                if item is not None:
                    pipe.hset(keys.ckpt, item[0], item[1])
                self._expire(pipe, keys)
                await pipe.execute()

        await self._run("append_log", run_id, once)

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
        return EffectLog.from_lines(lines, source=source)

    # ---------------------------------------------------------------------- runs

    async def list_runs(self) -> list[str]:
        """The ids of the runs that have checkpoints or a log under this key prefix, sorted."""
        pattern = _glob_escape(self._head()) + b"*"

        async def once(_: int) -> set[str]:
            found: set[str] = set()
            async for key in self._redis().scan_iter(match=pattern, count=1000):
                run = self._parse_key(key)
                if run is not None:
                    found.add(run)
            return found

        return sorted(await self._run("list_runs", None, once))

    async def close(self) -> None:
        """Close the connection pool (a later call opens a new one)."""
        client, self._client, self._client_loop = self._client, None, None
        if client is not None:
            await client.aclose()

    # ---------------------------------------------------------------------- lease

    def lease(self, run_id: str, holder: str) -> AbstractAsyncContextManager[None]:
        """Claim ``run_id`` for ``holder`` while the context is open, or raise RunLocked.

        The lease lives ``lease_ms`` and is renewed in the background every ``lease_ms / 3``;
        a holder that dies loses it after ``lease_ms``. A holder name identifies one worker:
        claiming again under the same name (after a restart) takes the lease back. If the
        lease is lost while the context is open (renewal failed for ``lease_ms``, or another
        worker took it), the body is cancelled and the context raises StoreError/RunLocked.
        """
        keys = self._keys(run_id, "lease")
        who = _id_bytes("holder", holder, "RedisStore.lease")
        ms = self.lease_ms

        async def claim_once() -> tuple[bool, str]:
            ok, current = await self._redis().eval(_CLAIM, 1, keys.lease, who, ms)
            return bool(int(ok)), current.decode("utf-8", "replace")

        async def retry(
            fn: Callable[[], Awaitable[tuple[bool, str]]],
        ) -> tuple[bool, str]:
            return await self._run("lease", run_id, lambda _: fn())

        async def release() -> None:
            await self._redis().eval(_RELEASE, 1, keys.lease, who)

        return hold_lease(
            run_id, holder, ms / 1000, claim_once, retry, release, self, _is_transient
        )



# ------------------------------------------------------------------------- sync store


class SyncRedisStore(_Base):
    """The blocking twin of RedisStore: checkpoints, effect logs and leases, same keys.

    ``SyncRedisStore(redis_url="redis://localhost:6379", ttl_seconds=3600, *,
    key_prefix="stroma", lease_ms=30000)``. A RedisStore and a SyncRedisStore with the same
    URL and prefix see the same runs. Its lease (for runs through ``interpret``) is an
    async context manager whose Redis calls run in a worker thread, on asyncio or trio.
    """

    _cls_name = "SyncRedisStore"

    def __init__(
        self,
        redis_url: str = "redis://localhost:6379",
        ttl_seconds: int | None = 3600,
        *,
        key_prefix: str = "stroma",
        lease_ms: int = 30000,
        max_attempts: int = 5,
        socket_timeout: float = 10.0,
    ) -> None:
        super().__init__(
            redis_url, ttl_seconds, key_prefix, lease_ms, max_attempts, socket_timeout
        )
        self._client: Any = None

    def lease(self, run_id: str, holder: str) -> AbstractAsyncContextManager[None]:
        """Claim ``run_id`` for ``holder`` while the context is open (see RedisStore.lease)."""
        keys = self._keys(run_id, "lease")
        who = _id_bytes("holder", holder, "SyncRedisStore.lease")
        ms = self.lease_ms

        async def claim_once() -> tuple[bool, str]:
            ok, current = await anyio.to_thread.run_sync(
                lambda: self._redis().eval(_CLAIM, 1, keys.lease, who, ms)
            )
            return bool(int(ok)), current.decode("utf-8", "replace")

        async def retry(fn: Callable[[], Awaitable[tuple[bool, str]]]) -> tuple[bool, str]:
            retrying = AsyncRetrying(
                stop=stop_after_attempt(self.max_attempts), wait=self._wait(),
                retry=retry_if_exception(_is_transient), reraise=True, sleep=anyio.sleep,
            )
            try:
                async for attempt in retrying:
                    with attempt:
                        return await fn()
            except Exception as exc:
                if _is_transient(exc) or isinstance(exc, _redis.exceptions.RedisError):
                    raise self._failure("lease", run_id, exc) from exc
                raise
            raise AssertionError("unreachable: tenacity neither returned nor raised")

        async def release() -> None:
            await anyio.to_thread.run_sync(
                lambda: self._redis().eval(_RELEASE, 1, keys.lease, who)
            )

        return hold_lease(
            run_id, holder, ms / 1000, claim_once, retry, release, self, _is_transient
        )

    def _redis(self) -> Any:
        if self._client is None:
            self._client = _redis.Redis.from_url(
                self.redis_url, retry=_SyncRetry(_NoBackoff(), 0), **self._client_kwargs()
            )
        return self._client

    def _run(self, op: str, run_id: str | None, fn: Callable[[int], _T]) -> _T:
        retrying = Retrying(
            stop=stop_after_attempt(self.max_attempts),
            wait=self._wait(),
            retry=retry_if_exception(_is_transient),
            reraise=True,
            sleep=time.sleep,
        )
        try:
            for attempt in retrying:
                with attempt:
                    return fn(attempt.retry_state.attempt_number)
        except StoreError:
            raise
        except Exception as exc:
            if _is_transient(exc) or isinstance(exc, _redis.exceptions.RedisError):
                raise self._failure(op, run_id, exc) from exc
            raise
        raise AssertionError("unreachable: tenacity neither returned nor raised")

    def save(self, run_id: str, node_id: str, state: BaseModel) -> None:
        keys = self._keys(run_id, "save")
        node = _id_bytes("node id", node_id, "SyncRedisStore.save")
        value = _encode_checkpoint(_check_state(state, node_id, "SyncRedisStore.save"))

        def once(_: int) -> None:
            with self._redis().pipeline(transaction=True) as pipe:
                pipe.hset(keys.ckpt, node, value)
                self._expire(pipe, keys)
                pipe.execute()

        self._run("save", run_id, once)

    def save_typed(self, run_id: str, node_id: str, state: BaseModel, schema: type) -> None:
        if isinstance(schema, type) and issubclass(schema, BaseModel):
            declare_schema(schema)
        self.save(run_id, node_id, state)

    def _load(
        self, run_id: str, node_id: str, schema: type[BaseModel] | None, op: str
    ) -> BaseModel | None:
        keys = self._keys(run_id, op)
        node = _id_bytes("node id", node_id, f"SyncRedisStore.{op}")
        raw: bytes | None = self._run(op, run_id, lambda _: self._redis().hget(keys.ckpt, node))
        if raw is None:
            return None
        return _decode_checkpoint(raw, schema, self._source(run_id, f"checkpoint {node_id!r}"))

    def load(self, run_id: str, node_id: str) -> BaseModel | None:
        return self._load(run_id, node_id, None, "load")

    def load_typed(self, run_id: str, node_id: str, schema: type[BaseModel]) -> BaseModel | None:
        declare_schema(schema)
        return self._load(run_id, node_id, schema, "load_typed")

    def delete(self, run_id: str) -> None:
        keys = self._keys(run_id, "delete")
        self._run("delete", run_id, lambda _: self._redis().delete(*keys.data))

    def append_log(
        self, run_id: str, lines: Sequence[str], checkpoint: tuple[str, BaseModel] | None = None
    ) -> None:
        """Append JSON lines to the run's log and save ``checkpoint`` in one transaction."""
        op = "SyncRedisStore.append_log"
        keys = self._keys(run_id, "append_log")
        encoded = [line.encode() for line in check_lines(lines, op)]
        item: tuple[bytes, bytes] | None = None
        if checkpoint is not None:
            node_id, state = checkpoint
            item = (
                _id_bytes("node id", node_id, op),
                _encode_checkpoint(_check_state(state, node_id, op)),
            )
        if not encoded and item is None:
            return
        token = uuid.uuid4().hex.encode()

        def once(attempt: int) -> None:
            with self._redis().pipeline(transaction=True) as pipe:
                if encoded and attempt > 1:
                    pipe.watch(keys.tok)
                    if pipe.get(keys.tok) == token:
                        return
                    pipe.multi()
                if encoded:
                    pipe.rpush(keys.log, *encoded)
                    pipe.set(keys.tok, token)
                if item is not None:
                    pipe.hset(keys.ckpt, item[0], item[1])
                self._expire(pipe, keys)
                pipe.execute()

        self._run("append_log", run_id, once)

    def read_log(self, run_id: str) -> EffectLog | None:
        """The run's effect log, or None if it has none."""
        from stroma.log import EffectLog

        keys = self._keys(run_id, "read_log")
        raw: list[bytes] = self._run(
            "read_log", run_id, lambda _: self._redis().lrange(keys.log, 0, -1)
        )
        if not raw:
            return None
        source = self._source(run_id, "effect log")
        try:
            lines = [line.decode("utf-8") for line in raw]
        except UnicodeDecodeError:
            raise LogCorrupted(source, "a log line is not UTF-8 text") from None
        return EffectLog.from_lines(lines, source=source)

    def list_runs(self) -> list[str]:
        """The ids of the runs that have checkpoints or a log under this key prefix, sorted."""
        pattern = _glob_escape(self._head()) + b"*"

        def once(_: int) -> set[str]:
            found: set[str] = set()
            for key in self._redis().scan_iter(match=pattern, count=1000):
                run = self._parse_key(key)
                if run is not None:
                    found.add(run)
            return found

        return sorted(self._run("list_runs", None, once))

    def close(self) -> None:
        """Close the connection pool (a later call opens a new one)."""
        client, self._client = self._client, None
        if client is not None:
            client.close()
