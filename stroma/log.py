"""The effect log: a header and one record per effect with the event that answered it.

Format (JSON lines, UTF-8, one object per line, keys in a fixed order):

* line 1, the header::

    {"stroma_log":1,"run_id":"...","plan":"<fingerprint>","seed":123,"version":"0.2.0",
     "started_at":"2026-11-23T16:00:00+00:00","config":{...}}

  ``config`` is what the machine needs to make the same decisions again: budget, retry
  policies, timeouts, which hooks were set, whether classifiers were, model fallbacks,
  ``resume_from``, and the initial state (its schema ref and JSON).

* then one line per record::

    {"i":0,"effect":{"t":"CallNode",...},"event":{"t":"NodeReturned",...}}

  ``event`` is null for the machine's own records (RecordAttempt, Finish). A
  CallParallel is one line for the group (its event without the outcomes) followed by
  one line per child: ``{"i":4,"child":0,"effect":{"t":"CallNode",..},"event":{..}}``.
* a fan-out child that finishes before its group is made durable at once as
  ``{"i":k,"partial":j,"effect":{..},"event":{..}}`` (k: the group's future index); the
  group's record supersedes these, so ``lines()`` keeps only those of a group in flight.
* a run resumed after a crash has a marker line where the live part starts again::

    {"i":12,"resumed":"2026-11-23T16:05:00+00:00"}

  and a run restarted with ``resume_from`` has one with the new session's config, where
  replay starts the machine afresh: ``{"i":30,"resumed":"...","restart":{...}}``.

Datetimes are ISO 8601 strings with their offset; failure classes and statuses are
their string values; node outputs and states are their JSON form, except that floats that
are not finite are written ``NaN``, ``Infinity`` and ``-Infinity`` as Python's json does
(JSON has no such numbers, and null would not read back as a float).

In memory, a node that succeeded on the machine's plain lane is kept as one compact row
(see ``RecordList``) and turned into its three records when read: the text, the records
and the equality of logs are the same either way.

Reading is strict, except for the tail: a last line that is torn (no newline, or not
whole JSON) is dropped, so a log cut by a crash reads back to its last whole record.
Any other damage is a ``LogCorrupted`` naming the source, the line and the problem.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, MutableSequence
from datetime import datetime
from typing import Any

import attrs
from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from stroma import effects as fx
from stroma.errors import LogCorrupted
from stroma.failures import FailureClass
from stroma.trace import ExecutionTrace, RunStatus, TraceEvent

__all__ = (
    "FORMAT_VERSION",
    "ROW_LEN",
    "EffectLog",
    "LogHeader",
    "Record",
    "RecordList",
    "ResumeMarker",
    "encode_header",
    "encode_partial",
    "encode_record",
    "is_row",
    "row_attempt",
    "row_records",
    "trace_event",
)

FORMAT_VERSION = 1


@attrs.frozen
class LogHeader:
    run_id: str
    plan: str
    seed: int
    version: str
    started_at: str
    config: dict[str, Any] = attrs.field(factory=dict, eq=False)
    format: int = FORMAT_VERSION


@attrs.frozen
class ResumeMarker:
    """Where a crashed run was picked up again and went on live.

    ``restart`` is set when the run was restarted with ``resume_from`` (API resume): it
    holds that session's machine config, and replay starts the machine afresh there.
    """

    at: str
    restart: dict[str, Any] | None = attrs.field(default=None, eq=False)


Record = tuple[fx.Effect, fx.Event | None] | ResumeMarker

# A node that succeeded on the machine's plain lane is held in memory as one compact row,
# a plain tuple standing in for its three records:
#   (node_id, run_id, attempt, started_at, duration_ms, output, input_json, output_json,
#    schema)
# ``output`` is what the node returned, the JSON is bytes, ``schema`` the output contract.
ROW_LEN = 9


def is_row(item: object) -> bool:
    """Whether a record list item is a compact row (records are pairs or ResumeMarkers)."""
    return type(item) is tuple and len(item) == ROW_LEN


def row_records(row: tuple[Any, ...]) -> list[Record]:
    """The three records a compact row stands for, as the machine emitted them."""
    node_id, attempt, started_at, duration_ms, output = row[0], row[2], row[3], row[4], row[5]
    output_json, schema = row[7], row[8]
    return [
        (fx.CallNode(node_id, attempt), fx.NodeReturned(output, started_at, duration_ms)),
        (row_attempt(row), None),
        (fx.SaveCheckpoint(node_id, schema.model_validate_json(output_json)),
         fx.CheckpointSaved(node_id)),
    ]


def row_attempt(row: tuple[Any, ...]) -> fx.RecordAttempt:
    """The RecordAttempt of a compact row (its states as JSON)."""
    node_id, run_id, attempt, started_at, duration_ms, _, input_json, output_json, _ = row
    return fx.RecordAttempt(node_id, run_id, attempt, started_at, json.loads(input_json),
                            json.loads(output_json), duration_ms)


def trace_event(item: Any) -> TraceEvent:
    """The trace event of a RecordAttempt, or of a compact row."""
    return row_attempt(item).event if type(item) is tuple else item.event


class RecordList(MutableSequence[Record]):
    """A log's records, in order: a list whose plain-lane nodes are kept compact.

    A compact row fills the three positions of the records it stands for, and is turned
    into them when any of the three is read; to everyone reading, this is a list of
    ``(effect, event)`` pairs and ``ResumeMarker``s. A long run so keeps one small tuple per
    node instead of five effect objects, which is what the garbage collector would walk.
    """

    __slots__ = ("items", "markers")

    def __init__(self, records: Iterable[Any] = ()) -> None:
        # Interpreters append to ``items`` directly (a compact row three times; never a
        # ResumeMarker, which goes through ``append``).
        self.items: list[Any]
        # Where the ResumeMarkers are, so finding a log's last session needs no scan.
        self.markers: list[int]
        if isinstance(records, RecordList):
            self.items = list(records.items)
            self.markers = list(records.markers)
        else:
            self.items = list(records)
            self._find_markers()

    def _find_markers(self) -> None:
        self.markers = [k for k, x in enumerate(self.items) if type(x) is ResumeMarker]

    def _expand(self, i: int) -> None:
        items = self.items
        row = items[i]
        base = i
        while base > 0 and items[base - 1] is row:
            base -= 1
        items[base:base + 3] = row_records(row)

    def __getitem__(self, index: Any) -> Any:
        items = self.items
        if isinstance(index, slice):
            return [self[j] for j in range(*index.indices(len(items)))]
        item = items[index]
        if type(item) is tuple and len(item) == ROW_LEN:
            self._expand(index if index >= 0 else index + len(items))
            item = items[index]
        return item

    def __setitem__(self, index: Any, value: Any) -> None:
        self._expand_all()
        self.items[index] = value
        self._find_markers()

    def __delitem__(self, index: Any) -> None:
        self._expand_all()
        del self.items[index]
        self._find_markers()

    def insert(self, index: int, value: Record) -> None:
        self._expand_all()
        self.items.insert(index, value)
        self._find_markers()

    def append(self, value: Record) -> None:
        if type(value) is ResumeMarker:
            self.markers.append(len(self.items))
        self.items.append(value)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Record]:
        for j in range(len(self.items)):
            yield self[j]

    def _expand_all(self) -> None:
        items = self.items
        for j in range(len(items)):
            if is_row(items[j]):
                self._expand(j)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RecordList | list | tuple):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(list(self))

# ------------------------------------------------------------------------ the codec

_CLASSES: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        fx.CallNode, fx.CallParallel, fx.RunPlan, fx.ChooseBranch, fx.PlanFinished,
        fx.BranchChosen, fx.ClassifyFailure, fx.FireHook, fx.Sleep,
        fx.SaveCheckpoint, fx.LoadCheckpoint, fx.RecordAttempt, fx.Finish,
        fx.NodeReturned, fx.NodeRaised, fx.NodeCancelled, fx.ParallelReturned,
        fx.FailureClassified, fx.HookFired, fx.Slept, fx.CheckpointSaved,
        fx.CheckpointLoaded, fx.ErrorInfo,
    )
}
# Live-only fields that a log never holds (the answer to them is in the log instead).
_SKIP = {("RunPlan", "plan"), ("RunPlan", "input"), ("RunPlan", "config"),
         ("ChooseBranch", "state"), ("CallNode", "input"), ("SaveCheckpoint", "state"),
         ("LoadCheckpoint", "schema"),
         ("ErrorInfo", "exc"), ("CallParallel", "calls"), ("ParallelReturned", "outcomes")}
_FIELDS: dict[str, tuple[str, ...]] = {
    name: tuple(f.name for f in attrs.fields(cls) if (name, f.name) not in _SKIP)
    for name, cls in _CLASSES.items()
}
# Required fields among the skipped ones: a decoded record gets None there.
_ABSENT: dict[str, dict[str, Any]] = {
    name: {
        f.name: None
        for f in attrs.fields(cls)
        if (name, f.name) in _SKIP and f.default is attrs.NOTHING
    }
    for name, cls in _CLASSES.items()
}
_TRACE_FIELDS = (
    "node_id", "run_id", "attempt", "timestamp_utc", "input_state", "output_state",
    "duration_ms", "failure", "failure_message",
)


def _dt(value: datetime) -> str:
    return value.isoformat()


def _state(value: Any) -> Any:
    """A state's JSON form (models dumped; JSON dicts as they are)."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return value if type(value) is dict else _enc(value)


