"""Idempotency keys: ``ctx["_stroma_idempotency_key"]`` (and ``NodeContext.idempotency_key``)
is the same for every retry and every resume of one logical call, and different for every
other call: another node, loop iteration, map item or run."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import anyio
import pytest

from interpreters.stores.file import FileStore
from stroma import (
    AsyncInMemoryStore,
    FailureClass,
    FailurePolicy,
    NodeContext,
    NodeContract,
    RunConfig,
    RunStatus,
    interpret,
    loop,
    map_each,
    parallel,
    seq,
    stroma_node,
)
from tests.combinators.agentkit import Agent, Nodes, no_sleep, step
from tests.combinators.kit import Item, Items, Out

pytestmark = pytest.mark.anyio

KEY = re.compile(r"^stroma-[0-9a-f]{32}$")


def retry_all(n: int = 2) -> dict[str, Any]:
    return {"AMBIGUOUS": FailurePolicy(max_retries=n, backoff_seconds=0),
            "RECOVERABLE": FailurePolicy(max_retries=n, backoff_seconds=0)}


async def test_a_key_is_the_same_for_every_retry_of_a_call() -> None:
    """A node failing twice then succeeding sees one key in all three attempts, and the
    classifier's NodeContext carries the same key."""
    nodes = Nodes()
    told: list[str | None] = []

    async def flaky(s: Agent, ctx: dict[str, Any]) -> Agent:
        if nodes.calls["charge"] < 3:
            raise ValueError("gateway hiccup")
        return step(s, "charge")

    def classifier(exc: Exception, ctx: NodeContext) -> FailureClass | None:
        told.append(ctx.idempotency_key)
        return None

    config = RunConfig(run_id="pay", policy_map=retry_all(), classifiers=[classifier])
    result = await interpret(seq(nodes.node("prepare"), nodes.node("charge", flaky)), Agent(),
                             config=config, sleep=no_sleep)
    assert result.status is RunStatus.COMPLETED
    charges = [k for nid, k in nodes.keys if nid == "charge"]
    assert len(charges) == 3 and len(set(charges)) == 1
    assert KEY.match(charges[0])
    assert told == [charges[0], charges[0]]
    prepare = [k for nid, k in nodes.keys if nid == "prepare"]
    assert prepare != charges[:1]


async def test_keys_differ_between_nodes_and_between_runs() -> None:
    """Two nodes of one run have different keys; the same plan under another run id gets
    other keys; the same run id gets the same ones (they are a function of the call)."""

    async def run(run_id: str) -> dict[str, str]:
        nodes = Nodes()
        await interpret(seq(nodes.node("a"), nodes.node("b")), Agent(),
                        config=RunConfig(run_id=run_id))
        return dict(nodes.keys)

    one, two, again = await run("run-1"), await run("run-2"), await run("run-1")
    assert one["a"] != one["b"]
    assert set(one.values()).isdisjoint(two.values())
    assert one == again


async def test_keys_differ_between_loop_iterations() -> None:
    """Each iteration of a loop is another call of the same node: another key."""
    nodes = Nodes()
    await interpret(loop(seq(nodes.node("think"), nodes.node("act")),
                         until=lambda s: s.n >= 8, max_iterations=5, name="L"), Agent())
    acts = [k for nid, k in nodes.keys if nid == "act"]
    thinks = [k for nid, k in nodes.keys if nid == "think"]
    assert len(acts) == 4 and len(set(acts)) == 4
    assert set(acts).isdisjoint(thinks)


def _item_node(keys: dict[int, list[str]], fail_first: set[int]) -> Any:
    contract = NodeContract(node_id="fetch", input_schema=Item, output_schema=Out)

    async def fetch(s: Item, ctx: dict[str, Any]) -> dict[str, int]:
        key = ctx["_stroma_idempotency_key"]  # read at the start: the context is shared
        await anyio.sleep(0)
        keys[s.item].append(key)
        if s.item in fail_first and len(keys[s.item]) == 1:
            raise TimeoutError("slow upstream")
        return {"out": s.item * 10}

    return stroma_node("fetch", contract)(fetch)


