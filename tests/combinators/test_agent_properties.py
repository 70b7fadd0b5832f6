"""Properties of random agent plans: loops, routes and waits nested in seq, parallel groups
and map_each (``tests.strategies.agent_specs``), run live on an in-memory store (and on a
FileStore for the cancel-and-resume property).

Nodes fail their first calls of a logical call (by its idempotency key) and write the key
they were given into their output (and error messages), so the trace ties each attempt to
its key. Inputs are answered with ``payload_for(key)``; which waits are answered is found
by running the plan again with the keys it waited for (a few rounds), so some runs end
WAITING and most go on past their waits.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter, defaultdict
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import event as tally
from hypothesis import strategies as st

import stroma
from stroma import (
    AsyncInMemoryStore,
    EffectLog,
    FailureClass,
    FailurePolicy,
    FileStore,
    NodeHooks,
    PlanError,
    RunConfig,
    interpret,
    send_input,
)
from stroma import effects as fx
from stroma.inputs import pending_wait
from stroma.log import ResumeMarker
from stroma.plan import Plan
from stroma.trace import ExecutionResult, RunStatus, TraceEvent
from tests.strategies import (
    KEY_MARK,
    ONE_FAILING_PER_GROUP,
    AgentBuilder,
    AgentState,
    agent_specs,
    payload_for,
)

pytestmark = pytest.mark.anyio

RUN = "agent-prop"
POLICY = {
    FailureClass.RECOVERABLE: FailurePolicy(max_retries=2, backoff_seconds=0),
    FailureClass.AMBIGUOUS: FailurePolicy(max_retries=1, backoff_seconds=0),
}
SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


# ------------------------------------------------------------------------ the world


class Tripwire:
    """Counts the points where a run awaits the world (node calls, hooks, sleeps, store
    writes and input look-ups) and cancels the run at the ``at``-th (0-based), and at every
    point after it."""

    def __init__(self, at: int | None = None) -> None:
        self.at = at
        self.count = 0
        self.scope: anyio.CancelScope | None = None
        self.tripped = False

    async def __call__(self) -> None:
        n, self.count = self.count, self.count + 1
        if self.tripped or (self.at is not None and n == self.at):
            # From here on nothing reaches the world, as if the process had died here
            # (a sibling task that starts before the cancellation is delivered stops too).
            assert self.scope is not None
            self.tripped = True
            self.scope.cancel()
            await anyio.sleep(0)  # the cancellation is delivered here
            raise Crash(f"point {n}")  # ... unless the run shields this write: it dies


class Crash(BaseException):
    """The process died (where a cancellation cannot reach: a shielded store write)."""


class TripStore(AsyncInMemoryStore):
    """An in-memory store whose checkpoint writes and input look-ups pass the tripwire."""

    def __init__(self, tripwire: Tripwire) -> None:
        super().__init__()
        self.tripwire = tripwire

    async def save_state_json(self, run_id: str, node_id: str, data: bytes,
                              schema: Any) -> None:
        await self.tripwire()
        await super().save_state_json(run_id, node_id, data, schema)

    async def get_input(self, run_id: str, key: str) -> str | None:
        await self.tripwire()
        return await super().get_input(run_id, key)


class TripFileStore(FileStore):
    """A FileStore whose log appends and input look-ups pass the tripwire."""

    def __init__(self, path: str, tripwire: Tripwire) -> None:
        super().__init__(path)
        self.tripwire = tripwire

    async def append_log(self, run_id: str, lines: Any, checkpoint: Any = None) -> None:
        await self.tripwire()
        await super().append_log(run_id, lines, checkpoint)

    async def get_input(self, run_id: str, key: str) -> str | None:
        await self.tripwire()
        return await super().get_input(run_id, key)


async def stored_log(store: Any) -> EffectLog | None:
    if isinstance(store, FileStore):
        return await store.read_log(RUN)
    log: EffectLog | None = store.get_log(RUN)
    return log


def hooks_for(tripwire: Tripwire) -> NodeHooks:
    async def start(run_id: str, node_id: str, state: Any) -> None:
        await tripwire()

    async def success(run_id: str, node_id: str, state: Any, tokens: int) -> None:
        await tripwire()

    async def failure(run_id: str, node_id: str, exc: Any, cls: Any) -> None:
        await tripwire()

    return NodeHooks(on_node_start=start, on_node_success=success, on_node_failure=failure)


class World:
    """One try at a plan from specs: a fresh builder (its node calls), a store holding the
    inputs sent so far, and a tripwire through nodes, hooks, sleeps and the store."""

    def __init__(self, specs: list[Any], answers: dict[str, Any], *, hooks: bool,
                 at: int | None = None, calm_groups: bool | str = False,
                 folder: str | None = None) -> None:
        self.builder = AgentBuilder(calm_groups=calm_groups)
        try:
            self.plan: Plan = self.builder.plan(specs)
        except PlanError as e:
            # A loop whose body begins with an untyped wait after a map_each: the wait
            # passes on the map's state (with its required 'into' field), which the body's
            # last node does not output. The check is right; such plans are not drawn.
            assume("feeds its own input" not in str(e))
            raise
        self.tripwire = Tripwire(at)
        self.builder.tripwire = self.tripwire
        self.store: Any = (TripStore(self.tripwire) if folder is None
                           else TripFileStore(folder, self.tripwire))
        self.answers = dict(answers)
        self.hooks = hooks
        self.result: Any = None  # the run's result, once answered_run ran it

    def config(self) -> RunConfig:
        return RunConfig(run_id=RUN, policy_map=POLICY, seed=7, hook_timeout_ms=None,
                         hooks=hooks_for(self.tripwire) if self.hooks else None)

    async def sleep(self, seconds: float) -> None:
        assert seconds == 0, f"a real sleep of {seconds} s"
        await self.tripwire()

    async def put_answers(self) -> None:
        for key, payload in self.answers.items():
            await self.store.put_input(RUN, key, json.dumps(payload))

    async def run(self, **kw: Any) -> ExecutionResult:
        return await interpret(self.plan, AgentState(), store=self.store, config=self.config(),
                               sleep=self.sleep, **kw)


async def answered_run(specs: list[Any], rounds: int, *, hooks: bool,
                       calm_groups: bool | str = False, folder: str | None = None) -> World:
    """The plan run on a fresh world, again with the waits it stopped at answered, up to
    ``rounds`` times: the last world's run (``world.result``) waits at no answered key."""
    answers: dict[str, Any] = {}
    for k in range(rounds + 1):
        world = World(specs, answers, hooks=hooks, calm_groups=calm_groups,
                      folder=None if folder is None else f"{folder}/{k}")
        await world.put_answers()
        world.result = await world.run()
        assert world.result.status in (
            RunStatus.COMPLETED, RunStatus.PARTIAL, RunStatus.FAILED, RunStatus.WAITING)
        log = world.result.log
        waits = pending_wait(log)
        if not waits or k == rounds:
            return world
        assert not {w.key for w in waits} & answers.keys(), "an answered wait waits again"
        answers.update({w.key: payload_for(w.key) for w in waits})
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------ what a log says


