"""route: the selector's key picks the route and is recorded; an unknown key goes to the
default or fails the run TERMINAL naming the keys there are; every route is checked
against the state when the plan is built; replay follows the recorded key.

Like a branch's predicate, the selector is never called by replay: a selector whose
answer changed after the run is not detected (the plan's fingerprint covers the routes'
structure, not the selector's body), so replay takes the route the log recorded.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import BaseModel

from stroma import (
    FailureClass,
    NodeContract,
    PlanError,
    RunStatus,
    interpret,
    loop,
    replay,
    route,
    seq,
    stroma_node,
)
from stroma import effects as fx
from tests.combinators.agentkit import Agent, Nodes, step

pytestmark = pytest.mark.anyio


class Selector:
    """A selector that counts its calls (a pure function of the state otherwise)."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.calls = 0
        self.__name__ = "pick"

    def __call__(self, state: Any) -> Any:
        self.calls += 1
        return self.fn(state)


def tools(nodes: Nodes, selector: Any, *, default: Any = None) -> Any:
    """think (sets ``tool`` to what the selector reads), then a route of two tools."""

    async def think(s: Agent, ctx: dict[str, Any]) -> Agent:
        return step(s, "think", tool=["search", "calc", "book"][s.n % 3])

    return seq(nodes.node("think", think),
               route(selector, {"search": nodes.node("search"), "calc": nodes.node("calc")},
                     default=default, name="tool?"))


async def test_the_selector_picks_the_route_and_only_it_runs() -> None:
    """The selector sees the state after ``think``; the chosen route runs, no other."""
    nodes = Nodes()
    selector = Selector(lambda s: s.tool)
    result = await interpret(tools(nodes, selector), Agent(n=1))
    assert result.status is RunStatus.COMPLETED
    assert result.final_state.path == ["think", "calc"]  # type: ignore[attr-defined]
    assert dict(nodes.calls) == {"think": 1, "calc": 1}
    assert selector.calls == 1


async def test_the_key_is_recorded_in_the_log() -> None:
    """A route is one ChooseRoute record answered by RouteChosen(key), in memory and in
    the JSON lines."""
    nodes = Nodes()
    result = await interpret(tools(nodes, lambda s: s.tool), Agent(n=0))
    chosen = [(e, v) for e, v in result.log.records if isinstance(e, fx.ChooseRoute)]
    assert chosen == [(fx.ChooseRoute("tool?"), fx.RouteChosen("search"))]
    lines = [json.loads(line) for line in result.log.to_jsonl().splitlines()]
    [line] = [x for x in lines if x.get("effect", {}).get("t") == "ChooseRoute"]
    assert line["event"]["key"] == "search"


async def test_an_unknown_key_goes_to_the_default() -> None:
    """A key that names no route takes the default route."""
    nodes = Nodes()
    result = await interpret(tools(nodes, lambda s: s.tool, default=nodes.node("fallback")),
                             Agent(n=2))  # think picks "book": no such route
    assert result.status is RunStatus.COMPLETED
    assert result.final_state.path == ["think", "fallback"]  # type: ignore[attr-defined]
    assert "search" not in nodes.calls and "calc" not in nodes.calls


async def test_an_unknown_key_without_a_default_fails_terminally_naming_the_keys() -> None:
    """No default: the run is FAILED (TERMINAL, not retried), its reason naming the key
    the selector gave and the keys there are, with the fix; the state is think's."""
    nodes = Nodes()
    result = await interpret(tools(nodes, lambda s: s.tool), Agent(n=2))
    assert result.status is RunStatus.FAILED
    reason = result.stop_reason or ""
    assert "route 'tool?' got the key 'book'" in reason
    assert "'search', 'calc'" in reason and "default=" in reason
    [failure] = result.trace.failures()
    assert failure.node_id == "tool?" and failure.failure is FailureClass.TERMINAL
    assert result.final_state.path == ["think"]  # type: ignore[attr-defined]


@pytest.mark.parametrize("answer", [None, 3, ["search"]])
async def test_a_selector_giving_no_string_key_fails_naming_the_route(answer: Any) -> None:
    """A selector that returns something that is not a route key (None, an int, a list)
    fails the run; the reason names the route."""
    nodes = Nodes()
    result = await interpret(tools(nodes, lambda s: answer), Agent())
    assert result.status is RunStatus.FAILED
    assert "'tool?'" in (result.stop_reason or "")
    assert "search" not in nodes.calls and "calc" not in nodes.calls


async def test_a_selector_that_raises_fails_the_run_naming_the_route() -> None:
    """The selector's exception is a TERMINAL failure naming the route and the error."""
    nodes = Nodes()

    def broken(state: Agent) -> str:
        raise KeyError("tool")

    result = await interpret(tools(nodes, broken), Agent())
    assert result.status is RunStatus.FAILED
    assert "selector of 'tool?' raised" in (result.stop_reason or "")


# ------------------------------------------------------------------------ at build


class Other(BaseModel):
    query: str


def test_each_route_is_checked_against_the_state_at_build() -> None:
    """A route whose step needs a field the state before the route lacks is a PlanError
    naming that step, even if the selector would never pick it."""
    nodes = Nodes()
    contract = NodeContract(node_id="lookup", input_schema=Other, output_schema=Other)

    @stroma_node("lookup", contract)
    async def lookup(s: Other) -> Other:
        return s

    with pytest.raises(PlanError, match=r"lookup.*'query'"):
        seq(nodes.node("think"),
            route(lambda s: "search", {"search": nodes.node("search"), "odd": lookup}))


