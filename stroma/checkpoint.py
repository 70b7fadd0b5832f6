"""Checkpoint stores: the protocols, ``CheckpointManager``, and the stores re-exported
from ``interpreters.stores`` (the in-memory ones, and Redis on first use).

A store is anything with ``save``, ``load`` and ``delete`` (sync or async): structural
typing, no base class. Stores that also hold the effect log implement ``LogStore``
(durable: ``append_log`` / ``read_log``, used by FileStore, RedisStore, PostgresStore) or
keep the in-process ``EffectLog`` object by reference (``attach_log``, the memory stores).
Stores that can claim a run for one worker implement ``lease``.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

from pydantic import BaseModel, ValidationError

from interpreters.stores.memory import AsyncInMemoryStore, InMemoryStore
from stroma.errors import StoreError, StromaError, StromaTypeError
from stroma.log import EffectLog
from stroma.schemas import _resolve_schema, _schema_ref, declare_schema, first_error

if TYPE_CHECKING:
    from interpreters.stores.redis import RedisStore, SyncRedisStore

__all__ = (
    "AsyncCheckpointStore",
    "AsyncInMemoryStore",
    "CheckpointKey",
    "CheckpointManager",
    "CheckpointStore",
    "InMemoryStore",
    "LeaseStore",
    "LogStore",
    "RedisStore",
    "SyncRedisStore",
    "_resolve_schema",
    "_schema_ref",
    "awaitable_from_sync",
    "is_async_callable",
    "is_async_store",
    "store_failed",
)


class CheckpointKey(NamedTuple):
    """Where a checkpoint lives: the run and the node whose output it is."""

    run_id: str
    node_id: str


@runtime_checkable
class CheckpointStore(Protocol):
    """A synchronous store."""

    def save(self, run_id: str, node_id: str, state: BaseModel) -> None: ...

    def load(self, run_id: str, node_id: str) -> BaseModel | None: ...

    def delete(self, run_id: str) -> None: ...


@runtime_checkable
class AsyncCheckpointStore(Protocol):
    """An asynchronous store."""

    async def save(self, run_id: str, node_id: str, state: BaseModel) -> None: ...

    async def load(self, run_id: str, node_id: str) -> BaseModel | None: ...

    async def delete(self, run_id: str) -> None: ...


@runtime_checkable
class LogStore(Protocol):
    """A store that durably holds effect logs beside the checkpoints.

    ``append_log`` appends JSON lines (a new log starts with its header line) and, when
    ``checkpoint`` is given, saves that ``(node_id, state)`` in the same commit: when it
    returns, both are durable. ``read_log`` gives the run's log, or None if it has none.
    """

    async def append_log(
        self, run_id: str, lines: Sequence[str], checkpoint: tuple[str, BaseModel] | None = None
    ) -> None: ...

    async def read_log(self, run_id: str) -> EffectLog | None: ...


@runtime_checkable
class LeaseStore(Protocol):
    """A store that can claim a run for one worker: ``lease`` raises RunLocked if taken."""

    def lease(self, run_id: str, holder: str) -> AbstractAsyncContextManager[None]: ...


def is_async_store(store: object) -> bool:
    """Whether the store's ``save`` is asynchronous: an ``async def``, one under a
    decorator that keeps ``__wrapped__`` (``functools.wraps``), or an object whose
    ``__call__`` is one."""
    return is_async_callable(getattr(store, "save", None))


def is_async_callable(fn: object) -> bool:
    """Whether calling ``fn`` gives a coroutine, as far as can be told without calling it:
    a coroutine function (a partial of one too), a function wrapping one with
    ``functools.wraps``, or an object whose ``__call__`` is one of those."""
    if fn is None:
        return False
    if inspect.iscoroutinefunction(fn):
        return True
    try:
        unwrapped = inspect.unwrap(fn)  # type: ignore[arg-type]
    except ValueError:  # (a cycle of __wrapped__)
        unwrapped = fn
    if unwrapped is not fn and inspect.iscoroutinefunction(unwrapped):
        return True
    if callable(fn) and not (inspect.isroutine(fn) or isinstance(fn, type)):
        call = type(fn).__call__
        return call is not fn and is_async_callable(call)
    return False


def awaitable_from_sync(store: object, method: str, result: object, run_id: str,
                        node_id: str | None = None) -> StoreError:
    """The error for a store method that was taken as synchronous (it is no coroutine
    function) and returned an awaitable all the same: the awaitable is closed (never
    awaited: what it would have done is not done) and the error says so, and the fix."""
    close = getattr(result, "close", None)
    if callable(close):
        close()
    node = f", node {node_id!r}" if node_id is not None else ""
    return StoreError(
        f"{type(store).__name__}.{method}(), run {run_id!r}{node}, returned an awaitable "
        f"(a {type(result).__name__}), but the store was taken as synchronous: its "
        f"{method} is not an async def (a decorator without functools.wraps hides one, or "
        f"{method} is an object whose __call__ returns an awaitable), so nothing was "
        f"awaited and the {method} did not happen. Make {method} an async def method of "
        "the store, or decorate it with functools.wraps so that the async function "
        "shows (or return None from a synchronous one)"
    )


# How stroma calls each store method (for the message when one fails).
_CALLS = {
    "save": "save(run_id, node_id, state)",
    "save_typed": "save_typed(run_id, node_id, state, schema)",
    "save_state_json": "save_state_json(run_id, node_id, data, schema)",
    "load": "load(run_id, node_id)",
    "load_typed": "load_typed(run_id, node_id, schema)",
    "delete": "delete(run_id)",
}


def store_failed(store: object, method: str, exc: Exception, run_id: str,
                 node_id: str | None = None) -> StoreError:
    """The StoreError for a store method that raised ``exc`` (an exception of the store's
    own, not stroma's): it names the store, the method, the run, the node and the error
    (the caller chains it with ``from``). What was committed before stays committed."""
    node = f", node {node_id!r}" if node_id is not None else ""
    text = str(exc)
    error = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    if method.startswith("save"):
        after = (f"the checkpoint of {node_id!r} was not saved (the checkpoints saved "
                 "before it are kept)")
    elif method.startswith("load"):
        after = "the checkpoint was not loaded"
    else:
        after = "the run's data may not have been deleted"
    hint = ""
    if isinstance(exc, KeyError) and method.startswith("load"):
        hint = "; a store's load returns None for a checkpoint it does not have"
    elif isinstance(exc, TypeError):
        hint = (f"; stroma calls it as {_CALLS.get(method, method)}: check that the method "
                "takes those arguments")
    return StoreError(
        f"{type(store).__name__}.{method}() raised for run {run_id!r}{node}: {error}; "
        f"{after}{hint}"
    )


def _stroma_own(store: object, name: str) -> bool:
    """Whether the store's method ``name`` is one of stroma's built-in stores' own: not
    set on the instance, and not defined by a class of the user's (a subclass that
    overrides it, or a store of the user's own)."""
    if name in getattr(store, "__dict__", ()):
        return False
    for klass in type(store).__mro__:
        if name in vars(klass):
            return klass.__module__.startswith("interpreters.stores.")
    return False


class CheckpointManager:
    """Saves and loads checkpoints through any store, sync or async."""

    def __init__(self, store: object | None = None) -> None:
        if store is None:
            store = InMemoryStore()
        if isinstance(store, type):
            raise StromaTypeError(
                f"CheckpointManager() got the class {store.__qualname__}, not a store: pass "
                f"an instance, e.g. CheckpointManager({store.__name__}())"
            )
        missing = [m for m in ("save", "load", "delete") if not callable(getattr(store, m, None))]
        if missing:
            raise StromaTypeError(
                f"CheckpointManager() needs a checkpoint store, got {store!r:.80} (a "
                f"{type(store).__name__}), which lacks {', '.join(missing)}. A store has "
                "save(run_id, node_id, state), load(run_id, node_id) and delete(run_id), "
                "sync or async: pass InMemoryStore(), AsyncInMemoryStore(), "
                "RedisStore(url) or your own class with those methods."
                + (f" A path or URL is no store: for a folder, FileStore({store!r:.80}); for "
                   "a server, RedisStore('redis://...') or PostgresStore('postgresql://...')."
                   if isinstance(store, str | os.PathLike) else "")
            )
        self.store: Any = store
        # Decided once, for every node. A store's own typed pair is used both ways: a
        # store with ``save_typed`` (the optional one of API.md) is saved to with it, as
        # it is loaded from with ``load_typed``, so a store that keeps the typed pair's
        # data apart finds what it saved. A built-in store's shortcuts
        # (``save_state_json``, which takes the JSON text the machine made, and
        # ``load_typed``) are used only where they stand for the method they shortcut: a
        # subclass that overrides ``save`` or ``load`` (to mirror each checkpoint
        # somewhere, or read through to a durable copy) has its override called.
        save_typed = getattr(store, "save_typed", None)
        self.save_json: Any = None
        if callable(save_typed) and not _stroma_own(store, "save_typed"):
            def save(run_id: str, node_id: str, state: BaseModel) -> Any:
                return save_typed(run_id, node_id, state, type(state))

            self.save_checkpoint: Callable[[str, str, BaseModel], Any] = save
            self.save_name = "save_typed"
            self.is_async = is_async_callable(save_typed)
        else:
            self.save_checkpoint = store.save  # type: ignore[attr-defined]
            self.save_name = "save"
            self.is_async = is_async_store(store)
            if _stroma_own(store, "save"):
                self.save_json = getattr(store, "save_state_json", None)
        load_typed = getattr(store, "load_typed", None)
        self._load_typed: Any = load_typed if callable(load_typed) and not (
            _stroma_own(store, "load_typed") and not _stroma_own(store, "load")) else None

    async def checkpoint(self, run_id: str, node_id: str, state: BaseModel) -> None:
        # (A state's schema was declared when its plan was compiled.)
        try:
            result = self.save_checkpoint(run_id, node_id, state)
            if self.is_async or inspect.isawaitable(result):
                await result
        except StromaError:
            raise
        except Exception as exc:
            raise store_failed(self.store, self.save_name, exc, run_id, node_id) from exc

    async def resume(
        self, run_id: str, node_id: str, schema: type[BaseModel]
    ) -> BaseModel | None:
        if not (isinstance(schema, type) and issubclass(schema, BaseModel)):
            raise StromaTypeError(
                f"CheckpointManager.resume(run_id, node_id, schema): schema must be the "
                f"pydantic BaseModel class of the checkpointed state, got {schema!r:.80} "
                f"(a {type(schema).__name__}): e.g. resume(run_id, {node_id!r}, MyState)"
            )
        declare_schema(schema)
        load_typed = self._load_typed
        try:
            result = (load_typed(run_id, node_id, schema) if load_typed
                      else self.store.load(run_id, node_id))
            if inspect.isawaitable(result):
                result = await result
        except StromaError:
            raise
        except Exception as exc:
            method = "load_typed" if load_typed else "load"
            raise store_failed(self.store, method, exc, run_id, node_id) from exc
        if result is None or isinstance(result, schema):
            return result
        if isinstance(result, str | bytes | bytearray):
            method = "load_typed" if load_typed else "load"
            raise StoreError(
                f"{type(self.store).__name__}.{method}(), run {run_id!r}, node "
                f"{node_id!r}, returned text (a {type(result).__name__}), not a checkpoint: "
                f"{method} must return the model (a {schema.__name__}, or a dict of its "
                f"fields), not its JSON: read the text back into its model first, e.g. "
                f"{schema.__name__}.model_validate_json(text) (or the class of the "
                "_schema_ref saved beside it, see _resolve_schema)"
            )
        try:
            if isinstance(result, BaseModel):
                return schema.model_validate(result.model_dump())
            return schema.model_validate(result)
        except ValidationError as e:
            got = type(result).__name__
            raise StoreError(
                f"{type(self.store).__name__}, run {run_id!r}: the checkpoint of "
                f"{node_id!r} it loaded (a {got}) is not a {schema.__name__} "
                f"({first_error(e)}): the store returned another node's state or "
                "altered data; check its load(), or resume from another node"
            ) from None

    async def clear(self, run_id: str) -> None:
        try:
            result = self.store.delete(run_id)
            if inspect.isawaitable(result):
                await result
        except StromaError:
            raise
        except Exception as exc:
            raise store_failed(self.store, "delete", exc, run_id) from exc


def __getattr__(name: str) -> Any:
    # RedisStore lives with the other I/O in interpreters/; import it only when asked for,
    # so stroma imports without the redis extra.
    if name in ("RedisStore", "SyncRedisStore"):
        from interpreters.stores import redis as _redis

        return getattr(_redis, name)
    raise AttributeError(f"module 'stroma.checkpoint' has no attribute {name!r}")
