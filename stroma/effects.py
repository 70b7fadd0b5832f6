"""Effects (what the machine asks for) and events (what the world answered).

All of them are named tuples (immutable, and the cheapest values to make) compared by
value and by kind, so a replayed effect can be checked against the recorded one with
``==`` (and never equals a plain tuple or a value of another kind). Effects are commands, events are
past-tense facts; each effect that reaches the world is answered by exactly one event:

=================  ===========================================================
effect             answering event
=================  ===========================================================
CallNode           NodeReturned | NodeRaised | NodeCancelled
CallParallel       ParallelReturned (each child: one of the above, or PlanFinished)
RunPlan            PlanFinished (only as a CallParallel child)
ChooseBranch       BranchChosen (also a loop's ``until``, asked after each iteration)
ChooseRoute        RouteChosen
AwaitInput         InputReceived | InputMissing
ClassifyFailure    FailureClassified
FireHook           HookFired
Sleep              Slept
LoadCheckpoint     CheckpointLoaded
=================  ===========================================================

``Commit`` (a successful attempt: its trace record and its checkpoint, made durable
together), ``RecordAttempt`` (an attempt that did not succeed) and ``Finish`` (the end of
the run) are the machine's own account: they are logged and performed, and need no answer.

``Resumed`` is the one event no effect asks for: an interpreter that picks up a crashed
run's log reports where the recorded part ends and the live part begins.

States travel as their JSON text (``bytes``, as ``stroma.schemas.state_json`` makes it):
it is what a checkpoint stores and what the log keeps, and a value the garbage collector
never has to walk. Fields marked ``eq=False`` carry live objects (validated models, the
exception) that an interpreter needs but a log does not hold; they never take part in
comparisons (``stroma.values.named_value`` makes them so).
"""

from __future__ import annotations

import builtins
import json
from datetime import datetime
from typing import Any, NamedTuple

from pydantic import BaseModel

from stroma import errors
from stroma.failures import FailureClass
from stroma.trace import RunStatus, TraceEvent
from stroma.values import named_value

__all__ = (
    "AwaitInput",
    "BranchChosen",
    "CallNode",
    "CallParallel",
    "CheckpointLoaded",
    "ChooseBranch",
    "ChooseRoute",
    "ClassifyFailure",
    "Commit",
    "Effect",
    "ErrorInfo",
    "Event",
    "FailureClassified",
    "Finish",
    "FireHook",
    "HookFired",
    "InputMissing",
    "InputReceived",
    "LoadCheckpoint",
    "NodeCancelled",
    "NodeRaised",
    "NodeReturned",
    "ParallelReturned",
    "PlanFinished",
    "RecordAttempt",
    "Resumed",
    "RouteChosen",
    "RunPlan",
    "Sleep",
    "Slept",
    "Validated",
    "as_json_value",
)


def as_json_value(state: Any) -> Any:
    """A state as a JSON value (a dict): JSON text is parsed, a model dumped."""
    if type(state) is bytes:
        return json.loads(state)
    if isinstance(state, BaseModel):
        return state.model_dump(mode="json")
    return state


def _same_state(a: Any, b: Any) -> bool:
    """States compare by their JSON value: JSON text, a dict and a model may stand for one."""
    if a is b:
        return True
    if type(a) is type(b) and type(a) is not dict:
        return bool(a == b)
    return bool(as_json_value(a) == as_json_value(b))


@named_value(live=("exc",), unshown=("exc",))
class ErrorInfo(NamedTuple):
    """An exception as data: its type's MRO names (for classification) and message."""

    type_names: tuple[str, ...]
    message: str
    exc: BaseException | None = None

    @property
    def type_name(self) -> str:
        return self.type_names[0] if self.type_names else "builtins.Exception"

    @property
    def short(self) -> str:
        name = self.type_name.rsplit(".", 1)[-1]
        return f"{name}: {self.message}" if self.message else name

    def exception(self) -> BaseException:
        """The exception: the live one, else one of its recorded type made again (a
        built-in or a stroma error; RuntimeError for any other), for a hook or classifier
        asked about an error the machine made or the log recorded."""
        if self.exc is not None:
            return self.exc
        module, _, name = self.type_name.rpartition(".")
        home = {"builtins": builtins, "stroma.errors": errors}.get(module)
        cls = getattr(home, name, None) if home is not None else None
        if isinstance(cls, type) and issubclass(cls, Exception):
            try:
                return cls(self.message)
            except Exception:
                pass
        return RuntimeError(self.message)


