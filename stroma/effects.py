"""Effects (what the machine asks for) and events (what the world answered).

All of them are frozen attrs values, compared by value, so a replayed effect can be
checked against the recorded one with ``==``. They are slotted: a run's log keeps several
per node, and slotted objects are the least for the garbage collector to walk. Effects are
commands, events are past-tense facts; each effect that reaches the world is answered by
exactly one event:

=================  ===========================================
effect             answering event
=================  ===========================================
CallNode           NodeReturned | NodeRaised | NodeCancelled
CallParallel       ParallelReturned (each child: one of the above, or PlanFinished)
RunPlan            PlanFinished (only as a CallParallel child)
ChooseBranch       BranchChosen
ClassifyFailure    FailureClassified
FireHook           HookFired
Sleep              Slept
SaveCheckpoint     CheckpointSaved
LoadCheckpoint     CheckpointLoaded
=================  ===========================================

``RecordAttempt`` and ``Finish`` are the machine's own account (a trace event, the end of
the run): they are logged but need no answer.

Fields marked ``eq=False`` carry live objects (validated models, the exception) that an
interpreter needs but a log does not hold; they never take part in comparisons.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import attrs
from pydantic import BaseModel

from stroma.failures import FailureClass
from stroma.trace import RunStatus, TraceEvent

__all__ = (
    "BranchChosen",
    "CallNode",
    "ChooseBranch",
    "PlanFinished",
    "RunPlan",
    "CallParallel",
    "CheckpointLoaded",
    "CheckpointSaved",
    "ClassifyFailure",
    "Effect",
    "ErrorInfo",
    "Event",
    "FailureClassified",
    "Finish",
    "FireHook",
    "HookFired",
    "LoadCheckpoint",
    "NodeCancelled",
    "NodeRaised",
    "NodeReturned",
    "ParallelReturned",
    "RecordAttempt",
    "SaveCheckpoint",
    "Sleep",
    "Slept",
)


@attrs.frozen
class ErrorInfo:
    """An exception as data: its type's MRO names (for classification) and message."""

    type_names: tuple[str, ...]
    message: str
    exc: BaseException | None = attrs.field(default=None, eq=False, repr=False)

    @property
    def type_name(self) -> str:
        return self.type_names[0] if self.type_names else "builtins.Exception"

    @property
    def short(self) -> str:
        name = self.type_name.rsplit(".", 1)[-1]
        return f"{name}: {self.message}" if self.message else name


# ----------------------------------------------------------------------------- effects


@attrs.frozen
class CallNode:
    """Call one node function with its validated input."""

    node_id: str
    attempt: int
    timeout_ms: int | None = None
    model: str | None = None  # fallback model to put in ctx["_stroma_model"], if any
    input: BaseModel | None = attrs.field(default=None, eq=False, repr=False)


@attrs.frozen
class CallParallel:
    """Call several nodes concurrently on the same input; the first failure cancels the rest."""

    step_id: str
    attempt: int
    calls: tuple[CallNode | RunPlan, ...] = ()
    max_concurrency: int | None = None
    timeout_ms: int | None = None
    kind: str = "parallel"  # or "map": one call per item of a list field


@attrs.frozen
class RunPlan:
    """Run a whole sub-plan (a fan-out child that is more than one node) to its end."""

    child_id: str
    attempt: int
    plan_fingerprint: str
    plan: Any = attrs.field(eq=False, repr=False)
    input: BaseModel | None = attrs.field(default=None, eq=False, repr=False)
    config: Any = attrs.field(default=None, eq=False, repr=False)


@attrs.frozen
class ChooseBranch:
    """Ask a branch's predicate which arm to take, given the current state."""

    step_id: str
    state: BaseModel | None = attrs.field(default=None, eq=False, repr=False)


@attrs.frozen
class ClassifyFailure:
    """Run the user's classifiers (in order, first non-None wins) on a failed attempt."""

    node_id: str
    attempt: int
    error: ErrorInfo


@attrs.frozen
class FireHook:
    """Call a user hook: ``kind`` is "start", "success" or "failure"."""

    kind: str
    node_id: str
    attempt: int
    state: dict[str, Any] | None = None
    tokens: int = 0
    failure: FailureClass | None = None
    error: ErrorInfo | None = None


@attrs.frozen
class Sleep:
    """Back off before a retry."""

    seconds: float


@attrs.frozen
class SaveCheckpoint:
    """Persist a completed step's output (and flush the log up to here)."""

    node_id: str
    state: BaseModel = attrs.field(eq=False, repr=False)
    # The state's schema reference, as logged (so a store can rebuild the checkpoint from
    # the log); worked out from ``state`` when not given.
    schema: str | None = attrs.field(default=None, eq=False, repr=False)

    @property
    def schema_ref(self) -> str | None:
        if self.schema is not None:
            return self.schema
        cls = type(self.state)
        return None if self.state is None else f"{cls.__module__}:{cls.__qualname__}"


@attrs.frozen
class LoadCheckpoint:
    """Load the checkpoint a resumed run starts from."""

    node_id: str
    schema: type[BaseModel] = attrs.field(eq=False, repr=False)


