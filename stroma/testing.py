"""Test helpers for the pure machine: drive it through an exact, expected effect sequence.

In the spirit of python-effect's ``perform_sequence``: a test lists the effects it expects
the machine to emit, in order, each with the event that answers it, and
``perform_sequence`` feeds those events to ``advance``, failing with a readable
"next expected / got" log at the first effect that does not match::

    from stroma import effects as fx
    from stroma.machine import start
    from stroma.testing import perform_sequence, returned

    state, effects = start(plan, Num(value=1), config)
    perform_sequence(state, effects, [
        (fx.CallNode("double", 1), returned({"value": 2})),
        (fx.Commit, None),
        (lambda e: isinstance(e, fx.Finish) and e.status == "COMPLETED", None),
    ])

An expectation is an effect value (compared with ``==``; fields marked ``eq=False`` such
as a call's input are ignored), an effect type (``isinstance``), or a predicate taking the
effect. An answer is an event value, or a function of the effect giving the event; the
machine's own ``Commit``, ``RecordAttempt`` and ``Finish`` need no answer (use ``None``).
With ``skip_records=True`` the ``Commit`` and ``RecordAttempt`` effects are passed over
and the sequence lists only the effects that reach the world (and ``Finish``).

``run_scripted`` drives the machine to its end with an answering function instead of a
fixed list, and the small event builders (``returned``, ``raised``, ``slept``, ...) make
answers for either. Everything here is pure: no event loop, no clock, no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import attrs
from pydantic import BaseModel

from stroma import effects as fx
from stroma.errors import StromaValueError
from stroma.failures import FailureClass
from stroma.machine import Phase, RunState, UnexpectedEvent, advance, error_info

__all__ = (
    "EPOCH",
    "SequenceMismatch",
    "classified",
    "cancelled",
    "describe_effect",
    "hook_fired",
    "loaded",
    "parallel_returned",
    "perform_sequence",
    "raised",
    "returned",
    "resumed",
    "run_scripted",
    "slept",
)

EPOCH = datetime(2024, 1, 1, tzinfo=UTC)
"""The default start time of the event builders (any fixed aware datetime would do)."""

_Expected = Any  # an effect value, an effect type, or a predicate on the effect
_Answer = Any  # an event value, a function effect -> event, or None (no answer needed)
_NO_ANSWER = (fx.Commit, fx.RecordAttempt, fx.Finish)
_RECORDS = (fx.Commit, fx.RecordAttempt)


class SequenceMismatch(AssertionError):
    """The machine emitted an effect the sequence did not expect (or too few, or too many)."""


# ------------------------------------------------------------------------ event builders


def returned(
    output: Any,
    *,
    input_tokens: int = 0,
    output_tokens: int = 0,
    model: str | None = None,
    started_at: datetime = EPOCH,
    duration_ms: int = 0,
) -> fx.NodeReturned:
    """A ``NodeReturned`` answering a ``CallNode``: the node gave ``output`` (and usage)."""
    return fx.NodeReturned(output, started_at, duration_ms, input_tokens, output_tokens, model)


def raised(
    exc: BaseException, *, started_at: datetime = EPOCH, duration_ms: int = 0
) -> fx.NodeRaised:
    """A ``NodeRaised`` answering a ``CallNode``: the node raised ``exc``."""
    return fx.NodeRaised(error_info(exc), started_at, duration_ms)


def cancelled(*, started_at: datetime = EPOCH, duration_ms: int = 0) -> fx.NodeCancelled:
    """A parallel child that was cancelled because a sibling failed first."""
    return fx.NodeCancelled(started_at, duration_ms)


def parallel_returned(
    *outcomes: fx.NodeReturned | fx.NodeRaised | fx.NodeCancelled,
    started_at: datetime = EPOCH,
    duration_ms: int = 0,
) -> fx.ParallelReturned:
    """A ``ParallelReturned`` answering a ``CallParallel``: one outcome per child, in order."""
    return fx.ParallelReturned(started_at, duration_ms, tuple(outcomes))


def loaded(state: BaseModel | None) -> Callable[[fx.LoadCheckpoint], fx.CheckpointLoaded]:
    """An answer to a ``LoadCheckpoint``: the store had ``state`` (None: no checkpoint)."""

    def answer(effect: fx.LoadCheckpoint) -> fx.CheckpointLoaded:
        return fx.CheckpointLoaded(effect.node_id, state)

    return answer


def hook_fired(error: BaseException | None = None) -> fx.HookFired:
    """The answer to a ``FireHook``: the hook ran (and raised ``error``, if given)."""
    return fx.HookFired(None if error is None else error_info(error))


def slept(effect: fx.Sleep) -> fx.Slept:
    """The answer to a ``Sleep``: the whole backoff was slept."""
    return fx.Slept(effect.seconds)


def classified(failure: FailureClass | None) -> fx.FailureClassified:
    """The answer to a ``ClassifyFailure``: what the user's classifier said (None: defer)."""
    return fx.FailureClassified((failure,))


