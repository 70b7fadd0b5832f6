"""The run machine: every decision of a run, as a pure function.

Theory of operation
-------------------
``start(plan, initial_state, config)`` gives the first ``RunState`` and effects;
``advance(state, event)`` takes the event that answered the last effect and gives the
next state and effects. The machine never performs anything: interpreters do, and feed
back what happened. Time, durations, node outputs, exceptions and what user classifiers
said only ever arrive as event fields; jitter comes from a PRNG whose seed is in the
config (and the log header), so the same events always give the same effects.

The state's ``phase`` says which event it waits for:

========== ============================ =========================================
phase      waits for (answering ...)    then
========== ============================ =========================================
load       CheckpointLoaded             begin the resume step, or PARTIAL
hook_start HookFired (FireHook start)   CallNode / CallParallel
call       NodeReturned | NodeRaised    success: RecordAttempt, SaveCheckpoint, then
           | ParallelReturned           FireHook success or the next step's effects
                                        failure: ClassifyFailure or classified
classify   FailureClassified            RecordAttempt, FireHook failure or decide
hook_fail  HookFired (FireHook failure) decide: Finish, Sleep or next attempt
sleep      Slept                        next attempt
hook_ok    HookFired (FireHook success) the next step
done       nothing                      (a Finish was emitted)
========== ============================ =========================================

The effects of one step come as a list, performed in order: ``RecordAttempt`` and
``Finish`` need no answer; ``SaveCheckpoint`` is answered (``CheckpointSaved``, kept in
the log) but the machine does not wait for it, since nothing it decides depends on it:
it is performed before the effects that follow it, so a node's checkpoint is saved
before the next node starts. The last effect of a list is the one whose answer the
machine waits for, unless the list ends with ``Finish``.

An attempt begins with two checks: a budget already spent stops the run (PARTIAL, and
the trace says why) before the node starts; an input that breaks the contract fails the
attempt without calling the node (after the start hook, which every attempt that is not a
budget stop gets). The run is over when the effects contain ``Finish``.
Running totals are kept in the state, never recomputed from history, so a step costs the
same at node 10 and at node 10,000. Hook errors are recorded and change nothing.

The plain lane. In a plain run (no budget, hooks, fallbacks or timeout overrides) a node
that returns a dict which keeps its contract has one possible outcome, and
``plain_returned`` is that decision; ``advance`` uses it too, so the two cannot differ.
An interpreter may call it directly and perform the effects it implies (record, save,
call the next node) without making them into objects; its log then holds one compact row
per node (``stroma.log``), which reads back as exactly the records ``advance`` emits.
``skip_plain`` is the replay side: a recorded chain of such rows is checked against the
plan in one go (node ids, attempts, how each node follows the last; the contracts are
covered by the plan fingerprint, checked before replay starts) and only the last output
is validated again, instead of one ``advance`` per node.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import attrs
from pydantic import BaseModel, ValidationError

from stroma import effects as fx
from stroma.contracts import ContractViolation
from stroma.cost import (
    BudgetExceeded,
    ExecutionBudget,
    FallbackPolicy,
    estimate_cost_usd,
    fallback_for,
)
from stroma.errors import StromaError
from stroma.failures import FailureClass, builtin_class_for_names, default_policy_map
from stroma.plan import Choose, Jump, MapStep, NodeStep, ParallelStep, Plan
from stroma.trace import RunStatus

__all__ = (
    "Attempt",
    "MachineConfig",
    "Out",
    "RunState",
    "UnexpectedEvent",
    "advance",
    "continue_plain",
    "error_info",
    "finish_effect",
    "mark_resumed",
    "plain_returned",
    "skip_plain",
    "start",
)

_MASK = (1 << 64) - 1
_DEFAULTS = tuple(
    (cls, pol.max_retries, pol.backoff_seconds) for cls, pol in default_policy_map().items()
)


class UnexpectedEvent(StromaError, ValueError):
    """An event arrived that the machine was not waiting for (a broken interpreter or log)."""


@attrs.frozen
class MachineConfig:
    """What the machine needs to know about a run, as plain values."""

    run_id: str
    seed: int
    started_at: datetime
    max_tokens: int | None = None
    max_cost_usd: float | None = None
    max_latency_ms: int | None = None
    policy_map: tuple[tuple[FailureClass, int, float], ...] = ()
    custom_classifiers: bool = False
    hooks: frozenset[str] = frozenset()
    fallbacks: tuple[FallbackPolicy, ...] = attrs.field(default=(), eq=False)
    declared_model: str | None = None
    resume_from: str | None = None
    node_timeouts: dict[str, int] = attrs.field(factory=dict, hash=False)
    node_policies: dict[str, tuple[tuple[FailureClass, int, float], ...]] = attrs.field(
        factory=dict, hash=False
    )
    # Totals already spent before this run starts (a middleware context's earlier steps):
    # the run's running totals start here, so budgets and fallbacks see the cumulative spend.
    base_tokens: int = 0
    base_cost_usd: float = 0.0
    base_latency_ms: int = 0

    # Derived once: whether any budget is set, and whether the run is "plain" (no budget,
    # hooks, model fallbacks or timeout overrides), which lets a node's success go
    # straight to the next node's call.
    budgeted: bool = attrs.field(init=False, eq=False, repr=False)
    plain: bool = attrs.field(init=False, eq=False, repr=False)
    budget: ExecutionBudget | None = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        budgeted = not (self.max_tokens is None and self.max_cost_usd is None
                        and self.max_latency_ms is None)
        object.__setattr__(self, "budgeted", budgeted)
        object.__setattr__(self, "budget", ExecutionBudget(
            max_tokens_total=self.max_tokens, max_cost_usd=self.max_cost_usd,
            max_latency_ms=self.max_latency_ms,
        ) if budgeted else None)
        object.__setattr__(
            self, "plain",
            not (budgeted or self.hooks or self.fallbacks or self.node_timeouts),
        )

    def to_json(self) -> dict[str, Any]:
        """The decision-making part of the config, for the log header."""
        data = self._to_json()
        if self.base_tokens or self.base_cost_usd or self.base_latency_ms:
            data["base"] = [self.base_tokens, self.base_cost_usd, self.base_latency_ms]
        return data

    def _to_json(self) -> dict[str, Any]:
        return {
            "budget": [self.max_tokens, self.max_cost_usd, self.max_latency_ms],
            "policy_map": [[c.value, r, b] for c, r, b in self.policy_map],
            "node_policies": {
                k: [[c.value, r, b] for c, r, b in v] for k, v in self.node_policies.items()
            },
            "node_timeouts": dict(self.node_timeouts),
            "classifiers": self.custom_classifiers,
            "hooks": sorted(self.hooks),
            "fallbacks": [
                [f.preferred_model, f.fallback_model, f.at_budget_pct] for f in self.fallbacks
            ],
            "model": self.declared_model,
            "resume_from": self.resume_from,
        }

    @classmethod
    def from_json(
        cls, data: Mapping[str, Any], *, run_id: str, seed: int, started_at: datetime
    ) -> MachineConfig:
        def table(rows: Any) -> tuple[tuple[FailureClass, int, float], ...]:
            return tuple((FailureClass(c), int(r), float(b)) for c, r, b in rows)

        tokens, cost, latency = data.get("budget") or [None, None, None]
        base_tokens, base_cost, base_latency = data.get("base") or [0, 0.0, 0]
        return cls(
            run_id=run_id,
            seed=seed,
            started_at=started_at,
            max_tokens=tokens,
            max_cost_usd=cost,
            max_latency_ms=latency,
            policy_map=table(data.get("policy_map") or ()),
            custom_classifiers=bool(data.get("classifiers")),
            hooks=frozenset(data.get("hooks") or ()),
            fallbacks=tuple(
                FallbackPolicy(preferred_model=p, fallback_model=f, at_budget_pct=pct)
                for p, f, pct in data.get("fallbacks") or ()
            ),
            declared_model=data.get("model"),
            resume_from=data.get("resume_from"),
            node_timeouts={k: int(v) for k, v in (data.get("node_timeouts") or {}).items()},
            node_policies={k: table(v) for k, v in (data.get("node_policies") or {}).items()},
            base_tokens=int(base_tokens),
            base_cost_usd=float(base_cost),
            base_latency_ms=int(base_latency),
        )


class Attempt(NamedTuple):
    """The attempt in flight: what the trace and a failure need.

    A named tuple (immutable, compared by value) because one is made per attempt.
    ``input_json`` may still be the input model: its JSON form is made only when needed.
    """

    input_json: Any
    call: Any = None  # fx.CallNode | fx.CallParallel
    started_at: datetime | None = None
    duration_ms: int = 0
    tokens: int = 0
    output: BaseModel | None = None
    output_json: dict[str, Any] | None = None
    error: fx.ErrorInfo | None = None
    failure: FailureClass | None = None


@attrs.frozen(slots=False)
class RunState:
    plan: Plan
    config: MachineConfig
    phase: str
    pos: int
    attempt: int
    retries: int
    state: BaseModel = attrs.field(eq=False)
    state_json: dict[str, Any]
    tokens: int
    cost_usd: float
    latency_ms: int
    rng: int
    clock: datetime
    resumed: bool = False
    current: Attempt | None = None

    @property
    def step(self) -> Any:
        return self.plan.program[self.pos]


Out = tuple[RunState, list[Any]]


def _next(s: RunState, phase: str, current: Attempt | None, **changes: Any) -> RunState:
    """``attrs.evolve`` for the hot path: a copy of the state's fields with some replaced.

    RunState keeps its fields in a ``__dict__`` so that this is one C-level dict copy
    instead of a constructor call that sets every field.
    """
    new = object.__new__(RunState)
    d = new.__dict__
    d.update(s.__dict__)
    d["phase"] = phase
    d["current"] = current
    if changes:
        d.update(changes)
    return new


# ----------------------------------------------------------------------------- helpers


def _error(exc: BaseException) -> fx.ErrorInfo:
    names = tuple(f"{c.__module__}.{c.__qualname__}" for c in type(exc).__mro__)
    return fx.ErrorInfo(names, str(exc), exc)


def _validate(
    node_id: str, direction: str, schema: type[BaseModel], raw: Any
) -> BaseModel | ContractViolation:
    if type(raw) is schema:
        return raw
    try:
        if isinstance(raw, BaseModel):
            return schema.model_validate(raw, from_attributes=True)
        return schema.model_validate(raw)
    except ValidationError as e:
        shown = raw if isinstance(raw, dict) else {"value": repr(raw)}
        return ContractViolation(node_id, direction, shown, e.errors(include_url=False))


def _policy(state: RunState, step: Any, cls: FailureClass) -> tuple[int, float]:
    per_node = state.config.node_policies.get(step.step_id, ())
    for table in (per_node, step.policies, state.config.policy_map, _DEFAULTS):
        for c, retries, backoff in table:
            if c is cls or c == cls:
                return retries, backoff
    return 0, 0.0


def _draw(rng: int) -> tuple[int, float]:
    """splitmix64: the next PRNG state and a float in [0, 1]."""
    rng = (rng + 0x9E3779B97F4A7C15) & _MASK
    z = rng
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    z ^= z >> 31
    return rng, z / _MASK


def _timeout(s: RunState, step: Any) -> int | None:
    if s.config.node_timeouts:
        ms = s.config.node_timeouts.get(step.step_id)
        if ms is not None:
            return ms
    return step.timeout_ms


def _now(s: RunState) -> datetime:
    """The run's clock: when the last thing the world reported ended."""
    c = s.clock
    return c if isinstance(c, datetime) else _end(*c)


