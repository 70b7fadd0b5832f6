"""One run of a plan against a store: new, resumed from its log, or restarted.

* No log for the run id (or no explicit run id): a new log, and the run goes live.
* A log that ends with a Finish: replayed (verified) and its result returned; nothing runs.
* A log cut short by a crash: replayed, then the run goes on live from where the log
  ends; finished nodes are not run again and the status is RESUMED.
* ``resume_from`` with an existing log: a restart record, then a fresh machine that loads
  the checkpoint before the resume step (the API's resume), appended to the same log. The
  restart record keeps that session's plan fingerprint: a later resume or replay of the log
  must match it (the log's header names the first session's plan).

A plan that no longer matches the log raises NondeterminismError before anything runs.
"""

from __future__ import annotations

import inspect
import secrets
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager, nullcontext
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

from interpreters.driver import (
    Recorder,
    drive,
    first_state,
    last_segment,
    restart_state,
    session_config,
)
from interpreters.live import LivePerformer
from stroma.errors import LogCorrupted, NondeterminismError, StromaError
from stroma.log import EffectLog, LogHeader, RecordList, ResumeMarker
from stroma.machine import MachineConfig, start
from stroma.plan import Plan
from stroma.trace import ExecutionResult

__all__ = ("VERSION", "new_seed", "replay_log", "run_session", "utcnow")

VERSION = "0.2.0"


def _holder() -> str:
    from interpreters.stores._lease import new_holder

    return new_holder()


async def replay_log(plan: Plan, log: EffectLog) -> ExecutionResult:
    """Feed a finished run's log back through the machine; nothing user-written runs."""
    header = log.header
    recorded = _recorded_plan(log)
    if recorded is not None and recorded != plan.fingerprint:
        # Find the first record where the new plan diverges, to name it.
        await _verify_prefix(plan, log)
        raise NondeterminismError(
            0, f"plan fingerprint {recorded[:16]}",
            f"plan fingerprint {plan.fingerprint[:16]}",
            "the plan's structure or contracts changed since the run was recorded",
        )
    state, effects, before, replay = _last_session(plan, log)
    result = await drive(plan, state, effects, Recorder(EffectLog(header, before), None), None,
                         replay=replay)
    result.log = log
    return result


def _last_session(
    plan: Plan, log: EffectLog
) -> tuple[Any, list[Any], Sequence[Any], Sequence[Any]]:
    """Where replaying a log starts: the machine's first state and effects for the log's
    last session (the run, or its latest ``resume_from`` restart), the records before that
    session, and the session's records to replay."""
    k, marker = last_segment(log)
    if marker is None:
        state, effects = first_state(plan, log.header)
        return state, effects, [], log.records
    state, effects = restart_state(plan, log.header, marker)
    items = log.records.items  # sliced as they are: compact rows stay compact
    return state, effects, RecordList(items[: k + 1]), RecordList(items[k + 1 :])


def _recorded_plan(log: EffectLog) -> str | None:
    """The fingerprint of the plan that recorded the log's last session (None for a restart
    record written before restarts kept it)."""
    _, marker = last_segment(log)
    if marker is None:
        return log.header.plan
    assert marker.restart is not None
    plan = marker.restart.get("plan")
    return plan if isinstance(plan, str) else None


async def _verify_prefix(plan: Plan, log: EffectLog) -> None:
    """Replay a log's last session without performing anything; divergence raises."""
    state, effects, before, replay = _last_session(plan, log)
    try:  # (the records before the session keep the error's record index the log's own)
        await drive(plan, state, effects, Recorder(EffectLog(log.header, before), None), None,
                    replay=replay)
    except (NondeterminismError, LogCorrupted):
        raise
    except StromaError:
        pass  # the log ends before the run finished: the prefix matched


class _SyncLogStore:
    """A synchronous store's log methods, awaited like an async LogStore's (the calls
    block, as a synchronous store's ``save`` does)."""

    def __init__(self, store: Any) -> None:
        self.store = store

    async def append_log(
        self, run_id: str, lines: Sequence[str], checkpoint: tuple[str, BaseModel] | None = None
    ) -> None:
        self.store.append_log(run_id, lines, checkpoint)

    async def read_log(self, run_id: str) -> EffectLog | None:
        log: EffectLog | None = self.store.read_log(run_id)
        return log


