"""Real logs to damage, and the ways the fuzz tests damage them.

``record_corpus(folder)`` runs real pipelines on a FileStore in ``folder`` (retries with
backoffs, a parallel group retried after a cancelled sibling, map_each over a node and over
a sub-plan with retries inside, a sub-plan child cancelled midway, hooks that raise,
classifiers, a budget stop, a branch, a timeout, a contract violation, an output the log
cannot hold, a resume_from restart, a run crashed inside a fan-out and the same run resumed)
and returns, per run, the log's text, the raw bytes of its ``log.jsonl`` (checkpoint lines
included) and how to build its plan again. Nodes never wait for real time; with
``waits=False`` no node waits at all, so a resumed damaged log cannot hang on one.

``mutate(obj, path, how)`` and ``damage_lines(lines, ...)`` are the damage: a field given a
wrong type, a huge int, NaN, a string for a number, a time that is not ISO 8601, removed,
wrapped in another level of nesting, an extra key; a line truncated, duplicated, dropped,
swapped, or replaced with something that is not a record.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
from pydantic import BaseModel

from interpreters.stores.file import LOG_NAME, FileStore
from stroma import (
    FailureClass,
    FailurePolicy,
    NodeContext,
    NodeContract,
    branch,
    map_each,
    parallel,
    seq,
    stroma_node,
)
from stroma.plan import Plan
from stroma.runner import NodeHooks, RunConfig, interpret
from tests.timeline import pipelines as P


class Num(BaseModel):
    value: int


class Left(BaseModel):
    left: int


class Right(BaseModel):
    right: int


class Both(BaseModel):
    left: int
    right: int


class Items(BaseModel):
    items: list[int]


class Item(BaseModel):
    item: int


class Blob(BaseModel):
    data: bytes


async def no_sleep(seconds: float) -> None:
    """Backoffs are recorded, not waited for."""


async def _forever(waits: bool) -> None:
    """Wait until cancelled (a sibling failed, or a timeout), unless ``waits`` is off."""
    if waits:
        await anyio.Event().wait()


def _node(node_id: str, inp: type[BaseModel], out: type[BaseModel], body: Any) -> Any:
    async def fn(state: Any) -> Any:
        return await body(state)

    fn.__name__ = node_id
    return stroma_node(node_id, NodeContract(node_id=node_id, input_schema=inp,
                                             output_schema=out))(fn)


def _retries(waits: bool) -> Plan:
    seen = Counter[str]()

    async def flaky(s: Num) -> Any:
        seen["n"] += 1
        if seen["n"] == 1:
            raise ValueError("malformed model output")
        if seen["n"] == 2:
            raise TimeoutError("upstream timeout")
        return {"value": s.value + 1}, 120, 30, "gpt-4o-mini"

    async def double(s: Num) -> Any:
        return {"value": s.value * 2}, 50, "claude-haiku-4-5"

    return seq(_node("flaky", Num, Num, flaky), _node("double", Num, Num, double))


def _parallel(waits: bool) -> Plan:
    seen = Counter[str]()

    async def left(s: Num) -> Any:
        seen["left"] += 1
        if seen["left"] == 1:
            await _forever(waits)  # cancelled when right fails
        return {"left": s.value + 1}, 10

    async def right(s: Num) -> Any:
        seen["right"] += 1
        if seen["right"] == 1:
            raise ConnectionError("right: connection reset")
        return {"right": s.value - 1}, 20

    async def total(s: Both) -> Any:
        return {"value": s.left + s.right}

    return parallel(_node("left", Num, Left, left), _node("right", Num, Right, right)) >> (
        _node("total", Both, Num, total))


def _maps(waits: bool) -> Plan:
    seen = Counter[int]()

    async def parse(i: Item) -> Any:
        return {"item": i.item + 1}

    async def fetch(i: Item) -> Any:
        seen[i.item] += 1
        if i.item == 3 and seen[i.item] == 1:
            raise TimeoutError("fetch: 503")
        return {"item": i.item * 10}, 5

    async def square(i: Item) -> Any:
        return {"item": i.item * i.item}

    async def again(s: Items) -> Any:
        return {"items": s.items}

    body = seq(_node("parse", Item, Item, parse), _node("fetch", Item, Item, fetch))
    plan = (
        seq(map_each(body, over="items", into="fetched", input=Items))
        >> _node("again", Items, Items, again)
        >> map_each(_node("square", Item, Item, square), over="items", into="squares",
                    input=Items, max_concurrency=2)
    )
    return plan.with_retry("fetch", {FailureClass.RECOVERABLE: FailurePolicy(
        max_retries=2, backoff_seconds=0.1)})


def _cancelled_sub_plan(waits: bool) -> Plan:
    """The first child is a sub-plan whose second node waits; the second child fails once
    after a few checkpoints, cancelling the sub-plan midway (it goes on from its records)."""
    seen = Counter[str]()

    async def first(s: Num) -> Any:
        return {"value": s.value + 1}

    async def second(s: Num) -> Any:
        seen["second"] += 1
        if seen["second"] == 1:
            await _forever(waits)
        return {"left": s.value}

    async def other(s: Num) -> Any:
        seen["other"] += 1
        if seen["other"] == 1:
            for _ in range(5):
                await anyio.sleep(0)
            raise ConnectionError("other: reset")
        return {"right": 7}

    return seq(parallel(seq(_node("first", Num, Num, first), _node("second", Num, Left, second)),
                        _node("other", Num, Right, other)))


def _hooked(waits: bool) -> Plan:
    return _retries(waits)


async def _bad_hook(*args: Any) -> None:
    raise RuntimeError("telemetry backend down")


def _defers(exc: Exception, ctx: NodeContext) -> FailureClass | None:
    return None


def _raises(exc: Exception, ctx: NodeContext) -> FailureClass | None:
    raise KeyError("classifier bug")


def _nonsense(exc: Exception, ctx: NodeContext) -> Any:
    return "retry please"


def _budget(waits: bool) -> Plan:
    def make(i: int) -> Any:
        async def spend(s: Num) -> Any:
            return {"value": s.value + 1}, 60

        return _node(f"spend{i}", Num, Num, spend)

    return seq(*(make(i) for i in range(3)))


def _branching(waits: bool) -> Plan:
    async def big(s: Num) -> Any:
        return {"value": s.value * 100}

    async def small(s: Num) -> Any:
        return {"value": s.value - 1}

    async def after(s: Num) -> Any:
        return {"value": s.value + 1}

    return seq(_node("after0", Num, Num, after)) >> branch(
        lambda s: s.value > 2, then=_node("big", Num, Num, big),
        otherwise=_node("small", Num, Num, small), name="big?",
    ) >> _node("after", Num, Num, after)


def _timeout(waits: bool) -> Plan:
    seen = Counter[str]()

    async def slow(s: Num) -> Any:
        seen["slow"] += 1
        if seen["slow"] == 1:
            await anyio.Event().wait()  # only the 10 ms timeout ends it
        return {"value": s.value + 10}

    return seq(_node("slow", Num, Num, slow)).with_timeout("slow", 10)


def _terminal(waits: bool) -> Plan:
    async def ok(s: Num) -> Any:
        return {"value": s.value + 1}

    async def broken(s: Num) -> Any:
        return {"value": "not a number"}

    return seq(_node("ok", Num, Num, ok), _node("broken", Num, Num, broken))


def _unwritable(waits: bool) -> Plan:
    async def ok(s: Num) -> Any:
        return {"value": s.value + 1}

    async def writer(s: Num) -> Any:
        return {"data": b"\xff"}

    return seq(_node("ok", Num, Num, ok), _node("writer", Num, Blob, writer))


def _three(waits: bool) -> Plan:
    def make(i: int) -> Any:
        async def add(s: Num) -> Any:
            return {"value": s.value + i}

        return _node(f"n{i}", Num, Num, add)

    return seq(*(make(i) for i in range(3)))


def _crash(waits: bool) -> Plan:
    return P.crash_plan([], None)


FAST = {c: FailurePolicy(max_retries=2, backoff_seconds=0) for c in FailureClass}
BACKOFF = {
    FailureClass.AMBIGUOUS: FailurePolicy(max_retries=2, backoff_seconds=0.5),
    FailureClass.RECOVERABLE: FailurePolicy(max_retries=2, backoff_seconds=2.0),
}


@dataclass(frozen=True)
class Spec:
    """How to build a run's plan again, its initial state and its RunConfig fields."""

    build: Callable[[bool], Plan]
    state: BaseModel
    config: Callable[[], dict[str, Any]]


