"""The timeline of an agent run (a loop of think and a route to a tool, a map_each in one
iteration, an await_input in another): a row per step per iteration, the route choices,
the loop's until answers and the wait as marks, and what a WAITING run waits for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import BaseModel

from interpreters.stores.file import FileStore
from stroma import send_input
from stroma.timeline import OK, WAITING, Timeline, summary, timeline, where_label
from tests.timeline import pipelines as P

pytestmark = pytest.mark.anyio

MAP = f"{P.AGENT_MAP}@agent#2"
WAIT = f"{P.AGENT_WAIT}@agent#3"


async def stored(store: FileStore, run_id: str = "agent") -> Timeline:
    log = await store.read_log(run_id)
    assert log is not None
    return timeline(log)


async def waiting(tmp_path: Path) -> tuple[FileStore, Timeline]:
    store = FileStore(tmp_path)
    result = await P.agent_run(store)
    assert result.status.value == "WAITING"
    return store, await stored(store)


async def test_a_step_has_a_row_per_iteration_in_the_order_they_ran(tmp_path: Path) -> None:
    """think runs once per iteration: three rows, each with its iteration; the retried
    work is one row of two bars in iteration 1; the map's items sit under the map's row
    of iteration 2."""
    _, tl = await waiting(tmp_path)
    assert [(r.key, r.depth) for r in tl.rows] == [
        ("think@agent#1", 0), ("work@agent#1", 0), ("think@agent#2", 0), (MAP, 0),
        (f"{MAP}[0]", 1), (f"{MAP}[1]", 1), ("think@agent#3", 0), (WAIT, 0)]
    assert [r.label for r in tl.rows] == [
        "think @agent#1", "work @agent#1", "think @agent#2", f"{P.AGENT_MAP} @agent#2",
        "lookup @agent#2 item 0", "lookup @agent#2 item 1", "think @agent#3",
        f"{P.AGENT_WAIT} @agent#3"]
    assert [r.iteration for r in tl.rows] == [1, 1, 2, 2, 2, 2, 3, 3]
    assert [b.outcome for b in tl.row("work@agent#1").bars] == ["AMBIGUOUS", OK]
    assert len(tl.row("work@agent#1").gaps) == 1
    item = tl.row(f"{MAP}[1]")
    assert (item.item, item.item_index, item.kind) == (1, 1, "child")
    assert item.where == f"agent#2/{P.AGENT_MAP}[1]"
    assert item.bars[0].output_state == {"hit": "Y"}
    assert tl.row(MAP).kind == "map" and tl.row(WAIT).kind == "wait"


async def test_route_choices_until_answers_and_the_wait_are_marks(tmp_path: Path) -> None:
    """Each route's key, each until answer and the wait are marks in the order they
    happened; a route's mark is on the row of the step it went on with."""
    _, tl = await waiting(tmp_path)
    marks = [(m.kind, m.label, m.row, m.where) for m in tl.marks]
    assert marks == [
        ("route", "pick @agent#1: work", "work@agent#1", "agent#1"),
        ("until", "agent#1: no, on to #2", None, "agent#1"),
        ("route", "pick @agent#2: search", MAP, "agent#2"),
        ("until", "agent#2: no, on to #3", None, "agent#2"),
        ("route", "pick @agent#3: ship", WAIT, "agent#3"),
        ("wait", f"{P.AGENT_WAIT} @agent#3: waiting for {P.AGENT_KEY} (Approval), digest "
                 f"{tl.waits[0].short_digest}", WAIT, "agent#3"),
    ]
    offsets = [m.offset_ms for m in tl.marks]
    assert all(o is not None for o in offsets)