class Validated(NamedTuple):
    """A node's output as the JSON text of a state that kept its contract ``schema``.

    A replayed ``NodeReturned`` carries its output this way: the log recorded it only
    after the machine had validated it (its ``Commit`` follows), so the machine takes it
    as the state without validating it again (the plan's fingerprint, which covers the
    contracts, is checked before any record is replayed).
    """

    json: bytes
    schema: str


# ----------------------------------------------------------------------------- effects


class CallNode(NamedTuple):
    """Call one node function with its validated input (``input``: live only, never
    compared)."""

    node_id: str
    attempt: int
    timeout_ms: int | None = None
    model: str | None = None  # fallback model to put in ctx["_stroma_model"], if any
    input: BaseModel | None = None
    # Where the call is made: the loop iterations and map items around it (see
    # TraceEvent.coords); with the run id and node id, what its idempotency key is made of.
    coords: tuple[tuple[str, str, int], ...] = ()

    # A named tuple (the cheapest immutable value to make, one per node) compared, hashed
    # and shown without its live input.
    def __eq__(self, other: object) -> bool:
        return (type(other) is CallNode and self[:4] == other[:4]
                and self[5] == other[5])

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    def __hash__(self) -> int:
        return hash((self[:4], self[5]))

    def __repr__(self) -> str:
        where = f", coords={self.coords!r}" if self.coords else ""
        return (f"CallNode(node_id={self.node_id!r}, attempt={self.attempt!r}, "
                f"timeout_ms={self.timeout_ms!r}, model={self.model!r}{where})")


@named_value(live=("group", "allowance"), unshown=("group", "allowance"))
class CallParallel(NamedTuple):
    """Run a group's children concurrently on their inputs.

    ``calls`` are the children still to run (a retry or a resume of the group leaves out
    those that already succeeded); ``indices`` says which child of the group each one is.
    The interpreter cancels the siblings once a child fails (``stroma.machine.child_fails``
    says which outcomes are failures), starts no more children once those that finished
    have spent the run's budget (``stroma.machine.group_budget_spent``, given
    ``allowance``: the budget and the run's totals when the group began; None without a
    budget), and reports every child's outcome, in ``calls`` order (one it did not
    start as cancelled).
    """

    step_id: str
    attempt: int
    calls: tuple[CallNode | RunPlan, ...] = ()
    max_concurrency: int | None = None
    timeout_ms: int | None = None
    kind: str = "parallel"  # or "map": one call per item of a list field
    indices: tuple[int, ...] = ()
    group: Any = None  # the group's step
    # (budget, tokens, cost_usd, latency_ms, prices) when the group began
    allowance: Any = None


_RUN_PLAN_LIVE = ("plan", "input", "config", "records", "partials")  # (live values)


@named_value(live=_RUN_PLAN_LIVE, unshown=_RUN_PLAN_LIVE)
class RunPlan(NamedTuple):
    """Run a whole sub-plan (a fan-out child that is more than one node) to its end."""

    child_id: str
    attempt: int
    plan_fingerprint: str
    plan: Any = None
    input: BaseModel | None = None
    config: Any = None
    # The child's records from an earlier, unfinished try (a group retried or resumed): the
    # child goes on from them instead of starting again; and the children that finished of
    # the group it was in when that try was cancelled (``NodeCancelled.partials``).
    records: tuple[Any, ...] = ()
    partials: tuple[Any, ...] = ()


@named_value(live=("state",), unshown=("state",))
class ChooseBranch(NamedTuple):
    """Ask a branch's predicate which arm to take, given the current state."""

    step_id: str
    state: BaseModel | None = None


@named_value()
class ClassifyFailure(NamedTuple):
    """Run the user's classifiers on a failed attempt, in order, until one answers."""

    node_id: str
    attempt: int
    error: ErrorInfo
    coords: tuple[tuple[str, str, int], ...] = ()


