"""Shared models, node factories and helpers for the combinator tests.

Nodes are made through a ``Script``: it counts calls per node id, and once
``script.replaying`` is set any call raises ``Called``, so a replay that runs user code
fails loudly. Concurrency probes (``Gauge``) count the children running at once using
anyio checkpoints only: no real sleeps, no clocks.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from pydantic import BaseModel, create_model

from stroma import NodeContract, stroma_node


class Num(BaseModel):
    value: int


class Items(BaseModel):
    items: list[int]


class Item(BaseModel):
    item: int


class Out(BaseModel):
    out: int


class Called(AssertionError):
    """User code ran when it must not (during a replay, or a resume of a finished child)."""


class Script:
    """Makes nodes whose calls are counted and which refuse to run once replaying."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.replaying = False

    def node(
        self, node_id: str, inp: type[BaseModel], out: type[BaseModel],
        body: Callable[[Any], Awaitable[Any]],
    ) -> Any:
        async def fn(state: Any) -> Any:
            if self.replaying:
                raise Called(f"node {node_id!r} was called during replay")
            self.calls[node_id] += 1
            return await body(state)

        fn.__name__ = fn.__qualname__ = node_id.replace("-", "_")
        contract = NodeContract(node_id=node_id, input_schema=inp, output_schema=out)
        return stroma_node(node_id, contract)(fn)


class Gauge:
    """How many children run at once, and the most that ever did."""

    def __init__(self) -> None:
        self.running = 0
        self.peak = 0

    async def hold(self, checkpoints: int = 5) -> None:
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            for _ in range(checkpoints):
                await anyio.sleep(0)
        finally:
            self.running -= 1


_FIELD_MODELS: dict[str, type[BaseModel]] = {}


def field_model(name: str, annotation: Any = int) -> type[BaseModel]:
    """A model with the one required field ``name`` (cached, so contracts stay stable)."""
    model = _FIELD_MODELS.get(name)
    if model is None:
        model = create_model(f"Has_{name}", __module__=__name__, **{name: (annotation, ...)})
        _FIELD_MODELS[name] = model
    return model


_VOLATILE = {"started_at", "duration_ms", "timestamp_utc", "total_latency_ms", "resumed"}


def _scrub(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _scrub(v) for k, v in obj.items() if k not in _VOLATILE}
    if isinstance(obj, list):
        return [_scrub(v) for v in obj]
    return obj


def stable_lines(text: str) -> list[Any]:
    """A JSON-lines log without its timestamps and durations (the run's only noise)."""
    return [_scrub(json.loads(line)) for line in text.splitlines()]


def child_lines(text: str) -> list[dict[str, Any]]:
    """The per-child lines of the parallel groups in a JSON-lines log."""
    return [obj for obj in map(json.loads, text.splitlines()) if "child" in obj]
