"""The interpreter loop shared by the live, simulated and replay interpreters.

perform effect -> build event -> ``advance`` -> append ``(effect, event)`` to the log.

A run can start from a recorded log: its records are fed back to the machine first (each
effect the machine emits must equal the recorded one, else ``NondeterminismError``), and
where the records end the run goes on with the performer, live. With no performer the
drive is a pure replay and must reach the recorded ``Finish``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from operator import itemgetter
from typing import Any

import anyio
from pydantic import BaseModel

from stroma import effects as fx
from stroma.errors import LogCorrupted, NondeterminismError, StromaError
from stroma.log import (
    ROW_LEN,
    EffectLog,
    LogHeader,
    Record,
    RecordList,
    ResumeMarker,
    encode_partial,
    encode_record,
    is_row,
    trace_event,
)
from stroma.machine import (
    MachineConfig,
    RunState,
    UnexpectedEvent,
    advance,
    continue_plain,
    finish_effect,
    mark_resumed,
    plain_returned,
    skip_plain,
    start,
)
from stroma.plan import Plan
from stroma.schemas import _schema_ref, resolve_declared, state_json
from stroma.trace import ExecutionResult, ExecutionTrace, RunStatus, TraceEvent

__all__ = (
    "Performer",
    "Recorder",
    "drive",
    "first_state",
    "initial_from_header",
    "last_segment",
    "restart_state",
    "session_config",
)

# A performer turns one effect into its event (awaiting whatever the world does).
Performer = Callable[[Any], Awaitable[Any]]


class Recorder:
    """Appends records to the run's EffectLog and flushes them to a durable LogStore."""

    __slots__ = ("_lock", "flushed", "keeps_partials", "log", "records", "run_id", "store")

    def __init__(
        self, log: EffectLog, store: Any | None, *, flushed: int | None = None,
        keeps_partials: bool = False,
    ) -> None:
        self.log = log
        # In-process logs (memory stores) keep finished fan-out children too.
        self.keeps_partials = keeps_partials
        self.records = log.records
        self.run_id = log.header.run_id
        self.store = store  # a LogStore, or None
        # Index of the first record not yet durable; -1 means the header is not written yet.
        self.flushed = len(self.records) if flushed is None else flushed
        self._lock: anyio.Lock | None = None  # serializes fan-out children's appends

    def _pending_lines(self) -> list[str]:
        lines: list[str] = []
        if self.flushed < 0:
            lines.append(_header_line(self.log.header))
            self.flushed = 0
        for i in range(self.flushed, len(self.records)):
            lines.extend(encode_record(i, self.records[i]))
        return lines

    async def flush(
        self,
        checkpoint: tuple[str, BaseModel] | None = None,
        including: Record | None = None,
    ) -> None:
        """Make every record so far durable; ``including`` is the record about to be
        appended (a SaveCheckpoint), written in the same commit as its checkpoint."""
        if self.store is None:
            return
        start = self.flushed
        lines = self._pending_lines()
        end = len(self.records)
        if including is not None:
            lines.extend(encode_record(end, including))
            end += 1
        try:
            await self.store.append_log(self.run_id, lines, checkpoint)
        except BaseException:
            self.flushed = start
            raise
        self.flushed = end


    async def flush_partial(self, child: int, call: Any, outcome: Any) -> None:
        """A fan-out child finished: make it durable before the group ends, so a crash
        inside the fan-out does not run it again."""
        index = len(self.records)
        if self.store is None:
            if self.keeps_partials:
                self.log.partials.append((index, child, call, outcome))
            return
        # Children finish concurrently: one append at a time, so the header and any
        # pending records are written once, and first.
        if self._lock is None:
            self._lock = anyio.Lock()
        async with self._lock:
            start = self.flushed
            lines = self._pending_lines()
            lines.append(encode_partial(index, child, call, outcome))
            try:
                await self.store.append_log(self.run_id, lines, None)
            except BaseException:
                self.flushed = start
                raise
            self.flushed = len(self.records)
            self.log.partials.append((index, child, call, outcome))


def _header_line(header: LogHeader) -> str:
    from stroma.log import encode_header

    return encode_header(header)


def session_config(machine: MachineConfig, initial_state: BaseModel) -> dict[str, Any]:
    data = machine.to_json()
    data["initial"] = {
        "schema": _schema_ref(type(initial_state)),
        "state": initial_state.model_dump(mode="json"),
    }
    return data


