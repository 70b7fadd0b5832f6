"""Sending a waiting run its input: ``send_input``.

A run that reaches ``await_input(name, schema)`` with no input ends WAITING; its log says
what it waits for (the wait's key, its schema and a digest of the state it asks about).
``send_input`` checks a payload against that wait and keeps it in the run's store, where
the run finds it when it is run again with the same run id (``interpret(plan, ...,
store=store, config=RunConfig(run_id=...))``). Nothing is lost on a refusal: the run
stays WAITING, the store unchanged.
"""

from __future__ import annotations

import inspect
import json
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticSerializationError, to_json

from stroma import effects as fx
from stroma.errors import StromaError, StromaTypeError, UnsafeSchemaRef
from stroma.log import EffectLog, ResumeMarker
from stroma.schemas import json_schema_problems, read_state, resolve_declared, state_json
from stroma.trace import RunStatus

__all__ = ("InputRefused", "pending_wait", "send_input")


class InputRefused(StromaError, ValueError):
    """``send_input`` refused a payload: the run waits for no such input, the payload does
    not fit the wait's schema (the fields are named), or it was meant for another request
    (its digest)."""


def pending_wait(log: EffectLog) -> list[fx.AwaitInput]:
    """The waits a run that ended WAITING is stopped at (none for any other run)."""
    finish = log.finish
    if finish is None or finish.status is not RunStatus.WAITING:
        return []
    waits: list[fx.AwaitInput] = []
    records = log.records
    for k in range(len(records) - 1, -1, -1):  # (decoding only the records walked)
        record = records[k]
        if isinstance(record, ResumeMarker):
            break
        effect, event = record
        # (an input that was there but did not fit: the run waits on for a valid one)
        if isinstance(effect, fx.AwaitInput) and isinstance(
                event, fx.InputMissing | fx.InputReceived):
            waits.append(effect)
            break
        if isinstance(event, fx.ParallelReturned):
            waits.extend(_child_waits(event))
            break
    return waits


def _child_waits(event: fx.ParallelReturned) -> list[fx.AwaitInput]:
    found: list[fx.AwaitInput] = []
    for outcome in event.outcomes:
        if isinstance(outcome, fx.PlanFinished) and outcome.status is RunStatus.WAITING:
            found.extend(pending_wait(EffectLog(_header(), outcome.records)))
    return found


def _header() -> Any:
    from stroma.log import LogHeader

    return LogHeader(run_id="", plan="", seed=0, version="", started_at="")


async def _read_log(store: Any, run_id: str) -> EffectLog | None:
    read = getattr(store, "read_log", None)
    if callable(read):
        log = read(run_id)
        if inspect.isawaitable(log):
            log = await log
        return log
    get = getattr(store, "get_log", None)
    if not callable(get):
        raise InputRefused(
            f"send_input(store={store!r:.80}): expected the store the run is in (a "
            f"FileStore, RedisStore, PostgresStore or in-memory store), got a "
            f"{type(store).__name__}, which holds no runs' logs (nothing was sent)"
        )
    return get(run_id)