def _enc_call(v: fx.CallNode) -> dict[str, Any]:
    return {"t": "CallNode", "node_id": v.node_id, "attempt": v.attempt,
            "timeout_ms": v.timeout_ms, "model": v.model}


def _enc_returned(v: fx.NodeReturned) -> dict[str, Any]:
    return {"t": "NodeReturned", "output": _state(v.output), "started_at": v.started_at.isoformat(),
            "duration_ms": v.duration_ms, "input_tokens": v.input_tokens,
            "output_tokens": v.output_tokens, "model": v.model}


def _enc_attempt(v: fx.RecordAttempt) -> dict[str, Any]:
    failure = v.failure
    return {"t": "RecordAttempt", "event": {
        "t": "TraceEvent", "node_id": v.node_id, "run_id": v.run_id, "attempt": v.attempt,
        "timestamp_utc": v.timestamp_utc.isoformat(), "input_state": _state(v.input_state),
        "output_state": None if v.output_state is None else _state(v.output_state),
        "duration_ms": v.duration_ms, "failure": None if failure is None else failure.value,
        "failure_message": v.failure_message,
    }}


def _enc_saved(v: fx.CheckpointSaved) -> dict[str, Any]:
    return {"t": "CheckpointSaved", "node_id": v.node_id}


# The records every node writes, encoded without the generic walk (same output).
_FAST: dict[type, Any] = {
    fx.CallNode: _enc_call,
    fx.NodeReturned: _enc_returned,
    fx.RecordAttempt: _enc_attempt,
    fx.CheckpointSaved: _enc_saved,
}