def _as_dict(state: Any) -> dict[str, Any]:
    if isinstance(state, bytes | str):
        return json.loads(state)
    if hasattr(state, "model_dump"):
        return state.model_dump(mode="json")
    return state


def key_of(event: TraceEvent) -> str | None:
    """The idempotency key an attempt was given, as its node wrote it."""
    if event.output_state is not None:
        return event.output_state.get("key") or None
    message = event.failure_message or ""
    if KEY_MARK in message:
        return message.split(KEY_MARK, 1)[1].split(")", 1)[0]
    return None  # a contract violation, or cancelled


def _output_key(output: Any) -> str | None:
    if isinstance(output, fx.Validated):
        output = output.json
    data = _as_dict(output)
    key = data.get("key") if isinstance(data, dict) else None
    return key if isinstance(key, str) and key else None


def _message_key(error: fx.ErrorInfo) -> str | None:
    if KEY_MARK not in error.message:
        return None
    return error.message.split(KEY_MARK, 1)[1].split(")", 1)[0]


def walk_calls(log: EffectLog, nodes: set[str]) -> tuple[set[str], Counter[str]]:
    """What the log holds of the node calls: the keys of those whose success it keeps
    (Commits, finished group children, the commits inside sub-plan children it keeps,
    running ones included), and
    how many answered attempts of each key it keeps (each outcome names its key)."""
    committed: set[str] = set()
    answered: Counter[str] = Counter()

    def outcome(o: Any, child_call: bool) -> None:
        if isinstance(o, fx.NodeReturned):
            key = _output_key(o.output)
            if key is not None:
                answered[key] += 1
                if child_call and _as_dict(o.output if not isinstance(
                        o.output, fx.Validated) else o.output.json).get("value") != "not an int":
                    committed.add(key)
        elif isinstance(o, fx.NodeRaised):
            key = _message_key(o.error)
            if key is not None:
                answered[key] += 1
        elif isinstance(o, fx.PlanFinished | fx.NodeCancelled):
            records(o.records)

    def records(items: Any) -> None:
        for effect, event in _pairs(items):
            if isinstance(effect, fx.Commit) and effect.node_id in nodes:
                committed.add(_as_dict(effect.output_state)["key"])
            elif isinstance(effect, fx.CallNode):
                outcome(event, False)
            elif isinstance(event, fx.ParallelReturned):
                for o in event.outcomes:
                    outcome(o, True)

    def in_flight(log: EffectLog) -> None:
        # The group in flight: its children that finished, and the progress of those that
        # are sub-plans still running (their commits are durable as they happen), and
        # what runs inside those (their own groups in flight, any depth down).
        for _, o in log.pending_children().values():
            outcome(o, True)
        for sub in _running_inside(log):
            in_flight(sub)

    records(log.records)
    in_flight(log)
    return committed, answered


