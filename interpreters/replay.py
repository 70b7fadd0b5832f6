"""The replay loop: the machine fed the events of a recorded log.

A replay is the live loop with the events taken from the log instead of the world: each
effect the machine emits must equal the recorded one (else ``NondeterminismError``,
naming the record, the recorded effect and the new one), the recorded answer is fed back
through ``advance``, and nothing user-written runs. A ``ResumeMarker`` is fed to the
machine as the ``Resumed`` event it records.

``replay_records`` stops at the recorded ``Finish``, or where the records end (a run that
crashed or is still running): it then says which of the machine's effects the log has not
recorded, for the live loop to perform after a ``Resumed``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from stroma import effects as fx
from stroma.errors import LogCorrupted, NondeterminismError, StromaError
from stroma.log import (
    RecordList,
    ResumeMarker,
    decode_effect,
    decode_event,
    encode_effect,
    record_effect,
    record_event,
)
from stroma.machine import RunState, UnexpectedEvent, advance, start
from stroma.trace import RunStatus
from stroma.values import named_value

__all__ = ("Replayed", "damaged", "describe", "replay_records")

_OWN = (fx.Commit, fx.RecordAttempt)  # the machine's own records: no answer to feed back


@named_value()
class Replayed(NamedTuple):
    """Where a replay stopped: the machine's state, the effects of its last step that the
    log did not record (``pending``, empty after a Finish), how many records were read,
    and the Finish (None when the records ran out first)."""

    state: RunState
    pending: tuple[Any, ...]
    read: int
    finish: fx.Finish | None


def describe(effect: Any) -> str:
    """One line about an effect, for a divergence message."""
    if isinstance(effect, fx.RecordAttempt | fx.Commit):
        e = effect.event
        what = "ok" if e.failure is None else f"{e.failure}: {e.failure_message}"
        return f"{type(effect).__name__}({e.node_id!r}, attempt {e.attempt}, {what})"
    return repr(effect)


_LIVE = frozenset({"state", "input", "output", "schema", "error"})


def _difference(recorded: Any, new: Any) -> str:
    """Which fields differ, when both are the same kind of effect."""
    if type(recorded) is not type(new):
        return f"a {type(new).__name__} where the log has a {type(recorded).__name__}"
    parts = []
    names = getattr(type(new), "_compared", None) or type(new)._fields
    for name in names:
        if name in _LIVE:  # (live values, never compared)
            continue
        x, y = getattr(recorded, name), getattr(new, name)
        if x != y and fx.as_json_value(x) != fx.as_json_value(y):
            parts.append(f"{name}: recorded {_shown(x)}, now {_shown(y)}")
    return "; ".join(parts)[:800]


def _shown(value: Any) -> str:
    """A field's value as a divergence names it: a state's JSON text as its text."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")[:300]
        except UnicodeDecodeError:
            pass
    return repr(value)[:300]


def _diverged(index: int, recorded: Any, new: Any) -> NondeterminismError:
    return NondeterminismError(index, describe(recorded), describe(new), _difference(recorded, new))


def _same(effect: Any, item: tuple[Any, ...]) -> bool:
    """Whether an emitted effect is the recorded one (``item``: the record, its effect's
    atoms first): by atoms first (C-level tuple equality), then by value (a format 1
    record, states written differently)."""
    t = type(effect)
    if t is fx.CallNode:
        if item[1:5] == effect[:4] and item[5] == effect[5] and item[0] == "CallNode":
            return True
    elif t is fx.Commit:
        if item[1:9] == effect[:8] and item[9] == effect[9] and item[0] == "Commit":
            return True
    atoms = record_effect(item)
    if t is not fx.CallNode and t is not fx.Commit and encode_effect(effect) == atoms:
        return True
    if t is fx.Finish:
        if atoms[0] != "Finish":
            return False
        recorded = decode_effect(atoms)
        return bool(
            # (a log written before a resumed run's Finish said RESUMED says COMPLETED)
            (recorded.status == effect.status or (
                effect.status is RunStatus.RESUMED and recorded.status is RunStatus.COMPLETED
            ))
            and recorded.reason == effect.reason
            and recorded.total_tokens == effect.total_tokens
            and recorded.total_latency_ms == effect.total_latency_ms
            and recorded.total_cost_usd == effect.total_cost_usd
        )
    if atoms[0] != type(effect).__name__:
        return False
    return bool(decode_effect(atoms) == effect)


# What the machine raises when a recorded event holds values no run could have recorded
# (an output the log says kept its contract but does not, a time or duration past what a
# datetime holds, ...): the log was altered. (UnexpectedEvent, a StromaError, is caught
# before these.)
_DAMAGE = (ValueError, TypeError, KeyError, AttributeError, IndexError, ArithmeticError,
           RecursionError)


def damaged(index: int, exc: BaseException) -> StromaError:
    """The error for a recorded event the machine cannot take (a damaged log); a stroma
    error stays itself."""
    if isinstance(exc, StromaError):
        return exc
    text = str(exc).splitlines()[0] if str(exc) else ""
    return LogCorrupted(
        "the effect log",
        f"record {index}: the machine cannot take the recorded event ({type(exc).__name__}: "
        f"{text[:200]}): the log was altered; restore it, or delete the run and start it "
        "again",
    )