class FireHook(NamedTuple):
    """Call a user hook: ``kind`` is "start", "success" or "failure"; cancelled after
    ``timeout_ms`` (a hook that hangs must not hang the run)."""

    kind: str
    node_id: str
    attempt: int
    # The state's JSON text (start, success), compared by JSON value.
    state: Any = None
    tokens: int = 0
    failure: FailureClass | None = None
    error: ErrorInfo | None = None
    timeout_ms: int | None = None

    # A named tuple (two per node in a run with hooks), compared and hashed with its
    # state by JSON value.
    def __eq__(self, other: object) -> bool:
        return (type(other) is FireHook and self[:3] == other[:3]
                and self[4:] == other[4:] and _same_state(self.state, other.state))

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    def __hash__(self) -> int:
        return hash((self[:3], self[4:]))


@named_value()
class Sleep(NamedTuple):
    """Back off before a retry."""

    seconds: float


class Commit(NamedTuple):
    """A successful attempt: its trace record and its checkpoint, durable together.

    ``input_state`` and ``output_state`` are JSON text; ``schema`` is the output's schema
    reference (None in a record read from a format 1 log); ``state`` is the validated
    output model (live only: what a store's ``save`` gets).

    Two commits are equal when their fields are (states compared by JSON value), the
    schema reference aside: it names the class by its module, which is ``__main__`` in a
    script and the module's name when the same plan is imported (the plan's fingerprint
    covers the schemas themselves).
    """

    node_id: str
    run_id: str
    attempt: int
    timestamp_utc: datetime
    input_state: Any
    output_state: Any
    duration_ms: int
    schema: str | None
    state: BaseModel | None = None
    coords: tuple[tuple[str, str, int], ...] = ()

    def __eq__(self, other: object) -> bool:
        if type(other) is not Commit:
            return False
        assert isinstance(other, Commit)
        return (
            self.node_id == other.node_id
            and self.attempt == other.attempt
            and self.coords == other.coords
            and self.duration_ms == other.duration_ms
            and self.timestamp_utc == other.timestamp_utc
            and self.run_id == other.run_id
            and _same_state(self.output_state, other.output_state)
            and _same_state(self.input_state, other.input_state)
        )

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    def __hash__(self) -> int:  # (states may be dicts: a Commit is not hashed)
        raise TypeError("unhashable type: 'Commit'")

    def __repr__(self) -> str:
        return (f"Commit(node_id={self.node_id!r}, run_id={self.run_id!r}, "
                f"attempt={self.attempt!r}, timestamp_utc={self.timestamp_utc!r}, "
                f"duration_ms={self.duration_ms!r}, schema={self.schema!r})")

    @property
    def event(self) -> TraceEvent:
        """The trace event of the attempt."""
        return TraceEvent(
            self.node_id, self.run_id, self.attempt, self.timestamp_utc,
            as_json_value(self.input_state), as_json_value(self.output_state),
            self.duration_ms, coords=self.coords,
        )


