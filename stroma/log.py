"""The effect log: a header and one record per effect with the event that answered it.

Format version 2 (JSON lines, UTF-8, one object per line, keys in a fixed order):

* line 1, the header::

    {"stroma_log":2,"run_id":"...","plan":"<fingerprint>","seed":123,"version":"<stroma version>",
     "started_at":"2026-11-23T16:00:00+00:00","config":{...}}

  ``config`` is what the machine needs to make the same decisions again: budget, retry
  policies, timeouts, which hooks were set (and their timeout), whether classifiers were,
  model fallbacks, ``resume_from``, and the initial state (its schema ref and JSON).

* then one line per record::

    {"i":0,"effect":{"t":"CallNode",...},"event":{"t":"NodeReturned",...,"valid":"m:Out"}}
    {"i":1,"effect":{"t":"Commit","node_id":...,"input_state":{..},"output_state":{..},
     "duration_ms":3,"schema":"m:Out"},"event":null}

  ``event`` is null for the machine's own records (Commit, RecordAttempt, Finish). A
  node's success is two records: its call with the answer, and its ``Commit`` (the
  attempt's trace record and checkpoint). A ``NodeReturned`` whose output kept its
  contract says so with ``"valid"`` (the schema it kept); replay then takes the output
  as validated. An output that cannot be written as JSON exactly (bytes that are not
  UTF-8, nesting too deep, an object JSON has no form for) is ``"output":null`` with
  ``"unwritable"``: the StateNotSerializable error the attempt failed with (the live
  loop has the machine decide on that, so replay decides the same); unless what JSON
  cannot hold is a value the contract ignores (an extra key), when the output is written
  as near as JSON gets (an object as its repr), on which the machine decides the same
  (see ``approximate_output``). A CallParallel is
  one line for the group (its event without the outcomes) followed by one line per child:
  ``{"i":4,"child":0,"effect":{"t":"CallNode",..},"event":{..}}``.
* a fan-out child that finishes before its group is made durable at once as
  ``{"i":k,"partial":j,"effect":{..},"event":{..}}`` (k: the group's future index, j: the
  child's index in the group); the group's record supersedes these, so ``lines()`` keeps
  only those of a group in flight.
* a run resumed after a crash has a marker line where the live part starts again
  (the machine's ``Resumed`` event)::

    {"i":12,"resumed":"2026-11-23T16:05:00+00:00"}

  and a run restarted with ``resume_from`` has one with the new session's config, where
  replay starts the machine afresh: ``{"i":30,"resumed":"...","restart":{...}}``.

Datetimes are ISO 8601 strings with their offset; failure classes and statuses are
their string values; states are their JSON form, floats that are not finite written
``NaN``, ``Infinity`` and ``-Infinity`` as Python's json does (JSON has no such numbers,
and null would not read back as a float).

Format 1 logs (written by stroma 0.2) read, replay and resume: their records are read
into this vocabulary (an attempt's record and its separate checkpoint record become a
``Commit`` and a ``SavedCheckpoint`` that replay passes over) and keep their text, so
``to_jsonl`` gives back exactly what was read; a resumed format 1 log goes on in format 2.

In memory a record is a flat tuple of atoms (strings, numbers, datetimes, the JSON text
of states, tuples of those), which the garbage collector does not track, and is decoded
into effect and event objects only when read: ``EffectLog.records`` reads like a list
of ``(effect, event)`` pairs and ``ResumeMarker``s.

Reading is strict, except for the tail: a last line that is torn (no newline, or NUL
bytes where a power loss left a write unmade) is dropped, so a log cut by a crash reads
back to its last whole record.
Every field is checked as it is read: any other damage is a ``LogCorrupted`` naming the
source, the line, the field and the problem.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, MutableSequence, Sequence
from datetime import datetime
from typing import Any, NamedTuple

import attrs
from pydantic_core import from_json, to_json

from stroma import effects as fx
from stroma.errors import LogCorrupted
from stroma.failures import FailureClass
from stroma.trace import ExecutionTrace, RunStatus, TraceEvent
from stroma.values import named_value

__all__ = (
    "FORMAT_VERSION",
    "EffectLog",
    "LogHeader",
    "Nested",
    "PathStep",
    "Payload",
    "Progress",
    "Record",
    "RecordList",
    "ResumeMarker",
    "SavedCheckpoint",
    "add_child_line",
    "add_partial",
    "add_progress",
    "approximate_output",
    "decode_effect",
    "decode_event",
    "encode_child_line",
    "encode_effect",
    "encode_event",
    "encode_header",
    "encode_partial",
    "encode_progress",
    "encode_record",
    "is_attempt",
    "partial_lines",
    "progress_of",
    "record_effect",
    "record_event",
    "returned_atoms",
    "trace_of",
    "unwritable",
)

FORMAT_VERSION = 2
_READABLE = (1, 2)


@attrs.frozen
class LogHeader:
    run_id: str
    plan: str
    seed: int
    version: str
    started_at: str
    config: dict[str, Any] = attrs.field(factory=dict, eq=False)
    format: int = FORMAT_VERSION


# The header of a running sub-plan child's log kept inside another's (``EffectLog.nested``).
_INNER_HEADER = LogHeader(run_id="", plan="", seed=0, version="", started_at="")


@named_value(live=("restart",))
class ResumeMarker(NamedTuple):
    """Where a crashed run was picked up again and went on live (a ``Resumed`` event).

    ``restart`` is set when the run was restarted with ``resume_from`` (API resume): it
    holds that session's machine config, and replay starts the machine afresh there.
    """

    at: str
    restart: dict[str, Any] | None = None


@named_value()
class SavedCheckpoint(NamedTuple):
    """A format 1 log's checkpoint record (its own record after the attempt's): in format
    2 the ``Commit`` before it covers it, and replay passes over it."""

    node_id: str
    schema: str | None = None


Record = tuple[Any, Any] | ResumeMarker

# ------------------------------------------------------------------- atoms (in memory)
#
# A record is ``(effect_atoms, event_atoms_or_None)``; each is a tuple whose first item
# names the class and whose other items are the recorded fields, in the order of
# ``_SPEC``. A field's kind says how it is held, written and checked.

_S, _OS = "str", "opt_str"
_I, _OI = "int", "opt_int"
_F, _B = "float", "bool"
_DT, _ODT = "dt", "opt_dt"
_ST, _OST = "state", "opt_state"  # JSON text (bytes) in memory, a JSON value in a line
_ER, _OER = "error", "opt_error"
_CL, _OCL = "class", "opt_class"
_STATUS = "status"
_CALLS, _OUTCOMES, _RECORDS = "calls", "outcomes", "records"
# A cancelled sub-plan's finished children of the group it was in: ((j, call, outcome), ...)
_PARTIALS = "partials"
_INTS, _ANSWERS = "ints", "answers"
# NodeReturned.output: (JSON text, the schema ref if validated, or the error atoms of an
# output that cannot be written as JSON, with the text null)
_OUTPUT = "output"
_COORDS = "coords"  # ((kind, step id, n), ...): the loop iterations and map items around

_SPEC: dict[str, tuple[tuple[str, str], ...]] = {
    "CallNode": (("node_id", _S), ("attempt", _I), ("timeout_ms", _OI), ("model", _OS),
                 ("coords", _COORDS)),
    "CallParallel": (("step_id", _S), ("attempt", _I), ("calls", _CALLS),
                     ("max_concurrency", _OI), ("timeout_ms", _OI), ("kind", _S),
                     ("indices", _INTS)),
    "RunPlan": (("child_id", _S), ("attempt", _I), ("plan_fingerprint", _S)),
    "ChooseBranch": (("step_id", _S),),
    "ChooseRoute": (("step_id", _S),),
    "AwaitInput": (("step_id", _S), ("name", _S), ("key", _S), ("attempt", _I),
                   ("schema", _S), ("digest", _S), ("timeout_ms", _OI), ("json_schema", _S),
                   ("coords", _COORDS)),
    "ClassifyFailure": (("node_id", _S), ("attempt", _I), ("error", _ER),
                        ("coords", _COORDS)),
    "FireHook": (("kind", _S), ("node_id", _S), ("attempt", _I), ("state", _OST),
                 ("tokens", _I), ("failure", _OCL), ("error", _OER), ("timeout_ms", _OI)),
    "Sleep": (("seconds", _F),),
    "Commit": (("node_id", _S), ("run_id", _S), ("attempt", _I), ("timestamp_utc", _DT),
               ("input_state", _ST), ("output_state", _ST), ("duration_ms", _I),
               ("schema", _OS), ("coords", _COORDS)),
    "RecordAttempt": (("node_id", _S), ("run_id", _S), ("attempt", _I),
                      ("timestamp_utc", _DT), ("input_state", _ST), ("output_state", _OST),
                      ("duration_ms", _I), ("failure", _OCL), ("failure_message", _OS),
                      ("coords", _COORDS)),
    "LoadCheckpoint": (("node_id", _S),),
    "Finish": (("status", _STATUS), ("final_state", _ST), ("total_tokens", _I),
               ("total_cost_usd", _F), ("total_latency_ms", _I), ("reason", _OS)),
    "SaveCheckpoint": (("node_id", _S), ("schema", _OS)),
    "NodeReturned": (("output", _OUTPUT), ("started_at", _DT), ("duration_ms", _I),
                     ("input_tokens", _I), ("output_tokens", _I), ("model", _OS)),
    "NodeRaised": (("error", _ER), ("started_at", _DT), ("duration_ms", _I)),
    "NodeCancelled": (("started_at", _DT), ("duration_ms", _I), ("records", _RECORDS),
                      ("partials", _PARTIALS), ("total_tokens", _I), ("total_cost_usd", _F)),
    "PlanFinished": (("status", _STATUS), ("output", _ST), ("total_tokens", _I),
                     ("total_cost_usd", _F), ("total_latency_ms", _I), ("reason", _OS),
                     ("started_at", _ODT), ("duration_ms", _I), ("records", _RECORDS)),
    "ParallelReturned": (("started_at", _DT), ("duration_ms", _I), ("outcomes", _OUTCOMES),
                         ("deadline_passed", _B)),
    "BranchChosen": (("taken", _B), ("error", _OER)),
    "RouteChosen": (("key", _OS), ("error", _OER)),
    "InputReceived": (("payload", _ST), ("at", _DT)),
    "InputMissing": (("at", _DT),),
    "FailureClassified": (("answers", _ANSWERS),),
    "HookFired": (("error", _OER),),
    "Slept": (("seconds", _F),),
    "CheckpointLoaded": (("node_id", _S), ("state", _OST)),
    "CheckpointSaved": (("node_id", _S),),
}
_EFFECTS = frozenset({
    "CallNode", "CallParallel", "RunPlan", "ChooseBranch", "ChooseRoute", "AwaitInput",
    "ClassifyFailure", "FireHook",
    "Sleep", "Commit", "RecordAttempt", "LoadCheckpoint", "Finish", "SaveCheckpoint",
})
_EVENTS = frozenset(_SPEC) - _EFFECTS
_CLASSES: dict[str, Any] = {
    name: getattr(fx, name, None) for name in _SPEC
}
_CLASSES["SaveCheckpoint"] = SavedCheckpoint
_CLASSES["CheckpointSaved"] = None  # a format 1 answer: nothing to decode it into
_CHILD_EFFECTS = frozenset({"CallNode", "RunPlan"})
_OUTCOME_EVENTS = frozenset({"NodeReturned", "NodeRaised", "NodeCancelled", "PlanFinished"})
# How many atoms each effect has (its name and its fields): where its event's begin in a
# record (see record_effect).
_EFFECT_LEN: dict[str, int] = {name: 1 + len(_SPEC[name]) for name in _EFFECTS}
# Where a class's fields are in its atoms (1-based: item 0 is the class name).
_POS: dict[str, dict[str, int]] = {
    name: {f: k + 1 for k, (f, _) in enumerate(spec)} for name, spec in _SPEC.items()
}


def _state_bytes(value: Any) -> bytes:
    """A state as JSON text: text stays, a model or a JSON value is written."""
    if type(value) is bytes:
        return value
    if hasattr(value, "__pydantic_serializer__"):
        from stroma.schemas import state_json

        return state_json(value)
    return _json_text(value)


def _json_text(value: Any) -> bytes:
    """A JSON value's text, as pydantic writes it (and NaN/Infinity as constants)."""
    try:
        return to_json(value, inf_nan_mode="constants")
    except Exception:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False,
                          default=repr).encode()


