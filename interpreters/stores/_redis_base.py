"""What RedisStore and SyncRedisStore share: configuration, keys, Lua scripts, the lease.

The stores themselves are ``_async_redis.RedisStore`` (the source) and
``_sync_redis.SyncRedisStore`` (generated from it by ``scripts/unasync.py``); see
``interpreters.stores.redis`` for the key layout and the guarantees.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

import anyio
import anyio.to_thread
from pydantic import BaseModel, ValidationError
from tenacity import wait_exponential, wait_random
from tenacity.wait import wait_base

from interpreters.stores._checks import checkpoint_json
from interpreters.stores._common import require_asyncio
from interpreters.stores._common import resolve as _resolve
from interpreters.stores._lease import LeaseLost, hold_lease
from stroma.errors import LogCorrupted, StoreError, StromaImportError, StromaValueError
from stroma.schemas import _schema_ref, declare_schema, read_state

try:
    import redis as _redis
    import redis.asyncio as _aioredis
    from redis.asyncio.retry import Retry as _AsyncRetry
    from redis.backoff import NoBackoff as _NoBackoff
    from redis.exceptions import NoScriptError as _NoScriptError
    from redis.retry import Retry as _SyncRetry
except ImportError:  # the optional extra is missing: constructing a store says how to fix it
    _redis = None  # type: ignore[assignment]
    _aioredis = None  # type: ignore[assignment]
    _AsyncRetry = _NoBackoff = _SyncRetry = None  # type: ignore[assignment,misc]
    _NoScriptError = Exception  # type: ignore[assignment,misc]

__all__ = ("_Base", "_Keys")

_T = TypeVar("_T")
# What a store operation runs (once per attempt, given the attempt number).
_AsyncOp = Callable[[int], Awaitable[_T]]
_SyncOp = Callable[[int], _T]

_MAX_ID_BYTES = 1024


class _Script:
    """A Lua script, run by its SHA1 (EVALSHA), loaded on first use or after a restart."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


# KEYS: lease, fence. ARGV: holder, lease ms, takeover (a stale holder of this worker, or
# ''), fence ttl ms (or '' for none). Claims if free, ours by name, or the takeover's; each
# claim increments the run's fencing counter and records who got that token.
_CLAIM = _Script("""
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] and cur ~= ARGV[3] then
  return {0, cur, 0}
end
local n = redis.call('HINCRBY', KEYS[2], 'n', 1)
redis.call('HSET', KEYS[2], 'holder', ARGV[1])
if ARGV[4] ~= '' then
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
else
  redis.call('PERSIST', KEYS[2])
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return {1, ARGV[1], n}
""")
# KEYS: lease, fence. ARGV: holder, lease ms, token, fence ttl ms (or ''). Extends the lease
# while the token is still the run's current one and nobody else holds the lease.
_RENEW = _Script("""
local f = redis.call('HMGET', KEYS[2], 'n', 'holder')
local cur = redis.call('GET', KEYS[1])
if f[1] ~= ARGV[3] or f[2] ~= ARGV[1] or (cur and cur ~= ARGV[1]) then
  return {0, cur or ''}
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if ARGV[4] ~= '' then redis.call('PEXPIRE', KEYS[2], ARGV[4]) end
return {1, ARGV[1]}
""")
# KEYS: lease. ARGV: holder. Deletes the lease only if we still hold it.
_RELEASE = _Script("""
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
""")
# The fence check of a write (KEYS[4] fence, KEYS[5] lease; ARGV[1] token or '' for a run
# this store holds no lease on, ARGV[2] holder): refused unless the token is current.
_FENCE = """
if ARGV[1] ~= '' then
  local f = redis.call('HMGET', KEYS[4], 'n', 'holder')
  if f[1] ~= ARGV[1] or f[2] ~= ARGV[2] then
    return {0, f[1] or '', f[2] or '', redis.call('GET', KEYS[5]) or ''}
  end
end
"""
# KEYS: log, tok, ckpt, fence, lease, inputs. ARGV: token, holder, append id, ttl s (or
# ''), checkpoint node (or ''), checkpoint value, lines... One atomic write of a node's
# commit: {1} written, {2} already written by an earlier attempt whose reply was lost. The
# TTL of every data key of the run is refreshed (the inputs' too).
_WRITE = _Script(_FENCE + """
local lines = #ARGV - 6
if lines > 0 and redis.call('GET', KEYS[2]) == ARGV[3] then
  return {2}
end
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[3], ARGV[5], ARGV[6])
end
if lines > 0 then
  for s = 7, #ARGV, 1000 do
    redis.call('RPUSH', KEYS[1], unpack(ARGV, s, math.min(s + 999, #ARGV)))
  end
  redis.call('SET', KEYS[2], ARGV[3])
end
if ARGV[4] ~= '' then
  for _, k in ipairs({1, 2, 3, 6}) do redis.call('EXPIRE', KEYS[k], ARGV[4]) end
end
return {1}
""")
# KEYS: log, tok, ckpt, fence, lease, inputs. ARGV: token, holder. Removes the run's data
# keys (its inputs too).
_DELETE = _Script(_FENCE + """
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[6])
return {1}
""")
# KEYS: log, tok, ckpt, inputs. ARGV: input key, text, ttl s (or ''). Keeps an input sent
# to the run. Not fenced (inputs are not part of the log, and anyone may send one while a
# worker holds the run); it writes only the inputs hash, and refreshes the TTL of the run's
# data keys, so a run that is sent its input does not expire before it is resumed.
_PUT_INPUT = _Script("""
redis.call('HSET', KEYS[4], ARGV[1], ARGV[2])
if ARGV[3] ~= '' then
  for k = 1, 4 do redis.call('EXPIRE', KEYS[k], ARGV[3]) end
end
return 1
""")