@named_value(eq=False, unshown=("input_state", "output_state"))
class RecordAttempt(NamedTuple):
    """The machine's account of an attempt that did not succeed (failed, cancelled, or
    not started because a budget was spent); the trace is made of these and Commits.

    Two records are equal when their fields are, states compared by their JSON value.
    """

    node_id: str
    run_id: str
    attempt: int
    timestamp_utc: datetime
    input_state: Any
    output_state: Any
    duration_ms: int
    failure: FailureClass | None = None
    failure_message: str | None = None
    coords: tuple[tuple[str, str, int], ...] = ()
    # Live only, for observers (OpenTelemetry's error.type): the error the attempt failed
    # with; neither recorded nor compared (a replayed record has None).
    error: ErrorInfo | None = None

    def __eq__(self, other: object) -> bool:
        if type(other) is not RecordAttempt:
            return False
        assert isinstance(other, RecordAttempt)
        return (
            self.coords == other.coords
            and self.node_id == other.node_id
            and self.attempt == other.attempt
            and self.duration_ms == other.duration_ms
            and self.timestamp_utc == other.timestamp_utc
            and self.failure == other.failure
            and self.failure_message == other.failure_message
            and self.run_id == other.run_id
            and _same_state(self.output_state, other.output_state)
            and _same_state(self.input_state, other.input_state)
        )

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    def __hash__(self) -> int:  # (states may be dicts: a record is not hashed)
        raise TypeError("unhashable type: 'RecordAttempt'")

    @classmethod
    def of(cls, event: TraceEvent) -> RecordAttempt:
        """The record of an attempt described by a trace event."""
        return cls(
            event.node_id, event.run_id, event.attempt, event.timestamp_utc, event.input_state,
            event.output_state, event.duration_ms, event.failure, event.failure_message,
            event.coords,
        )

    @property
    def event(self) -> TraceEvent:
        return TraceEvent(
            self.node_id, self.run_id, self.attempt, self.timestamp_utc,
            as_json_value(self.input_state),
            None if self.output_state is None else as_json_value(self.output_state),
            self.duration_ms, self.failure, self.failure_message, self.coords,
        )


@named_value(live=("state",), unshown=("state",))
class ChooseRoute(NamedTuple):
    """Ask a route's selector which route to take, given the current state."""

    step_id: str
    state: BaseModel | None = None


@named_value(live=("schema",), unshown=("json_schema",))
class AwaitInput(NamedTuple):
    """Look for the input an ``await_input`` step waits for (sent with ``send_input``, or
    given to ``interpret``). ``key`` is where it is looked up (the name, with the
    coordinates of a wait inside a loop or map); ``schema`` its schema reference and
    ``json_schema`` its JSON Schema (to check a payload sent without the plan);
    ``digest`` identifies the state the input is asked about."""

    step_id: str
    name: str
    key: str
    attempt: int
    # Left out of comparisons, like a Commit's: it names the class by its module, which
    # is ``__main__`` in a run started as a script (the plan's fingerprint covers it).
    schema: str
    digest: str
    timeout_ms: int | None = None
    json_schema: str = ""
    coords: tuple[tuple[str, str, int], ...] = ()


@named_value(live=("schema",), unshown=("schema",))
class LoadCheckpoint(NamedTuple):
    """Load the checkpoint a resumed run starts from."""

    node_id: str
    schema: type[BaseModel] | None = None


@named_value(live=("final_state",), unshown=("final_state",))
class Finish(NamedTuple):
    """The run is over."""

    status: RunStatus
    final_state: BaseModel
    total_tokens: int
    total_cost_usd: float
    total_latency_ms: int
    reason: str | None = None


Effect = (
    CallNode
    | CallParallel
    | RunPlan
    | ChooseBranch
    | ChooseRoute
    | AwaitInput
    | ClassifyFailure
    | FireHook
    | Sleep
    | Commit
    | RecordAttempt
    | LoadCheckpoint
    | Finish
)

# ------------------------------------------------------------------------------ events


class NodeReturned(NamedTuple):
    """A node returned. ``output`` is what it returned, its usage already split off (or a
    ``Validated`` output, when replayed from a log; or an ``ErrorInfo`` when what it
    returned cannot be written as JSON, which fails the attempt); it takes no part in
    comparisons."""

    output: Any
    started_at: datetime
    duration_ms: int
    input_tokens: int = 0
    output_tokens: int = 0
    model: str | None = None

    def __eq__(self, other: object) -> bool:
        return type(other) is NodeReturned and self[1:] == other[1:]

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    def __hash__(self) -> int:
        return hash(self[1:])


@named_value()
class NodeRaised(NamedTuple):
    """A node raised (a timeout is a raise of TimeoutError)."""

    error: ErrorInfo
    started_at: datetime
    duration_ms: int