def replay_records(
    state: RunState,
    effects: Sequence[Any],
    records: RecordList,
    *,
    offset: int = 0,
    start_at: int = 0,
) -> Replayed:
    """Feed ``records.items[start_at:]`` to the machine from ``state, effects``.

    ``offset`` is added to record positions in error messages (a session that starts
    after other records of the same log).
    """
    items = records.items
    n = len(items)
    i = start_at
    work = list(effects)
    while True:
        k = 0
        event: Any = None
        while k < len(work):
            eff = work[k]
            if i >= n:
                return Replayed(state, tuple(work[k:]), i, None)
            item = items[i]
            if type(item) is ResumeMarker:
                if item.restart is not None:
                    raise NondeterminismError(
                        i + offset, "restart", describe(eff), "restart inside an unfinished step"
                    )
                # The run was picked up here after a crash: the machine takes the Resumed
                # it recorded, and answers with what the live part performed.
                i += 1
                try:
                    state, new = advance(state, fx.Resumed(item.at, tuple(work[k:])))
                except UnexpectedEvent as e:
                    raise NondeterminismError(i - 1 + offset, "resumed", describe(eff),
                                              str(e)) from None
                except _DAMAGE as e:
                    raise damaged(i - 1 + offset, e) from None
                work = [*work[:k], *new]
                continue
            t = type(eff)
            if not _same(eff, item):
                raise _diverged(i + offset, decode_effect(record_effect(item)), eff)
            i += 1
            k += 1
            if t is fx.Commit:
                if i < n and type(items[i]) is not ResumeMarker and items[i][0] == (
                    "SaveCheckpoint"
                ):
                    i += 1  # a format 1 log's separate checkpoint record: covered
                continue
            if t is fx.RecordAttempt:
                continue
            if t is fx.Finish:
                status = RunStatus(item[1])  # as recorded (see _same)
                if status is RunStatus.WAITING and i < n and type(items[i]) is ResumeMarker:
                    # The run waited for input and a later session went on from there.
                    marker = items[i]
                    i += 1
                    state, work = advance(state, fx.Resumed(marker.at, ()))
                    k = 0
                    continue
                return Replayed(state, (), i, eff._replace(status=status))
            answer = record_event(item)
            if answer is None:
                # stroma records an effect only with its answer (a crash loses the whole
                # record), so this log was altered or written by something else. Going
                # live here would misalign the record indices with the durable log.
                raise LogCorrupted(
                    "the effect log",
                    f"record {i - 1 + offset} ({describe(eff)}) has no answering event: an "
                    "effect that needs an answer is only ever recorded with it, so the log "
                    "was altered; restore it, or delete the run and start it again",
                )
            event = decode_event(answer)
            if t is fx.CallParallel:
                _verify_children(eff, event, i - 1 + offset)
            break
        else:
            raise LogCorrupted(
                "the effect log",
                f"record {i + offset}: the machine emitted no effect to wait on in phase "
                f"{state.phase.value!r}",
            )
        try:
            state, work = advance(state, event)
        except UnexpectedEvent as e:
            raise NondeterminismError(i - 1 + offset, repr(event), "(no such event)",
                                      str(e)) from None
        except _DAMAGE as e:
            raise damaged(i - 1 + offset, e) from None


def _verify_children(eff: fx.CallParallel, event: Any, index: int) -> None:
    """Replay each recorded sub-plan against its plan: it must end the same way."""
    if not isinstance(event, fx.ParallelReturned) or len(event.outcomes) != len(eff.calls):
        return
    for call, outcome in zip(eff.calls, event.outcomes, strict=True):
        if not (type(call) is fx.RunPlan and type(outcome) is fx.PlanFinished):
            continue
        if call.plan is None or call.input is None:
            continue
        state, effects = start(call.plan, call.input, call.config)
        try:
            done = replay_records(state, effects, RecordList(outcome.records))  # (a copy)
        except NondeterminismError as e:
            raise NondeterminismError(
                index, f"{call.child_id}: {e.recorded}", f"{call.child_id}: {e.new}",
                f"inside the sub-plan, record {e.index}",
            ) from None
        ended = done.finish.status if done.finish is not None else None
        if ended != outcome.status:
            raise NondeterminismError(
                index, f"{call.child_id} ended {outcome.status}",
                f"{call.child_id} ends {ended}", "the sub-plan's result differs",
            )
        if outcome.status in (RunStatus.COMPLETED, RunStatus.RESUMED):
            assert done.finish is not None
            # The recorded output holds the fields the child set; its unset fields have
            # their defaults, so the full states compare (which fields count as set can
            # differ once a state was rebuilt from its JSON).
            final_state = done.finish.final_state
            final = final_state.model_dump(mode="json")
            try:
                recorded = type(final_state).model_validate(outcome.output).model_dump(
                    mode="json")
            except _DAMAGE as e:
                raise damaged(index, e) from None
            if final != recorded:
                raise NondeterminismError(
                    index, f"{call.child_id} output {recorded!r}",
                    f"{call.child_id} output {final!r}", "the sub-plan's result differs",
                )
