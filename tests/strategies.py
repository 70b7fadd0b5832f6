"""Hypothesis strategies for the pure machine: random plans, configs and scripted outcomes.

A ``Scenario`` is a plan (nodes and ``parallel`` groups whose contracts chain through a
few schemas), an initial state, a ``MachineConfig`` and a script: for each step, the
outcome of each attempt (success with usage, a ValueError, a timeout, a custom error, or
an output that breaks the contract). Attempts past the end of a step's script succeed.
``ScriptedWorld`` answers the machine's effects from a scenario, with a virtual clock, so
the tests drive ``advance`` synchronously with no event loop and no node ever running.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import attrs
from hypothesis import strategies as st
from pydantic import BaseModel

from stroma import effects as fx
from stroma.contracts import NodeContract
from stroma.cost import KNOWN_MODELS, FallbackPolicy
from stroma.failures import FailureClass, FailurePolicy, default_policy_map
from stroma.machine import MachineConfig, error_info
from stroma.plan import (
    ParallelStep,
    Plan,
    Step,
    await_input,
    compile_plan,
    loop,
    map_each,
    parallel,
    route,
    seq,
)
from stroma.runner import stroma_node

__all__ = (
    "AGENT_FAIL_KINDS",
    "CHECKPOINT",
    "KEY_MARK",
    "ROUTE_KEYS",
    "STARTED_AT",
    "WAIT_FIELDS",
    "AgentBuilder",
    "AgentState",
    "Approval",
    "Called",
    "Leaf",
    "BadOutput",
    "CustomError",
    "Fail",
    "Num",
    "Ok",
    "Scenario",
    "Scored",
    "ScriptedWorld",
    "Strict",
    "Tagged",
    "agent_node_specs",
    "agent_specs",
    "configs",
    "count_waits",
    "node_output",
    "outcomes",
    "payload_for",
    "plans",
    "policy_for",
    "retry_bound",
    "scenarios",
)

STARTED_AT = datetime(2025, 1, 1, tzinfo=UTC)
CHECKPOINT = {"value": 100, "tag": "checkpoint", "score": 1.0}


# ------------------------------------------------------------------------------ schemas


class Num(BaseModel):
    value: int


class Tagged(BaseModel):
    value: int
    tag: str = ""


class Scored(BaseModel):
    value: int
    score: float = 0.0


class Strict(BaseModel):
    """Requires a tag: as an input it breaks the contract after a state without one."""

    value: int
    tag: str


OUTPUT_SCHEMAS: tuple[type[BaseModel], ...] = (Num, Tagged, Scored, Strict)
# Strict is rare as an input, so most runs get past their first node.
INPUT_SCHEMAS: tuple[type[BaseModel], ...] = (Num, Tagged, Scored, Num, Tagged, Scored, Strict)


class CustomError(Exception):
    """A user error that only the custom classifier knows (built-in rules: AMBIGUOUS)."""


def _required(schema: type[BaseModel]) -> list[str]:
    return [name for name, info in schema.model_fields.items() if info.is_required()]


def node_output(node_id: str, inp: BaseModel | None) -> dict[str, Any]:
    """What a scripted node returns: valid for every output schema (extra keys ignored)."""
    value = getattr(inp, "value", 0)
    return {"value": value + 1, "tag": node_id, "score": 0.5}


# ------------------------------------------------------------------------------ outcomes


@attrs.frozen
class Ok:
    """The attempt returns a valid output and reports this usage."""

    input_tokens: int = 0
    output_tokens: int = 0
    model: str | None = None
    duration_ms: int = 1


@attrs.frozen
class Fail:
    """The attempt raises: ``value`` (ValueError), ``timeout`` (TimeoutError) or ``custom``."""

    kind: str
    duration_ms: int = 1


@attrs.frozen
class BadOutput:
    """The attempt returns an output that breaks its contract (ContractViolation)."""

    input_tokens: int = 0
    duration_ms: int = 1


Outcome = Ok | Fail | BadOutput
DEFAULT = Ok()

MODELS = (None, *sorted(KNOWN_MODELS))
durations = st.integers(0, 50)
tokens = st.integers(0, 2000)


def outcomes() -> st.SearchStrategy[Outcome]:
    """One attempt's outcome: half succeed, a third raise, a sixth break their contract."""
    ok = st.builds(Ok, tokens, tokens, st.sampled_from(MODELS), durations)
    fail = st.builds(Fail, st.sampled_from(("value", "timeout", "custom")), durations)
    bad = st.builds(BadOutput, tokens, durations)
    return st.one_of(ok, fail, ok, bad, ok, fail)