def _enc(value: Any) -> Any:
    fast = _FAST.get(type(value))
    if fast is not None:
        return fast(value)
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, datetime):
        return _dt(value)
    if isinstance(value, TraceEvent):
        return {"t": "TraceEvent", **{k: _enc(getattr(value, k)) for k in _TRACE_FIELDS}}
    name = type(value).__name__
    if name == "RecordAttempt":
        return {"t": name, "event": _enc(value.event)}
    if name == "SaveCheckpoint":
        return {"t": name, "node_id": value.node_id, "schema": value.schema_ref}
    if name == "PlanFinished":
        out = {"t": name, **{k: _enc(getattr(value, k)) for k in _FIELDS[name]
                             if k != "records"}}
        out["records"] = [_enc_record(e, v) for e, v in value.records]
        return out
    if name in _FIELDS and type(value) is _CLASSES[name]:
        return {"t": name, **{k: _enc(getattr(value, k)) for k in _FIELDS[name]}}
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, tuple | list):
        return [_enc(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _enc(v) for k, v in value.items()}
    if isinstance(value, set | frozenset):
        return [_enc(v) for v in value]
    return to_jsonable_python(value, fallback=repr)


_DATETIME_FIELDS = {"started_at", "timestamp_utc"}
_TUPLE_FIELDS = {"type_names"}


def _dec(obj: Any) -> Any:
    if not isinstance(obj, dict) or "t" not in obj:
        return obj
    name = obj["t"]
    if name == "TraceEvent":
        kw = {k: obj[k] for k in _TRACE_FIELDS}
        kw["timestamp_utc"] = datetime.fromisoformat(kw["timestamp_utc"])
        kw["failure"] = None if kw["failure"] is None else FailureClass(kw["failure"])
        return TraceEvent(**kw)
    if name == "RecordAttempt":
        return fx.RecordAttempt.of(_dec(obj["event"]))
    cls = _CLASSES[name]
    kw = dict(_ABSENT[name])
    for k in _FIELDS[name]:
        v = obj[k]
        if k in _DATETIME_FIELDS:
            v = None if v is None else datetime.fromisoformat(v)
        elif k == "records":
            v = tuple(_dec_record(r) for r in v)
        elif k in _TUPLE_FIELDS:
            v = tuple(v)
        elif k == "failure" and v is not None:
            v = FailureClass(v)
        elif k == "status":
            v = RunStatus(v)
        elif isinstance(v, dict) and "t" in v and k not in ("output", "state", "final_state"):
            v = _dec(v)
        kw[k] = v
    return cls(**kw)


def _enc_record(effect: Any, event: Any) -> list[Any]:
    """A record inside a sub-plan's log: groups keep their children inline."""
    eff, ev = _enc(effect), _enc(event)
    if isinstance(effect, fx.CallParallel):
        eff["calls"] = [_enc(c) for c in effect.calls]
        if isinstance(event, fx.ParallelReturned):
            ev["outcomes"] = [_enc(o) for o in event.outcomes]
    return [eff, ev]


def _dec_record(raw: Any) -> tuple[Any, Any]:
    eff_raw, ev_raw = raw
    effect, event = _dec(eff_raw), _dec(ev_raw)
    if isinstance(effect, fx.CallParallel):
        effect = attrs.evolve(effect, calls=tuple(_dec(c) for c in eff_raw.get("calls", ())))
        if isinstance(event, fx.ParallelReturned):
            event = attrs.evolve(
                event, outcomes=tuple(_dec(o) for o in ev_raw.get("outcomes", ()))
            )
    return effect, event


def _default(value: Any) -> Any:
    """What json does not know inside a node's output (datetimes, models, sets, ...)."""
    return _enc(value)


def _dumps(obj: Any) -> str:
    try:
        return json.dumps(
            obj, separators=(",", ":"), ensure_ascii=False, default=_default
        )
    except TypeError:  # keys json cannot take (tuples, ...): the generic walk str()s them
        return json.dumps(_enc(obj), separators=(",", ":"), ensure_ascii=False,
                          default=_default)


def encode_header(header: LogHeader) -> str:
    return _dumps(
        {
            "stroma_log": header.format,
            "run_id": header.run_id,
            "plan": header.plan,
            "seed": header.seed,
            "version": header.version,
            "started_at": header.started_at,
            "config": header.config,
        }
    )


def encode_partial(index: int, child: int, call: Any, outcome: Any) -> str:
    """A fan-out child that finished before its group: ``{"i":k,"partial":j,...}``."""
    return _dumps({"i": index, "partial": child, "effect": _enc(call), "event": _enc(outcome)})


def encode_record(index: int, record: Record) -> list[str]:
    """The JSON lines of one record (one line, or 1 + n for a parallel group)."""
    if isinstance(record, ResumeMarker):
        obj: dict[str, Any] = {"i": index, "resumed": record.at}
        if record.restart is not None:
            obj["restart"] = record.restart
        return [_dumps(obj)]
    effect, event = record
    if isinstance(effect, fx.CallParallel):
        assert isinstance(event, fx.ParallelReturned) or event is None
        head = _enc(effect)
        head["n"] = len(effect.calls)
        lines = [_dumps({"i": index, "effect": head, "event": _enc(event)})]
        outcomes = event.outcomes if event is not None else ()
        for j, call in enumerate(effect.calls):
            child_event = outcomes[j] if j < len(outcomes) else None
            lines.append(
                _dumps({"i": index, "child": j, "effect": _enc(call), "event": _enc(child_event)})
            )
        return lines
    return [_dumps({"i": index, "effect": _enc(effect), "event": _enc(event)})]


# ------------------------------------------------------------------------------- log


class EffectLog:
    """A run's log in memory: the header and the records, in order."""

    __slots__ = ("_records", "header", "partials")

    def __init__(self, header: LogHeader, records: Iterable[Record] = ()) -> None:
        self.header = header
        self._records = RecordList(records)
        # Fan-out children that finished before their group did, as
        # (record index of the group, child index, call, outcome), in the order written.
        self.partials: list[tuple[int, int, Any, Any]] = []

    @property
    def records(self) -> RecordList:
        return self._records

    @records.setter
    def records(self, value: Iterable[Record]) -> None:
        self._records = RecordList(value)

    def pending_children(self) -> dict[int, tuple[Any, Any]]:
        """Children of the group in flight when the log ends (a crash inside a fan-out)."""
        k = len(self.records)
        return {j: (call, outcome) for i, j, call, outcome in self.partials if i == k}

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EffectLog):
            return NotImplemented
        return self.to_jsonl() == other.to_jsonl()

    def __repr__(self) -> str:
        return f"EffectLog(run_id={self.header.run_id!r}, records={len(self.records)})"

    # -- reading back what happened

    @property
    def finish(self) -> fx.Finish | None:
        """The Finish record of a run that ended, else None (a run cut short)."""
        for rec in reversed(self.records):
            if not isinstance(rec, ResumeMarker) and isinstance(rec[0], fx.Finish):
                return rec[0]
            break
        return None

    def trace(self) -> ExecutionTrace:
        """The trace is a fold over the log: the machine's RecordAttempt records, in order."""
        return ExecutionTrace.from_events(
            [rec[0].event for rec in self.records
             if not isinstance(rec, ResumeMarker) and isinstance(rec[0], fx.RecordAttempt)]
        )

    def completed_nodes(self) -> list[str]:
        """Ids of the steps whose checkpoint was saved, in order."""
        return [rec[0].node_id for rec in self.records
                if not isinstance(rec, ResumeMarker) and isinstance(rec[0], fx.SaveCheckpoint)
                and rec[1] is not None]

    # -- text

    def lines(self) -> list[str]:
        out = [encode_header(self.header)]
        for i, rec in enumerate(self.records):
            out.extend(encode_record(i, rec))
        # A finished group's record holds all its children in argument order, so its
        # partials (in completion order) are left out: the text stays deterministic. Only
        # the children of a group still in flight (a crash inside a fan-out) are written.
        n = len(self.records)
        out.extend(encode_partial(*q) for q in self.partials if q[0] >= n)
        return out

    def to_jsonl(self) -> str:
        return "".join(line + "\n" for line in self.lines())

    @classmethod
    def from_jsonl(cls, text: str | bytes, source: str = "<effect log>") -> EffectLog:
        if isinstance(text, bytes):
            raw = text
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                # A torn multi-byte character at the very end is a torn tail, nothing more.
                if e.start == 0 or b"\n" in raw[e.start :]:
                    raise LogCorrupted(source, f"not UTF-8 text at byte {e.start}") from None
                text = raw[: e.start].decode("utf-8")
        raw_lines = text.split("\n")
        complete = raw_lines[:-1]  # what precedes the last newline
        tail = raw_lines[-1]  # text after the last newline: a torn line, or ""
        return cls.from_lines(complete, source=source, torn_tail=tail)

    @classmethod
    def from_lines(
        cls, lines: list[str], source: str = "<effect log>", torn_tail: str = ""
    ) -> EffectLog:
        """Parse lines (without newlines); a torn last line is dropped, other damage raises."""
        if not lines:
            raise LogCorrupted(source, "the log is empty: it has no header line")
        header = _parse_header(lines[0], source)
        records: list[Record] = []
        partials: list[tuple[int, int, Any, Any]] = []
        n = len(lines)
        line_no = 1
        while line_no < n:
            obj = _parse_line(lines[line_no], source, line_no + 1, last=line_no == n - 1
                              and not torn_tail)
            if obj is None:  # torn last line
                break
            try:
                index = obj["i"]
                if "partial" in obj and index == len(records):
                    partials.append((index, int(obj["partial"]), _dec(obj["effect"]),
                                     _dec(obj["event"])))
                    line_no += 1
                    continue
                if index != len(records):
                    raise LogCorrupted(
                        source, f"line {line_no + 1}: record index {index} out of sequence "
                        f"(expected {len(records)})"
                    )
                if "resumed" in obj:
                    restart = obj.get("restart")
                    if restart is not None and not isinstance(restart, dict):
                        raise LogCorrupted(source, f"line {line_no + 1}: bad restart record")
                    records.append(ResumeMarker(str(obj["resumed"]), restart))
                    line_no += 1
                    continue
                effect = _dec(obj["effect"])
                event = _dec(obj["event"])
                if isinstance(effect, fx.CallParallel):
                    count = int(obj["effect"]["n"])
                    children: list[tuple[Any, Any]] = []
                    j = line_no + 1
                    while j < n and len(children) < count:
                        child = _parse_line(lines[j], source, j + 1,
                                            last=j == n - 1 and not torn_tail)
                        if child is None:
                            break
                        if child.get("i") != index or child.get("child") != len(children):
                            raise LogCorrupted(
                                source, f"line {j + 1}: expected child {len(children)} of "
                                f"the parallel group on line {line_no + 1}"
                            )
                        children.append((_dec(child["effect"]), _dec(child["event"])))
                        j += 1
                    if len(children) < count:
                        break  # the group was cut short by a crash: a torn tail
                    effect = attrs.evolve(effect, calls=tuple(c for c, _ in children))
                    if event is not None:
                        event = attrs.evolve(event, outcomes=tuple(e for _, e in children))
                    records.append((effect, event))
                    line_no = j
                    continue
                records.append((effect, event))
            except LogCorrupted:
                raise
            except (KeyError, TypeError, ValueError, AttributeError, ArithmeticError,
                    RecursionError) as e:
                raise LogCorrupted(
                    source, f"line {line_no + 1}: not a valid record ({type(e).__name__}: {e})"
                ) from None
            line_no += 1
        log = cls(header, records)
        log.partials = partials
        return log


