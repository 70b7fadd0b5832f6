"""Store errors inside a fan-out leave ``interpret`` as one error (issue 10, item 9).

Children of a ``parallel`` or ``map_each`` that finish are made durable at once; when the
store refuses those appends for two children, both raise inside the group's task group.
What leaves ``interpret`` is a single StoreError (the first; the others attached as notes),
never an ExceptionGroup, so ``except StoreError`` catches it; the run's log stays readable,
and once the store works again the run resumes to the right result.
"""

from __future__ import annotations

import errno
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydantic import BaseModel

import interpreters.stores.file as file_module
from interpreters.stores.file import FileStore
from stroma import (
    EffectLog,
    NodeContract,
    RunStatus,
    map_each,
    parallel,
    seq,
    stroma_node,
)
from stroma.errors import StoreError
from stroma.runner import RunConfig, interpret

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """FileStore and the custom store here run on asyncio and on trio."""
    return str(request.param)


class Num(BaseModel):
    value: int


class Left(BaseModel):
    left: int


class Right(BaseModel):
    right: int


class Items(BaseModel):
    items: list[int]


class Item(BaseModel):
    item: int


def node(node_id: str, inp: type[BaseModel], out: type[BaseModel], body: Any,
         calls: Counter[str]) -> Any:
    async def fn(state: Any) -> Any:
        calls[node_id] += 1
        return body(state)

    fn.__name__ = node_id
    return stroma_node(node_id, NodeContract(node_id=node_id, input_schema=inp,
                                             output_schema=out))(fn)


def plans(calls: Counter[str]) -> dict[str, tuple[Any, BaseModel, Any]]:
    """name: (plan, initial state, expected final state) of a parallel, a map_each and a
    map_each whose children are sub-plans."""
    left = node("left", Num, Left, lambda s: {"left": s.value + 1}, calls)
    right = node("right", Num, Right, lambda s: {"right": s.value - 1}, calls)
    item = node("item", Item, Item, lambda i: {"item": i.item * 10}, calls)
    first = node("first", Item, Item, lambda i: {"item": i.item + 1}, calls)
    second = node("second", Item, Item, lambda i: {"item": i.item * 2}, calls)
    # A first node, so the log has its header and a commit before the group.
    start = node("start", Num, Num, lambda s: {"value": s.value}, calls)
    begin = node("begin", Items, Items, lambda s: {"items": s.items}, calls)
    return {
        "parallel": (seq(start, parallel(left, right)), Num(value=5), {"left": 6, "right": 4}),
        "map": (seq(begin, map_each(item, over="items", into="outs", input=Items)),
                Items(items=[1, 2, 3]), [{"item": 10}, {"item": 20}, {"item": 30}]),
        "sub-plans": (seq(begin, map_each(seq(first, second), over="items", into="outs",
                                          input=Items)),
                      Items(items=[1, 2]), [{"item": 4}, {"item": 6}]),
    }


def final(result: Any, name: str) -> Any:
    data = result.final_state.model_dump()
    return {"left": data["left"], "right": data["right"]} if name == "parallel" else (
        data["outs"])


class RefusingLogStore:
    """A custom async LogStore that keeps everything in memory and refuses every append
    of a fan-out child's partial record (the group's children finishing) while
    ``refusing`` is set, raising a new ``error(message)`` each time."""

    def __init__(self, error: type[BaseException], message: str) -> None:
        self.lines: dict[str, list[str]] = {}
        self.checkpoints: dict[tuple[str, str], BaseModel] = {}
        self.error = error
        self.message = message
        self.refusing = True
        self.refused = 0

    async def save(self, run_id: str, node_id: str, state: BaseModel) -> None:
        self.checkpoints[run_id, node_id] = state

    async def load(self, run_id: str, node_id: str) -> BaseModel | None:
        return self.checkpoints.get((run_id, node_id))

    async def delete(self, run_id: str) -> None:
        self.lines.pop(run_id, None)

    async def append_log(self, run_id: str, lines: Sequence[str],
                         checkpoint: tuple[str, BaseModel] | None = None) -> None:
        await anyio.sleep(0)  # a round trip to the store's server
        if self.refusing and any('"partial":' in line for line in lines):
            self.refused += 1
            raise self.error(self.message)
        if checkpoint is not None:
            self.checkpoints[run_id, checkpoint[0]] = checkpoint[1]
        self.lines.setdefault(run_id, []).extend(lines)

    async def read_log(self, run_id: str) -> EffectLog | None:
        lines = self.lines.get(run_id)
        return None if lines is None else EffectLog.from_lines(list(lines), source=run_id)


