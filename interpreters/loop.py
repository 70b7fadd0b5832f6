"""The live loop: perform effect -> event -> ``advance`` -> append the record.

The machine decides; the loop performs what it asks through the performer's table (one
entry per effect type), appends each record's atoms to the run's log, and makes the log
durable through the ``Recorder`` when the store holds it: a ``Commit`` is appended with
its checkpoint in one store call, so a node's success is durable before the next node
starts. A run that picks up a recorded log first goes through ``interpreters.replay``
and then goes on here after the machine's ``Resumed``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import anyio
from pydantic import BaseModel

from interpreters.live import HookTimedOut
from interpreters.replay import replay_records
from stroma import effects as fx
from stroma.errors import StromaError
from stroma.log import (
    EffectLog,
    LogHeader,
    PathStep,
    Payload,
    RecordList,
    ResumeMarker,
    add_child_line,
    add_partial,
    approximate_output,
    encode_child_line,
    encode_effect,
    encode_event,
    encode_header,
    encode_partial,
    encode_record,
    is_attempt,
    progress_of,
    returned_atoms,
    trace_of,
    unwritable,
)
from stroma.machine import MachineConfig, Out, RunState, advance, start
from stroma.plan import Plan
from stroma.trace import ExecutionResult, ExecutionTrace, RunStatus

# How long a run that stopped before its Finish waits for its last records to be kept
# (as long as for its lease's release: interpreters.stores._lease.RELEASE_WHEN_STOPPED_S).
_STOPPED_FLUSH_S = 1.0

__all__ = ("Recorder", "result_of", "resume_marker", "run", "run_live", "tell_observer")


class Recorder:
    """The run's EffectLog, and how much of it a durable LogStore already holds."""

    __slots__ = ("_lock", "flushed", "in_doubt", "keeps_partials", "log", "run_id",
                 "session_start", "stopped_totals", "store", "up")

    def __init__(
        self, log: EffectLog, store: Any | None, *, flushed: int | None = None,
        keeps_partials: bool = False, session_start: int = 0,
    ) -> None:
        self.log = log
        # In-process logs (memory stores) keep finished fan-out children too.
        self.keeps_partials = keeps_partials
        self.run_id = log.header.run_id
        self.store = store  # a LogStore, or None
        # Index of the first record not yet durable; -1 means the header is not written yet.
        self.flushed = len(log.records) if flushed is None else flushed
        # An append failed or was cancelled: the store may hold its lines or not (a
        # server that wrote them before the answer was lost), so none is sent again.
        self.in_doubt = False
        # Where this session's records start (the trace is the session's attempts).
        self.session_start = session_start
        # The run's tokens and cost, as its machine counted them, when it stopped before
        # its Finish (a fan-out child cancelled: what it used counts in the run above).
        self.stopped_totals: tuple[int, float] | None = None
        self._lock: anyio.Lock | None = None  # serializes fan-out children's appends
        # A sub-plan child's recorder: the recorder of the run above it, the child's index
        # in its group, its call and when it started; what the child keeps is kept there
        # too (durably, by the first recorder up that has a store).
        self.up: tuple[Recorder, int, Any, datetime] | None = None

    @classmethod
    def in_memory(cls, run_id: str, plan: str, seed: int, started_at: str) -> Recorder:
        """A recorder for a sub-plan's embedded log."""
        header = LogHeader(run_id=run_id, plan=plan, seed=seed, version="",
                           started_at=started_at)
        return cls(EffectLog(header, RecordList()), None)

    def _pending_lines(self) -> list[str]:
        lines: list[str] = []
        if self.flushed < 0:
            lines.append(encode_header(self.log.header))
            self.flushed = 0
        items = self.log.records.items
        for i in range(self.flushed, len(items)):
            lines.extend(encode_record(i, items[i]))
        return lines

    async def flush(self, checkpoint: tuple[str, BaseModel] | None = None,
                    extra: Sequence[str] = ()) -> None:
        """Make every record so far durable, with ``checkpoint`` (and the ``extra`` lines
        of a fan-out child, after the records) in the same commit."""
        if self.store is None:
            return
        start = self.flushed
        lines = self._pending_lines()
        lines.extend(extra)
        try:
            await self.store.append_log(self.run_id, lines, checkpoint)
        except BaseException:
            self.flushed = start
            self.in_doubt = True
            raise
        self.flushed = len(self.log.records.items)

    async def keep_when_stopped(self, log: Any) -> None:
        """The records so far made durable when the run stops before its Finish (it was
        cancelled or interrupted, or a store or the library failed): what was performed
        and answered (a hook that fired, a backoff slept, a branch chosen) is not
        performed again when the run goes on. Shielded and bounded in time as a lease's
        release is; a failure is logged, never raised (the run's own error goes on)."""
        if (self.store is None or self.in_doubt
                or self.flushed == len(self.log.records.items)):
            return
        bound = _STOPPED_FLUSH_S
        with anyio.CancelScope(shield=True), anyio.move_on_after(bound) as scope:
            try:
                await self.flush()
                return
            except Exception as exc:  # (the store failed: the run's error says so)
                problem = f"{type(exc).__name__}: {exc}"
        if scope.cancelled_caught:
            problem = f"no answer within {bound:.3g} s"
        log.warning("run %r stopped; its last records could not be kept (%s): the run "
                    "performs them again when it goes on", self.run_id, problem)

    def finished_children(self) -> tuple[tuple[int, Any, Any], ...]:
        """The children of the group in flight at the end of the records that finished
        (or, sub-plans, kept progress: a NodeCancelled with their records so far), as
        ``(child index, call, outcome)`` (none when no group is in flight)."""
        return tuple((j, call, outcome)
                     for j, (call, outcome) in sorted(self.log.pending_children().items()))

    async def flush_progress(self, child: int, call: Any, at: Any, records: Any,
                             checkpoint: tuple[str, BaseModel] | None,
                             below: Sequence[tuple[tuple[PathStep, ...], Payload]] = (),
                             ) -> bool:
        """A fan-out child that is a sub-plan committed a node: its records not yet kept
        here made durable in this log (as progress lines of the group in flight), in one
        append with the node's checkpoint, so a crash does not run them again. ``below``:
        what a sub-plan running inside the child did (a record, or a child of its own group
        that finished), as the paths and payloads of child lines, made durable with it.

        A recorder with no store of its own (a sub-plan child's) that has ``up`` passes
        it all on to the run above it. False when nothing was made durable (the caller then
        saves the checkpoint itself)."""
        if self.store is None and not self.keeps_partials and self.up is None:
            return False
        if self.store is None:
            return await self._keep_progress(child, call, at, records, checkpoint, below)
        if self._lock is None:
            self._lock = anyio.Lock()
        async with self._lock:  # (what is new is worked out once the appends before are in)
            return await self._keep_progress(child, call, at, records, checkpoint, below)

    async def _keep_progress(self, child: int, call: Any, at: Any, records: Any,
                             checkpoint: tuple[str, BaseModel] | None,
                             below: Sequence[tuple[tuple[PathStep, ...], Payload]],
                             ) -> bool:
        log = self.log
        index = len(log.records.items)
        start = progress_of(log.progress, index, child)
        payloads: list[tuple[tuple[PathStep, ...], Payload]] = [
            ((), ("progress", n, record))
            for n, record in enumerate(records.items[start:], start)]
        payloads.extend(below)
        if not payloads:
            return False
        kept = False
        if self.store is not None:
            await self.flush(checkpoint, [encode_child_line(index, child, call, at, path, p)
                                          for path, p in payloads])
            kept = True
        elif self.up is not None:
            parent, k, parent_call, parent_at = self.up
            kept = await parent.flush_progress(
                k, parent_call, parent_at, log.records, checkpoint,
                [(((index, child, at, call), *path), p) for path, p in payloads])
        for path, p in payloads:
            add_child_line(log.progress, log.partials, log.nested, index, child, call, at,
                           path, p)
        return kept

    async def flush_partial(self, child: int, call: Any, outcome: Any) -> None:
        """A fan-out child finished: make it durable before the group ends, so a crash
        inside the fan-out does not run it again."""
        await self.flush_partials([(child, call, outcome)])

    async def flush_partials(self, children: Sequence[tuple[int, Any, Any]]) -> None:
        """Fan-out children that finished, as ``(child index, call, outcome)``, made
        durable in one append (a resumed group keeps those that finished before the crash
        anew, under its new record index: all of them or none, if it is cut short again)."""
        if not children:
            return
        index = len(self.log.records.items)
        entries = [(index, child, call, outcome) for child, call, outcome in children]
        if self.store is None:
            if self.up is not None:  # a sub-plan child's group: kept in the run above
                parent, k, parent_call, parent_at = self.up
                await parent.flush_progress(
                    k, parent_call, parent_at, self.log.records, None,
                    [(((index, child, None, call),), ("event", outcome))
                     for _, child, call, outcome in entries])
            if not (self.keeps_partials or self.up is not None):
                return
        else:
            await self._flush_child([encode_partial(*entry) for entry in entries], None)
        for entry in entries:
            add_partial(self.log.partials, self.log.progress, entry, self.log.nested)

    async def _flush_child(self, lines: list[str],
                           checkpoint: tuple[str, BaseModel] | None) -> None:
        """A fan-out child's lines made durable. Children run concurrently: one append
        at a time, so the header and any pending records are written once, and first."""
        if self._lock is None:
            self._lock = anyio.Lock()
        async with self._lock:
            await self.flush(checkpoint, lines)