def _state_json(s: RunState) -> dict[str, Any]:
    return s.state_json if s.state_json is not None else s.state.model_dump(mode="json")


def _end(started_at: datetime, duration_ms: int) -> datetime:
    return started_at + timedelta(milliseconds=duration_ms)


def _finish(s: RunState, status: RunStatus, reason: str | None) -> Out:
    if status is RunStatus.COMPLETED and s.resumed:
        status = RunStatus.RESUMED
    s = attrs.evolve(s, phase="done", current=None)
    return s, [
        fx.Finish(status, s.state, s.tokens, s.cost_usd, s.latency_ms, reason)
    ]


def _spent(s: RunState) -> str | None:
    """What budget is already used up (at or over its limit), described; else None."""
    budget = s.config.budget
    hit = budget.first_spent(s.tokens, s.cost_usd, s.latency_ms) if budget else None
    if hit is None:
        return None
    dimension, limit, actual = hit
    if dimension == "cost":
        return f"cost ${actual:.6f} of ${limit:.6f}"
    if dimension == "latency":
        return f"latency {actual} ms of {limit} ms"
    return f"{dimension} {actual} of {limit}"


def _exceeded(s: RunState, node_id: str) -> BudgetExceeded | None:
    budget = s.config.budget
    hit = budget.first_exceeded(s.tokens, s.cost_usd, s.latency_ms) if budget else None
    return None if hit is None else BudgetExceeded(*hit, node_id)


