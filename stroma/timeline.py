"""A run as a timeline: rows of attempt bars, read from its effect log (pure, no I/O).

This module is the one place that knows how an effect log's records describe what a run
did. Everything that shows a run (``python -m stroma show``, ``show --json``, ``show --svg``,
``runs``, the web UI) reads a ``Timeline`` and never the records, so the log's format can
change without touching them.

``timeline(log)`` gives a ``Timeline``:

* run-level facts: ``run_id``, ``status`` (the finished run's status, e.g. ``COMPLETED``,
  or ``running/crashed`` for a log without a Finish), ``started_at``, ``duration_ms`` (wall
  clock, from the start to the end of the last attempt or backoff), ``tokens``,
  ``cost_usd``, ``latency_ms`` (the sum of attempt durations), ``stop_reason``, and
  ``marks`` (where the run was resumed or restarted, which branch arms were taken);
* ``rows``, in the order the steps first ran: one per step (a node, a ``parallel`` or
  ``map_each`` group, a branch whose predicate raised) and, under a group, one per fan-out
  child (``child_index``; ``item_index`` for a ``map_each`` item). A child that is a
  sub-plan of one node is one row; a longer sub-plan is a row for the child with a row
  per node of it beneath (``parent`` is the key of the row above, ``depth`` its level);
* each row's ``bars``, one per attempt: ``start``/``offset_ms``, ``duration_ms``,
  ``outcome`` (``ok``, ``RECOVERABLE``, ``TERMINAL``, ``AMBIGUOUS``, ``cancelled`` for a
  fan-out child cancelled by a failing sibling, ``budget stop`` for an attempt a spent
  budget did not start, ``unfinished`` for a fan-out still in flight when the log ends),
  ``message``, ``input_state``, ``output_state``, ``usage`` (tokens in/out, model, cost)
  and ``hook_errors``; and its ``gaps``, the backoff sleeps between attempts.

Fan-out children's attempts come from the group's record (one outcome per child and group
attempt; a sub-plan child's own attempts from the records it ran). For a run that crashed
inside a fan-out, the children that had finished are in the log on their own (they are
made durable at once) and show as the group's ``unfinished`` attempt.

``Timeline.to_json()`` is the documented JSON shape (``show --json``); ``summary(tl)`` is
the line a run gets in a list of runs (``runs``, the UI's run list).

A log whose records do not have the shapes this reader expects is a ``LogCorrupted``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

import attrs
from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from stroma import effects as fx
from stroma.cost import estimate_cost_usd
from stroma.errors import LogCorrupted, StromaKeyError, StromaTypeError
from stroma.failures import Located, builtin_class_for_names, where_text
from stroma.inputs import pending_wait
from stroma.log import EffectLog, ResumeMarker
from stroma.trace import RunStatus

__all__ = (
    "BUDGET_STOP",
    "CANCELLED",
    "DAMAGED",
    "FAILURE_OUTCOMES",
    "NO_LOG",
    "OK",
    "OUTCOMES",
    "RUNNING_OR_CRASHED",
    "UNFINISHED",
    "WAITING",
    "Bar",
    "Gap",
    "Mark",
    "Row",
    "RunSummary",
    "Timeline",
    "Usage",
    "Wait",
    "damaged_summary",
    "json_safe",
    "no_log_summary",
    "summary",
    "timeline",
    "where_label",
)

# Outcomes of an attempt, besides the failure classes' names.
OK = "ok"
CANCELLED = "cancelled"
BUDGET_STOP = "budget stop"
UNFINISHED = "unfinished"
WAITING = "waiting"  # an await_input step that found no input (the run ended WAITING)
FAILURE_OUTCOMES = ("RECOVERABLE", "AMBIGUOUS", "TERMINAL")
OUTCOMES = (OK, *FAILURE_OUTCOMES, CANCELLED, BUDGET_STOP, UNFINISHED, WAITING)

# Run statuses besides those of a finished run (RunStatus values).
RUNNING_OR_CRASHED = "running/crashed"
NO_LOG = "no log"
DAMAGED = "damaged"

_MAP_ID = re.compile(r"^map_each\(.*, over=(\w+), into=(\w+)\)$")

_Coords = tuple[tuple[str, str, int], ...]


def where_label(coords: Sequence[Sequence[Any]]) -> str:
    """Coordinates as a row's label shows them: ``@agent#3`` for iteration 3 of the loop
    ``agent``, ``@agent#3 item 2`` for item 2 of a map_each in it, ``@outer#1/inner#2`` for
    nested loops; "" for none."""
    text = ""
    after_loop = False
    for kind, step, n in coords:
        if kind == "loop":
            text += ("/" if after_loop else (" @" if text else "@")) + f"{step}#{n}"
            after_loop = True
        else:
            text += (" " if text else "") + f"item {n}"
            after_loop = False
    return text


_where = where_text  # coordinates as ``TraceEvent.where`` writes them


def _coords(value: Any) -> _Coords:
    return tuple((str(k), str(step), int(n)) for k, step, n in (value or ()))


# ------------------------------------------------------------------------ the values


@attrs.frozen
class Usage:
    """What an attempt used: tokens in and out, the model that priced them, the cost."""

    input_tokens: int = 0
    output_tokens: int = 0
    model: str | None = None
    cost_usd: float = 0.0

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def __add__(self, other: Usage) -> Usage:
        model = self.model if other.model in (None, self.model) else (
            other.model if self.model is None else None
        )
        return Usage(self.input_tokens + other.input_tokens,
                     self.output_tokens + other.output_tokens, model,
                     self.cost_usd + other.cost_usd)

    def to_json(self) -> dict[str, Any]:
        return {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                "tokens": self.tokens, "model": self.model, "cost_usd": self.cost_usd}


@attrs.frozen
class Bar:
    """One attempt of a row's step.

    ``attempt`` is the attempt as the machine counts it for this row (for a fan-out child,
    its group's attempt); ``group_attempt`` is the attempt of the group it ran in (None at
    the top level). ``offset_ms`` is the start relative to the run's start.
    """

    attempt: int
    start: datetime
    offset_ms: float
    duration_ms: int
    outcome: str
    message: str | None = None
    input_state: Any = None
    output_state: Any = None
    usage: Usage = Usage()
    group_attempt: int | None = None
    hook_errors: tuple[str, ...] = ()

    @property
    def end_ms(self) -> float:
        return self.offset_ms + self.duration_ms

    @property
    def failed(self) -> bool:
        return self.outcome in FAILURE_OUTCOMES or self.outcome == BUDGET_STOP

    def to_json(self) -> dict[str, Any]:
        return {
            "attempt": self.attempt, "group_attempt": self.group_attempt,
            "start": self.start.isoformat(), "offset_ms": self.offset_ms,
            "duration_ms": self.duration_ms, "outcome": self.outcome,
            "message": self.message, "input_state": self.input_state,
            "output_state": self.output_state, "usage": self.usage.to_json(),
            "hook_errors": list(self.hook_errors),
        }


@attrs.frozen
class Gap:
    """A backoff sleep after attempt ``after_attempt`` of a row's step."""

    after_attempt: int
    offset_ms: float
    duration_ms: float
    group_attempt: int | None = None

    @property
    def end_ms(self) -> float:
        return self.offset_ms + self.duration_ms

    def to_json(self) -> dict[str, Any]:
        return {"after_attempt": self.after_attempt, "group_attempt": self.group_attempt,
                "offset_ms": self.offset_ms, "duration_ms": self.duration_ms}


