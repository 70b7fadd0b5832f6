"""The run machine: every decision of a run, as a pure function.

Theory of operation
-------------------
``start(plan, initial_state, config)`` gives the first ``RunState`` and effects;
``advance(state, event)`` takes the event that answered the last effect and gives the
next state and effects. The machine never performs anything: interpreters do, and feed
back what happened. Time, durations, node outputs, exceptions, what user classifiers
answered and where a crashed run was picked up again only ever arrive as event fields;
jitter comes from a PRNG whose seed is in the config (and the log header), so the same
events always give the same effects. A live run and its replay are the same calls of
``advance``: replay only takes the events from the log.

The state's ``phase`` (a ``Phase``) says which event it waits for:

=========== ================================= =========================================
phase       waits for (answering ...)         then
=========== ================================= =========================================
LOAD        CheckpointLoaded                  begin the resume step, or PARTIAL
HOOK_START  HookFired (FireHook start)        CallNode / CallParallel
CALL        NodeReturned | NodeRaised         success: Commit, then FireHook success or
            | ParallelReturned                the next step's effects; failure:
                                              ClassifyFailure, or classified at once
CLASSIFY    FailureClassified                 RecordAttempt, FireHook failure or decide
HOOK_FAIL   HookFired (FireHook failure)      decide: Finish, Sleep or the next attempt
SLEEP       Slept                             the next attempt
HOOK_OK     HookFired (FireHook success)      the next step
CHOOSE      BranchChosen                      the branch's arm
DONE        nothing                           (a Finish was emitted)
=========== ================================= =========================================

In every phase but DONE the machine also takes ``Resumed``: the log of a crashed run
ended there, and the effects it had not recorded (``Resumed.pending``) are performed
live; the machine answers with them as they must be performed now (a Finish says
RESUMED, a node gets its input), and the run's status becomes RESUMED.

The effects of one step come as a list, performed in order. ``Commit``,
``RecordAttempt`` and ``Finish`` need no answer; the last effect of a list is the one
whose answer the machine waits for, unless the list ends with ``Finish``. A node's
success is one transition: ``Commit`` (its trace record and checkpoint, durable
together) and the next node's ``CallNode``; the checkpoint is committed before the next
node starts.

An attempt begins with two checks: a budget already spent stops the run (PARTIAL, and
the trace says why) before the node starts; an input that breaks the contract fails the
attempt without calling the node (after the start hook, which every attempt that is not a
budget stop gets). A node that returns after its timeout has timed out all the same (a
node that blocks the event loop cannot be cancelled, only caught when it returns). An
output that keeps its contract but cannot be written as JSON fails the attempt
(``StateNotSerializable``), and so does a ``NodeReturned`` whose output is an
``ErrorInfo``: the live loop answers with one when the log cannot hold what the node
returned, so that the machine decides on what the log records. Running totals are kept
in the state, never recomputed from history, so a step costs the same at node 10 and at
node 10,000. Hook errors are recorded and change nothing.

Groups (``parallel``, ``map_each``) are one step: one ``CallParallel`` with a call per
child, answered by one ``ParallelReturned`` with every child's outcome. The first child
that failed (in argument order) fails the group's attempt; children
that succeeded are kept, so a retry of the group runs only the others, and a sub-plan
child that was cancelled goes on from its own log. A sub-plan child that ran out of its
own retries (or failed terminally) ends the group without a group retry: its nodes'
retries are counted once over the whole run.

The state of a run need not be a model at every step: after a replayed success it is
the output's JSON text (``state_json``) and its schema, made into a model only where a
decision needs one (a group's children, a branch, the end of the run, going live).
"""

from __future__ import annotations

import enum
import functools
import hashlib
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import attrs
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticSerializationError, from_json, to_json, to_jsonable_python

from stroma import effects as fx
from stroma.contracts import ContractViolation
from stroma.cost import (
    SPEND_SLACK,
    BudgetExceeded,
    ExecutionBudget,
    FallbackPolicy,
    _ZeroLimitSpentBudget,
    estimate_cost_usd,
)
from stroma.cost import fallback_for as _fallback_for
from stroma.errors import PlanError, StateNotSerializable, StromaError, StromaTypeError
from stroma.failures import (
    FailureClass,
    FailurePolicy,
    builtin_class_for_names,
    decide_class,
    resolve_policy,
)
from stroma.plan import (
    CONTROL,
    Choose,
    Jump,
    LoopEnd,
    LoopStart,
    MapStep,
    NodeStep,
    ParallelStep,
    Plan,
    RouteTo,
    WaitGroup,
    WaitStep,
)
from stroma.schemas import (
    EXACT_SCHEMAS,
    _schema_ref,
    first_error,
    read_state,
    reads_back,
    serialization_problem,
    state_json,
)
from stroma.trace import RunStatus
from stroma.values import named_value

__all__ = (
    "DEFAULT_HOOK_TIMEOUT_MS",
    "Attempt",
    "Coords",
    "GroupProgress",
    "MachineConfig",
    "Out",
    "Phase",
    "PolicyTable",
    "RunState",
    "UnexpectedEvent",
    "advance",
    "child_fails",
    "child_added",
    "child_spend",
    "error_info",
    "failed_child",
    "group_budget_spent",
    "idempotency_key",
    "input_key",
    "start",
)

_MASK = (1 << 64) - 1
DEFAULT_HOOK_TIMEOUT_MS = 10_000
"""How long a hook may run before it is cancelled (a hook error that changes nothing)."""


class UnexpectedEvent(StromaError, ValueError):
    """An event arrived that the machine was not waiting for (a broken interpreter or log)."""


class Phase(enum.Enum):
    """What the machine waits for (see the table in the module's docstring)."""

    LOAD = "load"
    HOOK_START = "hook_start"
    CALL = "call"
    CLASSIFY = "classify"
    HOOK_FAIL = "hook_fail"
    SLEEP = "sleep"
    HOOK_OK = "hook_ok"
    CHOOSE = "choose"
    ROUTE = "route"
    WAIT = "wait"
    NEXT = "next"  # between steps, inside one transition (never waited in)
    DONE = "done"


# The phases the hot path sets, as module globals (an enum member read from its class
# costs more than a global).
_CALL, _CHOOSE, _HOOK_START, _HOOK_OK, _NEXT, _ROUTE, _WAIT = (
    Phase.CALL, Phase.CHOOSE, Phase.HOOK_START, Phase.HOOK_OK, Phase.NEXT, Phase.ROUTE,
    Phase.WAIT,
)
Coords = tuple[tuple[str, str, int], ...]
_CONTROL = frozenset({Jump, LoopStart, LoopEnd, RouteTo, Choose})  # instructions, not steps

PolicyTable = tuple[tuple[FailureClass, int, float], ...]


def _policies(table: PolicyTable) -> dict[FailureClass, FailurePolicy]:
    return {c: FailurePolicy(max_retries=r, backoff_seconds=b) for c, r, b in table}