def _fallback_model(s: RunState) -> str | None:
    c = s.config
    if not c.fallbacks or c.max_cost_usd is None:
        return None
    fb = fallback_for(s.cost_usd, c.budget, c.fallbacks, c.declared_model)
    return fb.fallback_model if fb is not None else None


# ------------------------------------------------------------------------------ start


def start(plan: Plan, initial_state: BaseModel, config: MachineConfig) -> Out:
    """The first state of a run and its first effects."""
    if not isinstance(initial_state, BaseModel):
        raise TypeError(
            "initial_state must be a pydantic BaseModel instance (got "
            f"{type(initial_state).__name__}): wrap it, e.g. Input(**data)"
        )
    s = RunState(
        plan=plan,
        config=config,
        phase="start",
        pos=0,
        attempt=1,
        retries=0,
        state=initial_state,
        state_json=initial_state.model_dump(mode="json"),
        tokens=config.base_tokens,
        cost_usd=config.base_cost_usd,
        latency_ms=config.base_latency_ms,
        rng=config.seed & _MASK,
        clock=config.started_at,
    )
    target = config.resume_from
    if target is None:
        return _begin_step(s)
    ids = [ins.step_id for ins in plan.program if not isinstance(ins, Choose | Jump)]
    if target not in ids:
        return _finish(
            s, RunStatus.PARTIAL,
            f"resume_from={target!r} is not a step of this pipeline (its steps: "
            f"{', '.join(map(repr, ids)) or 'none'}); nothing was run",
        )
    k = next(i for i, ins in enumerate(plan.program)
             if ins.step_id == target and not isinstance(ins, Choose | Jump))
    before = _unit_before(plan, k)
    if before is None:
        return _begin_step(attrs.evolve(s, pos=k, resumed=True))
    s = attrs.evolve(s, phase="load", pos=k, resumed=True)
    return s, [fx.LoadCheckpoint(before.step_id, before.output_schema)]