async def test_keys_differ_between_map_items_and_hold_across_a_group_retry() -> None:
    """Items of a map_each running concurrently each get their own key; an item that fails
    and is run again (the group's retry) gets the same key as on its first attempt."""
    keys: dict[int, list[str]] = defaultdict(list)
    plan = map_each(_item_node(keys, fail_first={2}), over="items", into="outs",
                    max_concurrency=3, input=Items)
    result = await interpret(plan, Items(items=[0, 1, 2, 3, 4]),
                             config=RunConfig(policy_map=retry_all()), sleep=no_sleep)
    assert result.status is RunStatus.COMPLETED
    assert len(keys[2]) == 2 and keys[2][0] == keys[2][1]
    firsts = [keys[i][0] for i in range(5)]
    assert len(set(firsts)) == 5


async def test_keys_differ_for_each_item_of_each_iteration() -> None:
    """A map_each inside a loop: every (iteration, item) pair is a call of its own."""
    keys: dict[int, list[str]] = defaultdict(list)

    contract = NodeContract(node_id="reset", input_schema=Items, output_schema=Items)

    @stroma_node("reset", contract)
    async def reset(s: Any) -> dict[str, Any]:
        return {"items": [x + 10 for x in s.items]}

    body = seq(map_each(_item_node(keys, set()), over="items", into="outs", input=Items),
               reset)
    plan = loop(body, until=lambda s: s.items[0] >= 20, max_iterations=3, name="L")
    result = await interpret(plan, Items(items=[0, 1]))
    assert result.status is RunStatus.COMPLETED
    every = [k for ks in keys.values() for k in ks]
    assert sorted(keys) == [0, 1, 10, 11] and len(every) == 4 and len(set(every)) == 4


async def test_parallel_children_get_keys_of_their_own() -> None:
    """Two children of one parallel group are two calls: two keys."""
    seen: dict[str, str] = {}

    def child(name: str) -> Any:
        contract = NodeContract(node_id=name, input_schema=Item, output_schema=Out)

        async def fn(s: Item, ctx: dict[str, Any]) -> dict[str, int]:
            seen[name] = ctx["_stroma_idempotency_key"]
            return {"out": 1}

        return stroma_node(name, contract)(fn)

    await interpret(parallel(child("left"), child("right")), Item(item=1))
    assert seen.keys() == {"left", "right"} and seen["left"] != seen["right"]


@pytest.mark.parametrize("kind", ["file", "memory"])
async def test_a_call_cut_short_by_a_crash_gets_its_key_again_on_resume(
    kind: str, tmp_path: Path
) -> None:
    """The window keys are for: a node cancelled mid-call (after its side effect, before
    its checkpoint) runs again on resume with the same key, so a deduplicating API charges
    once; the node before it is not run again."""
    memory = AsyncInMemoryStore()

    def store() -> Any:
        return FileStore(tmp_path / "store") if kind == "file" else memory

    ledger: dict[str, int] = {}  # the airline: books a key once
    inside = anyio.Event()
    crash = [True]

    nodes = Nodes()

    async def book(s: Agent, ctx: dict[str, Any]) -> Agent:
        key = ctx["_stroma_idempotency_key"]
        ledger.setdefault(key, len(ledger) + 1)  # the side effect, deduplicated by key
        if crash[0]:
            inside.set()
            await anyio.sleep_forever()  # killed before the checkpoint
        return step(s, "book", tool=f"booking {ledger[key]}")

    plan = seq(nodes.node("search"), nodes.node("book", book))
    async with anyio.create_task_group() as tg:

        async def run() -> None:
            await interpret(plan, Agent(), store=store(), config=RunConfig(run_id="trip"))

        tg.start_soon(run)
        await inside.wait()
        tg.cancel_scope.cancel()
    crash[0] = False
    resumed = await interpret(plan, Agent(), store=store(), config=RunConfig(run_id="trip"))
    assert resumed.status is RunStatus.RESUMED
    assert nodes.calls == {"search": 1, "book": 2}
    book_keys = [k for nid, k in nodes.keys if nid == "book"]
    assert len(set(book_keys)) == 1
    assert ledger == {book_keys[0]: 1}
    assert resumed.final_state.tool == "booking 1"  # type: ignore[attr-defined]


def test_node_context_reads_its_coordinates_as_trace_events_do() -> None:
    """``NodeContext`` has the ``iteration``, ``item`` and ``where`` that ``TraceEvent``
    has, read from the same coordinates (innermost loop and map item)."""
    from stroma.failures import NodeContext

    ctx = NodeContext("tool", 2, "run-1", "key", (("loop", "agent", 3), ("item", "fan", 7)))
    assert (ctx.iteration, ctx.item, ctx.where) == (3, 7, "agent#3/fan[7]")
    top = NodeContext("tool", 1, "run-1")
    assert (top.iteration, top.item, top.where) == (None, None, "")