def initial_from_header(plan: Plan, data: dict[str, Any]) -> BaseModel:
    """The initial state a log's header (or restart record) recorded."""
    init = data.get("initial") or {}
    raw = init.get("state", {})
    try:
        schema = resolve_declared(init.get("schema"), source="effect log header")
    except StromaError:
        if not plan.steps:
            raise
        first: Any = plan.steps[0]
        schema = first.children[0].input_schema if hasattr(first, "children") else (
            first.input_schema
        )
    return schema.model_validate(raw)


def _machine_config(header: LogHeader, data: dict[str, Any], seed: int, at: str) -> MachineConfig:
    return MachineConfig.from_json(
        data, run_id=header.run_id, seed=seed, started_at=datetime.fromisoformat(at)
    )


def _describe(effect: Any) -> str:
    if isinstance(effect, fx.RecordAttempt):
        e: TraceEvent = effect.event
        what = "ok" if e.failure is None else f"{e.failure}: {e.failure_message}"
        return f"RecordAttempt({e.node_id!r}, attempt {e.attempt}, {what})"
    return repr(effect)


def _difference(recorded: Any, new: Any) -> str:
    """Which fields differ, when both are the same kind of effect."""
    if type(recorded) is not type(new):
        return f"a {type(new).__name__} where the log has a {type(recorded).__name__}"
    a, b = recorded, new
    if isinstance(a, fx.RecordAttempt):
        a, b = a.event, b.event
    names = getattr(type(a), "__slots__", ()) or getattr(a, "__dict__", {}).keys()
    parts = []
    for name in names:
        if name.startswith("__"):
            continue
        x, y = getattr(a, name, None), getattr(b, name, None)
        if x != y:
            parts.append(f"{name}: recorded {x!r}, now {y!r}")
    return "; ".join(parts)[:800]


async def drive(
    plan: Plan,
    state: RunState,
    effects: list[Any],
    recorder: Recorder,
    perform: Performer | None,
    *,
    replay: Sequence[Record] = (),
    on_resume: Callable[[], Awaitable[None]] | None = None,
    resuming: bool = False,
) -> ExecutionResult:
    """Run the machine to its Finish; returns the result (trace folded from the log).

    ``resuming``: the run picks up a log that exists, even if it holds no record yet (a
    crash before the first one): it goes live through a resume marker, status RESUMED.
    """
    records = recorder.records
    items = records.items  # appended to directly: a plain-lane node is one compact row
    trace: list[Any] = []  # RecordAttempt effects, and compact rows
    log = recorder.log
    n_replay = len(replay)
    # The recorded items, compact rows as they are (indexing ``replay`` would expand them).
    recorded = replay.items if type(replay) is RecordList else replay
    i = 0  # next recorded record to match
    live = perform is not None and n_replay == 0 and not resuming
    table = getattr(perform, "table", None)  # a performer's dispatch table, called directly
    sync_table = getattr(perform, "sync_table", None) or {}  # effects done without awaiting
    lane_save = getattr(perform, "lane_save", None)
    while True:
        pending = None
        for eff in effects:
            if not live:
                if (type(eff) is fx.CallNode and i < n_replay and is_row(recorded[i])
                        and state.config.plain):
                    skipped = _skip_rows(state, eff, recorded, i)
                    if skipped is not None:
                        state, effects, k = skipped
                        rows = recorded[i:i + 3 * k]
                        items.extend(rows)
                        trace.extend(rows[::3])
                        i += 3 * k
                        pending = _SKIPPED
                        break
                # Replaying: skip resume markers, restart the machine where a session did.
                while i < n_replay and isinstance(recorded[i], ResumeMarker):
                    marker = recorded[i]
                    assert isinstance(marker, ResumeMarker)
                    records.append(marker)
                    i += 1
                    if marker.restart is not None:
                        raise NondeterminismError(
                            len(records) - 1, "restart", repr(eff),
                            "restart inside an unfinished step"
                        )
                    state = mark_resumed(state)
                if i >= n_replay:
                    if perform is None:
                        raise StromaError(
                            f"the log of run {log.header.run_id!r} ends at record {i} before "
                            "the run finished (it crashed or is still running): resume it "
                            "with interpret(plan, state, store=..., "
                            "config=RunConfig(run_id=...)) instead of replaying it"
                        )
                    live = True
                    marker = ResumeMarker(datetime.now().astimezone().isoformat())
                    records.append(marker)
                    state = mark_resumed(state)
                    if on_resume is not None:
                        await on_resume()
                else:
                    rec = replay[i]  # a compact row is expanded here, into its records
                    assert not isinstance(rec, ResumeMarker)
                    if rec[0] != eff and not (
                        type(eff) is fx.Finish and rec[0] == (eff := _finish_now(state, eff))
                    ):
                        raise NondeterminismError(  # the index in the whole log
                            len(records), _describe(rec[0]), _describe(eff),
                            _difference(rec[0], eff)
                        )
                    if type(eff) is fx.RecordAttempt or type(eff) is fx.Finish:
                        records.append(rec)
                        i += 1
                        if isinstance(rec[0], fx.RecordAttempt):
                            trace.append(rec[0])  # the recorded one: equal, already kept
                            continue
                        assert isinstance(eff, fx.Finish)
                        return await _result(plan, eff, trace, recorder)
                    if type(eff) is fx.SaveCheckpoint and rec[1] is not None:
                        records.append(rec)  # acknowledged: nothing to feed back
                        i += 1
                        continue
                    if rec[1] is None:
                        # stroma records an effect only with its answer (a crash loses the
                        # whole record), so this log was altered or written by something
                        # else. Going live here would misalign the record indices with the
                        # durable log and corrupt every later append.
                        raise LogCorrupted(
                            f"the effect log of run {log.header.run_id!r}",
                            f"record {len(records)} ({_describe(eff)}) has no answering "
                            "event: an effect that needs an answer is only ever recorded "
                            "with it, so the log was altered; restore it, or delete the run "
                            "and start it again",
                        )
                    pending = (eff, rec[1])
                    i += 1
                    continue
            t = type(eff)
            if t is fx.RecordAttempt:
                records.append((eff, None))
                trace.append(eff)
            elif t is fx.SaveCheckpoint:
                # Performed before what follows it; the machine does not wait for it.
                assert perform is not None
                save_now = sync_table.get(t)
                saved = save_now(eff) if save_now else await (table[t] if table else perform)(eff)
                records.append((eff, saved))
            elif t is fx.Finish:
                eff = _finish_now(state, eff)
                records.append((eff, None))
                await recorder.flush()
                return await _result(plan, eff, trace, recorder)
            else:
                pending = eff
        if pending is None:
            raise StromaError(f"the machine emitted no effect to perform in {state.phase!r}")
        if pending is _SKIPPED:
            continue
        if (lane_save is not None and type(pending) is fx.CallNode and state.config.plain
                and pending.timeout_ms is None and pending.model is None):
            state, effects = await _lane(state, pending, perform, lane_save, items, trace)
            continue
        if type(pending) is tuple:
            eff, event = pending
            if type(eff) is fx.CallParallel:
                await _verify_children(eff, event, len(records))
            records.append((eff, event))
        else:
            assert perform is not None
            event = await (table[type(pending)] if table else perform)(pending)
            records.append((pending, event))  # type: ignore[arg-type]
        try:
            state, effects = advance(state, event)
        except UnexpectedEvent as e:
            raise NondeterminismError(
                len(records) - 1, repr(event), "(no such event)", str(e)
            ) from None