def _unit_before(plan: Plan, pc: int) -> Any:
    """The step (not a branch instruction) that runs just before program position pc."""
    for ins in reversed(plan.program[:pc]):
        if not isinstance(ins, Choose | Jump):
            return ins
    return None


def _on_loaded(s: RunState, ev: fx.CheckpointLoaded) -> Out:
    before = _unit_before(s.plan, s.pos)
    if ev.state is None:
        return _finish(
            s, RunStatus.PARTIAL,
            f"cannot resume run {s.config.run_id!r} from {s.step.step_id!r}: there is no "
            f"checkpoint of {before.step_id!r} in the store",
        )
    state = _validate(before.step_id, "output", before.output_schema, ev.state)
    if isinstance(state, ContractViolation):
        return _finish(s, RunStatus.PARTIAL, f"the checkpoint does not fit its contract: {state}")
    s = attrs.evolve(s, state=state, state_json=state.model_dump(mode="json"))
    return _begin_step(s)


# --------------------------------------------------------------------------- attempts


def _begin_step(s: RunState) -> Out:
    program = s.plan.program
    while s.pos < len(program):
        ins = program[s.pos]
        if type(ins) is Jump:
            s = _next(s, "next", None, pos=ins.target)
            continue
        if type(ins) is Choose:
            return _next(s, "choose", None), [fx.ChooseBranch(ins.step_id, s.state)]
        return _begin_attempt(s)
    return _finish(s, RunStatus.COMPLETED, None)


def _on_chosen(s: RunState, ev: fx.BranchChosen) -> Out:
    ins = s.step
    assert isinstance(ins, Choose)
    if ev.error is not None:
        reason = f"the predicate of {ins.step_id!r} raised: {ev.error.short}"
        te = fx.RecordAttempt(
            ins.step_id, s.config.run_id, 1, _now(s), _state_json(s), None, 0,
            FailureClass.TERMINAL, reason,
        )
        s, effects = _finish(s, RunStatus.FAILED, reason)
        return s, [te, *effects]
    return _begin_step(_next(s, "next", None, pos=s.pos + 1 if ev.taken else ins.otherwise_pc))


def _child_config(s: RunState, index: int) -> MachineConfig:
    """A fan-out child's sub-plan runs with the run's policies, its own PRNG stream and no
    budget of its own (the group's usage counts against the run's budget when it ends)."""
    c = s.config
    seed, _ = _draw((c.seed ^ (s.pos << 20) ^ (s.attempt << 40) ^ index) & _MASK)
    return MachineConfig(
        run_id=c.run_id, seed=seed & ((1 << 63) - 1), started_at=_now(s),
        policy_map=c.policy_map, custom_classifiers=c.custom_classifiers, hooks=c.hooks,
        node_timeouts=c.node_timeouts, node_policies=c.node_policies,
    )


_SOLO: dict[int, tuple[NodeStep, Plan]] = {}


def _solo(node: NodeStep) -> Plan:
    """The one-node plan of a group's child (memoized by identity: it carries the fn)."""
    hit = _SOLO.get(id(node))
    if hit is not None and hit[0] is node:
        return hit[1]
    if len(_SOLO) >= 1024:
        _SOLO.clear()
    plan = Plan((node,))
    _SOLO[id(node)] = (node, plan)
    return plan


def _child_call(
    s: RunState, child: Any, index: int, child_id: str, raw: Any, model: str | None
) -> fx.CallNode | fx.RunPlan | ContractViolation:
    if isinstance(child, NodeStep):
        if not (child.policies or child.node_id in s.config.node_policies):
            cin = _validate(child.node_id, "input", child.input_schema, raw)
            if isinstance(cin, ContractViolation):
                return cin
            return fx.CallNode(child.node_id, s.attempt, _timeout(s, child), model, cin)
        # A child with retry policies of its own retries on its own: a one-node sub-plan.
        child = _solo(child)
    schema = child.input_schema
    cin = raw if schema is None else _validate(child_id, "input", schema, raw)
    if isinstance(cin, ContractViolation):
        return cin
    return fx.RunPlan(child_id, s.attempt, child.fingerprint, child, cin,
                      _child_config(s, index))


