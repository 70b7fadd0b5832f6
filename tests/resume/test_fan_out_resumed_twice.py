"""A fan-out cut short twice in a row never runs a child that finished again.

The children that finished before a crash are in the log as lines of the group in flight.
The session that goes on adds its resume marker, and the group's record then comes after
it; the children kept before the marker still count while nothing but resume markers
follows them. The second session is cut short again at each point of its start (before it
kept anything, after its marker alone, or part way through what it keeps): the third
session still runs only the children that never finished.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from pydantic import BaseModel

from stroma import (
    EffectLog,
    FileStore,
    NodeContract,
    RunConfig,
    RunStatus,
    interpret,
    map_each,
    parallel,
    replay,
    seq,
    stroma_node,
)
from stroma.effects import NodeCancelled
from stroma.log import ResumeMarker

pytestmark = pytest.mark.anyio

ITEMS = [0, 1, 2, 3, 4]
FINISH_FIRST = {0, 1, 2}  # the children that finish before the first cut


class It(BaseModel):
    item: int


class Out(BaseModel):
    item: int
    double: int


class S(BaseModel):
    items: list[int] = []
    outs: list[Out] = []


class CutStore(FileStore):
    """A FileStore whose ``cut``-th append of a session is cancelled before it is written
    (``after`` True: once it is written)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.scope: anyio.CancelScope | None = None
        self.cut: int | None = None
        self.after = False
        self.appends = 0

    async def append_log(self, run_id: str, lines: Any, checkpoint: Any = None) -> None:
        self.appends += 1
        if self.appends == self.cut and not self.after:
            self._stop()
            await anyio.lowlevel.checkpoint()
        await super().append_log(run_id, lines, checkpoint)
        if self.appends == self.cut and self.after:
            self._stop()
            await anyio.lowlevel.checkpoint()

    def _stop(self) -> None:
        assert self.scope is not None
        self.scope.cancel()


class Fanout:
    def __init__(self) -> None:
        self.calls: list[int] = []
        self.block: set[int] = set()
        self.finished = anyio.Event()

    def plan(self, shape: str) -> Any:
        async def double(state: It) -> Out:
            self.calls.append(state.item)
            if state.item in self.block:
                await anyio.sleep_forever()
            return Out(item=state.item, double=2 * state.item)

        f = stroma_node("double", NodeContract(node_id="double", input_schema=It,
                                               output_schema=Out))(double)
        group = map_each(f, over="items", into="outs", input=S)
        if shape == "map_each":
            return group
        return seq(parallel(group))  # the fan-out as a sub-plan child of a group

    async def run(self, store: CutStore, shape: str) -> Any:
        with anyio.CancelScope() as scope:
            store.scope = scope
            return await interpret(self.plan(shape), S(items=ITEMS), store=store,
                                   config=RunConfig(run_id="r"))
        return None


async def _first_cut(store: CutStore, fanout: Fanout, shape: str) -> None:
    """Run until the children in FINISH_FIRST are kept and the others block, then cut."""
    fanout.block = set(ITEMS) - FINISH_FIRST

    async def watch() -> None:
        while True:
            log = await store.read_log("r")
            if log is not None and _kept(log) >= FINISH_FIRST:
                assert store.scope is not None
                store.scope.cancel()
                return
            await anyio.sleep(0.001)

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        assert await fanout.run(store, shape) is None
        tg.cancel_scope.cancel()


def _kept(log: EffectLog) -> set[int]:
    """The items whose child finished, as the log's group in flight holds them (or, the
    fan-out a sub-plan child, its own group in flight)."""
    pending = log.pending_children()
    if 0 in pending and type(pending[0][1]) is NodeCancelled:
        return {ITEMS[j] for j, _, _ in pending[0][1].partials}
    return {ITEMS[j] for j in pending}


@pytest.mark.parametrize("shape", ["map_each", "sub-plan"])
@pytest.mark.parametrize("cut,after", [(1, False), (1, True), (2, False), (2, True),
                                       (3, False), (3, True)])
async def test_a_fan_out_cut_short_twice_runs_no_finished_child_again(
    anyio_backend: str, tmp_path: Path, shape: str, cut: int, after: bool
) -> None:
    store = CutStore(tmp_path)
    fanout = Fanout()
    await _first_cut(store, fanout, shape)
    assert set(fanout.calls) == set(ITEMS)

    # The second session: cut at its ``cut``-th append (keeping again what finished
    # before, keeping a child that finished now).
    fanout.calls.clear()
    fanout.block = set()
    store.appends, store.cut, store.after = 0, cut, after
    second = await fanout.run(store, shape)
    assert set(fanout.calls) <= set(ITEMS) - FINISH_FIRST
    log = await store.read_log("r")
    assert log is not None
    if second is None:
        kept = _kept(log)
        assert kept >= FINISH_FIRST
    else:  # (a child's append is shielded: the cut came too late, after the last await)
        assert log.finish is not None
        kept = set(ITEMS)

    # The third session goes on to the end, running only what was never kept.
    fanout.calls.clear()
    store.cut = None
    result = await fanout.run(store, shape)
    assert result is not None and result.status is RunStatus.RESUMED
    assert sorted(fanout.calls) == sorted(set(ITEMS) - kept)
    assert result.final_state.outs == [Out(item=i, double=2 * i) for i in ITEMS]
    fanout.calls.clear()
    again = await replay(fanout.plan(shape), await store.read_log("r"))
    assert again.final_state == result.final_state and fanout.calls == []


async def test_a_log_cut_after_a_resume_marker_alone_keeps_its_children_in_text(
    anyio_backend: str, tmp_path: Path
) -> None:
    """The text of a log whose group in flight has children kept before a resume marker
    (the second session kept its marker alone) reads back to the same children."""
    store = CutStore(tmp_path)
    fanout = Fanout()
    await _first_cut(store, fanout, "map_each")
    log = await store.read_log("r")
    assert log is not None
    log.records.append(ResumeMarker("2026-01-01T00:00:00+00:00"))
    assert _kept(log) == FINISH_FIRST
    text = log.to_jsonl()
    assert _kept(EffectLog.from_jsonl(text)) == FINISH_FIRST
    assert EffectLog.from_jsonl(text).to_jsonl() == text
