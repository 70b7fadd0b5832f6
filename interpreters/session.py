"""One run of a plan against a store: new, resumed from its log, or restarted.

* No log for the run id (or no explicit run id): a new log, and the run goes live.
* A log that ends with a Finish: replayed (verified) and its result returned; nothing runs.
* A log cut short by a crash: replayed, then the run goes on live from where the log
  ends (the machine's ``Resumed``); finished nodes are not run again and the status is
  RESUMED.
* ``resume_from`` with an existing log: a restart record, then a fresh machine that loads
  the checkpoint before the resume step (the API's resume), appended to the same log. The
  restart record keeps that session's plan fingerprint: a later resume or replay of the log
  must match it (the log's header names the first session's plan).

A plan that no longer matches the log raises NondeterminismError before anything runs.
"""

from __future__ import annotations

import inspect
import secrets
import warnings
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager, nullcontext
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticSerializationError, to_json

from interpreters.live import Collaborators, LivePerformer, RunLogger, _log, single_error
from interpreters.loop import Recorder, result_of, resume_marker, run_live, tell_observer
from interpreters.replay import Replayed, replay_records
from stroma import effects as fx
from stroma._version import __version__
from stroma.errors import (
    LogCorrupted,
    NondeterminismError,
    StateNotSerializable,
    StromaError,
    StromaTypeError,
    StromaWarning,
    _user_stacklevel,
)
from stroma.inputs import pending_wait
from stroma.log import EffectLog, LogHeader, RecordList, ResumeMarker, encode_effect, encode_event
from stroma.machine import MachineConfig, advance, start
from stroma.plan import Plan
from stroma.schemas import _schema_ref, read_state, resolve_declared
from stroma.trace import ExecutionResult, RunStatus

__all__ = (
    "VERSION",
    "initial_from",
    "new_seed",
    "replay_log",
    "run_session",
    "session_config",
    "utcnow",
)

VERSION = __version__


def _holder() -> str:
    from interpreters.stores._lease import new_holder

    return new_holder()