def _begin_attempt(s: RunState) -> Out:
    step = s.step
    spent = _spent(s) if s.config.budgeted else None
    if spent is not None:
        reason = f"budget spent ({spent}): {step.step_id!r} was not started"
        te = fx.RecordAttempt(
            step.step_id, s.config.run_id, s.attempt, _now(s), _state_json(s), None, 0,
            FailureClass.RECOVERABLE, reason,
        )
        s, effects = _finish(s, RunStatus.PARTIAL, reason)
        return s, [te, *effects]
    model = _fallback_model(s) if s.config.fallbacks else None
    if type(step) is NodeStep and type(s.state) is step.input_schema:
        # The common case: the state already is this node's input.
        call0 = fx.CallNode(step.node_id, s.attempt, _timeout(s, step), model, s.state)
        att0 = Attempt(s.state_json if s.state_json is not None else s.state, call0)
        if s.config.hooks:
            if "start" in s.config.hooks:
                return _next(s, "hook_start", att0), [
                    fx.FireHook("start", step.node_id, s.attempt, _state_json(s))
                ]
        return _next(s, "call", att0), [call0]
    if isinstance(step, NodeStep):
        inp = _validate(step.node_id, "input", step.input_schema, s.state)
        if isinstance(inp, ContractViolation):
            return _input_broken(s, step, inp)
        input_json = _state_json(s) if inp is s.state else inp.model_dump(mode="json")
        call: fx.CallNode | fx.CallParallel = fx.CallNode(
            step.node_id, s.attempt, _timeout(s, step), model, inp
        )
    elif isinstance(step, ParallelStep):
        calls: list[Any] = []
        for j, child in enumerate(step.children):
            c = _child_call(s, child, j, f"{step.step_id}[{j}]", s.state, model)
            if isinstance(c, ContractViolation):
                return _input_broken(s, step, c)
            calls.append(c)
        input_json = _state_json(s)
        call = fx.CallParallel(
            step.step_id, s.attempt, tuple(calls), step.max_concurrency, _timeout(s, step)
        )
    else:
        assert isinstance(step, MapStep)
        inp = _validate(step.step_id, "input", step.input_schema, s.state)
        if isinstance(inp, ContractViolation):
            return _input_broken(s, step, inp)
        items = getattr(inp, step.over)
        calls = []
        for j, item in enumerate(items):
            raw = item if isinstance(item, BaseModel | dict) else {"item": item}
            c = _child_call(s, step.body, j, f"{step.step_id}[{j}]", raw, model)
            if isinstance(c, ContractViolation):
                return _input_broken(s, step, c)
            calls.append(c)
        input_json = _state_json(s) if inp is s.state else inp.model_dump(mode="json")
        call = fx.CallParallel(
            step.step_id, s.attempt, tuple(calls), step.max_concurrency, _timeout(s, step),
            "map",
        )
    att = Attempt(input_json, call)
    if "start" in s.config.hooks:
        s = _next(s, "hook_start", att)
        return s, [fx.FireHook("start", step.step_id, s.attempt, input_json)]
    return _next(s, "call", att), [call]


def _input_broken(s: RunState, step: Any, violation: ContractViolation) -> Out:
    """The input breaks the contract: the attempt fails without calling the node, after
    the start hook (so an attempt's hooks always come as start, then success or failure)."""
    error = _error(violation)
    att = Attempt(_state_json(s), started_at=_now(s), error=error)
    if "start" in s.config.hooks:
        return _next(s, "hook_start", att), [
            fx.FireHook("start", step.step_id, s.attempt, _state_json(s))
        ]
    return _failed(_next(s, s.phase, att), error)


def _on_hook_start(s: RunState, ev: fx.HookFired) -> Out:
    att = s.current
    assert att is not None
    if att.call is None:  # the input broke its contract: fail the attempt, call nothing
        assert att.error is not None
        return _failed(s, att.error)
    return _next(s, "call", att), [att.call]


def _price(call_model: str | None, ev: fx.NodeReturned) -> tuple[int, float]:
    tokens = ev.input_tokens + ev.output_tokens
    if not tokens:
        return 0, 0.0
    return tokens, estimate_cost_usd(call_model or ev.model, ev.input_tokens, ev.output_tokens)


