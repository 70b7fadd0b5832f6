"""Immutable plans and the combinators that build them.

A ``Plan`` is a frozen tuple of steps:

* ``NodeStep``: one node function with its contract, timeout and retry overrides;
* ``ParallelStep``: children (nodes, or whole sub-plans) run concurrently on the same
  input, outputs merged in argument order; one trace event, checkpoint and retry unit;
* ``BranchStep``: a pure predicate on the current state picks ``then`` or ``otherwise``
  (the choice is recorded in the effect log); the chosen arm's steps run inline;
* ``MapStep``: a step (a node or a sub-plan) run once per item of a list field, the
  outputs collected in item order into another field.

Combinators: ``seq(a, b, ...)`` / ``plan >> step``, ``parallel``, ``branch``,
``map_each``; ``plan.with_retry(node_id, policy_map)`` and ``plan.with_timeout(node_id,
ms)`` return new plans. Plans are hashable and compare by value (node functions and
predicates excluded: a plan is its structure and contracts); ``fingerprint`` changes
exactly when structure or contracts change. Everything is checked when the plan is
built, before any node runs: duplicate ids, a non-async function, a missing contract,
an empty parallel, a step whose input needs a field nothing before it provides, a
``map_each`` field that is not a list.

The machine runs ``plan.program``: the steps flattened, each branch becoming a
``Choose`` (jump to the other arm when the predicate says no) and a ``Jump`` (over it).
Each kind of step has its own methods for what a plan asks of it (node ids, schemas,
description, the inputs it needs fed, how it changes under ``with_retry``).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import typing
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence, Set
from typing import Any, NamedTuple, Union

import attrs
from pydantic import BaseModel, create_model

from stroma.checkpoint import is_async_callable
from stroma.contracts import ContractRegistry, NodeContract
from stroma.errors import PlanError
from stroma.failures import FailureClass, FailurePolicy
from stroma.schemas import _schema_ref, declare_schemas
from stroma.values import named_value

__all__ = (
    "PlanLike",
    "CONTROL",
    "BranchGroup",
    "BranchStep",
    "NODE_ATTR",
    "STEP_ATTR",
    "Choose",
    "Instruction",
    "Jump",
    "LoopEnd",
    "LoopGroup",
    "LoopStart",
    "LoopStep",
    "MapGroup",
    "MapStep",
    "NodeMarker",
    "NodeStep",
    "ParallelGroup",
    "ParallelStep",
    "Plan",
    "PolicyTable",
    "RouteGroup",
    "RouteStep",
    "RouteTo",
    "Step",
    "WaitGroup",
    "WaitStep",
    "await_input",
    "branch",
    "compile_plan",
    "loop",
    "map_each",
    "node_marker",
    "parallel",
    "route",
    "schema_refs",
    "seq",
)

NODE_ATTR = "__stroma_node__"
STEP_ATTR = "__stroma_step__"
PolicyTable = tuple[tuple[FailureClass, int, float], ...]


@named_value(live=("contract",))
class NodeMarker(NamedTuple):
    """What ``@runner.node`` / ``stroma_node`` attach to a node function."""

    node_id: str
    contract: NodeContract | None = None


def node_marker(fn: object) -> NodeMarker | None:
    marker = getattr(fn, NODE_ATTR, None)
    return marker if isinstance(marker, NodeMarker) else None


def _policy_table(policies: Mapping[Any, Any] | None) -> PolicyTable:
    if policies is not None and not isinstance(policies, Mapping):
        raise PlanError(
            f"a retry policy table maps failure classes to policies, got {policies!r:.80} (a "
            f"{type(policies).__name__}): e.g. {{FailureClass.RECOVERABLE: "
            "FailurePolicy(max_retries=5, backoff_seconds=0.5)}"
        )
    if not policies:
        return ()
    out = []
    for cls, pol in policies.items():
        try:
            fc = FailureClass(cls)
        except ValueError:
            raise PlanError(
                f"{cls!r} is not a failure class: the keys of a retry policy table are "
                f"{', '.join(c.name for c in FailureClass)} (FailureClass.RECOVERABLE, ...)"
            ) from None
        if isinstance(pol, Mapping):
            pol = FailurePolicy(**pol)
        if not isinstance(pol, FailurePolicy):
            raise PlanError(
                f"retry policy for {fc} must be a FailurePolicy "
                f"(got {pol!r}, a {type(pol).__name__}): use FailurePolicy(max_retries=..)"
            )
        out.append((fc, pol.max_retries, pol.backoff_seconds))
    return tuple(sorted(out, key=lambda t: t[0].value))


def _takes_context(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [
        p for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
    ]
    return len(positional) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in positional)


def _is_async(fn: object) -> bool:
    """Whether calling ``fn`` gives a coroutine (see ``stroma.checkpoint.is_async_callable``:
    an async def, one under a ``functools.wraps`` wrapper, an object whose ``__call__`` is
    one): what stroma awaits as a node, and refuses as a pure function."""
    return is_async_callable(fn)


# ------------------------------------------------------------------------------ steps
#
# Each kind of step answers for itself what a plan needs to know about it: its node ids
# and nodes, its input and output schemas, the schemas it uses, its description for the
# fingerprint, which inputs the step before it must feed, and how it looks with one of its
# steps changed (``with_retry`` / ``with_timeout``).


def _ref_of(step: Any) -> None:
    object.__setattr__(step, "output_ref", _schema_ref(step.output_schema))


@attrs.frozen
class NodeStep:
    node_id: str
    fn: Callable[..., Any] = attrs.field(eq=False, repr=False)
    input_schema: type[BaseModel]
    output_schema: type[BaseModel]
    takes_context: bool = attrs.field(default=False, eq=False)
    timeout_ms: int | None = None
    policies: PolicyTable = ()
    output_ref: str = attrs.field(init=False, eq=False, repr=False)
    _solo: Any = attrs.field(init=False, default=None, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        _ref_of(self)

    @property
    def step_id(self) -> str:
        return self.node_id

    @property
    def solo(self) -> Plan:
        """The one-node plan of this node (a group's child that retries on its own)."""
        if self._solo is None:
            object.__setattr__(self, "_solo", Plan((self,)))
        plan: Plan = self._solo
        return plan

    def node_ids(self) -> tuple[str, ...]:
        return (self.node_id,)

    def nodes(self) -> Iterable[NodeStep]:
        yield self

    def walk(self) -> Iterable[Step]:
        yield self

    def input_of(self) -> type[BaseModel] | None:
        return self.input_schema

    def output_of(self) -> type[BaseModel] | None:
        return self.output_schema

    def collect_schemas(self, out: set[type[BaseModel]]) -> None:
        out.update((self.input_schema, self.output_schema))

    def describe(self) -> Any:
        return {
            "node": self.node_id,
            "in": _schema_fingerprint(self.input_schema),
            "out": _schema_fingerprint(self.output_schema),
        }

    def feeds(self) -> list[tuple[str, type[BaseModel]]]:
        """The (id, input schema) pairs the step before this one must provide for."""
        return [(self.node_id, self.input_schema)]

    def replaced(self, node_id: str, changes: dict[str, Any], found: list[bool]) -> NodeStep:
        if self.node_id == node_id:
            found.append(True)
            return attrs.evolve(self, **changes)
        return self

    def flatten(self, out: list[Instruction]) -> None:
        out.append(self)

    def after(self, prev: type[BaseModel] | None) -> type[BaseModel] | None:
        """The state's schema after this step, given the one before it."""
        return self.output_schema


@attrs.frozen
class ParallelStep:
    step_id: str
    children: tuple[NodeStep | Plan, ...]
    output_schema: type[BaseModel]
    max_concurrency: int | None = None
    timeout_ms: int | None = None
    policies: PolicyTable = ()
    output_ref: str = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        _ref_of(self)

    @property
    def node_id(self) -> str:
        return self.step_id

    def child_node(self, node_id: str) -> NodeStep | None:
        """The child that is the node ``node_id`` (None for sub-plan children)."""
        for child in self.children:
            if isinstance(child, NodeStep) and child.node_id == node_id:
                return child
        return None

    def node_ids(self) -> tuple[str, ...]:
        return (self.step_id, *(i for c in self.children for i in c.node_ids()))

    def nodes(self) -> Iterable[NodeStep]:
        for child in self.children:
            yield from child.nodes()

    def walk(self) -> Iterable[Step]:
        yield self
        for child in self.children:
            yield from child.walk()

    def input_of(self) -> type[BaseModel] | None:
        return self.children[0].input_of()

    def output_of(self) -> type[BaseModel] | None:
        return self.output_schema

    def collect_schemas(self, out: set[type[BaseModel]]) -> None:
        out.add(self.output_schema)
        for child in self.children:
            child.collect_schemas(out)

    def describe(self) -> Any:
        return {"parallel": self.step_id, "children": [c.describe() for c in self.children]}

    def feeds(self) -> list[tuple[str, type[BaseModel]]]:
        return [(c.node_id, c.input_schema) for c in self.children if isinstance(c, NodeStep)]

    def replaced(self, node_id: str, changes: dict[str, Any], found: list[bool]) -> Any:
        step = attrs.evolve(
            self, children=tuple(c.replaced(node_id, changes, found) for c in self.children)
        )
        if step.step_id == node_id:
            found.append(True)
            return attrs.evolve(step, **changes)
        return step

    def flatten(self, out: list[Instruction]) -> None:
        out.append(self)

    def after(self, prev: type[BaseModel] | None) -> type[BaseModel] | None:
        return self.output_schema


@attrs.frozen
class BranchStep:
    step_id: str
    predicate: Callable[[Any], Any] = attrs.field(eq=False, repr=False)
    then: Plan
    otherwise: Plan

    @property
    def node_id(self) -> str:
        return self.step_id

    def node_ids(self) -> tuple[str, ...]:
        return (self.step_id, *self.then.node_ids(), *self.otherwise.node_ids())

    def nodes(self) -> Iterable[NodeStep]:
        yield from self.then.nodes()
        yield from self.otherwise.nodes()

    def walk(self) -> Iterable[Step]:
        yield self
        yield from self.then.walk()
        yield from self.otherwise.walk()

    def input_of(self) -> type[BaseModel] | None:
        return self.then.input_schema or self.otherwise.input_schema

    def output_of(self) -> type[BaseModel] | None:
        a, b = self.then.output_schema, self.otherwise.output_schema
        return a if a is b else None

    def collect_schemas(self, out: set[type[BaseModel]]) -> None:
        out.update(self.then.schemas())
        out.update(self.otherwise.schemas())

    def describe(self) -> Any:
        return {"branch": self.step_id, "then": self.then.describe(),
                "otherwise": self.otherwise.describe()}

    def feeds(self) -> list[tuple[str, type[BaseModel]]]:
        return []  # each arm's first step is checked when the arm is compiled

    def replaced(self, node_id: str, changes: dict[str, Any], found: list[bool]) -> BranchStep:
        return attrs.evolve(
            self, then=self.then.replaced(node_id, changes, found),
            otherwise=self.otherwise.replaced(node_id, changes, found),
        )

    def flatten(self, out: list[Instruction]) -> None:
        """A ``Choose`` (to the other arm when the predicate says no), the ``then`` arm, a
        ``Jump`` over the ``otherwise`` arm, and that arm."""
        choose_at = len(out)
        out.append(Choose(self, -1))
        for step in self.then.steps:
            step.flatten(out)
        jump_at = len(out)
        out.append(Jump(-1, self.step_id))
        otherwise_pc = len(out)
        for step in self.otherwise.steps:
            step.flatten(out)
        out[choose_at] = Choose(self, otherwise_pc)
        out[jump_at] = Jump(len(out), self.step_id)

    def after(self, prev: type[BaseModel] | None) -> type[BaseModel] | None:
        return _after_branch(self, prev)


@attrs.frozen
class MapStep:
    step_id: str
    body: NodeStep | Plan
    over: str
    into: str
    input_schema: type[BaseModel]
    output_schema: type[BaseModel]
    max_concurrency: int | None = None
    timeout_ms: int | None = None
    policies: PolicyTable = ()
    output_ref: str = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        _ref_of(self)

    @property
    def node_id(self) -> str:
        return self.step_id

    def child_node(self, node_id: str) -> NodeStep | None:
        body = self.body
        return body if isinstance(body, NodeStep) and body.node_id == node_id else None

    def node_ids(self) -> tuple[str, ...]:
        return (self.step_id, *self.body.node_ids())

    def nodes(self) -> Iterable[NodeStep]:
        yield from self.body.nodes()

    def walk(self) -> Iterable[Step]:
        yield self
        yield from self.body.walk()

    def input_of(self) -> type[BaseModel] | None:
        return self.input_schema

    def output_of(self) -> type[BaseModel] | None:
        return self.output_schema

    def collect_schemas(self, out: set[type[BaseModel]]) -> None:
        out.update((self.input_schema, self.output_schema))
        self.body.collect_schemas(out)

    def describe(self) -> Any:
        return {"map": self.step_id, "over": self.over, "into": self.into,
                "body": self.body.describe(), "in": _schema_fingerprint(self.input_schema)}

    def feeds(self) -> list[tuple[str, type[BaseModel]]]:
        return [(self.step_id, self.input_schema)]

    def replaced(self, node_id: str, changes: dict[str, Any], found: list[bool]) -> Any:
        step = attrs.evolve(self, body=self.body.replaced(node_id, changes, found))
        if step.step_id == node_id:
            found.append(True)
            return attrs.evolve(step, **changes)
        return step

    def flatten(self, out: list[Instruction]) -> None:
        out.append(self)

    def after(self, prev: type[BaseModel] | None) -> type[BaseModel] | None:
        return self.output_schema


@attrs.frozen
class LoopStep:
    """``loop(body, until=..., max_iterations=...)``: ``body`` runs again and again on its
    own output until ``until(state)`` says so (its answer recorded, like a branch's)."""

    step_id: str
    body: Plan
    until: Callable[[Any], Any] = attrs.field(eq=False, repr=False)
    max_iterations: int

    @property
    def node_id(self) -> str:
        return self.step_id

    def node_ids(self) -> tuple[str, ...]:
        return (self.step_id, *self.body.node_ids())

    def nodes(self) -> Iterable[NodeStep]:
        yield from self.body.nodes()

    def walk(self) -> Iterable[Step]:
        yield self
        yield from self.body.walk()

    def input_of(self) -> type[BaseModel] | None:
        return self.body.input_schema

    def output_of(self) -> type[BaseModel] | None:
        return self.body.output_schema

    def collect_schemas(self, out: set[type[BaseModel]]) -> None:
        out.update(self.body.schemas())

    def describe(self) -> Any:
        return {"loop": self.step_id, "max": self.max_iterations, "body": self.body.describe()}

    def feeds(self) -> list[tuple[str, type[BaseModel]]]:
        return []  # the body's first step is checked when the body is compiled

    def replaced(self, node_id: str, changes: dict[str, Any], found: list[bool]) -> LoopStep:
        return attrs.evolve(self, body=self.body.replaced(node_id, changes, found))

    def flatten(self, out: list[Instruction]) -> None:
        """``LoopStart``, the body, ``LoopEnd`` (which asks ``until`` and goes back)."""
        start_at = len(out)
        out.append(LoopStart(self, -1))
        for step in self.body.steps:
            step.flatten(out)
        out.append(LoopEnd(self, start_at + 1))
        out[start_at] = LoopStart(self, len(out))

    def after(self, prev: type[BaseModel] | None) -> type[BaseModel] | None:
        return self.body.output_schema or prev


@attrs.frozen
class RouteStep:
    """``route(selector, routes, default=...)``: ``selector(state)`` picks a route by key
    (the key recorded); an unknown key without a default fails the run (TERMINAL)."""

    step_id: str
    selector: Callable[[Any], Any] = attrs.field(eq=False, repr=False)
    routes: tuple[tuple[str, Plan], ...]
    default: Plan | None = None

    @property
    def node_id(self) -> str:
        return self.step_id

    def arms(self) -> list[Plan]:
        return [p for _, p in self.routes] + ([self.default] if self.default is not None else [])

    def node_ids(self) -> tuple[str, ...]:
        return (self.step_id, *(i for arm in self.arms() for i in arm.node_ids()))

    def nodes(self) -> Iterable[NodeStep]:
        for arm in self.arms():
            yield from arm.nodes()

    def walk(self) -> Iterable[Step]:
        yield self
        for arm in self.arms():
            yield from arm.walk()

    def input_of(self) -> type[BaseModel] | None:
        return next((a.input_schema for a in self.arms() if a.input_schema is not None), None)

    def output_of(self) -> type[BaseModel] | None:
        outs = {a.output_schema for a in self.arms()}
        return outs.pop() if len(outs) == 1 else None

    def collect_schemas(self, out: set[type[BaseModel]]) -> None:
        for arm in self.arms():
            out.update(arm.schemas())

    def describe(self) -> Any:
        return {"route": self.step_id, "routes": {k: p.describe() for k, p in self.routes},
                "default": None if self.default is None else self.default.describe()}

    def feeds(self) -> list[tuple[str, type[BaseModel]]]:
        return []  # each route's first step is checked when the route is compiled

    def replaced(self, node_id: str, changes: dict[str, Any], found: list[bool]) -> RouteStep:
        return attrs.evolve(
            self, routes=tuple((k, p.replaced(node_id, changes, found)) for k, p in self.routes),
            default=None if self.default is None else self.default.replaced(
                node_id, changes, found),
        )

    def flatten(self, out: list[Instruction]) -> None:
        """``RouteTo`` (jumps to the chosen route), then each route and a ``Jump`` out."""
        at = len(out)
        out.append(RouteTo(self, (), None))
        targets: list[tuple[str, int]] = []
        jumps: list[int] = []
        for key, arm in self.routes:
            targets.append((key, len(out)))
            for step in arm.steps:
                step.flatten(out)
            jumps.append(len(out))
            out.append(Jump(-1, self.step_id))
        default_pc = None
        if self.default is not None:
            default_pc = len(out)
            for step in self.default.steps:
                step.flatten(out)
        for j in jumps:
            out[j] = Jump(len(out), self.step_id)
        out[at] = RouteTo(self, tuple(targets), default_pc)

    def after(self, prev: type[BaseModel] | None) -> type[BaseModel] | None:
        outs = [a.output_schema if a.steps else prev for a in self.arms()]
        if any(o is None for o in outs):
            return None
        first = outs[0]
        assert first is not None
        for other in outs[1:]:
            assert other is not None
            if other is not first:
                first = _common_schema(first, other)
        return first


@attrs.frozen
class WaitStep:
    """``await_input(name, schema)``: the run waits for a person or another system; the
    step's output is its input state with the field ``name`` set to the payload."""

    step_id: str
    name: str
    schema: type[BaseModel]
    # None for a wait that begins a plan of its own (``seq(await_input(...), ...)``): the
    # state is known, and checked, where that plan is put after another step; at the
    # start of a whole run the machine checks the initial state instead.
    state_schema: type[BaseModel] | None
    timeout_ms: int | None = None
    policies: PolicyTable = ()
    output_ref: str = attrs.field(init=False, eq=False, repr=False)
    schema_ref: str = attrs.field(init=False, eq=False, repr=False)
    json_schema: str = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        state = self.state_schema
        object.__setattr__(self, "output_ref", "" if state is None else _schema_ref(state))
        object.__setattr__(self, "schema_ref", _schema_ref(self.schema))
        try:
            text = json.dumps(self.schema.model_json_schema(), sort_keys=True,
                              separators=(",", ":"))
        except Exception:  # arbitrary types: no JSON Schema to check a payload against
            text = ""
        object.__setattr__(self, "json_schema", text)

    @property
    def node_id(self) -> str:
        return self.step_id

    @property
    def input_schema(self) -> type[BaseModel] | None:
        return self.state_schema

    @property
    def output_schema(self) -> type[BaseModel] | None:
        return self.state_schema

    def node_ids(self) -> tuple[str, ...]:
        return (self.step_id,)

    def nodes(self) -> Iterable[NodeStep]:
        return ()

    def walk(self) -> Iterable[Step]:
        yield self

    def input_of(self) -> type[BaseModel] | None:
        return self.state_schema

    def output_of(self) -> type[BaseModel] | None:
        return self.state_schema

    def collect_schemas(self, out: set[type[BaseModel]]) -> None:
        out.add(self.schema)
        if self.state_schema is not None:
            out.add(self.state_schema)

    def describe(self) -> Any:
        state = self.state_schema
        return {"wait": self.step_id, "name": self.name,
                "schema": _schema_fingerprint(self.schema),
                "state": None if state is None else _schema_fingerprint(state)}

    def feeds(self) -> list[tuple[str, type[BaseModel]]]:
        return [] if self.state_schema is None else [(self.step_id, self.state_schema)]

    def replaced(self, node_id: str, changes: dict[str, Any], found: list[bool]) -> WaitStep:
        if self.step_id == node_id:
            found.append(True)
            return attrs.evolve(self, **changes)
        return self

    def flatten(self, out: list[Instruction]) -> None:
        out.append(self)

    def after(self, prev: type[BaseModel] | None) -> type[BaseModel] | None:
        return self.state_schema if self.state_schema is not None else prev


Step = NodeStep | ParallelStep | BranchStep | MapStep | LoopStep | RouteStep | WaitStep


@named_value()
class Choose(NamedTuple):
    """Program instruction: ask the branch's predicate; on False jump to ``otherwise_pc``."""

    branch: BranchStep
    otherwise_pc: int

    @property
    def step_id(self) -> str:
        return self.branch.step_id


@named_value()
class Jump(NamedTuple):
    """Program instruction: go on at ``target`` (the end of a branch's ``then`` arm)."""

    target: int
    step_id: str = ""


@named_value()
class LoopStart(NamedTuple):
    """Program instruction: enter a loop (its iteration 1); ``end_pc`` is past its end."""

    loop: LoopStep
    end_pc: int

    @property
    def step_id(self) -> str:
        return self.loop.step_id


@named_value()
class LoopEnd(NamedTuple):
    """Program instruction: an iteration ended: ask ``until``; go back to ``body_pc`` for
    the next iteration, or on past the loop."""

    loop: LoopStep
    body_pc: int

    @property
    def step_id(self) -> str:
        return self.loop.step_id


@named_value()
class RouteTo(NamedTuple):
    """Program instruction: ask the route's selector and go on at the chosen route."""

    route: RouteStep
    targets: tuple[tuple[str, int], ...]
    default_pc: int | None

    @property
    def step_id(self) -> str:
        return self.route.step_id


Instruction = (
    NodeStep | ParallelStep | MapStep | WaitStep | Choose | Jump | LoopStart | LoopEnd | RouteTo
)
# The program's instructions that are not steps (no attempt of their own).
CONTROL = (Choose, Jump, LoopStart, LoopEnd, RouteTo)

# ------------------------------------------------------------------ unresolved groups
#
# What the combinators return before they are compiled into steps: each knows how to
# compile itself, given the schema the step before it outputs.


def _item_id(item: Any) -> str:
    if isinstance(item, Plan):
        return "seq(" + ", ".join(item.step_ids()) + ")"
    if isinstance(item, list | tuple):  # a sequence of steps, named as seq names it
        return "seq(" + ", ".join(_item_id(i) for i in item) + ")"
    marker = node_marker(item)
    if marker is not None:
        return marker.node_id
    sid = getattr(item, "step_id", None)
    return sid if isinstance(sid, str) else getattr(item, "__name__", repr(item))


class _Combinable:
    def __rshift__(self, other: Any) -> Plan:
        return seq(self, other)

    def __rrshift__(self, other: Any) -> Plan:
        return seq(other, self)

    # A group is a plan of one step too: ``loop(...).with_retry(...)`` is
    # ``seq(loop(...)).with_retry(...)``. (Plan has its own.)

    def with_timeout(self, node_id: str, ms: int | None) -> Plan:
        """The plan of this group alone, in which the step ``node_id`` times out after
        ``ms`` milliseconds."""
        return seq(self).with_timeout(node_id, ms)

    def with_retry(self, node_id: str, policy_map: Mapping[Any, Any]) -> Plan:
        """The plan of this group alone, in which the step ``node_id`` retries by
        ``policy_map`` (class -> policy)."""
        return seq(self).with_retry(node_id, policy_map)


PlanLike = Union["Plan", Sequence[Any], _Combinable]
"""What ``interpret``, ``replay`` and ``compile_plan`` take: a plan, a list of nodes and
groups, or one group (``loop(...)``, ``parallel(...)``, ``await_input(...)``, ...)."""


# How a group runs on its own (``await parallel(a, b)(state)``): the core never runs
# anything, so the facade (stroma.runner) installs this when stroma is imported.
_run_group_alone: Callable[..., Awaitable[dict[str, Any]]] | None = None


@attrs.frozen
class ParallelGroup(_Combinable):
    """``parallel(a, b)`` before compilation: the items, not yet resolved."""

    items: tuple[Any, ...]
    max_concurrency: int | None = None

    @property
    def step_id(self) -> str:
        return f"parallel({', '.join(_item_id(i) for i in self.items)})"

    def __call__(
        self, state: BaseModel, context: dict[str, Any] | None = None
    ) -> Awaitable[dict[str, Any]]:
        """``await parallel(a, b)(state)``: run the children on ``state`` (children that
        take a context get ``context``) and return the merged output as a plain dict:
        what each child returned, a later child winning a key. The group runs once, with
        no retries; a child that fails raises ``ChildFailed`` naming it and the failure."""
        if _run_group_alone is None:  # (importing stroma installs it)
            raise RuntimeError("import stroma before awaiting a parallel group on its own")
        return _run_group_alone(self, state, context)

    def compile(
        self, registry: ContractRegistry | None, prev: type[BaseModel] | None
    ) -> list[Step]:
        children = tuple(_sub(i, registry, prev) for i in self.items)
        schemas = tuple(c.output_of() for c in children)
        if any(s is None for s in schemas):
            bad = [_item_id(c) for c, s in zip(children, schemas, strict=True) if s is None]
            which = (f"{bad[0]} does not (it ends" if len(bad) == 1
                     else f"{', '.join(bad)} do not (they end")
            raise PlanError(
                f"{self.step_id}: every child must end in a step with one output schema, "
                f"and {which} in a wait or branch whose state type is not known here): "
                "put a node before the group, or give the wait its state "
                "type, e.g. await_input('approval', Approval, input=MyState)"
            )
        return [ParallelStep(
            step_id=f"parallel({', '.join(_item_id(c) for c in children)})",
            children=children,
            output_schema=_merged_schema(schemas),
            max_concurrency=self.max_concurrency,
        )]


@attrs.frozen
class BranchGroup(_Combinable):
    predicate: Callable[[Any], Any]
    then: Any
    otherwise: Any
    name: str | None = None

    @property
    def step_id(self) -> str:
        if self.name:
            return self.name
        pred = getattr(self.predicate, "__name__", "predicate")
        return f"branch({pred})"

    def compile(
        self, registry: ContractRegistry | None, prev: type[BaseModel] | None
    ) -> list[Step]:
        then = Plan(tuple(_compile_items(_as_list(self.then), registry, prev)))
        otherwise = Plan(tuple(_compile_items(_as_list(self.otherwise), registry, prev)))
        return [BranchStep(self.step_id, self.predicate, then, otherwise)]


@attrs.frozen
class MapGroup(_Combinable):
    body: Any
    over: str
    into: str
    max_concurrency: int | None = None
    input: type[BaseModel] | None = None

    @property
    def step_id(self) -> str:
        return f"map_each({_item_id(self.body)}, over={self.over}, into={self.into})"

    def compile(
        self, registry: ContractRegistry | None, prev: type[BaseModel] | None
    ) -> list[Step]:
        base = self.input or prev
        if base is None:
            raise PlanError(
                f"{self.step_id} is the first step, so stroma cannot tell which schema "
                f"holds {self.over!r}: pass map_each(..., input=YourState)"
            )
        is_list = _is_list_field(base, self.over)
        if not is_list:
            found = "has no such field" if is_list is None else "is not a list"
            raise PlanError(
                f"{self.step_id}: field {self.over!r} of {base.__name__} {found}; "
                f"map_each runs a step per item of a list field (e.g. {self.over}: "
                "list[Item])"
            )
        body = _sub(self.body, registry, _item_schema(base, self.over))
        out_item = body.output_of()
        if out_item is None:
            raise PlanError(
                f"{self.step_id}: the mapped step must have one output schema, and "
                f"{_item_id(body)} does not: end the body in a node, or give a wait its "
                "state type, e.g. await_input('approval', Approval, input=Item)"
            )
        return [MapStep(
            step_id=self.step_id, body=body, over=self.over, into=self.into,
            input_schema=base, output_schema=_mapped_schema(base, self.into, out_item),
            max_concurrency=self.max_concurrency,
        )]


@attrs.frozen
class LoopGroup(_Combinable):
    body: Any
    until: Callable[[Any], Any]
    max_iterations: int
    name: str | None = None

    @property
    def step_id(self) -> str:
        return self.name or f"loop({_item_id(self.body)})"

    def compile(
        self, registry: ContractRegistry | None, prev: type[BaseModel] | None
    ) -> list[Step]:
        body = Plan(tuple(_compile_items(_as_list(self.body), registry, prev)))
        if not body.steps:
            raise PlanError(f"{self.step_id}: the loop's body has no step")
        out = body.output_schema
        first_in = body.steps[0].input_of()
        if out is not None and first_in is not None:
            missing = _missing_fields(out, first_in)
            if missing:
                raise PlanError(
                    f"{self.step_id}: the body's output ({out.__name__}) feeds its own input "
                    f"on the next iteration, but {first_in.__name__} needs "
                    f"{', '.join(map(repr, missing))}, which {out.__name__} does not have: "
                    f"add them to {out.__name__}, or give them defaults in "
                    f"{first_in.__name__}"
                )
        return [LoopStep(self.step_id, body, self.until, self.max_iterations)]


@attrs.frozen
class RouteGroup(_Combinable):
    selector: Callable[[Any], Any]
    routes: tuple[tuple[str, Any], ...]
    default: Any = None
    name: str | None = None

    @property
    def step_id(self) -> str:
        if self.name:
            return self.name
        return f"route({getattr(self.selector, '__name__', 'selector')})"

    def compile(
        self, registry: ContractRegistry | None, prev: type[BaseModel] | None
    ) -> list[Step]:
        routes = []
        for key, arm in self.routes:
            plan = Plan(tuple(_compile_items(_as_list(arm), registry, prev)))
            routes.append((key, plan))
        default = None
        if self.default is not None:
            default = Plan(tuple(_compile_items(_as_list(self.default), registry, prev)))
        return [RouteStep(self.step_id, self.selector, tuple(routes), default)]


@attrs.frozen
class WaitGroup(_Combinable):
    name: str
    schema: type[BaseModel]
    timeout_ms: int | None = None
    input: type[BaseModel] | None = None

    @property
    def step_id(self) -> str:
        return f"await_input({self.name})"

    def compile(
        self, registry: ContractRegistry | None, prev: type[BaseModel] | None
    ) -> list[Step]:
        state = self.input or prev
        if state is None:  # the first step of a plan: checked where the plan is placed
            return [WaitStep(self.step_id, self.name, self.schema, None, self.timeout_ms)]
        return [self.checked(state)]

    def checked(self, state: type[BaseModel]) -> WaitStep:
        """The wait's step, once the state it waits in is known (its field checked)."""
        info = state.model_fields.get(self.name)
        fix = (f"give {state.__name__} the field '{self.name}: {self.schema.__name__} | None "
               "= None'")
        if info is None:
            raise PlanError(
                f"{self.step_id}: the state before it ({state.__name__}) has no field "
                f"{self.name!r} for the input to go in: {fix}"
            )
        if not _accepts(info.annotation, self.schema):
            raise PlanError(
                f"{self.step_id}: field {self.name!r} of {state.__name__} is "
                f"{info.annotation!r}, which does not take a {self.schema.__name__}: {fix}"
            )
        return WaitStep(self.step_id, self.name, self.schema, state, self.timeout_ms)


def _accepts(annotation: Any, schema: type[BaseModel]) -> bool:
    if annotation is schema:
        return True
    return any(_accepts(arg, schema) for arg in typing.get_args(annotation))


def _check_pure(where: str, what: str, fn: Any) -> None:
    if not callable(fn):
        raise PlanError(f"{where}({what}={fn!r}): expected a function of the state")
    if _is_async(fn):
        raise PlanError(
            f"{where}({what}={getattr(fn, '__qualname__', fn)}): the function is async; it "
            "must be a plain (pure) function of the state (define it with 'def')"
        )


def loop(
    body: Any, *, until: Callable[[Any], Any], max_iterations: int, name: str | None = None
) -> LoopGroup:
    """Run ``body`` (a step or a plan whose output feeds its own input) again and again
    until ``until(state)`` is true after an iteration, at most ``max_iterations`` times.

    ``until`` is a pure function of the state; its answers are recorded in the log, so a
    replay takes the same path. Running out of iterations ends the run PARTIAL. Budgets,
    timeouts, retries, hooks and checkpoints apply inside the loop as outside; trace
    events carry the iteration.
    """
    _check_pure("loop", "until", until)
    if not isinstance(max_iterations, int) or isinstance(max_iterations, bool) or (
        max_iterations < 1
    ):
        raise PlanError(
            f"loop(max_iterations={max_iterations!r}): expected a whole number >= 1, the "
            "most iterations the loop may run (e.g. max_iterations=10)"
        )
    _check_name("loop", name)
    return LoopGroup(body, until, max_iterations, name)


def route(
    selector: Callable[[Any], Any],
    routes: Mapping[str, Any],
    *,
    default: Any = None,
    name: str | None = None,
) -> RouteGroup:
    """Go on with one of ``routes`` (key -> step or plan), picked by ``selector(state)``
    (the model's choice of tool, say). The key is recorded in the log; a key that names no
    route goes to ``default``, or, without one, fails the run (TERMINAL) naming the key
    and the keys there are."""
    _check_pure("route", "selector", selector)
    if not isinstance(routes, Mapping) or not routes:
        raise PlanError(
            f"route(routes={routes!r}): expected a dict of at least one route, key -> step, "
            "e.g. route(pick, {'search': search, 'answer': answer})"
        )
    bad = [k for k in routes if not isinstance(k, str)]
    if bad:
        raise PlanError(f"route(routes=...): keys must be strings, got {bad[0]!r}")
    _check_name("route", name)
    return RouteGroup(selector, tuple(routes.items()), default, name)


def await_input(
    name: str,
    schema: type[BaseModel],
    *,
    timeout_ms: int | None = None,
    input: type[BaseModel] | None = None,
) -> WaitGroup:
    """A step that waits for a person or another system to send ``name`` (a ``schema``).

    When the input is there, the step's output is the state it received with its field
    ``name`` set to the validated payload (the state must have such a field, e.g.
    ``approval: Approval | None = None``). When it is not, the run ends WAITING; send it
    with ``stroma.send_input`` and run the plan again with the same run id (or pass
    ``inputs={name: payload}`` to ``interpret``). A wait past ``timeout_ms`` when the run
    is next resumed fails the step with a TimeoutError.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise PlanError(
            f"await_input(name={name!r}): expected the name of a field of the state (a "
            "Python identifier), e.g. await_input('approval', Approval)"
        )
    if not (isinstance(schema, type) and issubclass(schema, BaseModel)):
        raise PlanError(
            f"await_input({name!r}, schema={schema!r}): expected a pydantic BaseModel class, "
            "the shape of the input, e.g. class Approval(BaseModel): approved: bool"
        )
    if input is not None:
        _check_schema(f"await_input({name!r}, input=...)", input)
    return WaitGroup(name, schema, _checked_ms(f"await_input({name!r}, timeout_ms=...)",
                                               timeout_ms), input)


# The longest timeout a step takes, in milliseconds (about 31 years: past it, the times
# stroma works out would overflow a datetime).
_MAX_TIMEOUT_MS = 10**12


def _checked_ms(where: str, ms: Any) -> int | None:
    """A timeout in whole milliseconds, or None; anything else is a PlanError naming
    ``where``."""
    if ms is None:
        return None
    if (isinstance(ms, bool) or not isinstance(ms, int | float) or not math.isfinite(ms)
            or not 0 < ms <= _MAX_TIMEOUT_MS):
        raise PlanError(
            f"{where}: expected ms > 0, a number of milliseconds > 0 up to "
            f"{_MAX_TIMEOUT_MS:,}, got {ms!r}: e.g. 30_000 for 30 s, or None for no timeout"
        )
    return max(1, int(ms))  # (whole milliseconds, as before; a fraction of one is one)


def _check_name(what: str, name: Any) -> None:
    if name is not None and (not isinstance(name, str) or not name):
        raise PlanError(
            f"{what}(name={name!r}): a step's name is its id, a non-empty string, e.g. "
            f"{what}(..., name='check_2'), or leave it out (its id is then made from the "
            "function's name)"
        )


def _check_schema(where: str, schema: Any) -> None:
    if not (isinstance(schema, type) and issubclass(schema, BaseModel)):
        raise PlanError(
            f"{where}: expected a pydantic BaseModel class (the state's schema), got "
            f"{schema!r:.80}; e.g. input=MyState, or leave it out to take the previous "
            "step's output schema"
        )


def _check_concurrency(where: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                              or value < 1):
        raise PlanError(f"{where}(max_concurrency={value!r}): expected a positive int or None")


def parallel(*steps: Any, max_concurrency: int | None = None) -> ParallelGroup:
    """Run steps concurrently on the same input and merge their outputs (later wins a key).

    The group is one step: one trace event, one checkpoint, one retry unit, with the id
    ``parallel(a, b, ...)``. With ``max_concurrency`` at most that many run at once. A
    child may be a node or a whole plan (``seq(a, b)``), whose nodes retry on their own.
    """
    if not steps:
        raise PlanError(
            "parallel() needs at least one step, got none: pass the nodes to run "
            "concurrently, e.g. parallel(fetch_a, fetch_b)"
        )
    _check_concurrency("parallel", max_concurrency)
    return ParallelGroup(tuple(steps), max_concurrency)


def branch(
    predicate: Callable[[Any], Any], *, then: Any, otherwise: Any = (), name: str | None = None
) -> BranchGroup:
    """Choose ``then`` or ``otherwise`` by ``predicate(state)`` (pure: it sees the state).

    The choice is recorded in the effect log, so a replay takes the recorded arm; the
    chosen arm's steps run inline (their nodes have trace events and checkpoints).
    """
    if not callable(predicate):
        raise PlanError(f"branch(predicate={predicate!r}): the predicate must be callable")
    if _is_async(predicate):
        raise PlanError(
            f"branch(predicate={getattr(predicate, '__qualname__', predicate)}): the "
            "predicate is async; a predicate is a plain function of the state "
            "(define it with 'def')"
        )
    _check_name("branch", name)
    return BranchGroup(predicate, then, otherwise, name)


def map_each(
    step: Any,
    *,
    over: str,
    into: str,
    max_concurrency: int | None = None,
    input: type[BaseModel] | None = None,
) -> MapGroup:
    """Run ``step`` once per item of the list field ``over``; collect outputs into ``into``.

    Outputs keep item order whatever the completion order. Items that are not dicts are
    passed as ``{"item": value}``. ``input`` names the state schema when the map is the
    first step of a plan (otherwise it is the previous step's output schema).
    """
    for name, value in (("over", over), ("into", into)):
        if not isinstance(value, str) or not value.isidentifier():
            raise PlanError(
                f"map_each({name}={value!r}): expected a field name of the state (a Python "
                f"identifier), got {value!r}: e.g. map_each(step, over='items', "
                "into='results')"
            )
    _check_concurrency("map_each", max_concurrency)
    if input is not None:
        _check_schema(f"map_each(over={over!r}, input=...)", input)
    return MapGroup(step, over, into, max_concurrency, input)


# ---------------------------------------------------------------------- schema helpers

_MERGED: dict[tuple[Any, ...], type[BaseModel]] = {}


def _generated(model: type[BaseModel]) -> type[BaseModel]:
    """A schema stroma made, reachable as an attribute of this module by its qualname: a
    checkpoint of it (a map_each's or parallel's state) is stored under the reference
    ``stroma.plan:<qualname>``, which a store's loader (``_resolve_schema``, or
    ``getattr(importlib.import_module(module), qualname)``) then finds in any process that
    built the plan. (The qualname ends in a tag made from what the schema is made of, so
    it names one schema; never one of this module's own names.)"""
    name = model.__qualname__
    if globals().get(name, model) is model or name in _GENERATED:
        globals()[name] = model
        _GENERATED.add(name)
    return model


_GENERATED: set[str] = set()


def _tag(*parts: Any) -> str:
    """A short name for a derived schema that is the same in every process: it comes from
    the schemas (by reference) and names it is made of, so the logs that name it can be
    read by another process."""
    text = "|".join(_schema_ref(p) if isinstance(p, type) else str(p) for p in parts)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _merged_schema(schemas: tuple[type[BaseModel], ...]) -> type[BaseModel]:
    """One model with the fields of every child's output (a later child wins a field)."""
    cached = _MERGED.get(schemas)
    if cached is not None:
        return cached
    fields: dict[str, Any] = {}
    for schema in schemas:
        for name, info in schema.model_fields.items():
            fields[name] = (info.annotation, info)
    name = "Merged_" + "_".join(s.__name__ for s in schemas)
    model: type[BaseModel] = create_model(name, __module__=__name__, **fields)
    model.__qualname__ = f"{name}_{_tag('merged', *schemas)}"
    _MERGED[schemas] = _generated(model)
    return model


def _mapped_schema(base: type[BaseModel], into: str, item: type[BaseModel]) -> type[BaseModel]:
    key = ("map", base, into, item)
    cached = _MERGED.get(key)
    if cached is not None:
        return cached
    fields: dict[str, Any] = {n: (i.annotation, i) for n, i in base.model_fields.items()}
    fields[into] = (list[item], ...)  # type: ignore[valid-type]
    name = f"{base.__name__}_with_{into}"
    model: type[BaseModel] = create_model(name, __module__=__name__, **fields)
    model.__qualname__ = f"{name}_{_tag('map', base, into, item)}"
    _MERGED[key] = _generated(model)
    return model


def _is_list_field(schema: type[BaseModel], name: str) -> bool | None:
    info = schema.model_fields.get(name)
    if info is None:
        return None
    ann = info.annotation
    origin = typing.get_origin(ann)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        origin = typing.get_origin(args[0]) if len(args) == 1 else None
        ann = args[0] if len(args) == 1 else ann
    return origin in (list, tuple) or ann in (list, tuple)


def _item_schema(schema: type[BaseModel], name: str) -> type[BaseModel] | None:
    """What a map body receives per item of the list field ``name``: the item's model, or
    ``{"item": value}`` for a plain value; None when the item type says nothing useful."""
    ann: Any = schema.model_fields[name].annotation
    if typing.get_origin(ann) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        members = [a for a in typing.get_args(ann) if a is not type(None)]
        ann = members[0] if len(members) == 1 else None
    args = typing.get_args(ann)
    elem: Any = args[0] if args else None
    if isinstance(elem, type) and issubclass(elem, BaseModel):
        return elem
    origin = typing.get_origin(elem) or elem
    if not isinstance(origin, type) or issubclass(origin, Mapping):
        return None  # dicts, unions, Any: no static promise about the fields
    key = ("item", schema, name)
    cached = _MERGED.get(key)
    if cached is None:
        fields: dict[str, Any] = {"item": (elem, ...)}
        cached = create_model(f"{schema.__name__}_{name}_item", __module__=__name__, **fields)
        cached.__qualname__ = f"{cached.__name__}_{_tag('item', schema, name)}"
        _MERGED[key] = _generated(cached)
    return cached


def _common_schema(a: type[BaseModel], b: type[BaseModel]) -> type[BaseModel]:
    """The fields two schemas share (same name and annotation): what either one provides."""
    key = ("common", a, b)
    cached = _MERGED.get(key)
    if cached is None:
        fields: dict[str, Any] = {
            n: (i.annotation, i) for n, i in a.model_fields.items()
            if n in b.model_fields and b.model_fields[n].annotation == i.annotation
        }
        cached = create_model(f"{a.__name__}_or_{b.__name__}", __module__=__name__, **fields)
        cached.__qualname__ = f"{cached.__name__}_{_tag('common', a, b)}"
        _MERGED[key] = _generated(cached)
        _PARTS[cached] = (*_parts(a), *(p for p in _parts(b) if p not in _parts(a)))
    return cached


# The user's schemas a common schema stands for (the outputs of a branch's arms or of a
# route's routes), for messages: a user cannot add a field to a schema stroma made.
_PARTS: dict[type[BaseModel], tuple[type[BaseModel], ...]] = {}


def _parts(schema: type[BaseModel]) -> tuple[type[BaseModel], ...]:
    return _PARTS.get(schema, (schema,))


def _after_branch(step: BranchStep, prev: type[BaseModel] | None) -> type[BaseModel] | None:
    """The state after a branch: its arms' common output (an empty arm passes ``prev`` on)."""
    a = step.then.output_schema if step.then.steps else prev
    b = step.otherwise.output_schema if step.otherwise.steps else prev
    if a is b:
        return a
    if a is None or b is None:
        return None  # an arm ends in a branch of its own: unknown, check nothing
    return _common_schema(a, b)


def _provided(schema: type[BaseModel]) -> set[str]:
    out = set()
    for name, info in schema.model_fields.items():
        out.add(name)
        if info.alias:
            out.add(info.alias)
    return out


def _accepted_names(schema: type[BaseModel], name: str, info: Any) -> set[str]:
    """The keys under which ``schema`` takes its field ``name`` as input: its validation
    alias (each choice of an ``AliasChoices``, the first key of an ``AliasPath``), else its
    alias, and its own name when no alias hides it (or the schema populates by name)."""
    names: set[str] = set()
    alias = info.validation_alias
    for choice in getattr(alias, "choices", None) or ([alias] if alias is not None else []):
        path = getattr(choice, "path", None)
        first = path[0] if path else choice
        if isinstance(first, str):
            names.add(first)
    if alias is None and info.alias:
        names.add(info.alias)
    config = schema.model_config
    if not names or config.get("populate_by_name") or config.get("validate_by_name"):
        names.add(name)
    return names


def _derives_input(schema: type[BaseModel]) -> bool:
    """Whether ``schema`` has a ``mode="before"`` or ``"wrap"`` model validator, which may
    make up required fields from others: nothing about its input can be told unrun."""
    validators = schema.__pydantic_decorators__.model_validators.values()
    return any(v.info.mode in ("before", "wrap") for v in validators)


def _missing_fields(prev: type[BaseModel], schema: type[BaseModel]) -> list[str]:
    """The required fields of ``schema`` that the output ``prev`` surely lacks (for a
    branch's or route's common output, that one of its schemas lacks). An output schema
    with ``extra="allow"`` keeps what its node returned beyond its fields, so it may hold
    any field; an input schema that derives its input (see ``_derives_input``) may need
    none: both are left for the node's input contract to check when it runs."""
    if _derives_input(schema):
        return []
    parts = [p for p in _parts(prev) if p.model_config.get("extra") != "allow"]
    if not parts:
        return []
    provided = [_provided(p) for p in parts]
    return [
        info.alias or name for name, info in schema.model_fields.items()
        if info.is_required() and any(
            not (_accepted_names(schema, name, info) & have) for have in provided)
    ]


_SCHEMA_FP: dict[type[BaseModel], str] = {}


def _schema_fingerprint(schema: type[BaseModel]) -> str:
    fp = _SCHEMA_FP.get(schema)
    if fp is None:
        try:
            desc: Any = schema.model_json_schema()
        except Exception:  # arbitrary types: fall back to field names and annotations
            desc = {n: repr(f.annotation) for n, f in schema.model_fields.items()}
        text = json.dumps(desc, sort_keys=True, default=repr)
        fp = hashlib.sha256(text.encode()).hexdigest()[:16]
        _SCHEMA_FP[schema] = fp
    return fp



# ------------------------------------------------------------------------------- plan


@attrs.frozen
class Plan(_Combinable):
    """An immutable, validated sequence of steps."""

    steps: tuple[Step, ...] = ()
    fingerprint: str = attrs.field(init=False, eq=False, repr=False)
    program: tuple[Instruction, ...] = attrs.field(init=False, eq=False, repr=False)
    _by_ref: Any = attrs.field(init=False, default=None, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        text = json.dumps([s.describe() for s in self.steps], sort_keys=True)
        object.__setattr__(self, "fingerprint", hashlib.sha256(text.encode()).hexdigest())
        program: list[Instruction] = []
        for step in self.steps:
            step.flatten(program)
        object.__setattr__(self, "program", tuple(program))

    def __len__(self) -> int:
        return len(self.steps)

    def step_ids(self) -> tuple[str, ...]:
        return tuple(s.step_id for s in self.steps)

    def node_ids(self) -> tuple[str, ...]:
        return tuple(i for s in self.steps for i in s.node_ids())

    def nodes(self) -> Iterable[NodeStep]:
        """Every NodeStep of the plan, nested ones included."""
        for s in self.steps:
            yield from s.nodes()

    def walk(self) -> Iterable[Step]:
        """Every step of the plan, nested ones included (a group before its children)."""
        for s in self.steps:
            yield from s.walk()

    @property
    def input_schema(self) -> type[BaseModel] | None:
        return self.steps[0].input_of() if self.steps else None

    @property
    def output_schema(self) -> type[BaseModel] | None:
        out: type[BaseModel] | None = None
        for i, step in enumerate(self.steps):
            # (an empty arm of a branch passes the state on: at the start, the plan's input)
            out = step.after(out if i else step.input_of())
        return out

    def input_of(self) -> type[BaseModel] | None:
        return self.input_schema

    def output_of(self) -> type[BaseModel] | None:
        return self.output_schema

    def schemas(self) -> set[type[BaseModel]]:
        out: set[type[BaseModel]] = set()
        self.collect_schemas(out)
        return out

    def collect_schemas(self, out: set[type[BaseModel]]) -> None:
        for s in self.steps:
            s.collect_schemas(out)

    def schema_for(self, ref: str) -> type[BaseModel]:
        """The plan's schema whose reference (``module:qualname``) is ``ref``."""
        if self._by_ref is None:
            object.__setattr__(self, "_by_ref", {_schema_ref(s): s for s in self.schemas()})
        try:
            schema: type[BaseModel] = self._by_ref[ref]
        except KeyError:
            raise PlanError(f"the plan declares no schema {ref!r}") from None
        return schema

    def describe(self) -> Any:
        return {"seq": [s.describe() for s in self.steps]}

    def replaced(self, node_id: str, changes: dict[str, Any], found: list[bool]) -> Plan:
        return Plan(tuple(s.replaced(node_id, changes, found) for s in self.steps))

    def _replace(self, node_id: str, what: str, **changes: Any) -> Plan:
        found: list[bool] = []
        plan = self.replaced(node_id, changes, found)
        if not found and node_id in self.node_ids():  # a loop, route or branch by its name
            inside = [i for i in self.node_ids() if i != node_id]
            raise PlanError(
                f"{what}: {node_id!r} is a loop, route or branch, which takes no retry "
                f"policy or timeout of its own (it is not one attempt): name a step in it "
                f"instead (the plan's other steps: {', '.join(map(repr, inside)) or 'none'})"
            )
        if not found:
            raise PlanError(
                f"{what}: no step {node_id!r} in this plan; its steps are "
                f"{', '.join(map(repr, self.node_ids())) or '(none)'}"
            )
        return plan

    def with_timeout(self, node_id: str, ms: int | None) -> Plan:
        """A new plan in which the step ``node_id`` times out after ``ms`` milliseconds."""
        timeout_ms = _checked_ms(f"with_timeout({node_id!r}, {ms!r})", ms)
        return self._replace(node_id, "with_timeout", timeout_ms=timeout_ms)

    def with_retry(self, node_id: str, policy_map: Mapping[Any, Any]) -> Plan:
        """A new plan in which the step ``node_id`` retries by ``policy_map`` (class -> policy)."""
        return self._replace(node_id, "with_retry", policies=_policy_table(policy_map))


# --------------------------------------------------------------------------- compiling


def _compile_node(fn: Any, registry: ContractRegistry | None) -> NodeStep:
    marker = node_marker(fn)
    name = getattr(fn, "__qualname__", None) or repr(fn)
    if marker is None:
        also = "" if not callable(fn) or _is_async(fn) else (
            "; it must also be async: define it with 'async def'"
        )
        raise PlanError(
            f"{name} is not a stroma node: decorate it with @runner.node('id', input=In, "
            "output=Out) or stroma_node('id', contract) before putting it in a pipeline"
            f"{also}"
        )
    contract = marker.contract
    if contract is None and registry is not None and marker.node_id in registry:
        contract = registry.get(marker.node_id)
    cached = getattr(fn, STEP_ATTR, None)
    if cached is not None and cached[0] is contract and cached[1].node_id == marker.node_id:
        return cached[1]
    if not _is_async(fn):
        raise PlanError(
            f"node {marker.node_id!r} ({name}) is not an async function: define it with "
            "'async def' (stroma awaits every node)"
        )
    if contract is None:
        raise PlanError(
            f"node {marker.node_id!r} ({name}) has no contract: register one with "
            f"registry.register(NodeContract(node_id={marker.node_id!r}, input_schema=..., "
            "output_schema=...)) or decorate it with @runner.node(..., input=..., output=...)"
        )
    takes_context = _takes_context(fn)
    _check_signature(fn, marker.node_id, name, takes_context)
    step = NodeStep(
        node_id=marker.node_id,
        fn=fn,
        input_schema=contract.input_schema,
        output_schema=contract.output_schema,
        takes_context=takes_context,
    )
    try:
        setattr(fn, STEP_ATTR, (contract, step))
    except (AttributeError, TypeError):
        pass  # a callable that takes no attributes: compile it again next time
    return step


def _check_signature(fn: Any, node_id: str, name: str, takes_context: bool) -> None:
    """A node is called with the state, and the context when it takes two parameters:
    a function that cannot be called so is refused when the plan is built (at run time it
    would be a TypeError, retried as any failure)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # (no signature to read: the call says)
    try:
        signature.bind(*(("state", "ctx") if takes_context else ("state",)))
    except TypeError as e:
        raise PlanError(
            f"node {node_id!r} ({name}) cannot be called with the state"
            f"{' and the context' if takes_context else ''}: its signature is "
            f"{name.rsplit('.', 1)[-1]}{signature} ({e}); a node takes the state, and "
            "optionally the run's context: async def step(state: In) or async def "
            "step(state: In, ctx: dict)"
        ) from None


def _sub(item: Any, registry: ContractRegistry | None, prev: type[BaseModel] | None) -> Any:
    """A child of a group: a single node stays a NodeStep, anything else is a sub-plan."""
    steps = _compile_items([item], registry, prev)
    if len(steps) == 1 and isinstance(steps[0], NodeStep):
        return steps[0]
    if not steps:
        raise PlanError(f"{_item_id(item)}: an empty sub-plan cannot be a child of a group")
    return Plan(tuple(steps))


def _check_feed(prev: type[BaseModel] | None, step: Any) -> None:
    """A step's input needs no required field that the previous output lacks."""
    if prev is None:
        return
    have = _provided(prev)
    for step_id, schema in step.feeds():
        missing = _missing_fields(prev, schema)
        if missing:
            parts = _parts(prev)
            if len(parts) > 1:  # the arms or routes before it: what all of them output
                names = (", ".join(p.__name__ for p in parts[:-1])
                         + f" and {parts[-1].__name__}")
                raise PlanError(
                    f"step {step_id!r} needs {', '.join(map(repr, missing))} in its input "
                    f"({schema.__name__}), but the branch arms or routes before it output "
                    f"{names}, which have in common only the fields "
                    f"{', '.join(sorted(have)) or '(none)'}: add the field to each of "
                    f"{names}, give it a default in {schema.__name__}, or put a step in "
                    "between that provides it"
                )
            raise PlanError(
                f"step {step_id!r} needs {', '.join(map(repr, missing))} in its input "
                f"({schema.__name__}), but the step before it outputs {prev.__name__} "
                f"(fields: {', '.join(sorted(have)) or 'none'}): add the field to "
                f"{prev.__name__}, give it a default in {schema.__name__}, or put a step in "
                "between that provides it"
            )


def _compile_items(
    items: Iterable[Any], registry: ContractRegistry | None,
    prev: type[BaseModel] | None = None,
) -> list[Step]:
    steps: list[Step] = []
    for item in items:
        new: list[Step]
        checked = False  # a plan's or list's steps were checked where they were built
        if isinstance(item, Plan):
            new = list(item.steps)
            if new:
                _check_feed(prev, new[0])
            checked = True
            first = new[0] if new else None
            if prev is not None and type(first) is WaitStep and first.state_schema is None:
                # A plan that begins with a wait, placed after a step: now the state is
                # known, check the wait's field and the steps after it against it.
                wait = WaitGroup(first.name, first.schema, first.timeout_ms).checked(prev)
                new = [attrs.evolve(wait, policies=first.policies), *new[1:]]
                checked = False
        elif isinstance(item, NodeStep | ParallelStep | BranchStep | MapStep | LoopStep
                        | RouteStep | WaitStep):
            new = [item]
        elif isinstance(item, ParallelGroup | BranchGroup | MapGroup | LoopGroup | RouteGroup
                        | WaitGroup):
            new = item.compile(registry, prev)
        elif isinstance(item, list | tuple):
            new = _compile_items(item, registry, prev)
            checked = True
        else:
            new = [_compile_node(item, registry)]
        for step in new:
            if not checked:
                _check_feed(prev, step)
            prev = step.after(prev)
            steps.append(step)
    return steps


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return list(value)
    return [value]


def compile_plan(items: Any, registry: ContractRegistry | None = None) -> Plan:
    """A validated Plan from a Plan, a step, or a list of node functions and groups."""
    if isinstance(items, Plan):
        return items  # plans are validated when they are built
    if isinstance(items, Set | Mapping):
        raise PlanError(
            f"a pipeline is an ordered list of steps, got a {type(items).__name__}: its "
            "order is not defined (a set's can change from one process to the next, which "
            "would break resume and replay); pass a list, e.g. [fetch, summarize]"
        )
    if isinstance(items, str | bytes) or not isinstance(items, Iterable):
        steps = _compile_items([items], registry)
    else:
        steps = _compile_items(items, registry)
    seen: set[str] = set()
    for step in steps:
        for node_id in step.node_ids():
            if node_id in seen:
                fix = "give one of them another id"
                if node_id.startswith("branch("):
                    fix = ("an unnamed branch's id is made from its predicate's name; name "
                           "one of them, e.g. branch(pred, then=..., name='check_2')")
                raise PlanError(
                    f"two steps share the id {node_id!r}: step ids must be unique in a plan "
                    f"({fix})"
                )
            seen.add(node_id)
    plan = Plan(tuple(steps))
    declare_schemas(plan.schemas())
    return plan


def seq(*steps: Any) -> Plan:
    """A plan running ``steps`` one after another (node functions, groups or plans)."""
    return compile_plan(list(steps))


def schema_refs(plan: Plan) -> list[str]:
    return sorted(_schema_ref(s) for s in plan.schemas())