# -------------------------------------------------------------------------------- plans


def _node(node_id: str, inp: type[BaseModel], out: type[BaseModel]) -> Any:
    async def node(state: BaseModel) -> Any:  # pragma: no cover - the pure tests never call it
        raise AssertionError(f"node {node_id!r} ran: the machine tests never call nodes")

    contract = NodeContract(node_id=node_id, input_schema=inp, output_schema=out)
    return stroma_node(node_id, contract)(node)


@st.composite
def plans(draw: st.DrawFn, max_steps: int = 5) -> Plan:
    """A compiled plan of 0..max_steps steps; about one step in four is a parallel group.

    Contracts chain as ``compile_plan`` demands (a Strict input only after an output with a
    tag), except that the first step may need a tag the initial state lacks: its input
    then breaks the contract at run time.
    """
    items: list[Any] = []
    counter = 0
    provided: set[str] | None = None  # the fields the previous step outputs

    def node() -> tuple[Any, type[BaseModel]]:
        nonlocal counter
        counter += 1
        inputs = [
            schema for schema in INPUT_SCHEMAS
            if provided is None or set(_required(schema)) <= provided
        ]
        out = draw(st.sampled_from(OUTPUT_SCHEMAS))
        return _node(f"n{counter}", draw(st.sampled_from(inputs)), out), out

    for _ in range(draw(st.integers(0, max_steps))):
        if draw(st.integers(0, 3)) == 0:
            group = [node() for _ in range(draw(st.integers(1, 3)))]
            items.append(parallel(*(fn for fn, _ in group)))
            provided = {f for _, out in group for f in out.model_fields}
        else:
            fn, out = node()
            items.append(fn)
            provided = set(out.model_fields)
    plan = compile_plan(items)
    # Now and then a step carries its own retry policy (Plan.with_retry).
    for step_id in plan.step_ids():
        if draw(st.integers(0, 5)) == 0:
            plan = plan.with_retry(step_id, {
                FailureClass.RECOVERABLE: FailurePolicy(
                    max_retries=draw(st.integers(0, 3)), backoff_seconds=draw(backoffs)
                )
            })
    return plan


# ------------------------------------------------------------------------------ configs

backoffs = st.one_of(st.sampled_from((0.0, 0.0, 0.5, 30.0)), st.floats(0, 5))
Table = tuple[tuple[FailureClass, int, float], ...]


@st.composite
def policy_tables(draw: st.DrawFn) -> Table:
    """Retry policies for a random subset of the classes (the rest fall back)."""
    return tuple(
        (cls, draw(st.integers(0, 3)), draw(backoffs))
        for cls in FailureClass
        if draw(st.booleans())
    )


def _maybe(strategy: st.SearchStrategy[Any], one_in: int = 3) -> st.SearchStrategy[Any]:
    return st.integers(1, one_in).flatmap(lambda k: strategy if k == 1 else st.none())


@st.composite
def configs(draw: st.DrawFn, plan: Plan) -> MachineConfig:
    """A MachineConfig for ``plan``: policies, budgets, hooks, timeouts, classifiers."""
    node_ids = plan.node_ids()
    step_ids = plan.step_ids()
    max_cost = draw(_maybe(st.floats(0, 0.05), 4))
    fallbacks: tuple[FallbackPolicy, ...] = ()
    declared = None
    if max_cost is not None and draw(st.booleans()):
        fallbacks = (FallbackPolicy("gpt-4o", "gpt-4o-mini", draw(st.floats(0, 1))),)
        declared = draw(st.sampled_from((None, "gpt-4o", "claude-opus-4-6")))
    node_policies = {
        step_id: draw(policy_tables()) for step_id in step_ids if draw(st.integers(0, 4)) == 0
    }
    node_timeouts = {
        node_id: draw(st.integers(1, 1000)) for node_id in node_ids if draw(st.booleans())
    }
    resume_from = None
    if step_ids and draw(st.integers(0, 5)) == 0:
        resume_from = draw(st.sampled_from((*step_ids, "not-a-step")))
    return MachineConfig(
        run_id="run-prop",
        seed=draw(st.integers(0, 2**64 - 1)),
        started_at=STARTED_AT,
        max_tokens=draw(_maybe(st.integers(0, 8000), 4)),
        max_cost_usd=max_cost,
        max_latency_ms=draw(_maybe(st.integers(0, 400), 4)),
        policy_map=draw(policy_tables()),
        custom_classifiers=draw(st.booleans()),
        hooks=frozenset(draw(st.sets(st.sampled_from(("start", "success", "failure"))))),
        fallbacks=fallbacks,
        declared_model=declared,
        resume_from=resume_from,
        node_timeouts=node_timeouts,
        node_policies=node_policies,
    )