def plain_returned(
    s: RunState, output: Any, started_at: datetime, duration_ms: int
) -> tuple[RunState, BaseModel, NodeStep | None] | None:
    """A node returned ``output`` (no usage reported) in a plain run: the plain lane.

    When the output keeps its contract this is the whole decision, and it is the same one
    ``advance`` makes for ``NodeReturned``: record the attempt, save the checkpoint, go on.
    Returns the next state, the validated output and the next node when the machine calls
    it straight away (a plain success's effects are then ``RecordAttempt``,
    ``SaveCheckpoint`` and ``CallNode(next.node_id, 1, None, None, output)``); with no such
    node, what follows is ``continue_plain(state)``. Returns None where the general path
    must decide (a run that is not plain, an output that breaks its contract).
    """
    c = s.config
    if not c.plain:
        return None
    pos = s.pos
    program = s.plan.program
    step: Any = program[pos]
    try:
        out = step.output_schema.__pydantic_validator__.validate_python(output)
    except ValidationError:
        return None  # the general path reports the violation
    pos += 1
    nxt: Any = program[pos] if pos < len(program) else None
    if type(nxt) is NodeStep and type(out) is nxt.input_schema and nxt.timeout_ms is None:
        return _next(
            s, "call", Attempt(out), pos=pos, attempt=1, retries=0, state=out,
            state_json=None, latency_ms=s.latency_ms + duration_ms,
            clock=(started_at, duration_ms),
        ), out, nxt
    return _next(
        s, "next", None, pos=pos, attempt=1, retries=0, state=out, state_json=None,
        latency_ms=s.latency_ms + duration_ms, clock=(started_at, duration_ms),
    ), out, None


def continue_plain(s: RunState) -> Out:
    """The effects after a plain success that ``plain_returned`` gave no next node for."""
    return _begin_step(s)


def skip_plain(
    s: RunState,
    node_ids: Sequence[str],
    attempts: Sequence[int],
    durations: Sequence[int],
    last: tuple[Any, datetime],
) -> Out | int:
    """Replay a recorded chain of plain successes at once: nodes ``node_ids`` returned one
    after the other, each straight into the next, with no usage reported.

    It is the same as feeding each ``NodeReturned`` to ``advance`` when the recorded outputs
    keep their contracts, as they did when recorded (the plan's fingerprint, which covers
    the contracts, is checked before any record is replayed): every node id, attempt and
    the way each node follows the last is checked against the plan, and the last node's
    raw ``output`` (``last``: output and start time) is validated. Returns the state and
    effects after the chain, or the index of the first node that the machine would not
    reach this way (replay then goes through that one by ``advance``).
    """
    k = len(node_ids)
    pos = s.pos
    plan = s.plan
    if not (s.config.plain and k and s.phase == "call"):
        return 0
    # The common case in a few C-level comparisons; on any difference, find the node.
    if (tuple(node_ids) != plan.lane_ids[pos:pos + k] or attempts[0] != s.attempt
            or not all(plan.lane_direct[pos + 1:pos + k])
            or list(attempts[1:]).count(1) != k - 1):
        for m in range(k):
            expected = s.attempt if m == 0 else 1
            if (plan.lane_ids[pos + m:pos + m + 1] != (node_ids[m],)
                    or attempts[m] != expected
                    or (m and not plan.lane_direct[pos + m])):
                return m
    if k > 1:
        s = _next(s, "call", None, pos=pos + k - 1, attempt=1, retries=0,
                  latency_ms=s.latency_ms + sum(durations[:k - 1]))
    output, started_at = last
    done = plain_returned(s, output, started_at, durations[k - 1])
    if done is None:
        return k - 1
    s, out, nxt = done
    if nxt is not None:
        return s, [fx.CallNode(nxt.node_id, 1, None, None, out)]
    return _begin_step(s)


def _on_returned(s: RunState, ev: fx.NodeReturned) -> Out:
    step: Any = s.plan.program[s.pos]
    att: Any = s.current
    c = s.config
    if c.plain and not (ev.input_tokens or ev.output_tokens):
        done = plain_returned(s, ev.output, ev.started_at, ev.duration_ms)
        if done is not None:
            ns, out, nxt = done
            record = fx.RecordAttempt(step.node_id, c.run_id, s.attempt, ev.started_at,
                                      att.input_json, out, ev.duration_ms)
            save = fx.SaveCheckpoint(step.node_id, out)
            if nxt is not None:
                return ns, [record, save, fx.CallNode(nxt.node_id, 1, None, None, out)]
            ns, effects = _begin_step(ns)
            return ns, [record, save, *effects]
    if ev.input_tokens or ev.output_tokens:
        tokens, cost = _price(att.call.model if att.call is not None else None, ev)
    else:
        tokens, cost = 0, 0.0
    checked = _validate(step.node_id, "output", step.output_schema, ev.output)
    s = _next(
        s, s.phase, Attempt(att.input_json, att.call, ev.started_at, ev.duration_ms, tokens),
        tokens=s.tokens + tokens,
        cost_usd=s.cost_usd + cost,
        latency_ms=s.latency_ms + ev.duration_ms,
        clock=(ev.started_at, ev.duration_ms),
    )
    return _succeeded(s, checked)


