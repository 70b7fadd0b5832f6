"""A sub-plan running inside a fan-out child that is itself a sub-plan (a ``parallel`` or
``map_each`` within another's child) keeps its progress in the run's log too: each of its
commits, and each of its group's children that finished, is appended as a ``"path"`` line of
the outer group in flight, so a crash there resumes it from where it was and calls no step
it had committed again. On every store that keeps a log; both async backends (the Redis and
PostgreSQL clients: asyncio)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from pydantic import BaseModel

from stroma import NodeContract, map_each, parallel, replay, seq, stroma_node
from stroma.errors import LogCorrupted
from stroma.log import EffectLog
from stroma.runner import RunConfig, interpret
from stroma.trace import RunStatus
from tests.resume import test_sub_plan_progress as progress_tests

pytestmark = pytest.mark.anyio

# The stores and backends of the one-level tests (fixtures, found here by pytest).
case, anyio_backend, stores = (
    progress_tests.case, progress_tests.anyio_backend, progress_tests.stores)
read_log = progress_tests.read_log


class S(BaseModel):
    value: int = 0
    side: int = 0
    extra: int = 0


class Item(BaseModel):
    item: int


class Items(BaseModel):
    items: list[int]
    outs: list[Item] = []


class World:
    """Counts calls; the node named ``hold`` waits (for ever) while ``holding`` is set."""

    def __init__(self, hold: str) -> None:
        self.calls: Counter[str] = Counter()
        self.hold = hold
        self.holding = True
        self.entered = anyio.Event()

    def node(self, name: str, schema: type[BaseModel] = S,
             fn: Callable[[Any], dict[str, Any]] | None = None,
             output: type[BaseModel] | None = None) -> Any:
        async def call(s: Any) -> dict[str, Any]:
            self.calls[name] += 1
            if name == self.hold and self.holding:
                self.entered.set()
                await anyio.sleep_forever()
            if fn is not None:
                return fn(s)
            if name in ("w", "side"):
                return {name.replace("w", "extra"): 1}
            return {"value": s.value + 1}

        call.__name__ = name
        contract = NodeContract(node_id=name, input_schema=schema,
                                output_schema=output or schema)
        return stroma_node(name, contract)(call)

    def two_levels(self) -> Any:
        """``seq(first, parallel(seq(a, parallel(seq(x, y, z), w)), side))``"""
        n = self.node
        return seq(n("first"), parallel(
            seq(n("a"), parallel(seq(n("x"), n("y"), n("z")), n("w"))), n("side")))

    def three_levels(self) -> Any:
        """``parallel(seq(a, parallel(seq(b, parallel(seq(x, y), w)), side)))``, the outer
        group of one child beside ``first``."""
        n = self.node
        return seq(n("first"), parallel(seq(n("a"), parallel(
            seq(n("b"), parallel(seq(n("x"), n("y")), n("w"))), n("side"))), n("other")))

    def maps(self) -> Any:
        """``map_each`` over items whose body maps again over a list it makes."""
        n = self.node
        inner = seq(n("x", Item, lambda s: {"item": s.item * 10}),
                    n("y", Item, lambda s: {"item": s.item + 1}))
        expand = n("expand", Item, lambda s: {"items": [s.item, s.item + 1]}, output=Items)
        body = seq(expand, map_each(inner, over="items", into="outs", input=Items),
                   n("sum", Items, lambda s: {"item": sum(o.item for o in s.outs)},
                     output=Item))
        return seq(n("start", Items, lambda s: {"items": s.items}),
                   map_each(body, over="items", into="outs", input=Items))


async def cut(world: World, plan: Any, initial: BaseModel, store: Any,
              config: RunConfig) -> None:
    """Run until the held node is called, let the others go as far as they go, then cancel
    the run as a crash would stop it."""
    async with anyio.create_task_group() as tg:
        async def run() -> None:
            await interpret(plan, initial, store=store, config=config)

        tg.start_soon(run)
        await world.entered.wait()
        for _ in range(50):  # (the children beside it finish)
            await anyio.sleep(0)
        tg.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("shape", "hold", "before", "after"),
    [
        ("two_levels", "y", {"first": 1, "a": 1, "x": 1, "y": 1, "w": 1, "side": 1},
         {"y": 1, "z": 1}),
        ("three_levels", "y", {"first": 1, "a": 1, "b": 1, "x": 1, "y": 1, "w": 1,
                               "side": 1, "other": 1}, {"y": 1}),
    ],
)
async def test_a_crash_two_or_three_groups_deep_calls_no_committed_step_again(
    stores: Callable[[], Any], shape: str, hold: str, before: dict[str, int],
    after: dict[str, int],
) -> None:
    """Cut while the innermost ``y`` runs: every step that had committed at any depth
    (``x`` inside the innermost child, ``w`` and ``side`` beside it, ``a``/``b`` above) is
    not called again; only ``y`` (in flight) and what follows it are. The run ends as an
    uninterrupted one does, and its log replays to the same result calling nothing."""
    store = stores
    config = RunConfig(run_id=f"nested-{shape}")
    world = World(hold)
    await cut(world, getattr(world, shape)(), S(), store(), config)
    assert dict(world.calls) == before

    world.holding = False
    resumed = await interpret(getattr(world, shape)(), S(), store=store(), config=config)
    assert resumed.status is RunStatus.RESUMED
    assert world.calls == Counter(before) + Counter(after)

    whole = World(hold)
    whole.holding = False
    expected = await interpret(getattr(whole, shape)(), S())
    assert resumed.final_state == expected.final_state

    log = await read_log(store(), config.run_id)
    assert log is not None
    calls = sum(world.calls.values())
    again = await replay(getattr(world, shape)(), log.to_jsonl())
    assert again.final_state == resumed.final_state and sum(world.calls.values()) == calls


async def test_a_crash_inside_a_map_within_a_map_calls_no_committed_step_again(
    stores: Callable[[], Any],
) -> None:
    """``map_each`` whose body maps again: cut while one inner item's ``y`` runs (the other
    items' steps go as far as they go). Resumed, no step that committed is called again:
    each of ``x`` and ``y`` runs once per inner item, plus the one ``y`` in flight."""
    store = stores
    config = RunConfig(run_id="nested-maps")
    world = World("y")
    first_y: list[int] = []
    world.hold = "never"

    plan = world.maps()
    # Hold the first y called (whichever item it is), let the rest finish.
    original = world.node

    def node(name: str, *args: Any, **kwargs: Any) -> Any:
        made = original(name, *args, **kwargs)
        if name != "y":
            return made

        async def y(s: Item) -> dict[str, Any]:
            world.calls["y"] += 1
            if not first_y and world.holding:
                first_y.append(s.item)
                world.entered.set()
                await anyio.sleep_forever()
            return {"item": s.item + 1}

        return stroma_node("y", made._stroma_contract)(y)

    world.node = node  # type: ignore[method-assign]
    plan = world.maps()
    await cut(world, plan, Items(items=[1, 2]), store(), config)
    before = Counter(world.calls)
    assert before["x"] >= 1 and before["y"] >= 1

    world.holding = False
    resumed = await interpret(world.maps(), Items(items=[1, 2]), store=store(), config=config)
    assert resumed.status is RunStatus.RESUMED
    assert world.calls["x"] == 4  # two items, each expanding to two inner items
    assert world.calls["y"] == 5  # each once, and the one in flight at the cut again
    assert world.calls["expand"] == 2 and world.calls["start"] == 1

    whole = World("never")
    expected = await interpret(whole.maps(), Items(items=[1, 2]))
    assert resumed.final_state == expected.final_state


async def test_a_run_cut_twice_deep_inside_goes_on_from_each_cut(
    stores: Callable[[], Any],
) -> None:
    """Cut while ``y`` runs, resumed, and cut again while ``z`` runs (the first resume's
    records, its resume marker included, are kept with the second's): the second resume
    calls only ``z`` again, and the run ends as an uninterrupted one."""
    store = stores
    config = RunConfig(run_id="nested-twice")
    world = World("y")
    await cut(world, world.two_levels(), S(), store(), config)
    world.hold, world.entered = "z", anyio.Event()
    await cut(world, world.two_levels(), S(), store(), config)
    assert dict(world.calls) == {"first": 1, "a": 1, "x": 1, "y": 2, "w": 1, "side": 1, "z": 1}

    world.holding = False
    resumed = await interpret(world.two_levels(), S(), store=store(), config=config)
    assert resumed.status is RunStatus.RESUMED
    assert dict(world.calls) == {"first": 1, "a": 1, "x": 1, "y": 2, "w": 1, "side": 1,
                                 "z": 2}
    whole = World("never")
    assert resumed.final_state == (await interpret(whole.two_levels(), S())).final_state


async def test_the_log_of_a_run_cut_deep_inside_reads_back_as_it_was_written(
    stores: Callable[[], Any],
) -> None:
    """The log of a run cut while ``y`` runs two groups deep: written out as text and read
    again, it holds the same lines (what ran inside the running child included) and the
    same children to go on with; a damaged path is reported naming the line and field."""
    store = stores
    config = RunConfig(run_id="nested-text")
    world = World("y")
    await cut(world, world.two_levels(), S(), store(), config)
    log = await read_log(store(), config.run_id)
    assert log is not None
    text = log.to_jsonl()
    assert '"path":[[' in text
    again = EffectLog.from_jsonl(text)
    assert again.to_jsonl() == text
    assert again.pending_children() == log.pending_children()
    (outer,) = [o for _, o in log.pending_children().values() if getattr(o, "partials", ())]
    inner = {j: type(o).__name__ for j, _, o in outer.partials}
    assert inner == {0: "NodeCancelled", 1: "NodeReturned"}  # seq(x, y, z) running; w done

    lines = text.splitlines()
    k = next(i for i, line in enumerate(lines) if '"path":[[' in line)
    damaged = json.loads(lines[k])
    damaged["path"][0][1] = -1
    lines[k] = json.dumps(damaged)
    with pytest.raises(LogCorrupted) as caught:
        EffectLog.from_lines(lines, source="damaged")
    assert f"line {k + 1}" in str(caught.value) and "path[0][1]" in str(caught.value)