@attrs.frozen
class MachineConfig:
    """What the machine needs to know about a run, as plain values."""

    run_id: str
    seed: int
    started_at: datetime
    max_tokens: int | None = None
    max_cost_usd: float | None = None
    max_latency_ms: int | None = None
    policy_map: PolicyTable = ()
    custom_classifiers: bool = False
    hooks: frozenset[str] = frozenset()
    fallbacks: tuple[FallbackPolicy, ...] = attrs.field(default=(), eq=False)
    declared_model: str | None = None
    resume_from: str | None = None
    node_timeouts: dict[str, int] = attrs.field(factory=dict, hash=False)
    node_policies: dict[str, PolicyTable] = attrs.field(factory=dict, hash=False)
    hook_timeout_ms: int | None = DEFAULT_HOOK_TIMEOUT_MS
    # The model prices the run began with (USD per 1M input / output tokens), which its
    # log keeps; None: KNOWN_MODELS as it is (a log written before prices were kept).
    prices: Mapping[str, tuple[float, float]] | None = attrs.field(
        default=None, eq=False, hash=False, repr=False)
    # Totals already spent before this run starts (a middleware context's earlier steps):
    # the run's running totals start here, so budgets and fallbacks see the cumulative spend.
    base_tokens: int = 0
    base_cost_usd: float = 0.0
    base_latency_ms: int = 0
    # Where a fan-out child's sub-plan runs (the loops and map items around it); () for a
    # run (a child's config is the machine's own making, never in a log header).
    coords: Coords = ()
    # A zero limit is spent from the start, as logs written before it waited for some use
    # read it (their header says nothing of it; see to_json).
    zero_limit_spent: bool = False

    # Derived once: the budget (None without limits) and the policies as FailurePolicy
    # values, which is what ``resolve_policy`` takes.
    budget: ExecutionBudget | None = attrs.field(init=False, eq=False, repr=False)
    policies: dict[FailureClass, FailurePolicy] = attrs.field(init=False, eq=False, repr=False)
    per_node: dict[str, dict[FailureClass, FailurePolicy]] = attrs.field(
        init=False, eq=False, repr=False
    )
    # The least share of the cost limit at which a fallback can apply (None: none can):
    # below it ``fallback_for`` answers None, so it is not asked.
    fallback_pct: float | None = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        budgeted = not (self.max_tokens is None and self.max_cost_usd is None
                        and self.max_latency_ms is None)
        kind = _ZeroLimitSpentBudget if self.zero_limit_spent else ExecutionBudget
        object.__setattr__(self, "budget", kind(
            max_tokens_total=self.max_tokens, max_cost_usd=self.max_cost_usd,
            max_latency_ms=self.max_latency_ms,
        ) if budgeted else None)
        object.__setattr__(self, "policies", _policies(self.policy_map))
        object.__setattr__(self, "per_node", {
            k: _policies(v) for k, v in self.node_policies.items()
        })
        pcts = [f.at_budget_pct for f in self.fallbacks if self.declared_model is None
                or f.preferred_model == self.declared_model]
        object.__setattr__(self, "fallback_pct", min(pcts) if pcts and self.max_cost_usd
                           is not None else None)

    def to_json(self) -> dict[str, Any]:
        """The decision-making part of the config, for the log header."""
        data: dict[str, Any] = {
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
        if self.hook_timeout_ms != DEFAULT_HOOK_TIMEOUT_MS:
            data["hook_timeout_ms"] = self.hook_timeout_ms
        if 0 in (self.max_tokens, self.max_cost_usd, self.max_latency_ms):
            data["zero_limit_spent"] = self.zero_limit_spent  # (absent: as logs before)
        if self.base_tokens or self.base_cost_usd or self.base_latency_ms:
            data["base"] = [self.base_tokens, self.base_cost_usd, self.base_latency_ms]
        if self.prices is not None:
            data["prices"] = {m: list(p) for m, p in sorted(self.prices.items())}
        return data

    @classmethod
    def from_json(
        cls, data: Mapping[str, Any], *, run_id: str, seed: int, started_at: datetime
    ) -> MachineConfig:
        """The config a log header recorded (see ``to_json``). A value of the wrong shape
        raises TypeError, ValueError or KeyError (the log reader makes it LogCorrupted)."""

        def table(rows: Any) -> PolicyTable:
            return tuple((FailureClass(c), _count(r), _seconds(b)) for c, r, b in rows)

        tokens, cost, latency = data.get("budget") or [None, None, None]
        base_tokens, base_cost, base_latency = data.get("base") or [0, 0.0, 0]
        hook_timeout = data.get("hook_timeout_ms", DEFAULT_HOOK_TIMEOUT_MS)
        prices = data.get("prices")
        return cls(
            run_id=run_id,
            seed=seed,
            started_at=started_at,
            max_tokens=None if tokens is None else _count(tokens),
            max_cost_usd=None if cost is None else _seconds(cost),
            max_latency_ms=None if latency is None else _count(latency),
            policy_map=table(data.get("policy_map") or ()),
            custom_classifiers=bool(data.get("classifiers")),
            hooks=frozenset(_text(h) for h in data.get("hooks") or ()),
            fallbacks=tuple(
                FallbackPolicy(preferred_model=_text(p), fallback_model=_text(f),
                               at_budget_pct=_seconds(pct))
                for p, f, pct in data.get("fallbacks") or ()
            ),
            declared_model=_text_or_none(data.get("model")),
            resume_from=_text_or_none(data.get("resume_from")),
            node_timeouts={_text(k): _count(v)
                           for k, v in (data.get("node_timeouts") or {}).items()},
            node_policies={_text(k): table(v)
                           for k, v in (data.get("node_policies") or {}).items()},
            hook_timeout_ms=None if hook_timeout is None else _count(hook_timeout),
            base_tokens=_count(base_tokens),
            base_cost_usd=_seconds(base_cost),
            base_latency_ms=_count(base_latency),
            prices=None if prices is None else {
                _text(m): (_seconds(i), _seconds(o)) for m, (i, o) in prices.items()},
            zero_limit_spent=bool(data.get("zero_limit_spent", 0 in (tokens, cost, latency))),
        )


def _count(value: Any) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(f"expected a non-negative integer, found {value!r}")
    return value


def _seconds(value: Any) -> float:
    if type(value) not in (int, float) or not value >= 0:
        raise ValueError(f"expected a non-negative number, found {value!r}")
    return float(value)


def _text(value: Any) -> str:
    if type(value) is not str:
        raise ValueError(f"expected a string, found {value!r}")
    return value


def _text_or_none(value: Any) -> str | None:
    return None if value is None else _text(value)


class Attempt(NamedTuple):
    """The attempt in flight: what the trace and a failure need.

    A named tuple (immutable, compared by value) because one is made per attempt.
    ``input_json`` is the JSON text of the attempt's input.
    """

    input_json: bytes
    call: Any = None  # fx.CallNode | fx.CallParallel
    started_at: datetime | None = None
    duration_ms: int = 0
    tokens: int = 0
    error: fx.ErrorInfo | None = None
    failure: FailureClass | None = None
    final: RunStatus | None = None  # a group child that ended the group: how it ended


@named_value()
class GroupProgress(NamedTuple):
    """What a group's earlier attempts achieved: outputs of the children that succeeded
    (by index), and the logs of sub-plan children that were cancelled midway (or wait for
    input) with their config and the finished children of the group they were in; and
    the usage already counted of the children that wait for input (the run stopped
    WAITING with it in its totals: when the child goes on, its totals hold it again)."""

    outputs: dict[int, Any]
    records: dict[int, tuple[tuple[Any, ...], MachineConfig, tuple[Any, ...]]]
    counted: dict[int, tuple[int, float]]


_NO_PROGRESS = GroupProgress({}, {}, {})
# Named tuples (Attempt, CallNode, Commit) made without their Python-level __new__, with
# every field given: what the hot path makes once per node.
_tuple_new = tuple.__new__


@attrs.frozen(slots=False)
class RunState:
    plan: Plan
    config: MachineConfig
    phase: Phase
    pos: int
    attempt: int
    retries: int
    # The current state: its model (None until a decision needs it, after a replayed
    # success), its JSON text and its schema.
    state: BaseModel | None = attrs.field(eq=False)
    state_json: bytes
    state_type: type[BaseModel]
    tokens: int
    cost_usd: float
    latency_ms: int
    rng: int
    clock: Any  # datetime, or (started_at, duration_ms) of the last thing that happened
    resumed: bool = False
    current: Attempt | None = None
    group: GroupProgress = _NO_PROGRESS
    # Where the run is: the config's coordinates and the iterations of the loops it is in.
    coords: Coords = ()
    # When the wait in progress first found its input missing (for its timeout).
    waiting_since: datetime | None = None

    @property
    def step(self) -> Any:
        return self.plan.program[self.pos]


Out = tuple[RunState, list[Any]]


_setattr = object.__setattr__


def _next(s: RunState, phase: Phase, current: Attempt | None, **changes: Any) -> RunState:
    """``attrs.evolve`` for the hot path: a copy of the state's fields with some replaced.

    RunState keeps its fields in a ``__dict__`` so that this is one C-level dict copy
    instead of a constructor call that sets every field.
    """
    new = object.__new__(RunState)
    d = s.__dict__.copy()
    d["phase"] = phase
    d["current"] = current
    if changes:
        d.update(changes)
    _setattr(new, "__dict__", d)
    return new


# ----------------------------------------------------------------------------- helpers


def error_info(exc: BaseException) -> fx.ErrorInfo:
    """An exception as data, for interpreters building NodeRaised / HookFired events."""
    names = tuple(f"{c.__module__}.{c.__qualname__}" for c in type(exc).__mro__)
    try:
        message = str(exc)
    except Exception as e:  # (an exception whose __str__ fails: its failure is the run's)
        message = (f"<{type(exc).__name__}: its message could not be made: "
                   f"{type(e).__name__}>")
    return fx.ErrorInfo(names, message, exc)


def _validate(
    node_id: str, direction: str, schema: type[BaseModel], raw: Any
) -> BaseModel | ContractViolation:
    if type(raw) is schema:
        return raw
    try:
        if type(raw) is dict:
            model: BaseModel = schema.__pydantic_validator__.validate_python(raw)
            return model
        if type(raw) is fx.Validated:
            return read_state(schema, raw.json)
        if isinstance(raw, BaseModel):
            # As its JSON would give it (nested models as dicts where the schema takes Any):
            # the state a run goes on with is the one its log gives a replay or a resume.
            return schema.model_validate(raw.model_dump(), from_attributes=True)
        return schema.model_validate(raw)
    except ValidationError as e:
        shown = raw if isinstance(raw, dict) else {"value": repr(raw)}
        errors: list[Any] = e.errors(include_url=False)
        if (direction == "output" and type(raw) is tuple and raw
                and isinstance(raw[0], dict | BaseModel)):
            errors = [{"type": "usage_form", "loc": (), "input": repr(raw), "msg": (
                f"the node returned a tuple of {len(raw)} that is not a way to report usage: "
                "return the output alone, (output, tokens), (output, input_tokens, model) "
                "or (output, input_tokens, output_tokens, model), with token counts that "
                "are ints >= 0 and the model's name a str")}]
        return ContractViolation(node_id, direction, shown, errors)


def _model(s: RunState) -> BaseModel:
    """The current state as a model (made from its JSON text the first time it is needed)."""
    if s.state is not None:
        return s.state
    return read_state(s.state_type, s.state_json)


def _materialized(s: RunState) -> RunState:
    if s.state is not None:
        return s
    return _next(s, s.phase, s.current, state=_model(s))


def _policy(s: RunState, step: Any, cls: FailureClass) -> FailurePolicy:
    """The retry policy for a failure of ``step``: the run's per-node override, the plan's
    ``with_retry`` for the step, the run's policy map, the defaults (``resolve_policy``)."""
    c = s.config
    node_policies = c.per_node
    if step.policies:
        mine = _policies(step.policies)
        mine.update(c.per_node.get(step.step_id, {}))
        node_policies = {**c.per_node, step.step_id: mine}
    return resolve_policy(cls, step.step_id, node_policies, c.policies)


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


def _end(started_at: datetime, duration_ms: int) -> datetime:
    return started_at + timedelta(milliseconds=duration_ms)


def _finish(s: RunState, status: RunStatus, reason: str | None) -> Out:
    if status is RunStatus.COMPLETED and s.resumed:
        status = RunStatus.RESUMED
    s = _next(s, Phase.DONE, None)
    return s, [
        fx.Finish(status, _model(s), s.tokens, s.cost_usd, s.latency_ms, reason)
    ]


def _spent(s: RunState) -> str | None:
    """What budget is already used up (at or over its limit), described; else None."""
    budget = s.config.budget
    hit = budget.first_spent(s.tokens, s.cost_usd, s.latency_ms) if budget else None
    return None if hit is None else _described(hit)


def _described(hit: tuple[str, float, float]) -> str:
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
    pct = c.fallback_pct
    if pct is None:
        return None
    limit = c.max_cost_usd
    if limit and s.cost_usd / limit < pct - SPEND_SLACK:  # (fallback_for's test, any policy)
        return None
    fb = _fallback_for(s.cost_usd, c.budget, c.fallbacks, c.declared_model)
    return fb.fallback_model if fb is not None else None


def _price(call_model: str | None, ev: fx.NodeReturned,
           prices: Mapping[str, tuple[float, float]] | None) -> tuple[int, float]:
    tokens = ev.input_tokens + ev.output_tokens
    if not tokens:
        return 0, 0.0
    return tokens, estimate_cost_usd(call_model or ev.model, ev.input_tokens,
                                     ev.output_tokens, prices=prices)


def _json(state: BaseModel) -> bytes | fx.ErrorInfo:
    """The state's JSON text, or why it cannot be written (a failed attempt)."""
    try:
        return state_json(state)
    except Exception as exc:
        problem = serialization_problem(state, exc)
    except RecursionError as exc:
        problem = serialization_problem(state, exc)
    return fx.ErrorInfo(
        ("stroma.errors.StateNotSerializable", "stroma.errors.StromaError",
         "builtins.Exception", "builtins.BaseException", "builtins.object"),
        f"the output keeps its contract but cannot be stored: {problem}; return values "
        "JSON can hold (text, not raw bytes; base64-encode binary data)",
    )


_UNSTORABLE_NAMES = (
    "stroma.errors.StateNotSerializable", "stroma.errors.StromaError", "builtins.Exception",
    "builtins.BaseException", "builtins.object",
)


def _read_back(what: str, schema: type[BaseModel], text: bytes) -> BaseModel | fx.ErrorInfo:
    """An output of a schema whose JSON may not read back as itself (``reads_back``), as
    its JSON reads back: the state a resume or a replay of the run goes on with, so the
    live run goes on with it too. Or the error the attempt fails with, when the JSON does
    not read back, or reads back as a state whose own JSON differs (a validator that
    changes the value each time it runs, a serializer that writes what no field reads):
    a resume or replay would then go on with another state than the run did."""
    try:
        back = read_state(schema, text)
        again = state_json(back)
    except (ValidationError, ValueError) as e:
        first = str(e).splitlines()
        detail = first_error(e) if isinstance(e, ValidationError) else first[0][:200]
        return fx.ErrorInfo(_UNSTORABLE_NAMES, (
            f"{what} is written as JSON that does not read back as "
            f"{schema.__name__} ({detail}), so a resume or a replay could not go on from "
            "it: make the schema read its own JSON (no computed fields with "
            "extra='forbid', no strict types JSON has no form for, no nesting deeper than "
            "JSON is read)"))
    if again == text:
        return back
    return fx.ErrorInfo(_UNSTORABLE_NAMES, (
        f"{what} does not read back as itself: its JSON reads back "
        f"as a state whose JSON differs ({_first_difference(text, again)}), so a resume "
        "or a replay would go on with another state than the run: make the schema's "
        "validators and serializers agree (a validator that changes a value each time it "
        "runs, or a serializer that writes what no field reads, does not)"))


def _first_difference(text: bytes, again: bytes) -> str:
    try:
        a, b = from_json(text), from_json(again)
    except ValueError:
        a = b = None
    if isinstance(a, dict) and isinstance(b, dict):
        for key in [*a, *(k for k in b if k not in a)]:
            if a.get(key, _ABSENT) != b.get(key, _ABSENT):
                was = "absent" if key not in a else repr(a[key])[:60]
                now = "absent" if key not in b else repr(b[key])[:60]
                return f"field {key!r}: written {was}, read back and written again {now}"
    return f"written {text[:60]!r}, read back and written again {again[:60]!r}"


_ABSENT = object()

_TIMEOUT_NAMES = ("builtins.TimeoutError", "builtins.OSError", "builtins.Exception",
                  "builtins.BaseException", "builtins.object")


def _timed_out(node_id: str, timeout_ms: int, duration_ms: int) -> fx.ErrorInfo:
    return fx.ErrorInfo(
        _TIMEOUT_NAMES,
        f"node {node_id!r} returned after {duration_ms} ms, past its timeout of "
        f"{timeout_ms} ms (it blocked the event loop, so it could not be cancelled "
        "sooner)",
    )


# ------------------------------------------------------------------------------ start


def start(plan: Plan, initial_state: BaseModel, config: MachineConfig) -> Out:
    """The first state of a run and its first effects."""
    if not isinstance(initial_state, BaseModel):
        raise StromaTypeError(
            "initial_state must be a pydantic BaseModel instance (got "
            f"{type(initial_state).__name__}): wrap it, e.g. Input(**data)"
        )
    text = _json(initial_state)
    if isinstance(text, fx.ErrorInfo):
        raise StromaError(f"initial_state: {text.message}")
    if not reads_back(type(initial_state)):  # (the state a resume goes on with: see _read_back)
        back = _read_back("the initial state", type(initial_state), text)
        if isinstance(back, fx.ErrorInfo):
            raise StateNotSerializable(f"{back.message}; nothing was run")
        initial_state = back
    s = RunState(
        plan=plan,
        config=config,
        phase=Phase.NEXT,
        pos=0,
        attempt=1,
        retries=0,
        state=initial_state,
        state_json=text,
        state_type=type(initial_state),
        tokens=config.base_tokens,
        cost_usd=config.base_cost_usd,
        latency_ms=config.base_latency_ms,
        rng=config.seed & _MASK,
        clock=config.started_at,
        coords=config.coords,
    )
    target = config.resume_from
    if target is None:
        return _begin_step(s)
    ids = [ins.step_id for ins in plan.program if not isinstance(ins, CONTROL)]
    if target not in ids:
        return _finish(
            s, RunStatus.PARTIAL,
            f"resume_from={target!r} is not a step of this pipeline (its steps: "
            f"{', '.join(map(repr, ids)) or 'none'}); nothing was run",
        )
    k = next(i for i, ins in enumerate(plan.program)
             if ins.step_id == target and not isinstance(ins, CONTROL))
    loop = next((ins.step_id for i, ins in enumerate(plan.program)
                 if type(ins) is LoopStart and i < k < ins.end_pc), None)
    if loop is not None:  # which iteration would it go on in? The run cannot say.
        outside = [ins.step_id for i, ins in enumerate(plan.program)
                   if not isinstance(ins, CONTROL) and not any(
                       type(x) is LoopStart and j < i < x.end_pc
                       for j, x in enumerate(plan.program))]
        return _finish(
            s, RunStatus.PARTIAL,
            f"resume_from={target!r} is a step inside loop {loop!r}, which a run cannot "
            f"resume from (there is no telling which iteration to go on in): resume from "
            f"a step outside loops ({', '.join(map(repr, outside)) or 'the plan has none'}), "
            f"or run "
            f"again with the same run id and no resume_from to go on from where the run "
            f"stopped; nothing was run",
        )
    before = _unit_before(plan, k)
    if before is None:
        return _begin_step(_next(s, Phase.NEXT, None, pos=k, resumed=True))
    s = _next(s, Phase.LOAD, None, pos=k, resumed=True)
    return s, [fx.LoadCheckpoint(before.step_id, before.output_schema)]


def _unit_before(plan: Plan, pc: int) -> Any:
    """The step (not a branch instruction) that runs just before program position pc."""
    for ins in reversed(plan.program[:pc]):
        if not isinstance(ins, CONTROL):
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
    text = _json(state)
    if isinstance(text, fx.ErrorInfo):
        return _finish(s, RunStatus.PARTIAL, f"the checkpoint cannot be used: {text.message}")
    return _begin_step(_next(s, Phase.NEXT, None, state=state, state_json=text,
                             state_type=type(state)))


# --------------------------------------------------------------------------- attempts


def _on_chosen(s: RunState, ev: fx.BranchChosen) -> Out:
    """A branch's predicate, or a loop's ``until``, answered."""
    ins = s.step
    if ev.error is not None:
        what = "until function" if type(ins) is LoopEnd else "predicate"
        return _control_failed(s, f"the {what} of {ins.step_id!r} raised: {ev.error.short}")
    if type(ins) is LoopEnd:
        *outer, (kind, loop_id, n) = s.coords
        if ev.taken:  # done: on past the loop
            return _begin_step(_next(s, Phase.NEXT, None, pos=s.pos + 1, coords=tuple(outer)))
        if n >= ins.loop.max_iterations:
            return _finish(
                s, RunStatus.PARTIAL,
                f"loop {loop_id!r} ran out of iterations: until(state) was still false after "
                f"{n} (max_iterations={ins.loop.max_iterations})",
            )
        return _begin_step(_next(s, Phase.NEXT, None, pos=ins.body_pc,
                                 coords=(*outer, (kind, loop_id, n + 1))))
    assert isinstance(ins, Choose)
    return _begin_step(
        _next(s, Phase.NEXT, None, pos=s.pos + 1 if ev.taken else ins.otherwise_pc)
    )


def _control_failed(s: RunState, reason: str) -> Out:
    """A branch's, loop's or route's own function failed: the run stops (TERMINAL)."""
    te = fx.RecordAttempt(
        s.step.step_id, s.config.run_id, 1, _now(s), s.state_json, None, 0,
        FailureClass.TERMINAL, reason, s.coords,
    )
    s, effects = _finish(s, RunStatus.FAILED, reason)
    return s, [te, *effects]


def _on_route(s: RunState, ev: fx.RouteChosen) -> Out:
    """A route's selector answered with the key of the route to take."""
    ins = s.step
    assert isinstance(ins, RouteTo)
    if ev.error is not None:
        return _control_failed(s, f"the selector of {ins.step_id!r} raised: {ev.error.short}")
    target = dict(ins.targets).get(ev.key) if ev.key is not None else None
    if target is None:
        target = ins.default_pc
    if target is None:
        keys = ", ".join(repr(k) for k, _ in ins.targets)
        return _control_failed(
            s, f"route {ins.step_id!r} got the key {ev.key!r}, which names none of its routes "
            f"({keys}): return one of them, or give the route a default=",
        )
    return _begin_step(_next(s, Phase.NEXT, None, pos=target))


# ------------------------------------------------------------------------------- waits


def idempotency_key(run_id: str, node_id: str, coords: Coords = ()) -> str:
    """The key of one logical node call: the same for every retry and every resume of it
    (the same run, node, loop iterations and map items), different for any other call.
    A node can pass it to an API that deduplicates (an ``Idempotency-Key`` header)."""
    where = "/".join(f"{kind}:{step}:{n}" for kind, step, n in coords)
    digest = hashlib.sha256(f"{run_id}\x00{node_id}\x00{where}".encode()).hexdigest()
    return f"stroma-{digest[:32]}"


def input_key(name: str, coords: Coords) -> str:
    """Where the input of a wait is looked up: its name, and for a wait inside a loop or a
    map_each, where it is (``approval@agent#3``)."""
    if not coords:
        return name
    where = "/".join(f"{step}#{n}" if kind == "loop" else f"{step}[{n}]"
                     for kind, step, n in coords)
    return f"{name}@{where}"


def _begin_wait(s: RunState, step: WaitStep) -> Out:
    """Look for the wait's input (``s`` is this transition's copy, finished in place)."""
    d = s.__dict__
    if step.state_schema is None:  # a run that begins with its wait: check its state now
        try:
            WaitGroup(step.name, step.schema).checked(s.state_type)
        except PlanError as e:
            return _control_failed(s, str(e))
    ask = fx.AwaitInput(
        step.step_id, step.name, input_key(step.name, s.coords), s.attempt, step.schema_ref,
        hashlib.sha256(s.state_json).hexdigest()[:16], step.timeout_ms, step.json_schema,
        s.coords,
    )
    d["current"] = _tuple_new(Attempt, (s.state_json, ask, None, 0, 0, None, None, None))
    d["phase"] = _WAIT
    return s, [ask]


def _on_input(s: RunState, ev: fx.InputReceived) -> Out:
    """The input is there: the step's output is the state with the field set to it."""
    step: Any = s.step
    att: Any = s.current
    payload = _read_input(step, ev.payload)
    if isinstance(payload, ContractViolation):
        # A payload that does not fit is not the step's failure: the run waits on for a
        # valid one (nothing is lost; send it again).
        return _wait(s, f"the input {att.call.key!r} sent does not fit {step.schema.__name__}: "
                        f"{payload}; send a valid one")
    state = _model(s)
    out = state.model_copy(update={step.name: payload})
    text = _json(out)
    if isinstance(text, fx.ErrorInfo):
        return _failed(_answered(s, ev.at, 0, 0, 0.0), text)
    s = _next(s, s.phase, att, waiting_since=None)
    return _succeeded(s, out, text, type(out), ev.at, 0, 0, 0.0)


def _read_input(step: WaitStep, raw: Any) -> BaseModel | ContractViolation:
    """An input as its JSON reads (by field name or alias, JSON's forms: a list for a
    tuple, text for a datetime), as a state is read back: the payload a replay reads
    from the log is the one the run took."""
    if isinstance(raw, BaseModel):
        raw = raw.model_dump(mode="json")
    try:
        return read_state(step.schema, to_json(raw, inf_nan_mode="constants"))
    except ValidationError as e:
        shown = raw if isinstance(raw, dict) else {"value": repr(raw)}
        return ContractViolation(step.step_id, "input", shown, e.errors(include_url=False))
    except (PydanticSerializationError, ValueError):  # (no JSON form: Python's own check)
        return _validate(step.step_id, "input", step.schema, raw)


def _on_input_missing(s: RunState, ev: fx.InputMissing) -> Out:
    """The input is not there: the run waits (or the wait timed out: a failed attempt)."""
    step: Any = s.step
    att: Any = s.current
    since = s.waiting_since or ev.at
    if step.timeout_ms is not None and (ev.at - since) > timedelta(milliseconds=step.timeout_ms):
        s = _next(_answered(s, since, 0, 0, 0.0), s.phase, s.current, waiting_since=None)
        return _failed(s, fx.ErrorInfo(
            _TIMEOUT_NAMES,
            f"the wait for {att.call.key!r} timed out: nothing was sent within "
            f"{step.timeout_ms} ms",
        ))
    return _wait(_next(s, s.phase, att, waiting_since=since),
                 f"waiting for input {att.call.key!r} ({step.schema.__name__}) at "
                 f"{step.step_id!r}: send it with send_input(store, run_id, "
                 f"{att.call.key!r}, ...) and run the plan again with the same run id")


def _wait(s: RunState, reason: str) -> Out:
    """The run stops WAITING at the wait in progress (kept in ``current``: a Resumed goes
    on from it)."""
    att = s.current
    s = _next(s, Phase.DONE, att)
    return s, [fx.Finish(RunStatus.WAITING, _model(s), s.tokens, s.cost_usd, s.latency_ms,
                         reason)]


def _begin_step(s: RunState) -> Out:
    """Go on at ``s.pos``: past branch instructions to the next step and its attempt
    number ``s.attempt``, or to the end of the run.

    ``s`` was just made by this transition (it is the transition's own copy), so it is
    finished in place: one copy of the state per transition.
    """
    program = s.plan.program
    d = s.__dict__
    step = program[s.pos] if s.pos < len(program) else None
    t = type(step)
    while t in _CONTROL:
        if t is Jump:
            d["pos"] = step.target  # type: ignore[union-attr]
        elif t is LoopStart:  # iteration 1 of the loop
            d["coords"] = (*s.coords, ("loop", step.step_id, 1))  # type: ignore[union-attr]
            d["pos"] = s.pos + 1
        else:  # Choose, LoopEnd (until), RouteTo: ask the user's function
            if s.state is None:
                d["state"] = _model(s)
            d["current"] = None
            if t is RouteTo:
                d["phase"] = _ROUTE
                return s, [fx.ChooseRoute(step.step_id, s.state)]  # type: ignore[union-attr]
            d["phase"] = _CHOOSE
            return s, [fx.ChooseBranch(step.step_id, s.state)]  # type: ignore[union-attr]
        step = program[s.pos] if s.pos < len(program) else None
        t = type(step)
    if step is None:
        return _finish(s, RunStatus.COMPLETED, None)
    c = s.config
    if c.budget is not None:
        spent = _spent(s)
        if spent is not None:
            # (the words are in logs: a replay of one compares them)
            reason = f"budget spent ({spent}): {step.step_id!r} was not started"
            te = fx.RecordAttempt(
                step.step_id, c.run_id, s.attempt, _now(s), s.state_json, None, 0,
                FailureClass.RECOVERABLE, reason, s.coords,
            )
            s, effects = _finish(s, RunStatus.PARTIAL, reason)
            return s, [te, *effects]
    model = _fallback_model(s) if c.fallbacks else None
    call: fx.CallNode | fx.CallParallel
    if type(step) is NodeStep:
        timeout = step.timeout_ms if not c.node_timeouts else _timeout(s, step)
        if model is not None and not step.takes_context:
            model = None  # (never told the fallback: priced by the model it reports)
        if s.state_type is step.input_schema:
            # The common case: the state already is this node's input.
            call = _tuple_new(fx.CallNode,
                              (step.node_id, s.attempt, timeout, model, s.state, s.coords))
            input_json = s.state_json
        else:
            if s.state is None:
                d["state"] = _model(s)
            inp = _validate(step.node_id, "input", step.input_schema, s.state)
            if isinstance(inp, ContractViolation):
                return _input_broken(s, step, inp)
            text = _json(inp)
            if isinstance(text, fx.ErrorInfo):
                return _input_broken(s, step, text)
            input_json = text
            call = fx.CallNode(step.node_id, s.attempt, timeout, model, inp, s.coords)
    elif type(step) is WaitStep:
        return _begin_wait(s, step)
    else:
        if s.state is None:
            d["state"] = _model(s)
        built = _group_call(s, step, model)
        if isinstance(built, ContractViolation | fx.ErrorInfo):
            return _input_broken(s, step, built)
        call, input_json = built
    d["current"] = _tuple_new(Attempt, (input_json, call, None, 0, 0, None, None, None))
    if "start" in c.hooks:
        d["phase"] = _HOOK_START
        return s, [fx.FireHook("start", step.step_id, s.attempt, input_json,
                               timeout_ms=c.hook_timeout_ms)]
    d["phase"] = _CALL
    return s, [call]


def _input_broken(s: RunState, step: Any, problem: ContractViolation | fx.ErrorInfo) -> Out:
    """The input breaks the contract: the attempt fails without calling the node, after
    the start hook (so an attempt's hooks always come as start, then success or failure)."""
    error = problem if isinstance(problem, fx.ErrorInfo) else error_info(problem)
    att = Attempt(s.state_json, started_at=_now(s), error=error)
    if "start" in s.config.hooks:
        return _next(s, Phase.HOOK_START, att), [
            fx.FireHook("start", step.step_id, s.attempt, s.state_json,
                        timeout_ms=s.config.hook_timeout_ms)
        ]
    return _failed(_next(s, s.phase, att), error)


def _on_hook_start(s: RunState, ev: fx.HookFired) -> Out:
    att = s.current
    assert att is not None
    if att.call is None:  # the input broke its contract: fail the attempt, call nothing
        assert att.error is not None
        return _failed(s, att.error)
    return _next(s, Phase.CALL, att), [att.call]


# ----------------------------------------------------------------------------- success


def _answered(
    s: RunState, started_at: datetime, duration_ms: int, tokens: int, cost: float
) -> RunState:
    """The state once an attempt's answer is in: its time and usage, on the attempt and
    on the running totals (what a failed or hooked attempt goes on from)."""
    att: Any = s.current
    return _next(
        s, s.phase, att._replace(started_at=started_at, duration_ms=duration_ms, tokens=tokens),
        tokens=s.tokens + tokens,
        cost_usd=s.cost_usd + cost,
        latency_ms=s.latency_ms + duration_ms,
        clock=(started_at, duration_ms),
    )


def _on_returned(s: RunState, ev: fx.NodeReturned) -> Out:
    step: Any = s.plan.program[s.pos]
    call = s.current[1]  # type: ignore[index]  # (Attempt.call; by index: the hot path)
    # (unpacked: reading a named tuple's fields by name costs as much as unpacking them)
    output, started_at, duration, tin, tout, _ = ev
    _, _, timeout, model, _, _ = call
    if tin or tout:
        tokens, cost = _price(model, ev, s.config.prices)
    else:
        tokens, cost = 0, 0.0
    problem: Any = None
    if timeout is not None and duration > timeout:
        problem = _timed_out(step.node_id, timeout, duration)
    elif type(output) is fx.ErrorInfo:  # the output cannot be written as JSON (the log says)
        problem = output
    elif type(output) is fx.Validated:
        # Replayed: the log says the output kept this node's contract, and the plan's
        # fingerprint (checked before any record is replayed) says the contract is the same.
        return _succeeded(s, None, output[0], step.output_schema, started_at, duration,
                          tokens, cost)
    else:
        schema = step.output_schema
        if type(output) is dict:  # the common case, inline: validate, then the JSON text
            try:
                out: Any = schema.__pydantic_validator__.validate_python(output)
            except ValidationError:
                out = _validate(step.node_id, "output", schema, output)
        else:
            out = _validate(step.node_id, "output", schema, output)
        if isinstance(out, ContractViolation):
            problem = error_info(out)
        else:
            try:
                text: Any = out.__pydantic_serializer__.to_json(out)
                if b"null" in text:
                    text = _json(out)  # (perhaps a float that is not finite)
            except Exception:
                text = _json(out)
            if type(text) is bytes:
                if schema in EXACT_SCHEMAS or reads_back(schema):
                    return _succeeded(s, out, text, schema, started_at, duration, tokens,
                                      cost)
                back = _read_back(f"the output of node {step.node_id!r}", schema, text)
                if not isinstance(back, fx.ErrorInfo):
                    return _succeeded(s, back, text, schema, started_at, duration, tokens,
                                      cost)
                text = back
            problem = text
    return _failed(_answered(s, started_at, duration, tokens, cost), problem)


def _succeeded(
    s: RunState, out: BaseModel | None, out_json: bytes, out_type: type[BaseModel],
    started_at: datetime, duration_ms: int, tokens: int, cost: float,
) -> Out:
    """The attempt's output is valid: commit it, and go on to what follows.

    ``s`` is the state the attempt's answer arrived in (not changed); this is the one copy
    the transition makes. The commit (trace record and checkpoint) is performed before
    anything that follows it in the effects (the success hook, the next step).
    """
    step: Any = s.plan.program[s.pos]
    c = s.config
    total_tokens = s.tokens + tokens
    total_cost = s.cost_usd + cost
    latency = s.latency_ms + duration_ms
    if c.budget is not None:
        hit = c.budget.first_exceeded(total_tokens, total_cost, latency)
        if hit is not None:
            s = _answered(s, started_at, duration_ms, tokens, cost)
            return _failed(s, error_info(BudgetExceeded(*hit, step.step_id)))
    attempt = s.attempt
    commit = _tuple_new(fx.Commit, (
        step.step_id, c.run_id, attempt, started_at, s.current[0],  # type: ignore[index]
        out_json, duration_ms, step.output_ref or _schema_ref(out_type), out, s.coords,
    ))  # (Attempt.input_json; no output_ref: a wait that begins the run, in any state)
    # _next, spelled out: this runs once per node.
    d = s.__dict__.copy()
    d["state"] = out
    d["state_json"] = out_json
    d["state_type"] = out_type
    d["pos"] = s.pos + 1
    d["attempt"] = 1
    d["retries"] = 0
    d["tokens"] = total_tokens
    d["cost_usd"] = total_cost
    d["latency_ms"] = latency
    d["clock"] = (started_at, duration_ms)
    d["group"] = _NO_PROGRESS
    s = object.__new__(RunState)
    _setattr(s, "__dict__", d)
    if "success" in c.hooks:
        d["phase"] = _HOOK_OK
        return s, [commit, fx.FireHook("success", step.step_id, attempt, out_json, tokens,
                                       timeout_ms=c.hook_timeout_ms)]
    d["phase"] = _NEXT
    d["current"] = None
    s, effects = _begin_step(s)
    effects.insert(0, commit)
    return s, effects


def _on_hook_ok(s: RunState, ev: fx.HookFired) -> Out:
    return _begin_step(_next(s, Phase.NEXT, None))


# ------------------------------------------------------------------------------ groups


def _child_coords(s: RunState, index: int) -> Coords:
    """Where a fan-out child runs: a map item adds its index to where the group is."""
    step: Any = s.step
    if isinstance(step, MapStep):
        return (*s.coords, ("item", step.step_id, index))
    return s.coords


def _child_config(s: RunState, index: int) -> MachineConfig:
    """A fan-out child's sub-plan runs with the run's policies and model fallbacks, its
    own PRNG stream, and the run's budget from the run's totals when the group began (so a
    loop inside a child stops once the budget is spent, and falls back to the cheaper
    model past the threshold, as it would outside; the child's own usage is what
    its PlanFinished reports, and counts against the run's budget when it ends)."""
    c = s.config
    seed, _ = _draw((c.seed ^ (s.pos << 20) ^ (s.attempt << 40) ^ index) & _MASK)
    budgeted = c.budget is not None
    return MachineConfig(
        run_id=c.run_id, seed=seed & ((1 << 63) - 1), started_at=_now(s),
        max_tokens=c.max_tokens, max_cost_usd=c.max_cost_usd,
        max_latency_ms=c.max_latency_ms,
        policy_map=c.policy_map, custom_classifiers=c.custom_classifiers, hooks=c.hooks,
        fallbacks=c.fallbacks, declared_model=c.declared_model,
        node_timeouts=c.node_timeouts, node_policies=c.node_policies,
        hook_timeout_ms=c.hook_timeout_ms, prices=c.prices,
        base_tokens=s.tokens if budgeted else 0,
        base_cost_usd=s.cost_usd if budgeted else 0.0,
        base_latency_ms=s.latency_ms if budgeted else 0,
        coords=_child_coords(s, index), zero_limit_spent=c.zero_limit_spent,
    )


def _child_call(
    s: RunState, child: Any, index: int, child_id: str, raw: Any, model: str | None
) -> fx.CallNode | fx.RunPlan | ContractViolation:
    if isinstance(child, NodeStep):
        if not (child.policies or child.node_id in s.config.node_policies):
            cin = _validate(child.node_id, "input", child.input_schema, raw)
            if isinstance(cin, ContractViolation):
                return cin
            return fx.CallNode(child.node_id, s.attempt, _timeout(s, child),
                               model if child.takes_context else None, cin,
                               _child_coords(s, index))
        # A child with retry policies of its own retries on its own: a one-node sub-plan.
        child = child.solo
    schema = child.input_schema
    cin = raw if schema is None else _validate(child_id, "input", schema, raw)
    if isinstance(cin, ContractViolation):
        return cin
    prior = s.group.records.get(index)
    if prior is not None:  # cancelled on an earlier attempt: it goes on from its own log
        records, config, partials = prior
        return fx.RunPlan(child_id, s.attempt, child.fingerprint, child, cin, config, records,
                          partials)
    return fx.RunPlan(child_id, s.attempt, child.fingerprint, child, cin,
                      _child_config(s, index))


def _children(s: RunState, step: Any) -> list[tuple[Any, Any]] | ContractViolation:
    """Each child of a group and its raw input, in argument (item) order."""
    if isinstance(step, ParallelStep):
        # Each child its own model of the group's input, as its JSON reads back (as a
        # resume gives it): a child that changes its input in place changes neither its
        # siblings' nor the state the group's outputs are merged into.
        return [(child, read_state(s.state_type, s.state_json)) for child in step.children]
    inp = _validate(step.step_id, "input", step.input_schema, s.state)
    if isinstance(inp, ContractViolation):
        return inp
    return [
        (step.body, item if isinstance(item, BaseModel | dict) else {"item": item})
        for item in getattr(inp, step.over)
    ]


def _group_call(
    s: RunState, step: Any, model: str | None
) -> tuple[fx.CallParallel, bytes] | ContractViolation | fx.ErrorInfo:
    children = _children(s, step)
    if isinstance(children, ContractViolation):
        return children
    done = s.group.outputs
    calls: list[Any] = []
    indices: list[int] = []
    for j, (child, raw) in enumerate(children):
        if j in done:
            continue  # it succeeded on an earlier attempt of the group
        c = _child_call(s, child, j, f"{step.step_id}[{j}]", raw, model)
        if isinstance(c, ContractViolation):
            return c
        calls.append(c)
        indices.append(j)
    budget = s.config.budget
    call = fx.CallParallel(
        step.step_id, s.attempt, tuple(calls), step.max_concurrency, _timeout(s, step),
        "map" if isinstance(step, MapStep) else "parallel", tuple(indices), step,
        None if budget is None else (budget, s.tokens, s.cost_usd, s.latency_ms,
                                     s.config.prices, s.group.counted),
    )
    return call, s.state_json


def child_added(call: Any, index: int, outcome: Any,
                prices: Mapping[str, tuple[float, float]] | None,
                counted: Mapping[int, tuple[int, float]]) -> tuple[int, float]:
    """What a fan-out child's outcome adds to the run's totals: what it used (see
    ``child_spend``) less what is counted already of it (``counted``: a sub-plan child
    that waited, or was cancelled having used some, on an earlier attempt of the group,
    whose totals hold that again when it goes on); nothing for a cancelled child that
    reports no use (it used none more, or its log is from before it was told)."""
    t, k = child_spend(call, outcome, prices)
    if type(outcome) is fx.NodeCancelled and not (t or k):
        return 0, 0.0
    already = counted.get(index)
    if already is not None:
        t, k = t - already[0], k - already[1]
    return t, k


def child_spend(call: Any, outcome: Any,
                prices: Mapping[str, tuple[float, float]] | None = None) -> tuple[int, float]:
    """The tokens and cost a fan-out child's outcome used, priced as the run prices them
    (a node child by its model and the run's ``prices``, a sub-plan child by its run's
    totals)."""
    if type(outcome) is fx.NodeReturned:
        return _price(call.model if type(call) is fx.CallNode else None, outcome, prices)
    if type(outcome) is fx.PlanFinished or type(outcome) is fx.NodeCancelled:
        return outcome.total_tokens, outcome.total_cost_usd
    return 0, 0.0


def group_budget_spent(
    call: fx.CallParallel, tokens: int, cost: float, elapsed_ms: int = 0,
) -> tuple[str, float, float] | None:
    """Whether the children of a group that finished, having used ``tokens`` and
    ``cost`` in the group's first ``elapsed_ms`` (its latency so far: the group is one
    step, as long as it runs), spent the run's budget (at or over a limit: as a step, a
    child is not started then): ``(dimension, limit, total)``, else None. The interpreter
    asks after each child that finishes and starts no more children once it is spent;
    the machine then fails the group's attempt (BudgetExceeded), with those children not
    started."""
    allowance = call.allowance
    if allowance is None:
        return None
    budget, run_tokens, run_cost, run_latency = allowance[:4]
    hit: tuple[str, float, float] | None = budget.first_spent(
        run_tokens + tokens, run_cost + cost, run_latency + elapsed_ms)
    return hit


def child_fails(group: Any, call: Any, outcome: Any) -> bool:
    """Whether a child's outcome fails its group (so its siblings are cancelled): it
    raised, returned an output that breaks its contract or came back after its timeout,
    or its sub-plan did not complete. The machine decides the same way on the outcomes."""
    if type(outcome) is fx.NodeReturned:
        if type(call) is not fx.CallNode:
            return True
        if call.timeout_ms is not None and outcome.duration_ms > call.timeout_ms:
            return True
        if type(outcome.output) is fx.ErrorInfo:
            return True
        node = group.child_node(call.node_id)
        return not isinstance(
            _validate(node.node_id, "output", node.output_schema, outcome.output), BaseModel
        )
    if type(outcome) is fx.PlanFinished:
        return outcome.status not in (RunStatus.COMPLETED, RunStatus.RESUMED, RunStatus.WAITING)
    return type(outcome) is fx.NodeRaised


def _child_failure(call: Any, outcome: fx.PlanFinished) -> fx.ErrorInfo:
    terminal = outcome.status is RunStatus.FAILED
    names = (
        ("stroma.errors.ChildFailedTerminally", "stroma.errors.ChildFailed")
        if terminal else ("stroma.errors.ChildFailed",)
    ) + ("stroma.errors.StromaError", "builtins.Exception")
    label = getattr(call, "child_id", getattr(call, "node_id", "?"))
    return fx.ErrorInfo(names, f"{label} {outcome.status}: {outcome.reason}")


def _child_outcome(call: Any, node: Any, outcome: Any) -> tuple[Any, fx.ErrorInfo | None]:
    """A finished child: its output (a JSON value) or why it failed."""
    if type(outcome) is fx.NodeRaised:
        return None, outcome.error
    if type(outcome) is fx.PlanFinished:
        if outcome.status is RunStatus.WAITING:
            return _WAITING, None  # neither a success nor a failure: it waits for input
        if outcome.status not in (RunStatus.COMPLETED, RunStatus.RESUMED):
            return None, _child_failure(call, outcome)
        return outcome.output, None
    assert type(outcome) is fx.NodeReturned
    if call.timeout_ms is not None and outcome.duration_ms > call.timeout_ms:
        return None, _timed_out(call.node_id, call.timeout_ms, outcome.duration_ms)
    if type(outcome.output) is fx.ErrorInfo:
        return None, outcome.output
    out = _validate(node.node_id, "output", node.output_schema, outcome.output)
    if isinstance(out, ContractViolation):
        return None, error_info(out)
    return out, None


_WAITING = object()  # the "output" of a sub-plan child that stopped WAITING


def _judged(
    group: Any, call: fx.CallParallel, event: fx.ParallelReturned
) -> list[tuple[int, Any, fx.ErrorInfo | None, Any]]:
    """Each child that finished, in argument order: (its index in the group, its output,
    why it failed or None, its outcome)."""
    judged = []
    for k, index in enumerate(call.indices):
        c, outcome = call.calls[k], event.outcomes[k]
        if type(outcome) is fx.NodeCancelled:
            continue
        out, problem = _child_outcome(c, group.child_node(getattr(c, "node_id", "")), outcome)
        judged.append((index, out, problem, outcome))
    return judged


def failed_child(group: Any, call: fx.CallParallel, event: fx.ParallelReturned) -> int | None:
    """The index (in ``group``) of the child that failed the group's attempt: the first
    child, in argument order, that failed. None when every child that finished succeeded."""
    return next((index for index, _, problem, _ in _judged(group, call, event)
                 if problem is not None), None)


def _changed(
    out: dict[str, Any], given: list[Any], schema: type[BaseModel] | None
) -> dict[str, Any]:
    """A sub-plan child's part of the merge: the fields of its final state that its run
    changed from the group's input, less those holding their schema's default (never a
    default over an earlier child's value). Which fields a state counts as set is not
    kept across a resume (a state read back from JSON has them all set); these are.
    ``given`` holds the group's RunState until first needed, then its two dumps."""
    if len(given) == 1:
        model = _model(given[0])
        given[:] = [model.model_dump(), model.model_dump(mode="json")]
    base, text = given
    defaults = _json_defaults(schema) if schema is not None else {}
    # (the child's output is its state's JSON form: compare with the input's JSON form too)
    return {k: v for k, v in out.items()
            if (k not in base or (base[k] != v and text[k] != v))
            and not (k in defaults and defaults[k] == v)}


@functools.lru_cache(maxsize=256)
def _json_defaults(schema: type[BaseModel]) -> dict[str, Any]:
    """The JSON form of each default a schema's fields have (of a plan: made once)."""
    found: dict[str, Any] = {}
    for name, field in schema.model_fields.items():
        if field.is_required():
            continue
        try:
            found[name] = to_jsonable_python(field.get_default(call_default_factory=True))
        except Exception:  # (a default JSON cannot hold: no field of a log equals it)
            continue
    return found


def _on_parallel(s: RunState, ev: fx.ParallelReturned) -> Out:
    step: Any = s.step
    att: Any = s.current
    call: fx.CallParallel = att.call
    calls = call.calls
    if len(ev.outcomes) != len(calls):
        raise UnexpectedEvent(
            f"{step.step_id}: {len(ev.outcomes)} outcomes for {len(calls)} children"
        )
    tokens, cost = 0, 0.0
    prices = s.config.prices
    before_counted = s.group.counted
    counted = dict(before_counted)
    for j, c, outcome in zip(call.indices, calls, ev.outcomes, strict=True):
        t, k = child_added(c, j, outcome, prices, before_counted)
        # A sub-plan child that waits, or was cancelled having used some, goes on from
        # its records when the group runs again, and its totals then hold what it used
        # before: that is counted once (see child_added).
        if type(outcome) is fx.NodeCancelled:
            spent = child_spend(c, outcome, prices)
            if spent[0] or spent[1]:
                counted[j] = spent
        elif type(outcome) is fx.PlanFinished and outcome.status is RunStatus.WAITING:
            counted[j] = (outcome.total_tokens, outcome.total_cost_usd)
        else:
            counted.pop(j, None)
        tokens, cost = tokens + t, cost + k
    before = s
    s = _answered(s, ev.started_at, ev.duration_ms, tokens, cost)
    # The first child (in argument order) that failed fails the attempt; the successes
    # are kept for a retry of the group.
    outputs = dict(s.group.outputs)
    records = dict(s.group.records)
    error: fx.ErrorInfo | None = None
    final: RunStatus | None = None
    waiting: list[str] = []
    given: list[Any] = [before]  # the group's input, dumped when first needed
    for index, out, problem, outcome in _judged(step, call, ev):
        if out is _WAITING:  # it goes on from its records when the group runs again
            child = call.calls[call.indices.index(index)]
            assert isinstance(child, fx.RunPlan)  # only a sub-plan waits
            records[index] = (outcome.records, child.config, ())
            waiting.append(outcome.reason or f"child {index} waits for input")
            continue
        if problem is not None:
            if error is None:
                error = problem
                if type(outcome) is fx.PlanFinished:
                    final = outcome.status  # its own retries are spent: no group retry
            continue
        records.pop(index, None)
        if isinstance(out, BaseModel):
            # A parallel child adds what it returned (never its schema's defaults, which
            # would overwrite an earlier child's value), less what it passed on unchanged
            # from the group's input (a model_copy of its input has every field of the
            # input set once the input was read back from JSON, on a resume: those would
            # overwrite an earlier child's change); a map item is the whole output.
            if isinstance(step, ParallelStep):
                out = _changed(out.model_dump(exclude_unset=True), given, None)
            else:
                out = out.model_dump()
        elif isinstance(step, ParallelStep) and type(outcome) is fx.PlanFinished:
            out = _changed(out, given, step.children[index].output_of())
        outputs[index] = out
    for k, outcome in enumerate(ev.outcomes):
        c = calls[k]
        if (type(outcome) is fx.NodeCancelled and (outcome.records or outcome.partials)
                and type(c) is fx.RunPlan):
            # A sub-plan child goes on from here on the group's next attempt (and the
            # children that finished of a group of its own are not called again).
            records[call.indices[k]] = (outcome.records, c.config, outcome.partials)
    s = _next(s, s.phase, s.current, group=GroupProgress(outputs, records, counted))
    cancelled = sum(type(o) is fx.NodeCancelled for o in ev.outcomes)
    # The deadline passed with every child finished (one shielded or swallowed the
    # cancellation, or blocked the loop, and returned late): a timeout all the same. (A
    # log made before such groups were told of holds deadline_passed only with children
    # cancelled, so it decides as it did.)
    if error is None and (cancelled or ev.deadline_passed):
        hit = None if ev.deadline_passed else group_budget_spent(call, tokens, cost,
                                                                 ev.duration_ms)
        if ev.deadline_passed:
            error = fx.ErrorInfo(
                _TIMEOUT_NAMES,
                f"{step.step_id!r} timed out after {call.timeout_ms} ms and was cancelled"
                if cancelled else
                f"{step.step_id!r} timed out after {call.timeout_ms} ms: a child returned "
                "after its deadline (it shielded or swallowed the cancellation, or blocked "
                "the event loop)",
            )
        elif hit is not None:  # the children that finished spent the budget
            exc = BudgetExceeded(*hit, step.step_id)
            error = fx.ErrorInfo(
                error_info(exc).type_names,
                f"budget spent ({_described(hit)}) by the children of {step.step_id!r} "
                f"that finished: {cancelled} of its children were not started",
                exc,
            )
        else:
            error = fx.ErrorInfo(
                ("anyio.Cancelled", "builtins.BaseException"), "children were cancelled"
            )
    if error is not None:
        if final is not None:
            s = _next(s, s.phase, s.current._replace(final=final))  # type: ignore[union-attr]
        return _failed(s, error)
    if waiting:  # the group goes on when the run does, from what its children did
        return _wait(s, f"{step.step_id!r}: " + "; ".join(waiting))
    n = len(step.children) if isinstance(step, ParallelStep) else len(outputs)
    ordered = [outputs[j] for j in range(n)]
    if isinstance(step, MapStep):
        base = _model(s).model_dump()
        base[step.into] = ordered
        merged: Any = base
    else:
        # The group's input goes on where no child returned a field (never a default of
        # the output schema over it); each child, in argument order, adds what it gave.
        fields = step.output_schema.model_fields
        merged = {k: v for k, v in _model(s).model_dump().items() if k in fields}
        for part in ordered:
            merged.update(part)
    out = _validate(step.step_id, "output", step.output_schema, merged)
    if isinstance(out, ContractViolation):
        return _failed(s, error_info(out))
    text = _json(out)
    if isinstance(text, fx.ErrorInfo):
        return _failed(s, text)
    return _succeeded(before, out, text, step.output_schema, ev.started_at, ev.duration_ms,
                      tokens, cost)


# ---------------------------------------------------------------------------- failures


def _on_raised(s: RunState, ev: fx.NodeRaised) -> Out:
    att = s.current
    assert att is not None
    s = _next(
        s, s.phase, att._replace(started_at=ev.started_at, duration_ms=ev.duration_ms),
        latency_ms=s.latency_ms + ev.duration_ms,
        clock=(ev.started_at, ev.duration_ms),
    )
    return _failed(s, ev.error)


def _failed(s: RunState, error: fx.ErrorInfo) -> Out:
    att = s.current
    assert att is not None
    # The state goes on as its JSON reads back, not as the model the attempt was given: a
    # node may have changed that model in place before it failed (``state.n += 1``), and
    # its retry, the run's final state and a replay of its log must not see that.
    fresh = None if s.state is None else read_state(s.state_type, s.state_json)
    s = _next(s, s.phase, att._replace(error=error), state=fresh)
    if s.config.custom_classifiers:
        s = _next(s, Phase.CLASSIFY, s.current)
        return s, [fx.ClassifyFailure(s.step.step_id, s.attempt, error, s.coords)]
    return _classified(s, builtin_class_for_names(error.type_names))


def _on_classified(s: RunState, ev: fx.FailureClassified) -> Out:
    assert s.current is not None and s.current.error is not None
    return _classified(s, decide_class(ev.answers, s.current.error.type_names))


def _classified(s: RunState, cls: FailureClass) -> Out:
    att = s.current
    assert att is not None and att.error is not None
    step = s.step
    message = att.error.message or att.error.type_name.rsplit(".", 1)[-1]
    te = fx.RecordAttempt(
        step.step_id, s.config.run_id, s.attempt, att.started_at or _now(s), att.input_json,
        None, att.duration_ms, cls, message, s.coords, att.error,
    )
    s = _next(s, s.phase, att._replace(failure=cls))
    if "failure" in s.config.hooks:
        s = _next(s, Phase.HOOK_FAIL, s.current)
        return s, [te, fx.FireHook("failure", step.step_id, s.attempt, None, 0, cls, att.error,
                                   timeout_ms=s.config.hook_timeout_ms)]
    s, effects = _decide(s)
    effects.insert(0, te)
    return s, effects


def _on_hook_fail(s: RunState, ev: fx.HookFired) -> Out:
    return _decide(s)


def _decide(s: RunState) -> Out:
    att = s.current
    assert att is not None and att.failure is not None and att.error is not None
    step = s.step
    cls = att.failure
    if cls is FailureClass.TERMINAL or att.final is RunStatus.FAILED:
        return _finish(
            s, RunStatus.FAILED,
            f"{step.step_id!r} failed with a terminal error on attempt {s.attempt}: "
            f"{att.error.short}",
        )
    if att.final is not None:
        return _finish(
            s, RunStatus.PARTIAL,
            f"{step.step_id!r} gave up on attempt {s.attempt}: a child ran out of its own "
            f"retries: {att.error.short}",
        )
    policy = _policy(s, step, cls)
    if s.retries >= policy.max_retries:
        return _finish(
            s, RunStatus.PARTIAL,
            f"{step.step_id!r} gave up after {s.attempt} attempt(s) ({cls} allows "
            f"{policy.max_retries} retries): {att.error.short}",
        )
    s = _next(s, s.phase, None, attempt=s.attempt + 1, retries=s.retries + 1)
    if policy.backoff_seconds > 0:
        rng, u = _draw(s.rng)
        return _next(s, Phase.SLEEP, None, rng=rng), [fx.Sleep(u * policy.backoff_seconds)]
    return _begin_step(s)


def _on_slept(s: RunState, ev: fx.Slept) -> Out:
    return _begin_step(
        _next(s, Phase.NEXT, None, clock=_now(s) + timedelta(seconds=ev.seconds))
    )


# ---------------------------------------------------------------------------- resuming


def _on_resumed(s: RunState, ev: fx.Resumed) -> Out:
    """The log ended and the run goes on live: the effects it had not recorded are
    performed now, with the live values they need, and a completed run says RESUMED."""
    if s.phase is Phase.DONE and s.current is not None and not ev.pending:
        # The run stopped WAITING: look for the input again (a group waiting on a child
        # calls the children that have not succeeded; the waiting one goes on).
        return _begin_step(_next(s, Phase.NEXT, None, resumed=True))
    s = _materialized(_next(s, s.phase, s.current, resumed=True))
    effects: list[Any] = []
    for eff in ev.pending:
        t = type(eff)
        if t is fx.Finish:
            status = RunStatus.RESUMED if eff.status is RunStatus.COMPLETED else eff.status
            eff = eff._replace(status=status, final_state=_model(s))
        elif t is fx.CallNode and eff.input is None:
            eff = eff._replace(input=s.state)
        elif t is fx.ChooseBranch and eff.state is None:
            eff = eff._replace(state=s.state)
        elif t is fx.Commit and eff.state is None:
            state = s.state if eff.output_state is s.state_json else (
                read_state(s.plan.schema_for(eff.schema), eff.output_state)
            )
            eff = eff._replace(state=state)
        effects.append(eff)
    att = s.current
    if att is not None and type(att.call) is fx.CallNode and att.call.input is None:
        s = _next(s, s.phase, att._replace(call=att.call._replace(input=s.state)))
    return s, effects


# ---------------------------------------------------------------------------- advance

_Handler = Callable[[RunState, Any], Out]
_TABLE: Mapping[Phase, Mapping[type, _Handler]] = {
    Phase.LOAD: {fx.CheckpointLoaded: _on_loaded},
    Phase.HOOK_START: {fx.HookFired: _on_hook_start},
    Phase.CALL: {
        fx.NodeReturned: _on_returned,
        fx.NodeRaised: _on_raised,
        fx.ParallelReturned: _on_parallel,
    },
    Phase.CLASSIFY: {fx.FailureClassified: _on_classified},
    Phase.HOOK_FAIL: {fx.HookFired: _on_hook_fail},
    Phase.SLEEP: {fx.Slept: _on_slept},
    Phase.HOOK_OK: {fx.HookFired: _on_hook_ok},
    Phase.CHOOSE: {fx.BranchChosen: _on_chosen},
    Phase.ROUTE: {fx.RouteChosen: _on_route},
    Phase.WAIT: {fx.InputReceived: _on_input, fx.InputMissing: _on_input_missing},
    Phase.NEXT: {},
    Phase.DONE: {},
}
for _phase, _handlers in _TABLE.items():
    _handlers[fx.Resumed] = _on_resumed  # type: ignore[index]  # (in DONE: a pending Finish)
    # Each phase carries its row of the table (an attribute is read faster than an enum
    # member hashed for a dict lookup).
    _phase.handlers = _handlers  # type: ignore[attr-defined]


def advance(state: RunState, event: Any) -> Out:
    """The next state and effects, given the event that answered the last effect."""
    handler = state.phase.handlers.get(type(event))  # type: ignore[attr-defined]  # (_TABLE)
    if handler is None:
        expected: Sequence[str] = [
            t.__name__ for t in _TABLE[state.phase] if t is not fx.Resumed
        ] or ["nothing"]
        raise UnexpectedEvent(
            f"can't handle event {type(event).__name__} in phase {state.phase.value!r} "
            f"(step {state.pos}, attempt {state.attempt}); expected {' or '.join(expected)}"
        )
    return handler(state, event)