def _parse_json(text: bytes | str) -> Any:
    try:
        return from_json(text)
    except ValueError:
        return json.loads(text)  # deeper than the fast reader goes


def _error_atoms(e: fx.ErrorInfo) -> tuple[Any, ...]:
    return ("ErrorInfo", tuple(e.type_names), e.message)


def _atom(kind: str, value: Any) -> Any:
    if kind in (_S, _OS, _I, _OI, _B, _DT, _ODT):
        return value
    if kind == _COORDS:
        return tuple(tuple(c) for c in value)
    if kind == _F:
        return float(value)
    if kind == _ST:
        return _state_bytes(value)
    if kind == _OST:
        return None if value is None else _state_bytes(value)
    if kind in (_ER, _OER):
        return None if value is None else _error_atoms(value)
    if kind in (_CL, _OCL, _STATUS):
        return None if value is None else str(value.value if hasattr(value, "value") else value)
    if kind == _CALLS:
        return tuple(encode_effect(c) for c in value)
    if kind == _OUTCOMES:
        return tuple(encode_event(o) for o in value)
    if kind == _RECORDS:
        if isinstance(value, RecordList):
            return tuple(value.items)
        return tuple(_record_atoms(r) for r in value)
    if kind == _PARTIALS:
        return tuple((j, c if type(c) is tuple else encode_effect(c),
                      o if type(o) is tuple else encode_event(o)) for j, c, o in value)
    if kind == _INTS:
        return tuple(value)
    if kind == _ANSWERS:
        return tuple(
            None if a is None else (a.value if isinstance(a, FailureClass) else str(a))
            for a in value
        )
    raise AssertionError(kind)  # pragma: no cover


def _record_atoms(record: Any) -> Any:
    """A record (decoded, its atoms as a pair, or already one flat tuple) as one flat
    tuple of atoms: its effect's, then its event's (see ``record_effect``)."""
    if isinstance(record, ResumeMarker):
        return record
    if type(record[0]) is str:
        return record
    eff, ev = record
    if type(eff) is not tuple:
        eff, ev = encode_effect(eff), None if ev is None else encode_event(ev)
    return eff if ev is None else eff + ev


def record_effect(item: tuple[Any, ...]) -> tuple[Any, ...]:
    """A record's effect atoms. A record is one flat tuple: the effect's atoms (a fixed
    number for each kind of effect), then its event's, if it has one. One tuple, not a
    pair of them: the garbage collector untracks a tuple once the tuples in it are
    untracked, and it looks at a young tuple before the tuples only that one refers to,
    so a pair level kept most records tracked into the old generation, where a long
    run's log made full collections come and walk it."""
    return item[:_EFFECT_LEN[item[0]]]