def result_of(finish: fx.Finish, recorder: Recorder) -> ExecutionResult:
    """The run's result: the Finish, and the trace folded from this session's records."""
    items = recorder.log.records.items
    start, end = recorder.session_start, len(items)

    def attempts() -> list[Any]:  # folded when the trace is first read
        return [x for x in items[start:end] if is_attempt(x)]

    return ExecutionResult(
        run_id=recorder.run_id,
        status=finish.status,
        final_state=finish.final_state,
        trace=ExecutionTrace.from_records(attempts, trace_of),
        total_cost_usd=finish.total_cost_usd,
        total_tokens=finish.total_tokens,
        log=recorder.log,
        stop_reason=finish.reason,
    )


async def run_live(
    state: RunState, effects: Sequence[Any], recorder: Recorder, performer: Any
) -> ExecutionResult:
    """Run the machine to its Finish, performing its effects live (and telling the run's
    observer, if it has one, of every record and of how the run ended)."""
    observer = performer.world.observer
    told = None if observer is None else _Told(observer, performer)
    run = _run_live if performer.guard is None else _run_guarded
    try:
        result = await run(state, effects, recorder, performer, told)
    except BaseException as exc:
        await recorder.keep_when_stopped(performer.log)
        if observer is not None:
            _tell(performer, observer.ended, None, exc)
        raise
    if observer is None:
        return result
    _tell(performer, observer.ended, recorder.log.finish, None)
    return result