def resumed(at: str = EPOCH.isoformat(), *pending: Any) -> fx.Resumed:
    """A ``Resumed`` event: the log ended and the run goes on live with ``pending``."""
    return fx.Resumed(at, tuple(pending))


# ------------------------------------------------------------------------- describing


def describe_effect(effect: Any) -> str:
    """A one-line, readable account of an effect (or an expectation) for failure logs."""
    if isinstance(effect, fx.RecordAttempt | fx.Commit):
        e = effect.event
        what = "ok" if e.failure is None else f"{e.failure}: {e.failure_message}"
        return f"{type(effect).__name__}({e.node_id!r}, attempt {e.attempt}, {what})"
    if isinstance(effect, fx.Finish):
        return (
            f"Finish({effect.status}, tokens={effect.total_tokens}, "
            f"cost_usd={effect.total_cost_usd:.6f}, latency_ms={effect.total_latency_ms}, "
            f"reason={effect.reason!r})"
        )
    if isinstance(effect, type):
        return f"any {effect.__name__}"
    if callable(effect) and not attrs.has(type(effect)):
        name = getattr(effect, "__qualname__", None) or repr(effect)
        return f"an effect satisfying {name}"
    return repr(effect)


def _matches(expected: _Expected, effect: Any) -> bool:
    if isinstance(expected, type):
        return isinstance(effect, expected)
    if callable(expected) and not attrs.has(type(expected)):
        return bool(expected(effect))
    return bool(expected == effect)


def _expects_record(expected: _Expected) -> bool:
    if isinstance(expected, type):
        return issubclass(expected, _RECORDS)
    return isinstance(expected, _RECORDS)


class _Log:
    """The sequence so far, for the message of a mismatch."""

    def __init__(self, sequence: Sequence[tuple[_Expected, _Answer]]) -> None:
        self.sequence = sequence
        self.lines: list[str] = []

    def ok(self, effect: Any, event: Any = None) -> None:
        answer = "" if event is None else f"  ->  {event!r}"
        self.lines.append(f"  ok   {describe_effect(effect)}{answer}")

    def skipped(self, effect: Any) -> None:
        self.lines.append(f"  skip {describe_effect(effect)}")

    def fail(self, problem: str, position: int, *, expected: str, got: str) -> SequenceMismatch:
        rest = [describe_effect(e) for e, _ in self.sequence[position + 1 :]]
        parts = [
            f"perform_sequence: {problem} (sequence entry {position})",
            "the sequence so far:",
            *(self.lines or ["  (nothing yet)"]),
            f"  next expected: {expected}",
            f"  got:           {got}",
        ]
        if rest:
            parts.append("still expected after it:")
            parts.extend(f"  {r}" for r in rest)
        return SequenceMismatch("\n".join(parts))


# ---------------------------------------------------------------------- perform_sequence


