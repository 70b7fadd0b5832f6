"""What a run did: one ``TraceEvent`` per attempt, gathered in an ``ExecutionTrace``.

The trace is data only. The machine records an event for every finished attempt (a
success, a failure, or a parallel child cancelled by a sibling); the trace of a run is the
fold of those records over its effect log, so the same log always gives the same trace.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from stroma.errors import StromaTypeError
from stroma.failures import FailureClass, Located

if TYPE_CHECKING:
    from stroma.log import EffectLog

__all__ = (
    "ExecutionResult",
    "ExecutionTrace",
    "RunStatus",
    "TraceEvent",
    "format_trace_table",
)


class RunStatus(StrEnum):
    """How a run ended. ``str()`` gives the name (``COMPLETED``)."""

    COMPLETED = "COMPLETED"
    FAILED = "FAILED"  # a TERMINAL failure stopped the run
    PARTIAL = "PARTIAL"  # retries ran out, or the resume target was not in the sequence
    RESUMED = "RESUMED"  # finished after resuming from a checkpoint
    WAITING = "WAITING"  # stopped at an await_input step until its input is sent


@dataclass(slots=True)
class TraceEvent(Located):
    """One attempt of one node.

    ``output_state`` is None when the attempt failed (``failure`` is set) or was cancelled
    (``failure`` is None too). ``attempt`` is 1-based; ``timestamp_utc`` is when it started.
    """

    node_id: str
    run_id: str
    attempt: int
    timestamp_utc: datetime
    input_state: dict[str, Any]
    output_state: dict[str, Any] | None
    duration_ms: int
    failure: FailureClass | None = None
    failure_message: str | None = None
    # Where the attempt ran, outermost first: ("loop", loop id, iteration) for each loop
    # and ("item", map step id, item index) for each map_each around it; () at the top.
    coords: tuple[tuple[str, str, int], ...] = ()

    @property
    def step_id(self) -> str:
        """Alias of ``node_id``."""
        return self.node_id

    @property
    def outcome(self) -> str:
        """``ok``, the failure class's name, or ``cancelled``."""
        if self.failure is not None:
            return str(self.failure)
        return "cancelled" if self.output_state is None else "ok"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: the timestamp as an ISO string, the failure as its name."""
        return {
            "node_id": self.node_id,
            "run_id": self.run_id,
            "attempt": self.attempt,
            "timestamp_utc": self.timestamp_utc.isoformat(),
            "input_state": to_jsonable_python(self.input_state, fallback=repr),
            "output_state": to_jsonable_python(self.output_state, fallback=repr),
            "duration_ms": self.duration_ms,
            "failure": None if self.failure is None else str(self.failure),
            "failure_message": self.failure_message,
            **({"coords": [list(c) for c in self.coords]} if self.coords else {}),
        }


# Fields diff() compares; timestamps, durations and run ids are expected to differ.
_DIFF_FIELDS = ("input_state", "output_state", "failure", "failure_message")


class ExecutionTrace:
    """The events of a run, in the order the attempts finished."""

    __slots__ = ("_event_of", "_events", "_records")
    __hash__ = None  # type: ignore[assignment]  # mutable, compared by value

    def __init__(self, events: Iterable[TraceEvent] = ()) -> None:
        self._events: list[TraceEvent] = list(events)
        for n, event in enumerate(self._events):
            if not isinstance(event, TraceEvent):
                raise _not_an_event(f"ExecutionTrace(events): event {n}", event)
        self._records: list[Any] | Callable[[], list[Any]] | None = None
        self._event_of: Callable[[Any], TraceEvent] | None = None

    @classmethod
    def from_events(cls, events: Iterable[TraceEvent]) -> ExecutionTrace:
        return cls(events)

    @classmethod
    def from_records(
        cls, records: list[Any] | Callable[[], list[Any]],
        event_of: Callable[[Any], TraceEvent] | None = None,
    ) -> ExecutionTrace:
        """A trace folded from the machine's attempt records (anything with an ``event``
        property, or what ``event_of`` takes) when it is first read, so a run pays for its
        trace only if it is used. ``records`` may be a function giving them (called then)."""
        trace = cls()
        trace._records = records
        trace._event_of = event_of
        return trace

    @property
    def events(self) -> list[TraceEvent]:
        if self._records is not None:
            records = self._records() if callable(self._records) else self._records
            event_of = self._event_of
            if event_of is None:
                self._events = [r.event for r in records]
            else:
                self._events = [event_of(r) for r in records]
            self._records = None
        return self._events

    def append(self, event: TraceEvent) -> None:
        if not isinstance(event, TraceEvent):
            raise _not_an_event("ExecutionTrace.append(event): event", event)
        self.events.append(event)

    def events_for(
        self, node_id: str, *, iteration: int | None = None, item: int | None = None
    ) -> list[TraceEvent]:
        """Every attempt of one node, in order; ``iteration`` / ``item`` keep those of one
        loop iteration or one map item (the innermost)."""
        return [e for e in self.events if e.node_id == node_id
                and (iteration is None or e.iteration == iteration)
                and (item is None or e.item == item)]

    def failures(self) -> list[TraceEvent]:
        """The attempts that failed (a cancelled attempt is not a failure)."""
        return [e for e in self.events if e.failure is not None]

    def to_json(self) -> str:
        """The trace as JSON text: a list with one object per attempt, in order (see
        ``TraceEvent.to_dict``: models inside states in their JSON form, datetimes as ISO
        strings). ``json.loads(trace.to_json())`` gives the list back."""
        return json.dumps([e.to_dict() for e in self.events], ensure_ascii=False)

    def replay(self) -> list[TraceEvent]:
        """The events in order (a new list)."""
        return list(self.events)

    def diff(self, other: ExecutionTrace) -> list[str]:
        """Human-readable differences with ``other``; an empty list means equivalent.

        Events are keyed by ``(node_id, where, attempt)`` (``where``: the loop iteration
        and map item it ran in, see ``TraceEvent.where``) and compared in sorted key order
        on their states and failure, ignoring timestamps, durations and run ids. A node
        that ran more than once with the same key (a branch taken twice, a resumed run) is
        matched occurrence by occurrence: the n-th with the n-th. The lines read::

            Missing event in other trace: <node> attempt <n>
            Extra event in other trace: <node> attempt <n>
            Difference for <node> attempt <n>: <field>: <this> != <other>; ...

        with `` at <where>`` after the node inside a loop or map, and `` (occurrence <k>)``
        after the attempt number from the second occurrence on.
        """
        if not isinstance(other, ExecutionTrace):
            raise StromaTypeError(
                f"ExecutionTrace.diff(other): other must be an ExecutionTrace, got "
                f"{other!r:.80} (a {type(other).__name__}): pass another run's trace "
                "(result.trace), or ExecutionTrace(events) for a list of TraceEvents"
            )
        mine, theirs = _keyed(self.events), _keyed(other.events)
        lines: list[str] = []
        for key in sorted(mine.keys() | theirs.keys()):
            label = _label(key)
            event, twin = mine.get(key), theirs.get(key)
            if twin is None:
                lines.append(f"Missing event in other trace: {label}")
            elif event is None:
                lines.append(f"Extra event in other trace: {label}")
            else:
                changed = [
                    f"{name}: {getattr(event, name)!r} != {getattr(twin, name)!r}"
                    for name in _DIFF_FIELDS
                    if getattr(event, name) != getattr(twin, name)
                ]
                if changed:
                    lines.append(f"Difference for {label}: {'; '.join(changed)}")
        return lines

    def __len__(self) -> int:
        return len(self.events)

    def __iter__(self) -> Iterator[TraceEvent]:
        return iter(self.events)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ExecutionTrace):
            return NotImplemented
        return self.events == other.events

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled (and deep-copied) as its events: a trace not yet read holds a function
        # of the run's records, which is no data to send to another process.
        return (type(self), (self.events,))

    def __repr__(self) -> str:
        # (without folding a trace that was not read: asyncio shows a run's result in
        # its task's repr, and a folded trace is most of a finished run's memory)
        records = self._records
        if records is not None:
            if callable(records):  # (found once: asyncio asks for it twice as a run ends)
                records = self._records = records()
            n = len(records)
        else:
            n = len(self._events)
        return f"ExecutionTrace(<{n} events>)"


_Key = tuple[str, str, int, int]


def _not_an_event(what: str, found: object) -> StromaTypeError:
    return StromaTypeError(
        f"{what} must be a TraceEvent, got {found!r:.80} (a {type(found).__name__}): "
        "build one with TraceEvent(node_id=..., run_id=..., attempt=..., ...), or take it "
        "from another trace"
    )


def _keyed(events: list[TraceEvent]) -> dict[_Key, TraceEvent]:
    seen: dict[tuple[str, str, int], int] = {}
    out: dict[_Key, TraceEvent] = {}
    for e in events:
        where = e.where
        n = seen.get((e.node_id, where, e.attempt), 0)
        seen[(e.node_id, where, e.attempt)] = n + 1
        out[(e.node_id, where, e.attempt, n)] = e
    return out


def _label(key: _Key) -> str:
    node_id, where, attempt, n = key
    at = f" at {where}" if where else ""
    return f"{node_id}{at} attempt {attempt}" + (f" (occurrence {n + 1})" if n else "")


@dataclass(slots=True)
class ExecutionResult:
    """The outcome of a run. On failure ``final_state`` is the last valid state."""

    run_id: str
    status: RunStatus
    final_state: BaseModel
    trace: ExecutionTrace
    total_cost_usd: float
    total_tokens: int
    log: EffectLog | None = field(default=None, compare=False, repr=False)
    stop_reason: str | None = None


_MESSAGE_WIDTH = 60


def format_trace_table(trace: Iterable[TraceEvent]) -> str:
    """A fixed-width table of the attempts: node, attempt, outcome, duration_ms, message."""
    header = ("node", "attempt", "outcome", "duration_ms", "message")
    rows = [header]
    for e in trace:
        message = (e.failure_message or "").replace("\n", " ")
        if len(message) > _MESSAGE_WIDTH:
            message = message[: _MESSAGE_WIDTH - 3] + "..."
        rows.append((e.node_id, str(e.attempt), e.outcome, str(e.duration_ms), message))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    right = {1, 3}  # numbers are right-aligned

    def line(row: tuple[str, ...]) -> str:
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(rows[0]), rule, *(line(r) for r in rows[1:])])