async def send_input(
    store: Any,
    run_id: str,
    name: str,
    payload: Any,
    *,
    digest: str | None = None,
    schema: type[BaseModel] | None = None,
    replace: bool = False,
) -> str:
    """Send the input ``name`` (a model, a dict, or JSON text) to the run ``run_id``,
    WAITING in ``store``; returns the key it was kept under.

    The payload is checked against the wait's schema: the class itself when this process
    knows it (the plan's module imported, or ``schema=``), else the JSON Schema the log
    keeps. With ``digest=`` (from the run's wait: ``pending_wait(log)[0].digest``) a
    payload meant for a state the run is no longer in is refused. An input sent already
    that the run has not taken yet is refused too, unless ``replace=True``.
    """
    for value, what, example in ((run_id, "run_id", "'agent-1'"),
                                 (name, "name", "'approval', or a key like 'approval@x#2'")):
        if not isinstance(value, str):
            raise StromaTypeError(
                f"send_input: {what} must be a str ({example}), got {value!r:.60} (a "
                f"{type(value).__name__}); call send_input(store, run_id, name, payload) "
                "(nothing was sent)")
    log = await _read_log(store, run_id)
    if log is None:
        raise InputRefused(f"send_input: the store has no run {run_id!r} (nothing was sent)")
    waits = pending_wait(log)
    if not waits:
        status = log.finish.status if log.finish is not None else "running or crashed"
        raise InputRefused(
            f"send_input: run {run_id!r} is not waiting for input (it is {status}); an "
            "input can only be sent to a run that stopped at an await_input step"
        )
    wait = next((w for w in waits if w.key == name), None)
    if wait is None:
        named = [w for w in waits if w.name == name]
        wait = named[0] if len(named) == 1 else None
    if wait is None:
        keys = ", ".join(repr(w.key) for w in waits)
        if named:  # one wait in several places (the items of a map, say): which one?
            raise InputRefused(
                f"send_input: run {run_id!r} waits for {name!r} in {len(named)} places, "
                f"each with its own key ({', '.join(repr(w.key) for w in named)}): send "
                f"each input by its key, e.g. send_input(store, {run_id!r}, "
                f"{named[0].key!r}, ...) (nothing was sent)"
            )
        raise InputRefused(
            f"send_input: run {run_id!r} waits for {keys}, not {name!r}: send one of those"
        )
    if digest is not None and not isinstance(digest, str):
        raise InputRefused(f"send_input(digest={digest!r}): expected the wait's digest as "
                           "text, as runs shows it (nothing was sent)")
    # (the digest as `runs` shows it, its first 8 characters or more, names it too)
    if digest is not None and digest != wait.digest and len(digest) < 8 and (
            wait.digest.startswith(digest)):
        raise InputRefused(
            f"send_input(digest={digest!r}): give at least its first 8 characters "
            f"({wait.digest[:8]!r} or more), so that it names one request (nothing was sent)"
        )
    if digest is not None and not (
        digest == wait.digest or (len(digest) >= 8 and wait.digest.startswith(digest))
    ):
        raise InputRefused(
            f"send_input: the input {wait.key!r} was meant for another request of run "
            f"{run_id!r} (digest {digest!r}; the run now asks about {wait.digest!r}): the "
            "state it was asked about changed; look at the run again and send a new one"
        )
    text = _as_text(payload)
    _check(text, wait, schema)
    put = getattr(store, "put_input", None)
    if not callable(put):
        raise InputRefused(
            f"send_input: {type(store).__name__} cannot keep inputs (it has no put_input): "
            "use a store of stroma's, or give the input to interpret(..., inputs={...})"
        )
    if not replace and _unanswered(log.records, wait.key):
        sent = getattr(store, "get_input", None)
        earlier = sent(run_id, wait.key) if callable(sent) else None
        if inspect.isawaitable(earlier):
            earlier = await earlier
        if earlier is not None:
            raise InputRefused(
                f"send_input: an input {wait.key!r} was sent to run {run_id!r} already "
                f"({str(earlier)[:80]}), and the run has not taken it yet: run the plan "
                "again with the run id to take it, or send this one with replace=True "
                "(--replace) to take its place (nothing was sent)"
            )
    result = put(run_id, wait.key, text)
    if inspect.isawaitable(result):
        await result
    return wait.key


def _unanswered(records: Any, key: str) -> bool | None:
    """Whether the run last found the wait's input missing (an input sent since then has
    not been taken), rather than there and not fitting (it waits for another); None if
    the records do not hold the wait (a group child's records are looked into)."""
    for record in reversed(records):
        if isinstance(record, ResumeMarker):
            return None
        effect, event = record
        if isinstance(effect, fx.AwaitInput) and effect.key == key:
            return isinstance(event, fx.InputMissing)
        if isinstance(event, fx.ParallelReturned):
            for outcome in event.outcomes:
                if isinstance(outcome, fx.PlanFinished):
                    found = _unanswered(outcome.records, key)
                    if found is not None:
                        return found
            return None
    return None


