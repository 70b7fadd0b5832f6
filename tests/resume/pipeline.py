"""A six-step pipeline whose nodes count their calls, for the resume tests.

Steps: ``a`` -> ``flaky`` -> ``parallel(left, right)`` -> ``total`` -> ``e`` -> ``f``.
``flaky`` fails once with a RECOVERABLE TimeoutError (retried at once: backoff 0), then
succeeds; ``flaky_failed=True`` says the world already saw that failure before a crash.
Each ``Pipeline`` has its own call counter, so a resumed run can be checked for what it
ran again.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import anyio
from pydantic import BaseModel

from stroma import NodeContract, parallel, stroma_node
from stroma.failures import FailureClass, FailurePolicy
from stroma.runner import RunConfig

PARALLEL_ID = "parallel(left, right)"
STEPS = ("a", "flaky", PARALLEL_ID, "total", "e", "f")
CHILDREN = {PARALLEL_ID: ("left", "right")}


class Num(BaseModel):
    value: int


class Left(BaseModel):
    left: int


class Right(BaseModel):
    right: int


class Both(BaseModel):
    left: int
    right: int


# RECOVERABLE failures are retried at once (backoff 0).
POLICY = {FailureClass.RECOVERABLE: FailurePolicy(max_retries=2, backoff_seconds=0)}


def config(run_id: str, **extra: Any) -> RunConfig:
    """The run's config: an explicit run id and the retry policy above."""
    return RunConfig(run_id=run_id, policy_map=POLICY, **extra)


class Pipeline:
    """The nodes of one process's view of the pipeline, counting their calls."""

    def __init__(self, *, gate: anyio.Event | None = None, entered: anyio.Event | None = None,
                 gate_at: str = "e", rename: dict[str, str] | None = None,
                 total_output: type[BaseModel] = Num, flaky_failed: bool = False) -> None:
        self.calls: Counter[str] = Counter()
        self.gate = gate  # when set, node ``gate_at`` waits for it
        self.entered = entered  # set when node ``gate_at`` starts
        self.gate_at = gate_at
        self.rename = rename or {}
        self.total_output = total_output
        self.flaky_failed = flaky_failed

    def _node(self, node_id: str, inp: type[BaseModel], out: type[BaseModel], body: Any) -> Any:
        node_id = self.rename.get(node_id, node_id)
        contract = NodeContract(node_id=node_id, input_schema=inp, output_schema=out)

        async def fn(state: Any) -> Any:
            self.calls[node_id] += 1
            if node_id == self.gate_at:
                if self.entered is not None:
                    self.entered.set()
                if self.gate is not None:
                    await self.gate.wait()
            return await body(state)

        return stroma_node(node_id, contract)(fn)

    def nodes(self) -> list[Any]:
        async def inc(s: Num) -> Any:
            return {"value": s.value + 1}

        async def flaky(s: Num) -> Any:
            if not self.flaky_failed:
                self.flaky_failed = True
                raise TimeoutError("upstream timeout")
            return {"value": s.value * 3}

        async def left(s: Num) -> Any:
            await anyio.sleep(0)
            return {"left": s.value + 10}

        async def right(s: Num) -> Any:
            for _ in range(3):
                await anyio.sleep(0)
            return {"right": s.value - 1}

        async def total(s: Both) -> Any:
            return {"value": s.left + s.right}

        return [
            self._node("a", Num, Num, inc),
            self._node("flaky", Num, Num, flaky),
            parallel(self._node("left", Num, Left, left), self._node("right", Num, Right, right)),
            self._node("total", Both, self.total_output, total),
            self._node("e", Num, Num, inc),
            self._node("f", Num, Num, inc),
        ]

    @property
    def called(self) -> set[str]:
        return {k for k, v in self.calls.items() if v}