@named_value(live=("records", "partials"), unshown=("records", "partials"))
class NodeCancelled(NamedTuple):
    """A group's child was cancelled (a sibling failed, or the group's deadline passed)
    before it finished. ``records``: a sub-plan child's log up to then, so that a retry
    of the group goes on from there instead of starting the child again; ``partials``:
    if the sub-plan was inside a group of its own then, that group's children that had
    finished, as ``(child index, call, outcome)``, so they are not called again;
    ``total_tokens`` and ``total_cost_usd``: what the sub-plan had used until then, as its
    own run counted it (its nodes that returned were paid for: the run's totals and budget
    count them)."""

    started_at: datetime
    duration_ms: int
    records: Any = ()
    partials: tuple[tuple[int, Any, Any], ...] = ()
    total_tokens: int = 0
    total_cost_usd: float = 0.0


@named_value(live=("output", "records"), unshown=("records",))
class PlanFinished(NamedTuple):
    """A sub-plan ran to its end: its status, output and totals, and its own log records
    (a ``stroma.log.RecordList``: read as decoded records).

    ``output`` is the JSON value of the fields its steps set (what it returned)."""

    status: RunStatus
    output: Any
    total_tokens: int = 0
    total_cost_usd: float = 0.0
    total_latency_ms: int = 0
    reason: str | None = None
    started_at: datetime | None = None
    duration_ms: int = 0
    records: Any = ()


@named_value()
class ParallelReturned(NamedTuple):
    """Every child of a CallParallel has an outcome, in ``calls`` order;
    ``deadline_passed`` says the group's timeout expired before they all finished."""

    started_at: datetime
    duration_ms: int
    outcomes: tuple[NodeReturned | NodeRaised | NodeCancelled | PlanFinished, ...] = ()
    deadline_passed: bool = False


@named_value()
class BranchChosen(NamedTuple):
    """The predicate's answer (``error`` set when it raised)."""

    taken: bool
    error: ErrorInfo | None = None


@named_value()
class RouteChosen(NamedTuple):
    """The selector's answer: the route's key (``error`` set when the selector raised or
    gave something that is not a string)."""

    key: str | None
    error: ErrorInfo | None = None


@named_value(eq=False)
class InputReceived(NamedTuple):
    """The input a wait looked for is there: its payload (a JSON value), received ``at``."""

    payload: Any
    at: datetime

    def __eq__(self, other: object) -> bool:  # (the payload by its JSON value)
        return (type(other) is InputReceived and self.at == other.at
                and _same_state(self.payload, other.payload))

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    def __hash__(self) -> int:
        return hash(self.at)


@named_value()
class InputMissing(NamedTuple):
    """The input a wait looked for is not there yet (looked for ``at``)."""

    at: datetime


@named_value()
class FailureClassified(NamedTuple):
    """What the user's classifiers answered, in order, up to the first that answered.

    Each answer is a FailureClass, None (the classifier deferred) or a string saying why
    the classifier's answer could not be used (it raised, or returned something that is
    not a FailureClass); the machine skips those.
    """

    answers: tuple[FailureClass | str | None, ...] = ()

    @property
    def failure(self) -> FailureClass | None:
        """The first usable answer (None: every classifier deferred)."""
        for answer in self.answers:
            if isinstance(answer, FailureClass):
                return answer
        return None


@named_value()
class HookFired(NamedTuple):
    """A hook ran; ``error`` is set when it raised or timed out (the run goes on)."""

    error: ErrorInfo | None = None


@named_value()
class Slept(NamedTuple):
    seconds: float


@named_value(live=("state",), unshown=("state",))
class CheckpointLoaded(NamedTuple):
    """The checkpoint a resumed run starts from (None: the store has none); replayed from
    a log, its JSON value."""

    node_id: str
    state: Any = None


@named_value(live=("pending",))
class Resumed(NamedTuple):
    """The recorded part of a run ends here and the live part begins (``at``, ISO 8601).

    ``pending`` are the effects of the machine's last step that the log had not recorded:
    the machine answers with what to perform instead (the same effects, a finish now
    saying RESUMED, a group call for the children still to run).
    """

    at: str
    pending: tuple[Any, ...] = ()


Event = (
    PlanFinished
    | BranchChosen
    | RouteChosen
    | InputReceived
    | InputMissing
    | NodeReturned
    | NodeRaised
    | NodeCancelled
    | ParallelReturned
    | FailureClassified
    | HookFired
    | Slept
    | CheckpointLoaded
    | Resumed
)
