"""Behaviour of ``StromaRunner.run`` / ``stroma.runner.interpret`` that API.md and issue 2 promise.

Every async test runs on asyncio and on trio. Nothing here sleeps for real: retries use
``backoff_seconds=0`` or a recording ``sleep=``; the only waits are node timeouts of a few
milliseconds, which is what a timeout test has to wait for.
"""

from __future__ import annotations

import linecache
import logging
import random
from typing import Any

import anyio
import pytest
from pydantic import BaseModel

from stroma import (
    KNOWN_MODELS,
    AsyncInMemoryStore,
    CheckpointManager,
    ContractRegistry,
    FailureClass,
    FailurePolicy,
    InMemoryStore,
    NodeContext,
    NodeContract,
    NodeHooks,
    RunConfig,
    RunStatus,
    StromaRunner,
    StromaWarning,
    await_input,
    parallel,
    seq,
    stroma_node,
)
from stroma import effects as fx
from stroma.runner import interpret

pytestmark = pytest.mark.anyio


class Approval(BaseModel):
    approved: bool


class Num(BaseModel):
    value: int


class Text(BaseModel):
    text: str


class Pair(BaseModel):
    left: int


class Other(BaseModel):
    right: int


class Shared(BaseModel):
    left: int = 0
    shared: str


class Shared2(BaseModel):
    right: int = 0
    shared: str


def no_backoff(max_retries: int) -> dict[FailureClass, FailurePolicy]:
    """Every failure class retried ``max_retries`` times, without any backoff."""
    return {c: FailurePolicy(max_retries=max_retries, backoff_seconds=0) for c in FailureClass}


def add_one(runner: StromaRunner, node_id: str, calls: list[str] | None = None) -> Any:
    """A node ``node_id`` on ``runner`` that adds one to ``value`` (and logs its calls)."""

    @runner.node(node_id, input=Num, output=Num)
    async def node(state: Num) -> dict[str, int]:
        if calls is not None:
            calls.append(node_id)
        return {"value": state.value + 1}

    return node


def always_raise(runner: StromaRunner, node_id: str, exc: Exception, calls: list[int]) -> Any:
    @runner.node(node_id, input=Num, output=Num)
    async def node(state: Num) -> dict[str, int]:
        calls.append(state.value)
        raise exc

    return node


# ------------------------------------------------------------------------- retries


@pytest.mark.parametrize(("max_retries", "attempts"), [(0, 1), (1, 2), (3, 4)])
async def test_max_retries_counts_retries_after_the_first_attempt(
    anyio_backend: str, max_retries: int, attempts: int
) -> None:
    """``max_retries=n`` allows exactly n + 1 attempts of a node that keeps failing."""
    runner = StromaRunner.quick(policy_map=no_backoff(max_retries))
    calls: list[int] = []
    node = always_raise(runner, "flaky", RuntimeError("boom"), calls)

    result = await runner.run([node], Num(value=1))

    assert len(calls) == attempts
    assert [e.attempt for e in result.trace.events_for("flaky")] == list(range(1, attempts + 1))
    assert result.status is RunStatus.PARTIAL


async def test_terminal_failure_stops_at_once_with_failed(anyio_backend: str) -> None:
    """A TERMINAL failure is never retried, whatever the policy allows, and the run is FAILED."""
    runner = StromaRunner.quick(
        policy_map=no_backoff(5),
        classifiers=[lambda exc, ctx: FailureClass.TERMINAL],
    )
    calls: list[int] = []
    after: list[str] = []
    node = always_raise(runner, "fatal", RuntimeError("invalid_api_key"), calls)
    later = add_one(runner, "later", after)

    result = await runner.run([node, later], Num(value=1))

    assert result.status is RunStatus.FAILED
    assert len(calls) == 1
    assert after == []
    [event] = result.trace.events
    assert event.failure is FailureClass.TERMINAL
    assert "invalid_api_key" in (event.failure_message or "")


async def test_contract_violation_is_terminal(anyio_backend: str) -> None:
    """An output that breaks its contract fails the run at once (FAILED, one attempt)."""
    runner = StromaRunner.quick(policy_map=no_backoff(3))
    calls: list[int] = []

    @runner.node("bad", input=Num, output=Num)
    async def bad(state: Num) -> dict[str, str]:
        calls.append(1)
        return {"value": "not a number"}

    result = await runner.run([bad], Num(value=1))

    assert result.status is RunStatus.FAILED
    assert calls == [1]
    [event] = result.trace.events
    assert event.failure is FailureClass.TERMINAL
    assert "Contract violation for 'bad' (output)" in (event.failure_message or "")


async def test_exhausted_retries_give_partial_with_the_last_valid_state(anyio_backend: str) -> None:
    """When retries run out the run is PARTIAL and ``final_state`` is the last valid state."""
    runner = StromaRunner.quick(policy_map=no_backoff(2))
    first = add_one(runner, "first")
    second = add_one(runner, "second")
    calls: list[int] = []
    broken = always_raise(runner, "broken", TimeoutError("slow upstream"), calls)

    result = await runner.run([first, second, broken], Num(value=10))

    assert result.status is RunStatus.PARTIAL
    assert result.final_state == Num(value=12)
    assert calls == [12, 12, 12]
    assert [e.failure for e in result.trace.events_for("broken")] == [FailureClass.RECOVERABLE] * 3


# ------------------------------------------------------------------------- backoff


def _flaky_pipeline(fail_times: int) -> tuple[Any, list[int]]:
    calls: list[int] = []
    runner = StromaRunner.quick()

    @runner.node("flaky", input=Num, output=Num)
    async def flaky(state: Num) -> dict[str, int]:
        calls.append(1)
        if len(calls) <= fail_times:
            raise TimeoutError("try again")
        return {"value": state.value}

    return flaky, calls


async def _delays(
    seed: int | None, *, retries: int = 8, backoff: float = 2.0
) -> tuple[list[float], Any]:
    """The backoff delays a run asks for (recorded, never slept) and the run's result."""
    delays: list[float] = []

    async def record(seconds: float) -> None:
        delays.append(seconds)

    flaky, _ = _flaky_pipeline(retries)
    fields: dict[str, Any] = {
        "policy_map": {
            FailureClass.RECOVERABLE: FailurePolicy(max_retries=retries, backoff_seconds=backoff)
        }
    }
    if seed is not None:
        fields["seed"] = seed
    result = await interpret([flaky], Num(value=0), config=RunConfig(**fields), sleep=record)
    assert result.status is RunStatus.COMPLETED
    return delays, result