def _log_store(store: Any) -> Any:
    """The store as an async LogStore, or None if it holds no effect log."""
    append, read = getattr(store, "append_log", None), getattr(store, "read_log", None)
    if not (callable(append) and callable(read)):
        return None
    if inspect.iscoroutinefunction(append):
        return store
    return _SyncLogStore(store)


async def run_session(
    plan: Plan,
    initial_state: BaseModel,
    *,
    manager: Any,
    machine: MachineConfig,
    explicit_run_id: bool,
    hooks: Any = None,
    classifiers: Sequence[Callable[..., Any]] = (),
    context: dict[str, Any] | None = None,
    sleep: Callable[[float], Any] | None = None,
    clock: Callable[[], datetime] | None = None,
    timer: Callable[[], float] | None = None,
) -> ExecutionResult:
    store = manager.store
    run_id = machine.run_id
    log_store = _log_store(store)
    lease: AbstractAsyncContextManager[Any] = (
        store.lease(run_id, _holder()) if callable(getattr(store, "lease", None))
        else nullcontext()
    )
    async with lease:
        existing: EffectLog | None = None
        resuming = False  # picking up a crashed run's log
        if explicit_run_id:
            if log_store is not None:
                existing = await log_store.read_log(run_id)
            elif callable(getattr(store, "get_log", None)):
                existing = store.get_log(run_id)

        if existing is not None and machine.resume_from is None:
            # A restart (resume_from) may have begun a session with another plan: the last
            # session's plan is the one to match.
            recorded = _recorded_plan(existing) or existing.header.plan
            if recorded != plan.fingerprint:
                await _verify_prefix(plan, existing)
                raise NondeterminismError(
                    0, f"plan fingerprint {recorded[:16]}",
                    f"plan fingerprint {plan.fingerprint[:16]}",
                    f"run {run_id!r} was recorded with another plan (structure or contracts "
                    "changed)",
                )
            if existing.finish is not None:
                return await replay_log(plan, existing)
            await _verify_prefix(plan, existing)
            resuming = True
            state, effects, before, replay = _last_session(plan, existing)
            recorder = Recorder(EffectLog(existing.header, before), log_store,
                                flushed=len(existing.records))
        elif existing is not None:
            # The API's resume_from on a run that has a log: a new session in the same log.
            state, effects = start(plan, initial_state, machine)
            restart = session_config(machine, initial_state)
            restart["seed"] = machine.seed
            restart["plan"] = plan.fingerprint  # the session's plan, checked on resume
            marker = ResumeMarker(machine.started_at.isoformat(), restart)
            records = RecordList(existing.records)
            records.append(marker)
            recorder = Recorder(EffectLog(existing.header, records),
                                log_store, flushed=len(existing.records))
            replay = []
        else:
            header = LogHeader(
                run_id=run_id,
                plan=plan.fingerprint,
                seed=machine.seed,
                version=VERSION,
                started_at=machine.started_at.isoformat(),
                config=session_config(machine, initial_state),
            )
            state, effects = start(plan, initial_state, machine)
            recorder = Recorder(EffectLog(header, []), log_store, flushed=-1)
            replay = []
        if (
            explicit_run_id  # only a run someone can name again can be resumed from it
            and log_store is None and callable(getattr(store, "attach_log", None))
        ):
            store.attach_log(run_id, recorder.log)
            recorder.keeps_partials = True
        performer = LivePerformer(
            plan,
            run_id=run_id,
            manager=manager,
            recorder=recorder,
            hooks=hooks,
            classifiers=classifiers,
            context=context,
            sleep=sleep,
            clock=clock,
            # Fan-out children that finished before the crash (not for a restart, which
            # may give the group another input).
            prefilled=(existing.pending_children() if resuming and existing is not None
                       else None),
            **({"timer": timer} if timer is not None else {}),
        )
        return await drive(plan, state, effects, recorder, performer, replay=replay,
                           resuming=resuming)


def new_seed() -> int:
    return secrets.randbits(63)


def utcnow() -> datetime:
    return datetime.now(UTC)
