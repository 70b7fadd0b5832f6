"""A fan-out child that is a sub-plan keeps its progress in the run's log as it runs: each
of its commits is appended (with the checkpoint) as a ``"progress"`` line of the group in
flight, so a crash while the child runs resumes it from there, and the steps it had
committed are not called again. On FileStore, RedisStore, PostgresStore and the
in-memory store with an explicit run id; both async backends (the Redis and PostgreSQL
clients: asyncio)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydantic import BaseModel

from interpreters.stores.file import LOG_NAME, FileStore
from stroma import InMemoryStore, NodeContract, parallel, replay, seq, stroma_node
from stroma.errors import LogCorrupted
from stroma.log import EffectLog
from stroma.runner import RunConfig, interpret
from stroma.timeline import timeline
from stroma.trace import RunStatus

pytestmark = pytest.mark.anyio


class S(BaseModel):
    value: int = 0
    side: int = 0


class World:
    """The plan ``seq(first, parallel(seq(a, b, c), side))``, counting calls; ``b`` waits
    (for ever) while ``hold`` is set, so the run can be cut there."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.hold = True
        self.entered = anyio.Event()

    def node(self, name: str) -> Any:
        async def fn(s: S) -> dict[str, int]:
            self.calls[name] += 1
            if name == "b" and self.hold:
                self.entered.set()
                await anyio.sleep_forever()
            if name == "side":
                return {"side": 1}
            return {"value": s.value + 1}

        fn.__name__ = name
        return stroma_node(name, NodeContract(node_id=name, input_schema=S, output_schema=S))(
            fn)

    def plan(self) -> Any:
        return seq(self.node("first"), parallel(
            seq(self.node("a"), self.node("b"), self.node("c")), self.node("side")))


async def cut_at_b(world: World, store: Any, config: RunConfig) -> None:
    """Run until ``b`` is called (``a`` and ``side`` are done by then), then cancel the
    run as a crash would stop it."""
    async with anyio.create_task_group() as tg:
        async def run() -> None:
            await interpret(world.plan(), S(), store=store, config=config)

        tg.start_soon(run)
        await world.entered.wait()
        for _ in range(20):  # (side, started beside the child, finishes too)
            await anyio.sleep(0)
        tg.cancel_scope.cancel()


CASES = [("file", "asyncio"), ("file", "trio"), ("memory", "asyncio"), ("memory", "trio"),
         ("redis", "asyncio"), ("postgres", "asyncio")]


@pytest.fixture(params=CASES, ids=["-".join(c) for c in CASES])
def case(request: pytest.FixtureRequest) -> tuple[str, str]:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def anyio_backend(case: tuple[str, str]) -> str:
    return case[1]


@pytest.fixture
def stores(case: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest,
           ) -> Callable[[], Any]:
    """``stores()``: a store object on one shared place (a new object each time, as
    another process would make; the in-memory store: the same object). Redis and
    PostgreSQL: this folder's ``redis_stores`` and ``postgres_stores``."""
    kind = case[0]
    if kind == "memory":
        memory = InMemoryStore()
        return lambda: memory
    if kind == "file":
        return lambda: FileStore(tmp_path / "store")
    made: Callable[[], Any] = request.getfixturevalue(f"{kind}_stores")
    return made


async def read_log(store: Any, run_id: str) -> Any:
    read = getattr(store, "read_log", None)
    return await read(run_id) if read is not None else store.get_log(run_id)


async def test_a_crash_inside_a_sub_plan_child_does_not_run_its_committed_steps_again(
    stores: Callable[[], Any],
) -> None:
    """Cut while ``b`` runs: ``a`` had committed inside the child, ``side`` had finished
    beside it. The resumed run calls ``b`` (in flight) and ``c``, and neither ``a`` nor
    ``side`` nor ``first`` again; it ends as an uninterrupted run does, and its log
    replays to the same result calling nothing."""
    store = stores
    config = RunConfig(run_id="sub-plan-progress")
    world = World()
    await cut_at_b(world, store(), config)
    assert dict(world.calls) == {"first": 1, "a": 1, "b": 1, "side": 1}

    world.hold = False
    resumed = await interpret(world.plan(), S(), store=store(), config=config)
    assert resumed.status is RunStatus.RESUMED
    assert dict(world.calls) == {"first": 1, "a": 1, "b": 2, "side": 1, "c": 1}

    whole = World()
    whole.hold = False
    expected = await interpret(whole.plan(), S())
    assert resumed.final_state == expected.final_state
    assert resumed.final_state.model_dump() == {"value": 4, "side": 1}

    log = await read_log(store(), config.run_id)
    assert log is not None
    before = sum(world.calls.values())
    again = await replay(world.plan(), log.to_jsonl())
    assert again.final_state == resumed.final_state and sum(world.calls.values()) == before


@pytest.mark.parametrize("case", [("file", "asyncio")], ids=["file-asyncio"])
async def test_a_log_cut_inside_a_sub_plan_child_reads_back_its_progress_and_names_damage(
    tmp_path: Path,
) -> None:
    """The log of a run cut inside the child holds the child's records as progress lines:
    they read back into the group's pending children (the child's records so far) and
    write back the same text; a progress line out of sequence is LogCorrupted naming
    its line."""
    world = World()
    config = RunConfig(run_id="cut")
    await cut_at_b(world, FileStore(tmp_path / "store"), config)
    log = await FileStore(tmp_path / "store").read_log("cut")
    assert log is not None
    pending = log.pending_children()
    assert set(pending) == {0, 1}
    call, progress = pending[0]
    assert call.child_id.endswith("[0]")
    assert [type(e).__name__ for e, _ in progress.records] == ["CallNode", "Commit"]
    assert progress.records[1][0].node_id == "a"
    text = log.to_jsonl()
    assert EffectLog.from_jsonl(text).to_jsonl() == text
    # `show` tells the child still running (and what it kept) from one that finished.
    bars = {row.key: [(b.outcome, b.message) for b in row.bars] for row in timeline(log).rows}
    group = "parallel(seq(a, b, c), side)"
    assert bars[group] == [("unfinished", "in flight when the log ends: 1 child(ren) had "
                                          "finished, 1 still running")]
    assert bars[f"{group}[0]"] == [("unfinished", "running when the log ends: 1 commit(s) "
                                                  "kept")]

    path = tmp_path / "store" / "runs" / "cut" / LOG_NAME
    lines = [line for line in text.split("\n") if line]
    damaged = [line.replace('"progress":1,', '"progress":2,') for line in lines]
    number = next(k for k, line in enumerate(damaged, 1) if '"progress":2,' in line)
    path.write_text("\n".join(damaged) + "\n")
    with pytest.raises(LogCorrupted, match=rf"line {number}: field progress: expected "
                                           r"record 1 of the child, found 2"):
        EffectLog.from_jsonl(path.read_text())