@attrs.frozen
class Row(Located):
    """A step of the run, or a fan-out child, with its attempts.

    ``kind`` is ``node``, ``parallel``, ``map``, ``branch``, ``child`` (a fan-out child
    shown as one row), ``plan`` (a sub-plan child whose nodes have rows beneath it) or
    ``group`` (a fan-out in flight when the log ends whose step is not otherwise known).
    """

    key: str
    label: str
    step_id: str
    kind: str
    depth: int = 0
    parent: str | None = None
    child_index: int | None = None
    item_index: int | None = None
    bars: tuple[Bar, ...] = ()
    gaps: tuple[Gap, ...] = ()
    coords: _Coords = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key, "label": self.label, "step_id": self.step_id, "kind": self.kind,
            "depth": self.depth, "parent": self.parent, "child_index": self.child_index,
            "item_index": self.item_index, "iteration": self.iteration, "item": self.item,
            "where": self.where, "coords": [list(c) for c in self.coords],
            "bars": [b.to_json() for b in self.bars],
            "gaps": [g.to_json() for g in self.gaps],
        }


@attrs.frozen
class Mark:
    """A moment of the run: ``resumed`` (after a crash or a wait) or ``restarted``
    (``resume_from``), ``label`` saying when; ``branch``, ``label`` saying which arm was
    taken; ``route`` (the key a route's selector chose), ``until`` (a loop's answer after
    an iteration), ``wait`` (an await_input step found no input: the run stopped) and
    ``input`` (the input was there). ``row`` is the key of the row it belongs to (the
    wait's row; for a route, the row of the step it went on with), ``where`` its
    coordinates as ``TraceEvent.where`` says them."""

    kind: str
    label: str
    offset_ms: float | None
    row: str | None = None
    where: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "label": self.label, "offset_ms": self.offset_ms,
                "row": self.row, "where": self.where}


@attrs.frozen
class Wait:
    """What a WAITING run waits for: the input ``key`` (its ``name`` with the coordinates
    of a wait in a loop or map, e.g. ``approval@agent#3``), the ``schema``'s class name, the
    ``digest`` of the state it asks about (``send_input(..., digest=)``), the wait's step
    and where it is."""

    name: str
    key: str
    schema: str
    digest: str
    step_id: str
    where: str = ""
    timeout_ms: int | None = None

    @property
    def short_digest(self) -> str:
        return self.digest[:8]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key, "schema": self.schema,
                "digest": self.digest, "step_id": self.step_id, "where": self.where,
                "timeout_ms": self.timeout_ms}


@attrs.frozen
class Timeline:
    """A run read from its effect log: run-level facts and rows of attempt bars."""

    run_id: str
    status: str
    finished: bool
    started: str
    started_at: datetime | None
    duration_ms: int
    latency_ms: int
    tokens: int
    cost_usd: float
    stop_reason: str | None
    plan: str
    rows: tuple[Row, ...]
    marks: tuple[Mark, ...] = ()
    waits: tuple[Wait, ...] = ()

    @property
    def attempts(self) -> int:
        """The attempts of the run's own steps (fan-out children and waits not counted)."""
        return sum(1 for r in self.rows if r.depth == 0 for b in r.bars
                   if b.outcome != WAITING)

    @property
    def failures(self) -> int:
        """The failed attempts of the run's own steps."""
        return sum(1 for r in self.rows if r.depth == 0 for b in r.bars if b.failed)

    def row(self, key: str) -> Row:
        """The row with ``key`` (KeyError naming the keys there are)."""
        for r in self.rows:
            if r.key == key:
                return r
        raise StromaKeyError(f"no row {key!r} in the timeline of {self.run_id!r}; rows: "
                             f"{', '.join(r.key for r in self.rows)}")

    def to_json(self) -> dict[str, Any]:
        """The documented JSON shape (``python -m stroma show STORE RUN --json``)."""
        return {
            "run_id": self.run_id, "status": self.status, "finished": self.finished,
            "started": self.started, "duration_ms": self.duration_ms,
            "latency_ms": self.latency_ms, "tokens": self.tokens, "cost_usd": self.cost_usd,
            "stop_reason": self.stop_reason, "plan": self.plan,
            "attempts": self.attempts, "failures": self.failures,
            "marks": [m.to_json() for m in self.marks],
            "waiting_for": [w.to_json() for w in self.waits],
            "rows": [r.to_json() for r in self.rows],
        }