@pytest.mark.parametrize("name", ["parallel", "map", "sub-plans"])
async def test_a_custom_store_error_in_two_children_is_one_store_error(
    anyio_backend: str, name: str
) -> None:
    """Two (or more) children whose partial appends the store refuses: interpret raises
    one StoreError (caught by ``except StoreError``), the other errors attached as notes;
    the log stays readable and, the store mended, the run resumes to the right result."""
    calls: Counter[str] = Counter()
    plan, state, expected = plans(calls)[name]
    store = RefusingLogStore(StoreError, "the log server refused the append")
    config = RunConfig(run_id=f"refused-{name}")

    with pytest.raises(StoreError) as caught:
        await interpret(plan, state, store=store, config=config)

    assert not isinstance(caught.value, BaseExceptionGroup)
    assert "refused the append" in str(caught.value)
    assert store.refused >= 2
    notes = getattr(caught.value, "__notes__", [])
    assert len(notes) == store.refused - 1
    assert all(n.startswith("also: StoreError: the log server refused") for n in notes)
    log = await store.read_log(config.run_id)
    assert log is not None and log.finish is None and log.completed_nodes() == [
        "start" if name == "parallel" else "begin"]
    store.refusing = False
    resumed = await interpret(plan, state, store=store, config=config)
    assert resumed.status is RunStatus.RESUMED and final(resumed, name) == expected


async def test_a_store_s_own_error_in_two_children_is_one_exception_too(
    anyio_backend: str,
) -> None:
    """A custom store raising its own (non-stroma) error in two children: one exception of
    that type leaves interpret, not an ExceptionGroup, the other attached as a note."""
    calls: Counter[str] = Counter()
    plan, state, _ = plans(calls)["parallel"]
    store = RefusingLogStore(ConnectionResetError, "the store's server went away")

    with pytest.raises(ConnectionResetError) as caught:
        await interpret(plan, state, store=store, config=RunConfig(run_id="own-error"))

    assert not isinstance(caught.value, BaseExceptionGroup)
    assert store.refused == 2
    assert caught.value.__notes__ == [
        "also: ConnectionResetError: the store's server went away"]


@pytest.mark.parametrize("name", ["parallel", "map", "sub-plans"])
async def test_a_file_store_whose_appends_fail_in_a_fan_out_is_one_store_error(
    anyio_backend: str, name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A FileStore whose appends of finished children fail (EIO) gives one StoreError
    naming FileStore.append_log and the run, the rest as notes; a fresh FileStore reads
    the log whole afterwards, and the run resumes to the right result."""
    calls: Counter[str] = Counter()
    plan, state, expected = plans(calls)[name]
    real_write = file_module._write_all
    failed = [0]

    def failing_write(fd: int, data: bytes) -> None:
        if b'"partial":' in data:
            failed[0] += 1
            raise OSError(errno.EIO, "Input/output error")
        real_write(fd, data)

    monkeypatch.setattr(file_module, "_write_all", failing_write)
    store = FileStore(tmp_path / "runs")
    run_id = f"eio-{name}"

    with pytest.raises(StoreError) as caught:
        await interpret(plan, state, store=store, config=RunConfig(run_id=run_id))

    assert not isinstance(caught.value, BaseExceptionGroup)
    message = str(caught.value)
    assert "FileStore.append_log" in message and repr(run_id) in message
    assert failed[0] >= 2
    assert len(getattr(caught.value, "__notes__", [])) == failed[0] - 1
    log = await FileStore(tmp_path / "runs").read_log(run_id)
    assert log is not None and log.finish is None and len(log.completed_nodes()) == 1
    monkeypatch.setattr(file_module, "_write_all", real_write)
    resumed = await interpret(plan, state, store=store, config=RunConfig(run_id=run_id))
    assert resumed.status is RunStatus.RESUMED and final(resumed, name) == expected
