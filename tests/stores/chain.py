"""A chain of three nodes each adding one, for store tests that need a real run's log."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from stroma import StromaRunner


class N(BaseModel):
    v: int


def chain(length: int = 3) -> list[Any]:
    """``length`` nodes ``s0``, ``s1``, ... on ``N``, each adding one."""
    runner = StromaRunner.quick()

    def make(i: int) -> Any:
        @runner.node(f"s{i}", input=N, output=N)
        async def step(s: N) -> dict[str, int]:
            return {"v": s.v + 1}
        return step

    return [make(i) for i in range(length)]