def policy_for(config: MachineConfig, step: Step, cls: FailureClass) -> tuple[int, float]:
    """(max_retries, backoff) by the documented lookup: node override, step, run, default."""
    for table in (config.node_policies.get(step.step_id, ()), step.policies, config.policy_map):
        for c, retries, backoff in table:
            if c == cls:
                return retries, backoff
    default = default_policy_map()[cls]
    return default.max_retries, default.backoff_seconds


def retry_bound(config: MachineConfig, step: Step) -> int:
    """The most attempts a step may make: 1 + the largest max_retries of a class that
    retries (TERMINAL never does, whatever its policy says)."""
    return 1 + max(
        policy_for(config, step, cls)[0] for cls in FailureClass if cls != FailureClass.TERMINAL
    )


# ----------------------------------------------------------------------------- scenarios

StepScript = tuple[Any, ...]  # per attempt: an Outcome, or a tuple of them for a group


@attrs.frozen
class Scenario:
    plan: Plan
    initial: BaseModel = attrs.field(eq=False)
    config: MachineConfig
    script: Mapping[str, StepScript] = attrs.field(hash=False)
    classifier_answer: FailureClass | None = None
    hook_errors: bool = False
    has_checkpoint: bool = True

    def outcome(self, step_id: str, attempt: int) -> Any:
        attempts = self.script.get(step_id, ())
        return attempts[attempt - 1] if attempt <= len(attempts) else None


@st.composite
def scenarios(draw: st.DrawFn, max_steps: int = 5) -> Scenario:
    """A random plan, config and per-attempt script (see the module docstring)."""
    plan = draw(plans(max_steps))
    config = draw(configs(plan))
    script: dict[str, StepScript] = {}
    for step in plan.steps:
        if isinstance(step, ParallelStep):
            n = len(step.children)
            per_attempt = st.lists(outcomes(), min_size=n, max_size=n).map(tuple)
            script[step.step_id] = tuple(draw(st.lists(per_attempt, max_size=4)))
        else:
            script[step.step_id] = tuple(draw(st.lists(outcomes(), max_size=5)))
    return Scenario(
        plan=plan,
        initial=draw(st.sampled_from((Num(value=0), Tagged(value=0, tag="init")))),
        config=config,
        script=script,
        classifier_answer=draw(st.sampled_from((None, *FailureClass))),
        hook_errors=draw(st.booleans()),
        has_checkpoint=draw(st.booleans()),
    )


# -------------------------------------------------------------------------- the world


def _exception(kind: str, node_id: str, timeout_ms: int | None) -> Exception:
    if kind == "value":
        return ValueError(f"node {node_id!r} produced a malformed value")
    if kind == "timeout":
        return TimeoutError(f"node {node_id!r} timed out after {timeout_ms} ms")
    return CustomError(f"node {node_id!r} hit a provider error")