def session_config(machine: MachineConfig, initial_state: BaseModel) -> dict[str, Any]:
    """What a log header (or restart record) keeps of a session: the machine's config
    and the initial state."""
    data = machine.to_json()
    try:
        state = initial_state.model_dump(mode="json")
    except (PydanticSerializationError, ValueError, TypeError, RecursionError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise StateNotSerializable(
            f"the initial state ({type(initial_state).__name__}) cannot be written as JSON, "
            f"which the run's log keeps to resume and replay the run: {first[:200]}; give "
            "its fields JSON types (str, numbers, lists, dicts, models), or a serializer "
            "(pydantic's field_serializer). Nothing was run"
        ) from None
    data["initial"] = {"schema": _schema_ref(type(initial_state)), "state": state}
    return data


def initial_from(plan: Plan, data: dict[str, Any], source: str) -> BaseModel:
    """The initial state a log's header (or restart record) recorded, as the plan's own
    schema: a schema recorded under another module name (``__main__`` when the run was a
    script) is the plan's schema of the same name."""
    init = data.get("initial")
    if not isinstance(init, dict) or not isinstance(init.get("state"), dict):
        raise LogCorrupted(source, "the header's config has no initial state "
                                   "({\"initial\": {\"schema\": ..., \"state\": {...}}})")
    ref = init.get("schema")
    schema = _plan_schema(plan, ref)
    if schema is None:
        try:
            schema = resolve_declared(ref, source=source)
        except StromaError:
            first = plan.input_schema
            if first is None:
                raise
            schema = first
    try:  # (from its JSON form, as it was written: a strict tuple field reads a list)
        return read_state(schema, to_json(init["state"], inf_nan_mode="constants"))
    except ValidationError as e:
        raise LogCorrupted(
            source, f"the recorded initial state does not fit {schema.__name__}: "
            f"{e.errors(include_url=False)[:3]}"
        ) from None


def _plan_schema(plan: Plan, ref: Any) -> type[BaseModel] | None:
    if not isinstance(ref, str) or ":" not in ref:
        return None
    by_qualname: dict[str, list[type[BaseModel]]] = {}
    for schema in plan.schemas():
        if _schema_ref(schema) == ref:
            return schema
        by_qualname.setdefault(schema.__qualname__, []).append(schema)
    found = by_qualname.get(ref.split(":", 1)[1], [])
    return found[0] if len(found) == 1 else None


def _machine_config(header: LogHeader, data: dict[str, Any], seed: int, at: str,
                    source: str) -> MachineConfig:
    try:
        config = MachineConfig.from_json(
            data, run_id=header.run_id, seed=seed, started_at=datetime.fromisoformat(at)
        )
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise LogCorrupted(source, f"the header's config is not valid: {e}") from None
    if header.format == 1 and "hook_timeout_ms" not in data:
        from attrs import evolve

        config = evolve(config, hook_timeout_ms=None)  # format 1 hooks had no bound
    return config


def _last_restart(log: EffectLog) -> tuple[int, ResumeMarker] | None:
    """The log's latest ``resume_from`` restart record and its index, if it has one (the
    session the run is in began there; else at the header)."""
    records = log.records
    for k in reversed(records.markers):
        marker = records.items[k]
        if isinstance(marker, ResumeMarker) and marker.restart is not None:
            return k, marker
    return None


def _last_session(
    plan: Plan, log: EffectLog, source: str
) -> tuple[Any, list[Any], int]:
    """Where replaying a log starts: the machine's first state and effects for the log's
    last session (the run, or its latest ``resume_from`` restart), and the index of the
    session's first record."""
    restart = _last_restart(log)
    if restart is not None:
        k, marker = restart
        data = marker.restart
        assert data is not None
        seed = data.get("seed", log.header.seed)
        if type(seed) is not int:
            raise LogCorrupted(source, f"record {k}: the restart's seed is {seed!r}")
        cfg = _machine_config(log.header, data, seed, marker.at, source)
        state, effects = start(plan, initial_from(plan, data, source), cfg)
        return state, effects, k + 1
    cfg = _machine_config(log.header, log.header.config, log.header.seed,
                          log.header.started_at, source)
    state, effects = start(plan, initial_from(plan, log.header.config, source), cfg)
    return state, effects, 0


def _recorded_plan(log: EffectLog) -> str | None:
    """The fingerprint of the plan that recorded the log's last session (None for a restart
    record written before restarts kept it)."""
    restart = _last_restart(log)
    if restart is None:
        return log.header.plan
    plan = (restart[1].restart or {}).get("plan")
    return plan if isinstance(plan, str) else None


def _check_plan(plan: Plan, log: EffectLog, what: str) -> None:
    """The plan must be the one that recorded the log: checked before anything runs.

    When it is not, the log is replayed against it (nothing user-written runs) to name the
    first record where they part; a plan too different to say (another pipeline) is named
    by the two fingerprints.
    """
    recorded = _recorded_plan(log)
    if recorded is None or recorded == plan.fingerprint:
        return
    fingerprints = (
        f"{what} was recorded with plan {recorded[:16]}, and this plan is "
        f"{plan.fingerprint[:16]} (its structure or contracts changed, or it is another "
        f"pipeline{_seen_changes(plan, log)})"
    )
    try:
        _replay(plan, log, f"the effect log of {what}")
    except NondeterminismError as e:
        raise NondeterminismError(
            e.index, e.recorded, e.new, f"{e.detail}; {fingerprints}" if e.detail else fingerprints
        ) from None
    except Exception:
        pass
    raise NondeterminismError(
        0, f"plan fingerprint {recorded[:16]}", f"plan fingerprint {plan.fingerprint[:16]}",
        fingerprints,
    )


def _seen_changes(plan: Plan, log: EffectLog) -> str:
    """What the log shows of how the plan changed: steps it recorded that the plan has not,
    and outputs it recorded under another schema than the step's now ("" if none)."""
    from stroma.plan import CONTROL

    steps = {ins.step_id: ins for ins in plan.program if not isinstance(ins, CONTROL)}
    gone: list[str] = []
    schemas: list[str] = []
    try:
        for record in log.records:
            if not isinstance(record, tuple):
                continue
            effect = record[0]
            if not isinstance(effect, fx.Commit | fx.RecordAttempt):
                continue
            step = steps.get(effect.node_id)
            if step is None:
                if effect.node_id not in gone:
                    gone.append(effect.node_id)
                continue
            ref = getattr(step, "output_ref", None)
            if isinstance(effect, fx.Commit) and ref and effect.schema not in (None, ref):
                change = f"{effect.node_id!r} output {effect.schema} then, {ref} now"
                if change not in schemas:
                    schemas.append(change)
    except StromaError:  # (a log that does not read: the fingerprints say enough)
        return ""
    said = []
    if gone:
        said.append(f"the log has steps this plan has not: {', '.join(map(repr, gone[:5]))}")
    said.extend(schemas[:3])
    return "; " + "; ".join(said) if said else ""


def _replay(plan: Plan, log: EffectLog, source: str) -> tuple[Replayed, int]:
    state, effects, first = _last_session(plan, log, source)
    return replay_records(state, effects, log.records, start_at=first), first


async def replay_log(plan: Plan, log: EffectLog) -> ExecutionResult:
    """Feed a finished run's log back through the machine; nothing user-written runs."""
    source = f"the effect log of run {log.header.run_id!r}"
    _check_plan(plan, log, f"run {log.header.run_id!r}")
    done, first = _replay(plan, log, source)
    if done.finish is None:
        raise StromaError(
            f"the log of run {log.header.run_id!r} ends at record {done.read} before "
            "the run finished (it crashed or is still running): resume it with "
            "interpret(plan, state, store=..., config=RunConfig(run_id=...)) instead of "
            "replaying it"
        )
    return result_of(done.finish, Recorder(log, None, session_start=first))


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
    initial_state: BaseModel | None,
    *,
    machine: MachineConfig,
    explicit_run_id: bool,
    world: Collaborators,
) -> ExecutionResult:
    """Run a plan: a new run from ``initial_state``, or (a run id the store holds) the
    run going on from its log, for which ``initial_state`` may be None."""
    try:
        return await _session(plan, initial_state, machine, explicit_run_id, world)
    except BaseExceptionGroup as eg:
        error = single_error(eg)
        raise error from error.__cause__  # (its own cause kept: the store's error, say)


