"""A run cancelled inside a fan-out: each node child that had begun and not finished is an
``unfinished`` span under the group's, each that finished before the cancel keeps its
span, and a child that never began has none; a sub-plan child its group cancelled carries
what it had used."""

from __future__ import annotations

import anyio
import pytest

import stroma
from stroma import RunStatus, interpret, map_each, parallel, seq, stroma_node
from stroma.cost import estimate_cost_usd
from stroma.otel import (
    ATTEMPT,
    CHILD_ID,
    CHILD_INDEX,
    COST_USD,
    FAILURE_CLASS,
    ITEM,
    ITEM_INDEX,
    NODE_ATTEMPTS,
    NODE_ID,
    OUTCOME,
    RUN_ID,
    TOTAL_TOKENS,
    WHERE,
)
from tests.otel.telemetry import Telemetry, node
from tests.otel.test_spans import (
    Item,
    Items,
    Num,
    Out,
    assert_nested_in_time,
    contract,
    retries,
    traced,
)

pytestmark = pytest.mark.anyio


async def test_a_run_cancelled_in_a_map_of_nodes_shows_each_child_that_began(
    anyio_backend: str, telemetry: Telemetry
) -> None:
    """A map of nodes, two at a time, cancelled from outside while items 1 and 2 hang:
    item 0 (it returned before the cancel) keeps its OK span, items 1 and 2 are
    ``unfinished`` node spans under the unfinished group's span, as the attempt in flight
    is, and item 3, which never began, has no span; the attempts counter counts them."""
    hanging: list[int] = []
    both = anyio.Event()

    @stroma_node("double", contract("double", Item, Out))
    async def double(item: Item) -> dict[str, int]:
        if item.item > 0:
            hanging.append(item.item)
            if len(hanging) == 2:
                both.set()
            await anyio.sleep_forever()
        return {"out": item.item * 2}

    mapped = map_each(double, over="items", into="outs", input=Items, max_concurrency=2)
    config = traced(telemetry, run_id="cut-map")
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: interpret([mapped], Items(items=[0, 1, 2, 3]), config=config,
                                        store=stroma.InMemoryStore()))
        await both.wait()
        tg.cancel_scope.cancel()

    assert sorted(hanging) == [1, 2]
    step = mapped.step_id
    cancelled = "Cancelled" if anyio_backend == "trio" else "CancelledError"
    unfinished = f"ERROR: the run ended before the attempt's account was recorded ({cancelled})"
    [run] = telemetry.tree()
    [group] = run["children"]
    assert (group["name"], group["status"], group["attributes"][OUTCOME]) == (
        f"stroma map {step}", unfinished, "unfinished")

    def item(index: int, status: str, outcome: str) -> dict[str, object]:
        return node("stroma node double", status, {
            RUN_ID: "cut-map", NODE_ID: "double", ATTEMPT: 1, ITEM_INDEX: index,
            WHERE: f"{step}[{index}]", ITEM: index, OUTCOME: outcome,
        })

    assert group["children"] == [
        item(0, "OK", "succeeded"),
        item(1, unfinished, "unfinished"),
        item(2, unfinished, "unfinished"),
    ]
    assert_nested_in_time(telemetry)
    attempts = {(a[NODE_ID], a[OUTCOME]): n for a, n in telemetry.points(NODE_ATTEMPTS)}
    assert attempts == {("double", "succeeded"): 1, ("double", "unfinished"): 2,
                        (step, "unfinished"): 1}