async def test_a_waiting_run_says_what_it_waits_for(tmp_path: Path) -> None:
    """A WAITING run's timeline names the wait (key, schema, digest, step, where), its
    wait's row has a waiting bar that is not counted as an attempt, and its run-list line
    carries the same wait."""
    store, tl = await waiting(tmp_path)
    log = await store.read_log("agent")
    assert log is not None
    assert tl.status == "WAITING" and tl.finished
    (wait,) = tl.waits
    assert (wait.name, wait.key, wait.schema, wait.step_id, wait.where) == (
        "approval", P.AGENT_KEY, "Approval", P.AGENT_WAIT, "agent#3")
    assert len(wait.digest) == 16 and wait.short_digest == wait.digest[:8]
    bar = tl.row(WAIT).bars[0]
    assert bar.outcome == WAITING and not bar.failed and bar.output_state is None
    assert P.AGENT_KEY in (bar.message or "")
    assert tl.attempts == 6 and tl.failures == 1  # 3 think, 2 work, 1 map; no wait
    line = summary(tl)
    assert line.waiting_for == (wait,)
    assert line.to_json()["waiting_for"] == [wait.to_json()]
    data = json.loads(json.dumps(tl.to_json()))
    assert data["waiting_for"] == [{
        "name": "approval", "key": P.AGENT_KEY, "schema": "Approval", "digest": wait.digest,
        "step_id": P.AGENT_WAIT, "where": "agent#3", "timeout_ms": None}]
    row = next(r for r in data["rows"] if r["key"] == "think@agent#2")
    assert (row["iteration"], row["item"], row["where"], row["coords"]) == (
        2, None, "agent#2", [["loop", "agent", 2]])
    assert {m["kind"] for m in data["marks"]} == {"route", "until", "wait"}


async def test_a_resumed_wait_shows_the_wait_then_the_input(tmp_path: Path) -> None:
    """Once the input is sent and the run goes on, the wait's row has the waiting bar
    (lasting until the input was read) and the ok bar; the marks say the input came and
    the loop ended; the run waits for nothing any more."""
    store, _ = await waiting(tmp_path)
    await send_input(store, "agent", "approval", {"ok": True, "by": "ann"})
    result = await P.agent_resumed(store)
    assert result.status.value == "RESUMED"
    assert result.final_state.done == ["a", "shipped"]
    tl = await stored(store)
    assert tl.waits == () and tl.status == "RESUMED"
    wait_row = tl.row(WAIT)
    assert [b.outcome for b in wait_row.bars] == [WAITING, OK]
    waited, answered = wait_row.bars
    assert waited.end_ms == pytest.approx(answered.offset_ms, abs=1.0)
    assert answered.output_state["approval"] == {"ok": True, "by": "ann"}
    assert tl.row("ship@agent#3").bars[0].outcome == OK
    kinds = [m.kind for m in tl.marks]
    assert kinds[-4:] == ["wait", "resumed", "input", "until"]
    assert tl.marks[-2].label == f"{P.AGENT_WAIT} @agent#3: {P.AGENT_KEY} received"
    assert tl.marks[-1].label == "agent#3: yes, the loop ends"
    assert tl.attempts == 8  # the 6 before, the wait's answer and ship


async def test_an_input_the_run_refused_is_marked_refused_not_only_received(
    tmp_path: Path,
) -> None:
    """An input kept in the store that does not fit the wait (sent without its schema at
    hand, as the CLI does, or that a validator refuses) is read and refused when the run
    goes on, and the run waits on: its mark said "received" as for one taken, so `show`
    listed two inputs received for one answer. The refused one says so and why."""
    store, _ = await waiting(tmp_path)
    await store.put_input("agent", P.AGENT_KEY, '{"ok": "perhaps"}')  # (no bool)
    refused = await P.agent_resumed(store)
    assert refused.status.value == "WAITING"
    await send_input(store, "agent", "approval", {"ok": True, "by": "ann"})  # (no replace)
    assert (await P.agent_resumed(store)).status.value == "RESUMED"
    tl = await stored(store)
    inputs = [m.label for m in tl.marks if m.kind == "input"]
    assert len(inputs) == 2, inputs
    assert inputs[0].startswith(f"{P.AGENT_WAIT} @agent#3: {P.AGENT_KEY} received, refused: "
                                f"the input {P.AGENT_KEY!r} sent does not fit Approval: ")
    assert "ok: Input should be a valid boolean" in inputs[0]
    assert inputs[1] == f"{P.AGENT_WAIT} @agent#3: {P.AGENT_KEY} received"