class ScriptedWorld:
    """Answers the machine's effects from a scenario's script, on a virtual clock."""

    def __init__(self, scenario: Scenario, *, hook_errors: bool | None = None) -> None:
        self.scenario = scenario
        self.now = scenario.config.started_at
        self.hook_errors = scenario.hook_errors if hook_errors is None else hook_errors
        self.hooks_fired = 0
        self.table: Mapping[type, Callable[[Any], Any]] = {
            fx.CallNode: self.call_node,
            fx.CallParallel: self.call_parallel,
            fx.ClassifyFailure: self.classify,
            fx.FireHook: self.fire_hook,
            fx.Sleep: self.sleep,
            fx.LoadCheckpoint: self.load,
        }

    def __call__(self, effect: Any) -> Any:
        return self.table[type(effect)](effect)

    def outcome_event(self, call: fx.CallNode, outcome: Outcome | None) -> Any:
        """The event for one node call with this outcome (the clock does not move)."""
        if outcome is None:
            outcome = DEFAULT
        if isinstance(outcome, Ok):
            return fx.NodeReturned(
                node_output(call.node_id, call.input), self.now, outcome.duration_ms,
                outcome.input_tokens, outcome.output_tokens, outcome.model,
            )
        if isinstance(outcome, BadOutput):
            return fx.NodeReturned(
                {"value": "not a number"}, self.now, outcome.duration_ms, outcome.input_tokens
            )
        exc = _exception(outcome.kind, call.node_id, call.timeout_ms)
        duration = outcome.duration_ms
        if outcome.kind == "timeout" and call.timeout_ms is not None:
            duration = call.timeout_ms
        return fx.NodeRaised(error_info(exc), self.now, duration)

    def call_node(self, eff: fx.CallNode) -> Any:
        event = self.outcome_event(eff, self.scenario.outcome(eff.node_id, eff.attempt))
        self.now += timedelta(milliseconds=event.duration_ms)
        return event

    def call_parallel(self, eff: fx.CallParallel) -> fx.ParallelReturned:
        scripted = self.scenario.outcome(eff.step_id, eff.attempt) or ()
        events: list[Any] = []
        failed = False
        for i, call in enumerate(eff.calls):
            if failed:  # a sibling raised first: this child was cancelled
                events.append(fx.NodeCancelled(self.now, 0))
                continue
            event = self.outcome_event(call, scripted[i] if i < len(scripted) else None)
            failed = isinstance(event, fx.NodeRaised)
            events.append(event)
        duration = max((e.duration_ms for e in events), default=0)
        result = fx.ParallelReturned(self.now, duration, tuple(events))
        self.now += timedelta(milliseconds=duration)
        return result

    def classify(self, eff: fx.ClassifyFailure) -> fx.FailureClassified:
        if eff.error.type_name.endswith(".CustomError"):
            return fx.FailureClassified((self.scenario.classifier_answer,))
        return fx.FailureClassified((None,))

    def fire_hook(self, eff: fx.FireHook) -> fx.HookFired:
        self.hooks_fired += 1
        if self.hook_errors and self.hooks_fired % 2:
            return fx.HookFired(error_info(RuntimeError(f"{eff.kind} hook is down")))
        return fx.HookFired()

    def sleep(self, eff: fx.Sleep) -> fx.Slept:
        self.now += timedelta(seconds=eff.seconds)
        return fx.Slept(eff.seconds)

    def load(self, eff: fx.LoadCheckpoint) -> fx.CheckpointLoaded:
        state = eff.schema.model_validate(CHECKPOINT) if self.scenario.has_checkpoint else None
        return fx.CheckpointLoaded(eff.node_id, state)


# ---------------------------------------------------------------- agent plans, run live
#
# Specs for random plans with loops, routes and waits nested in seq, parallel groups and
# map_each, turned into real plans of counting nodes by ``AgentBuilder`` (run live with
# ``interpret``, unlike the scripted scenarios above). A spec is a tree of tuples:
#
#   ("node", add, n_items, fail_times, fail_kind)     fail_kind: timeout | value | contract
#   ("wait", typed)                                   await_input of the next wait field
#                                                     (typed: with input=AgentState)
#   ("seq", [spec, ...]) | ("par", [spec, ...], limit) | ("map", body, limit)
#   ("loop", body, mod, max_iterations)               until: tick % mod == 0 (mod 0: never)
#   ("route", [arm, ...], default)                    selector: f"k{tick % 3}"; default a
#                                                     spec or None (unknown key: TERMINAL)
#
# Every node adds one to the counter field ``tick``, which loops and routes decide on, and
# writes the idempotency key it was given into ``key`` (and into its error messages), so
# the trace ties every attempt to its key.


class Approval(BaseModel):
    """What a wait receives."""

    ok: bool
    n: int = 0


