"""map_each: one run of a step per item, outputs collected in item order."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from pydantic import BaseModel

import stroma
from stroma import AsyncInMemoryStore, RunStatus
from stroma import effects as fx
from stroma.plan import branch, map_each, parallel, seq
from stroma.runner import RunConfig, interpret
from tests.combinators.kit import Item, Items, Num, Out, Script, field_model

FAST = {"RECOVERABLE": {"max_retries": 0, "backoff_seconds": 0},
        "AMBIGUOUS": {"max_retries": 0, "backoff_seconds": 0}}


class Words(BaseModel):
    words: list[str]


class Word(BaseModel):
    item: str


class Length(BaseModel):
    word: str
    n: int


class Point(BaseModel):
    x: int
    y: int


class Points(BaseModel):
    points: list[Point]


class Dicts(BaseModel):
    rows: list[dict[str, int]]


@pytest.mark.anyio
async def test_item_order_is_kept_whatever_the_completion_order(anyio_backend: str) -> None:
    """Items finishing in reverse order still land in ``into`` in item order."""
    script = Script()
    finished: list[int] = []

    async def body(i: Item) -> dict[str, int]:
        for _ in range((10 - i.item) * 2):
            await anyio.sleep(0)
        finished.append(i.item)
        return {"out": i.item * i.item}

    plan = seq(map_each(script.node("sq", Item, Out, body), over="items", into="outs",
                        input=Items))
    result = await interpret(plan, Items(items=list(range(10))))
    assert finished == list(range(9, -1, -1))
    assert result.final_state.model_dump() == {
        "items": list(range(10)), "outs": [{"out": i * i} for i in range(10)],
    }


@pytest.mark.anyio
async def test_plain_items_arrive_as_item_fields(anyio_backend: str) -> None:
    """A str item reaches the body as ``{"item": value}``; the state keeps its own fields."""
    script = Script()

    async def measure(w: Word) -> dict[str, Any]:
        return {"word": w.item, "n": len(w.item)}

    plan = seq(map_each(script.node("len", Word, Length, measure), over="words",
                        into="lengths", input=Words))
    result = await interpret(plan, Words(words=["a", "bbb", "cc"]))
    assert result.final_state.model_dump() == {
        "words": ["a", "bbb", "cc"],
        "lengths": [{"word": "a", "n": 1}, {"word": "bbb", "n": 3}, {"word": "cc", "n": 2}],
    }


@pytest.mark.anyio
async def test_model_and_dict_items_arrive_as_themselves(anyio_backend: str) -> None:
    """Model items and dict items are passed as they are (validated by the body)."""
    script = Script()

    async def norm(p: Point) -> dict[str, int]:
        return {"out": abs(p.x) + abs(p.y)}

    points = seq(map_each(script.node("norm", Point, Out, norm), over="points", into="outs",
                          input=Points))
    result = await interpret(points, Points(points=[Point(x=1, y=-2), Point(x=3, y=4)]))
    assert [o["out"] for o in result.final_state.model_dump()["outs"]] == [3, 7]
    rows = seq(map_each(script.node("norm2", Point, Out, norm), over="rows", into="outs",
                        input=Dicts))
    result = await interpret(rows, Dicts(rows=[{"x": 1, "y": 1}, {"x": -5, "y": 0}]))
    assert [o["out"] for o in result.final_state.model_dump()["outs"]] == [2, 5]
    bad = await interpret(rows, Dicts(rows=[{"x": 1}]))
    assert bad.status is RunStatus.FAILED and "ContractViolation" in (bad.stop_reason or "")


@pytest.mark.anyio
async def test_a_sub_plan_body_retries_its_nodes_inside_the_child(anyio_backend: str) -> None:
    """With a seq body, a flaky second node retries within its item: the first node of that
    item is not run again, no other item reruns, and the map step has one attempt."""
    script = Script()
    tries: dict[int, int] = {}

    async def parse(i: Item) -> dict[str, int]:
        return {"item": i.item + 1}

    async def fetch(i: Item) -> dict[str, int]:
        tries[i.item] = tries.get(i.item, 0) + 1
        if i.item == 3 and tries[i.item] < 3:
            raise TimeoutError("flaky fetch")
        return {"out": i.item * 10}

    body = seq(script.node("parse", Item, Item, parse), script.node("fetch", Item, Out, fetch))
    plan = seq(map_each(body, over="items", into="outs", input=Items)).with_retry(
        "fetch", {"RECOVERABLE": {"max_retries": 3, "backoff_seconds": 0}}
    )
    result = await interpret(plan, Items(items=[0, 1, 2]), config=RunConfig(policy_map=FAST))
    assert result.status is RunStatus.COMPLETED
    assert [o["out"] for o in result.final_state.model_dump()["outs"]] == [10, 20, 30]
    assert script.calls == {"parse": 3, "fetch": 5} and tries == {1: 1, 2: 1, 3: 3}
    assert [(e.node_id, e.attempt) for e in result.trace] == [
        ("map_each(seq(parse, fetch), over=items, into=outs)", 1),
    ]
    # The retries are in the item's own records.
    group = next(r for r in result.log.records if isinstance(r[0], fx.CallParallel))
    sub = group[1].outcomes[2]
    attempts = [e.event for e, _ in sub.records if isinstance(e, fx.RecordAttempt | fx.Commit)]
    assert [(a.node_id, a.attempt, a.failure is None) for a in attempts] == [
        ("parse", 1, True), ("fetch", 1, False), ("fetch", 2, False), ("fetch", 3, True),
    ]


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["with_retry", "node_policies"])
async def test_a_single_node_body_with_its_own_policy_retries_alone(anyio_backend: str,
                                                                    how: str) -> None:
    """A lone body node given a retry policy (plan.with_retry or RunConfig.node_policies)
    retries per item, instead of the policy being ignored and the whole map failing."""
    script = Script()
    tries: dict[int, int] = {}

    async def fetch(i: Item) -> dict[str, int]:
        tries[i.item] = tries.get(i.item, 0) + 1
        if i.item == 2 and tries[i.item] < 3:
            raise TimeoutError("flaky")
        return {"out": i.item}

    plan = seq(map_each(script.node("fetch", Item, Out, fetch), over="items", into="outs",
                        input=Items))
    policy = {"RECOVERABLE": {"max_retries": 2, "backoff_seconds": 0}}
    config = RunConfig(policy_map=FAST)
    if how == "with_retry":
        plan = plan.with_retry("fetch", policy)
    else:
        config = RunConfig(policy_map=FAST, node_policies={"fetch": policy})
    result = await interpret(plan, Items(items=[1, 2, 3]), config=config)
    assert result.status is RunStatus.COMPLETED, result.stop_reason
    assert tries == {1: 1, 2: 3, 3: 1}
    script.replaying = True
    assert await stroma.replay(plan, result.log) == result


@pytest.mark.anyio
async def test_a_parallel_inside_a_map(anyio_backend: str) -> None:
    """A map body that is a parallel group merges per item, items kept in order."""
    script = Script()

    async def double(i: Item) -> dict[str, int]:
        return {"twice": i.item * 2}

    async def negate(i: Item) -> dict[str, int]:
        return {"neg": -i.item}

    body = parallel(script.node("twice", Item, field_model("twice"), double),
                    script.node("neg", Item, field_model("neg"), negate))
    plan = seq(map_each(body, over="items", into="both", input=Items, max_concurrency=2))
    result = await interpret(plan, Items(items=[1, 2, 3]))
    assert result.status is RunStatus.COMPLETED
    assert result.final_state.model_dump()["both"] == [
        {"twice": 2, "neg": -1}, {"twice": 4, "neg": -2}, {"twice": 6, "neg": -3},
    ]
    script.replaying = True
    assert await stroma.replay(plan, result.log.to_jsonl()) == result


class Grid(BaseModel):
    rows: list[list[int]]


@pytest.mark.anyio
async def test_a_map_inside_a_map(anyio_backend: str) -> None:
    """A map body may itself map over the item (a list item arrives as ``{"item": [...]}``),
    without naming its input: the item's schema is known."""
    script = Script()

    async def cell(i: Item) -> dict[str, int]:
        return {"out": i.item + 100}

    inner = map_each(script.node("cell", Item, Out, cell), over="item", into="cells")
    plan = seq(map_each(inner, over="rows", into="done", input=Grid))
    result = await interpret(plan, Grid(rows=[[1, 2], [], [3]]))
    assert result.status is RunStatus.COMPLETED, result.stop_reason
    done = result.final_state.model_dump()["done"]
    assert [[c["out"] for c in row["cells"]] for row in done] == [[101, 102], [], [103]]
    script.replaying = True
    assert await stroma.replay(plan, result.log) == result