async def _run_guarded(
    state: RunState, effects: Sequence[Any], recorder: Recorder, performer: Any,
    told: _Told | None,
) -> ExecutionResult:
    """The live loop with its hooks bounded by the performer's ``HookGuard``: the loop runs
    in the guard's cancel scope, with the guard's watchdog beside it; a hook cancelled at
    its deadline is answered with the timeout, and the loop goes on in a new scope."""
    guard = performer.guard
    result: ExecutionResult | None = None
    failure: BaseException | None = None
    first: Any = None  # the event answering the first effect (a hook that timed out)
    async with anyio.create_task_group() as tg:
        tg.start_soon(guard.watch)
        try:
            while result is None:
                timed_out = False
                with anyio.CancelScope() as scope:
                    guard.scope, guard.fired = scope, False
                    try:
                        result = await _run_live(state, effects, recorder, performer, told,
                                                 first)
                    except HookTimedOut:
                        timed_out = True
                        state, hook = performer.at
                        effects, first = [hook], performer.hook_timed_out(hook)
                if result is None and not timed_out:
                    # The scope's cancellation ended the loop outside a hook: going on from
                    # where it last began would perform again what was performed since
                    # (nodes that committed would run again). Never so; said if it is.
                    raise StromaError(
                        f"run {recorder.run_id!r} stopped: a hook's deadline cancelled the "
                        "run outside the hook (a bug in stroma: please report it); the run "
                        "goes on from its log when it is run again")
        except BaseException as exc:  # re-raised below, outside the task group
            failure = exc
        finally:
            tg.cancel_scope.cancel()
    if failure is not None:
        raise failure
    assert result is not None
    return result