async def test_a_run_cancelled_in_a_parallel_group_mixes_node_and_plan_children(
    anyio_backend: str, telemetry: Telemetry
) -> None:
    """A parallel group of a node that hangs, a node that returned and a sub-plan that
    hangs, cancelled from outside: the node that returned is OK, the hanging node an
    ``unfinished`` node span, the sub-plan an unfinished child span with its own node's
    unfinished span beneath it."""
    began: list[str] = []
    both = anyio.Event()

    def hanging(node_id: str) -> object:
        @stroma_node(node_id, contract(node_id, Num, Num))
        async def hang(state: Num) -> dict[str, int]:
            began.append(node_id)
            if len(began) == 2:
                both.set()
            await anyio.sleep_forever()
            raise AssertionError("never")

        return hang

    @stroma_node("quick", contract("quick", Num, Num))
    async def quick(state: Num) -> dict[str, int]:
        return {"value": state.value}

    @stroma_node("after", contract("after", Num, Num))
    async def after(state: Num) -> dict[str, int]:
        return {"value": state.value}

    group = parallel(hanging("hang"), quick, seq(hanging("inner"), after))
    config = traced(telemetry, run_id="cut-parallel")
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: interpret([group], Num(value=1), config=config))
        await both.wait()
        tg.cancel_scope.cancel()

    cancelled = "Cancelled" if anyio_backend == "trio" else "CancelledError"
    unfinished = f"ERROR: the run ended before the attempt's account was recorded ({cancelled})"
    [run] = telemetry.tree()
    [span] = run["children"]
    assert (span["status"], span["attributes"][OUTCOME]) == (unfinished, "unfinished")
    assert [c["name"] for c in span["children"]] == [
        "stroma node hang", "stroma node quick", f"stroma child {group.step_id}[2]"]
    by_name = {c["name"]: c for c in span["children"]}
    assert by_name["stroma node hang"] == node("stroma node hang", unfinished, {
        RUN_ID: "cut-parallel", NODE_ID: "hang", ATTEMPT: 1, CHILD_INDEX: 0,
        OUTCOME: "unfinished"})
    assert by_name["stroma node quick"] == node("stroma node quick", "OK", {
        RUN_ID: "cut-parallel", NODE_ID: "quick", ATTEMPT: 1, CHILD_INDEX: 1,
        OUTCOME: "succeeded"})
    plan_child = span["children"][-1]
    assert plan_child["attributes"][CHILD_ID] == f"{group.step_id}[2]"
    assert plan_child["attributes"][OUTCOME] == "unfinished"
    assert [(g["name"], g["attributes"][OUTCOME]) for g in plan_child["children"]] == [
        ("stroma node inner", "unfinished")]
    assert_nested_in_time(telemetry)


async def test_a_sub_plan_child_its_group_cancelled_carries_what_it_used(
    anyio_backend: str, telemetry: Telemetry
) -> None:
    """A sibling's failure cancels two sub-plan children: the one whose first node had
    returned tokens carries its tokens and cost (as a finished plan child's span does);
    the one that had used nothing carries neither."""
    began: list[str] = []
    both = anyio.Event()

    @stroma_node("paid", contract("paid", Num, Num))
    async def paid(state: Num) -> tuple[dict[str, int], int, int, str]:
        return {"value": state.value}, 100, 20, "gpt-4o"

    def hanging(node_id: str) -> object:
        @stroma_node(node_id, contract(node_id, Num, Num))
        async def hang(state: Num) -> dict[str, int]:
            began.append(node_id)
            if len(began) == 2:
                both.set()
            await anyio.sleep_forever()
            raise AssertionError("never")

        return hang

    @stroma_node("free", contract("free", Num, Num))
    async def free(state: Num) -> dict[str, int]:
        return {"value": state.value}

    @stroma_node("broke", contract("broke", Num, Num))
    async def broke(state: Num) -> dict[str, int]:
        await both.wait()
        raise ValueError("broke")

    group = parallel(seq(paid, hanging("hang_paid")), seq(hanging("hang_free"), free), broke)
    result = await interpret([group], Num(value=1),
                             config=traced(telemetry, policy_map=retries(0)))

    assert result.status is RunStatus.PARTIAL
    [run] = telemetry.tree()
    [span] = run["children"]
    assert span["attributes"][FAILURE_CLASS] == "AMBIGUOUS"
    used, unused, failed = span["children"]
    assert (failed["name"], failed["attributes"][OUTCOME]) == ("stroma node broke", "failed")
    for child in (used, unused):
        assert child["name"].startswith("stroma child ")
        assert child["status"] == "ERROR: cancelled: child 2 failed"
        assert child["attributes"][OUTCOME] == "cancelled"
    assert used["attributes"][CHILD_INDEX] == 0
    assert used["attributes"][TOTAL_TOKENS] == 120
    assert used["attributes"][COST_USD] == estimate_cost_usd("gpt-4o", 100, 20) > 0
    assert [(g["name"], g["attributes"][OUTCOME]) for g in used["children"]] == [
        ("stroma node paid", "succeeded"), ("stroma node hang_paid", "unfinished")]
    assert unused["attributes"][CHILD_INDEX] == 1
    assert TOTAL_TOKENS not in unused["attributes"] and COST_USD not in unused["attributes"]
    assert run["attributes"][TOTAL_TOKENS] == 120  # the run counted them too
    assert_nested_in_time(telemetry)