async def _session(
    plan: Plan,
    initial_state: BaseModel | None,
    machine: MachineConfig,
    explicit_run_id: bool,
    world: Collaborators,
) -> ExecutionResult:
    store = world.manager.store
    run_id = machine.run_id
    log_store = _log_store(store)
    lease: AbstractAsyncContextManager[Any] = (
        store.lease(run_id, _holder()) if callable(getattr(store, "lease", None))
        else nullcontext()
    )
    async with lease:
        existing: EffectLog | None = None
        if explicit_run_id:
            if log_store is not None:
                existing = await log_store.read_log(run_id)
            elif callable(getattr(store, "get_log", None)):
                existing = store.get_log(run_id)
        source = f"the effect log of run {run_id!r}"
        prefilled: dict[int, tuple[Any, Any]] | None = None
        performer: LivePerformer | None = None
        if existing is not None and machine.resume_from is None:
            _check_plan(plan, existing, f"run {run_id!r}")
            if initial_state is not None:
                _warn_if_other_initial_state(existing, initial_state, run_id)
            finish = existing.finish
            if finish is not None and finish.status is not RunStatus.WAITING:
                return await replay_log(plan, existing)
            done, first = _replay(plan, existing, source)
            if done.finish is not None and done.finish.status is not RunStatus.WAITING:
                # (the log's last record is the Finish after all)
                return result_of(done.finish, Recorder(existing, None, session_start=first))
            # A crashed run, or one WAITING for input: it goes on from where it stopped.
            recorder = Recorder(existing, log_store, flushed=len(existing.records),
                                session_start=first)
            # Fan-out children that finished before the crash.
            prefilled = existing.pending_children()
            marker = resume_marker(existing.records, machine.started_at)
            state, effects = advance(done.state, fx.Resumed(marker.at, done.pending))
        elif initial_state is None:
            raise StromaTypeError(_no_initial_state(run_id, existing is None, plan))
        elif existing is not None:
            # The API's resume_from on a run that has a log: a new session in the same log,
            # written once it has a step to run. A resume_from that names no step it can
            # go on from, or whose checkpoint is not there, leaves the run as it was (a
            # typo must not put a PARTIAL over a finished run, nor over a crashed one that
            # a plain run would go on from): its PARTIAL result is not recorded.
            state, effects = start(plan, initial_state, machine)
            restart = session_config(machine, initial_state)
            restart["seed"] = machine.seed
            restart["plan"] = plan.fingerprint  # the session's plan, checked on resume
            records = existing.records
            flushed = len(records)
            recorder = Recorder(existing, log_store, flushed=flushed,
                                session_start=flushed + 1)
            performer = LivePerformer(plan, run_id=run_id, world=world, recorder=recorder,
                                      hook_timeout_ms=state.config.hook_timeout_ms)
            loaded: Any = None
            if effects and type(effects[0]) is fx.LoadCheckpoint:
                load = effects[0]
                event = await performer.table[fx.LoadCheckpoint](load)
                loaded = encode_effect(load) + encode_event(event)
                tell_observer(performer, load, event)
                state, effects = advance(state, event)
            marker = ResumeMarker(machine.started_at.isoformat(), restart)
            if effects and type(effects[0]) is fx.Finish:
                tell_observer(performer, effects[0], None, ended=True)
                return _unrecorded(existing, marker, effects[0])
            records.append(marker)
            if loaded is not None:
                records.append(loaded)
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
            recorder = Recorder(EffectLog(header, RecordList()), log_store, flushed=-1)
            # The header at once: the run is in the store (``runs`` shows it running, a
            # crash before its first commit leaves a run to go on from) from its start.
            await recorder.flush()
        # An in-memory store keeps the log by reference: at once for a run id given (it
        # can be named again at any point, a crash included), and for a generated one
        # when the run ends WAITING (the id in its result is how send_input and the run
        # that goes on name it). Other runs with a generated id keep no log.
        attach = log_store is None and callable(getattr(store, "attach_log", None))
        keeps_log = attach
        if attach and explicit_run_id:
            store.attach_log(run_id, recorder.log)
            recorder.keeps_partials = True
            attach = False
        if performer is None:
            performer = LivePerformer(plan, run_id=run_id, world=world, recorder=recorder,
                                      prefilled=prefilled,
                                      hook_timeout_ms=state.config.hook_timeout_ms)
        result = await run_live(state, effects, recorder, performer)
        if result.status is RunStatus.WAITING:
            if attach:
                store.attach_log(run_id, recorder.log)
            elif log_store is None and not keeps_log:
                _warn_waiting_without_log(store, run_id, result)
        return result