SPECS: dict[str, Spec] = {
    "retries": Spec(_retries, Num(value=1), lambda: {"seed": 7, "policy_map": BACKOFF}),
    "parallel": Spec(_parallel, Num(value=5), lambda: {"policy_map": FAST}),
    "maps": Spec(_maps, Items(items=[1, 2, 3]), lambda: {"policy_map": FAST, "seed": 3}),
    "cancelled-sub-plan": Spec(_cancelled_sub_plan, Num(value=1),
                               lambda: {"policy_map": FAST}),
    "hooks": Spec(_hooked, Num(value=1), lambda: {
        "policy_map": FAST, "classifiers": [_defers, _raises, _nonsense],
        "hooks": NodeHooks(on_node_start=_bad_hook, on_node_success=_bad_hook,
                           on_node_failure=_bad_hook),
        "hook_timeout_ms": 5_000,
    }),
    "budget": Spec(_budget, Num(value=0), lambda: {
        "budget": {"max_tokens_total": 100}, "policy_map": FAST}),
    "branch": Spec(_branching, Num(value=3), lambda: {}),
    "timeout": Spec(_timeout, Num(value=1), lambda: {"policy_map": FAST}),
    "terminal": Spec(_terminal, Num(value=1), lambda: {}),
    "unwritable": Spec(_unwritable, Num(value=1), lambda: {}),
    "restart": Spec(_three, Num(value=1), lambda: {"resume_from": "n2"}),
    "crashed": Spec(_crash, P.Urls(urls=P.CRASH_ITEMS), lambda: {}),
    "resumed": Spec(_crash, P.Urls(urls=P.CRASH_ITEMS), lambda: {}),
}