def record_event(item: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """A record's event atoms, None for an effect that has no answer."""
    k = _EFFECT_LEN[item[0]]
    return item[k:] if len(item) > k else None


def _generic_atoms(obj: Any) -> tuple[Any, ...]:
    name = type(obj).__name__
    return (name, *(_atom(kind, getattr(obj, f)) for f, kind in _SPEC[name]))


def _call_atoms(e: fx.CallNode) -> tuple[Any, ...]:
    return ("CallNode", e.node_id, e.attempt, e.timeout_ms, e.model, e.coords)


def _commit_atoms(e: fx.Commit) -> tuple[Any, ...]:
    return ("Commit", e.node_id, e.run_id, e.attempt, e.timestamp_utc,
            _state_bytes(e.input_state), _state_bytes(e.output_state), e.duration_ms, e.schema,
            e.coords)


def _attempt_atoms(e: fx.RecordAttempt) -> tuple[Any, ...]:
    out = e.output_state
    failure = e.failure
    return ("RecordAttempt", e.node_id, e.run_id, e.attempt, e.timestamp_utc,
            _state_bytes(e.input_state), None if out is None else _state_bytes(out),
            e.duration_ms, None if failure is None else failure.value, e.failure_message,
            e.coords)


def _hook_atoms(e: fx.FireHook) -> tuple[Any, ...]:
    state, error, failure = e.state, e.error, e.failure
    if failure is None and error is None and type(state) is bytes:  # start, success
        return ("FireHook", *e)  # (the fields are the atoms, in their order)
    return ("FireHook", e.kind, e.node_id, e.attempt,
            None if state is None else _state_bytes(state), e.tokens,
            None if failure is None else failure.value,
            None if error is None else _error_atoms(error), e.timeout_ms)


_ENCODE: dict[type, Callable[[Any], tuple[Any, ...]]] = {
    fx.CallNode: _call_atoms,
    fx.Commit: _commit_atoms,
    fx.RecordAttempt: _attempt_atoms,
    fx.FireHook: _hook_atoms,
    fx.ChooseBranch: lambda e: ("ChooseBranch", e.step_id),
    fx.ChooseRoute: lambda e: ("ChooseRoute", e.step_id),
}
_NO_ERROR = ("HookFired", None)
_TAKEN = ("BranchChosen", True, None)
_NOT_TAKEN = ("BranchChosen", False, None)


def encode_effect(effect: Any) -> tuple[Any, ...]:
    """An effect's atoms (what the log keeps of it)."""
    fast = _ENCODE.get(type(effect))
    return fast(effect) if fast is not None else _generic_atoms(effect)


_UNWRITABLE_NAMES = ("stroma.errors.StateNotSerializable", "stroma.errors.StromaError",
                     "builtins.Exception", "builtins.BaseException", "builtins.object")


def _unwritable(output: Any, exc: BaseException) -> fx.ErrorInfo:
    """Why a node's output cannot be written as JSON, naming the field at fault."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    if isinstance(exc, RecursionError) or "depth" in text:
        what = "nested too deeply"
    else:
        what = f"{type(exc).__name__}: {text}".rstrip(": ")
    fields: Any = ()
    if isinstance(output, dict):
        fields = output.items()
    elif hasattr(output, "__pydantic_serializer__"):
        fields = ((name, getattr(output, name, None)) for name in type(output).model_fields)
    where = "it"
    for name, value in fields:
        try:
            to_json(value, inf_nan_mode="constants")
        except (Exception, RecursionError):
            where = f"field {name!r}"
            break
    return fx.ErrorInfo(
        _UNWRITABLE_NAMES,
        f"the output cannot be stored: {where} cannot be written as JSON ({what}); return "
        "values JSON can hold (text, not raw bytes; base64-encode binary data)",
    )


def _output_atom(output: Any, approximate: bool = False) -> tuple[Any, Any]:
    """A node's output as the log keeps it: its JSON text, written exactly; or, when it
    cannot be (raw bytes that are not UTF-8, nesting too deep, an object JSON has no form
    for), null and the StateNotSerializable error the attempt fails with (or, with
    ``approximate``, the text ``approximate_output`` gives, when there is one)."""
    if type(output) is fx.ErrorInfo:
        return (b"null", _error_atoms(output))
    try:
        if hasattr(output, "__pydantic_serializer__"):
            from stroma.schemas import state_json

            return (state_json(output), None)
        return (to_json(output, inf_nan_mode="constants"), None)
    except (Exception, RecursionError) as exc:
        if approximate:
            near = approximate_output(output)
            if near is not None:
                return (_json_text(near), None)
        return (b"null", _error_atoms(_unwritable(output, exc)))


def approximate_output(output: Any) -> Any | None:
    """An output JSON cannot hold exactly, as the JSON value nearest to it (an object as
    its repr, a field JSON has no form for as text), or None when there is none (nesting
    too deep). The live loop records it only where the machine decides the same on it as
    on the output itself (a value the contract ignores), so replay decides the same.
    A value the log cannot write either (text with a lone surrogate) has none."""
    try:
        value = json.loads(json.dumps(output, separators=(",", ":"), ensure_ascii=False,
                                      default=repr))
        to_json(value, inf_nan_mode="constants")
    except (Exception, RecursionError):
        return None
    return value


def unwritable(atoms: tuple[Any, ...]) -> fx.ErrorInfo | None:
    """The error of a NodeReturned's atoms whose output could not be written as JSON."""
    error = atoms[1][1]
    return fx.ErrorInfo(error[1], error[2]) if type(error) is tuple else None


def returned_atoms(
    event: fx.NodeReturned, valid: tuple[Any, str | None] | None, approximate: bool = False
) -> tuple[Any, ...]:
    """A NodeReturned's atoms; ``valid`` is (JSON text, schema) when the output kept its
    contract (the text is then shared with the Commit that follows). An output that
    cannot be written as JSON is kept as its error (see ``unwritable``), or with
    ``approximate`` as its ``approximate_output`` when it has one."""
    output: Any
    if valid is not None:
        output = valid
    elif type(event.output) is fx.Validated:
        output = (event.output.json, event.output.schema)
    else:
        output = _output_atom(event.output, approximate)
    return ("NodeReturned", output, event.started_at, event.duration_ms,
            event.input_tokens, event.output_tokens, event.model)


def encode_event(event: Any) -> tuple[Any, ...]:
    """An event's atoms."""
    t = type(event)
    if t is fx.NodeReturned:
        return returned_atoms(event, None)
    if t is fx.HookFired:
        error = event.error
        return _NO_ERROR if error is None else ("HookFired", _error_atoms(error))
    if t is fx.BranchChosen and event.error is None:  # a loop's until, a branch's choice
        return _TAKEN if event.taken else _NOT_TAKEN
    if t is fx.RouteChosen and event.error is None:
        return ("RouteChosen", event.key, None)
    return _generic_atoms(event)


def _from_atom(kind: str, value: Any) -> Any:
    if kind in (_ER, _OER):
        return None if value is None else fx.ErrorInfo(value[1], value[2])
    if kind == _OCL:
        return None if value is None else FailureClass(value)
    if kind == _STATUS:
        return RunStatus(value)
    if kind == _CALLS:
        return tuple(decode_effect(c) for c in value)
    if kind == _OUTCOMES:
        return tuple(decode_event(o) for o in value)
    if kind == _RECORDS:
        records = RecordList()
        records.items = list(value)
        records.markers = [k for k, x in enumerate(value) if type(x) is ResumeMarker]
        return records
    if kind == _PARTIALS:
        return tuple((j, decode_effect(c), decode_event(o)) for j, c, o in value)
    if kind == _ANSWERS:
        return tuple(
            FailureClass(a) if a in FailureClass.__members__ else a for a in value
        )
    if kind == _OUTPUT:
        text, schema = value
        if type(schema) is tuple:  # the output could not be written: its error
            return fx.ErrorInfo(schema[1], schema[2])
        return fx.Validated(text, schema) if schema is not None else _parse_json(text)
    return value


def decode_effect(atoms: tuple[Any, ...]) -> Any:
    """The effect an atoms tuple stands for."""
    name = atoms[0]
    cls = _CLASSES[name]
    kw = {f: _from_atom(kind, v) for (f, kind), v in zip(_SPEC[name], atoms[1:], strict=True)}
    if name == "Finish":
        kw["final_state"] = _parse_json(kw["final_state"])
    elif name == "FireHook" and kw["state"] is not None:
        kw["state"] = _parse_json(kw["state"])
    return cls(**kw)


_tuple_new = tuple.__new__


def decode_event(atoms: tuple[Any, ...] | None) -> Any:
    """The event an atoms tuple stands for (None for an effect that needs no answer)."""
    if atoms is None:
        return None
    name = atoms[0]
    if name == "NodeReturned":  # the common case, decoded directly
        text, schema = atoms[1]
        if type(schema) is str:
            output: Any = _tuple_new(fx.Validated, (text, schema))
        elif schema is None:
            output = _parse_json(text)
        else:  # the error of an output the log could not hold (see unwritable)
            output = fx.ErrorInfo(schema[1], schema[2])
        return _tuple_new(fx.NodeReturned, (output, *atoms[2:]))
    cls = _CLASSES[name]
    if cls is None:
        return None
    kw = {f: _from_atom(kind, v) for (f, kind), v in zip(_SPEC[name], atoms[1:], strict=True)}
    if name == "PlanFinished":
        kw["output"] = _parse_json(kw["output"])
    elif name == "CheckpointLoaded" and kw["state"] is not None:
        kw["state"] = _parse_json(kw["state"])
    elif name == "InputReceived":
        kw["payload"] = _parse_json(kw["payload"])
    return cls(**kw)


def _decode_item(item: Any) -> Record:
    if type(item) is ResumeMarker:
        return item
    return decode_effect(record_effect(item)), decode_event(record_event(item))


def trace_of(item: Any) -> TraceEvent:
    """The trace event of a record's atoms (a Commit or a RecordAttempt)."""
    if item[0] == "Commit":
        _, node_id, run_id, attempt, at, inp, out, ms, _, coords = item[:10]
        return TraceEvent(node_id, run_id, attempt, at, _parse_json(inp), _parse_json(out), ms,
                          coords=coords)
    _, node_id, run_id, attempt, at, inp, out, ms, failure, message, coords = item[:11]
    return TraceEvent(
        node_id, run_id, attempt, at, _parse_json(inp),
        None if out is None else _parse_json(out), ms,
        None if failure is None else FailureClass(failure), message, coords,
    )


def is_attempt(item: Any) -> bool:
    """Whether a record's atoms are an attempt's account (a Commit or a RecordAttempt)."""
    return type(item) is not ResumeMarker and item[0] in ("Commit", "RecordAttempt")


class RecordList(MutableSequence[Record]):
    """A log's records, in order: atoms in ``items`` (each record one flat tuple, its
    effect's atoms then its event's: see ``record_effect``), read as decoded records.

    To everyone reading, this is a list of ``(effect, event)`` pairs and
    ``ResumeMarker``s. Interpreters append atoms (``append_atoms``); ``append`` takes a
    decoded record. ``markers`` are the positions of the ResumeMarkers; ``texts`` keeps
    the original lines of records read from a format 1 log (written back as they were).
    """

    __slots__ = ("items", "markers", "texts")

    def __init__(self, records: Iterable[Any] = ()) -> None:
        self.items: list[Any] = []
        self.markers: list[int] = []
        self.texts: dict[int, list[str]] = {}
        if isinstance(records, RecordList):
            self.items = list(records.items)
            self.markers = list(records.markers)
            self.texts = dict(records.texts)
        else:
            for record in records:
                self.append(record)

    def append(self, record: Any) -> None:
        if type(record) is ResumeMarker:
            self.markers.append(len(self.items))
            self.items.append(record)
        else:
            self.items.append(_record_atoms(record))

    def append_atoms(self, effect: tuple[Any, ...], event: tuple[Any, ...] | None) -> None:
        self.items.append(effect if event is None else effect + event)

    def _find_markers(self) -> None:
        self.markers = [k for k, x in enumerate(self.items) if type(x) is ResumeMarker]
        self.texts = {}  # an edited log is written anew

    def __setitem__(self, index: Any, value: Any) -> None:
        if isinstance(index, slice):
            self.items[index] = [_record_atoms(v) for v in value]
        else:
            self.items[index] = _record_atoms(value)
        self._find_markers()

    def __delitem__(self, index: Any) -> None:
        del self.items[index]
        self._find_markers()

    def insert(self, index: int, value: Any) -> None:
        self.items.insert(index, _record_atoms(value))
        self._find_markers()

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [_decode_item(x) for x in self.items[index]]
        return _decode_item(self.items[index])

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Record]:
        for item in self.items:
            yield _decode_item(item)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RecordList):
            return self.items == other.items or list(self) == list(other)
        if isinstance(other, list | tuple):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(list(self))

    def head(self, n: int) -> RecordList:
        """The first ``n`` records (their atoms shared)."""
        out = RecordList()
        out.items = self.items[:n]
        out.markers = [k for k in self.markers if k < n]
        out.texts = {k: v for k, v in self.texts.items() if k < n}
        return out

    def tail(self, n: int) -> RecordList:
        """The records from ``n`` on (their atoms shared, renumbered from 0)."""
        out = RecordList()
        out.items = self.items[n:]
        out.markers = [k - n for k in self.markers if k >= n]
        out.texts = {k - n: v for k, v in self.texts.items() if k >= n}
        return out