async def test_backoff_is_uniform_between_zero_and_backoff_seconds(anyio_backend: str) -> None:
    """Each delay before a retry lies in [0, backoff_seconds] and the delays are spread out."""
    delays, _ = await _delays(seed=1234, retries=60, backoff=2.0)

    assert len(delays) == 60
    assert all(0.0 <= d <= 2.0 for d in delays)
    assert any(d < 1.0 for d in delays) and any(d > 1.0 for d in delays)
    assert len(set(delays)) > 50


async def test_backoff_is_drawn_from_the_runs_seed(anyio_backend: str) -> None:
    """The same seed gives the same delays, another seed others, and the seed is in the log."""
    first, result = await _delays(seed=42)
    again, _ = await _delays(seed=42)
    other, _ = await _delays(seed=43)

    assert first == again
    assert first != other
    assert result.log.header.seed == 42


async def test_backoff_never_uses_the_global_random(
    anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seeding the global ``random`` changes nothing and a broken ``random`` breaks nothing."""
    random.seed(0)
    unseeded_a, result_a = await _delays(seed=None)
    random.seed(0)
    unseeded_b, result_b = await _delays(seed=None)
    # Each unseeded run gets its own seed, recorded in its log header.
    assert result_a.log.header.seed != result_b.log.header.seed
    assert unseeded_a != unseeded_b

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the global random module must not be used")

    for name in ("random", "uniform", "randint", "randrange", "getrandbits", "choice",
                 "gauss", "triangular", "expovariate", "seed", "shuffle", "sample"):
        monkeypatch.setattr(random, name, forbidden)
    seeded, _ = await _delays(seed=42)
    monkeypatch.undo()
    assert seeded == (await _delays(seed=42))[0]


# -------------------------------------------------------------------- cancellation


@pytest.mark.parametrize("shape", ["plain", "with_timeout", "in_parallel"])
async def test_cancelling_the_run_from_outside_propagates_unclassified(
    anyio_backend: str, shape: str
) -> None:
    """An outside cancel propagates out of ``run``: no classification, no retry, no
    failure hook, and no checkpoint of the interrupted node."""
    started = anyio.Event()
    never = anyio.Event()
    attempts: list[int] = []
    failure_hooks: list[Any] = []
    classified: list[Any] = []
    store = InMemoryStore()

    async def on_failure(*args: Any) -> None:
        failure_hooks.append(args)

    def classifier(exc: Exception, ctx: NodeContext) -> FailureClass | None:
        classified.append(exc)
        return None

    runner = StromaRunner.quick(
        store=store,
        run_id=f"cancelled-{shape}",
        policy_map=no_backoff(3),
        hooks=NodeHooks(on_node_failure=on_failure),
        classifiers=[classifier],
    )
    first = add_one(runner, "first")

    @runner.node("blocked", input=Num, output=Num)
    async def blocked(state: Num) -> dict[str, int]:
        attempts.append(1)
        started.set()
        await never.wait()
        return {"value": state.value}

    @runner.node("sibling", input=Num, output=Other)
    async def sibling(state: Num) -> dict[str, int]:
        await never.wait()
        return {"right": 1}

    if shape == "with_timeout":
        runner.with_node_timeouts({"blocked": 60_000})
    pipeline = [first, parallel(blocked, sibling)] if shape == "in_parallel" else [first, blocked]
    step_id = "parallel(blocked, sibling)" if shape == "in_parallel" else "blocked"

    raised: list[BaseException] = []
    returned: list[Any] = []
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:

            async def cancel_once_started() -> None:
                await started.wait()
                scope.cancel()

            tg.start_soon(cancel_once_started)
            try:
                returned.append(await runner.run(pipeline, Num(value=1)))
            except BaseException as exc:
                raised.append(exc)
                raise

    assert scope.cancelled_caught
    assert returned == []
    assert len(raised) == 1 and isinstance(raised[0], anyio.get_cancelled_exc_class())
    assert attempts == [1]
    assert failure_hooks == []
    assert classified == []
    assert store.load(f"cancelled-{shape}", step_id) is None
    assert store.load(f"cancelled-{shape}", "first") == Num(value=2)
    log = store.get_log(f"cancelled-{shape}")
    assert log is not None
    effects = [rec[0] for rec in log.records if isinstance(rec, tuple)]
    assert not any(isinstance(e, fx.ClassifyFailure | fx.Sleep | fx.Finish) for e in effects)
    assert [e.event.node_id for e in effects
            if isinstance(e, fx.RecordAttempt | fx.Commit)] == ["first"]


# --------------------------------------------------------------------------- hooks


async def test_raising_hooks_change_nothing_but_are_logged_and_recorded(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Hooks that raise leave outcome, attempts and trace alone; each error is logged with
    the run id and recorded as a ``HookFired`` with ``error`` in the effect log."""
    caplog.set_level(logging.WARNING, logger="stroma")

    async def bad_start(run_id: str, node_id: str, state: dict[str, Any]) -> None:
        raise RuntimeError("start hook broke")

    async def bad_success(run_id: str, node_id: str, state: dict[str, Any], tokens: int) -> None:
        raise RuntimeError("success hook broke")

    async def bad_failure(run_id: str, node_id: str, exc: Exception, cls: FailureClass) -> None:
        raise RuntimeError("failure hook broke")

    runner = StromaRunner.quick(
        run_id="hooked-run-7",
        policy_map=no_backoff(3),
        hooks=NodeHooks(
            on_node_start=bad_start, on_node_success=bad_success, on_node_failure=bad_failure
        ),
    )
    calls: list[str] = []
    stable = add_one(runner, "stable", calls)

    @runner.node("flaky", input=Num, output=Num)
    async def flaky(state: Num) -> dict[str, int]:
        calls.append("flaky")
        if calls.count("flaky") == 1:
            raise TimeoutError("first try fails")
        return {"value": state.value * 10}

    result = await runner.run([stable, flaky], Num(value=1))

    assert result.status is RunStatus.COMPLETED
    assert result.final_state == Num(value=20)
    assert calls == ["stable", "flaky", "flaky"]
    assert [(e.node_id, e.attempt, e.failure) for e in result.trace] == [
        ("stable", 1, None),
        ("flaky", 1, FailureClass.RECOVERABLE),
        ("flaky", 2, None),
    ]
    hook_errors = [
        (eff.kind, eff.node_id, ev.error.message)
        for eff, ev in (r for r in result.log.records if isinstance(r, tuple))
        if isinstance(ev, fx.HookFired) and ev.error is not None
    ]
    assert hook_errors == [
        ("start", "stable", "start hook broke"),
        ("success", "stable", "success hook broke"),
        ("start", "flaky", "start hook broke"),
        ("failure", "flaky", "failure hook broke"),
        ("start", "flaky", "start hook broke"),
        ("success", "flaky", "success hook broke"),
    ]
    hook_logs = [r for r in caplog.records if "hook on_node_" in r.getMessage()]
    assert len(hook_logs) == 6
    for record in hook_logs:
        assert "hooked-run-7" in record.getMessage()
        assert record.run_id == "hooked-run-7"  # type: ignore[attr-defined]
        assert record.levelno == logging.WARNING


async def test_hooks_fire_start_then_outcome_for_every_attempt(anyio_backend: str) -> None:
    """Per attempt: start, then success or failure; a failure fires for each failed attempt
    and start fires again before each retry, with the hook arguments API.md lists."""
    events: list[tuple[Any, ...]] = []

    async def on_start(run_id: str, node_id: str, input_state: dict[str, Any]) -> None:
        events.append(("start", node_id, input_state))

    async def on_success(run_id: str, node_id: str, out: dict[str, Any], tokens: int) -> None:
        events.append(("success", node_id, out, tokens))

    async def on_failure(run_id: str, node_id: str, exc: Exception, cls: FailureClass) -> None:
        events.append(("failure", node_id, type(exc).__name__, cls))

    runner = StromaRunner.quick(
        policy_map=no_backoff(3),
        hooks=NodeHooks(on_node_start=on_start, on_node_success=on_success,
                        on_node_failure=on_failure),
    )
    attempts: list[int] = []

    @runner.node("flaky", input=Num, output=Num)
    async def flaky(state: Num) -> tuple[dict[str, int], int]:
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionError("reset")
        return {"value": state.value + 1}, 7

    result = await runner.run([flaky], Num(value=1))

    assert result.status is RunStatus.COMPLETED
    assert events == [
        ("start", "flaky", {"value": 1}),
        ("failure", "flaky", "ConnectionError", FailureClass.AMBIGUOUS),
        ("start", "flaky", {"value": 1}),
        ("failure", "flaky", "ConnectionError", FailureClass.AMBIGUOUS),
        ("start", "flaky", {"value": 1}),
        ("success", "flaky", {"value": 2}, 7),
    ]


async def test_input_contract_violation_still_brackets_the_attempt_with_hooks(
    anyio_backend: str,
) -> None:
    """A node whose input breaks its contract is not called, yet its attempt fires start and
    then failure (TERMINAL), like any other attempt."""
    events: list[tuple[str, str]] = []

    async def on_start(run_id: str, node_id: str, input_state: dict[str, Any]) -> None:
        events.append(("start", node_id))

    async def on_failure(run_id: str, node_id: str, exc: Exception, cls: FailureClass) -> None:
        events.append((f"failure {cls}", node_id))

    runner = StromaRunner.quick(
        policy_map=no_backoff(3),
        hooks=NodeHooks(on_node_start=on_start, on_node_failure=on_failure),
    )
    calls: list[str] = []

    @runner.node("wants_text", input=Text, output=Text)
    async def wants_text(state: Text) -> dict[str, str]:
        calls.append("wants_text")
        return {"text": state.text}

    result = await runner.run([wants_text], Num(value=1))

    assert result.status is RunStatus.FAILED
    assert calls == []
    assert events == [("start", "wants_text"), ("failure TERMINAL", "wants_text")]
    assert "(input)" in (result.trace.events[0].failure_message or "")


async def test_hooks_mutating_their_arguments_do_not_alter_the_run_record(
    anyio_backend: str,
) -> None:
    """A hook gets state dicts of its own: changing them alters neither the trace, nor the
    effect log, nor what the next node receives."""

    async def on_start(run_id: str, node_id: str, input_state: dict[str, Any]) -> None:
        input_state["value"] = -1
        input_state["injected"] = True

    async def on_success(run_id: str, node_id: str, out: dict[str, Any], tokens: int) -> None:
        out.clear()  # e.g. redacting before export

    runner = StromaRunner.quick(
        hooks=NodeHooks(on_node_start=on_start, on_node_success=on_success)
    )
    seen: list[int] = []

    @runner.node("a", input=Num, output=Num)
    async def a(state: Num) -> dict[str, int]:
        seen.append(state.value)
        return {"value": state.value + 1}

    @runner.node("b", input=Num, output=Num)
    async def b(state: Num) -> dict[str, int]:
        seen.append(state.value)
        return {"value": state.value + 1}

    result = await runner.run([a, b], Num(value=1))

    assert result.final_state == Num(value=3)
    assert seen == [1, 2]
    assert [(e.node_id, e.input_state, e.output_state) for e in result.trace] == [
        ("a", {"value": 1}, {"value": 2}),
        ("b", {"value": 2}, {"value": 3}),
    ]
    text = result.log.to_jsonl()
    assert '"injected"' not in text and '"value":-1' not in text
    hook_states = [
        (rec[0].kind, rec[0].state) for rec in result.log.records
        if isinstance(rec, tuple) and isinstance(rec[0], fx.FireHook)
    ]
    assert hook_states == [
        ("start", {"value": 1}), ("success", {"value": 2}),
        ("start", {"value": 2}), ("success", {"value": 3}),
    ]


def test_sync_function_as_hook_is_a_type_error_naming_the_hook() -> None:
    """A plain ``def`` given as a hook is refused with a TypeError naming the hook."""

    def my_sync_hook(run_id: str, node_id: str, input_state: dict[str, Any]) -> None:
        return None

    with pytest.raises(TypeError, match="on_node_start") as info:
        NodeHooks(on_node_start=my_sync_hook)
    assert "my_sync_hook" in str(info.value)
    assert "async def" in str(info.value)


def test_sync_hook_assigned_later_is_a_type_error_naming_the_hook() -> None:
    """Assigning a plain ``def`` to an existing NodeHooks is refused the same way."""

    def late_sync_hook(run_id: str, node_id: str, exc: Exception, cls: FailureClass) -> None:
        return None

    hooks = NodeHooks()
    with pytest.raises(TypeError, match="on_node_failure") as info:
        hooks.on_node_failure = late_sync_hook
    assert "late_sync_hook" in str(info.value)


# ------------------------------------------------------------- errors before running


async def test_undecorated_function_is_named_before_anything_runs(anyio_backend: str) -> None:
    """A plain function in the pipeline is a TypeError naming it and the decorator to use,
    raised before any node runs."""
    runner = StromaRunner.quick()
    calls: list[str] = []
    first = add_one(runner, "first", calls)

    async def plain_helper(state: Num) -> dict[str, int]:
        return {"value": 0}

    with pytest.raises(TypeError) as info:
        await runner.run([first, plain_helper], Num(value=1))
    assert "plain_helper" in str(info.value)
    assert "@runner.node" in str(info.value)
    assert calls == []


async def test_duplicate_node_ids_are_named_before_anything_runs(anyio_backend: str) -> None:
    """Two nodes with the same id are an error naming the id and the fix, before any run."""
    runner = StromaRunner.quick()
    calls: list[str] = []
    one = add_one(runner, "twin", calls)
    two = add_one(runner, "twin", calls)

    with pytest.raises(ValueError, match="'twin'") as info:
        await runner.run([one, two], Num(value=1))
    assert "another id" in str(info.value)
    assert calls == []


async def test_missing_contract_is_named_before_anything_runs(anyio_backend: str) -> None:
    """A node marked without a contract and absent from the registry is an error naming its
    id and how to register one, before any node runs."""
    runner = StromaRunner.quick()
    calls: list[str] = []
    first = add_one(runner, "first", calls)

    @stroma_node("orphan")
    async def orphan(state: Num) -> dict[str, int]:
        calls.append("orphan")
        return {"value": 0}

    with pytest.raises(ValueError, match="'orphan'") as info:
        await runner.run([first, orphan], Num(value=1))
    assert "NodeContract" in str(info.value) and "register" in str(info.value)
    assert calls == []


async def test_contract_from_the_registry_completes_a_marked_node(anyio_backend: str) -> None:
    """``stroma_node(id)`` without a contract runs once the runner's registry has one."""
    registry = ContractRegistry()
    registry.register(NodeContract(node_id="x", input_schema=Num, output_schema=Num))
    runner = StromaRunner(registry, CheckpointManager(InMemoryStore()), RunConfig())

    @stroma_node("x")
    async def x(state: Num) -> dict[str, int]:
        return {"value": state.value * 3}

    result = await runner.run([x], Num(value=2))
    assert result.status is RunStatus.COMPLETED
    assert result.final_state == Num(value=6)


# -------------------------------------------------------------------- edge sequences


async def test_empty_sequence_completes_with_the_initial_state(anyio_backend: str) -> None:
    """Running no nodes completes with the initial state, no trace and no usage."""
    result = await StromaRunner.quick().run([], Num(value=7))

    assert result.status is RunStatus.COMPLETED
    assert result.final_state == Num(value=7)
    assert len(result.trace) == 0
    assert (result.total_tokens, result.total_cost_usd) == (0, 0.0)


async def test_resume_from_an_unknown_id_is_partial_and_runs_nothing(anyio_backend: str) -> None:
    """``resume_from`` naming no node of the sequence gives PARTIAL without running a node."""
    runner = StromaRunner.quick(resume_from="nowhere")
    calls: list[str] = []
    nodes = [add_one(runner, "a", calls), add_one(runner, "b", calls)]

    result = await runner.run(nodes, Num(value=1))

    assert result.status is RunStatus.PARTIAL
    assert calls == []
    assert len(result.trace) == 0
    assert result.final_state == Num(value=1)
    assert "nowhere" in (result.stop_reason or "")


class _DictStore:
    """A bare async store (save/load/delete only, no effect log): structural typing."""

    def __init__(self) -> None:
        self.data: dict[tuple[str, str], str] = {}
        self.types: dict[tuple[str, str], type[BaseModel]] = {}

    async def save(self, run_id: str, node_id: str, state: BaseModel) -> None:
        self.data[(run_id, node_id)] = state.model_dump_json()
        self.types[(run_id, node_id)] = type(state)

    async def load(self, run_id: str, node_id: str) -> BaseModel | None:
        key = (run_id, node_id)
        return self.types[key].model_validate_json(self.data[key]) if key in self.data else None

    async def delete(self, run_id: str) -> None:
        for key in [k for k in self.data if k[0] == run_id]:
            del self.data[key]


@pytest.mark.parametrize("store_kind", ["memory", "async_memory", "bare"])
async def test_resume_from_starts_at_the_previous_checkpoint(
    anyio_backend: str, store_kind: str
) -> None:
    """Same run id plus ``resume_from`` skips the earlier nodes, feeds the resumed node the
    checkpoint of the node before it, and finishes RESUMED."""
    store: Any = {"memory": InMemoryStore, "async_memory": AsyncInMemoryStore,
                  "bare": _DictStore}[store_kind]()
    calls: list[str] = []
    broken = [True]
    runner = StromaRunner.quick(store=store, run_id="resumable", policy_map=no_backoff(0))
    a = add_one(runner, "a", calls)
    b = add_one(runner, "b", calls)

    @runner.node("c", input=Num, output=Text)
    async def c(state: Num) -> dict[str, str]:
        calls.append(f"c({state.value})")
        if broken[0]:
            raise RuntimeError("c is down")
        return {"text": f"got {state.value}"}

    first = await runner.run([a, b, c], Num(value=1))
    assert first.status is RunStatus.PARTIAL
    assert calls == ["a", "b", "c(3)"]

    broken[0] = False
    calls.clear()
    resumed_runner = StromaRunner(
        runner.registry,
        runner.checkpoint_manager,
        RunConfig(run_id="resumable", resume_from="c", policy_map=no_backoff(0)),
    )
    second = await resumed_runner.run([a, b, c], Num(value=1))

    assert second.status is RunStatus.RESUMED
    assert calls == ["c(3)"]
    assert second.final_state == Text(text="got 3")
    assert [e.node_id for e in second.trace] == ["c"]


async def test_resume_without_the_previous_checkpoint_is_partial(anyio_backend: str) -> None:
    """Resuming at a node whose predecessor has no checkpoint in the store runs nothing and
    is PARTIAL, saying which checkpoint is missing."""
    runner = StromaRunner.quick(run_id="never-ran", resume_from="b")
    calls: list[str] = []
    nodes = [add_one(runner, "a", calls), add_one(runner, "b", calls)]

    result = await runner.run(nodes, Num(value=1))

    assert result.status is RunStatus.PARTIAL
    assert calls == []
    assert "no checkpoint of 'a'" in (result.stop_reason or "")


async def test_resume_from_the_first_node_reruns_everything(anyio_backend: str) -> None:
    """``resume_from`` the first node needs no checkpoint: every node runs, status RESUMED."""
    runner = StromaRunner.quick(run_id="from-start", resume_from="a")
    calls: list[str] = []
    nodes = [add_one(runner, "a", calls), add_one(runner, "b", calls)]

    result = await runner.run(nodes, Num(value=1))

    assert result.status is RunStatus.RESUMED
    assert calls == ["a", "b"]
    assert result.final_state == Num(value=3)


async def test_a_finished_run_id_run_again_returns_its_record(anyio_backend: str) -> None:
    """Running a finished run id again (no resume_from) calls no node and returns the
    recorded result."""
    runner = StromaRunner.quick(run_id="done-once")
    calls: list[str] = []
    nodes = [add_one(runner, "a", calls), add_one(runner, "b", calls)]

    first = await runner.run(nodes, Num(value=1))
    second = await runner.run(nodes, Num(value=1))

    assert calls == ["a", "b"]
    assert second.status is first.status is RunStatus.COMPLETED
    assert second.final_state == first.final_state == Num(value=3)
    assert second.trace.diff(first.trace) == []


async def test_a_run_id_named_again_with_another_initial_state_says_it_is_not_used(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The same run id with another initial state goes on from (here: returns) what its
    log holds, and a warning names the fields that differ and says the state given is not
    used; the same state again warns of nothing."""
    caplog.set_level(logging.WARNING, logger="stroma")
    runner = StromaRunner.quick(run_id="named-twice")
    calls: list[str] = []
    nodes = [add_one(runner, "a", calls)]
    first = await runner.run(nodes, Num(value=1))
    await runner.run(nodes, Num(value=1))
    assert not [r for r in caplog.records if "another initial state" in r.getMessage()]
    with pytest.warns(StromaWarning, match="returns its recorded result") as caught:
        second = await runner.run(nodes, Num(value=10))
    assert calls == ["a"] and second.final_state == first.final_state == Num(value=2)
    # Shown at the user's call (runner.run here), not in stroma's own code.
    assert [w.filename for w in caught] == [__file__]
    [warning] = [r for r in caplog.records if "another initial state" in r.getMessage()]
    assert "field 'value' differs" in warning.getMessage()
    assert "the state given is not used; a new run needs a new run id" in warning.getMessage()
    assert getattr(warning, "run_id", None) == "named-twice"


async def test_a_run_id_not_finished_named_with_another_initial_state_warns(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A run id that has not finished (here: WAITING) named again with another initial
    state goes on from its log with the state it recorded; a warning (logged, and a
    StromaWarning) names the fields that differ and says the state given is not used."""
    caplog.set_level(logging.WARNING, logger="stroma")

    class Ask(BaseModel):
        value: int
        ok: Approval | None = None

    runner = StromaRunner.quick(run_id="waits")
    plan = seq(await_input("ok", Approval, input=Ask))
    store = runner.checkpoint_manager.store
    waiting = await interpret(plan, Ask(value=1), store=store, config=RunConfig(run_id="waits"))
    assert waiting.status is RunStatus.WAITING
    with pytest.warns(StromaWarning, match="field 'value' differs.*goes on from its log") as caught:
        done = await interpret(plan, Ask(value=7), store=store,
                               config=RunConfig(run_id="waits"),
                               inputs={"ok": {"approved": True}})
    # Shown at the user's interpret(...) call, its line too, not in stroma's own code.
    [shown] = caught
    assert shown.filename == __file__
    assert "interpret(plan, Ask(value=7)" in linecache.getline(shown.filename, shown.lineno)
    assert done.final_state == Ask(value=1, ok=Approval(approved=True))
    [warning] = [r for r in caplog.records if "another initial state" in r.getMessage()]
    assert "the state given is not used; a new run needs a new run id" in warning.getMessage()
    assert getattr(warning, "run_id", None) == "waits"


# ------------------------------------------------------------------------- budgets


@pytest.mark.parametrize(
    ("budget", "usage", "dimension"),
    [
        ({"tokens": 100}, 150, "tokens"),
        ({"cost_usd": 0.001}, 1000, "cost"),  # 1000 gpt-4o input tokens = $0.0025
    ],
)
async def test_budget_exceeded_after_a_node_is_recoverable(
    anyio_backend: str, budget: dict[str, Any], usage: int, dimension: str
) -> None:
    """A node pushing the cumulative total over a limit fails with a RECOVERABLE
    BudgetExceeded, and the spent budget then stops the run PARTIAL without a new attempt."""
    runner = StromaRunner.quick(
        policy_map={FailureClass.RECOVERABLE: FailurePolicy(max_retries=3, backoff_seconds=0)}
    ).with_budget(**budget)
    calls: list[int] = []

    @runner.node("hungry", input=Num, output=Num)
    async def hungry(state: Num) -> tuple[dict[str, int], int, str]:
        calls.append(1)
        return {"value": state.value + 1}, usage, "gpt-4o"

    result = await runner.run([hungry], Num(value=1))

    assert result.status is RunStatus.PARTIAL
    assert calls == [1]
    assert result.final_state == Num(value=1)
    over = result.trace.events[0]
    assert over.failure is FailureClass.RECOVERABLE
    assert f"{dimension} budget exceeded after node 'hungry'" in (over.failure_message or "")
    last = result.trace.events[-1]
    assert "budget spent" in (last.failure_message or "")
    assert "not started" in (last.failure_message or "")


async def test_no_node_starts_once_the_budget_is_spent(anyio_backend: str) -> None:
    """A node whose run has already spent its budget is never started: the run is PARTIAL
    and the last trace event (and the stop reason) say why."""
    started: list[str] = []

    async def on_start(run_id: str, node_id: str, state: dict[str, Any]) -> None:
        started.append(node_id)

    runner = StromaRunner.quick(hooks=NodeHooks(on_node_start=on_start)).with_budget(tokens=100)
    calls: list[str] = []

    @runner.node("spender", input=Num, output=Num)
    async def spender(state: Num) -> tuple[dict[str, int], int]:
        calls.append("spender")
        return {"value": state.value + 1}, 100  # exactly the limit: not over, but spent

    never = add_one(runner, "never", calls)

    result = await runner.run([spender, never], Num(value=1))

    assert result.status is RunStatus.PARTIAL
    assert calls == ["spender"]
    assert started == ["spender"]
    assert result.final_state == Num(value=2)
    assert result.total_tokens == 100
    last = result.trace.events[-1]
    assert last.node_id == "never"
    assert last.output_state is None
    assert "budget spent" in (last.failure_message or "")
    assert "tokens" in (last.failure_message or "")
    assert result.stop_reason == last.failure_message


# ------------------------------------------------------------------------ timeouts


async def test_node_timeout_really_cancels_and_is_a_recoverable_timeout(anyio_backend: str) -> None:
    """A node past its timeout is cancelled (its ``finally`` runs, the code after the await
    never does) and the attempt is classified RECOVERABLE as a TimeoutError."""
    seen: list[type[BaseException]] = []

    def spy(exc: Exception, ctx: NodeContext) -> FailureClass | None:
        seen.append(type(exc))
        return None

    runner = StromaRunner.quick(
        policy_map={
            FailureClass.RECOVERABLE: FailurePolicy(max_retries=1, backoff_seconds=0),
            FailureClass.AMBIGUOUS: FailurePolicy(max_retries=0, backoff_seconds=0),
        },
        classifiers=[spy],
    ).with_node_timeouts({"slow": 5})
    finally_ran: list[int] = []
    after_await: list[int] = []

    @runner.node("slow", input=Num, output=Num)
    async def slow(state: Num) -> dict[str, int]:
        try:
            await anyio.sleep_forever()
            after_await.append(1)
        finally:
            finally_ran.append(1)
        return {"value": 0}

    result = await runner.run([slow], Num(value=1))

    assert result.status is RunStatus.PARTIAL
    assert finally_ran == [1, 1]
    assert after_await == []
    assert seen == [TimeoutError, TimeoutError]
    events = result.trace.events_for("slow")
    assert [e.failure for e in events] == [FailureClass.RECOVERABLE] * 2
    assert all("timed out" in (e.failure_message or "") for e in events)


async def test_a_node_swallowing_its_timeout_still_times_out(anyio_backend: str) -> None:
    """A node that catches the timeout's cancellation and returns anyway is still reported
    as a RECOVERABLE TimeoutError: its late result is not taken as a success."""
    runner = StromaRunner.quick(policy_map=no_backoff(0)).with_node_timeouts({"stubborn": 5})

    @runner.node("stubborn", input=Num, output=Num)
    async def stubborn(state: Num) -> dict[str, int]:
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            pass  # wrong, but it happens
        return {"value": 42}

    result = await runner.run([stubborn], Num(value=1))

    assert result.status is RunStatus.PARTIAL
    assert result.final_state == Num(value=1)
    [event] = result.trace.events
    assert event.failure is FailureClass.RECOVERABLE
    assert "timed out" in (event.failure_message or "")


async def test_a_node_turning_its_timeout_into_another_error_still_times_out(
    anyio_backend: str,
) -> None:
    """A node that its timeout cancels and that then raises an error of its own (an HTTP
    client's ConnectionError when its call is cut off) is a TimeoutError, RECOVERABLE and
    retried as such, naming the node's error and chaining it; before, its own error was
    the attempt's (AMBIGUOUS: no retry here) and the timeout was gone from the trace."""
    seen: list[BaseException] = []

    def spy(exc: Exception, ctx: NodeContext) -> FailureClass | None:
        seen.append(exc)
        return None

    runner = StromaRunner.quick(
        policy_map={
            FailureClass.RECOVERABLE: FailurePolicy(max_retries=1, backoff_seconds=0),
            FailureClass.AMBIGUOUS: FailurePolicy(max_retries=0, backoff_seconds=0),
        },
        classifiers=[spy],
    ).with_node_timeouts({"fetch": 5})

    @runner.node("fetch", input=Num, output=Num)
    async def fetch(state: Num) -> dict[str, int]:
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            raise ConnectionError("connection closed") from None
        return {"value": 0}

    result = await runner.run([fetch], Num(value=1))

    assert result.status is RunStatus.PARTIAL
    events = result.trace.events_for("fetch")
    assert [e.failure for e in events] == [FailureClass.RECOVERABLE] * 2
    assert all(e.failure_message == "node 'fetch' timed out after 5 ms and was cancelled "
               "(it then raised ConnectionError: connection closed)" for e in events)
    assert [type(e) for e in seen] == [TimeoutError, TimeoutError]
    assert all(isinstance(e.__cause__, ConnectionError) for e in seen)


async def test_a_node_raising_within_its_timeout_is_not_a_timeout(anyio_backend: str) -> None:
    """A node with a timeout that raises before its deadline fails with its own error."""
    runner = StromaRunner.quick(policy_map=no_backoff(0)).with_node_timeouts({"fetch": 5_000})

    @runner.node("fetch", input=Num, output=Num)
    async def fetch(state: Num) -> dict[str, int]:
        raise ConnectionError("refused")

    result = await runner.run([fetch], Num(value=1))

    [event] = result.trace.events
    assert event.failure is FailureClass.AMBIGUOUS
    assert event.failure_message == "refused"


async def test_timeout_of_a_parallel_child_fails_the_group(anyio_backend: str) -> None:
    """A parallel child past its own timeout is cancelled and fails the group as a timeout."""
    runner = StromaRunner.quick(policy_map=no_backoff(0)).with_node_timeouts({"slow": 5})

    @runner.node("fast", input=Num, output=Pair)
    async def fast(state: Num) -> dict[str, int]:
        return {"left": 1}

    @runner.node("slow", input=Num, output=Other)
    async def slow(state: Num) -> dict[str, int]:
        await anyio.sleep_forever()
        return {"right": 1}

    result = await runner.run([parallel(fast, slow)], Num(value=1))

    assert result.status is RunStatus.PARTIAL
    [event] = result.trace.events
    assert event.failure is FailureClass.RECOVERABLE
    assert "'slow' timed out" in (event.failure_message or "")


# ------------------------------------------------------------------------- context


async def test_nodes_with_two_params_share_the_context_dict_by_reference(
    anyio_backend: str,
) -> None:
    """Every node taking a second parameter gets ``config.context`` itself, not a copy."""
    context: dict[str, Any] = {"client": object()}
    received: list[dict[str, Any]] = []
    runner = StromaRunner.quick().with_context(context)

    @runner.node("writer", input=Num, output=Num)
    async def writer(state: Num, ctx: dict[str, Any]) -> dict[str, int]:
        received.append(ctx)
        ctx["written"] = state.value
        return {"value": state.value + 1}

    @runner.node("reader", input=Num, output=Num)
    async def reader(state: Num, ctx: dict[str, Any]) -> dict[str, int]:
        received.append(ctx)
        return {"value": ctx["written"] * 100}

    result = await runner.run([writer, reader], Num(value=3))

    assert result.final_state == Num(value=300)
    assert len(received) == 2
    assert all(ctx is context for ctx in received)
    assert context["written"] == 3


# --------------------------------------------------------------------- cost, usage


async def test_model_fallback_switches_and_prices_with_the_fallback(anyio_backend: str) -> None:
    """Below ``at_budget_pct`` of the cost budget ``_stroma_model`` is absent; at or above it
    nodes get the fallback model, and their usage is priced with it."""
    context: dict[str, Any] = {"model": "gpt-4o"}
    seen: list[str | None] = []
    runner = (
        StromaRunner.quick()
        .with_budget(cost_usd=1.0)
        .with_model_fallback("gpt-4o", to="gpt-4o-mini", at_budget_pct=0.5)
        .with_context(context)
    )

    def spend(node_id: str, tokens: int) -> Any:
        @runner.node(node_id, input=Num, output=Num)
        async def node(state: Num, ctx: dict[str, Any]) -> tuple[dict[str, int], int, str]:
            seen.append(ctx.get("_stroma_model", "<absent>"))
            return {"value": state.value + 1}, tokens, ctx["model"]

        return node

    nodes = [spend("one", 100_000), spend("two", 120_000), spend("three", 100_000)]
    result = await runner.run(nodes, Num(value=0))

    assert result.status is RunStatus.COMPLETED
    assert seen == ["<absent>", "<absent>", "gpt-4o-mini"]
    gpt4o_in = KNOWN_MODELS["gpt-4o"][0] / 1_000_000
    mini_in = KNOWN_MODELS["gpt-4o-mini"][0] / 1_000_000
    assert result.total_cost_usd == pytest.approx(220_000 * gpt4o_in + 100_000 * mini_in)
    assert result.total_tokens == 320_000


@pytest.mark.parametrize(
    ("returned", "tokens", "cost"),
    [
        ({"value": 1}, 0, 0.0),
        (({"value": 1}, 500), 500, 0.0),
        (({"value": 1}, 1000, "gpt-4o"), 1000, 1000 * 2.50 / 1e6),
        (({"value": 1}, 1000, 500, "claude-sonnet-4-6"), 1500, (1000 * 3.0 + 500 * 15.0) / 1e6),
        (({"value": 1}, 2000, 0, "no-such-model"), 2000, 0.0),
    ],
    ids=["dict", "dict_tokens", "dict_in_model", "dict_in_out_model", "unknown_model"],
)
async def test_usage_return_forms_give_tokens_and_cost(
    anyio_backend: str, returned: Any, tokens: int, cost: float
) -> None:
    """Each usage form of API.md counts its tokens and is priced from KNOWN_MODELS."""
    runner = StromaRunner.quick()

    @runner.node("llm", input=Num, output=Num)
    async def llm(state: Num) -> Any:
        return returned

    result = await runner.run([llm], Num(value=0))

    assert result.status is RunStatus.COMPLETED
    assert result.final_state == Num(value=1)
    assert result.total_tokens == tokens
    assert result.total_cost_usd == pytest.approx(cost)


async def test_two_runs_of_one_runner_share_no_totals_or_trace(anyio_backend: str) -> None:
    """Each run of the same runner has its own run id, totals and trace."""
    runner = StromaRunner.quick()

    @runner.node("llm", input=Num, output=Num)
    async def llm(state: Num) -> tuple[dict[str, int], int, str]:
        return {"value": state.value + 1}, 1000, "gpt-4o"

    first = await runner.run([llm], Num(value=0))
    second = await runner.run([llm], Num(value=0))

    assert first.run_id != second.run_id
    assert (first.total_tokens, second.total_tokens) == (1000, 1000)
    assert first.total_cost_usd == second.total_cost_usd == pytest.approx(0.0025)
    assert len(first.trace) == len(second.trace) == 1
    assert first.trace.events[0].run_id == first.run_id
    assert second.trace.events[0].run_id == second.run_id


# ------------------------------------------------------------------------ parallel


async def test_parallel_is_one_step_merging_outputs_and_summing_tokens(anyio_backend: str) -> None:
    """``parallel(a, b)`` is one trace event ``parallel(a, b)`` whose output merges the
    children's (the later child wins a key) and whose tokens are the children's sum."""
    runner = StromaRunner.quick()
    context: dict[str, Any] = {}
    runner.with_context(context)
    got_context: list[Any] = []

    @runner.node("a", input=Num, output=Shared)
    async def a(state: Num) -> tuple[dict[str, Any], int]:
        return {"left": state.value, "shared": "from a"}, 10

    @runner.node("b", input=Num, output=Shared2)
    async def b(state: Num, ctx: dict[str, Any]) -> tuple[dict[str, Any], int]:
        got_context.append(ctx)
        return {"right": state.value * 2, "shared": "from b"}, 20

    result = await runner.run([parallel(a, b)], Num(value=5))

    assert result.status is RunStatus.COMPLETED
    [event] = result.trace.events
    assert event.node_id == "parallel(a, b)"
    assert event.output_state == {"left": 5, "shared": "from b", "right": 10}
    assert result.final_state.model_dump() == {"left": 5, "shared": "from b", "right": 10}
    assert result.total_tokens == 30
    assert got_context == [context] and got_context[0] is context


async def test_parallel_child_failure_cancels_its_siblings(anyio_backend: str) -> None:
    """When one child fails, a sibling still running is cancelled (it sees the cancellation)."""
    runner = StromaRunner.quick(policy_map=no_backoff(0))
    waiting = anyio.Event()
    sibling_saw: list[str] = []

    @runner.node("fails", input=Num, output=Pair)
    async def fails(state: Num) -> dict[str, int]:
        await waiting.wait()
        raise RuntimeError("child down")

    @runner.node("waits", input=Num, output=Other)
    async def waits(state: Num) -> dict[str, int]:
        waiting.set()
        try:
            await anyio.Event().wait()
        except anyio.get_cancelled_exc_class():
            sibling_saw.append("cancelled")
            raise
        sibling_saw.append("finished")
        return {"right": 1}

    result = await runner.run([parallel(fails, waits)], Num(value=1))

    assert result.status is RunStatus.PARTIAL
    assert sibling_saw == ["cancelled"]
    [event] = result.trace.events
    assert event.node_id == "parallel(fails, waits)"
    assert "child down" in (event.failure_message or "")


async def test_parallel_validates_each_child_against_its_contract(anyio_backend: str) -> None:
    """A child whose output breaks its own contract fails the group with a violation naming it."""
    runner = StromaRunner.quick(policy_map=no_backoff(2))

    @runner.node("good", input=Num, output=Pair)
    async def good(state: Num) -> dict[str, int]:
        return {"left": 1}

    @runner.node("liar", input=Num, output=Other)
    async def liar(state: Num) -> dict[str, Any]:
        return {"right": "not an int"}

    result = await runner.run([parallel(good, liar)], Num(value=1))

    assert result.status is RunStatus.FAILED
    [event] = result.trace.events
    assert event.failure is FailureClass.TERMINAL
    assert "Contract violation for 'liar' (output)" in (event.failure_message or "")


# --------------------------------------------------------------------- classifiers


async def test_classifiers_run_in_order_and_the_first_answer_wins(anyio_backend: str) -> None:
    """Custom classifiers are asked in list order; the first non-None answer is used and
    later ones are not asked."""
    asked: list[str] = []

    def defer(exc: Exception, ctx: NodeContext) -> FailureClass | None:
        asked.append("defer")
        return None

    def terminal(exc: Exception, ctx: NodeContext) -> FailureClass | None:
        asked.append("terminal")
        return FailureClass.TERMINAL

    def recoverable(exc: Exception, ctx: NodeContext) -> FailureClass | None:
        asked.append("recoverable")
        return FailureClass.RECOVERABLE

    runner = StromaRunner.quick(
        policy_map=no_backoff(3), classifiers=[defer, terminal, recoverable]
    )
    calls: list[int] = []
    node = always_raise(runner, "n", RuntimeError("x"), calls)

    result = await runner.run([node], Num(value=1))

    assert result.status is RunStatus.FAILED
    assert asked == ["defer", "terminal"]
    assert calls == [1]


async def test_classifier_sees_a_one_based_attempt(anyio_backend: str) -> None:
    """``NodeContext.attempt`` counts from 1 and ``node_id``/``run_id`` name the attempt."""
    contexts: list[NodeContext] = []

    def record(exc: Exception, ctx: NodeContext) -> FailureClass | None:
        contexts.append(ctx)
        return None

    runner = StromaRunner.quick(run_id="ctx-run", policy_map=no_backoff(2), classifiers=[record])
    calls: list[int] = []
    node = always_raise(runner, "n", RuntimeError("x"), calls)

    await runner.run([node], Num(value=1))

    assert [c.attempt for c in contexts] == [1, 2, 3]
    assert {(c.node_id, c.run_id) for c in contexts} == {("n", "ctx-run")}


async def test_a_raising_classifier_is_skipped(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A classifier that raises is skipped (with a warning) and the next one decides."""
    caplog.set_level(logging.WARNING, logger="stroma")

    def broken(exc: Exception, ctx: NodeContext) -> FailureClass | None:
        raise KeyError("classifier bug")

    def terminal(exc: Exception, ctx: NodeContext) -> FailureClass | None:
        return FailureClass.TERMINAL

    runner = StromaRunner.quick(
        run_id="skip-run", policy_map=no_backoff(3), classifiers=[broken, terminal]
    )
    calls: list[int] = []
    node = always_raise(runner, "n", RuntimeError("x"), calls)

    result = await runner.run([node], Num(value=1))

    assert result.status is RunStatus.FAILED
    assert calls == [1]
    messages = [r.getMessage() for r in caplog.records]
    assert any("broken" in m and "skip-run" in m for m in messages)


async def test_a_classifier_answering_nonsense_is_skipped(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A classifier returning something that is not a FailureClass (or None) is skipped with
    a warning naming it and the value, and the next classifier decides."""
    caplog.set_level(logging.WARNING, logger="stroma")

    def sloppy(exc: Exception, ctx: NodeContext) -> Any:
        return "retry please"

    def terminal(exc: Exception, ctx: NodeContext) -> FailureClass | None:
        return FailureClass.TERMINAL

    runner = StromaRunner.quick(
        run_id="sloppy-run", policy_map=no_backoff(3), classifiers=[sloppy, terminal]
    )
    calls: list[int] = []
    node = always_raise(runner, "n", RuntimeError("x"), calls)

    result = await runner.run([node], Num(value=1))

    assert result.status is RunStatus.FAILED
    assert calls == [1]
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        "sloppy" in m and "retry please" in m and "sloppy-run" in m for m in messages
    ), messages


async def test_a_classifier_may_answer_with_the_class_name(anyio_backend: str) -> None:
    """A classifier answering with a class's string value (``"TERMINAL"``) is understood."""
    runner = StromaRunner.quick(
        policy_map=no_backoff(3), classifiers=[lambda exc, ctx: "TERMINAL"]
    )
    calls: list[int] = []
    node = always_raise(runner, "n", RuntimeError("x"), calls)

    result = await runner.run([node], Num(value=1))

    assert result.status is RunStatus.FAILED
    assert calls == [1]


async def test_a_pipeline_given_as_a_generator_runs_every_node_once(anyio_backend: str) -> None:
    """``runner.run`` of a generator or an iterator (read once) runs the nodes it yields, in
    order, as a list of them does; so does ``interpret``."""
    runner = StromaRunner.quick()
    calls: list[str] = []
    a, b = add_one(runner, "a", calls), add_one(runner, "b", calls)

    # (the generator first: the runner caches the plan of a pipeline it compiled)
    generated = await runner.run((node for node in [a, b]), Num(value=1))
    iterated = await interpret(iter([a, b]), Num(value=1), registry=runner.registry)
    listed = await runner.run([a, b], Num(value=1))

    for result in (generated, iterated):
        assert result.status is RunStatus.COMPLETED
        assert result.final_state == listed.final_state == Num(value=3)
        assert [e.node_id for e in result.trace] == ["a", "b"]
    assert calls == ["a", "b"] * 3


class _Tool:
    """A tool with an async method taking the context, and slots (no ``__dict__``)."""

    __slots__ = ("step",)

    def __init__(self, step: int) -> None:
        self.step = step

    async def add(self, state: Num, ctx: dict[str, Any]) -> dict[str, int]:
        return {"value": state.value + self.step + ctx["bonus"]}

    async def __call__(self, state: Num) -> dict[str, int]:
        return {"value": state.value * self.step}


async def test_a_bound_method_or_a_slotted_callable_can_be_a_node(anyio_backend: str) -> None:
    """``stroma_node`` / ``runner.node`` on a callable that cannot carry attributes (a bound
    method, an object with ``__slots__``) mark a function calling it, with its signature:
    it runs as a node, and gets the context when it takes one."""
    runner = StromaRunner.quick(context={"bonus": 100})
    tool = _Tool(3)
    add = runner.node("add", input=Num, output=Num)(tool.add)
    times = runner.node("times", input=Num, output=Num)(tool)
    assert add._stroma_node_id == "add" and times._stroma_node_id == "times"

    result = await runner.run([add, times], Num(value=1))

    assert result.status is RunStatus.COMPLETED
    assert result.final_state == Num(value=(1 + 3 + 100) * 3)
    assert [e.node_id for e in result.trace] == ["add", "times"]
