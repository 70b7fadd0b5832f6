"""Checkpoint stores: the protocols, the in-memory stores, and ``CheckpointManager``.

A store is anything with ``save``, ``load`` and ``delete`` (sync or async): structural
typing, no base class. Stores that also hold the effect log implement ``LogStore``
(durable: ``append_log`` / ``read_log``, used by FileStore, RedisStore, PostgresStore) or
keep the in-process ``EffectLog`` object by reference (``attach_log``, the memory stores).
Stores that can claim a run for one worker implement ``lease``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

from pydantic import BaseModel

from stroma.log import EffectLog
from stroma.schemas import _resolve_schema, _schema_ref, declare_schema, state_json

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
    "is_async_store",
)


class CheckpointKey(NamedTuple):
    """Where a checkpoint lives: the run and the node whose output it is."""

    run_id: str
    node_id: str


def _check_schema(method: str, schema: object) -> None:
    if not (isinstance(schema, type) and issubclass(schema, BaseModel)):
        found = (
            f"the class {schema.__qualname__}" if isinstance(schema, type)
            else f"{schema!r:.80} (a {type(schema).__name__})"
        )
        raise TypeError(
            f"{method}(run_id, node_id, state, schema): schema must be a BaseModel type, got "
            f"{found}: pass the pydantic model class of the state, e.g. type(state)"
        )


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
    return inspect.iscoroutinefunction(getattr(store, "save", None))


class _MemoryBase:
    """Checkpoints as JSON text (so a loaded state is a new, equal object) and logs by reference."""

    def __init__(self) -> None:
        # JSON text and schema kept apart: a dict of str values is nothing for the garbage
        # collector to walk, which matters for runs of many thousand nodes.
        self._data: dict[str, dict[str, bytes]] = {}
        self._types: dict[str, dict[str, type[BaseModel]]] = {}
        self._logs: dict[str, EffectLog] = {}

    def _save(self, run_id: str, node_id: str, state: BaseModel) -> None:
        if not isinstance(state, BaseModel):
            raise TypeError(
                f"checkpoint state for node {node_id!r} must be a pydantic BaseModel, "
                f"got {type(state).__name__}"
            )
        texts = self._data.get(run_id)
        if texts is None:
            texts = self._data[run_id] = {}
            self._types[run_id] = {}
        texts[node_id] = state_json(state)
        self._types[run_id][node_id] = type(state)

    def _run_slots(self, run_id: str) -> tuple[dict[str, bytes], dict[str, type[BaseModel]]]:
        """The run's checkpoint texts and schemas by node id, for an interpreter that saves a
        validated state's JSON (``state_json``) straight into them."""
        texts = self._data.get(run_id)
        if texts is None:
            texts = self._data[run_id] = {}
            self._types[run_id] = {}
        return texts, self._types[run_id]

    def _load(self, run_id: str, node_id: str, schema: type[BaseModel] | None) -> BaseModel | None:
        text = self._data.get(run_id, {}).get(node_id)
        if text is None:
            return None
        return (schema or self._types[run_id][node_id]).model_validate_json(text)

    def _delete(self, run_id: str) -> None:
        self._data.pop(run_id, None)
        self._types.pop(run_id, None)
        self._logs.pop(run_id, None)

    # The in-process effect log: held by reference, so keeping it costs nothing per node.
    def attach_log(self, run_id: str, log: EffectLog) -> None:
        self._logs[run_id] = log

    def get_log(self, run_id: str) -> EffectLog | None:
        return self._logs.get(run_id)

    def run_ids(self) -> list[str]:
        return sorted(set(self._data) | set(self._logs))


