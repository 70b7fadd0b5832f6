"""PostgresStore: checkpoints, the effect log and run leases in PostgreSQL, on asyncpg.

asyncpg runs on **asyncio only**: under trio every operation raises a StoreError saying so.
It is the optional ``postgres`` extra (``pip install 'stroma[postgres]'``); importing this
module works without it, constructing a store does not.

Tables (``{prefix}`` is ``table_prefix``, in ``schema``), created on first use or by
``await store.setup()`` (idempotent; concurrent setups are serialized by an advisory lock)::

    {prefix}_checkpoints (run_id, node_id, schema_ref, state, updated_at)  PK (run_id, node_id)
    {prefix}_log         (run_id, seq, line, append_id)                     PK (run_id, seq)
    {prefix}_leases      (run_id, holder, expires_at, fence)                PK (run_id)
    {prefix}_inputs      (run_id, key, payload, updated_at)                 PK (run_id, key)

and the sequence ``{prefix}_lease_fence`` (owned by the leases table, dropped with it) that
gives each claim its fencing token. ``state`` is the model's JSON text (text, not jsonb: it
reads back byte for byte and may hold ``\\u0000``). ``append_log`` writes the log rows and
the checkpoint in one transaction, under a per-run advisory lock, with ``seq`` continuing
from the run's current maximum; readers only ever see whole transactions. A retried append
is applied once (its ``append_id`` is checked before writing again). ``delete`` removes the
run's checkpoints, log and inputs and an expired lease row; a live lease stays with its
holder and ends when the holder exits or dies.

``{prefix}_inputs`` holds the inputs sent to waiting runs (``put_input``: the JSON text by
the wait's key, an upsert, the latest wins). Setup creates it with ``IF NOT EXISTS`` like
the others, so a database made by an earlier version gets it the first time a store of
this version connects, nothing else changed. A put is not fenced: inputs are not part of
the log, and a run may be sent its input while a worker holds it; the put writes only its
own row of the inputs table, so it never changes the log or the checkpoints.

**Under faults.**

* A worker that lost its lease cannot write: while a store object holds a run's lease,
  every write of that run (``append_log``, ``save``, ``delete``) reads the lease row
  ``FOR SHARE`` in the write's own transaction and is refused with ``LeaseLost`` (a
  RunLocked), nothing written, unless the row still carries this worker's fencing token.
* Transient failures (connection refused/reset/lost, a backend terminated by
  ``pg_terminate_backend``, "another operation is in progress" on a broken connection,
  timeouts, serialization failures, deadlocks, too many connections, server restarts, no
  pooled connection free within ``pool_timeout``) are retried with tenacity, a bounded
  number of times with jittered exponential waits. A connection that failed (or whose
  operation was cancelled) is terminated, never handed back to the pool half-used.
  Anything else, or a failure that outlasts the retries, is a StoreError naming the
  operation, the run and the server: no asyncpg exception leaves the store.
* Under load a call waits (up to ``pool_timeout``) for one of the pool's
  ``max_connections`` connections instead of failing.
* A run cancelled from outside never leaves its lease behind, a release that fails is
  retried, and a lease this worker left behind is taken over at once (see ``_lease``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import anyio
from pydantic import BaseModel, ValidationError
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

from interpreters.stores._checks import checkpoint_json, require_model_type
from interpreters.stores._common import (
    RunInfo,
    check_input_text,
    check_lines,
    require_asyncio,
    run_info,
)
from interpreters.stores._common import check_state as _check_state
from interpreters.stores._common import resolve as _resolve
from interpreters.stores._lease import LeaseLost, hold_lease
from stroma.errors import LogCorrupted, StoreError, StromaError, StromaImportError, StromaValueError
from stroma.schemas import _schema_ref, declare_schema, read_state

if TYPE_CHECKING:
    from stroma.log import EffectLog

try:
    import asyncpg as _asyncpg
except ImportError:  # the optional extra is missing: constructing a store says how to fix it
    _asyncpg = None

__all__ = ("PostgresStore",)

_log = logging.getLogger("stroma.stores.postgres")
_T = TypeVar("_T")

_MAX_ID_BYTES = 1024  # run id + node id must fit a btree index entry (~2.7 kB)
_INSTALL_HINT = "PostgresStore needs the 'asyncpg' package: pip install 'stroma[postgres]'"
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# ----------------------------------------------------------------------------- helpers


def _redact(dsn: str) -> str:
    """The DSN without its password, for error messages."""
    try:
        parts = urlsplit(dsn)
        if not parts.scheme or parts.password is None:
            return re.sub(r"(password\s*=\s*)\S+", r"\1***", dsn)
        host = parts.netloc.rsplit("@", 1)[1]
        return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))
    except ValueError:
        return "<unparsable dsn>"


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _id_text(kind: str, value: object, op: str) -> str:
    """A valid run/node/holder id, or a StoreError saying what is wrong with it."""
    if not isinstance(value, str):
        raise StoreError(
            f"{op}: the {kind} must be a str, got {value!r} (a {type(value).__name__}); "
            f"pass the {kind} as text"
        )
    if not value:
        raise StoreError(f"{op}: the {kind} is empty; pass a non-empty {kind}")
    if "\x00" in value:
        raise StoreError(
            f"{op}: the {kind} {value!r} contains a NUL character, which PostgreSQL text "
            f"cannot store; remove it from the {kind}"
        )
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise StoreError(
            f"{op}: the {kind} {value!r} is not valid Unicode text (it has a lone surrogate); "
            "pass text that encodes as UTF-8"
        ) from None
    if size > _MAX_ID_BYTES:
        raise StoreError(
            f"{op}: the {kind} is {size} bytes long (UTF-8), more than the {_MAX_ID_BYTES} "
            f"allowed; use a shorter {kind} (a hash of it, for example)"
        )
    return value


def _is_transient(exc: BaseException) -> bool:
    """Worth retrying: the connection or the server's state, not the request, failed."""
    if isinstance(exc, OSError | TimeoutError):  # refused, reset, unreachable; timeouts
        return True
    if _asyncpg is None:
        return False
    e = _asyncpg.exceptions
    if isinstance(exc, e.ClientConfigurationError):  # a DSN asyncpg cannot read: no retry
        return False
    return isinstance(
        exc,
        e.PostgresConnectionError  # connection lost / does not exist / failure (class 08)
        | e.InterfaceError  # e.g. "connection is closed", "pool is closing"
        | e.InternalClientError  # "cannot switch to state ...; another operation is in progress"
        | e.SerializationError
        | e.DeadlockDetectedError
        | e.TooManyConnectionsError
        | e.CannotConnectNowError
        | e.AdminShutdownError  # pg_terminate_backend, a server shutting down
        | e.CrashShutdownError
        | e.QueryCanceledError,
    )