WAIT_FIELDS = ("w0", "w1", "w2", "w3", "w4", "w5", "w6", "w7")


class Leaf(BaseModel):
    """A list item, which a map_each's body gets; it has the wait fields too, so a body can
    wait."""

    value: int = 0
    tick: int = 0
    w0: Approval | None = None
    w1: Approval | None = None
    w2: Approval | None = None
    w3: Approval | None = None
    w4: Approval | None = None
    w5: Approval | None = None
    w6: Approval | None = None
    w7: Approval | None = None


class AgentState(Leaf):
    """The state of an agent plan: ``tick`` counts the nodes that ran on the way to it,
    ``key`` is the idempotency key of the last of them."""

    key: str = ""
    items: list[Leaf] = []


ROUTE_KEYS = ("k0", "k1", "k2")
AGENT_FAIL_KINDS = ("timeout", "value", "contract")
KEY_MARK = "key="


def agent_node_specs(failures: bool = True) -> st.SearchStrategy[tuple[Any, ...]]:
    fails = st.sampled_from([0, 0, 0, 0, 1, 2]) if failures else st.just(0)
    kinds = st.sampled_from(("timeout", "value", "timeout", "value", "contract"))
    return st.tuples(st.just("node"), st.integers(-2, 4), st.integers(0, 3), fails, kinds)