def _as_text(payload: Any) -> str:
    """The payload as the JSON text the store keeps (a model's fields by name, as a state
    is written; datetimes, decimals and the like in a dict as JSON writes them)."""
    if isinstance(payload, BaseModel):
        try:
            return state_json(payload).decode()
        except (PydanticSerializationError, ValueError, UnicodeDecodeError) as e:
            raise InputRefused(
                f"send_input: the payload ({type(payload).__name__}) cannot be written as "
                f"JSON ({e}); give its fields JSON types (nothing was sent)") from None
    if isinstance(payload, str | bytes):
        try:
            json.loads(payload)
        except ValueError as e:
            raise InputRefused(
                f"send_input: the payload {payload[:80]!r} is {type(payload).__name__}, read as "
                f"JSON text, and it is not JSON ({e}): pass the value itself (a dict or a "
                "model), or its JSON text (a string value is '\"text\"'); nothing was sent"
            ) from None
        return payload.decode() if isinstance(payload, bytes) else payload
    try:
        return to_json(payload, inf_nan_mode="constants").decode()
    except (PydanticSerializationError, ValueError, UnicodeDecodeError) as e:
        raise InputRefused(
            f"send_input: the payload ({type(payload).__name__}) cannot be written as JSON "
            f"({e}): send a dict of JSON values, a model, or JSON text (nothing was sent)"
        ) from None


def _check(text: str, wait: fx.AwaitInput, schema: type[BaseModel] | None) -> None:
    cls = schema
    if cls is None:
        try:
            cls = resolve_declared(wait.schema, source="the wait's schema")
        except UnsafeSchemaRef:
            cls = None
    if cls is not None:
        try:
            read_state(cls, text)  # (as the run will read it)
        except ValidationError as e:
            fields = "; ".join(
                f"{'.'.join(map(str, err['loc'])) or '(the payload)'}: {err['msg']}"
                for err in e.errors(include_url=False)
            )
            raise InputRefused(
                f"send_input: the input {wait.key!r} does not fit {cls.__name__}: {fields} "
                "(nothing was sent; the run still waits)"
            ) from None
        known = _dropping_fields(cls)
        if known is not None:
            _refuse_near_misses(text, wait, known, cls.__name__)
        return
    json_schema = json.loads(wait.json_schema or "{}")
    problems = json_schema_problems(json.loads(text), json_schema)
    if problems:
        raise InputRefused(
            f"send_input: the input {wait.key!r} does not fit "
            f"{wait.schema.rsplit(':', 1)[-1] or 'its schema'}: "
            f"{'; '.join(problems)} (nothing was sent; the run still waits)"
        )
    if isinstance(json_schema, dict) and json_schema.get("additionalProperties") is None:
        props = json_schema.get("properties")
        if isinstance(props, dict):
            _refuse_near_misses(text, wait, list(props), wait.schema.rsplit(":", 1)[-1])


def _dropping_fields(cls: type[BaseModel]) -> list[str] | None:
    """The names (and aliases) of a schema's fields, if it drops the keys that are none
    of them (pydantic's default, ``extra="ignore"``); None if it keeps or refuses them."""
    if cls.model_config.get("extra") not in (None, "ignore"):
        return None
    names = [alias for name, f in cls.model_fields.items()
             for alias in (name, f.alias, f.validation_alias) if isinstance(alias, str)]
    return list(dict.fromkeys(names))


def _near_misses(payload: object, fields: list[str]) -> list[str]:
    """The keys of a payload that are no field but close to one whose field it lacks
    (``{"aproved": true}`` for ``approved``), each shown with that field."""
    if not isinstance(payload, dict):
        return []
    import difflib  # (not at import: import stroma loads no difflib)

    lowered = {f.lower(): f for f in fields}
    near = []
    for key in payload:
        if not isinstance(key, str) or key in fields:
            continue
        close = lowered.get(key.lower()) or next(
            iter(difflib.get_close_matches(key, fields, n=1, cutoff=0.75)), None)
        if close is not None and close not in payload:
            near.append(f"{key!r} (did you mean {close!r}?)")
    return near


def _refused_keys(who: str, key: str, near: list[str], name: str, after: str) -> InputRefused:
    """The error for a payload whose keys ``near`` a schema ``name`` would drop."""
    return InputRefused(
        f"{who}: the input {key!r} has the key{'s' if len(near) > 1 else ''} "
        f"{', '.join(near)}, which {name} has no field for: it would be dropped, and the "
        f"field left at its default; send it with {name}'s field names ({after})"
    )


def _refuse_near_misses(text: str, wait: fx.AwaitInput, fields: list[str], name: str) -> None:
    """Refuse a payload with a key that is no field of the wait's schema but close to one
    whose field it lacks: pydantic would drop it without a word, and the run would take
    the field's default for the person's answer."""
    near = _near_misses(json.loads(text), fields)
    if near:
        raise _refused_keys("send_input", wait.key, near, name,
                           "nothing was sent; the run still waits")