class _Told:
    """An observer's ``record``, called so that what it raises changes nothing."""

    __slots__ = ("observer", "performer")

    def __init__(self, observer: Any, performer: Any) -> None:
        self.observer = observer
        self.performer = performer

    def __call__(self, effect: Any, event: Any) -> None:
        _tell(self.performer, self.observer.record, effect, event)

    def stopped(self, effect: Any, state: RunState) -> None:
        """The run stops without its Finish: tell the observer (if it listens) what was
        being performed then (a group: with its children that had begun) and the run's
        totals so far."""
        if type(effect) is fx.CallParallel:
            in_group = getattr(self.observer, "stopped_in_group", None)
            so_far = getattr(self.performer, "children_so_far", None)
            if in_group is not None and so_far is not None:
                _tell(self.performer, lambda: in_group(effect, so_far(effect)))
        stopped = getattr(self.observer, "stopped", None)
        if stopped is not None:
            _tell(self.performer, stopped, effect, state.tokens, state.cost_usd,
                  state.latency_ms)


def tell_observer(performer: Any, effect: Any, event: Any, *, ended: bool = False) -> None:
    """Tell the run's observer, if it has one, of a record performed outside the loop
    (and, with ``ended``, that the run ended with it: ``effect`` is its Finish)."""
    observer = performer.world.observer
    if observer is None:
        return
    _tell(performer, observer.record, effect, event)
    if ended:
        _tell(performer, observer.ended, effect, None)