def _on_parallel(s: RunState, ev: fx.ParallelReturned) -> Out:
    step = s.step
    att = s.current
    assert isinstance(step, ParallelStep | MapStep) and att is not None
    assert isinstance(att.call, fx.CallParallel)
    calls = att.call.calls
    if len(ev.outcomes) != len(calls):
        raise UnexpectedEvent(
            f"{step.step_id}: {len(ev.outcomes)} outcomes for {len(calls)} children"
        )
    tokens, cost = 0, 0.0
    for call, outcome in zip(calls, ev.outcomes, strict=True):
        if type(outcome) is fx.NodeReturned:
            t, c = _price(call.model if type(call) is fx.CallNode else None, outcome)
            tokens, cost = tokens + t, cost + c
        elif type(outcome) is fx.PlanFinished:
            tokens, cost = tokens + outcome.total_tokens, cost + outcome.total_cost_usd
    s = attrs.evolve(
        s,
        tokens=s.tokens + tokens,
        cost_usd=s.cost_usd + cost,
        latency_ms=s.latency_ms + ev.duration_ms,
        clock=_end(ev.started_at, ev.duration_ms),
        current=att._replace(started_at=ev.started_at, duration_ms=ev.duration_ms,
                             tokens=tokens),
    )
    children = step.children if isinstance(step, ParallelStep) else [step.body] * len(calls)
    outputs: list[dict[str, Any]] = []
    first_error: fx.ErrorInfo | None = None
    for child, call, outcome in zip(children, calls, ev.outcomes, strict=True):
        if isinstance(outcome, fx.NodeRaised):
            first_error = first_error or outcome.error
        elif isinstance(outcome, fx.NodeCancelled):
            continue
        elif isinstance(outcome, fx.PlanFinished):
            if outcome.status not in (RunStatus.COMPLETED, RunStatus.RESUMED):
                if first_error is None:
                    first_error = _child_failure(call, outcome)
            elif first_error is None:
                outputs.append(outcome.output)
        elif first_error is None:
            node: Any = child
            out = _validate(node.node_id, "output", node.output_schema, outcome.output)
            if isinstance(out, ContractViolation):
                first_error = _error(out)
            else:
                # What the child returned (or set explicitly), never its schema's defaults:
                # a later child's default must not overwrite an earlier child's value.
                outputs.append(out.model_dump(exclude_unset=True))
    if first_error is None and len(outputs) != len(calls):
        first_error = fx.ErrorInfo(
            ("anyio.Cancelled", "builtins.BaseException"), "children were cancelled"
        )
    if first_error is not None:
        return _failed(s, first_error)
    if isinstance(step, MapStep):
        base = s.state.model_dump()
        base[step.into] = outputs
        return _succeeded(s, _validate(step.step_id, "output", step.output_schema, base))
    merged: dict[str, Any] = {}
    for out_dict in outputs:
        merged.update(out_dict)
    return _succeeded(s, _validate(step.step_id, "output", step.output_schema, merged))


def _child_failure(call: Any, outcome: fx.PlanFinished) -> fx.ErrorInfo:
    terminal = outcome.status is RunStatus.FAILED
    names = (
        ("stroma.errors.ChildFailedTerminally", "stroma.errors.ChildFailed")
        if terminal else ("stroma.errors.ChildFailed",)
    ) + ("stroma.errors.StromaError", "builtins.Exception")
    label = getattr(call, "child_id", getattr(call, "node_id", "?"))
    return fx.ErrorInfo(names, f"{label} {outcome.status}: {outcome.reason}")


def _succeeded(s: RunState, out: BaseModel | ContractViolation) -> Out:
    """The attempt's output is valid: record it, save it, and go on to what follows.

    The checkpoint is saved before anything that follows it in the effects (the success
    hook, the next step), and the machine does not wait for its answer.
    """
    if isinstance(out, ContractViolation):
        return _failed(s, _error(out))
    step = s.step
    c = s.config
    if c.budgeted:
        over = _exceeded(s, step.step_id)
        if over is not None:
            return _failed(s, _error(over))
    att = s.current
    assert att is not None and att.started_at is not None
    record = fx.RecordAttempt(
        step.step_id, c.run_id, s.attempt, att.started_at, att.input_json, out, att.duration_ms,
    )
    save = fx.SaveCheckpoint(step.step_id, out)
    if "success" in c.hooks:
        out_json = out.model_dump(mode="json")
        hook = fx.FireHook("success", step.step_id, s.attempt, out_json, att.tokens)
        s = _next(s, "hook_ok", att, state=out, state_json=out_json, pos=s.pos + 1,
                  attempt=1, retries=0)
        return s, [record, save, hook]
    s, effects = _begin_step(_next(s, "next", None, state=out, state_json=None,
                                   pos=s.pos + 1, attempt=1, retries=0))
    return s, [record, save, *effects]


def _on_hook_ok(s: RunState, ev: fx.HookFired) -> Out:
    return _begin_step(_next(s, "next", None))


# ---------------------------------------------------------------------------- failures


def _on_raised(s: RunState, ev: fx.NodeRaised) -> Out:
    att = s.current
    assert att is not None
    s = attrs.evolve(
        s,
        latency_ms=s.latency_ms + ev.duration_ms,
        clock=_end(ev.started_at, ev.duration_ms),
        current=att._replace(started_at=ev.started_at, duration_ms=ev.duration_ms),
    )
    return _failed(s, ev.error)