_SKIPPED = object()  # drive: the machine went past a chain of recorded rows at once
_ID, _ATTEMPT, _DURATION = itemgetter(0), itemgetter(2), itemgetter(4)  # fields of a row


async def _lane(
    state: RunState, call: fx.CallNode, perform: Any, save: Any, items: list[Any],
    trace: list[Any],
) -> tuple[RunState, list[Any]]:
    """The plain lane: in a plain run, node after node that returns a dict and keeps its
    contract, the machine's decision is ``plain_returned``, and its effects (record the
    attempt, save the checkpoint, call the next node) are done here without making them
    into objects; the log gets one compact row per node (see ``stroma.log``). Anything
    else (a raise, usage, a broken contract, a step that is not a node) goes back to the
    general loop, with the node's record and the machine's next effects."""
    inp: Any = call.input
    in_json = state_json(inp)
    call_plain = perform.call_plain
    run_id = state.config.run_id
    first: fx.CallNode | None = call  # the machine's effect; later calls are implied
    node_id, attempt = call.node_id, call.attempt
    while True:
        got = await call_plain(node_id, inp)
        if type(got) is not tuple:
            event = got
            break
        output, started, duration = got
        done = plain_returned(state, output, started, duration)
        if done is None:
            event = fx.NodeReturned(output, started, duration)
            break
        state, out, nxt = done
        out_json = state_json(out)
        save(node_id, out, out_json)
        row = (node_id, run_id, attempt, started, duration, output, in_json, out_json,
               type(out))
        items.append(row)
        items.append(row)
        items.append(row)
        trace.append(row)
        if nxt is None:
            return continue_plain(state)
        node_id, attempt, inp, in_json, first = nxt.node_id, 1, out, out_json, None
    items.append((first or fx.CallNode(node_id, attempt, None, None, inp), event))
    return advance(state, event)