def _tell(performer: Any, fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except Exception as exc:  # an observer never changes the run
        performer.log.warning("the run's observer raised %r; the run goes on", exc)


async def _run_live(
    state: RunState, effects: Sequence[Any], recorder: Recorder, performer: Any,
    told: _Told | None, first: Any = None,
) -> ExecutionResult:
    """The loop. ``first``, when given, is the answer to the first effect that needs one
    (it was performed already: a hook cut off at its deadline)."""
    items = recorder.log.records.items
    guarded = performer.guard is not None
    table = performer.table
    commit = performer.commit
    choose = performer.choose_now
    commit_now = performer.commit_now  # (a synchronous store: no coroutine per commit)
    warn = performer.log.warning
    # (the hot path unpacks named tuples: reading a field by name costs as much as
    # unpacking them all)
    Commit, NodeReturned, ChooseBranch = fx.Commit, fx.NodeReturned, fx.ChooseBranch
    pending: Any = None
    try:
        while True:
            pending = None
            for eff in effects:
                t = type(eff)
                if t is Commit:
                    node_id, run_id, attempt, at, given, made, duration, schema, _, coords = eff
                    record = ("Commit", node_id, run_id, attempt, at, given, made, duration,
                              schema, coords)
                    items.append(record)
                    try:
                        if commit_now is not None:
                            commit_now(eff)
                        else:
                            await commit(eff)
                    except BaseException:
                        # Not committed: the record goes too (a store that keeps the log by
                        # reference would otherwise hold a Commit whose checkpoint it never
                        # saved); on resume the machine commits the recorded output again.
                        if items and items[-1] is record:
                            items.pop()
                        raise
                    if told is not None:
                        told(eff, None)
                elif t is fx.RecordAttempt:
                    items.append(encode_effect(eff))
                    if eff.failure is not None:
                        warn("node %r attempt %d failed (%s): %s", eff.node_id, eff.attempt,
                             eff.failure, eff.failure_message)
                        # Durable before the retry: a crash during it resumes with this
                        # failure counted (else each crash would give the node new retries).
                        await performer.keep_records()
                    if told is not None:
                        told(eff, None)
                elif t is fx.Finish:
                    items.append(encode_effect(eff))
                    await recorder.flush()
                    if told is not None:
                        told(eff, None)
                    return result_of(eff, recorder)
                else:
                    pending = eff
            if pending is None:
                raise StromaError(
                    f"the machine emitted no effect to perform in {state.phase.value!r}"
                )
            if first is not None:
                event, first = first, None
            else:
                if guarded and type(pending) is fx.FireHook:
                    performer.at = (state, pending)  # where to go on if the hook times out
                event = (choose(pending) if type(pending) is ChooseBranch
                         else await table[type(pending)](pending))
            before = state
            state, effects = advance(state, event)
            if type(event) is NodeReturned:
                head = effects[0] if effects else None
                if type(head) is Commit:  # the output kept its contract: the Commit's text
                    _, started, duration, tin, tout, used = event
                    atoms: Any = ("NodeReturned", (head[5], head[7]), started, duration, tin,
                                  tout, used)  # (the Commit's output_state and schema)
                else:
                    atoms = returned_atoms(event, None)
                    error = unwritable(atoms)
                    if error is not None:
                        event, (state, effects) = _recordable(
                            before, (state, effects), event._replace(output=error), _near(event),
                        )
                        atoms = returned_atoms(event, None)
                node_id, attempt, timeout, model, _, coords = pending
                items.append(("CallNode", node_id, attempt, timeout, model, coords, *atoms))
            else:
                atoms = encode_event(event)
                if type(event) is fx.ParallelReturned:
                    marked = _unwritable_children(event, atoms)
                    if marked is not None:
                        event, (state, effects) = _recordable(
                            before, (state, effects), *marked)
                        atoms = encode_event(event)
                items.append(encode_effect(pending) + atoms)
            if told is not None:
                told(pending, event)
    except HookTimedOut:
        raise  # (not the run's end: the loop goes on)
    except BaseException:
        recorder.stopped_totals = (state.tokens, state.cost_usd)
        if told is not None:  # (pending: the effect in flight, or None)
            told.stopped(pending, state)
        raise


def _recordable(before: RunState, decided: Out, marked: Any, near: Any | None,
                ) -> tuple[Any, Out]:
    """An answer holding an output the log cannot hold exactly, made one it can: the
    answer with that output as near as JSON gets (``near``), if the machine decides the
    same on it (the part JSON cannot hold is one the contract ignores); else the answer
    with the output's error (``marked``), on which the machine decides again. Either way
    the machine decides on what the log records, so replay decides the same."""
    if near is not None and advance(before, near) == decided:
        return near, decided
    return marked, advance(before, marked)


def _near(event: fx.NodeReturned) -> fx.NodeReturned | None:
    value = approximate_output(event.output)
    return None if value is None else event._replace(output=value)


def _unwritable_children(
    event: fx.ParallelReturned, atoms: tuple[Any, ...]
) -> tuple[fx.ParallelReturned, fx.ParallelReturned | None] | None:
    """The group's answer with each child output that the log cannot hold replaced by its
    error, and by its nearest JSON value (None if one has none); None when the log holds
    them all."""
    marked: list[Any] = list(event.outcomes)
    near: list[Any] | None = list(event.outcomes)
    changed = False
    for k, child in enumerate(atoms[3]):
        if child[0] != "NodeReturned":
            continue
        error = unwritable(child)
        outcome = marked[k]
        if error is None or type(outcome.output) is fx.ErrorInfo:
            continue
        changed = True
        marked[k] = outcome._replace(output=error)
        value = approximate_output(outcome.output)
        if value is None:
            near = None
        elif near is not None:
            near[k] = outcome._replace(output=value)
    if not changed:
        return None
    return (event._replace(outcomes=tuple(marked)),
            None if near is None else event._replace(outcomes=tuple(near)))


def resume_marker(records: RecordList, at: datetime) -> ResumeMarker:
    """A marker for where this session goes on live (at ``at``, by the run's clock: a
    virtual one under simulate), appended to ``records``."""
    marker = ResumeMarker(at.isoformat())
    records.append(marker)
    return marker


async def run(
    plan: Plan,
    initial: BaseModel,
    config: MachineConfig,
    recorder: Recorder,
    performer: Any,
    *,
    prior: Sequence[Any] = (),
) -> ExecutionResult:
    """A (sub-)plan's run: from its start, or going on from the ``prior`` records of an
    unfinished earlier try (replayed, then live after a ``Resumed``)."""
    state, effects = start(plan, initial, config)
    if prior:
        records = recorder.log.records
        for item in getattr(prior, "items", prior):  # (a RecordList's atoms as they are)
            records.append(item)
        done = replay_records(state, effects, records)
        if done.finish is not None and done.finish.status is not RunStatus.WAITING:
            return result_of(done.finish, recorder)
        marker = resume_marker(records, performer.now())
        state, effects = advance(done.state, fx.Resumed(marker.at, done.pending))
    return await run_live(state, effects, recorder, performer)