# ------------------------------------------------------------------------- the lines


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _state_text(text: bytes | None) -> str:
    return "null" if text is None else text.decode("utf-8")


def _json_atom(kind: str, value: Any) -> str:
    """A field's atom written as JSON text."""
    if value is None:
        return "null"
    if kind in (_ST, _OST):
        return _state_text(value)
    if kind in (_DT, _ODT):
        return '"' + value.isoformat() + '"'
    if kind in (_ER, _OER):
        return ('{"t":"ErrorInfo","type_names":' + _dumps(list(value[1])) + ',"message":'
                + _dumps(value[2]) + "}")
    if kind == _CALLS:
        return "[" + ",".join(_json_atoms(c) for c in value) + "]"
    if kind == _OUTCOMES:
        return "[" + ",".join(_json_atoms(o) for o in value) + "]"
    if kind == _RECORDS:
        return "[" + ",".join(_json_pair(r) for r in value) + "]"
    if kind == _PARTIALS:
        return "[" + ",".join(f"[{j}," + _json_atoms(c) + "," + _json_atoms(o) + "]"
                              for j, c, o in value) + "]"
    if kind == _OUTPUT:
        return _state_text(value[0])
    if kind == _F:
        return _dumps(float(value))
    if kind == _COORDS:
        return _dumps([list(c) for c in value])
    return _dumps(list(value) if kind in (_INTS, _ANSWERS) else value)


def _json_atoms(atoms: tuple[Any, ...] | None, skip: tuple[str, ...] = ()) -> str:
    if atoms is None:
        return "null"
    name = atoms[0]
    parts = ['{"t":"', name, '"']
    if name == "NodeCancelled" and not (atoms[5] or atoms[6]):
        skip = (*skip, *_UNSPENT)  # (what a cancelled child used is written when it is some)
    for (f, kind), value in zip(_SPEC[name], atoms[1:], strict=True):
        if f in skip or (kind == _PARTIALS and not value):  # (written when there are some)
            continue
        parts.append(',"' + f + '":' + _json_atom(kind, value))
        if kind == _OUTPUT and value[1] is not None:
            if type(value[1]) is tuple:
                parts.append(',"unwritable":' + _json_atom(_ER, value[1]))
            else:
                parts.append(',"valid":' + _dumps(value[1]))
    parts.append("}")
    return "".join(parts)


def _json_pair(item: Any) -> str:
    """A record inside a sub-plan's log: ``[effect, event]`` with groups inline."""
    if type(item) is ResumeMarker:
        return _dumps({"resumed": item.at})
    if type(item[0]) is not str:
        item = _record_atoms(item)
    return ("[" + _json_atoms(record_effect(item)) + "," + _json_atoms(record_event(item))
            + "]")


def encode_header(header: LogHeader) -> str:
    return json.dumps(
        {
            "stroma_log": header.format,
            "run_id": header.run_id,
            "plan": header.plan,
            "seed": header.seed,
            "version": header.version,
            "started_at": header.started_at,
            "config": header.config,
        },
        separators=(",", ":"), ensure_ascii=False, default=repr,
    )


def encode_progress(index: int, child: int, call: Any, at: datetime, n: int,
                    record: Any) -> str:
    """Record ``n`` of a fan-out child that is a sub-plan, made durable while the child
    runs: ``{"i":k,"partial":j,"progress":n,"at":...,"effect":call,"record":[...]}``."""
    call_atoms = call if type(call) is tuple else encode_effect(call)
    return (f'{{"i":{index},"partial":{child},"progress":{n},"at":"{at.isoformat()}",'
            '"effect":' + _json_atoms(call_atoms) + ',"record":' + _json_pair(record) + "}")


def partial_lines(index: int, child: int, call: Any, outcome: Any) -> list[str]:
    """The lines of a fan-out child's entry in a log's partials: a child that finished
    (one line), or a sub-plan still running (its ``NodeCancelled``: one line a record)."""
    if type(outcome) is fx.NodeCancelled:
        return [encode_progress(index, child, call, outcome.started_at, n, record)
                for n, record in enumerate(outcome.records.items)]
    return [encode_partial(index, child, call, outcome)]


Progress = dict[tuple[int, int], tuple[int, int, Any, Any]]
# What runs inside a running sub-plan child, by (group index, child index): the child's own
# log (its records are those of its progress entry) with its group in flight's children.
Nested = dict[tuple[int, int], "EffectLog"]
# A step down from a running sub-plan child to a sub-plan running inside it: the index of
# the child's group in flight, the index of the child in it, when it started (None for one
# that finished: the line then holds its outcome) and its call.
PathStep = tuple[int, int, datetime | None, Any]
# What a child line says of the child at the end of its path: ("progress", n, record) or
# ("event", outcome).
Payload = tuple[Any, ...]


def add_child_line(progress: Progress, partials: list[tuple[int, int, Any, Any]],
                   nested: Nested, index: int, child: int, call: Any, at: datetime | None,
                   path: Sequence[PathStep], payload: Payload) -> None:
    """Add what a line says of a running fan-out child ``child`` of the group at record
    ``index`` (its call ``call``, started ``at``), or, with a ``path``, of a sub-plan
    running inside it: a record of it (``("progress", n, record)``), or its outcome, as
    it finished (``("event", outcome)``)."""
    if not path:
        if payload[0] == "progress":
            if at is None:
                raise _Bad("path", "a running child's step needs the time it started")
            add_progress(progress, index, child, call, at, payload[1], payload[2], nested)
        else:
            add_partial(partials, progress, (index, child, call, payload[1]), nested)
        return
    key = (index, child)
    entry = progress.get(key)
    if entry is None:  # (its group in flight is its first step: no record of its own yet)
        if at is None:
            raise _Bad("at", "a running child needs the time it started")
        entry = progress[key] = (index, child, call, fx.NodeCancelled(at, 0, RecordList()))
    sub = nested.get(key)
    if sub is None or sub.records is not entry[3].records:
        sub = nested[key] = EffectLog(_INNER_HEADER, entry[3].records)
    m, j, inner_at, inner_call = path[0]
    add_child_line(sub.progress, sub.partials, sub.nested, m, j, inner_call, inner_at,
                   path[1:], payload)


def encode_child_line(index: int, child: int, call: Any, at: datetime | None,
                      path: Sequence[PathStep], payload: Payload) -> str:
    """The line of ``add_child_line``'s arguments: a progress line or a partial line, or
    with a path ``{"i":k,"partial":j,"at":...,"effect":call,"path":[[m,j2,at,call2],...],
    "progress":n,"record":[...]}`` (or ``...,"event":outcome}``)."""
    if not path:
        if payload[0] == "progress":
            assert at is not None
            return encode_progress(index, child, call, at, payload[1], payload[2])
        return encode_partial(index, child, call, payload[1])
    call_atoms = call if type(call) is tuple else encode_effect(call)
    steps = ",".join(
        f"[{m},{j},{'null' if a is None else _dumps(a.isoformat())},"
        + _json_atoms(c if type(c) is tuple else encode_effect(c)) + "]"
        for m, j, a, c in path
    )
    head = (f'{{"i":{index},"partial":{child},"at":'
            f'{"null" if at is None else _dumps(at.isoformat())},"effect":'
            + _json_atoms(call_atoms) + ',"path":[' + steps + "]")
    if payload[0] == "progress":
        return head + f',"progress":{payload[1]},"record":' + _json_pair(payload[2]) + "}"
    outcome = payload[1]
    return (head + ',"event":'
            + _json_atoms(outcome if type(outcome) is tuple else encode_event(outcome)) + "}")


def _in_flight_from(items: Sequence[Any]) -> int:
    """The index from which lines of a group in flight count for ``items``: the end, or
    the first of the resume markers the records end with (the sessions that went on from
    a crash inside the group and were cut short again; a ``resume_from`` restart's marker
    ends a group in flight)."""
    k = len(items)
    while k and type(items[k - 1]) is ResumeMarker and items[k - 1].restart is None:
        k -= 1
    return k


def _in_flight_lines(log: EffectLog, i: int) -> Iterator[str]:
    """The lines of what ``log`` holds of the group in flight at record index ``i``."""
    yield from (encode_partial(*q) for q in log.partials if q[0] == i)
    for q in log.progress.values():
        if q[0] == i:
            yield from partial_lines(*q)
    for (m, j), sub in log.nested.items():
        entry = log.progress.get((m, j))
        if m == i and entry is not None and sub.records is entry[3].records:
            yield from (encode_child_line(i, j, entry[2], entry[3].started_at, path, payload)
                        for path, payload in _child_payloads(sub))