def _as_json(value: Any) -> Any:
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


def _same_json(a: Any, b: Any) -> bool:
    """States compare by their JSON form (a live model equals its logged dict)."""
    if a is b:
        return True
    if type(a) is type(b):
        return bool(a == b)
    return bool(_as_json(a) == _as_json(b))


@attrs.frozen(eq=False)
class RecordAttempt:
    """The machine's account of one finished attempt; the trace is made of these.

    The states may be live models: their JSON form (the trace event's dicts) is made only
    when ``event`` is read, so a run pays for its trace only if someone looks at it. Two
    records are equal when their fields are, states compared by their JSON form (a live
    model equals the dict a log holds for it).
    """

    node_id: str
    run_id: str
    attempt: int
    timestamp_utc: datetime
    input_state: Any = attrs.field(repr=False)
    output_state: Any = attrs.field(repr=False)
    duration_ms: int
    failure: FailureClass | None = None
    failure_message: str | None = None

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not RecordAttempt:
            return NotImplemented
        assert isinstance(other, RecordAttempt)
        return (
            self.node_id == other.node_id
            and self.attempt == other.attempt
            and self.duration_ms == other.duration_ms
            and self.timestamp_utc == other.timestamp_utc
            and self.failure == other.failure
            and self.failure_message == other.failure_message
            and self.run_id == other.run_id
            and _same_json(self.output_state, other.output_state)
            and _same_json(self.input_state, other.input_state)
        )

    def __ne__(self, other: object) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    __hash__ = None  # type: ignore[assignment]  # states may be unhashable dicts

    @classmethod
    def of(cls, event: TraceEvent) -> RecordAttempt:
        """The record of an attempt described by a trace event."""
        return cls(
            event.node_id, event.run_id, event.attempt, event.timestamp_utc, event.input_state,
            event.output_state, event.duration_ms, event.failure, event.failure_message,
        )

    @property
    def event(self) -> TraceEvent:
        return TraceEvent(
            self.node_id, self.run_id, self.attempt, self.timestamp_utc,
            _as_json(self.input_state), _as_json(self.output_state), self.duration_ms,
            self.failure, self.failure_message,
        )


@attrs.frozen
class Finish:
    """The run is over."""

    status: RunStatus
    final_state: BaseModel = attrs.field(eq=False, repr=False)
    total_tokens: int
    total_cost_usd: float
    total_latency_ms: int
    reason: str | None = None


Effect = (
    CallNode
    | CallParallel
    | RunPlan
    | ChooseBranch
    | ClassifyFailure
    | FireHook
    | Sleep
    | SaveCheckpoint
    | LoadCheckpoint
    | RecordAttempt
    | Finish
)

# ------------------------------------------------------------------------------ events


@attrs.frozen
class NodeReturned:
    """A node returned. ``output`` is what it returned, its usage already split off."""

    output: Any = attrs.field(eq=False)
    started_at: datetime
    duration_ms: int
    input_tokens: int = 0
    output_tokens: int = 0
    model: str | None = None


@attrs.frozen
class NodeRaised:
    """A node raised (a timeout is a raise of TimeoutError)."""

    error: ErrorInfo
    started_at: datetime
    duration_ms: int


@attrs.frozen
class NodeCancelled:
    """A parallel child was cancelled because a sibling failed first."""

    started_at: datetime
    duration_ms: int


@attrs.frozen
class ParallelReturned:
    """Every child of a CallParallel has an outcome, in argument order."""

    started_at: datetime
    duration_ms: int
    outcomes: tuple[NodeReturned | NodeRaised | NodeCancelled | PlanFinished, ...] = ()


@attrs.frozen
class PlanFinished:
    """A sub-plan ran to its end: its status, output and totals, and its own log records."""

    status: RunStatus
    output: Any = attrs.field(eq=False)
    total_tokens: int = 0
    total_cost_usd: float = 0.0
    total_latency_ms: int = 0
    reason: str | None = None
    started_at: datetime | None = None
    duration_ms: int = 0
    records: tuple[Any, ...] = attrs.field(default=(), eq=False, repr=False)


@attrs.frozen
class BranchChosen:
    """The predicate's answer (``error`` set when it raised)."""

    taken: bool
    error: ErrorInfo | None = None


@attrs.frozen
class FailureClassified:
    """What the user's classifiers said: a class, or None to defer to the built-in rules."""

    failure: FailureClass | None


@attrs.frozen
class HookFired:
    """A hook ran; ``error`` is set when it raised (the run goes on regardless)."""

    error: ErrorInfo | None = None


@attrs.frozen
class Slept:
    seconds: float


@attrs.frozen
class CheckpointSaved:
    node_id: str


@attrs.frozen
class CheckpointLoaded:
    node_id: str
    state: BaseModel | None = attrs.field(eq=False, repr=False)


Event = (
    PlanFinished
    | BranchChosen
    | NodeReturned
    | NodeRaised
    | NodeCancelled
    | ParallelReturned
    | FailureClassified
    | HookFired
    | Slept
    | CheckpointSaved
    | CheckpointLoaded
)