def _agent_extend(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    lists = st.lists(children, min_size=1, max_size=3)
    limits = st.sampled_from([None, 1, 2])
    return st.one_of(
        st.tuples(st.just("seq"), lists),
        st.tuples(st.just("par"), lists, limits),
        st.tuples(st.just("map"), children, limits),
        st.tuples(st.just("loop"), children, st.integers(0, 3), st.integers(1, 3)),
        st.tuples(st.just("route"), lists, st.one_of(st.none(), children)),
    )


def agent_specs(
    *, failures: bool = True, waits: bool = True, max_leaves: int = 7
) -> st.SearchStrategy[list[Any]]:
    """A list of 2..4 spec trees (a plan's top-level steps); at most ``len(WAIT_FIELDS)``
    waits in all (a plan has a field per wait)."""
    leaves: st.SearchStrategy[Any] = agent_node_specs(failures)
    if waits:
        leaves = st.one_of(leaves, leaves, st.tuples(st.just("wait"), st.booleans()))
    tree = st.recursive(leaves, _agent_extend, max_leaves=max_leaves)
    return st.lists(tree, min_size=2, max_size=4).filter(
        lambda specs: count_waits(specs) <= len(WAIT_FIELDS))


def count_waits(spec: Any) -> int:
    if isinstance(spec, list):
        return sum(count_waits(s) for s in spec)
    if spec[0] == "wait":
        return 1
    return sum(count_waits(s) for s in spec[1:] if isinstance(s, tuple | list))


class Called(AssertionError):
    """A node ran when it must not (during a replay)."""


ONE_FAILING_PER_GROUP = "one failing node per group"


class AgentBuilder:
    """Turns agent specs into a plan of counting nodes.

    ``calls`` counts the calls of each logical call (by its idempotency key): a node fails
    its first ``fail_times`` calls of a key, so its outcomes follow its attempts, not how
    often it ran before a crash. ``called`` lists every call as (node id, key);
    ``tripwire``, when set, is awaited as a node call starts (before it is counted), so a
    test can cancel the run there.
    """

    def __init__(self, *, calm_groups: bool | str = False) -> None:
        # calm_groups: nodes inside a parallel group or a map_each never fail (True), or
        # only the first node built in each outermost group may (ONE_FAILING_PER_GROUP).
        # Which of two failing children fails a group's attempt first (and so which retry
        # policy is spent) depends on the order the children were scheduled in, which
        # trio randomizes, and which a resume changes (the children that finished before
        # it do not run again): two live runs of such a plan need not be alike (its
        # replay is).
        self.calm_groups = calm_groups
        self._groups = 0  # how many groups the node being built is inside
        self._group_fails = False  # a node of the outermost group being built may fail
        self.calls: Counter[str] = Counter()
        self.called: list[tuple[str, str]] = []
        self.replaying = False
        self.tripwire: Callable[[], Awaitable[None]] | None = None
        self.count = 0
        self.waits = 0
        self.node_ids: list[str] = []
        self.loops: dict[str, int] = {}  # loop id -> max_iterations

    def _id(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def plan(self, specs: list[Any]) -> Plan:
        """The specs' plan, after a first node that makes two items (so a group first in
        the plan has a state to check its waits against, and a map_each has items)."""
        return seq(self.node(("node", 0, 2, 0, "value")), *(self.build(s) for s in specs))

    def _enter_group(self) -> None:
        if not self._groups:
            self._group_fails = False
        self._groups += 1

    def node(self, spec: tuple[Any, ...]) -> Any:
        _, add, n_items, fail_times, fail_kind = spec
        if self.calm_groups and self._groups:
            if self.calm_groups != ONE_FAILING_PER_GROUP or self._group_fails:
                fail_times = 0
            elif fail_times:
                self._group_fails = True
        node_id = self._id("n")
        self.node_ids.append(node_id)

        async def fn(s: AgentState, ctx: dict[str, Any]) -> Any:
            if self.replaying:
                raise Called(f"{node_id} ran during replay")
            if self.tripwire is not None:
                await self.tripwire()
            key = ctx["_stroma_idempotency_key"]
            self.calls[key] += 1
            self.called.append((node_id, key))
            if self.calls[key] <= fail_times:
                if fail_kind == "timeout":
                    raise TimeoutError(f"{node_id} timed out ({KEY_MARK}{key})")
                if fail_kind == "value":
                    raise ValueError(f"{node_id} is unsure ({KEY_MARK}{key})")
                return {"value": "not an int", "key": key}  # a contract violation: TERMINAL
            value = s.value + add
            items = [{"value": value + j, "tick": s.tick + j} for j in range(n_items)]
            # Every field, as a dict: a parallel child merges what it returned, and a
            # model's unset fields are not kept alike after a resume (see test_merge).
            return {**s.model_dump(), "value": value, "tick": s.tick + 1, "key": key,
                    "items": items}

        fn.__name__ = fn.__qualname__ = node_id
        return stroma_node(node_id, NodeContract(
            node_id=node_id, input_schema=AgentState, output_schema=AgentState))(fn)

    def tail(self) -> Any:
        return self.node(("node", 1, 1, 0, "value"))

    def build(self, spec: tuple[Any, ...]) -> Any:
        kind = spec[0]
        if kind == "node":
            return self.node(spec)
        if kind == "wait":
            name = WAIT_FIELDS[self.waits % len(WAIT_FIELDS)]
            self.waits += 1
            return await_input(name, Approval, input=AgentState if spec[1] else None)
        if kind == "seq":
            # A list, compiled where it is placed (seq(...) compiles at once, and a group
            # of waits first in it has no state to be checked against yet).
            return [self.build(s) for s in spec[1]]
        if kind == "par":
            # Each child that is not a node ends with one, so that what it adds to the
            # merge is its node's whole output (a wait's output is a model whose unset
            # fields depend on whether the child was resumed: see test_merge).
            self._enter_group()
            children = [self.build(s) for s in spec[1]]
            self._groups -= 1
            return parallel(*children, max_concurrency=spec[2])
        if kind == "map":
            self._enter_group()
            body = self.build(spec[1])
            self._groups -= 1
            return map_each(body, over="items", into=self._id("outs"),
                            max_concurrency=spec[2], input=AgentState)
        if kind == "loop":
            _, body, mod, most = spec
            loop_id = self._id("L")
            self.loops[loop_id] = most
            return loop(self.build(body), until=_until(mod), max_iterations=most, name=loop_id)
        assert kind == "route"
        _, arms, default = spec
        routes = {ROUTE_KEYS[i]: self.build(arm) for i, arm in enumerate(arms)}
        return route(_select, routes, default=None if default is None else self.build(default),
                     name=self._id("R"))


def _until(mod: int) -> Callable[[Any], bool]:
    def until(s: Any) -> bool:
        return mod != 0 and s.tick % mod == 0

    return until


def _select(s: Any) -> str:
    return ROUTE_KEYS[s.tick % len(ROUTE_KEYS)]


def payload_for(key: str) -> dict[str, Any]:
    """The input a test sends to the wait at ``key``: a function of the key alone."""
    return {"ok": True, "n": zlib.crc32(key.encode()) % 97}