def _running_inside(log: EffectLog) -> list[EffectLog]:
    """The logs of the sub-plan children running in ``log``'s group in flight that have a
    group in flight of their own."""
    pending = log.pending_children()
    return [sub for (_, j), sub in log.nested.items()
            if j in pending and sub.records is getattr(pending[j][1], "records", None)]


def _pairs(records: Any) -> list[tuple[Any, Any]]:
    """A log's (effect, event) records, without its resume markers (a sub-plan child's
    records are atoms until decoded)."""
    if not isinstance(records, stroma.log.RecordList):
        records = EffectLog(_HEADER, records).records if records else []
    return [item for item in records if not isinstance(item, ResumeMarker)]


_HEADER = stroma.log.LogHeader(run_id="", plan="", seed=0, version="", started_at="")


def loop_coords(result: ExecutionResult) -> list[tuple[str, int]]:
    """(loop id, iteration) of every attempt and every wait of the run."""
    seen = [(step, n) for e in result.trace for kind, step, n in e.coords if kind == "loop"]
    assert result.log is not None

    def waits(items: Any) -> None:
        for effect, event in _pairs(items):
            if isinstance(effect, fx.AwaitInput):
                seen.extend((step, n) for kind, step, n in effect.coords if kind == "loop")
            if isinstance(event, fx.ParallelReturned):
                for o in event.outcomes:
                    if isinstance(o, fx.PlanFinished | fx.NodeCancelled):
                        waits(o.records)

    waits(result.log.records)
    return seen


def same_run(a: ExecutionResult, b: ExecutionResult) -> None:
    """Two runs of one plan ended alike: status (RESUMED counts as COMPLETED), reason,
    final state and every attempt (states, failures, where they ran)."""
    def status(r: ExecutionResult) -> RunStatus:
        return RunStatus.COMPLETED if r.status is RunStatus.RESUMED else r.status

    assert status(a) is status(b)
    assert a.final_state.model_dump() == b.final_state.model_dump()
    assert a.trace.diff(b.trace) == []
    assert [(e.node_id, e.coords, e.attempt, e.outcome) for e in a.trace] == [
        (e.node_id, e.coords, e.attempt, e.outcome) for e in b.trace]


# ----------------------------------------------------------------------------- properties


@SETTINGS
@given(specs=agent_specs(), rounds=st.integers(0, 3), hooks=st.booleans())
async def test_every_run_replays_to_the_same_result_calling_no_node(
    anyio_backend: str, specs: list[Any], rounds: int, hooks: bool
) -> None:
    """Any agent plan's run (completed, partial, failed or waiting) replays, from its log
    and from the log's JSON-lines text, to an equal result, with no node called."""
    world = await answered_run(specs, rounds, hooks=hooks)
    result: ExecutionResult = world.result
    note(f"status {result.status}: {result.stop_reason}")
    tally(f"status {result.status}")
    tally(f"{len(result.trace)} attempts" if len(result.trace) < 8 else "8+ attempts")
    calls = len(world.builder.called)
    world.builder.replaying = True
    assert result.log is not None
    text = result.log.to_jsonl()
    assert EffectLog.from_jsonl(text).to_jsonl() == text
    for log in (result.log, text):
        again = await stroma.replay(world.plan, log)
        assert again.status is result.status and again.stop_reason == result.stop_reason
        assert again.final_state.model_dump() == result.final_state.model_dump()
        assert again.trace == result.trace and again.trace.diff(result.trace) == []
        assert again == result
    assert len(world.builder.called) == calls