def _skip_rows(
    state: RunState, eff: fx.CallNode, recorded: Sequence[Any], i: int
) -> tuple[RunState, list[Any], int] | None:
    """Replay the chain of compact rows that starts at ``recorded[i]`` with ``skip_plain``:
    the state and effects after it and how many rows it took, or None to go record by
    record (the general loop then names any difference)."""
    if eff.timeout_ms is not None or eff.model is not None:
        return None
    # The chain: the rows at i, i + 3, ... up to the first record that is not one. Records
    # are pairs and rows have ROW_LEN items, so lengths find it at C speed.
    rows = list(recorded[i::3])
    try:
        lengths = list(map(len, rows))
    except TypeError:  # a ResumeMarker: go item by item
        lengths = [len(r) if type(r) is tuple else 0 for r in rows]
    others = set(lengths) - {ROW_LEN}
    if others:
        del rows[min(lengths.index(n) for n in others):]
    if not rows or rows[0][0] != eff.node_id:
        return None
    while rows:
        last = rows[-1]
        done = skip_plain(
            state, list(map(_ID, rows)), list(map(_ATTEMPT, rows)),
            list(map(_DURATION, rows)), (last[5], last[3]),
        )
        if type(done) is tuple:
            return done[0], done[1], len(rows)
        assert isinstance(done, int)
        rows = rows[:done]  # the ones before the difference, at once; then one by one
    return None


def _finish_now(state: RunState, eff: fx.Finish) -> fx.Finish:
    """The Finish as the machine gives it now: a run that went live (resumed) inside the
    list of effects that ends with this Finish was not yet marked resumed when the machine
    made it, so its status is made again from the state marked since."""
    if not state.resumed:
        return eff
    return finish_effect(state, eff.status, eff.reason)


async def _verify_children(eff: fx.CallParallel, event: Any, index: int) -> None:
    """Replay each recorded sub-plan against its plan: it must end the same way."""
    if not isinstance(event, fx.ParallelReturned) or len(event.outcomes) != len(eff.calls):
        return
    for call, outcome in zip(eff.calls, event.outcomes, strict=True):
        if not (type(call) is fx.RunPlan and type(outcome) is fx.PlanFinished):
            continue
        header = LogHeader(run_id=call.config.run_id, plan=call.plan_fingerprint,
                           seed=call.config.seed, version="", started_at="")
        assert call.input is not None
        state, effects = start(call.plan, call.input, call.config)
        try:
            result = await drive(call.plan, state, effects, Recorder(EffectLog(header, []), None),
                                 None, replay=outcome.records)
        except NondeterminismError as e:
            raise NondeterminismError(
                index, f"{call.child_id}: {e.recorded}", f"{call.child_id}: {e.new}",
                f"inside the sub-plan, record {e.index}",
            ) from None
        # A child's output counts only when it completed (a failed child fails the group).
        completed = outcome.status in (RunStatus.COMPLETED, RunStatus.RESUMED)
        if result.status != outcome.status or (
            completed
            and result.final_state.model_dump(mode="json", exclude_unset=True) != outcome.output
        ):
            raise NondeterminismError(
                index, f"{call.child_id} ended {outcome.status}",
                f"{call.child_id} ends {result.status}", "the sub-plan's result differs",
            )


async def _result(
    plan: Plan, finish: fx.Finish, trace: list[fx.RecordAttempt], recorder: Recorder
) -> ExecutionResult:
    return ExecutionResult(
        run_id=recorder.run_id,
        status=finish.status,
        final_state=finish.final_state,
        trace=ExecutionTrace.from_records(trace, trace_event),
        total_cost_usd=finish.total_cost_usd,
        total_tokens=finish.total_tokens,
        log=recorder.log,
        stop_reason=finish.reason,
    )


def restart_state(
    plan: Plan, header: LogHeader, marker: ResumeMarker
) -> tuple[RunState, list[Any]]:
    data = marker.restart or {}
    cfg = _machine_config(header, data, int(data.get("seed", header.seed)), marker.at)
    return start(plan, initial_from_header(plan, data), cfg)


def first_state(plan: Plan, header: LogHeader) -> tuple[RunState, list[Any]]:
    cfg = _machine_config(header, header.config, header.seed, header.started_at)
    return start(plan, initial_from_header(plan, header.config), cfg)


def last_segment(log: EffectLog) -> tuple[int, ResumeMarker | None]:
    """Where the log's last session starts (after a resume_from restart), and its marker."""
    items = log.records.items
    for k in reversed(log.records.markers):
        rec = items[k]
        if isinstance(rec, ResumeMarker) and rec.restart is not None:
            return k, rec
    return 0, None