def _child_payloads(log: EffectLog) -> Iterator[tuple[tuple[PathStep, ...], Payload]]:
    """What ``log`` (a running sub-plan child's) holds of its group in flight, as the
    paths and payloads of child lines (so ``lines`` writes it back as it was read)."""
    n = _in_flight_from(log.records.items)
    for i, j, call, outcome in log.partials:
        if i >= n:
            yield ((i, j, None, call),), ("event", outcome)
    for i, j, call, outcome in log.progress.values():
        if i >= n:
            for k, record in enumerate(outcome.records.items):
                yield ((i, j, outcome.started_at, call),), ("progress", k, record)
    for (i, j), sub in log.nested.items():
        entry = log.progress.get((i, j))
        if i >= n and entry is not None and sub.records is entry[3].records:
            step = (i, j, entry[3].started_at, entry[2])
            for path, payload in _child_payloads(sub):
                yield (step, *path), payload


def add_partial(partials: list[tuple[int, int, Any, Any]], progress: Progress,
                entry: tuple[int, int, Any, Any], nested: Nested | None = None) -> None:
    """Add a fan-out child that finished to ``partials``, in place of the progress of its
    run in ``progress`` (if it is a sub-plan that kept some) and of what ran inside it
    (``nested``)."""
    progress.pop((entry[0], entry[1]), None)
    if nested is not None:
        nested.pop((entry[0], entry[1]), None)
    partials.append(entry)


def progress_of(progress: Progress, index: int, child: int) -> int:
    """How many records ``progress`` holds of the running sub-plan child ``child`` of the
    group at record ``index`` (0 when none)."""
    entry = progress.get((index, child))
    return 0 if entry is None else len(entry[3].records)


def add_progress(progress: Progress, index: int, child: int, call: Any, at: datetime, n: int,
                 record: Any, nested: Nested | None = None) -> None:
    """Add record ``n`` (atoms or a ResumeMarker) of a running sub-plan child to its entry
    in ``progress``: ``(index, child, call, NodeCancelled)`` with the child's records so
    far, moved last (where its newest line is); a new entry when ``n`` is 0 (and what ran
    inside the child before, in ``nested``, is forgotten)."""
    key = (index, child)
    entry = progress.pop(key, None)
    if entry is None or n == 0:  # (a child that started again starts anew)
        entry = (index, child, call, fx.NodeCancelled(at, 0, RecordList()))
        if nested is not None:
            nested.pop(key, None)
    progress[key] = entry
    records = entry[3].records
    if n != len(records):
        raise _Bad("progress", f"expected record {len(records)} of the child, found {n}")
    records.append(record)


def encode_partial(index: int, child: int, call: Any, outcome: Any) -> str:
    """A fan-out child that finished before its group: ``{"i":k,"partial":j,...}``."""
    call_atoms = call if type(call) is tuple else encode_effect(call)
    outcome_atoms = outcome if type(outcome) is tuple else encode_event(outcome)
    return (f'{{"i":{index},"partial":{child},"effect":' + _json_atoms(call_atoms)
            + ',"event":' + _json_atoms(outcome_atoms) + "}")


def encode_record(index: int, item: Any) -> list[str]:
    """The JSON lines of one record's atoms (one line, or 1 + n for a parallel group)."""
    if type(item) is ResumeMarker:
        obj: dict[str, Any] = {"i": index, "resumed": item.at}
        if item.restart is not None:
            obj["restart"] = item.restart
        return [json.dumps(obj, separators=(",", ":"), ensure_ascii=False, default=repr)]
    if type(item[0]) is not str:
        item = _record_atoms(item)
    eff, ev = record_effect(item), record_event(item)
    prefix = f'{{"i":{index},"effect":'
    if eff[0] == "CallParallel":
        calls = eff[_POS["CallParallel"]["calls"]]
        head = _json_atoms(eff, skip=("calls",))
        head = head[:-1] + f',"n":{len(calls)}}}'
        event = "null" if ev is None else _json_atoms(ev, skip=("outcomes",))
        lines = [prefix + head + ',"event":' + event + "}"]
        outcomes = () if ev is None else ev[_POS["ParallelReturned"]["outcomes"]]
        for j, call in enumerate(calls):
            outcome = outcomes[j] if j < len(outcomes) else None
            lines.append(f'{{"i":{index},"child":{j},"effect":' + _json_atoms(call)
                         + ',"event":' + _json_atoms(outcome) + "}")
        return lines
    return [prefix + _json_atoms(eff) + ',"event":' + _json_atoms(ev) + "}"]


# --------------------------------------------------------------------- reading lines


class _Bad(Exception):
    """A field of a line is missing or malformed (raised with the field's path)."""

    def __init__(self, path: Any, problem: str) -> None:
        path = _path(path)
        super().__init__(path, problem)
        self.path = path
        self.problem = problem


def _path(path: Any) -> str:
    """A field's path as text: ``path`` itself, or a ``(parent, field)`` pair joined."""
    if type(path) is tuple:
        parent, key = path
        return f"{parent}.{key}" if parent else key
    return path


def _field(obj: dict[str, Any], key: str, path: Any) -> Any:
    if key not in obj:
        path = _path(path)
        raise _Bad(f"{path}.{key}" if path else key, "missing")
    return obj[key]


def _read_datetime(value: Any, path: Any) -> datetime:
    if type(value) is not str:
        raise _Bad(path, f"expected an ISO 8601 time, found {_shown(value)}")
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        raise _Bad(path, f"not an ISO 8601 time: {_shown(value)}") from None
    if at.tzinfo is None:
        raise _Bad(path, f"the time {value!r} has no UTC offset")
    return at


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: Any) -> bool:
    return type(value) is int


def _read(kind: str, value: Any, path: str, run_id: str) -> Any:
    """A field of a line read as its kind says, checked (``_Bad`` with its path if not)."""
    return _READERS[kind](value, path, run_id)


def _read_str(value: Any, path: Any, run_id: str) -> Any:
    if type(value) is not str:
        raise _Bad(path, f"expected a string, found {_shown(value)}")
    return value


def _read_int(value: Any, path: Any, run_id: str) -> Any:
    if type(value) is not int or value < 0:
        raise _Bad(path, f"expected a non-negative integer, found {_shown(value)}")
    return value


def _read_float(value: Any, path: Any, run_id: str) -> Any:
    if type(value) not in (int, float):
        raise _Bad(path, f"expected a number, found {_shown(value)}")
    return float(value)


def _read_bool(value: Any, path: Any, run_id: str) -> Any:
    if type(value) is not bool:
        raise _Bad(path, f"expected true or false, found {_shown(value)}")
    return value


def _read_dt(value: Any, path: Any, run_id: str) -> Any:
    return _read_datetime(value, path)


def _read_state(value: Any, path: Any, run_id: str) -> Any:
    if type(value) is not dict and not isinstance(value, dict):
        raise _Bad(path, f"expected a state (a JSON object), found {_shown(value)}")
    return _json_text(value)


def _read_output(value: Any, path: Any, run_id: str) -> Any:
    return (_json_text(value), None)


def _read_error(value: Any, path: Any, run_id: str) -> Any:
    if not isinstance(value, dict):
        raise _Bad(path, f"expected an error {{\"type_names\": [...], \"message\": "
                         f"...}}, found {_shown(value)}")
    names = _field(value, "type_names", path)
    if not isinstance(names, list) or not all(type(n) is str for n in names):
        raise _Bad((path, "type_names"), f"expected a list of class names, found "
                                         f"{_shown(names)}")
    return ("ErrorInfo", tuple(names), _read_str(_field(value, "message", path),
                                                 (_path(path), "message"), run_id))


def _read_class(value: Any, path: Any, run_id: str) -> Any:
    if value not in FailureClass.__members__:
        raise _Bad(path, f"expected a failure class ({', '.join(FailureClass)}), found "
                         f"{_shown(value)}")
    return value


def _read_status(value: Any, path: Any, run_id: str) -> Any:
    if value not in RunStatus.__members__:
        raise _Bad(path, f"expected a run status ({', '.join(RunStatus)}), found "
                         f"{_shown(value)}")
    return value


def _read_ints(value: Any, path: Any, run_id: str) -> Any:
    if not isinstance(value, list) or not all(_is_int(v) and v >= 0 for v in value):
        raise _Bad(path, f"expected a list of non-negative integers, found {_shown(value)}")
    return tuple(value)


def _read_answers(value: Any, path: Any, run_id: str) -> Any:
    if not isinstance(value, list) or not all(v is None or type(v) is str for v in value):
        raise _Bad(path, f"expected a list of answers, found {_shown(value)}")
    return tuple(value)


def _read_coords(value: Any, path: Any, run_id: str) -> Any:
    if value == []:  # at the top of the plan: the common case
        return ()
    if not isinstance(value, list) or not all(
        isinstance(c, list) and len(c) == 3 and c[0] in ("loop", "item")
        and type(c[1]) is str and _is_int(c[2]) and c[2] >= 0 for c in value
    ):
        raise _Bad(path, f"expected a list of [kind, step id, n], found {_shown(value)}")
    return tuple(tuple(c) for c in value)


def _read_calls(value: Any, path: Any, run_id: str) -> Any:
    if not isinstance(value, list):
        raise _Bad(path, f"expected a list of calls, found {_shown(value)}")
    return tuple(_read_obj(v, f"{_path(path)}[{k}]", run_id, _CHILD_EFFECTS)
                 for k, v in enumerate(value))