def _unrecorded(existing: EffectLog, marker: ResumeMarker, finish: fx.Finish,
                ) -> ExecutionResult:
    """The result of a session that ran nothing, with a log of its own: a copy of the
    run's with the session after it (what a replay of the result reads), never stored."""
    records = RecordList()
    for item in existing.records.items:
        records.append(item)
    records.append(marker)
    session_start = len(records.items)
    records.append(encode_effect(finish))
    recorder = Recorder(EffectLog(existing.header, records), None,
                        session_start=session_start)
    return result_of(finish, recorder)


def _no_initial_state(run_id: str, absent: bool, plan: Plan) -> str:
    schema = plan.input_schema
    name = schema.__name__ if schema is not None else "YourInput"
    why = (f"the store has no run {run_id!r} to go on from" if absent else
           "resume_from starts a new session of the run from the initial state given")
    return (f"interpret(plan, config=RunConfig(run_id={run_id!r})) without an initial "
            f"state: {why}; pass one, e.g. interpret(plan, {name}(...), ...)")


def _changed_fields(log: EffectLog, given: BaseModel) -> list[str]:
    """The fields in which ``given`` differs from the initial state of the log's last
    session ([] when they agree, or when either cannot be read: the run says so)."""
    restart = _last_restart(log)  # (a later session started over: its state counts)
    config = log.header.config if restart is None else restart[1].restart or {}
    initial = config.get("initial")  # (the log's to check when it is replayed: not here)
    recorded = initial.get("state") if isinstance(initial, dict) else None
    if not isinstance(recorded, dict):
        return []
    try:
        now = given.model_dump(mode="json")
    except Exception:  # (a state that cannot be written: the run says so when it starts)
        return []
    return sorted(k for k in recorded.keys() | now.keys()
                  if k in now and recorded.get(k, now[k]) != now[k])