def test_where_labels() -> None:
    """Coordinates as labels: loops as @name#n (nested ones joined by /), items as
    'item j'."""
    assert where_label(()) == ""
    assert where_label((("loop", "agent", 3),)) == "@agent#3"
    assert where_label((("loop", "agent", 3), ("item", "m", 2))) == "@agent#3 item 2"
    assert where_label((("loop", "outer", 1), ("loop", "inner", 2))) == "@outer#1/inner#2"
    assert where_label((("item", "m", 0), ("loop", "l", 4))) == "item 0 @l#4"


async def test_choices_made_inside_a_fan_out_child_are_marked(anyio_backend: str) -> None:
    """A route's choice and a loop's until answer inside a map_each item are marked, as
    they are at the top of a run, each named by the item it was made in."""
    from stroma import StromaRunner, interpret, loop, map_each, route, seq

    runner = StromaRunner.quick()

    class Q(BaseModel):
        item: int
        k: int = 0

    class T(BaseModel):
        items: list[int] = [1, 2]
        out: list[Q] = []

    @runner.node("inc", input=Q, output=Q)
    async def inc(q: Q) -> dict[str, int]:
        return {"item": q.item, "k": q.k + 1}

    @runner.node("odd", input=Q, output=Q)
    async def odd(q: Q) -> dict[str, int]:
        return {"item": q.item, "k": q.k}

    @runner.node("even", input=Q, output=Q)
    async def even(q: Q) -> dict[str, int]:
        return {"item": q.item, "k": q.k}

    body = loop(seq(inc, route(lambda q: "odd" if q.item % 2 else "even",
                               {"odd": odd, "even": even}, name="pick")),
                until=lambda q: q.k >= 2, max_iterations=5, name="inner")
    result = await interpret(seq(map_each(body, over="items", into="out", input=T)), T())
    labels = [m.label for m in timeline(result.log).marks]
    assert "pick item 0 @inner#1: odd" in labels and "pick item 1 @inner#2: even" in labels
    assert "item 0: inner#1: no, on to #2" in labels
    assert "item 1: inner#2: yes, the loop ends" in labels


async def test_a_run_waiting_inside_a_map_shows_the_group_its_items_and_their_waits(
        anyio_backend: str) -> None:
    """A map_each whose items each wait for input: the run ends WAITING at the group (no
    attempt recorded), and the timeline still has the group's row, waiting, with a row
    per item, each waiting, and a wait mark per item."""
    from stroma import StromaRunner, await_input, interpret, map_each, seq

    runner = StromaRunner.quick()

    class Review(BaseModel):
        ok: bool

    class Doc(BaseModel):
        item: int
        review: Review | None = None

    class Batch(BaseModel):
        items: list[Doc] = [Doc(item=1), Doc(item=2), Doc(item=3)]
        out: list[Doc] = []

    @runner.node("start", input=Batch, output=Batch)
    async def start(b: Batch) -> Batch:
        return b

    plan = seq(start, map_each(await_input("review", Review), over="items", into="out",
                               input=Batch))
    result = await interpret(plan, Batch())

    assert result.status.value == "WAITING"
    tl = timeline(result.log)
    group = next(r for r in tl.rows if r.kind == "map")
    assert [b.outcome for b in group.bars] == [WAITING]
    assert group.bars[0].message == "3 of its children wait for input"
    items = [r for r in tl.rows if r.parent == group.key]
    assert [r.label for r in items] == [
        "await_input(review) [item 0]", "await_input(review) [item 1]",
        "await_input(review) [item 2]"]
    assert all([b.outcome for b in r.bars] == [WAITING] for r in items)
    assert [m.kind for m in tl.marks].count("wait") == 3
    assert len(tl.waits) == 3