def _read_outcomes(value: Any, path: Any, run_id: str) -> Any:
    if not isinstance(value, list):
        raise _Bad(path, f"expected a list of outcomes, found {_shown(value)}")
    return tuple(_read_obj(v, f"{_path(path)}[{k}]", run_id, _OUTCOME_EVENTS)
                 for k, v in enumerate(value))


def _read_records(value: Any, path: Any, run_id: str) -> Any:
    if not isinstance(value, list):
        raise _Bad(path, f"expected a list of records, found {_shown(value)}")
    return tuple(_read_pair(v, f"{_path(path)}[{k}]", run_id) for k, v in enumerate(value))


def _read_partials(value: Any, path: Any, run_id: str) -> Any:
    if not isinstance(value, list):
        raise _Bad(path, f"expected a list of finished children, found {_shown(value)}")
    out = []
    for k, v in enumerate(value):
        where = f"{_path(path)}[{k}]"
        if not (isinstance(v, list) and len(v) == 3 and _is_int(v[0]) and v[0] >= 0):
            raise _Bad(where, f"expected [child index, call, outcome], found {_shown(v)}")
        out.append((v[0], _read_obj(v[1], f"{where}[1]", run_id, _CHILD_EFFECTS),
                    _read_obj(v[2], f"{where}[2]", run_id, _OUTCOME_EVENTS)))
    return tuple(out)


def _optional(read: Callable[[Any, Any, str], Any]) -> Callable[[Any, Any, str], Any]:
    """The reader of a field that may also be null: None, else what ``read`` reads."""

    def read_optional(value: Any, path: Any, run_id: str) -> Any:
        return None if value is None else read(value, path, run_id)

    return read_optional


# How each kind of field is read from a line: one function per kind.
_READERS: dict[str, Callable[[Any, Any, str], Any]] = {
    _S: _read_str, _OS: _optional(_read_str), _I: _read_int, _OI: _optional(_read_int),
    _F: _read_float, _B: _read_bool, _DT: _read_dt, _ODT: _optional(_read_dt),
    _ST: _read_state, _OST: _optional(_read_state), _OUTPUT: _read_output,
    _ER: _read_error, _OER: _optional(_read_error), _CL: _read_class,
    _OCL: _optional(_read_class),
    _STATUS: _read_status, _INTS: _read_ints, _ANSWERS: _read_answers,
    _COORDS: _read_coords, _CALLS: _read_calls, _OUTCOMES: _read_outcomes,
    _RECORDS: _read_records, _PARTIALS: _read_partials,
}
# Each class's fields with their kinds and readers, in the order of ``_SPEC``.
_READ_SPEC: dict[str, tuple[tuple[str, str, Callable[[Any, Any, str], Any]], ...]] = {
    name: tuple((f, kind, _READERS[kind]) for f, kind in fields)
    for name, fields in _SPEC.items()
}


def _read_pair(value: Any, path: Any, run_id: str) -> Any:
    if isinstance(value, dict) and "resumed" in value:
        return ResumeMarker(_read(_S, value["resumed"], f"{path}.resumed", run_id))
    if not isinstance(value, list) or len(value) != 2:
        raise _Bad(path, f"expected a record [effect, event], found {_shown(value)}")
    eff = _read_obj(value[0], f"{path}[0]", run_id, _EFFECTS)
    ev = None if value[1] is None else _read_obj(value[1], f"{path}[1]", run_id, _EVENTS)
    return eff if ev is None else eff + ev


def _read_path(value: Any, run_id: str) -> tuple[PathStep, ...]:
    """A child line's ``path``: ``[[group index, child index, started at or null, call],
    ...]``, at least one step."""
    if not isinstance(value, list) or not value:
        raise _Bad("path", f"expected a list of steps, found {_shown(value)}")
    steps: list[PathStep] = []
    for k, step in enumerate(value):
        where = f"path[{k}]"
        if not isinstance(step, list) or len(step) != 4:
            raise _Bad(where, f"expected [group, child, started_at, effect], found "
                              f"{_shown(step)}")
        m = _read(_I, step[0], f"{where}[0]", run_id)
        j = _read(_I, step[1], f"{where}[1]", run_id)
        at = None if step[2] is None else _read_dt(step[2], f"{where}[2]", run_id)
        call = decode_effect(_read_obj(step[3], f"{where}[3]", run_id, _CHILD_EFFECTS))
        steps.append((m, j, at, call))
    return tuple(steps)


def _read_obj(value: Any, path: str, run_id: str, allowed: frozenset[str]) -> tuple[Any, ...]:
    """An effect or event written as a JSON object, read and checked into its atoms."""
    if not isinstance(value, dict):
        raise _Bad(path, f"expected a JSON object, found {_shown(value)}")
    name = value.get("t")
    if name not in allowed:
        raise _Bad(f"{path}.t", f"expected one of {', '.join(sorted(allowed))}, found "
                                f"{_shown(name)}")
    if name == "RecordAttempt" and "event" in value:  # format 1: a nested trace event
        value = _field(value, "event", path)
        if not isinstance(value, dict):
            raise _Bad(f"{path}.event", f"expected a trace event, found {_shown(value)}")
        path = f"{path}.event"
    fast = _FAST.get(name)
    if fast is not None:
        atoms_of = fast(value)
        if atoms_of is not None:
            return atoms_of
    atoms: list[Any] = [name]
    for f, kind, reader in _READ_SPEC[name]:
        if f not in value:
            if kind in _ABSENT_EMPTY or (f, name) in _V1_ABSENT:
                # A group's calls and outcomes are on the child lines that follow it; a
                # cancelled child's partials are written when it has some.
                atoms.append(_V1_DEFAULT.get((f, name), () if kind in _ABSENT_EMPTY
                                             else None))
                continue
            raise _Bad(f"{path}.{f}", "missing")
        # (the field's path as a pair, made text only for an error)
        atoms.append(reader(value[f], (path, f), run_id))
    if name == "NodeReturned" and "valid" in value:
        valid = _read(_S, value["valid"], f"{path}.valid", run_id)
        k = _POS["NodeReturned"]["output"]
        atoms[k] = (atoms[k][0], valid)
    elif name == "NodeReturned" and "unwritable" in value:
        error = _read(_ER, value["unwritable"], f"{path}.unwritable", run_id)
        k = _POS["NodeReturned"]["output"]
        atoms[k] = (b"null", error)
    if name == "FailureClassified" and "failure" in value and "answers" not in value:
        failure = _read(_OCL, value["failure"], f"{path}.failure", run_id)  # format 1
        atoms[1] = (failure,)
    return tuple(atoms)


# The records of a chain of successes, read at once when they are as the writer makes
# them (every field there, nothing else, the common values); None sends a record to the
# field-by-field reader above, which says exactly what is wrong with it.


def _fast_time(value: Any) -> datetime | None:
    if type(value) is str:
        try:
            at = datetime.fromisoformat(value)
        except ValueError:
            return None
        if at.tzinfo is not None:
            return at
    return None


def _fast_coords(value: Any) -> Any:
    """A record's coordinates, or None when they are not as the writer makes them."""
    if value == []:
        return ()
    try:
        return _read_coords(value, "coords", "")
    except _Bad:
        return None


# The keys of each record as the writer makes them, in its order: a record that has
# exactly these is unpacked at once (one comparison instead of a lookup per field).
_RECORD_KEYS = ("i", "effect", "event")
_CALL_NODE_KEYS = ("t", "node_id", "attempt", "timeout_ms", "model", "coords")
_RETURNED_KEYS = ("t", "output", "valid", "started_at", "duration_ms", "input_tokens",
                  "output_tokens", "model")
_COMMIT_KEYS = ("t", "node_id", "run_id", "attempt", "timestamp_utc", "input_state",
                "output_state", "duration_ms", "schema", "coords")


def _fast_call_node(v: dict[str, Any]) -> tuple[Any, ...] | None:
    if tuple(v) != _CALL_NODE_KEYS:
        return None
    _, node_id, attempt, timeout, model, coords = v.values()
    coords = () if coords == [] else _fast_coords(coords)
    if (coords is not None and type(node_id) is str and type(attempt) is int
            and attempt >= 0 and (timeout is None or (type(timeout) is int and timeout >= 0))
            and (model is None or type(model) is str)):
        return ("CallNode", node_id, attempt, timeout, model, coords)
    return None


def _fast_node_returned(v: dict[str, Any]) -> tuple[Any, ...] | None:
    if tuple(v) != _RETURNED_KEYS:
        return None
    _, output, valid, started_at, duration, tin, tout, model = v.values()
    if not (type(valid) is str and type(duration) is int and duration >= 0
            and type(tin) is int and tin >= 0 and type(tout) is int and tout >= 0
            and (model is None or type(model) is str)):
        return None
    at = _fast_time(started_at)
    if at is None:
        return None
    return ("NodeReturned", (_json_text(output), valid), at, duration, tin, tout, model)


def _fast_commit(v: dict[str, Any]) -> tuple[Any, ...] | None:
    if tuple(v) != _COMMIT_KEYS:
        return None
    _, node_id, run_id, attempt, timestamp, given, out, duration, schema, coords = v.values()
    coords = () if coords == [] else _fast_coords(coords)
    if not (coords is not None and type(node_id) is str and type(run_id) is str
            and type(attempt) is int and attempt >= 0 and type(duration) is int
            and duration >= 0 and (schema is None or type(schema) is str)
            and type(given) is dict and type(out) is dict):
        return None
    at = _fast_time(timestamp)
    if at is None:
        return None
    return ("Commit", node_id, run_id, attempt, at, _json_text(given), _json_text(out),
            duration, schema, coords)


