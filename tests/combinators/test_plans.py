"""Plans are immutable values; combinators build them; runners take lists and plans alike."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
from pydantic import BaseModel

import stroma
from stroma import PlanError, RunStatus, StromaRunner
from stroma.plan import Plan, branch, map_each, parallel, seq
from stroma.runner import RunConfig, interpret
from tests.combinators.kit import Item, Items, Num, Out, Script, field_model

A = field_model("a")
B = field_model("b")


def nodes(script: Script | None = None) -> dict[str, Any]:
    script = script or Script()

    async def inc(s: Num) -> dict[str, int]:
        return {"value": s.value + 1}

    async def dbl(s: Num) -> dict[str, int]:
        return {"value": s.value * 2}

    async def to_a(s: Num) -> dict[str, int]:
        return {"a": s.value}

    async def to_b(s: Num) -> dict[str, int]:
        return {"b": -s.value}

    async def sq(i: Item) -> dict[str, int]:
        return {"out": i.item * i.item}

    async def spread(s: Num) -> dict[str, list[int]]:
        return {"items": list(range(s.value))}

    return {
        "inc": script.node("inc", Num, Num, inc),
        "dbl": script.node("dbl", Num, Num, dbl),
        "to_a": script.node("to_a", Num, A, to_a),
        "to_b": script.node("to_b", Num, B, to_b),
        "sq": script.node("sq", Item, Out, sq),
        "spread": script.node("spread", Num, Items, spread),
    }


def big(n: dict[str, Any]) -> Plan:
    return seq(
        n["inc"],
        branch(lambda s: s.value > 1, then=n["dbl"], name="big?"),
        parallel(n["to_a"], n["to_b"]),
    )


# ------------------------------------------------------------------------------ values


def test_a_plan_is_frozen() -> None:
    """A built plan cannot be changed in place: its steps are a tuple and setting fails."""
    plan = big(nodes())
    assert isinstance(plan.steps, tuple) and isinstance(plan.program, tuple)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        plan.steps = ()  # type: ignore[misc]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        plan.steps[0].node_id = "other"  # type: ignore[misc]


def test_plans_compare_and_hash_by_value() -> None:
    """Two plans built alike are equal, hash alike and collapse in a set, whatever the
    function objects behind their nodes."""
    p1, p2 = big(nodes()), big(nodes())
    assert p1 == p2 and hash(p1) == hash(p2) and len({p1, p2}) == 1
    assert p1.fingerprint == p2.fingerprint
    n = nodes()
    assert seq(n["inc"], n["dbl"]) != seq(n["dbl"], n["inc"])


def test_a_group_of_a_list_of_steps_has_the_same_id_in_every_process() -> None:
    """map_each and loop given a list of steps (a sequence, as anywhere else) name it by
    its nodes' ids, as seq does, never by the function objects' addresses: built twice
    from new functions, the plans are equal and keep their fingerprint, so another process
    can resume or replay a run of it."""
    from stroma import loop

    def build(n: dict[str, Any]) -> tuple[Plan, Plan]:
        return (seq(n["spread"], map_each([n["sq"]], over="items", into="outs", input=Items)),
                seq(loop([n["inc"], n["dbl"]], until=lambda s: s.value > 9,
                         max_iterations=3)))

    (m1, l1), (m2, l2) = build(nodes()), build(nodes())
    assert m1.step_ids()[1] == "map_each(seq(sq), over=items, into=outs)"
    assert l1.step_ids() == ("loop(seq(inc, dbl))",)
    for p1, p2 in ((m1, m2), (l1, l2)):
        assert not any("0x" in step_id for step_id in p1.step_ids())
        assert p1 == p2 and p1.fingerprint == p2.fingerprint


def test_the_fingerprint_ignores_function_bodies() -> None:
    """A node whose body changed but whose id and contract did not keeps the fingerprint."""
    n = nodes()

    async def other_inc(s: Num) -> dict[str, int]:
        return {"value": s.value + 100}

    swapped = dict(n, inc=Script().node("inc", Num, Num, other_inc))
    assert big(swapped) == big(n) and big(swapped).fingerprint == big(n).fingerprint


def test_the_fingerprint_changes_with_structure() -> None:
    """Reordering, adding, removing or regrouping steps gives a different fingerprint."""
    n = nodes()
    plans = [
        seq(n["inc"], n["dbl"]),
        seq(n["dbl"], n["inc"]),
        seq(n["inc"]),
        seq(n["inc"], n["dbl"], n["to_a"]),
        seq(parallel(n["inc"], n["dbl"])),
        seq(parallel(n["dbl"], n["inc"])),
        seq(branch(lambda s: True, then=n["inc"], otherwise=n["dbl"], name="b")),
        seq(branch(lambda s: True, then=n["dbl"], otherwise=n["inc"], name="b")),
        seq(n["spread"], map_each(n["sq"], over="items", into="outs")),
        seq(n["spread"], map_each(n["sq"], over="items", into="squares")),
        seq(parallel(seq(n["inc"], n["dbl"]), n["to_a"])),
        seq(parallel(n["inc"], n["dbl"]), n["to_a"]),
    ]
    fingerprints = [p.fingerprint for p in plans]
    assert len(set(fingerprints)) == len(plans)
    # A group's concurrency limit is a setting, like retries and timeouts: not structure.
    limited = seq(parallel(n["inc"], n["dbl"], max_concurrency=1))
    assert limited.fingerprint == plans[4].fingerprint and limited != plans[4]


def test_the_fingerprint_changes_with_contracts() -> None:
    """The same ids with another input or output schema give another fingerprint."""
    n = nodes()

    class Num2(BaseModel):
        value: int
        note: str = ""

    async def inc(s: Any) -> dict[str, int]:
        return {"value": s.value + 1}

    other = Script().node("inc", Num, Num2, inc)
    assert seq(other, n["dbl"]).fingerprint != seq(n["inc"], n["dbl"]).fingerprint
    other_in = Script().node("inc", Num2, Num, inc)
    assert seq(other_in, n["dbl"]).fingerprint != seq(n["inc"], n["dbl"]).fingerprint


def test_retry_and_timeout_return_new_plans_with_the_same_fingerprint() -> None:
    """with_retry/with_timeout leave the plan alone and return a new value (unequal: the
    policy is part of it) whose fingerprint is unchanged (policies are not structure)."""
    plan = big(nodes())
    before = (plan, hash(plan), plan.fingerprint)
    retried = plan.with_retry("dbl", {"RECOVERABLE": {"max_retries": 5, "backoff_seconds": 0}})
    timed = plan.with_timeout("parallel(to_a, to_b)", 250)
    assert (plan, hash(plan), plan.fingerprint) == before
    assert retried != plan and timed != plan and retried != timed
    assert retried.fingerprint == timed.fingerprint == plan.fingerprint
    assert retried == plan.with_retry(
        "dbl",
        {stroma.FailureClass.RECOVERABLE: stroma.FailurePolicy(max_retries=5, backoff_seconds=0)},
    )
    group = next(s for s in timed.steps if s.step_id == "parallel(to_a, to_b)")
    assert group.timeout_ms == 250
    nested = next(s for s in retried.nodes() if s.node_id == "dbl")
    assert nested.policies and nested.policies[0][1] == 5


def test_rshift_is_seq() -> None:
    """``a >> b`` equals ``seq(a, b)`` for plans and groups, and nests flat."""
    n = nodes()
    assert seq(n["inc"]) >> n["dbl"] == seq(n["inc"], n["dbl"])
    pair = parallel(n["to_a"], n["to_b"])
    assert n["inc"] >> pair == seq(n["inc"], pair)
    g = branch(lambda s: True, then=n["dbl"], name="g")
    assert n["inc"] >> g == seq(n["inc"], g)
    assert g >> seq(n["inc"]) == seq(g, n["inc"])
    left = (seq(n["inc"]) >> n["dbl"]) >> n["to_a"]
    assert left == seq(n["inc"]) >> (seq(n["dbl"]) >> n["to_a"])
    assert seq(n["inc"], n["dbl"]) >> seq(n["to_a"]) == seq(n["inc"], n["dbl"], n["to_a"])
    m = map_each(n["sq"], over="items", into="outs")
    assert n["spread"] >> m == seq(n["spread"], m)


# ------------------------------------------------------------------------- running


@pytest.mark.anyio
async def test_interpret_takes_lists_and_plans_alike(anyio_backend: str) -> None:
    """A list of nodes and the equal plan run to the same result and trace."""
    n = nodes()
    items = [n["inc"], n["dbl"], parallel(n["to_a"], n["to_b"])]
    by_list = await interpret(items, Num(value=3), config=RunConfig(seed=1))
    by_plan = await interpret(seq(*items), Num(value=3), config=RunConfig(seed=1))
    assert by_list.status is by_plan.status is RunStatus.COMPLETED
    assert by_list.final_state == by_plan.final_state
    assert by_list.final_state.model_dump() == {"a": 8, "b": -8}
    assert by_list.trace.diff(by_plan.trace) == []


@pytest.mark.anyio
async def test_the_runner_takes_lists_and_plans_alike(anyio_backend: str) -> None:
    """StromaRunner.run gives the same result for a list, a plan and a lone group."""
    n = nodes()
    runner = StromaRunner.quick()
    group = parallel(n["to_a"], n["to_b"])
    results = [
        await runner.run([n["inc"], group], Num(value=1)),
        await runner.run(seq(n["inc"], group), Num(value=1)),
        await runner.run(n["inc"] >> group, Num(value=1)),
    ]
    assert {r.status for r in results} == {RunStatus.COMPLETED}
    assert {r.final_state.model_dump_json() for r in results} == {'{"a":2,"b":-2}'}
    alone = await runner.run(group, Num(value=5))
    assert alone.final_state.model_dump() == {"a": 5, "b": -5}


@pytest.mark.anyio
async def test_api_parallel_keeps_its_id_and_behaviour(anyio_backend: str) -> None:
    """``parallel(a, b)`` is one step with the id ``parallel(a, b)``: one trace event whose
    output merges the children's outputs in argument order."""
    n = nodes()
    assert stroma.parallel is parallel
    group = parallel(n["to_a"], n["to_b"])
    assert group.step_id == "parallel(to_a, to_b)"
    result = await interpret([n["inc"], group], Num(value=1))
    assert [e.node_id for e in result.trace] == ["inc", "parallel(to_a, to_b)"]
    assert result.trace.events[-1].output_state == {"a": 2, "b": -2}
    assert seq(group).step_ids() == ("parallel(to_a, to_b)",)