def test_a_step_after_routes_with_other_outputs_is_told_of_the_routes_own_schemas() -> None:
    """After routes that output different schemas, the next step gets what they have in
    common; a field it needs that is not there is named with the routes' own schemas (a
    user cannot add a field to the common schema stroma makes)."""
    nodes = Nodes()

    class Needs(BaseModel):
        query: str

    async def other(s: Agent) -> dict[str, str]:
        return {"query": "q"}

    async def need(s: Needs) -> Needs:
        return s

    to_other = stroma_node("to_other", NodeContract(
        node_id="to_other", input_schema=Agent, output_schema=Other))(other)
    needs = stroma_node("needs", NodeContract(
        node_id="needs", input_schema=Needs, output_schema=Needs))(need)

    with pytest.raises(PlanError) as caught:
        seq(nodes.node("think"),
            route(lambda s: "o", {"o": to_other, "a": nodes.node("act")}), needs)
    message = str(caught.value)
    assert "routes before it output Other and Agent" in message
    assert "add the field to each of Other and Agent" in message
    assert "_or_" not in message


def test_the_default_route_is_checked_too() -> None:
    """A default whose step does not fit the state is refused like any route."""
    nodes = Nodes()
    contract = NodeContract(node_id="lookup", input_schema=Other, output_schema=Other)

    @stroma_node("lookup", contract)
    async def lookup(s: Other) -> Other:
        return s

    with pytest.raises(PlanError, match=r"lookup"):
        seq(nodes.node("think"),
            route(lambda s: "search", {"search": nodes.node("search")}, default=lookup))


@pytest.mark.parametrize("routes", [{}, [], None, "search"])
def test_routes_must_be_a_dict_of_at_least_one(routes: Any) -> None:
    """An empty dict, or no dict at all, is refused with an example of what is expected."""
    with pytest.raises(PlanError, match=r"expected a dict of at least one route"):
        route(lambda s: "a", routes)


@pytest.mark.parametrize("key", [1, None, ("a",)])
def test_route_keys_must_be_strings(key: Any) -> None:
    """A key that is not a str is refused naming it."""
    nodes = Nodes()
    with pytest.raises(PlanError, match=r"keys must be strings, got " + repr(key).replace(
            "(", r"\(").replace(")", r"\)")):
        route(lambda s: "a", {key: nodes.node("a")})


def test_the_selector_must_be_a_plain_function() -> None:
    """An async selector is refused: it must be a pure function of the state."""
    nodes = Nodes()

    async def pick(state: Any) -> str:
        return "a"

    with pytest.raises(PlanError, match=r"is async"):
        route(pick, {"a": nodes.node("a")})


# ----------------------------------------------------------------- in plans


async def test_a_route_arm_may_be_a_seq() -> None:
    """A route whose arm is a seq of two runs both, in order."""
    nodes = Nodes()
    plan = seq(nodes.node("think"),
               route(lambda s: "two", {"one": nodes.node("one"),
                                       "two": seq(nodes.node("first"), nodes.node("second"))}))
    result = await interpret(plan, Agent())
    assert result.final_state.path == ["think", "first", "second"]  # type: ignore[attr-defined]
    assert "one" not in nodes.calls


async def test_a_route_inside_a_loop_picks_again_each_iteration() -> None:
    """The ReAct shape: ``loop(seq(think, route(...)))``; each iteration's key is recorded
    and the trace says which tool ran in which iteration."""
    nodes = Nodes()

    async def think(s: Agent, ctx: dict[str, Any]) -> Agent:
        return step(s, "think", tool=["search", "calc", "done"][len(s.path) // 2 % 3])

    plan = loop(
        seq(nodes.node("think", think),
            route(lambda s: s.tool, {"search": nodes.node("search"), "calc": nodes.node("calc"),
                                     "done": nodes.node("answer")}, name="tool?")),
        until=lambda s: s.tool == "done", max_iterations=5, name="agent",
    )
    result = await interpret(plan, Agent())
    assert result.status is RunStatus.COMPLETED
    assert [(e.node_id, e.iteration) for e in result.trace if e.node_id != "think"] == [
        ("search", 1), ("calc", 2), ("answer", 3)]
    keys = [v.key for e, v in result.log.records if isinstance(v, fx.RouteChosen)]
    assert keys == ["search", "calc", "done"]


async def test_replay_takes_the_recorded_route_without_asking_the_selector() -> None:
    """Replayed against a plan whose selector now answers otherwise (and counts calls), the
    run takes the recorded route: the result is equal and the selector is not called."""
    nodes = Nodes()
    live = await interpret(tools(nodes, lambda s: s.tool), Agent(n=0))
    assert live.final_state.path == ["think", "search"]  # type: ignore[attr-defined]
    changed = Selector(lambda s: "calc")
    again_nodes = Nodes()
    again_nodes.replaying = True
    again = await replay(tools(again_nodes, changed), live.log)
    assert again == live
    assert changed.calls == 0


async def test_replay_with_a_route_removed_is_nondeterminism() -> None:
    """A plan whose routes changed (the recorded one gone) no longer matches the log."""
    from stroma import NondeterminismError

    nodes = Nodes()
    live = await interpret(tools(nodes, lambda s: s.tool), Agent(n=0))
    other = Nodes()
    other.replaying = True
    plan = seq(other.node("think"), route(lambda s: s.tool, {"calc": other.node("calc")},
                                          name="tool?"))
    with pytest.raises(NondeterminismError):
        await replay(plan, live.log)