# ----------------------------------------------------------------------------- helpers


def _require_redis(cls_name: str) -> None:
    if _redis is None:
        raise StromaImportError(
            f"redis is required for {cls_name}, and it is not installed: "
            "pip install 'stroma[redis]'"
        )


def _check_url(cls_name: str, url: str) -> None:
    """A StromaValueError for a URL redis-py would refuse only when it first connects (a
    scheme it does not take, a query value it cannot parse) or would read as another
    database than it names (``redis://host:6379/abc`` is database 0 to redis-py)."""
    form = "'redis://localhost:6379/0', 'rediss://...' or 'unix:///path/to/redis.sock'"
    if not url.lower().startswith(("redis://", "rediss://", "unix://")):
        raise StromaValueError(
            f"{cls_name}: redis_url must be a URL like {form}, got {_redact(url)!r}"
        )
    try:
        parts = urlsplit(url)
        db = unquote(parts.path).removeprefix("/").removesuffix("/")
        if parts.scheme.lower() != "unix" and db and not (db.isascii() and db.isdigit()):
            raise ValueError(f"{db!r} is not a database number")
        from redis.connection import parse_url

        parse_url(url)
    except ValueError as e:
        raise StromaValueError(
            f"{cls_name}: redis_url {_redact(url)!r}: {str(e).rstrip('.')}; a redis_url is "
            f"a URL like {form} (its path, if any, the database's number)"
        ) from None


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


def _running_loop(what: str) -> asyncio.AbstractEventLoop:
    require_asyncio(what, "redis.asyncio")
    return asyncio.get_running_loop()


def _close_with_loop(client: Any) -> AsyncGenerator[None, None]:
    """An async generator, started, whose ``finally`` closes ``client``.

    The running asyncio loop finalizes it when it shuts down (``asyncio.run`` and anyio
    call ``shutdown_asyncgens``) or when the store is garbage collected, so a store nobody
    closed leaves no open connection behind (and no ResourceWarning).
    """

    async def closer() -> AsyncGenerator[None, None]:
        try:
            yield
        finally:
            await client.aclose()

    agen = closer()
    try:
        agen.asend(None).send(None)  # to the first yield: registers it with the loop
    except StopIteration:
        pass
    return agen


