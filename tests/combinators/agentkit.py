"""Shared models and node factories for the loop, route, wait and idempotency-key tests.

``Nodes`` makes nodes on one model (``Agent``) whose calls are counted per node id and
logged with the context's idempotency key; a node's body may raise, to script failures
and crashes. Once ``nodes.replaying`` is set any call raises ``Called``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel

from stroma import NodeContract, stroma_node
from tests.combinators.kit import Called


class Approval(BaseModel):
    ok: bool
    by: str = "ada"


class Agent(BaseModel):
    """A loop's state: a counter, the path of node ids taken, the tool picked next."""

    n: int = 0
    path: list[str] = []
    tool: str = ""
    approval: Approval | None = None


Body = Callable[[Agent, dict[str, Any]], Awaitable[Any]]


async def _step(state: Agent, ctx: dict[str, Any], node_id: str) -> Agent:
    return state.model_copy(update={"n": state.n + 1, "path": [*state.path, node_id]})


class Nodes:
    """Node factory: counts calls, records (node id, idempotency key) per call."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.keys: list[tuple[str, str]] = []
        self.replaying = False

    def node(self, node_id: str, body: Body | None = None, *,
             schema: type[BaseModel] = Agent) -> Any:
        """A node ``node_id`` on ``schema`` (default: adds 1 to ``n``, appends its id)."""

        async def fn(state: Any, ctx: dict[str, Any]) -> Any:
            if self.replaying:
                raise Called(f"node {node_id!r} was called during replay")
            self.calls[node_id] += 1
            self.keys.append((node_id, ctx["_stroma_idempotency_key"]))
            if body is None:
                return await _step(state, ctx, node_id)
            return await body(state, ctx)

        fn.__name__ = fn.__qualname__ = node_id
        contract = NodeContract(node_id=node_id, input_schema=schema, output_schema=schema)
        return stroma_node(node_id, contract)(fn)


def step(state: Agent, node_id: str, **changes: Any) -> Agent:
    """What the default node body returns, with ``changes`` on top."""
    return state.model_copy(update={"n": state.n + 1, "path": [*state.path, node_id],
                                    **changes})


async def no_sleep(seconds: float) -> None:
    """A backoff that does not sleep (zero real time in tests)."""
    return None
