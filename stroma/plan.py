"""Immutable plans and the combinators that build them.

A ``Plan`` is a frozen tuple of steps compiled from node functions: each ``NodeStep``
holds a node's id, function, contract schemas, timeout and retry overrides; a
``ParallelStep`` runs several nodes on the same input and merges their outputs. Plans are
hashable, compare by value (functions excluded: a plan is its structure and contracts),
and carry a ``fingerprint`` that changes exactly when structure or contracts change.
Everything here is checked when the plan is built, before any node runs.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
from pydantic import BaseModel, create_model

from stroma.contracts import ContractRegistry, NodeContract
from stroma.errors import PlanError
from stroma.failures import FailureClass, FailurePolicy
from stroma.schemas import _schema_ref, declare_schemas

__all__ = (
    "NodeMarker",
    "NodeStep",
    "ParallelGroup",
    "ParallelStep",
    "Plan",
    "Step",
    "compile_plan",
    "node_marker",
    "parallel",
    "seq",
)

NODE_ATTR = "__stroma_node__"
STEP_ATTR = "__stroma_step__"
PolicyTable = tuple[tuple[FailureClass, int, float], ...]


@attrs.frozen
class NodeMarker:
    """What ``@runner.node`` / ``stroma_node`` attach to a node function."""

    node_id: str
    contract: NodeContract | None = attrs.field(default=None, eq=False)


def node_marker(fn: object) -> NodeMarker | None:
    marker = getattr(fn, NODE_ATTR, None)
    return marker if isinstance(marker, NodeMarker) else None


def _policy_table(policies: Mapping[Any, Any] | None) -> PolicyTable:
    if not policies:
        return ()
    out = []
    for cls, pol in policies.items():
        fc = FailureClass(cls)
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


@attrs.frozen
class NodeStep:
    node_id: str
    fn: Callable[..., Any] = attrs.field(eq=False, repr=False)
    input_schema: type[BaseModel]
    output_schema: type[BaseModel]
    takes_context: bool = attrs.field(default=False, eq=False)
    timeout_ms: int | None = None
    policies: PolicyTable = ()

    @property
    def step_id(self) -> str:
        return self.node_id

    def node_ids(self) -> tuple[str, ...]:
        return (self.node_id,)


@attrs.frozen
class ParallelStep:
    step_id: str
    children: tuple[NodeStep, ...]
    output_schema: type[BaseModel]
    max_concurrency: int | None = None
    timeout_ms: int | None = None
    policies: PolicyTable = ()

    @property
    def node_id(self) -> str:
        return self.step_id

    def node_ids(self) -> tuple[str, ...]:
        return (self.step_id, *(c.node_id for c in self.children))


Step = NodeStep | ParallelStep


@attrs.frozen
class ParallelGroup:
    """``parallel(a, b)`` before compilation: the node functions, not yet resolved."""

    items: tuple[Any, ...]
    max_concurrency: int | None = None

    @property
    def step_id(self) -> str:
        names = []
        for item in self.items:
            marker = node_marker(item)
            names.append(marker.node_id if marker else getattr(item, "__name__", repr(item)))
        return f"parallel({', '.join(names)})"


def parallel(*nodes: Any, max_concurrency: int | None = None) -> ParallelGroup:
    """Run nodes concurrently on the same input and merge their outputs (later wins a key).

    The group is one step: one trace event, one checkpoint, one retry unit, with the id
    ``parallel(a, b, ...)``. With ``max_concurrency`` at most that many run at once.
    """
    if not nodes:
        raise PlanError("parallel() needs at least one node: parallel(fetch_a, fetch_b)")
    if max_concurrency is not None and (
        not isinstance(max_concurrency, int) or max_concurrency < 1
    ):
        raise PlanError(
            f"parallel(max_concurrency={max_concurrency!r}): expected a positive int or None"
        )
    return ParallelGroup(tuple(nodes), max_concurrency)


_MERGED: dict[tuple[type[BaseModel], ...], type[BaseModel]] = {}


def _merged_schema(step_id: str, schemas: tuple[type[BaseModel], ...]) -> type[BaseModel]:
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
    model.__qualname__ = f"{name}_{len(_MERGED)}"
    _MERGED[schemas] = model
    return model


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


def _describe(step: Step) -> dict[str, Any]:
    if isinstance(step, NodeStep):
        return {
            "node": step.node_id,
            "in": _schema_fingerprint(step.input_schema),
            "out": _schema_fingerprint(step.output_schema),
        }
    return {"parallel": step.step_id, "children": [_describe(c) for c in step.children]}


@attrs.frozen
class Plan:
    """An immutable, validated sequence of steps."""

    steps: tuple[Step, ...] = ()
    fingerprint: str = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        text = json.dumps([_describe(s) for s in self.steps], sort_keys=True)
        object.__setattr__(self, "fingerprint", hashlib.sha256(text.encode()).hexdigest())

    def __len__(self) -> int:
        return len(self.steps)

    def __rshift__(self, other: Any) -> Plan:
        return seq(self, other)

    def step_ids(self) -> tuple[str, ...]:
        return tuple(s.step_id for s in self.steps)

    def node_ids(self) -> tuple[str, ...]:
        return tuple(i for s in self.steps for i in s.node_ids())

    def schemas(self) -> set[type[BaseModel]]:
        out: set[type[BaseModel]] = set()
        for s in self.steps:
            out.add(s.output_schema)
            for n in s.children if isinstance(s, ParallelStep) else (s,):
                out.update((n.input_schema, n.output_schema))
        return out

    def _replace_step(self, step_id: str, what: str, **changes: Any) -> Plan:
        found = False
        steps: list[Step] = []
        for s in self.steps:
            if s.step_id == step_id:
                s = attrs.evolve(s, **changes)
                found = True
            elif isinstance(s, ParallelStep) and step_id in s.node_ids():
                children = tuple(
                    attrs.evolve(c, **changes) if c.node_id == step_id else c for c in s.children
                )
                s = attrs.evolve(s, children=children)
                found = True
            steps.append(s)
        if not found:
            raise PlanError(
                f"{what}: no step {step_id!r} in this plan; its steps are "
                f"{', '.join(map(repr, self.node_ids())) or '(none)'}"
            )
        return Plan(tuple(steps))

    def with_timeout(self, node_id: str, ms: int | None) -> Plan:
        """A new plan in which the step ``node_id`` times out after ``ms`` milliseconds."""
        if ms is not None and (not isinstance(ms, int | float) or ms <= 0):
            raise PlanError(f"with_timeout({node_id!r}, {ms!r}): expected milliseconds > 0")
        return self._replace_step(
            node_id, "with_timeout", timeout_ms=None if ms is None else int(ms)
        )

    def with_retry(self, node_id: str, policy_map: Mapping[Any, Any]) -> Plan:
        """A new plan in which the step ``node_id`` retries by ``policy_map`` (class -> policy)."""
        return self._replace_step(node_id, "with_retry", policies=_policy_table(policy_map))


def _compile_node(fn: Any, registry: ContractRegistry | None) -> NodeStep:
    marker = node_marker(fn)
    name = getattr(fn, "__qualname__", None) or repr(fn)
    if marker is None:
        raise PlanError(
            f"{name} is not a stroma node: decorate it with @runner.node('id', input=In, "
            "output=Out) or stroma_node('id', contract) before putting it in a pipeline"
        )
    if not inspect.iscoroutinefunction(fn) and not inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004
    ):
        raise PlanError(
            f"node {marker.node_id!r} ({name}) is not an async function: define it with "
            "'async def' (stroma awaits every node)"
        )
    contract = marker.contract
    if contract is None and registry is not None and marker.node_id in registry:
        contract = registry.get(marker.node_id)
    if contract is None:
        raise PlanError(
            f"node {marker.node_id!r} ({name}) has no contract: register one with "
            f"registry.register(NodeContract(node_id={marker.node_id!r}, input_schema=..., "
            "output_schema=...)) or decorate it with @runner.node(..., input=..., output=...)"
        )
    cached = getattr(fn, STEP_ATTR, None)
    if cached is not None and cached[0] is contract and cached[1].node_id == marker.node_id:
        return cached[1]  # type: ignore[no-any-return]
    step = NodeStep(
        node_id=marker.node_id,
        fn=fn,
        input_schema=contract.input_schema,
        output_schema=contract.output_schema,
        takes_context=_takes_context(fn),
    )
    try:
        setattr(fn, STEP_ATTR, (contract, step))
    except (AttributeError, TypeError):
        pass  # a callable that takes no attributes: compile it again next time
    return step


def _compile_items(items: Iterable[Any], registry: ContractRegistry | None) -> list[Step]:
    steps: list[Step] = []
    for item in items:
        if isinstance(item, Plan):
            steps.extend(item.steps)
        elif isinstance(item, NodeStep | ParallelStep):
            steps.append(item)
        elif isinstance(item, ParallelGroup):
            children = tuple(_compile_node(f, registry) for f in item.items)
            schemas = tuple(c.output_schema for c in children)
            steps.append(
                ParallelStep(
                    step_id=f"parallel({', '.join(c.node_id for c in children)})",
                    children=children,
                    output_schema=_merged_schema(item.step_id, schemas),
                    max_concurrency=item.max_concurrency,
                )
            )
        elif isinstance(item, list | tuple):
            steps.extend(_compile_items(item, registry))
        else:
            steps.append(_compile_node(item, registry))
    return steps


def compile_plan(items: Any, registry: ContractRegistry | None = None) -> Plan:
    """A validated Plan from a Plan, a step, or a list of node functions and groups."""
    if isinstance(items, Plan):
        return items  # plans are validated when they are built
    if isinstance(items, str | bytes) or not isinstance(items, Iterable):
        steps = _compile_items([items], registry)
    else:
        steps = _compile_items(items, registry)
    seen: dict[str, str] = {}
    for step in steps:
        for node_id in step.node_ids():
            if node_id in seen:
                raise PlanError(
                    f"two steps share the id {node_id!r}: step ids must be unique in a plan "
                    "(give one of them another id)"
                )
            seen[node_id] = node_id
    plan = Plan(tuple(steps))
    declare_schemas(plan.schemas())
    return plan


def seq(*steps: Any) -> Plan:
    """A plan running ``steps`` one after another (node functions, groups or plans)."""
    return compile_plan(list(steps))


def schema_refs(plan: Plan) -> list[str]:
    return sorted(_schema_ref(s) for s in plan.schemas())