def _parse_line(line: str, source: str, line_no: int, *, last: bool) -> dict[str, Any] | None:
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        if last:
            return None
        raise LogCorrupted(source, f"line {line_no}: not JSON: {line[:80]!r}") from None
    if not isinstance(obj, dict):
        raise LogCorrupted(source, f"line {line_no}: expected a JSON object, found {line[:80]!r}")
    return obj


def _parse_header(line: str, source: str) -> LogHeader:
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        raise LogCorrupted(source, f"line 1: the header is not JSON: {line[:80]!r}") from None
    if not isinstance(obj, dict) or "stroma_log" not in obj:
        raise LogCorrupted(source, "line 1: not a stroma effect log header")
    if obj["stroma_log"] != FORMAT_VERSION:
        raise LogCorrupted(
            source,
            f"log format version {obj['stroma_log']!r}, this stroma reads version "
            f"{FORMAT_VERSION}: replay it with the stroma version that wrote it",
        )
    try:
        return LogHeader(
            run_id=str(obj["run_id"]), plan=str(obj["plan"]), seed=int(obj["seed"]),
            version=str(obj["version"]), started_at=str(obj["started_at"]),
            config=dict(obj.get("config") or {}),
        )
    except (KeyError, TypeError, ValueError, ArithmeticError) as e:
        raise LogCorrupted(source, f"line 1: header field missing or wrong: {e}") from None
