"""AsyncInMemoryStore: a run with an explicit id resumes in-process after being cancelled."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import pytest

from stroma import AsyncInMemoryStore, replay
from stroma.runner import RunConfig, interpret
from stroma.trace import RunStatus
from tests.resume.pipeline import POLICY, Num, Pipeline, config

pytestmark = pytest.mark.anyio

RUN = "in-memory"
FINAL = Num(value=23)


async def _cancel_at(
    nodes: list[Any], entered: anyio.Event, store: Any, cfg: RunConfig,
    ready: Callable[[], bool] = lambda: True,
) -> None:
    """Start the run, and cancel it from outside once the gated node has started (and
    ``ready()`` holds: polled, a bounded number of times)."""
    async with anyio.create_task_group() as tg:
        async def run() -> None:
            await interpret(nodes, Num(value=1), store=store, config=cfg)
            raise AssertionError("the gated run finished")

        tg.start_soon(run)
        await entered.wait()
        for _ in range(10_000):
            if ready():
                break
            await anyio.sleep(0)
        else:
            raise AssertionError("the run never got ready to be cancelled")
        tg.cancel_scope.cancel()


def _left_is_kept(store: Any) -> Callable[[], bool]:
    """Whether the fan-out child ``left`` finished and its outcome is in the run's log."""

    def ready() -> bool:
        log = store.get_log(RUN)
        return log is not None and any(
            getattr(call, "node_id", None) == "left" for _, _, call, _ in log.partials
        )

    return ready


@pytest.mark.parametrize(
    ("gate_at", "finished"),
    [("e", {"a", "flaky", "left", "right", "total"}), ("right", {"a", "flaky", "left"})],
)
async def test_a_cancelled_run_with_an_explicit_id_resumes_without_rerunning(
    gate_at: str, finished: set[str]
) -> None:
    """Cancelled while a node (or a fan-out child) runs, a run with an explicit id resumes
    from its in-memory log: RESUMED, same final state, finished nodes not called again."""
    store = AsyncInMemoryStore()
    entered, gate = anyio.Event(), anyio.Event()  # the gate is never opened
    first = Pipeline(gate=gate, entered=entered, gate_at=gate_at)
    await _cancel_at(first.nodes(), entered, store, config(RUN),
                     _left_is_kept(store) if gate_at == "right" else lambda: True)
    assert first.calls[gate_at] == 1

    second = Pipeline(flaky_failed=True)
    result = await interpret(second.nodes(), Num(value=1), store=store, config=config(RUN))
    assert result.status is RunStatus.RESUMED
    assert result.final_state == FINAL
    assert not second.called & finished
    assert second.calls[gate_at] == 1  # the node in flight runs again
    assert [e.node_id for e in result.trace].count("flaky") == 2  # the failure is kept

    log = store.get_log(RUN)
    assert log is not None and log.finish is not None
    replayed = await replay(Pipeline().nodes(), log)
    assert replayed.final_state == FINAL and replayed.trace.diff(result.trace) == []
    idle = Pipeline()
    again = await interpret(idle.nodes(), Num(value=1), store=store, config=config(RUN))
    assert again.status is RunStatus.RESUMED and not idle.called


async def test_with_an_implicit_run_id_no_log_is_kept_and_nothing_resumes() -> None:
    """Without an explicit run id no log is kept, so a second call runs every node again."""
    store = AsyncInMemoryStore()
    entered, gate = anyio.Event(), anyio.Event()
    first = Pipeline(gate=gate, entered=entered, gate_at="e")
    await _cancel_at(first.nodes(), entered, store,
                     RunConfig(policy_map=POLICY))
    assert all(store.get_log(run_id) is None for run_id in store.run_ids())

    second = Pipeline()
    result = await interpret(second.nodes(), Num(value=1), store=store,
                             config=RunConfig(policy_map=POLICY))
    assert result.status is RunStatus.COMPLETED and result.final_state == FINAL
    assert second.called == {"a", "flaky", "left", "right", "total", "e", "f"}
    assert all(store.get_log(run_id) is None for run_id in store.run_ids())
