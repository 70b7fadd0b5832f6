"""The in-process stores: ``InMemoryStore`` (synchronous, the default) and
``AsyncInMemoryStore``.

Checkpoints are kept as their JSON text, so a loaded state is a new object equal to the
saved one; a run's effect log is kept by reference (``attach_log``), so a run cancelled
in this process resumes from it. ``save_state_json`` takes a checkpoint as the JSON text
the machine already made (what a run commits through), ``save`` a model.

**Leases.** ``lease(run_id, holder)`` claims a run for one session, as the durable stores
do (``interpret`` holds it while the run goes on): a second session of the run on the same
store object gets ``RunLocked`` naming the holder, so it never adopts a log that a live
session is still writing. The lease is the store's own, in this process only, and has no
expiry: it is released when the session ends, however it ends. A session an interrupt cut
off (a ``KeyboardInterrupt`` raised in a node leaves asyncio's loop before the session can
end) lets the run go once its loop is closed, so a later ``asyncio.run`` resumes it.
``delete`` leaves a held lease with its holder.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from pydantic import BaseModel, ValidationError

from interpreters.stores._checks import checkpoint_json, require_model_type
from stroma.errors import StoreError, StromaTypeError
from stroma.log import EffectLog
from stroma.schemas import first_error, read_state

__all__ = ("AsyncInMemoryStore", "InMemoryStore")


class _MemoryBase:
    """Checkpoints as JSON text (so a loaded state is a new, equal object) and logs by reference."""

    def __init__(self) -> None:
        # JSON text and schema kept apart: a dict of bytes values is nothing for the
        # garbage collector to walk, which matters for runs of many thousand nodes.
        self._data: dict[str, dict[str, bytes]] = {}
        self._types: dict[str, dict[str, type[BaseModel]]] = {}
        self._logs: dict[str, EffectLog] = {}
        self._inputs: dict[str, dict[str, str]] = {}
        # The sessions holding runs: (holder, a weak reference to its asyncio loop or None)
        # by run id. Kept apart from the run's data: delete leaves a held lease alone.
        self._leases: dict[str, tuple[str, Any]] = {}

    # Inputs sent to waiting runs (send_input): JSON text by the wait's key.
    def _put_input(self, run_id: str, key: str, text: str) -> None:
        self._inputs.setdefault(run_id, {})[key] = text

    def _get_input(self, run_id: str, key: str) -> str | None:
        return self._inputs.get(run_id, {}).get(key)

    def _put(self, run_id: str, node_id: str, data: bytes, schema: type[BaseModel]) -> None:
        texts = self._data.get(run_id)
        if texts is None:
            texts = self._data[run_id] = {}
            self._types[run_id] = {}
        texts[node_id] = data
        self._types[run_id][node_id] = schema

    def _save(self, run_id: str, node_id: str, state: BaseModel) -> None:
        if not isinstance(state, BaseModel):
            raise StromaTypeError(
                f"checkpoint state for node {node_id!r} must be a pydantic BaseModel, "
                f"got {type(state).__name__}"
            )
        text = checkpoint_json(state, node_id, f"{type(self).__name__}.save")
        self._put(run_id, node_id, text, type(state))

    def _load(self, run_id: str, node_id: str, schema: type[BaseModel] | None) -> BaseModel | None:
        text = self._data.get(run_id, {}).get(node_id)
        if text is None:
            return None
        cls = schema or self._types[run_id][node_id]
        try:
            return read_state(cls, text)
        except ValidationError as e:  # (asked for as another schema than it was saved as)
            saved = self._types[run_id][node_id]
            raise StoreError(
                f"the in-memory store, run {run_id!r}, checkpoint {node_id!r}: it holds a "
                f"{saved.__name__}, which does not validate as {cls.__name__} "
                f"({first_error(e)}); load it as "
                f"{saved.__name__}"
            ) from None

    def _delete(self, run_id: str) -> None:
        self._inputs.pop(run_id, None)
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

    def _holder(self, run_id: str) -> str | None:
        from interpreters.stores._lease import loop_gone  # (asyncio: not at import)

        entry = self._leases.get(run_id)
        return None if entry is None or loop_gone(entry[1]) else entry[0]

    @asynccontextmanager
    async def lease(self, run_id: str, holder: str) -> AsyncIterator[None]:
        """Hold run ``run_id`` for one session (``holder`` names it): ``RunLocked`` if
        another live session holds it. Released on the way out, however the session ends."""
        if not isinstance(holder, str):
            raise StromaTypeError(
                f"{type(self).__name__}.lease(run_id, holder): holder must be a str naming "
                f"the session, got {holder!r:.80} (a {type(holder).__name__})"
            )
        from interpreters.stores._lease import locked, loop_gone, session_loop

        mine = (holder, session_loop())
        current = self._leases.setdefault(run_id, mine)  # (one step: two claims race safely)
        if current is not mine:
            if not loop_gone(current[1]):
                raise locked(run_id, current[0])
            self._leases[run_id] = mine  # its session was cut off with its loop
        try:
            yield
        finally:
            if self._leases.get(run_id) is mine:
                del self._leases[run_id]


class InMemoryStore(_MemoryBase):
    """Synchronous in-process store (the default)."""

    def put_input(self, run_id: str, key: str, text: str) -> None:
        """Keep the input (JSON text) a waiting run looks for under ``key``."""
        self._put_input(run_id, key, text)

    def get_input(self, run_id: str, key: str) -> str | None:
        return self._get_input(run_id, key)

    def save(self, run_id: str, node_id: str, state: BaseModel) -> None:
        self._save(run_id, node_id, state)

    def save_state_json(
        self, run_id: str, node_id: str, data: bytes, schema: type[BaseModel]
    ) -> None:
        """Save a checkpoint given as its JSON text (``state_json``) and its schema."""
        texts = self._data.get(run_id)
        if texts is None:
            self._put(run_id, node_id, data, schema)
            return
        texts[node_id] = data  # (what _put does, once per node of a run)
        self._types[run_id][node_id] = schema

    def load(self, run_id: str, node_id: str) -> BaseModel | None:
        return self._load(run_id, node_id, None)

    def delete(self, run_id: str) -> None:
        self._delete(run_id)

    def save_typed(self, run_id: str, node_id: str, state: BaseModel, schema: type) -> None:
        require_model_type("InMemoryStore.save_typed", schema)
        self._save(run_id, node_id, state)

    def load_typed(self, run_id: str, node_id: str, schema: type[BaseModel]) -> BaseModel | None:
        require_model_type("InMemoryStore.load_typed", schema)
        return self._load(run_id, node_id, schema)

    def lease_holder(self, run_id: str) -> str | None:
        """The holder of run ``run_id``'s lease (a session running it now), or None."""
        return self._holder(run_id)