@dataclass(frozen=True)
class Recorded:
    name: str
    text: str  # EffectLog.to_jsonl() of the stored log
    raw: bytes  # log.jsonl as FileStore wrote it (checkpoint lines too)
    folder: Path  # the run's folder in the store


def run_folder(store_path: Path, run_id: str) -> Path:
    return store_path / "runs" / run_id


async def _record(store_path: Path) -> None:
    store = FileStore(store_path)
    for name, spec in SPECS.items():
        if name in ("crashed", "resumed", "restart"):
            continue
        await interpret(spec.build(True), spec.state, store=store,
                        config=RunConfig(run_id=name, **spec.config()), sleep=no_sleep)
    restart = SPECS["restart"]
    await interpret(restart.build(True), restart.state, store=store,
                    config=RunConfig(run_id="restart"))
    await interpret(restart.build(True), restart.state, store=store,
                    config=RunConfig(run_id="restart", **restart.config()))
    await P.crashed_fan_out(store, "crashed")
    await P.crashed_fan_out(store, "resumed")
    await interpret(_crash(False), SPECS["resumed"].state, store=store,
                    config=RunConfig(run_id="resumed"))


def record_corpus(store_path: Path) -> dict[str, Recorded]:
    """Run every spec on a FileStore at ``store_path``; each run's log text and bytes."""
    anyio.run(_record, store_path)

    async def read_all() -> dict[str, Recorded]:
        store = FileStore(store_path)
        out = {}
        for name in SPECS:
            log = await store.read_log(name)
            assert log is not None, name
            folder = run_folder(store_path, name)
            out[name] = Recorded(name, log.to_jsonl(), (folder / LOG_NAME).read_bytes(),
                                 folder)
        return out

    return anyio.run(read_all)