async def _shielded(fn: Callable[..., Awaitable[_T]], *args: Any) -> _T:
    """``await fn(*args)`` shielded from cancellation: one lease round trip is never cut off
    between the server granting it and this worker learning so."""
    with anyio.CancelScope(shield=True):
        result = await fn(*args)
    return result


def _direct(fn: Callable[..., _T], *args: Any) -> _T:
    """The blocking twin of ``_shielded``: a call in a worker thread is never cut off."""
    return fn(*args)


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


def _encode_checkpoint(state: BaseModel, node_id: object, op: str) -> bytes:
    """The checkpoint envelope; StateNotSerializable if the state's JSON cannot be made."""
    data = checkpoint_json(state, node_id, op)
    cls = type(state)
    declare_schema(cls)
    ref = json.dumps(_schema_ref(cls)).encode()
    return b'{"schema":' + ref + b',"data":' + data + b"}"


def _decode_checkpoint(raw: bytes, schema: type[BaseModel] | None, source: str) -> BaseModel:
    try:
        envelope = json.loads(raw)
    except (ValueError, RecursionError):
        raise LogCorrupted(source, "the checkpoint is not JSON") from None
    if not isinstance(envelope, dict) or "schema" not in envelope or "data" not in envelope:
        raise LogCorrupted(source, 'the checkpoint is not a {"schema": ..., "data": ...} object')
    cls = schema if schema is not None else _resolve(envelope["schema"], source)
    try:
        return read_state(cls, json.dumps(envelope["data"]))
    except (ValidationError, ValueError, RecursionError) as e:
        raise LogCorrupted(
            source, f"the checkpoint does not validate as {_schema_ref(cls)}: {e}"
        ) from None


def _is_transient(exc: BaseException) -> bool:
    """Worth retrying: the connection, not the request, failed (reset, refused, timed out,
    the server restarting or loading, no pooled connection free in time)."""
    if _redis is None:
        return isinstance(exc, ConnectionError | TimeoutError)
    e = _redis.exceptions
    if isinstance(exc, e.AuthenticationError):
        return False
    return isinstance(
        exc,
        e.ConnectionError  # includes "No connection available." of a full blocking pool
        | e.TimeoutError
        | e.BusyLoadingError
        | e.TryAgainError
        | e.WatchError
        | ConnectionError
        | TimeoutError
        | OSError,
    )


def _glob_escape(raw: bytes) -> bytes:
    out = bytearray()
    for byte in raw:
        if byte in b"*?[]\\":
            out += b"\\"
        out.append(byte)
    return bytes(out)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class _Keys:
    """The fixed set of keys of one run."""

    __slots__ = ("ckpt", "fence", "inputs", "lease", "log", "tok")

    def __init__(self, prefix: bytes, run: bytes) -> None:
        base = prefix + b":run:{" + str(len(run)).encode() + b":" + run + b"}:"
        self.ckpt = base + b"ckpt"
        self.log = base + b"log"
        self.tok = base + b"tok"
        self.lease = base + b"lease"
        self.fence = base + b"fence"
        self.inputs = base + b"inputs"

    @property
    def data(self) -> tuple[bytes, bytes, bytes]:
        """The keys a run's checkpoints and log live in (its inputs are ``inputs``)."""
        return (self.ckpt, self.log, self.tok)

    @property
    def write(self) -> tuple[bytes, bytes, bytes, bytes, bytes, bytes]:
        """The keys of the write and delete scripts, in their order."""
        return (self.log, self.tok, self.ckpt, self.fence, self.lease, self.inputs)

    @property
    def put_input(self) -> tuple[bytes, bytes, bytes, bytes]:
        """The keys of the put-input script, in its order."""
        return (self.log, self.tok, self.ckpt, self.inputs)