_FAST: dict[str, Callable[[dict[str, Any]], tuple[Any, ...] | None]] = {
    "CallNode": _fast_call_node, "NodeReturned": _fast_node_returned,
    "Commit": _fast_commit,
}


# Kinds of field that read as empty when a line does not have them.
_ABSENT_EMPTY = frozenset({_RECORDS, _CALLS, _OUTCOMES, _COORDS, _PARTIALS})

# Fields a format 1 log does not have, and what they read as; and what a cancelled child
# used, written only when it used some (and not by the versions before it was counted).
_UNSPENT = ("total_tokens", "total_cost_usd")
_V1_ABSENT = {
    ("indices", "CallParallel"), ("deadline_passed", "ParallelReturned"),
    ("timeout_ms", "FireHook"),
    ("answers", "FailureClassified"), ("schema", "SaveCheckpoint"),
    ("total_tokens", "NodeCancelled"), ("total_cost_usd", "NodeCancelled"),
}
_V1_DEFAULT: dict[tuple[str, str], Any] = {
    ("deadline_passed", "ParallelReturned"): False,
    ("answers", "FailureClassified"): (),
    ("indices", "CallParallel"): (),
    ("total_tokens", "NodeCancelled"): 0,
    ("total_cost_usd", "NodeCancelled"): 0.0,
}


def _parse_line(line: str, source: str, line_no: int, *, last: bool) -> dict[str, Any] | None:
    try:
        obj = from_json(line)
    except ValueError:
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            # A crash cuts a line before its newline (the torn tail, never read as a line);
            # a whole last line that does not read is a torn one only as a power loss
            # leaves it, the blocks of a write never made durable read as NUL bytes. Any
            # other is damage: dropped, the records it held would be written over.
            if last and "\x00" in line:
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
    if obj["stroma_log"] not in _READABLE or type(obj["stroma_log"]) is not int:
        raise LogCorrupted(
            source,
            f"log format version {obj['stroma_log']!r}, this stroma reads versions "
            f"{', '.join(map(str, _READABLE))}: replay it with the stroma version that wrote it",
        )
    try:
        for key, kind in (("run_id", str), ("plan", str), ("version", str),
                          ("started_at", str)):
            if type(obj.get(key)) is not kind:
                raise _Bad(key, f"expected a string, found {_shown(obj.get(key))}")
        if type(obj.get("seed")) is not int:
            raise _Bad("seed", f"expected an integer, found {_shown(obj.get('seed'))}")
        _read_datetime(obj["started_at"], "started_at")
        config = obj.get("config") or {}
        if not isinstance(config, dict):
            raise _Bad("config", f"expected an object, found {_shown(config)}")
    except _Bad as bad:
        raise LogCorrupted(source, f"line 1: header field {bad.path}: {bad.problem}") from None
    return LogHeader(
        run_id=obj["run_id"], plan=obj["plan"], seed=obj["seed"], version=obj["version"],
        started_at=obj["started_at"], config=dict(config), format=obj["stroma_log"],
    )


def _upgrade_v1(items: list[Any]) -> None:
    """Format 1 records in format 2 terms, in place: a successful RecordAttempt followed
    by its SaveCheckpoint becomes a Commit (with the checkpoint's schema), the
    SavedCheckpoint record staying for replay to pass over; a success whose checkpoint
    record was not written (a crash between the two) is dropped, as a torn tail is; a
    group's children are numbered and 'finished' in argument order (format 1 decided the
    first failure in argument order). Sub-plans' records are upgraded too."""
    k = 0
    while k < len(items):
        item = items[k]
        if type(item) is ResumeMarker:
            k += 1
            continue
        eff, ev = record_effect(item), record_event(item)
        if eff[0] == "RecordAttempt" and eff[8] is None and eff[6] is not None:
            nxt = items[k + 1] if k + 1 < len(items) else None
            if nxt is None:
                del items[k:]
                return
            if type(nxt) is not ResumeMarker and nxt[0] == "SaveCheckpoint" \
                    and nxt[1] == eff[1]:
                _, node_id, run_id, attempt, at, inp, out, ms, _, _, _ = eff
                # (no schema: format 1 named derived schemas by a counter of the process)
                items[k] = ("Commit", node_id, run_id, attempt, at, inp, out, ms, None, ())
        elif eff[0] == "CallParallel":
            calls = eff[3]
            if not eff[7]:
                eff = (*eff[:7], tuple(range(len(calls))))
            if ev is not None and ev[0] == "ParallelReturned":
                ev = (*ev[:3], tuple(_upgrade_outcome(o) for o in ev[3]), ev[4])
            items[k] = eff if ev is None else eff + ev
        k += 1


def _upgrade_outcome(outcome: tuple[Any, ...]) -> tuple[Any, ...]:
    if outcome[0] != "PlanFinished":
        return outcome
    records = list(outcome[9])
    _upgrade_v1(records)
    return (*outcome[:9], tuple(records))


# ------------------------------------------------------------------------------- log


# The first bytes of a FileStore's checkpoint line in its log.jsonl (no effect record).
_CHECKPOINT_LINE = '{"ckpt":1,'