@attrs.frozen
class RunSummary:
    """One run in a list of runs: its status and totals (``problem`` for a damaged log)."""

    run_id: str
    status: str
    started: str | None = None
    duration_ms: int | None = None
    tokens: int = 0
    cost_usd: float = 0.0
    attempts: int = 0
    failures: int = 0
    stop_reason: str | None = None
    problem: str | None = None
    waiting_for: tuple[Wait, ...] = ()
    # Of a run that has not ended: the worker holding its lease (running it now), if the
    # store leases runs and someone does; None for a run whose worker is gone (crashed).
    held_by: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id, "status": self.status, "started": self.started,
            "duration_ms": self.duration_ms, "tokens": self.tokens, "cost_usd": self.cost_usd,
            "attempts": self.attempts, "failures": self.failures,
            "stop_reason": self.stop_reason, "problem": self.problem,
            "waiting_for": [w.to_json() for w in self.waiting_for],
            "held_by": self.held_by,
        }


def summary(tl: Timeline) -> RunSummary:
    """The run-list line of a timeline."""
    return RunSummary(tl.run_id, tl.status, tl.started, tl.duration_ms, tl.tokens,
                      tl.cost_usd, tl.attempts, tl.failures, tl.stop_reason,
                      waiting_for=tl.waits)


def damaged_summary(run_id: str, problem: str) -> RunSummary:
    """The run-list line of a run whose log cannot be read."""
    return RunSummary(run_id, DAMAGED, problem=problem)


def no_log_summary(run_id: str) -> RunSummary:
    """The run-list line of a run that has checkpoints but no effect log."""
    return RunSummary(run_id, NO_LOG)


# --------------------------------------------------------------------- the reader