class _Base:
    """What the sync and async stores share: configuration, keys, messages, the lease."""

    _cls_name = "RedisStore"
    _blocking = False  # the store's calls block (SyncRedisStore): leases run them in threads

    def __init__(
        self,
        redis_url: str,
        ttl_seconds: int | None,
        key_prefix: str,
        lease_ms: int,
        max_attempts: int,
        socket_timeout: float,
        max_connections: int,
        pool_timeout: float,
    ) -> None:
        _require_redis(self._cls_name)
        name = self._cls_name
        if not isinstance(redis_url, str) or not redis_url:
            raise StromaValueError(
                f"{name}: redis_url must be a URL like 'redis://localhost:6379/0', "
                f"got {redis_url!r}"
            )
        _check_url(name, redis_url)
        if ttl_seconds is not None and (
            isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int) or ttl_seconds <= 0
        ):
            raise StromaValueError(
                f"{name}: ttl_seconds must be a positive int (seconds) or None for no expiry, "
                f"got {ttl_seconds!r}"
            )
        if (
            not isinstance(key_prefix, str)
            or not key_prefix
            or "{" in key_prefix
            or "}" in key_prefix
        ):
            raise StromaValueError(
                f"{name}: key_prefix must be a non-empty str without '{{' or '}}' (they mark "
                f"Redis Cluster hash tags), got {key_prefix!r}"
            )
        if isinstance(lease_ms, bool) or not isinstance(lease_ms, int) or lease_ms < 10:
            raise StromaValueError(
                f"{name}: lease_ms must be an int of at least 10 (milliseconds), got {lease_ms!r}"
            )
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise StromaValueError(
                f"{name}: max_attempts must be an int >= 1, got {max_attempts!r}")
        for setting, value in (("socket_timeout", socket_timeout), ("pool_timeout", pool_timeout)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise StromaValueError(
                    f"{name}: {setting} must be a positive number of seconds, got {value!r}"
                )
        if (
            isinstance(max_connections, bool)
            or not isinstance(max_connections, int)
            or max_connections < 1
        ):
            raise StromaValueError(
                f"{name}: max_connections must be an int >= 1, got {max_connections!r}"
            )
        self.redis_url = redis_url
        self.ttl_seconds = ttl_seconds
        self.key_prefix = key_prefix
        self.lease_ms = lease_ms
        self.max_attempts = max_attempts
        self.socket_timeout = float(socket_timeout)
        self.max_connections = max_connections
        self.pool_timeout = float(pool_timeout)
        self._prefix = key_prefix.encode("utf-8")
        self._where = _redact(redis_url)
        self._ttl_arg = b"" if ttl_seconds is None else str(ttl_seconds).encode()
        fence_ms = None if ttl_seconds is None else max(ttl_seconds * 1000, 2 * lease_ms)
        self._fence_ttl_arg = b"" if fence_ms is None else str(fence_ms).encode()
        # The fencing token of each run this store object holds the lease on.
        self._fences: dict[str, tuple[str, int]] = {}

    def __repr__(self) -> str:
        return f"{self._cls_name}({self._where!r}, key_prefix={self.key_prefix!r})"

    def _keys(self, run_id: str, op: str) -> _Keys:
        return _Keys(self._prefix, _id_bytes("run id", run_id, f"{self._cls_name}.{op}"))

    def _source(self, run_id: str, what: str) -> str:
        return f"{self._cls_name} at {self._where}, run {run_id!r}, {what}"

    def _pool_kwargs(self, retry_cls: Any) -> dict[str, Any]:
        """The connection pool: bounded, and a caller waits (up to pool_timeout) for a free
        connection instead of failing; each command is retried by the store, not the client."""
        return {
            "max_connections": self.max_connections,
            "timeout": self.pool_timeout,
            "socket_timeout": self.socket_timeout,
            "socket_connect_timeout": min(self.socket_timeout, 5.0),
            "retry": retry_cls(_NoBackoff(), 0),
        }

    def _failure(
        self, op: str, run_id: str | None, exc: BaseException, key: str | None = None
    ) -> StoreError:
        about = f"{self._cls_name}.{op}" + (f" for run {run_id!r}" if run_id is not None else "")
        if key is not None:
            about += f", input {key!r},"
        if _is_transient(exc):
            return StoreError(
                f"{about} failed against {self._where} after {self.max_attempts} "
                f"attempt{'s' if self.max_attempts != 1 else ''}: "
                f"{type(exc).__name__}: {str(exc).rstrip('.')}. Is the Redis server running "
                "and reachable?"
            )
        return StoreError(
            f"{about} failed against {self._where}: {type(exc).__name__}: {exc} (a permanent "
            "error, not retried). Check the server, its credentials and that no other program "
            f"writes under the key prefix {self.key_prefix!r}."
        )

    def _wait(self) -> wait_base:
        # Exponential from 50 ms, capped at 2 s, plus up to 50 ms of jitter.
        return wait_exponential(multiplier=0.05, max=2.0) + wait_random(0, 0.05)

    def _fence_args(self, run_id: str) -> tuple[bytes, bytes]:
        """The fencing token and holder a write of ``run_id`` is checked against (empty for
        a run this store holds no lease on: such writes are not fenced)."""
        held = self._fences.get(run_id)
        if held is None:
            return b"", b""
        return str(held[1]).encode(), held[0].encode()

    def _written(self, op: str, run_id: str, reply: Sequence[Any]) -> None:
        """Raise LeaseLost if a write script refused the write (its fence check failed)."""
        if int(reply[0]) != 0:
            return
        holder, token = self._fences.get(run_id, ("?", 0))
        fence_n, fence_holder, lease = (_text(x) for x in reply[1:4])
        current_token = int(fence_n) if fence_n.isdigit() and lease == fence_holder else None
        raise LeaseLost(f"{self._cls_name}.{op}", run_id, holder, token, lease, current_token)

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

    # ---------------------------------------------------------------------- the lease

    async def _lease_io(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Await one of the store's lease calls: directly, or in a worker thread for the
        blocking store (so its lease works on asyncio and trio)."""
        if self._blocking:
            return await anyio.to_thread.run_sync(fn, *args)
        return await fn(*args)

    def lease(self, run_id: str, holder: str) -> AbstractAsyncContextManager[None]:
        """Claim ``run_id`` for ``holder`` while the context is open, or raise RunLocked.

        The lease lives ``lease_ms`` and is renewed in the background every ``lease_ms / 3``;
        a holder that dies loses it after ``lease_ms``. Each claim gets a fencing token (the
        run's claim counter): while the lease is held, this store's writes of the run are
        checked against it atomically, and a write after another worker took the run over is
        refused with ``LeaseLost`` (a RunLocked). Claiming again under the same holder name
        (after a restart) takes the lease back; a lease left behind by an ended session of
        this same worker (``new_holder()`` names) is taken over at once. If the lease is lost
        while the context is open (renewal failed for ``lease_ms``, or another worker took
        it), the body is cancelled and the context raises StoreError/RunLocked.
        """
        keys = self._keys(run_id, "lease")
        who = _id_bytes("holder", holder, f"{self._cls_name}.lease")
        me: Any = self

        async def claim(takeover: str | None) -> tuple[bool, str, int]:
            result: tuple[bool, str, int] = await self._lease_io(
                me._claim, run_id, keys, who, takeover
            )
            return result

        async def renew(token: int) -> tuple[bool, str]:
            result: tuple[bool, str] = await self._lease_io(me._renew, keys, who, token)
            return result

        async def release() -> None:
            await self._lease_io(me._release, run_id, keys, who)

        return hold_lease(
            self, run_id, holder, self.lease_ms / 1000,
            space=f"redis {self._where} {self.key_prefix}",
            claim=claim, renew=renew, release=release, is_transient=_is_transient,
            fences=self._fences,
        )