@SETTINGS
@given(specs=agent_specs(), rounds=st.integers(0, 3))
async def test_iterations_never_exceed_max_iterations(
    anyio_backend: str, specs: list[Any], rounds: int
) -> None:
    """Every attempt and every wait inside a loop ran in an iteration 1..max_iterations of
    that loop; a run whose loop ran out of iterations ends PARTIAL saying so."""
    world = await answered_run(specs, rounds, hooks=False)
    result: ExecutionResult = world.result
    loops = world.builder.loops
    for loop_id, n in loop_coords(result):
        assert 1 <= n <= loops[loop_id], (loop_id, n, loops[loop_id])
    if result.status is RunStatus.PARTIAL and "iteration" in (result.stop_reason or ""):
        assert any(loop_id in (result.stop_reason or "") for loop_id in loops)


@SETTINGS
@given(specs=agent_specs(), rounds=st.integers(0, 3))
async def test_idempotency_keys_are_one_per_logical_call(
    anyio_backend: str, specs: list[Any], rounds: int
) -> None:
    """Every attempt of one logical call (node, loop iterations, map items) got the same
    key, and no two logical calls got the same one."""
    world = await answered_run(specs, rounds, hooks=False)
    result: ExecutionResult = world.result
    keys: dict[tuple[str, str], set[str]] = defaultdict(set)
    nodes = set(world.builder.node_ids)  # (a group's failure names its child's key)
    for event in result.trace:
        key = key_of(event)
        if key is not None and event.node_id in nodes:
            keys[(event.node_id, event.where)].add(key)
    assert all(len(found) == 1 for found in keys.values()), keys
    owners: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for call, found in keys.items():
        owners[found.pop()].add(call)
    assert all(len(calls) == 1 for calls in owners.values()), owners
    by_key: dict[str, set[str]] = defaultdict(set)
    for node_id, key in world.builder.called:
        by_key[key].add(node_id)
    assert all(len(nodes) == 1 for nodes in by_key.values())


def assume_every_call_answered(world: World, log: Any) -> None:
    """Compare only runs whose log answers every node call they made.

    A node here answers by how often its logical call was made. A call whose outcome the
    run's own log does not hold (a sub-plan child that a sibling's failure cancelled after
    it had called a node: the call's outcome went with it) still counts towards that
    node's later answers in that run; another run of the plan, knowing only its log (a
    resume), or not making that call (the inputs given up front, so the child's timing
    differs), cannot answer alike.
    """
    _, answered = walk_calls(log, set(world.builder.node_ids))
    assume(answered == Counter(key for _, key in world.builder.called))


async def cancel_and_resume(
    backend: str, specs: list[Any], rounds: int, hooks: bool, cut: int,
    folder: str | None = None,
) -> None:
    """Run the plan whole; run it again cancelled at a point drawn from those the whole run
    passed, then resume it with the same run id (the same store, the same world)."""
    # (see AgentBuilder: two live runs are compared, and the resumed one does not run the
    # children that finished before the cut)
    calm = ONE_FAILING_PER_GROUP
    whole = await answered_run(specs, rounds, hooks=hooks, calm_groups=calm,
                               folder=None if folder is None else f"{folder}/whole")
    expected: ExecutionResult = whole.result
    assume_every_call_answered(whole, expected.log)
    points = whole.tripwire.count
    if points == 0:
        return
    # (``cut`` is drawn before the test runs: a draw that overruns inside the event loop
    # leaks hypothesis's StopTest from the loop's task)
    at = cut % points
    note(f"cancel at {at}")
    tally(f"status {expected.status}")
    world = World(specs, whole.answers, hooks=hooks, at=at, calm_groups=calm,
                  folder=None if folder is None else f"{folder}/cut")
    await world.put_answers()
    with anyio.CancelScope() as scope:
        world.tripwire.scope = scope
        try:
            await world.run()
        except Crash:
            pass
    if not world.tripwire.tripped:  # (trio ordered the run's awaits otherwise: fewer)
        return
    log = await stored_log(world.store)
    if log is None:  # cancelled before anything was durable: the resume starts afresh
        log = EffectLog(_HEADER, stroma.log.RecordList())
    committed, answered = walk_calls(log, set(world.builder.node_ids))
    # A call whose outcome the log lost (a failing group child, a sub-plan child's nodes
    # when the group was cancelled, what a FileStore had not made durable yet) did not
    # happen, as far as the resumed run knows: a node fails by its attempt, whatever ran
    # before the crash.
    made = Counter(key for _, key in world.builder.called)
    assert all(answered[key] <= made[key] for key in answered)
    world.builder.calls = Counter(answered)
    before = len(world.builder.called)
    world.tripwire.at, world.tripwire.tripped = None, False
    resumed = await world.run()
    note(f"cancelled at {at} of {points}; resumed: {resumed.status}")
    again = [key for _, key in world.builder.called[before:]]
    # A node whose success the log held runs again only as the uninterrupted run ran it
    # again: the group retry of a sub-plan child that failed after it (ran out of its
    # loop's iterations, say) runs the child from its start; never more often than that.
    whole_calls = Counter(key for _, key in whole.builder.called)
    again_calls = Counter(again)
    rerun = {key for key in committed & set(again)
             if made[key] + again_calls[key] > whole_calls[key]}
    assert not rerun, "a node whose success was in the log ran again"
    final = await stored_log(world.store)
    assert final is not None
    replayed = await stroma.replay(world.plan, final)
    same_run(replayed, expected)
    assert resumed.final_state.model_dump() == expected.final_state.model_dump()
    # The calls made after the resume have the keys of the same logical calls in the
    # uninterrupted run.
    nodes = set(whole.builder.node_ids)
    expected_keys = {key_of(e): e.node_id for e in expected.trace if e.node_id in nodes}
    first_keys = dict(whole.builder.called)
    for node_id, key in world.builder.called:
        assert expected_keys.get(key, first_keys.get(key, node_id)) == node_id