class EffectLog:
    """A run's log in memory: the header and the records, in order."""

    __slots__ = ("_records", "header", "nested", "partials", "progress")

    def __init__(self, header: LogHeader, records: Iterable[Record] = ()) -> None:
        self.header = header
        self._records = records if type(records) is RecordList else RecordList(records)
        # Fan-out children that finished before their group did, as
        # (record index of the group, child index, call, outcome).
        self.partials: list[tuple[int, int, Any, Any]] = []
        # Fan-out children that are sub-plans, still running, by (group index, child
        # index): (the same, call, a NodeCancelled holding the child's records so far).
        self.progress: Progress = {}
        # What runs inside those children (their own groups in flight), by the same key.
        self.nested: Nested = {}

    @property
    def records(self) -> RecordList:
        return self._records

    @records.setter
    def records(self, value: Iterable[Record]) -> None:
        self._records = value if type(value) is RecordList else RecordList(value)

    def pending_children(self) -> dict[int, tuple[Any, Any]]:
        """Children of the group in flight when the log ends (a crash inside a fan-out),
        by child index: (call, outcome).

        A session that went on from a crash inside the group wrote its resume marker, and
        the group's record comes after it: the children kept before the marker still
        count while nothing but such markers follows them (a session cut short again
        before it kept them anew). A child kept again later stands for what was kept of
        it before (it holds all of it: a sub-plan's records from its first)."""
        first = _in_flight_from(self.records.items)
        found: dict[int, tuple[tuple[int, int], Any, Any]] = {}
        for i, j, call, outcome in self.progress.values():
            if i >= first and (j not in found or found[j][0] < (i, 0)):
                found[j] = ((i, 0), call, outcome)
        for i, j, call, outcome in self.partials:
            if i >= first and (j not in found or found[j][0] < (i, 1)):
                found[j] = ((i, 1), call, outcome)
        return {j: (call, outcome if rank else self._with_inner(i, j, outcome))
                for j, ((i, rank), call, outcome) in found.items()}

    def _with_inner(self, i: int, j: int, outcome: fx.NodeCancelled) -> fx.NodeCancelled:
        """A running sub-plan child's outcome with the children of its own group in flight
        (``partials``), so a resumed child does not run them again either."""
        sub = self.nested.get((i, j))
        if sub is None or sub.records is not outcome.records:
            return outcome
        inner = sub.pending_children()
        if not inner:
            return outcome
        return outcome._replace(partials=tuple(
            (child, call, done) for child, (call, done) in sorted(inner.items())))

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EffectLog):
            return NotImplemented
        return self.to_jsonl() == other.to_jsonl()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"EffectLog(run_id={self.header.run_id!r}, records={len(self.records)})"

    # -- reading back what happened

    @property
    def finish(self) -> fx.Finish | None:
        """The Finish record of a run that ended, else None (a run cut short)."""
        items = self.records.items
        if items and type(items[-1]) is not ResumeMarker and items[-1][0] == "Finish":
            finish: fx.Finish = decode_effect(record_effect(items[-1]))
            return finish
        return None

    def trace(self) -> ExecutionTrace:
        """The trace is a fold over the log: the attempts' records (Commit and
        RecordAttempt), in order."""
        return ExecutionTrace.from_records(
            [x for x in self.records.items if is_attempt(x)], trace_of
        )

    def completed_nodes(self) -> list[str]:
        """Ids of the steps whose checkpoint was committed, in order."""
        return [x[1] for x in self.records.items
                if type(x) is not ResumeMarker and x[0] == "Commit"]

    # -- text

    def lines(self) -> list[str]:
        out = [encode_header(self.header)]
        texts = self.records.texts
        items = self.records.items
        # A finished group's record holds all its children in argument order, so its
        # partials (in completion order) are left out: the text stays deterministic. Only
        # the children of a group still in flight (a crash inside a fan-out) are written,
        # each before the record whose index it has (the resume markers that follow).
        first = _in_flight_from(items)
        for i, item in enumerate(items):
            if i >= first:
                out.extend(_in_flight_lines(self, i))
            original = texts.get(i)
            out.extend(original if original is not None else encode_record(i, item))
        out.extend(_in_flight_lines(self, len(items)))
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
        if not isinstance(text, str):
            raise LogCorrupted(source, f"expected the log's text, found {type(text).__name__}")
        raw_lines = text.split("\n")
        complete = raw_lines[:-1]  # what precedes the last newline
        tail = raw_lines[-1]  # text after the last newline: a torn line, or ""
        if not complete and tail.strip():
            raise LogCorrupted(
                source, f"the log has no whole line: its only line ({len(tail)} characters) "
                "does not end with a newline, as a line cut off by a crash; every line of a "
                "log ends with one (EffectLog.to_jsonl() and the stores write them so)")
        if _CHECKPOINT_LINE not in text:
            return cls.from_lines(complete, source=source, torn_tail=tail)
        # A FileStore's log.jsonl: the checkpoints committed with its records are lines of
        # their own, no records; read without them, damage named by the file's line.
        kept = [k for k, line in enumerate(complete) if not line.startswith(_CHECKPOINT_LINE)]
        if tail.startswith(_CHECKPOINT_LINE):
            tail = ""
        try:
            return cls.from_lines([complete[k] for k in kept], source=source, torn_tail=tail)
        except LogCorrupted as e:
            def number(m: re.Match[str]) -> str:
                n = int(m.group(1))
                return f"line {kept[n - 1] + 1 if 0 < n <= len(kept) else n}"

            raise LogCorrupted(e.source, re.sub(r"\bline (\d+)", number, e.problem)) from None

    @classmethod
    def from_lines(
        cls, lines: list[str], source: str = "<effect log>", torn_tail: str = "",
        *, whole: bool = False,
    ) -> EffectLog:
        """Parse lines (without newlines); a torn last line is dropped, other damage raises.

        ``whole``: the store writes each append whole (a Redis list, a table), so no line
        can be torn by a crash: a damaged last line (or a group cut short) is damage too,
        raised, never dropped (a resumed run would write after it, and the log could not
        be read again)."""
        if whole:
            torn_tail = "(none: every line was written whole)"
        if not lines:
            raise LogCorrupted(source, "the log is empty: it has no header line")
        header = _parse_header(lines[0], source)
        run_id = header.run_id
        v1 = header.format == 1
        records = RecordList()
        items = records.items
        partials: list[tuple[int, int, Any, Any]] = []
        progress: Progress = {}
        nested: Nested = {}
        n = len(lines)
        line_no = 1
        while line_no < n:
            line = lines[line_no]
            try:
                obj = from_json(line)
            except ValueError:  # deeper than the fast parser goes, a torn line, or damage
                obj = _parse_line(line, source, line_no + 1, last=line_no == n - 1
                                  and not torn_tail)
                if obj is None:  # torn last line
                    break
            if type(obj) is not dict:
                raise LogCorrupted(source, f"line {line_no + 1}: expected a JSON object, "
                                           f"found {line[:80]!r}")
            if tuple(obj) == _RECORD_KEYS and not v1:
                # A record of a chain of successes as the writer makes it, read at once
                # (anything else, or anything wrong with it: the field-by-field reader).
                index, effect, event = obj.values()
                if type(index) is int and index == len(items) and type(effect) is dict:
                    kind = effect.get("t")
                    atoms: Any = None
                    if kind == "Commit":
                        if event is None:
                            atoms = _fast_commit(effect)
                    elif (kind == "CallNode" and type(event) is dict
                          and event.get("t") == "NodeReturned"):
                        call = _fast_call_node(effect)
                        returned = None if call is None else _fast_node_returned(event)
                        if returned is not None:
                            atoms = call + returned  # type: ignore[operator]
                    if atoms is not None:
                        items.append(atoms)
                        line_no += 1
                        continue
            try:
                index = obj.get("i")
                if not _is_int(index):
                    raise _Bad("i", f"expected the record's index, found {_shown(index)}")
                if "partial" in obj and index == len(items) and "path" in obj:
                    # A step of a sub-plan running inside a running sub-plan child.
                    child = _read(_I, obj["partial"], "partial", run_id)
                    call = decode_effect(_read_obj(_field(obj, "effect", ""), "effect",
                                                   run_id, _CHILD_EFFECTS))
                    raw_at = _field(obj, "at", "")
                    top_at = None if raw_at is None else _read_dt(raw_at, "at", run_id)
                    path = _read_path(obj["path"], run_id)
                    payload: Payload
                    if "progress" in obj:
                        payload = ("progress", _read(_I, obj["progress"], "progress", run_id),
                                   _read_pair(_field(obj, "record", ""), "record", run_id))
                    else:
                        payload = ("event", decode_event(_read_obj(
                            _field(obj, "event", ""), "event", run_id, _OUTCOME_EVENTS)))
                    add_child_line(progress, partials, nested, index, child, call, top_at,
                                   path, payload)
                    line_no += 1
                    continue
                if "partial" in obj and index == len(items) and "progress" in obj:
                    # A record of a sub-plan child still running (see encode_progress).
                    child = _read(_I, obj["partial"], "partial", run_id)
                    position = _read(_I, obj["progress"], "progress", run_id)
                    call = decode_effect(_read_obj(_field(obj, "effect", ""), "effect",
                                                   run_id, _CHILD_EFFECTS))
                    record = _read_pair(_field(obj, "record", ""), "record", run_id)
                    at = _read_dt(_field(obj, "at", ""), "at", run_id)
                    add_progress(progress, index, child, call, at, position, record, nested)
                    line_no += 1
                    continue
                if "partial" in obj and index == len(items):
                    child = _read(_I, obj["partial"], "partial", run_id)
                    add_partial(partials, progress, (
                        index, child,
                        decode_effect(_read_obj(_field(obj, "effect", ""), "effect", run_id,
                                                _CHILD_EFFECTS)),
                        decode_event(_read_obj(_field(obj, "event", ""), "event", run_id,
                                               _OUTCOME_EVENTS)),
                    ), nested)
                    line_no += 1
                    continue
                if index != len(items):
                    raise LogCorrupted(
                        source, f"line {line_no + 1}: record index {index} out of sequence "
                        f"(expected {len(items)})"
                    )
                if "resumed" in obj:
                    at = _read(_S, obj["resumed"], "resumed", run_id)
                    restart = obj.get("restart")
                    if restart is not None and not isinstance(restart, dict):
                        raise _Bad("restart", f"expected an object, found {_shown(restart)}")
                    records.append(ResumeMarker(at, restart))
                    if v1:
                        records.texts[index] = [line]
                    line_no += 1
                    continue
                effect = _read_obj(_field(obj, "effect", ""), "effect", run_id, _EFFECTS)
                raw_event = _field(obj, "event", "")
                event = (None if raw_event is None
                         else _read_obj(raw_event, "event", run_id, _EVENTS))
                used = [line]
                if effect[0] == "CallParallel":
                    count = _read(_I, _field(obj["effect"], "n", "effect"), "effect.n", run_id)
                    calls: list[Any] = []
                    outcomes: list[Any] = []
                    j = line_no + 1
                    while j < n and len(calls) < count:
                        child = _parse_line(lines[j], source, j + 1,
                                            last=j == n - 1 and not torn_tail)
                        if child is None:
                            break
                        if child.get("i") != index or child.get("child") != len(calls):
                            raise LogCorrupted(
                                source, f"line {j + 1}: expected child {len(calls)} of "
                                f"the parallel group on line {line_no + 1}"
                            )
                        try:
                            calls.append(_read_obj(_field(child, "effect", ""), "effect",
                                                   run_id, _CHILD_EFFECTS))
                            raw_outcome = _field(child, "event", "")
                            if raw_outcome is not None:
                                outcomes.append(_read_obj(raw_outcome, "event", run_id,
                                                          _OUTCOME_EVENTS))
                        except _Bad as bad:
                            raise LogCorrupted(
                                source, f"line {j + 1}: field {bad.path}: {bad.problem}"
                            ) from None
                        used.append(lines[j])
                        j += 1
                    if len(calls) < count:
                        if whole:
                            raise LogCorrupted(
                                source, f"line {line_no + 1}: the parallel group has "
                                f"{len(calls)} of its {count} child lines, and this store "
                                "writes each append whole: the log was altered; restore it, "
                                "or delete the run and start it again")
                        break  # the group was cut short by a crash: a torn tail
                    effect = (*effect[:3], tuple(calls), *effect[4:])
                    if event is not None:
                        if event[0] != "ParallelReturned" or len(outcomes) != count:
                            raise _Bad("event", "a group's answer must be a ParallelReturned "
                                                "with an outcome per child")
                        event = (*event[:3], tuple(outcomes), *event[4:])
                    items.append(effect if event is None else effect + event)
                    if v1:
                        records.texts[index] = used
                    line_no = j
                    continue
                items.append(effect if event is None else effect + event)
                if v1:
                    records.texts[index] = used
            except _Bad as bad:
                raise LogCorrupted(
                    source, f"line {line_no + 1}: field {bad.path}: {bad.problem}"
                ) from None
            except LogCorrupted:
                raise
            except (KeyError, TypeError, ValueError, AttributeError, ArithmeticError,
                    RecursionError, IndexError) as e:
                raise LogCorrupted(
                    source, f"line {line_no + 1}: not a valid record ({type(e).__name__}: {e})"
                ) from None
            line_no += 1
        if v1:
            _upgrade_v1(items)
            for k in [k for k in records.texts if k >= len(items)]:
                del records.texts[k]
        log = cls(header, records)
        log.partials = partials
        log.progress = progress
        log.nested = nested
        return log