def copy_run(recorded: Recorded, store_path: Path, log_bytes: bytes) -> None:
    """The recorded run's folder under ``store_path`` with ``log_bytes`` as its log."""
    target = run_folder(store_path, recorded.name)
    for root, _dirs, files in os.walk(recorded.folder):
        rel = Path(root).relative_to(recorded.folder)
        (target / rel).mkdir(parents=True, exist_ok=True)
        for f in files:
            if f != LOG_NAME and not f.startswith("~tmp"):
                (target / rel / f).write_bytes((Path(root) / f).read_bytes())
    (target / LOG_NAME).write_bytes(log_bytes)


# ----------------------------------------------------------------------------- damage

Path_ = tuple[str | int, ...]

REPLACEMENTS: tuple[Any, ...] = (
    None, True, False, 0, -1, 2**64, -(2**70), 10**400 // 10**300, 1e308, -0.0,
    math.nan, math.inf, -math.inf, "", "x", "NaN", "12", "2026-02-30T25:61:00+00:00",
    "2026-11-23T16:00:00", "yesterday", [], {}, [None], [[[[]]]], {"t": "CallNode"},
    {"t": "NoSuchThing"}, {"type_names": "x", "message": 1}, "\u0000", "é" * 3,
)
HOWS = ("replace", "delete", "wrap_list", "wrap_dict", "extra_key", "as_string")


def paths(obj: Any, prefix: Path_ = ()) -> list[Path_]:
    """Every path to a value inside a JSON value (containers included, the root not)."""
    out: list[Path_] = []
    items: Any = obj.items() if isinstance(obj, dict) else (
        enumerate(obj) if isinstance(obj, list) else ())
    for key, value in items:
        here = (*prefix, key)
        out.append(here)
        out.extend(paths(value, here))
    return out


def _get(obj: Any, path: Path_) -> Any:
    for key in path:
        obj = obj[key]
    return obj


def mutate(obj: Any, path: Path_, how: str, replacement: Any = None) -> Any:
    """``obj`` (a parsed line; changed in place and returned) with the value at ``path``
    damaged ``how``."""
    parent = _get(obj, path[:-1])
    key = path[-1]
    value = parent[key]
    if how == "replace":
        parent[key] = replacement
    elif how == "delete":
        del parent[key]
    elif how == "wrap_list":
        parent[key] = [value]
    elif how == "wrap_dict":
        parent[key] = {"t": value} if not isinstance(value, dict) else {"inner": value}
    elif how == "extra_key":
        if isinstance(value, dict):
            value["zz_extra"] = [1, {"t": "Commit"}]
        else:
            parent[key] = {"value": value, "zz_extra": 1}
    elif how == "as_string":
        parent[key] = str(value) if not isinstance(value, str) else (
            value + "0" if value[-1:].isdigit() else value[::-1])
    else:  # pragma: no cover
        raise AssertionError(how)
    return obj


LINE_DAMAGE = ("truncate", "duplicate", "drop", "swap", "move", "blank", "null", "list",
               "not_json", "renumber", "no_newline")


def _plan_of(name: str) -> Callable[[], Plan]:
    def build() -> Plan:
        return SPECS[name].build(False)

    return build


# For `--plan tests.faults.damaged:SPEC_PLANS.<name>` (dashes as underscores).
SPEC_PLANS = SimpleNamespace(**{n.replace("-", "_"): _plan_of(n) for n in SPECS})