@SETTINGS
@given(specs=agent_specs(), rounds=st.integers(0, 3), hooks=st.booleans(),
       cut=st.integers(0, 10**6))
async def test_a_run_cancelled_at_any_point_resumes_to_the_uninterrupted_result(
    anyio_backend: str, specs: list[Any], rounds: int, hooks: bool, cut: int
) -> None:
    """Cancelled at any point where it awaits the world (a node call, a hook, a sleep, a
    checkpoint write, an input look-up) and resumed with the same run id on its in-memory
    store, a run ends as the uninterrupted run did; no node whose success the log held is
    called again, and every call keeps the key of its logical call."""
    await cancel_and_resume(anyio_backend, specs, rounds, hooks, cut)


@settings(SETTINGS, max_examples=12)
@given(specs=agent_specs(), rounds=st.integers(0, 2), cut=st.integers(0, 10**6))
async def test_a_run_on_a_file_store_cancelled_at_any_point_resumes_alike(
    anyio_backend: str, specs: list[Any], rounds: int, cut: int
) -> None:
    """The same on a FileStore, cancelled also inside its log appends: what was durable
    when it stopped is all the resumed run goes on from, and it ends alike."""
    with tempfile.TemporaryDirectory() as folder:
        await cancel_and_resume(anyio_backend, specs, rounds, False, cut, folder)


@SETTINGS
@given(specs=agent_specs(), data=st.data())
async def test_inputs_sent_to_a_waiting_run_end_it_as_inputs_given_up_front(
    anyio_backend: str, specs: list[Any], data: st.DataObject
) -> None:
    """A run that ends WAITING, sent its inputs with send_input and run again (as often as
    it waits again), ends as the same plan run once with all those inputs given to
    interpret(inputs=...)."""
    calm = anyio_backend == "trio"  # (see AgentBuilder: two live runs are compared)
    # Drawn up front: a draw that overruns inside the event loop leaks hypothesis's
    # StopTest from the loop's task.
    digests = iter(data.draw(st.lists(st.booleans(), min_size=8, max_size=8), label="digests"))
    world = World(specs, {}, hooks=False, calm_groups=calm)
    result = await world.run()
    sent: dict[str, Any] = {}
    for _ in range(30):
        if result.status is not RunStatus.WAITING:
            break
        assert result.log is not None
        waits = pending_wait(result.log)
        assert waits, "a WAITING run's log names what it waits for"
        for wait in waits:
            assert wait.key not in sent, "a wait that was sent its input waits again"
            payload = payload_for(wait.key)
            use_digest = next(digests, True)
            assert await send_input(world.store, RUN, wait.key, payload,
                                    digest=wait.digest if use_digest else None) == wait.key
            sent[wait.key] = payload
        result = await world.run()
    else:
        raise AssertionError("the run kept waiting")
    log = world.store.get_log(RUN)
    assert log is not None
    assume_every_call_answered(world, log)
    whole = await stroma.replay(world.plan, log)

    upfront = World(specs, {}, hooks=False, calm_groups=calm)
    direct = await upfront.run(inputs=sent)
    assert direct.log is not None
    assume_every_call_answered(upfront, direct.log)
    note(f"sent {sorted(sent)}; ends {result.status} / {direct.status}")
    tally(f"{len(sent)} inputs sent" if len(sent) < 4 else "4+ inputs sent")
    tally(f"status {direct.status}")
    if sent:
        assert whole.status is RunStatus.RESUMED or whole.status is not RunStatus.COMPLETED
    same_run(whole, direct)