def _fields_text(changed: list[str]) -> str:
    fields = ", ".join(map(repr, changed[:5])) + (", ..." if len(changed) > 5 else "")
    return (f"field{'s' if len(changed) > 1 else ''} {fields}"
            f"{' differ' if len(changed) > 1 else ' differs'}")


def _warn_if_other_initial_state(log: EffectLog, given: BaseModel, run_id: str) -> None:
    """A run id named again with another initial state than its log recorded: the run
    goes on from (or returns) what its log holds, so say that the state given is not
    used (the same run id is the way to resume; a new run needs a new id). Logged, and a
    StromaWarning, so that it is seen with no logging set up."""
    changed = _changed_fields(log, given)
    if changed:
        finish = log.finish
        ended = finish is not None and finish.status is not RunStatus.WAITING
        message = (
            f"run {run_id!r} is in the store with another initial state "
            f"({_fields_text(changed)}): the run "
            f"{'returns its recorded result' if ended else 'goes on from its log'}, with "
            "the state it recorded, and the state given is not used; a new run needs a new "
            "run id (or leave run_id out: each run then gets a fresh one)"
        )
        RunLogger(_log, {"run_id": run_id}).warning("%s", message)
        warnings.warn(message, StromaWarning, stacklevel=_user_stacklevel())


def _warn_waiting_without_log(store: Any, run_id: str, result: ExecutionResult) -> None:
    """A run ended WAITING on a store that keeps no run's log (a user's store with save,
    load and delete only): nothing can go on from the wait, so say so, and the fix.
    Logged, and a StromaWarning, so that it is seen with no logging set up."""
    name = type(store).__name__
    wait = _waiting_at(result)
    message = (
        f"run {run_id!r} ended WAITING for an input, but its store, a {name}, keeps no "
        "run's log (it has save, load and delete, not append_log and read_log): "
        "send_input cannot reach the run, and running the plan again with its run id "
        "starts it over, re-running the steps before the wait. To go on from a wait, use "
        "a store that keeps the run's log (FileStore, RedisStore, PostgresStore or the "
        "in-memory stores); with this one, resume_from goes on from the checkpoints it "
        "saved (a wait outside loops and fan-outs: "
        f"RunConfig(run_id={run_id!r}, resume_from={wait!r}), the input given to "
        "interpret(..., inputs={...}))"
    )
    RunLogger(_log, {"run_id": run_id}).warning("%s", message)
    warnings.warn(message, StromaWarning, stacklevel=_user_stacklevel())


def _waiting_at(result: ExecutionResult) -> str:
    """The step id of the wait a WAITING run stopped at (when it is one)."""
    waits = [] if result.log is None else pending_wait(result.log)
    return waits[0].step_id if len(waits) == 1 else "<the wait's step id>"


def new_seed() -> int:
    return secrets.randbits(63)


def utcnow() -> datetime:
    return datetime.now(UTC)