class AsyncInMemoryStore(_MemoryBase):
    """Asynchronous in-process store."""

    async def put_input(self, run_id: str, key: str, text: str) -> None:
        """Keep the input (JSON text) a waiting run looks for under ``key``."""
        self._put_input(run_id, key, text)

    async def get_input(self, run_id: str, key: str) -> str | None:
        return self._get_input(run_id, key)

    async def save(self, run_id: str, node_id: str, state: BaseModel) -> None:
        self._save(run_id, node_id, state)

    async def save_state_json(
        self, run_id: str, node_id: str, data: bytes, schema: type[BaseModel]
    ) -> None:
        """Save a checkpoint given as its JSON text (``state_json``) and its schema."""
        self._put(run_id, node_id, data, schema)

    async def load(self, run_id: str, node_id: str) -> BaseModel | None:
        return self._load(run_id, node_id, None)

    async def delete(self, run_id: str) -> None:
        self._delete(run_id)

    async def save_typed(self, run_id: str, node_id: str, state: BaseModel, schema: type) -> None:
        require_model_type("AsyncInMemoryStore.save_typed", schema)
        self._save(run_id, node_id, state)

    async def load_typed(
        self, run_id: str, node_id: str, schema: type[BaseModel]
    ) -> BaseModel | None:
        require_model_type("AsyncInMemoryStore.load_typed", schema)
        return self._load(run_id, node_id, schema)

    async def lease_holder(self, run_id: str) -> str | None:
        """The holder of run ``run_id``'s lease (a session running it now), or None."""
        return self._holder(run_id)

