"""A hook cancelled at its timeout that raises an error of its own as it is cancelled (an
HTTP client's ConnectionError when its call is cut off) has timed out, as one that let the
cancellation through has: the run goes on from the hook, each node called once.

Its error used to be taken for the hook's own error: the loop went on inside the scope the
hook's timeout had cancelled, the next await there was cancelled, and the loop started
again from where it had last started (the run's start): the nodes that had committed ran
again, and again, without end.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import anyio
import pytest
from pydantic import BaseModel

from stroma import FailureClass, FailurePolicy, NodeContract, RunStatus, replay, seq, stroma_node
from stroma import effects as fx
from stroma.errors import StromaError
from stroma.runner import NodeHooks, RunConfig, interpret

pytestmark = pytest.mark.anyio

BOUND_MS = 20
NO_RETRY = {c: FailurePolicy(max_retries=0, backoff_seconds=0.0) for c in FailureClass}


class Num(BaseModel):
    value: int


def _plan(calls: Counter[str]) -> Any:
    def make(node_id: str) -> Any:
        async def fn(s: Num) -> dict[str, int]:
            calls[node_id] += 1
            await anyio.sleep(0)  # (an await: where the cancelled scope used to stop it)
            return {"value": s.value + 1}

        return stroma_node(node_id, NodeContract(node_id=node_id, input_schema=Num,
                                                 output_schema=Num))(fn)

    return seq(make("a"), make("b"), make("c"))


def _hooks_fired(log: Any) -> list[tuple[fx.FireHook, fx.HookFired]]:
    return [(r[0], r[1]) for r in log.records
            if isinstance(r, tuple) and isinstance(r[0], fx.FireHook)]


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.parametrize("kind", ["start", "success"])
async def test_a_hook_raising_as_its_timeout_cancels_it_has_timed_out(
    anyio_backend: str, kind: str
) -> None:
    async def cut_off(*args: Any) -> None:
        if args[1] != "b":
            return
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            raise ConnectionError("connection closed") from None

    hooks = NodeHooks(**{f"on_node_{kind}": cut_off})
    calls: Counter[str] = Counter()
    plan = _plan(calls)
    with anyio.fail_after(30):  # (it used to run its nodes again without end)
        result = await interpret(plan, Num(value=0), config=RunConfig(
            policy_map=NO_RETRY, hooks=hooks, hook_timeout_ms=BOUND_MS))
    assert result.status is RunStatus.COMPLETED
    assert result.final_state == Num(value=3)
    assert calls == {"a": 1, "b": 1, "c": 1}
    errors = [(effect, event.error) for effect, event in _hooks_fired(result.log)
              if event.error is not None]
    assert [(effect.kind, effect.node_id) for effect, _ in errors] == [(kind, "b")]
    [(_, error)] = errors
    assert error.type_name == "builtins.TimeoutError"
    assert f"did not return within {BOUND_MS} ms" in error.message
    calls.clear()
    assert await replay(plan, result.log) == result and not calls


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_a_run_the_hook_guard_cancels_outside_a_hook_stops_and_runs_nothing_again(
    anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Were a hook's deadline ever to cancel the run's loop outside the hook (as the
    error above once did), the run stops with a StromaError saying so, instead of going
    on from where its loop last began and running committed nodes again."""
    from interpreters import live

    async def blind(self: Any, call: Any, timeout_ms: int) -> None:
        self.deadline = self.clock() + timeout_ms / 1000
        try:
            await call
        except Exception:  # (the old bug: the hook's own error, its timeout not told)
            pass
        finally:
            self.deadline = None

    monkeypatch.setattr(live.HookGuard, "bounded", blind)

    async def cut_off(*args: Any) -> None:
        if args[1] != "b":
            return
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            raise ConnectionError("connection closed") from None

    calls: Counter[str] = Counter()
    with anyio.fail_after(30), pytest.raises(StromaError, match="outside the hook"):
        await interpret(_plan(calls), Num(value=0), config=RunConfig(
            policy_map=NO_RETRY, hooks=NodeHooks(on_node_start=cut_off),
            hook_timeout_ms=BOUND_MS))
    assert all(n == 1 for n in calls.values())