def _lock_key(*parts: str) -> int:
    """A signed 64-bit advisory lock key for these strings."""
    digest = hashlib.blake2b("\x00".join(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _close_with_loop(pool: Any) -> AsyncGenerator[None, None]:
    """An async generator, started, whose ``finally`` closes ``pool``: the running loop
    finalizes it when it shuts down or the store is garbage collected, so a store nobody
    closed leaves no connection open (and no ResourceWarning)."""

    async def closer() -> AsyncGenerator[None, None]:
        try:
            yield
        finally:
            try:
                await asyncio.wait_for(pool.close(), 5.0)
            except (Exception, asyncio.CancelledError):
                pool.terminate()

    agen = closer()
    try:
        agen.asend(None).send(None)  # to the first yield: registers it with the loop
    except StopIteration:
        pass
    return agen


# ----------------------------------------------------------------------------- store


class PostgresStore:
    """Checkpoints, effect logs and leases in PostgreSQL (asyncpg, asyncio only).

    ``PostgresStore(dsn, *, schema="public", table_prefix="stroma", lease_seconds=30,
    max_attempts=5, max_connections=10, pool_timeout=30.0, command_timeout=30.0,
    application_name="stroma")``.

    The connection pool (at most ``max_connections`` connections) is created lazily on the
    event loop of the first call (and made anew if a later call runs on another loop);
    under load a call waits up to ``pool_timeout`` seconds for a free connection (then the
    wait counts as a transient failure and is retried). Transient failures are retried up
    to ``max_attempts`` times; ``command_timeout`` bounds each statement. Connections show
    as ``application_name`` in ``pg_stat_activity``. ``await store.close()`` (or
    ``async with PostgresStore(dsn) as store:``) closes the pool; a store that is never
    closed is closed when its event loop shuts down (or when it is garbage collected), so
    it leaves no connection open.
    """

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "public",
        table_prefix: str = "stroma",
        lease_seconds: float = 30,
        max_attempts: int = 5,
        max_connections: int = 10,
        pool_timeout: float = 30.0,
        command_timeout: float = 30.0,
        application_name: str = "stroma",
    ) -> None:
        if _asyncpg is None:
            raise StromaImportError(_INSTALL_HINT)
        if not isinstance(dsn, str) or not dsn:
            raise StromaValueError(
                "PostgresStore: dsn must be a connection string like "
                f"'postgresql://user@localhost:5432/db', got {dsn!r}"
            )
        scheme = dsn.split("://", 1)[0].lower() if "://" in dsn else ""
        if scheme not in ("postgresql", "postgres"):
            raise StromaValueError(
                "PostgresStore: dsn must be a URL like 'postgresql://user@localhost:5432/db' "
                f"or 'postgres://...' (asyncpg reads no other form), got {_redact(dsn)!r}"
            )
        if not isinstance(schema, str) or not _IDENT.match(schema) or len(schema) > 63:
            raise StromaValueError(
                "PostgresStore: schema must be a plain SQL identifier (letters, digits, "
                f"underscores; at most 63 characters), got {schema!r}"
            )
        if (
            not isinstance(table_prefix, str)
            or not _IDENT.match(table_prefix)
            or len(table_prefix) > 40
        ):
            raise StromaValueError(
                "PostgresStore: table_prefix must be a plain SQL identifier (letters, digits, "
                f"underscores; at most 40 characters), got {table_prefix!r}"
            )
        if (
            isinstance(lease_seconds, bool)
            or not isinstance(lease_seconds, int | float)
            or not lease_seconds > 0.01
        ):
            raise StromaValueError(
                f"PostgresStore: lease_seconds must be a number of seconds above 0.01, "
                f"got {lease_seconds!r}"
            )
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise StromaValueError(
                f"PostgresStore: max_attempts must be an int >= 1, got {max_attempts!r}"
            )
        if (
            isinstance(max_connections, bool)
            or not isinstance(max_connections, int)
            or max_connections < 1
        ):
            raise StromaValueError(
                f"PostgresStore: max_connections must be an int >= 1, got {max_connections!r}"
            )
        for setting, value in (
            ("pool_timeout", pool_timeout), ("command_timeout", command_timeout)
        ):
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise StromaValueError(
                    f"PostgresStore: {setting} must be a positive number of seconds, "
                    f"got {value!r}"
                )
        if not isinstance(application_name, str) or not application_name:
            raise StromaValueError(
                "PostgresStore: application_name must be a non-empty str (it names the "
                f"store's connections in pg_stat_activity), got {application_name!r}"
            )
        self.dsn = dsn
        self.schema = schema
        self.table_prefix = table_prefix
        self.lease_seconds = float(lease_seconds)
        self.max_attempts = max_attempts
        self.max_connections = max_connections
        self.pool_timeout = float(pool_timeout)
        self.command_timeout = command_timeout
        self.application_name = application_name
        self._where = _redact(dsn)
        s = _quote(schema)
        self.checkpoints_table = f"{s}.{_quote(table_prefix + '_checkpoints')}"
        self.log_table = f"{s}.{_quote(table_prefix + '_log')}"
        self.leases_table = f"{s}.{_quote(table_prefix + '_leases')}"
        self.inputs_table = f"{s}.{_quote(table_prefix + '_inputs')}"
        self.fence_sequence = f"{s}.{_quote(table_prefix + '_lease_fence')}"
        self._pool: Any = None
        self._pool_loop: asyncio.AbstractEventLoop | None = None
        self._pool_lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None
        self._closer: Any = None
        self._ready = False
        # The fencing token of each run this store object holds the lease on.
        self._fences: dict[str, tuple[str, int]] = {}
        self._sql()

    def __repr__(self) -> str:
        return (
            f"PostgresStore({self._where!r}, schema={self.schema!r}, "
            f"table_prefix={self.table_prefix!r})"
        )

    async def __aenter__(self) -> PostgresStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def tables(self) -> tuple[str, str, str, str]:
        """The qualified, quoted names of the checkpoint, log, lease and input tables."""
        return (self.checkpoints_table, self.log_table, self.leases_table, self.inputs_table)

    def _sql(self) -> None:
        c, lg, ls, inp = self.tables
        self._q_upsert = (
            f"INSERT INTO {c} (run_id, node_id, schema_ref, state, updated_at) "
            "VALUES ($1, $2, $3, $4, now()) ON CONFLICT (run_id, node_id) DO UPDATE SET "
            "schema_ref = EXCLUDED.schema_ref, state = EXCLUDED.state, "
            "updated_at = EXCLUDED.updated_at"
        )
        self._q_load = f"SELECT schema_ref, state FROM {c} WHERE run_id = $1 AND node_id = $2"
        self._q_append = (
            f"INSERT INTO {lg} (run_id, seq, line, append_id) "
            "SELECT $1, b.n + t.o - 1, t.l, $3 "
            "FROM unnest($2::text[]) WITH ORDINALITY AS t(l, o), "
            f"(SELECT coalesce(max(seq) + 1, 0) AS n FROM {lg} WHERE run_id = $1) AS b"
        )
        self._q_applied = f"SELECT EXISTS (SELECT 1 FROM {lg} WHERE run_id = $1 AND append_id = $2)"
        self._q_read = f"SELECT line FROM {lg} WHERE run_id = $1 ORDER BY seq"
        self._q_put_input = (
            f"INSERT INTO {inp} (run_id, key, payload, updated_at) VALUES ($1, $2, $3, now()) "
            "ON CONFLICT (run_id, key) DO UPDATE SET payload = EXCLUDED.payload, "
            "updated_at = EXCLUDED.updated_at"
        )
        self._q_get_input = f"SELECT payload FROM {inp} WHERE run_id = $1 AND key = $2"
        # Claims if free (or expired), ours by name, or the takeover's ($4); every claim
        # takes the next fencing token.
        self._q_claim = (
            "WITH claimed AS ("
            f"INSERT INTO {ls} AS l (run_id, holder, expires_at, fence) "
            "VALUES ($1, $2, now() + make_interval(secs => $3), "
            f"nextval('{self.fence_sequence}'::regclass)) "
            "ON CONFLICT (run_id) DO UPDATE SET holder = EXCLUDED.holder, "
            "expires_at = EXCLUDED.expires_at, fence = EXCLUDED.fence "
            "WHERE l.expires_at <= now() OR l.holder = EXCLUDED.holder OR l.holder = $4 "
            "RETURNING l.holder, l.fence) "
            "SELECT true AS ok, holder, fence FROM claimed UNION ALL "
            f"SELECT false, holder, fence FROM {ls} "
            "WHERE run_id = $1 AND NOT EXISTS (SELECT 1 FROM claimed)"
        )
        # Extends the lease while its row still carries our token.
        self._q_renew = (
            "WITH renewed AS ("
            f"UPDATE {ls} SET expires_at = now() + make_interval(secs => $3) "
            "WHERE run_id = $1 AND holder = $2 AND fence = $4 RETURNING holder) "
            "SELECT true AS ok, holder FROM renewed UNION ALL "
            f"SELECT false, holder FROM {ls} "
            "WHERE run_id = $1 AND NOT EXISTS (SELECT 1 FROM renewed)"
        )
        self._q_release = f"DELETE FROM {ls} WHERE run_id = $1 AND holder = $2"
        # A write's fence check: the lease row, locked against a concurrent claim until the
        # write commits.
        self._q_fence = f"SELECT holder, fence FROM {ls} WHERE run_id = $1 FOR SHARE"
        # The same after taking the run's advisory lock ($2), in one round trip.
        self._q_lock_fence = (
            "SELECT f.holder, f.fence FROM (SELECT pg_advisory_xact_lock($2)) AS a "
            f"LEFT JOIN LATERAL (SELECT holder, fence FROM {ls} WHERE run_id = $1 FOR SHARE) "
            "AS f ON true"
        )
        self._q_setup = [
            f"CREATE TABLE IF NOT EXISTS {c} (run_id text NOT NULL, node_id text NOT NULL, "
            "schema_ref text NOT NULL, state text NOT NULL, "
            "updated_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (run_id, node_id))",
            f"CREATE TABLE IF NOT EXISTS {lg} (run_id text NOT NULL, seq bigint NOT NULL, "
            "line text NOT NULL, append_id text, PRIMARY KEY (run_id, seq))",
            f"CREATE TABLE IF NOT EXISTS {ls} (run_id text PRIMARY KEY, holder text NOT NULL, "
            "expires_at timestamptz NOT NULL, fence bigint NOT NULL DEFAULT 0)",
            # Tables made before leases were fenced get the column.
            f"ALTER TABLE {ls} ADD COLUMN IF NOT EXISTS fence bigint NOT NULL DEFAULT 0",
            f"CREATE SEQUENCE IF NOT EXISTS {self.fence_sequence} OWNED BY {ls}.fence",
            # Added with await_input: databases made before get it on their next setup.
            f"CREATE TABLE IF NOT EXISTS {inp} (run_id text NOT NULL, key text NOT NULL, "
            "payload text NOT NULL, updated_at timestamptz NOT NULL DEFAULT now(), "
            "PRIMARY KEY (run_id, key))",
        ]
        if self.schema != "public":
            self._q_setup.insert(0, f"CREATE SCHEMA IF NOT EXISTS {_quote(self.schema)}")

    def _source(self, run_id: str, what: str) -> str:
        return f"PostgresStore at {self._where}, run {run_id!r}, {what}"

    def _failure(
        self, op: str, run_id: str | None, exc: BaseException, key: str | None = None
    ) -> StoreError:
        about = f"PostgresStore.{op}" + (f" for run {run_id!r}" if run_id is not None else "")
        if key is not None:
            about += f", input {key!r},"
        if _is_transient(exc):
            return StoreError(
                f"{about} failed against {self._where} after {self.max_attempts} "
                f"attempt{'s' if self.max_attempts != 1 else ''}: "
                f"{': '.join(filter(None, (type(exc).__name__, str(exc))))}. Is the "
                "PostgreSQL server running and reachable?"
            )
        return StoreError(
            f"{about} failed against {self._where}: {type(exc).__name__}: {exc} (a permanent "
            "error, not retried). Check the DSN, the database, the role's privileges and the "
            f"tables {', '.join(self.tables)}."
        )

    # --------------------------------------------------------------------- the pool

    async def _get_pool(self) -> Any:
        require_asyncio("PostgresStore", "asyncpg")
        loop = asyncio.get_running_loop()
        if self._pool is not None and self._pool_loop is loop:
            if not self._ready:
                await self._setup(self._pool)
            return self._pool
        if self._pool_lock is None or self._lock_loop is not loop:
            self._pool_lock, self._lock_loop = asyncio.Lock(), loop
        async with self._pool_lock:
            if self._pool is None or self._pool_loop is not loop:
                old, self._pool = self._pool, None
                if old is not None:  # it belongs to another (likely closed) loop
                    try:
                        old.terminate()
                    except Exception:  # nothing left to release on a dead loop
                        _log.debug("could not terminate a pool of a previous event loop")
                self._pool = await _asyncpg.create_pool(
                    self.dsn,
                    min_size=1,
                    max_size=self.max_connections,
                    command_timeout=self.command_timeout,
                    server_settings={"application_name": self.application_name},
                )
                self._pool_loop = loop
                self._closer = _close_with_loop(self._pool)
            if not self._ready:
                await self._setup(self._pool)
        return self._pool

    @asynccontextmanager
    async def _conn(self) -> AsyncIterator[Any]:
        """A pooled connection; one that failed or was cancelled mid-operation is
        terminated (its protocol state is unknown), never handed back half-used."""
        pool = await self._get_pool()
        conn = await pool.acquire(timeout=self.pool_timeout)
        try:
            yield conn
        except BaseException as exc:
            if not isinstance(exc, StromaError):
                conn.terminate()
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await pool.release(conn)

    async def _setup(self, pool: Any) -> None:
        async with pool.acquire(timeout=self.pool_timeout) as conn, conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock($1)",
                _lock_key("stroma-setup", self.schema, self.table_prefix),
            )
            for statement in self._q_setup:
                await conn.execute(statement)
        self._ready = True

    async def setup(self) -> None:
        """Create the schema's tables if they do not exist (idempotent, safe to race)."""
        self._ready = False
        await self._run("setup", None, lambda _: self._get_pool())

    async def close(self) -> None:
        """Close the connection pool (a later call opens a new one)."""
        pool, self._pool, self._pool_loop = self._pool, None, None
        closer, self._closer = self._closer, None
        if closer is not None:
            await closer.aclose()  # its finally closes the pool
        elif pool is not None:
            await pool.close()

    async def _run(
        self,
        op: str,
        run_id: str | None,
        fn: Callable[[int], Awaitable[_T]],
        key: str | None = None,
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
            # Exponential from 50 ms, capped at 2 s, plus up to 50 ms of jitter.
            wait=wait_exponential(multiplier=0.05, max=2.0) + wait_random(0, 0.05),
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

    async def _check_fence(
        self, conn: Any, op: str, run_id: str, lock: int | None = None
    ) -> None:
        """Inside a write's transaction (after taking the advisory lock ``lock`` if given):
        refuse the write unless this store's lease on the run is still the current one (a
        run without a lease held here is not fenced)."""
        held = self._fences.get(run_id)
        if held is None:
            if lock is not None:
                await conn.execute("SELECT pg_advisory_xact_lock($1)", lock)
            return
        holder, token = held
        if lock is None:
            row = await conn.fetchrow(self._q_fence, run_id)
        else:
            row = await conn.fetchrow(self._q_lock_fence, run_id, lock)
        if row is None or row["holder"] != holder or row["fence"] != token:
            current = None if row is None else row["holder"]
            raise LeaseLost(
                f"PostgresStore.{op}", run_id, holder, token,
                "" if current is None else str(current),
                None if current is None else int(row["fence"]),
            )

    # ------------------------------------------------------------------ checkpoints

    async def save(self, run_id: str, node_id: str, state: BaseModel) -> None:
        op = "PostgresStore.save"
        run_id = _id_text("run id", run_id, op)
        node_id = _id_text("node id", node_id, op)
        state = _check_state(state, node_id, op)
        text = checkpoint_json(state, node_id, op).decode()
        declare_schema(type(state))
        args = (run_id, node_id, _schema_ref(type(state)), text)

        async def once(_: int) -> None:
            async with self._conn() as conn:
                if run_id not in self._fences:
                    await conn.execute(self._q_upsert, *args)
                    return
                async with conn.transaction():
                    await self._check_fence(conn, "save", run_id)
                    await conn.execute(self._q_upsert, *args)

        await self._run("save", run_id, once)

    async def save_typed(self, run_id: str, node_id: str, state: BaseModel, schema: type) -> None:
        require_model_type("PostgresStore.save_typed", schema)
        declare_schema(schema)
        await self.save(run_id, node_id, state)

    async def _load(
        self, run_id: str, node_id: str, schema: type[BaseModel] | None, op: str
    ) -> BaseModel | None:
        run_id = _id_text("run id", run_id, f"PostgresStore.{op}")
        node_id = _id_text("node id", node_id, f"PostgresStore.{op}")

        async def once(_: int) -> Any:
            async with self._conn() as conn:
                return await conn.fetchrow(self._q_load, run_id, node_id)

        row = await self._run(op, run_id, once)
        if row is None:
            return None
        source = self._source(run_id, f"checkpoint {node_id!r}")
        cls = schema if schema is not None else _resolve(row["schema_ref"], source)
        try:
            return read_state(cls, row["state"])
        except (ValidationError, ValueError, RecursionError) as e:
            raise LogCorrupted(
                source, f"the checkpoint does not validate as {_schema_ref(cls)}: {e}"
            ) from None

    async def load(self, run_id: str, node_id: str) -> BaseModel | None:
        return await self._load(run_id, node_id, None, "load")

    async def load_typed(
        self, run_id: str, node_id: str, schema: type[BaseModel]
    ) -> BaseModel | None:
        require_model_type("PostgresStore.load_typed", schema)
        declare_schema(schema)
        return await self._load(run_id, node_id, schema, "load_typed")

    async def delete(self, run_id: str) -> None:
        """Remove the run's checkpoints, log, inputs and expired lease row (a live lease
        stays)."""
        run_id = _id_text("run id", run_id, "PostgresStore.delete")
        c, lg, ls, inp = self.tables

        async def once(_: int) -> None:
            async with self._conn() as conn, conn.transaction():
                await self._check_fence(conn, "delete", run_id)
                await conn.execute(f"DELETE FROM {c} WHERE run_id = $1", run_id)
                await conn.execute(f"DELETE FROM {lg} WHERE run_id = $1", run_id)
                await conn.execute(f"DELETE FROM {inp} WHERE run_id = $1", run_id)
                if run_id not in self._fences:  # a lease held here stays with this store
                    await conn.execute(
                        f"DELETE FROM {ls} WHERE run_id = $1 AND expires_at <= now()", run_id
                    )

        await self._run("delete", run_id, once)

    # ----------------------------------------------------------------------- inputs

    async def put_input(self, run_id: str, key: str, text: str) -> None:
        """Keep ``text`` (the input's JSON text) as the input ``key`` of run ``run_id``; a
        later put of the same key replaces it (the latest wins).

        Inputs are not part of the run's log, so a put is not fenced: it is allowed while a
        worker (this store object or another) holds the run's lease. It is one statement
        on the run's row of the inputs table, outside the log's advisory lock, so it never
        changes, or damages, the log or the checkpoints. ``send_input`` is the checked way
        to send one.
        """
        op = "PostgresStore.put_input"
        run_id = _id_text("run id", run_id, op)
        key = _id_text("input key", key, op)
        text = check_input_text(text, run_id, key, op)  # JSON: no NUL outside an escape

        async def once(_: int) -> None:
            async with self._conn() as conn:
                await conn.execute(self._q_put_input, run_id, key, text)

        await self._run("put_input", run_id, once, key)

    async def get_input(self, run_id: str, key: str) -> str | None:
        """The text last put as the input ``key`` of run ``run_id``, or None."""
        op = "PostgresStore.get_input"
        run_id = _id_text("run id", run_id, op)
        key = _id_text("input key", key, op)

        async def once(_: int) -> str | None:
            async with self._conn() as conn:
                value: str | None = await conn.fetchval(self._q_get_input, run_id, key)
            return value

        return await self._run("get_input", run_id, once, key)

    async def lease_holder(self, run_id: str) -> str | None:
        """The holder of run ``run_id``'s lease (a worker running it now), or None: nobody
        holds it (the run ended, waits, was never run here, or its worker died and the lease
        expired)."""
        run_id = _id_text("run id", run_id, "PostgresStore.lease_holder")
        query = f"SELECT holder FROM {self.leases_table} WHERE run_id = $1 AND expires_at > now()"

        async def once(_: int) -> str | None:
            async with self._conn() as conn:
                value: str | None = await conn.fetchval(query, run_id)
            return value

        return await self._run("lease_holder", run_id, once)

    # ------------------------------------------------------------------- effect log

    async def append_log(
        self, run_id: str, lines: Sequence[str], checkpoint: tuple[str, BaseModel] | None = None
    ) -> None:
        """Append JSON lines to the run's log and save ``checkpoint`` in one transaction."""
        op = "PostgresStore.append_log"
        run_id = _id_text("run id", run_id, op)
        rows = check_lines(lines, op, nul=True)
        item: tuple[str, str, str] | None = None
        if checkpoint is not None:
            node_id, state = checkpoint
            node_id = _id_text("node id", node_id, op)
            state = _check_state(state, node_id, op)
            text = checkpoint_json(state, node_id, op).decode()
            declare_schema(type(state))
            item = (node_id, _schema_ref(type(state)), text)
        if not rows and item is None:
            return
        token = uuid.uuid4().hex
        lock = _lock_key("stroma-log", self.schema, self.table_prefix, run_id)

        async def once(attempt: int) -> None:
            async with self._conn() as conn, conn.transaction():
                # The advisory lock serializes appends to this run (seq continues from the
                # current max); the fence check comes with it.
                await self._check_fence(conn, "append_log", run_id, lock if rows else None)
                if rows:
                    # An earlier attempt may have committed before its reply was lost.
                    if attempt == 1 or not await conn.fetchval(self._q_applied, run_id, token):
                        await conn.execute(self._q_append, run_id, rows, token)
                if item is not None:
                    await conn.execute(self._q_upsert, run_id, *item)

        await self._run("append_log", run_id, once)

    async def read_log(self, run_id: str) -> EffectLog | None:
        """The run's effect log, or None if it has none."""
        from stroma.log import EffectLog

        run_id = _id_text("run id", run_id, "PostgresStore.read_log")

        async def once(_: int) -> list[str]:
            async with self._conn() as conn:
                records = await conn.fetch(self._q_read, run_id)
            return [r["line"] for r in records]

        lines = await self._run("read_log", run_id, once)
        if not lines:
            return None
        return EffectLog.from_lines(lines, source=self._source(run_id, "effect log"),
                                    whole=True)  # (each append is one transaction)

    async def run_ids(self) -> list[str]:
        """The ids of the runs that have checkpoints or a log, sorted."""
        c, lg, _, _ = self.tables

        async def once(_: int) -> list[str]:
            async with self._conn() as conn:
                records = await conn.fetch(
                    f"SELECT run_id FROM {c} UNION SELECT run_id FROM {lg}"
                )
            return [r["run_id"] for r in records]

        return sorted(await self._run("run_ids", None, once))

    async def list_runs(self) -> list[RunInfo]:
        """A summary of every run in the tables (sorted by run id); see RunInfo."""
        c = self.checkpoints_table
        infos: list[RunInfo] = []
        for run_id in await self.run_ids():
            log: EffectLog | LogCorrupted | None
            try:
                log = await self.read_log(run_id)
            except LogCorrupted as e:
                log = e

            async def count(_: int, run_id: str = run_id) -> int:
                async with self._conn() as conn:
                    n = await conn.fetchval(f"SELECT count(*) FROM {c} WHERE run_id = $1", run_id)
                return int(n)

            done = await self._run("list_runs", run_id, count)
            infos.append(run_info(run_id, log, done, self._source(run_id, "effect log")))
        return infos

    # ---------------------------------------------------------------------- lease

    def lease(self, run_id: str, holder: str) -> AbstractAsyncContextManager[None]:
        """Claim ``run_id`` for ``holder`` while the context is open, or raise RunLocked.

        The lease row lives ``lease_seconds`` (server time) and is renewed in the background
        every ``lease_seconds / 3``; a holder that dies loses it after ``lease_seconds``.
        Each claim takes the next fencing token from the store's sequence: while the lease
        is held, this store's writes of the run check it in their own transaction, and a
        write after another worker took the run over is refused with ``LeaseLost`` (a
        RunLocked). Claiming again under the same holder name (after a restart) takes the
        lease back; a lease left behind by an ended session of this same worker
        (``new_holder()`` names) is taken over at once. If the lease is lost while the
        context is open, the body is cancelled and the context raises StoreError (or
        RunLocked if another worker took it).
        """
        op = "PostgresStore.lease"
        run_id = _id_text("run id", run_id, op)
        holder = _id_text("holder", holder, op)
        seconds = self.lease_seconds

        async def claim_round_trip(takeover: str) -> tuple[bool, str, int]:
            async with self._conn() as conn:
                for _ in range(3):
                    row = await conn.fetchrow(self._q_claim, run_id, holder, seconds, takeover)
                    if row is not None:
                        return bool(row["ok"]), str(row["holder"]), int(row["fence"])
                    # The row that blocked us vanished in between: claim again.
            return False, "<unknown: the lease changed hands during the claim>", 0

        async def claim(takeover: str | None) -> tuple[bool, str, int]:
            async def once(_: int) -> tuple[bool, str, int]:
                with anyio.CancelScope(shield=True):  # never cut off once the server may grant it
                    result = await claim_round_trip(takeover or "")
                return result

            return await self._run("lease", run_id, once)

        async def renew(token: int) -> tuple[bool, str]:
            async with self._conn() as conn:
                row = await conn.fetchrow(self._q_renew, run_id, holder, seconds, token)
            if row is None:
                return False, ""
            return bool(row["ok"]), str(row["holder"])

        async def release() -> None:
            async def once(_: int) -> None:
                async with self._conn() as conn:
                    await conn.execute(self._q_release, run_id, holder)

            await self._run("release", run_id, once)

        return hold_lease(
            self, run_id, holder, seconds,
            space=f"postgres {self._where} {self.schema}.{self.table_prefix}",
            claim=claim, renew=renew, release=release, is_transient=_is_transient,
            fences=self._fences,
        )