def _failed(s: RunState, error: fx.ErrorInfo) -> Out:
    att = s.current
    assert att is not None
    s = attrs.evolve(s, current=att._replace(error=error))
    if s.config.custom_classifiers:
        s = attrs.evolve(s, phase="classify")
        return s, [fx.ClassifyFailure(s.step.step_id, s.attempt, error)]
    return _classified(s, builtin_class_for_names(error.type_names))


def _on_classified(s: RunState, ev: fx.FailureClassified) -> Out:
    assert s.current is not None and s.current.error is not None
    cls = ev.failure
    if cls is None:
        cls = builtin_class_for_names(s.current.error.type_names)
    return _classified(s, FailureClass(cls))


def _classified(s: RunState, cls: FailureClass) -> Out:
    att = s.current
    assert att is not None and att.error is not None
    step = s.step
    message = att.error.message or att.error.type_name.rsplit(".", 1)[-1]
    te = fx.RecordAttempt(
        step.step_id, s.config.run_id, s.attempt, att.started_at or _now(s), att.input_json,
        None, att.duration_ms, cls, message,
    )
    s = attrs.evolve(s, current=att._replace(failure=cls))
    if "failure" in s.config.hooks:
        s = attrs.evolve(s, phase="hook_fail")
        return s, [te,
                   fx.FireHook("failure", step.step_id, s.attempt, None, 0, cls, att.error)]
    s, effects = _decide(s)
    return s, [te, *effects]


def _on_hook_fail(s: RunState, ev: fx.HookFired) -> Out:
    return _decide(s)


def _decide(s: RunState) -> Out:
    att = s.current
    assert att is not None and att.failure is not None and att.error is not None
    step = s.step
    cls = att.failure
    if cls is FailureClass.TERMINAL:
        return _finish(
            s, RunStatus.FAILED,
            f"{step.step_id!r} failed with a terminal error on attempt {s.attempt}: "
            f"{att.error.short}",
        )
    max_retries, backoff = _policy(s, step, cls)
    if s.retries >= max_retries:
        return _finish(
            s, RunStatus.PARTIAL,
            f"{step.step_id!r} gave up after {s.attempt} attempt(s) ({cls} allows "
            f"{max_retries} retries): {att.error.short}",
        )
    s = attrs.evolve(s, attempt=s.attempt + 1, retries=s.retries + 1, current=None)
    if backoff > 0:
        rng, u = _draw(s.rng)
        delay = u * backoff
        s = attrs.evolve(s, rng=rng, phase="sleep")
        return s, [fx.Sleep(delay)]
    return _begin_attempt(s)


def _on_slept(s: RunState, ev: fx.Slept) -> Out:
    return _begin_attempt(attrs.evolve(s, clock=_now(s) + timedelta(seconds=ev.seconds)))


# ---------------------------------------------------------------------------- advance

_Handler = Callable[[RunState, Any], Out]
_TABLE: Mapping[str, Mapping[type, _Handler]] = {
    "load": {fx.CheckpointLoaded: _on_loaded},
    "hook_start": {fx.HookFired: _on_hook_start},
    "call": {
        fx.NodeReturned: _on_returned,
        fx.NodeRaised: _on_raised,
        fx.ParallelReturned: _on_parallel,
    },
    "classify": {fx.FailureClassified: _on_classified},
    "hook_fail": {fx.HookFired: _on_hook_fail},
    "sleep": {fx.Slept: _on_slept},
    "hook_ok": {fx.HookFired: _on_hook_ok},
    "choose": {fx.BranchChosen: _on_chosen},
    "done": {},
}


def advance(state: RunState, event: Any) -> Out:
    """The next state and effects, given the event that answered the last effect."""
    handler = _TABLE[state.phase].get(type(event))
    if handler is None:
        expected: Sequence[str] = [t.__name__ for t in _TABLE[state.phase]] or ["nothing"]
        raise UnexpectedEvent(
            f"can't handle event {type(event).__name__} in phase {state.phase!r} "
            f"(step {state.pos}, attempt {state.attempt}); expected {' or '.join(expected)}"
        )
    return handler(state, event)


def finish_effect(state: RunState, status: RunStatus, reason: str | None) -> fx.Finish:
    """The Finish the machine makes for ``state``: a completed run that was resumed
    finishes RESUMED (for an interpreter that resumed while a Finish was pending)."""
    finish = _finish(state, status, reason)[1][0]
    assert isinstance(finish, fx.Finish)
    return finish


def mark_resumed(state: RunState) -> RunState:
    """The same state, in a run that was picked up again after a crash."""
    return attrs.evolve(state, resumed=True)


def error_info(exc: BaseException) -> fx.ErrorInfo:
    """An exception as data, for interpreters building NodeRaised / HookFired events."""
    return _error(exc)