@pytest.mark.anyio
async def test_a_branch_inside_a_map_body(anyio_backend: str) -> None:
    """Each item takes its own arm of a branch in the body; replay takes the same arms
    without calling the predicate."""
    script = Script()
    armed = {"on": False}

    def odd(i: Any) -> bool:
        assert not armed["on"], "predicate called during replay"
        return i.item % 2 == 1

    async def tag_odd(i: Item) -> dict[str, int]:
        return {"out": -i.item}

    async def tag_even(i: Item) -> dict[str, int]:
        return {"out": i.item}

    body = seq(branch(odd, then=script.node("odd", Item, Out, tag_odd),
                      otherwise=script.node("even", Item, Out, tag_even), name="odd?"))
    plan = seq(map_each(body, over="items", into="outs", input=Items))
    result = await interpret(plan, Items(items=[1, 2, 3, 4]))
    assert [o["out"] for o in result.final_state.model_dump()["outs"]] == [-1, 2, -3, 4]
    assert script.calls == {"odd": 2, "even": 2}
    armed["on"] = script.replaying = True
    assert await stroma.replay(plan, result.log) == result


@pytest.mark.anyio
async def test_a_map_inside_a_parallel_child(anyio_backend: str) -> None:
    """A parallel child that is a sub-plan ending in a map runs beside a plain node."""
    script = Script()

    async def sq(i: Item) -> dict[str, int]:
        return {"out": i.item ** 2}

    async def count(s: Items) -> dict[str, int]:
        return {"count": len(s.items)}

    async def same(s: Items) -> Items:
        return s

    squares = seq(script.node("same", Items, Items, same),
                  map_each(script.node("sq", Item, Out, sq), over="items", into="outs"))
    plan = seq(parallel(squares, script.node("count", Items, field_model("count"), count)))
    result = await interpret(plan, Items(items=[2, 3]), config=RunConfig(run_id="mp"),
                             store=AsyncInMemoryStore())
    assert result.final_state.model_dump() == {
        "items": [2, 3], "outs": [{"out": 4}, {"out": 9}], "count": 2,
    }
    script.replaying = True
    assert await stroma.replay(plan, result.log) == result


@pytest.mark.anyio
async def test_the_map_step_is_one_trace_event_with_the_collected_output(
    anyio_backend: str,
) -> None:
    """map_each is one step: one trace event whose output is the state plus ``into``."""
    script = Script()

    async def sq(i: Item) -> dict[str, int]:
        return {"out": i.item ** 2}

    async def spread(s: Num) -> dict[str, list[int]]:
        return {"items": list(range(s.value))}

    plan = script.node("spread", Num, Items, spread) >> map_each(
        script.node("sq", Item, Out, sq), over="items", into="outs"
    )
    result = await interpret(plan, Num(value=3))
    assert [e.node_id for e in result.trace] == [
        "spread", "map_each(sq, over=items, into=outs)",
    ]
    assert result.trace.events[-1].output_state == {
        "items": [0, 1, 2], "outs": [{"out": 0}, {"out": 1}, {"out": 4}],
    }