class InMemoryStore(_MemoryBase):
    """Synchronous in-process store (the default)."""

    def save(self, run_id: str, node_id: str, state: BaseModel) -> None:
        self._save(run_id, node_id, state)

    def load(self, run_id: str, node_id: str) -> BaseModel | None:
        return self._load(run_id, node_id, None)

    def delete(self, run_id: str) -> None:
        self._delete(run_id)

    def save_typed(self, run_id: str, node_id: str, state: BaseModel, schema: type) -> None:
        _check_schema("InMemoryStore.save_typed", schema)
        self._save(run_id, node_id, state)

    def load_typed(self, run_id: str, node_id: str, schema: type[BaseModel]) -> BaseModel | None:
        return self._load(run_id, node_id, schema)


class AsyncInMemoryStore(_MemoryBase):
    """Asynchronous in-process store."""

    async def save(self, run_id: str, node_id: str, state: BaseModel) -> None:
        self._save(run_id, node_id, state)

    async def load(self, run_id: str, node_id: str) -> BaseModel | None:
        return self._load(run_id, node_id, None)

    async def delete(self, run_id: str) -> None:
        self._delete(run_id)

    async def save_typed(self, run_id: str, node_id: str, state: BaseModel, schema: type) -> None:
        _check_schema("AsyncInMemoryStore.save_typed", schema)
        self._save(run_id, node_id, state)

    async def load_typed(
        self, run_id: str, node_id: str, schema: type[BaseModel]
    ) -> BaseModel | None:
        return self._load(run_id, node_id, schema)


class CheckpointManager:
    """Saves and loads checkpoints through any store, sync or async."""

    def __init__(self, store: object | None = None) -> None:
        if store is None:
            store = InMemoryStore()
        if isinstance(store, type):
            raise TypeError(
                f"CheckpointManager() got the class {store.__qualname__}, not a store: pass "
                f"an instance, e.g. CheckpointManager({store.__name__}())"
            )
        missing = [m for m in ("save", "load", "delete") if not callable(getattr(store, m, None))]
        if missing:
            raise TypeError(
                f"CheckpointManager() needs a checkpoint store, got {store!r:.80} (a "
                f"{type(store).__name__}), which lacks {', '.join(missing)}. A store has "
                "save(run_id, node_id, state), load(run_id, node_id) and delete(run_id), "
                "sync or async: pass InMemoryStore(), AsyncInMemoryStore(), "
                "RedisStore(url) or your own class with those methods."
            )
        self.store: Any = store
        self.is_async = is_async_store(store)
        self._save = store.save  # type: ignore[attr-defined]

    async def checkpoint(self, run_id: str, node_id: str, state: BaseModel) -> None:
        # (A state's schema was declared when its plan was compiled.)
        result = self._save(run_id, node_id, state)
        if self.is_async or inspect.isawaitable(result):
            await result

    async def resume(
        self, run_id: str, node_id: str, schema: type[BaseModel]
    ) -> BaseModel | None:
        if not (isinstance(schema, type) and issubclass(schema, BaseModel)):
            raise TypeError(
                f"CheckpointManager.resume(run_id, node_id, schema): schema must be the "
                f"pydantic BaseModel class of the checkpointed state, got {schema!r:.80} "
                f"(a {type(schema).__name__}): e.g. resume(run_id, {node_id!r}, MyState)"
            )
        declare_schema(schema)
        load_typed = getattr(self.store, "load_typed", None)
        result = (
            load_typed(run_id, node_id, schema) if load_typed else self.store.load(run_id, node_id)
        )
        if inspect.isawaitable(result):
            result = await result
        if result is None or isinstance(result, schema):
            return result
        if isinstance(result, BaseModel):
            return schema.model_validate(result.model_dump())
        return schema.model_validate(result)

    async def clear(self, run_id: str) -> None:
        result = self.store.delete(run_id)
        if inspect.isawaitable(result):
            await result


def __getattr__(name: str) -> Any:
    # RedisStore lives with the other I/O in interpreters/; import it only when asked for,
    # so stroma imports without the redis extra.
    if name in ("RedisStore", "SyncRedisStore"):
        from interpreters.stores import redis as _redis

        return getattr(_redis, name)
    raise AttributeError(f"module 'stroma.checkpoint' has no attribute {name!r}")