def test_building_a_bad_combinator_fails_at_once() -> None:
    """Bad arguments to the combinators are refused when the plan is built."""
    n = nodes()
    with pytest.raises(PlanError, match="max_concurrency"):
        parallel(n["inc"], max_concurrency=0)
    with pytest.raises(PlanError, match="max_concurrency"):
        map_each(n["sq"], over="items", into="outs", max_concurrency=-1)
    with pytest.raises(PlanError, match="field name"):
        map_each(n["sq"], over="not a name", into="outs")
    with pytest.raises(PlanError, match="callable"):
        branch(42, then=n["inc"])  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_the_runner_never_reuses_a_plan_whose_functions_differ(anyio_backend: str) -> None:
    """The runner keeps the plans it compiled, by the list it was given: two lists alike
    but for a branch's predicate, a loop's until or a route's selector are two plans, each
    running its own function (the second list is not answered with the first's plan)."""
    from stroma import loop, route

    n = nodes()
    runner = StromaRunner.quick()

    async def ran(*items: Any) -> int:
        result = await runner.run(list(items), Num(value=3))
        return result.final_state.value  # type: ignore[no-any-return]

    assert await ran(branch(lambda s: s.value > 0, then=n["dbl"], otherwise=n["inc"])) == 6
    assert await ran(branch(lambda s: s.value < 0, then=n["dbl"], otherwise=n["inc"])) == 4
    assert await ran(loop(n["inc"], until=lambda s: s.value >= 5, max_iterations=9)) == 5
    assert await ran(loop(n["inc"], until=lambda s: s.value >= 8, max_iterations=9)) == 8
    routes = {"up": n["inc"], "twice": n["dbl"]}
    assert await ran(route(lambda s: "up", routes)) == 4
    assert await ran(route(lambda s: "twice", routes)) == 6