def perform_sequence(
    state: RunState,
    effects: Sequence[Any],
    sequence: Sequence[tuple[_Expected, _Answer]],
    *,
    skip_records: bool = False,
) -> RunState:
    """Drive the machine through exactly ``sequence``; returns the state it ends in.

    ``state, effects`` are what ``start`` (or an earlier ``advance``) returned. Each
    emitted effect must match the next ``(expected, answer)`` entry; the answer (an
    event, or a function of the effect giving one) is fed to ``advance``. The run must
    emit no effect beyond the sequence, and the sequence must not outlast the run.
    Raises ``SequenceMismatch`` (an AssertionError) with the sequence so far otherwise.
    """
    if skip_records:
        for k, (expected, _) in enumerate(sequence):
            if _expects_record(expected):
                raise StromaValueError(
                    f"sequence entry {k} expects {describe_effect(expected)} but "
                    "skip_records=True passes over every Commit and RecordAttempt: drop the "
                    "entry "
                    "or call perform_sequence(..., skip_records=False)"
                )
    log = _Log(sequence)
    pending = list(effects)
    position = 0
    while pending:
        effect = pending.pop(0)
        if skip_records and isinstance(effect, _RECORDS):
            log.skipped(effect)
            continue
        if position >= len(sequence):
            raise log.fail(
                "the machine emitted more effects than the sequence lists", position,
                expected="(the end of the sequence)", got=describe_effect(effect),
            )
        expected, answer = sequence[position]
        if not _matches(expected, effect):
            raise log.fail(
                "effect mismatch", position,
                expected=describe_effect(expected), got=describe_effect(effect),
            )
        position += 1
        if isinstance(effect, _NO_ANSWER):
            log.ok(effect)
            continue
        if pending:
            raise log.fail(
                f"the machine emitted effects after {type(effect).__name__}, which needs an "
                "answer first (a machine bug)", position - 1,
                expected="nothing", got=", ".join(describe_effect(e) for e in pending),
            )
        event = answer(effect) if callable(answer) and not attrs.has(type(answer)) else answer
        if event is None:
            raise log.fail(
                f"no answer given for {type(effect).__name__}", position - 1,
                expected="an event answering it", got="None",
            )
        log.ok(effect, event)
        try:
            state, new = advance(state, event)
        except UnexpectedEvent as e:
            raise log.fail(
                f"the machine rejected the answer: {e}", position - 1,
                expected=f"an event the machine waits for in phase {state.phase.value!r}",
                got=repr(event),
            ) from e
        pending = list(new)
    if position < len(sequence):
        raise log.fail(
            "the machine stopped emitting effects before the sequence ended", position,
            expected=describe_effect(sequence[position][0]),
            got="nothing (the run is over)" if state.phase is Phase.DONE
            else f"nothing (waiting in phase {state.phase.value!r})",
        )
    return state


# ------------------------------------------------------------------------ run_scripted


def run_scripted(
    state: RunState,
    effects: Sequence[Any],
    answer: Callable[[Any], Any],
    *,
    max_effects: int = 100_000,
) -> tuple[RunState, list[tuple[Any, Any]]]:
    """Drive the machine to its ``Finish``, asking ``answer(effect)`` for each event.

    Returns the final state and the log: ``(effect, event)`` pairs in order, with
    ``None`` as the event of ``Commit``, ``RecordAttempt`` and ``Finish`` (as in a log).
    """
    records: list[tuple[Any, Any]] = []
    pending = list(effects)
    while True:
        waiting: Any = None
        for effect in pending:
            if waiting is not None:
                raise AssertionError(
                    f"the machine emitted {describe_effect(effect)} after "
                    f"{describe_effect(waiting)}, which needs an answer first"
                )
            if isinstance(effect, _NO_ANSWER):
                records.append((effect, None))
                if isinstance(effect, fx.Finish):
                    return state, records
            else:
                waiting = effect
        if waiting is None:
            raise AssertionError(
                f"the machine emitted nothing to answer in phase {state.phase.value!r} and no "
                "Finish"
            )
        if len(records) >= max_effects:
            raise AssertionError(f"no Finish after {max_effects} effects: a runaway run?")
        event = answer(waiting)
        records.append((waiting, event))
        state, pending = advance(state, event)
        pending = list(pending)