def _json(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if value is None or isinstance(value, dict | list | str | int | float | bool):
        return value
    return to_jsonable_python(value, fallback=repr)


def _end(start: datetime, duration_ms: float) -> datetime:
    return start + timedelta(milliseconds=duration_ms)


class _RowBuild:
    __slots__ = ("bars", "child_index", "coords", "depth", "gaps", "item_index", "key", "kind",
                 "label", "parent", "step_id")

    def __init__(self, key: str, label: str, step_id: str, kind: str, depth: int,
                 parent: str | None, child_index: int | None, item_index: int | None,
                 coords: _Coords = ()) -> None:
        self.key, self.label, self.step_id, self.kind = key, label, step_id, kind
        self.depth, self.parent = depth, parent
        self.child_index, self.item_index = child_index, item_index
        self.coords = coords
        self.bars: list[dict[str, Any]] = []
        self.gaps: list[dict[str, Any]] = []


def _key(step_id: str, coords: _Coords) -> str:
    """A row's key: its step, and where it ran (a step has a row per loop iteration)."""
    return f"{step_id}@{_where(coords)}" if coords else step_id


def _label(step_id: str, coords: _Coords, context: _Coords) -> str:
    """A row's label: its step, and where it ran beyond its scope's own coordinates."""
    rel = coords[len(context):] if coords[:len(context)] == context else coords
    return f"{step_id} {where_label(rel)}" if rel else step_id


class _Reader:
    def __init__(self, log: EffectLog) -> None:
        self.log = log
        self.rows: dict[str, _RowBuild] = {}
        # (kind, label, at, row, where); a route's row and where wait for the next step
        self.marks: list[list[Any]] = []
        self.clock: datetime | None = None  # the end of the last thing seen
        # Reading the group in flight when the log ends (a cancelled child there is a
        # sub-plan still running, its commits kept as the group's progress).
        self.at_end = False
        # The prices the run went by (its header keeps them; an older log's: KNOWN_MODELS).
        kept = log.header.config.get("prices")
        self.prices: dict[str, tuple[float, float]] | None = None
        if isinstance(kept, dict):
            self.prices = {str(m): (float(p[0]), float(p[1])) for m, p in kept.items()
                           if isinstance(p, list | tuple) and len(p) == 2}

    def row(self, key: str, label: str, step_id: str, kind: str, depth: int,
            parent: str | None, child_index: int | None = None,
            item_index: int | None = None, coords: _Coords = ()) -> _RowBuild:
        row = self.rows.get(key)
        if row is None:
            row = _RowBuild(key, label, step_id, kind, depth, parent, child_index, item_index,
                            coords)
            self.rows[key] = row
        elif kind != "node" and row.kind == "node":
            row.kind = kind
        return row

    def bar(self, row: _RowBuild, **bar: Any) -> dict[str, Any]:
        bar.setdefault("hook_errors", [])
        bar.setdefault("usage", Usage())
        bar.setdefault("group_attempt", None)
        row.bars.append(bar)
        end = _end(bar["start"], bar["duration_ms"])
        if self.clock is None or end > self.clock:
            self.clock = end
        return bar

    # -- one scope: the run, or a sub-plan child's own records

    def walk(self, records: Iterable[Any], *, prefix: str, parent: str | None, depth: int,
             group_attempt: int | None, solo: tuple[str, str, int | None, int | None] | None,
             state: Any, context: _Coords = ()) -> tuple[Any, dict[str, Any] | None, Any]:
        """Read records into rows; returns (the Finish or None, the last bar, the state).
        ``context`` is the scope's own coordinates (a sub-plan child's, in a loop or map)."""
        pending: tuple[Any, Any] | None = None
        branch: tuple[str, str] | None = None  # (step id, "branch" or "route") just asked
        last: tuple[_RowBuild, dict[str, Any]] | None = None
        hooks: dict[tuple[str, int], list[str]] = {}
        made: list[dict[str, Any]] = []  # the bars of this scope's own steps
        finish: Any = None
        coords: _Coords = ()  # the coordinates of the last step record
        loops: set[str] = set()  # the loops seen in them: a ChooseBranch of one is its until
        placing: list[list[Any]] = []  # route marks waiting for the step they went on with
        waiting: dict[str, dict[str, Any]] = {}  # a wait's row key -> its waiting bar
        # The mark of an input the run just read: if the run then ends WAITING at once,
        # the input did not fit (the machine refused it, and the run waits on).
        received: list[Any] | None = None
        top = depth == 0
        # Choices made inside a fan-out child are marked too, named by where the child is
        # (its item of a map_each) when its own coordinates do not say it.
        inside = "" if top or not context else f"{where_label(context)}: "

        def moment() -> datetime | None:
            """When the scope's last step ended (a backoff recorded, not waited, aside)."""
            if last is None:
                return self.clock
            return _end(last[1]["start"], last[1]["duration_ms"])

        def placed(row_key: str, where: _Coords) -> None:
            for mark in placing:
                mark[1] = f"{mark[1]} {where_label(where)}".rstrip() + mark.pop()
                mark[3], mark[4] = row_key, _where(where)
            placing.clear()

        for rec in records:
            if isinstance(rec, ResumeMarker):
                if top:
                    self.marks.append(["restarted" if rec.restart is not None else "resumed",
                                       f"at {rec.at}", _parse(rec.at), None, ""])
                pending = None
                continue
            effect, event = rec
            kind = type(effect)
            if kind is fx.CallNode or kind is fx.CallParallel:
                pending = (effect, event)
            elif kind is fx.RecordAttempt or kind is fx.Commit:
                received = None
                coords = _coords(effect.coords)
                loops.update(step for k, step, _ in coords if k == "loop")
                row, bar = self.attempt(effect, pending, branch, prefix=prefix, parent=parent,
                                        depth=depth, group_attempt=group_attempt, solo=solo,
                                        context=context)
                placed(row.key, coords)
                if bar["outcome"] == OK:
                    state = bar["output_state"]
                made.append(bar)
                last = (row, bar)
                pending, branch = None, None
            elif kind is fx.AwaitInput:
                coords = _coords(effect.coords)
                loops.update(step for k, step, _ in coords if k == "loop")
                step_id = effect.step_id
                if solo is not None:  # a fan-out child that is this wait alone: its row
                    key, label, child_index, item_index = solo
                    row = self.row(key, label, step_id, "child", depth, parent, child_index,
                                   item_index, coords)
                else:
                    key = prefix + _key(step_id, coords)
                    row = self.row(key, _label(step_id, coords, context), step_id, "wait",
                                   depth, parent, coords=coords)
                placed(row.key, coords)
                here = f"{step_id} {where_label(coords)}".rstrip()
                schema = str(effect.schema).rsplit(":", 1)[-1].rsplit(".", 1)[-1]
                if isinstance(event, fx.InputMissing):
                    received = None
                    text = (f"waiting for {effect.key} ({schema}), digest "
                            f"{effect.digest[:8]}")
                    waiting[key] = self.bar(
                        row, attempt=effect.attempt, start=event.at, duration_ms=0,
                        outcome=WAITING, message=text, input_state=state, output_state=None,
                        group_attempt=group_attempt, node_id=step_id, called=False)
                    self.marks.append(["wait", f"{here}: {text}", event.at, key,
                                       _where(coords)])
                elif isinstance(event, fx.InputReceived):
                    waited = waiting.pop(key, None)
                    if waited is not None:  # the wait lasted until the input was read
                        waited["duration_ms"] = max(0, int(
                            (event.at - waited["start"]).total_seconds() * 1000))
                    if top:
                        received = ["input", f"{here}: {effect.key} received", event.at,
                                    key, _where(coords)]
                        self.marks.append(received)
                pending, branch = None, None
            elif kind is fx.Sleep:
                if last is not None:
                    row, bar = last
                    start = _end(bar["start"], bar["duration_ms"])
                    seconds = event.seconds if isinstance(event, fx.Slept) else effect.seconds
                    row.gaps.append({"after_attempt": bar["attempt"], "start": start,
                                     "duration_ms": float(seconds) * 1000.0,
                                     "group_attempt": group_attempt})
                    gap_end = _end(start, float(seconds) * 1000.0)
                    if self.clock is None or gap_end > self.clock:
                        self.clock = gap_end
            elif kind is fx.FireHook:
                if isinstance(event, fx.HookFired) and event.error is not None:
                    hooks.setdefault((effect.node_id, effect.attempt), []).append(
                        f"on_node_{effect.kind}: {event.error.short}"
                    )
            elif kind is fx.ChooseBranch:
                sid = effect.step_id
                branch = (sid, "branch")
                ok = isinstance(event, fx.BranchChosen) and event.error is None
                if ok and sid in loops:  # a loop's until, after an iteration
                    n = next((n for k, step, n in coords if k == "loop" and step == sid), 0)
                    at = coords[:next(i for i, c in enumerate(coords) if c[1] == sid) + 1] if (
                        n) else ()
                    then = "yes, the loop ends" if event.taken else f"no, on to #{n + 1}"
                    self.marks.append(["until", f"{inside}{sid}#{n}: {then}", moment(),
                                       None, _where(at)])
                elif ok:
                    arm = "then" if event.taken else "otherwise"
                    self.marks.append(["branch", f"{inside}{sid}: {arm}", self.clock, None,
                                       _where(context)])
            elif kind is fx.ChooseRoute:
                branch = (effect.step_id, "route")
                if isinstance(event, fx.RouteChosen) and event.error is None:
                    mark = ["route", effect.step_id, moment(), None, "",
                            f": {event.key}"]
                    self.marks.append(mark)
                    placing.append(mark)
            elif kind is fx.Finish:
                finish = effect
                if received is not None and effect.status is RunStatus.WAITING:
                    received[1] += f", refused: {effect.reason}" if effect.reason else \
                        ", refused: it did not fit"
                received = None
                if (pending is not None and type(pending[0]) is fx.CallParallel
                        and type(pending[1]) is fx.ParallelReturned):
                    # A group whose children wait for input: the run ended at it, WAITING,
                    # with no attempt recorded; its row shows the children and their waits.
                    row, bar = self.waiting_group(pending, prefix=prefix, parent=parent,
                                                  depth=depth, group_attempt=group_attempt,
                                                  context=context, state=state)
                    placed(row.key, row.coords)
                    made.append(bar)
                    last = (row, bar)
        for mark in placing:  # the run ended before a route's step began
            mark[1] += mark.pop()
        # Hook errors belong to the attempt they fired for.
        for bar in made if hooks else ():
            found = hooks.get((bar["node_id"], bar["attempt"]))
            if found:
                bar["hook_errors"] = list(found)
        if finish is not None and last is not None:
            row, bar = last
            if (bar["outcome"] == "RECOVERABLE" and not bar["called"]
                    and finish.status is RunStatus.PARTIAL and bar["message"] == finish.reason):
                bar["outcome"] = BUDGET_STOP
        return finish, (last[1] if last else None), state

    def attempt(self, ra: Any, pending: tuple[Any, Any] | None,
                branch: tuple[str, str] | None, *, prefix: str, parent: str | None, depth: int,
                group_attempt: int | None,
                solo: tuple[str, str, int | None, int | None] | None, context: _Coords = (),
                ) -> tuple[_RowBuild, dict[str, Any]]:
        event = ra.event  # the states as JSON
        step_id = event.node_id
        coords = _coords(event.coords)
        call, answer = pending if pending is not None else (None, None)
        if call is not None and getattr(call, "node_id", getattr(call, "step_id", None)) != step_id:
            call, answer = None, None
        if isinstance(call, fx.CallParallel):
            kind = "map" if call.kind == "map" else "parallel"
        elif call is None and branch is not None and branch[0] == step_id:
            kind = branch[1]
        elif call is None and step_id.startswith("await_input("):
            kind = "wait"
        else:
            kind = "node"
        if solo is not None:
            key, label, child_index, item_index = solo
            row = self.row(key, label, step_id, "child", depth, parent, child_index, item_index,
                           coords)
        else:
            row = self.row(prefix + _key(step_id, coords), _label(step_id, coords, context),
                           step_id, kind, depth, parent, coords=coords)
        if event.failure is not None:
            outcome = str(event.failure)
        elif event.output_state is None:
            outcome = CANCELLED
        else:
            outcome = OK
        usage = Usage()
        if isinstance(call, fx.CallNode) and isinstance(answer, fx.NodeReturned):
            usage = _usage(call, answer, self.prices)
        bar = self.bar(
            row, attempt=event.attempt, start=event.timestamp_utc,
            duration_ms=int(event.duration_ms), outcome=outcome,
            message=event.failure_message, input_state=event.input_state,
            output_state=event.output_state, usage=usage, group_attempt=group_attempt,
            node_id=step_id, called=call is not None,
        )
        if isinstance(call, fx.CallParallel) and isinstance(answer, fx.ParallelReturned):
            bar["usage"] = self.children(
                row, call.calls, answer.outcomes, group=call, input_state=event.input_state,
                failure=event.failure, depth=depth,
            )
        return row, bar

    def waiting_group(self, pending: tuple[Any, Any], *, prefix: str, parent: str | None,
                      depth: int, group_attempt: int | None, context: _Coords, state: Any,
                      ) -> tuple[_RowBuild, dict[str, Any]]:
        call, answer = pending
        step_id = call.step_id
        coords = _group_coords(step_id, call.calls)
        kind = "map" if call.kind == "map" else "parallel"
        row = self.row(prefix + _key(step_id, coords), _label(step_id, coords, context),
                       step_id, kind, depth, parent, coords=coords)
        waiting = [o for o in answer.outcomes
                   if type(o) is fx.PlanFinished and o.status is RunStatus.WAITING]
        bar = self.bar(
            row, attempt=call.attempt, start=answer.started_at,
            duration_ms=int(answer.duration_ms), outcome=WAITING,
            message=f"{len(waiting)} of its children wait for input", input_state=state,
            output_state=None, group_attempt=group_attempt, node_id=step_id, called=True)
        bar["usage"] = self.children(row, call.calls, answer.outcomes, group=call,
                                     input_state=state, failure=None, depth=depth)
        return row, bar

    def children(self, group_row: _RowBuild, calls: Sequence[Any], outcomes: Sequence[Any],
                 *, group: Any, input_state: Any, failure: Any, depth: int,
                 attempt: int | None = None) -> Usage:
        """A group attempt's children; returns their usage summed."""
        is_map = group_row.kind == "map" or getattr(group, "kind", None) == "map"
        over = _map_over(group_row.step_id) if is_map else None
        if is_map and over is None and isinstance(input_state, dict):
            # A map in flight whose id is not known: the state's one list long enough.
            lists = [k for k, v in input_state.items()
                     if isinstance(v, list) and len(v) >= len(calls)]
            over = lists[0] if len(lists) == 1 else None
        items = input_state.get(over) if over and isinstance(input_state, dict) else None
        first_fail = next(
            (k for k, o in enumerate(outcomes)
             if isinstance(o, fx.NodeRaised) or (
                 isinstance(o, fx.PlanFinished)
                 and o.status not in (RunStatus.COMPLETED, RunStatus.RESUMED))),
            None,
        )
        indices = getattr(group, "indices", None) or range(len(calls))
        total = Usage()
        for k, (call, outcome) in enumerate(zip(calls, outcomes, strict=False)):
            if outcome is None:
                continue
            j = indices[k]  # the child's index in the group (a retry runs only some)
            if is_map:
                child_input = _item(items, j)
            else:
                child_input = input_state
            total = total + self.child(
                group_row, j, call, outcome, is_map=is_map, child_input=child_input,
                group_failure=failure if k == first_fail else None, depth=depth,
                group_attempt=attempt if attempt is not None else call.attempt,
            )
        return total

    def child(self, group_row: _RowBuild, j: int, call: Any, outcome: Any, *, is_map: bool,
              child_input: Any, group_failure: Any, depth: int, group_attempt: int) -> Usage:
        key = f"{group_row.key}[{j}]"
        item = j if is_map else None
        coords = group_row.coords + ((("item", group_row.step_id, j),) if is_map else ())
        if isinstance(call, fx.RunPlan) and isinstance(outcome, fx.PlanFinished):
            return self.sub_plan(group_row, key, j, item, call, outcome, depth=depth,
                                 child_input=child_input, group_attempt=group_attempt,
                                 coords=coords)
        node_id = str(getattr(call, "node_id", None) or getattr(call, "child_id", f"child {j}"))
        label = _child_label(node_id, j if is_map else None, group_row.coords)
        row = self.row(key, label, node_id, "child", depth + 1, group_row.key, j, item, coords)
        usage = Usage()
        message = None
        output = None
        if isinstance(outcome, fx.NodeReturned):
            result = OK
            output = _json(outcome.output)
            usage = _usage(call, outcome, self.prices)
        elif isinstance(outcome, fx.NodeRaised):
            cls = group_failure if group_failure is not None else builtin_class_for_names(
                outcome.error.type_names)
            result = str(cls)
            message = outcome.error.message or outcome.error.type_name.rsplit(".", 1)[-1]
        elif isinstance(outcome, fx.NodeCancelled) and self.at_end:
            result = UNFINISHED
            commits = sum(1 for e, _ in outcome.records if isinstance(e, fx.Commit))
            message = f"running when the log ends: {commits} commit(s) kept"
        elif isinstance(outcome, fx.NodeCancelled):
            result = CANCELLED
            message = "cancelled: a sibling failed first (or the group's deadline passed)"
        else:
            raise TypeError(f"a fan-out child's outcome is a {type(outcome).__name__}")
        self.bar(row, attempt=getattr(call, "attempt", group_attempt),
                 start=outcome.started_at, duration_ms=int(outcome.duration_ms),
                 outcome=result, message=message, input_state=child_input,
                 output_state=output, usage=usage, group_attempt=group_attempt,
                 node_id=node_id, called=True)
        return usage

    def sub_plan(self, group_row: _RowBuild, key: str, j: int, item: int | None, call: Any,
                 outcome: Any, *, depth: int, child_input: Any, group_attempt: int,
                 coords: _Coords = ()) -> Usage:
        records = list(outcome.records)
        steps: list[str] = []
        nested = False
        for rec in records:
            if isinstance(rec, ResumeMarker):
                continue
            eff = rec[0]
            if isinstance(eff, fx.RecordAttempt | fx.Commit | fx.AwaitInput):
                sid = eff.step_id if isinstance(eff, fx.AwaitInput) else eff.node_id
                if sid not in steps:
                    steps.append(sid)
            elif isinstance(eff, fx.CallParallel | fx.ChooseBranch):
                nested = True
        name = steps[0] if len(steps) == 1 else f"seq({', '.join(steps)})"
        label = _child_label(name, item, group_row.coords)
        usage = Usage(int(outcome.total_tokens), 0, None, float(outcome.total_cost_usd))
        if len(steps) == 1 and not nested:
            # One node: the child's row is that node's, with its own attempts and backoffs.
            self.walk(records, prefix=key + "/", parent=group_row.key, depth=depth + 1,
                      group_attempt=group_attempt, solo=(key, label, j, item),
                      state=child_input, context=coords)
            return self._summed(key, group_attempt) or usage
        row = self.row(key, label, call.child_id, "plan", depth + 1, group_row.key, j, item,
                       coords)
        if outcome.status in (RunStatus.COMPLETED, RunStatus.RESUMED):
            result, message = OK, None
        elif outcome.status is RunStatus.WAITING:
            result, message = WAITING, outcome.reason
        else:
            result = "TERMINAL" if outcome.status is RunStatus.FAILED else _last_failure(records)
            message = outcome.reason
        start = outcome.started_at or self.clock or _parse(self.log.header.started_at)
        assert start is not None
        self.bar(row, attempt=call.attempt, start=start, duration_ms=int(outcome.duration_ms),
                 outcome=result, message=message, input_state=child_input,
                 output_state=_json(outcome.output) if result == OK else None, usage=usage,
                 group_attempt=group_attempt, node_id=call.child_id, called=True)
        self.walk(records, prefix=key + "/", parent=key, depth=depth + 2,
                  group_attempt=group_attempt, solo=None, state=child_input, context=coords)
        return usage

    def _summed(self, key: str, group_attempt: int) -> Usage:
        total = Usage()
        for bar in self.rows[key].bars if key in self.rows else ():
            if bar["group_attempt"] == group_attempt:
                total = total + bar["usage"]
        return total

    # -- a crash inside a fan-out: the children that had finished

    def _unknown_group(self, pending: dict[int, tuple[Any, Any]], state: Any) -> _RowBuild:
        """The row of a fan-out in flight whose group record was never written."""
        calls = [c for c, _ in pending.values()]
        # A node child's coordinates are its group's, and its item in a map_each.
        where = next((_coords(c.coords) for c in calls if getattr(c, "coords", ())), ())
        if where and where[-1][0] == "item":
            where = where[:-1]
        for c in calls:  # a sub-plan child's id is its group's id and its index
            child_id = getattr(c, "child_id", None)
            if isinstance(child_id, str) and child_id.endswith("]") and "[" in child_id:
                step_id = child_id[: child_id.rindex("[")]
                kind = "map" if _map_over(step_id) else "parallel"
                return self.row(step_id, step_id, step_id, kind, 0, None)
        for c in calls:  # a map_each's node children carry its id in their coordinates
            inner = _coords(getattr(c, "coords", ()))
            if inner and inner[-1][0] == "item":
                step_id = inner[-1][1]
                return self.row(_key(step_id, where), _label(step_id, where, ()), step_id,
                                "map", 0, None, coords=where)
        names = sorted({str(getattr(c, "node_id", "?")) for c in calls})
        if len(names) == 1 and len(calls) > 1:  # one node for every child: a map_each
            return self.row("(in flight)", f"map_each({names[0]}) in flight",
                            "(in flight)", "map", 0, None)
        return self.row("(in flight)", f"fan-out in flight ({', '.join(names)})",
                        "(in flight)", "group", 0, None)

    def in_flight(self, pending: dict[int, tuple[Any, Any]], state: Any) -> None:
        if not pending:
            return
        first_call = pending[min(pending)][0]
        attempt = int(getattr(first_call, "attempt", 1))
        top = [r for r in self.rows.values() if r.depth == 0]
        group: _RowBuild | None = None
        if top and top[-1].kind in ("parallel", "map") and top[-1].bars:
            last = top[-1].bars[-1]
            if last["outcome"] != OK and last["attempt"] + 1 == attempt:
                group = top[-1]  # the group failed, backed off, and was being retried
        if group is None:
            group = self._unknown_group(pending, state)
        width = max(pending) + 1
        calls: list[Any] = [None] * width
        outcomes: list[Any] = [None] * width
        for j, (call, outcome) in pending.items():
            calls[j], outcomes[j] = call, outcome
        started = [o.started_at for o in outcomes if o is not None]
        ends = [_end(o.started_at, o.duration_ms) for o in outcomes if o is not None]
        start = min(started)
        self.at_end = True
        usage = self.children(group, calls, outcomes, group=None, input_state=state,
                              failure=None, depth=0, attempt=attempt)
        self.at_end = False
        running = sum(1 for o in outcomes if isinstance(o, fx.NodeCancelled))
        done = sum(1 for o in outcomes if o is not None) - running
        message = f"in flight when the log ends: {done} child(ren) had finished"
        if running:
            message += f", {running} still running"
        self.bar(group, attempt=attempt, start=start,
                 duration_ms=int((max(ends) - start).total_seconds() * 1000),
                 outcome=UNFINISHED,
                 message=message,
                 input_state=state, output_state=None, usage=usage, node_id=group.step_id,
                 called=True)


def _group_coords(step_id: str, calls: Sequence[Any]) -> _Coords:
    """Where a group is, from its children's coordinates (a map item's end in its item)."""
    for c in calls:
        inner = getattr(c, "coords", None)
        if inner is None:
            inner = getattr(getattr(c, "config", None), "coords", None)
        where = _coords(inner or ())
        if where and where[-1][0] == "item" and where[-1][1] == step_id:
            where = where[:-1]
        if inner is not None:
            return where
    return ()


def _child_label(name: str, item: int | None, group: _Coords) -> str:
    """A fan-out child's label: ``fetch [item 2]`` at the top, ``fetch @agent#3 item 2``
    in iteration 3 of the loop ``agent``."""
    if not group:
        return f"{name} [item {item}]" if item is not None else name
    return f"{name} {where_label(group)}" + (f" item {item}" if item is not None else "")


def _usage(call: Any, answer: fx.NodeReturned,
           prices: dict[str, tuple[float, float]] | None = None) -> Usage:
    """What an answer used; the model is the one that priced its tokens (the fallback the
    call was given, else the one the node reported), or the one the node reported when it
    used none: a call given a fallback it did not use (a tool) shows no model."""
    tin, tout = int(answer.input_tokens), int(answer.output_tokens)
    if not (tin or tout):
        return Usage(0, 0, answer.model, 0.0)
    model = getattr(call, "model", None) or answer.model
    return Usage(tin, tout, model, estimate_cost_usd(model, tin, tout, prices=prices))


def _map_over(step_id: str) -> str | None:
    m = _MAP_ID.match(step_id)
    return m.group(1) if m else None


def _item(items: Any, j: int) -> Any:
    if not isinstance(items, list) or j >= len(items):
        return None
    value = items[j]
    return value if isinstance(value, dict) else {"item": value}


def _last_failure(records: Sequence[Any]) -> str:
    for rec in reversed(records):
        if not isinstance(rec, ResumeMarker) and isinstance(rec[0], fx.RecordAttempt):
            failure = rec[0].failure
            if failure is not None:
                return str(failure)
    return "AMBIGUOUS"


def _parse(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None


def _ms(t: datetime, t0: datetime) -> float:
    return round((t - t0).total_seconds() * 1000.0, 3)


def timeline(log: EffectLog) -> Timeline:
    """The timeline of a run, from its effect log (see the module's docstring)."""
    if not isinstance(log, EffectLog):
        raise StromaTypeError(f"timeline(log): log must be an EffectLog (got "
                              f"{type(log).__name__}): pass result.log or await "
                              "store.read_log(run_id)")
    try:
        return _timeline(log)
    except LogCorrupted:
        raise
    except (AttributeError, KeyError, IndexError, TypeError, ValueError, OverflowError) as e:
        raise LogCorrupted(
            f"the effect log of run {log.header.run_id!r}",
            f"a record does not have the shape of one stroma writes ({type(e).__name__}: {e})",
        ) from None


def _timeline(log: EffectLog) -> Timeline:
    header = log.header
    reader = _Reader(log)
    initial = (header.config.get("initial") or {}).get("state")
    finish, _, state = reader.walk(
        log.records, prefix="", parent=None, depth=0, group_attempt=None, solo=None,
        state=initial,
    )
    if finish is None:
        reader.in_flight(log.pending_children(), state)
    started_at = _parse(header.started_at)
    starts = [b["start"] for r in reader.rows.values() for b in r.bars]
    t0 = started_at or (min(starts) if starts else None)
    rows: list[Row] = []
    for r in reader.rows.values():
        bars = tuple(
            Bar(b["attempt"], b["start"], _ms(b["start"], t0) if t0 else 0.0,
                b["duration_ms"], b["outcome"], b["message"], b["input_state"],
                b["output_state"], b["usage"], b["group_attempt"], tuple(b["hook_errors"]))
            for b in r.bars
        )
        gaps = tuple(
            Gap(g["after_attempt"], _ms(g["start"], t0) if t0 else 0.0, g["duration_ms"],
                g["group_attempt"])
            for g in r.gaps
        )
        rows.append(Row(r.key, r.label, r.step_id, r.kind, r.depth, r.parent, r.child_index,
                        r.item_index, bars, gaps, r.coords))
    ordered = _tree_order(rows)
    top_usage = Usage()
    latency = 0
    for done in ordered:
        if done.depth == 0:
            for bar in done.bars:
                if bar.outcome == WAITING:
                    continue
                top_usage = top_usage + bar.usage
                latency += bar.duration_ms
    duration = 0
    if t0 is not None and reader.clock is not None:
        duration = max(0, round((reader.clock - t0).total_seconds() * 1000))
    marks = tuple(Mark(kind, label, _ms(at, t0) if (at and t0) else None, row, where)
                  for kind, label, at, row, where in reader.marks)
    if finish is not None:
        return Timeline(
            header.run_id, str(finish.status), True, header.started_at, started_at, duration,
            int(finish.total_latency_ms), int(finish.total_tokens),
            float(finish.total_cost_usd), finish.reason, header.plan, tuple(ordered), marks,
            _waits(log),
        )
    return Timeline(
        header.run_id, RUNNING_OR_CRASHED, False, header.started_at, started_at, duration,
        latency, top_usage.tokens, top_usage.cost_usd, None, header.plan, tuple(ordered), marks,
    )


def _waits(log: EffectLog) -> tuple[Wait, ...]:
    """What a WAITING run waits for (the waits ``send_input`` answers)."""
    return tuple(
        Wait(w.name, w.key, str(w.schema).rsplit(":", 1)[-1].rsplit(".", 1)[-1], w.digest,
             w.step_id, _where(_coords(w.coords)), w.timeout_ms)
        for w in pending_wait(log)
    )


def _tree_order(rows: list[Row]) -> list[Row]:
    """Rows in first-seen order, each followed by the rows beneath it."""
    below: dict[str | None, list[Row]] = {}
    for r in rows:
        below.setdefault(r.parent, []).append(r)
    out: list[Row] = []

    def visit(parent: str | None) -> None:
        # Children in argument order (a group's attempts may finish them in any order).
        for r in sorted(below.get(parent, ()), key=lambda x: x.child_index or 0):
            out.append(r)
            visit(r.key)

    visit(None)
    seen = {r.key for r in out}
    out.extend(r for r in rows if r.key not in seen)  # rows whose parent never showed up
    return out


def json_safe(value: Any) -> Any:
    """``value`` (a ``to_json()``) as strict JSON holds it, for scripts and browsers:
    floats that are not finite (which a log keeps as Python writes them) become the text
    ``"NaN"``, ``"Infinity"`` or ``"-Infinity"``, and keys become text."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value
