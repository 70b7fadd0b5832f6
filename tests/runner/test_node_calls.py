"""How a node call is made and reported: its own idempotency key at any point (siblings in a
fan-out share the context dict), an exception whose message cannot be made, and a bounded
fan-out that starts no child once a sibling failed."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from pydantic import BaseModel

from stroma import (
    FailureClass,
    FailurePolicy,
    RunConfig,
    RunStatus,
    StromaRunner,
    current_idempotency_key,
    interpret,
    map_each,
    parallel,
    seq,
)
from stroma.errors import StromaError

pytestmark = pytest.mark.anyio

NO_RETRIES = {c: FailurePolicy(max_retries=0, backoff_seconds=0) for c in FailureClass}


class It(BaseModel):
    item: int


class Items(BaseModel):
    items: list[int]
    out: list[It] = []


class S(BaseModel):
    v: int = 0


async def test_each_fan_out_child_has_its_own_key_after_an_await(anyio_backend: str) -> None:
    """The context dict's key is the last sibling's once a child awaited; the key asked of
    current_idempotency_key() is the child's own, the one the dict held when it began."""
    runner = StromaRunner.quick()
    seen: dict[int, tuple[str, str, str]] = {}

    @runner.node("m", input=It, output=It)
    async def m(state: It, ctx: dict[str, Any]) -> dict[str, int]:
        at_start = ctx["_stroma_idempotency_key"]
        await anyio.sleep(0.01)
        seen[state.item] = (at_start, current_idempotency_key(), ctx["_stroma_idempotency_key"])
        return {"item": state.item}

    result = await interpret(seq(map_each(m, over="items", into="out", input=Items)),
                             Items(items=[0, 1, 2]))
    assert result.status is RunStatus.COMPLETED
    assert len({own for _, own, _ in seen.values()}) == 3  # one key per item
    assert all(start == own for start, own, _ in seen.values())
    with pytest.raises(StromaError, match="outside a node call"):
        current_idempotency_key()


async def test_an_exception_whose_message_fails_is_classified_as_any(anyio_backend: str) -> None:
    """A node's exception whose __str__ raises is one more failure of the node (AMBIGUOUS,
    retried), not a crash of the run."""
    runner = StromaRunner.quick()
    calls: list[int] = []

    class Odd(Exception):
        def __str__(self) -> str:
            raise TypeError("no message")

    @runner.node("odd", input=S, output=S)
    async def odd(state: S) -> dict[str, int]:
        calls.append(1)
        raise Odd()

    result = await interpret(seq(odd), S(), config=RunConfig(policy_map={
        FailureClass.AMBIGUOUS: FailurePolicy(max_retries=1, backoff_seconds=0)}))
    assert result.status is RunStatus.PARTIAL and len(calls) == 2
    assert "Odd: its message could not be made" in (result.stop_reason or "")


@pytest.mark.parametrize("kind", ["map_each", "parallel"])
async def test_a_bounded_fan_out_starts_no_child_after_one_failed(
    anyio_backend: str, kind: str
) -> None:
    """With one place, the first child's failure ends the group: the next child, which was
    waiting for the place, is not started (its code before its first await does not run)."""
    runner = StromaRunner.quick()
    started: list[str] = []

    @runner.node("m", input=It, output=It)
    async def m(state: It) -> dict[str, int]:
        started.append(f"m{state.item}")
        if state.item == 0:
            raise RuntimeError("item 0 failed")
        await anyio.sleep(0)
        return {"item": state.item}

    def child(i: int) -> Any:
        @runner.node(f"p{i}", input=S, output=S)
        async def p(state: S) -> dict[str, int]:
            started.append(f"p{i}")
            if i == 0:
                raise RuntimeError("p0 failed")
            await anyio.sleep(0)
            return {"v": i}
        return p

    config = RunConfig(policy_map=NO_RETRIES)
    if kind == "map_each":
        plan = seq(map_each(m, over="items", into="out", max_concurrency=1, input=Items))
        result = await interpret(plan, Items(items=[0, 1, 2]), config=config)
        assert started == ["m0"]
    else:
        plan = seq(parallel(*(child(i) for i in range(3)), max_concurrency=1))
        result = await interpret(plan, S(), config=config)
        assert started == ["p0"]
    assert result.status is RunStatus.PARTIAL
