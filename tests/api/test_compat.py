"""Code written for stroma 0.3.x runs unchanged: the earlier library's behaviour that issue 9
lists (items 2-10 and 20), each pinned here.

Every run goes through the real engine on asyncio and on trio (the ``anyio_backend``
fixture of tests/conftest.py); nothing sleeps.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import textwrap
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from packaging.version import Version
from pydantic import BaseModel

import stroma
from stroma import (
    AsyncInMemoryStore,
    CheckpointKey,
    ChildFailed,
    ChildFailedTerminally,
    ContractRegistry,
    ContractViolation,
    CostTracker,
    ExecutionTrace,
    FailureClass,
    InMemoryStore,
    NodeContract,
    NodeUsage,
    ReliabilityContext,
    RunConfig,
    RunStatus,
    StromaError,
    StromaRunner,
    StromaStep,
    TraceEvent,
    execute_step,
    parallel,
    seq,
    stroma_node,
    stroma_step,
)
from stroma.checkpoint import _resolve_schema
from stroma.middleware import UnvalidatedOutput

ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


class In(BaseModel):
    value: int


class Out(BaseModel):
    result: int = 0
    other: int = 0


class Point(BaseModel):
    x: int
    label: str = "origin"


class Located(BaseModel):
    where: Point
    seen_at: datetime


# ---------------------------------------------------------------- 2: a group alone


def _pair(runner: StromaRunner, calls: list[str] | None = None) -> tuple[Any, Any]:
    @runner.node("a", input=In, output=Out)
    async def a(state: In) -> tuple[dict[str, int], int, str]:
        if calls is not None:
            calls.append("a")
        return {"result": state.value * 10}, 120, "gpt-4o"  # usage: not in the merged dict

    @runner.node("b", input=In, output=Out)
    async def b(state: In) -> dict[str, int]:
        if calls is not None:
            calls.append("b")
        return {"other": state.value + 5}

    return a, b


@pytest.mark.anyio
async def test_a_parallel_group_awaited_alone_returns_the_merged_dict(anyio_backend: str) -> None:
    """``await parallel(a, b)(state)`` runs both children on ``state`` and returns a plain dict
    of what they returned (no usage tuple, no schema defaults)."""
    runner = StromaRunner.quick()
    calls: list[str] = []
    a, b = _pair(runner, calls)

    merged = await parallel(a, b)(In(value=1))

    assert type(merged) is dict
    assert merged == {"result": 10, "other": 6}
    assert sorted(calls) == ["a", "b"]


@pytest.mark.anyio
async def test_a_later_child_wins_a_key_it_returned(anyio_backend: str) -> None:
    """When two children return the same key, the later one in argument order wins it, and
    a key only one returned keeps that child's value."""
    runner = StromaRunner.quick()

    @runner.node("first", input=In, output=Out)
    async def first(state: In) -> dict[str, int]:
        return {"result": 1, "other": 1}

    @runner.node("second", input=In, output=Out)
    async def second(state: In) -> dict[str, int]:
        return {"result": 2}

    assert await parallel(first, second)(In(value=0)) == {"result": 2, "other": 1}
    assert await parallel(second, first)(In(value=0)) == {"result": 1, "other": 1}


@pytest.mark.anyio
async def test_a_group_alone_gives_nested_models_as_plain_data_and_passes_the_context(
    anyio_backend: str,
) -> None:
    """Nested models in the merged output are plain dicts (their defaults included), and
    children that take a context get the one passed."""
    runner = StromaRunner.quick()
    seen: list[Any] = []

    @runner.node("locate", input=In, output=Located)
    async def locate(state: In, ctx: dict[str, Any]) -> dict[str, Any]:
        seen.append(ctx)
        return {"where": Point(x=state.value), "seen_at": T0}

    @runner.node("count", input=In, output=Out)
    async def count(state: In) -> dict[str, int]:
        return {"other": 2}

    context = {"http": object()}
    merged = await parallel(locate, count)(In(value=3), context)

    assert merged == {"where": {"x": 3, "label": "origin"}, "seen_at": T0, "other": 2}
    assert seen == [context] and seen[0] is context


@pytest.mark.anyio
async def test_a_group_alone_runs_once_and_a_failing_child_raises_child_failed(
    anyio_backend: str,
) -> None:
    """A child that raises is called once (no retries) and the group raises ChildFailed, a
    StromaError naming the child and the failure, chained to the child's own exception."""
    runner = StromaRunner.quick()
    a, _ = _pair(runner)
    calls: list[str] = []
    boom = ConnectionError("document API down")

    @runner.node("fetch", input=In, output=Out)
    async def fetch(state: In) -> dict[str, int]:
        calls.append("fetch")
        raise boom

    with pytest.raises(ChildFailed) as info:
        await parallel(a, fetch)(In(value=1))

    assert isinstance(info.value, StromaError)
    assert not isinstance(info.value, ChildFailedTerminally)
    message = str(info.value)
    assert message.startswith("parallel(a, fetch): child 'fetch' failed (AMBIGUOUS)")
    assert "document API down" in message
    assert info.value.__cause__ is boom
    assert calls == ["fetch"]


@pytest.mark.anyio
async def test_a_child_breaking_its_contract_raises_child_failed_terminally(
    anyio_backend: str,
) -> None:
    """A child whose output breaks its contract makes the group raise ChildFailedTerminally
    naming the child, chained to the ContractViolation."""
    runner = StromaRunner.quick()
    a, _ = _pair(runner)

    @runner.node("bad", input=In, output=Out)
    async def bad(state: In) -> dict[str, str]:
        return {"other": "not a number"}

    with pytest.raises(ChildFailedTerminally) as info:
        await parallel(a, bad)(In(value=1))

    assert "child 'bad' failed (TERMINAL)" in str(info.value)
    assert "Contract violation for 'bad' (output)" in str(info.value)
    cause = info.value.__cause__
    assert isinstance(cause, ContractViolation) and cause.node_id == "bad"


@pytest.mark.anyio
async def test_a_failing_sub_plan_child_is_named_by_its_steps(anyio_backend: str) -> None:
    """A child that is a whole plan and fails is named ``seq(...)``, chained to the exception
    its node raised."""
    runner = StromaRunner.quick()
    a, b = _pair(runner)

    @runner.node("deep", input=Out, output=Out)
    async def deep(state: Out) -> dict[str, int]:
        raise KeyError("missing page")

    with pytest.raises(ChildFailed) as info:
        await parallel(a, seq(b, deep))(In(value=1))

    assert "child 'seq(b, deep)' failed" in str(info.value)
    assert "missing page" in str(info.value)
    assert isinstance(info.value.__cause__, KeyError)


@pytest.mark.anyio
async def test_a_group_alone_refuses_a_state_that_is_not_a_model(anyio_backend: str) -> None:
    """Awaiting a group on a dict is a TypeError naming the group and the model to build."""
    runner = StromaRunner.quick()
    a, b = _pair(runner)
    with pytest.raises(TypeError, match=r"parallel\(a, b\)\(state\): state must be a pydantic "
                       r"BaseModel instance.*e\.g\. In\(\.\.\.\)"):
        await parallel(a, b)({"value": 1})  # type: ignore[arg-type]


# --------------------------------------------------------------- 3: to_json text


@pytest.mark.anyio
async def test_to_json_of_a_run_is_text_of_one_object_per_attempt(anyio_backend: str) -> None:
    """``trace.to_json()`` is a str that decodes to one dict per attempt, models inside states
    in their JSON form and datetimes as ISO strings."""
    runner = StromaRunner.quick(policy_map={
        c: stroma.FailurePolicy(max_retries=1, backoff_seconds=0) for c in FailureClass
    })
    attempts: list[int] = []

    @runner.node("locate", input=In, output=Located)
    async def locate(state: In) -> dict[str, Any]:
        attempts.append(1)
        if len(attempts) == 1:
            raise TimeoutError("slow")
        return {"where": Point(x=state.value), "seen_at": T0}

    result = await runner.run([locate], In(value=4))
    text = result.trace.to_json()

    assert isinstance(text, str)
    decoded = json.loads(text)
    assert [(d["node_id"], d["attempt"], d["failure"]) for d in decoded] == [
        ("locate", 1, "RECOVERABLE"), ("locate", 2, None)
    ]
    assert decoded[1]["output_state"] == {
        "where": {"x": 4, "label": "origin"}, "seen_at": "2024-05-01T12:00:00Z"
    }
    assert decoded[0]["output_state"] is None and decoded[0]["failure_message"] == "slow"
    for d, event in zip(decoded, result.trace, strict=True):
        assert datetime.fromisoformat(d["timestamp_utc"]) == event.timestamp_utc


def test_to_json_of_an_empty_trace_is_an_empty_list() -> None:
    """An empty trace gives the JSON text of an empty list."""
    assert json.loads(ExecutionTrace().to_json()) == []


# ------------------------------------------------------------------- 4: diff words


def _event(node: str, attempt: int = 1, output: dict[str, Any] | None = None,
           failure: FailureClass | None = None, at: datetime = T0,
           duration_ms: int = 5) -> TraceEvent:
    return TraceEvent(node, "run", attempt, at, {"value": 1}, output, duration_ms, failure,
                      None if failure is None else "failed")


def test_diff_speaks_the_earlier_words_in_sorted_key_order() -> None:
    """diff lines are ``Missing event in other trace``, ``Extra event in other trace`` and
    ``Difference for``, ordered by (node id, attempt) whatever the events' order."""
    mine = ExecutionTrace([
        _event("zeta", 1, {"y": 1}), _event("alpha", 2, {"y": 2}), _event("alpha", 1, None,
                                                                          FailureClass.AMBIGUOUS),
    ])
    theirs = ExecutionTrace([
        _event("beta", 1, {"y": 0}), _event("alpha", 1, None, FailureClass.AMBIGUOUS),
        _event("zeta", 1, {"y": 9}),
    ])
    assert mine.diff(theirs) == [
        "Missing event in other trace: alpha attempt 2",
        "Extra event in other trace: beta attempt 1",
        "Difference for zeta attempt 1: output_state: {'y': 1} != {'y': 9}",
    ]


def test_diff_ignores_timestamps_and_durations_and_counts_occurrences() -> None:
    """Events differing only in timestamp and duration are equivalent; a node that ran twice
    with the same attempt number is matched occurrence by occurrence."""
    mine = ExecutionTrace([_event("n", 1, {"y": 1}), _event("n", 1, {"y": 2})])
    later = ExecutionTrace([
        _event("n", 1, {"y": 1}, at=datetime(2030, 1, 1, tzinfo=UTC), duration_ms=999),
        _event("n", 1, {"y": 2}, duration_ms=0),
    ])
    assert mine.diff(later) == []
    once = ExecutionTrace([_event("n", 1, {"y": 1})])
    assert mine.diff(once) == ["Missing event in other trace: n attempt 1 (occurrence 2)"]
    assert once.diff(mine) == ["Extra event in other trace: n attempt 1 (occurrence 2)"]


def test_diff_lists_every_changed_field_of_an_event_on_one_line() -> None:
    """A changed event is one ``Difference for`` line naming each field that differs."""
    ok = ExecutionTrace([_event("n", 1, {"y": 1})])
    failed = ExecutionTrace([_event("n", 1, None, FailureClass.TERMINAL)])
    assert ok.diff(failed) == [
        "Difference for n attempt 1: output_state: {'y': 1} != None; failure: None != "
        "<FailureClass.TERMINAL: 'TERMINAL'>; failure_message: None != 'failed'"
    ]


# ----------------------------------------------------------------- 5: cost summary


def test_summary_is_node_usage_by_node_id() -> None:
    """``summary()`` maps each node id to its records summed (tokens, cost, latency, output
    tokens) with the latest model that was not None; the values are copies."""
    tracker = CostTracker()
    tracker.record(NodeUsage("llm", 100, 0.25, 10.0, model="gpt-4o", output_tokens=40))
    tracker.record(NodeUsage("tool", 0, 0.0, 3.0))
    tracker.record(NodeUsage("llm", 50, 0.5, 5.0, model="gpt-4o-mini", output_tokens=10))
    tracker.record(NodeUsage("llm", 7, 0.0, 1.0, model=None, output_tokens=2))

    summary = tracker.summary()

    assert list(summary) == ["llm", "tool"]
    assert summary["llm"] == NodeUsage("llm", 157, 0.75, 16.0, "gpt-4o-mini", 52)
    assert summary["tool"] == NodeUsage("tool", 0, 0.0, 3.0)
    summary["llm"].tokens_used = 0
    assert tracker.summary()["llm"].tokens_used == 157


@pytest.mark.anyio
async def test_summary_of_a_context_after_steps_has_each_steps_usage(anyio_backend: str) -> None:
    """After ``execute_step`` calls, the context's tracker summary holds each step's usage."""
    ctx = ReliabilityContext.for_run()
    contract = NodeContract(node_id="llm", input_schema=In, output_schema=In)

    async def llm(state: In) -> tuple[dict[str, int], int, int, str]:
        return {"value": state.value}, 1000, 200, "gpt-4o"

    await execute_step("llm", llm, In(value=1), ctx, contract=contract)
    await execute_step("llm", llm, In(value=1), ctx, contract=contract)

    usage = ctx.cost_tracker.summary()["llm"]
    assert isinstance(usage, NodeUsage)
    assert usage.tokens_used == 2400
    assert usage.cost_usd == pytest.approx(2 * (1000 * 2.50 + 200 * 10.00) / 1e6)


# ----------------------------------------------------------------- 6: CheckpointKey


def test_checkpoint_key_is_a_named_tuple_of_run_and_node() -> None:
    """CheckpointKey is a NamedTuple ``(run_id, node_id)``, from stroma and stroma.checkpoint."""
    key = CheckpointKey("run-1", "fetch")
    assert isinstance(key, tuple) and issubclass(CheckpointKey, tuple)
    assert CheckpointKey._fields == ("run_id", "node_id")
    assert (key.run_id, key.node_id) == key == ("run-1", "fetch")
    assert CheckpointKey(run_id="r", node_id="n") == ("r", "n")
    assert stroma.checkpoint.CheckpointKey is CheckpointKey
    assert {key: 1}[("run-1", "fetch")] == 1


# ------------------------------------------------------------ 7: marker attributes


def test_runner_node_and_stroma_node_carry_the_earlier_marker_attributes() -> None:
    """Functions decorated by ``runner.node``, ``stroma_node`` or ``stroma_step`` carry
    ``_stroma_node_id`` and ``_stroma_contract`` (the contract object itself), and the
    internal ``__stroma_node__`` marker."""
    runner = StromaRunner.quick()

    @runner.node("double", input=In, output=In)
    async def double(state: In) -> dict[str, int]:
        return {"value": state.value * 2}

    contract = NodeContract(node_id="triple", input_schema=In, output_schema=In)

    @stroma_node("triple", contract)
    async def triple(state: In) -> dict[str, int]:
        return {"value": state.value * 3}

    @stroma_step("bare")
    async def bare(state: In) -> dict[str, int]:
        return {"value": state.value}

    assert double._stroma_node_id == "double"  # type: ignore[attr-defined]
    assert double._stroma_contract is runner.registry.get("double")  # type: ignore[attr-defined]
    assert triple._stroma_node_id == "triple"  # type: ignore[attr-defined]
    assert triple._stroma_contract is contract  # type: ignore[attr-defined]
    assert bare._stroma_node_id == "bare"  # type: ignore[attr-defined]
    assert bare._stroma_contract is None  # type: ignore[attr-defined]
    for fn in (double, triple, bare):
        assert hasattr(fn, "__stroma_node__")


@pytest.mark.anyio
async def test_stroma_step_wrap_carries_the_marker_attributes(anyio_backend: str) -> None:
    """``StromaStep.wrap`` (and its decorator form) returns a function carrying
    ``_stroma_node_id`` and ``_stroma_contract``; the wrapper is not itself a pipeline node."""
    registry = ContractRegistry()
    registered = NodeContract(node_id="known", input_schema=In, output_schema=In)
    registry.register(registered)
    step = StromaStep(ReliabilityContext.for_run(RunConfig(), registry))
    given = NodeContract(node_id="given", input_schema=In, output_schema=In)

    async def inc(state: In) -> dict[str, int]:
        return {"value": state.value + 1}

    wrapped = step.wrap("given", inc, contract=given)
    from_registry = step.wrap("known", inc)
    unvalidated = step.wrap("free", inc)

    @step("decorated", input=In, output=In)
    async def decorated(state: In) -> dict[str, int]:
        return {"value": 0}

    assert (wrapped._stroma_node_id, wrapped._stroma_contract) == ("given", given)  # type: ignore[attr-defined]
    assert wrapped._stroma_contract is given  # type: ignore[attr-defined]
    assert from_registry._stroma_contract is registered  # type: ignore[attr-defined]
    assert unvalidated._stroma_contract is None  # type: ignore[attr-defined]
    assert decorated._stroma_node_id == "decorated"  # type: ignore[attr-defined]
    assert decorated._stroma_contract is registry.get("decorated")  # type: ignore[attr-defined]
    assert not hasattr(wrapped, "__stroma_node__")
    assert (await wrapped(In(value=1))).final_state == In(value=2)


@pytest.mark.anyio
async def test_wrapping_a_node_does_not_make_the_wrapper_a_node(anyio_backend: str) -> None:
    """Wrapping a ``runner.node`` function keeps the wrapper out of pipelines: its result is
    an ExecutionResult, and the node itself still runs in a pipeline."""
    runner = StromaRunner.quick()

    @runner.node("inc", input=In, output=In)
    async def inc(state: In) -> dict[str, int]:
        return {"value": state.value + 1}

    wrapped = StromaStep(ReliabilityContext.for_run()).wrap("inc", inc)
    assert not hasattr(wrapped, "__stroma_node__") and wrapped._stroma_node_id == "inc"  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match="is not a stroma node"):
        await runner.run([wrapped], In(value=1))
    assert (await runner.run([inc], In(value=1))).final_state == In(value=2)


# ------------------------------------------------- 8: execute_step without contract


@pytest.mark.anyio
async def test_execute_step_without_a_contract_runs_unvalidated(anyio_backend: str) -> None:
    """With no contract passed or registered, ``execute_step`` runs the function and returns
    COMPLETED with its output as the final state: a model of the input's type when the
    output fits it, else the output as it came (nothing validated)."""
    ctx = ReliabilityContext.for_run()
    calls: list[int] = []

    async def inc(state: In) -> dict[str, int]:
        calls.append(state.value)
        return {"value": state.value + 1}

    async def other_shape(state: In) -> dict[str, Any]:
        return {"value": "not a number", "note": [1, 2]}

    fits = await execute_step("inc", inc, In(value=1), ctx)
    loose = await execute_step("shape", other_shape, In(value=1), ctx)

    assert (fits.status, fits.final_state) == (RunStatus.COMPLETED, In(value=2))
    assert type(fits.final_state) is In
    assert loose.status is RunStatus.COMPLETED
    assert isinstance(loose.final_state, UnvalidatedOutput)
    assert loose.final_state.model_dump() == {"value": "not a number", "note": [1, 2]}
    assert calls == [1]
    assert [e.node_id for e in ctx.trace] == ["inc", "shape"]


@pytest.mark.anyio
async def test_execute_step_without_a_contract_keeps_a_returned_model_and_its_usage(
    anyio_backend: str,
) -> None:
    """An unvalidated step returning a model (with usage) ends with that model, and its
    tokens count; a step taking a context gets the run's context."""
    ctx = ReliabilityContext.for_run(RunConfig(context={"unit": "km"}))

    async def locate(state: In, context: dict[str, Any]) -> tuple[Point, int, int, str]:
        return Point(x=state.value, label=context["unit"]), 10, 5, "gpt-4o"

    result = await execute_step("locate", locate, In(value=7), ctx)

    assert result.status is RunStatus.COMPLETED
    assert result.final_state == Point(x=7, label="km") and type(result.final_state) is Point
    assert result.total_tokens == 15
    assert ctx.cost_tracker.summary()["locate"].tokens_used == 15


@pytest.mark.anyio
async def test_execute_step_without_a_contract_still_retries_failures(anyio_backend: str) -> None:
    """An unvalidated step keeps the rest of the reliability loop: a failure is classified
    and retried by the context's policies."""
    ctx = ReliabilityContext.for_run(RunConfig(policy_map={
        c: stroma.FailurePolicy(max_retries=2, backoff_seconds=0) for c in FailureClass
    }))
    attempts: list[int] = []

    async def flaky(state: In) -> dict[str, int]:
        attempts.append(1)
        if len(attempts) < 3:
            raise TimeoutError("again")
        return {"value": 9}

    result = await execute_step("flaky", flaky, In(value=0), ctx)

    assert (result.status, result.final_state) == (RunStatus.COMPLETED, In(value=9))
    assert [e.failure for e in result.trace] == [
        FailureClass.RECOVERABLE, FailureClass.RECOVERABLE, None
    ]


# -------------------------------------------------------------- 9: optional extras

# A meta-path finder refusing the optional extras, installed before stroma is imported,
# as in an environment where they were never installed.
_BLOCK_EXTRAS = textwrap.dedent('''
    import sys

    class _NoExtras:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("redis", "asyncpg"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, _NoExtras())
''')


def _without_extras(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _BLOCK_EXTRAS + textwrap.dedent(code)], cwd=ROOT,
        capture_output=True, text=True, timeout=60,
    )


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_stroma_imports_and_runs_without_redis_or_asyncpg(backend: str) -> None:
    """``import stroma`` (every lazy store name included) needs neither redis nor asyncpg,
    and a FileStore run works without them, on asyncio and on trio."""
    out = _without_extras(f"BACKEND = {backend!r}\n" + textwrap.dedent('''
        import sys, tempfile
        import anyio
        import stroma
        from stroma import FileStore, PostgresStore, RedisStore, SyncRedisStore
        from stroma.checkpoint import RedisStore as R2
        from pydantic import BaseModel
        assert R2 is RedisStore
        assert "redis" not in sys.modules and "asyncpg" not in sys.modules

        class N(BaseModel):
            value: int

        runner = stroma.StromaRunner.quick()

        @runner.node("inc", input=N, output=N)
        async def inc(s: N) -> dict:
            return {"value": s.value + 1}

        with tempfile.TemporaryDirectory() as folder:
            result = anyio.run(
                lambda: stroma.interpret([inc], N(value=1), store=FileStore(folder)),
                backend=BACKEND,
            )
        print(result.status, result.final_state)
    '''))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "COMPLETED value=2"


def test_with_redis_without_redis_says_redis_is_required_and_how_to_install() -> None:
    """Without the redis package, ``runner.with_redis(url)`` raises ImportError starting
    ``redis is required`` that says ``pip install 'stroma[redis]'``."""
    out = _without_extras('''
        import stroma
        try:
            stroma.StromaRunner.quick().with_redis("redis://localhost:6379")
        except ImportError as e:
            print(e)
    ''')
    assert out.returncode == 0, out.stderr
    message = out.stdout.strip()
    assert message.startswith("redis is required")
    assert "pip install 'stroma[redis]'" in message


@pytest.mark.parametrize("cls_name", ["RedisStore", "SyncRedisStore"])
def test_constructing_a_redis_store_without_redis_says_how_to_install(cls_name: str) -> None:
    """Without the redis package, importing a Redis store works and constructing one raises
    ImportError naming the store and ``pip install 'stroma[redis]'``."""
    out = _without_extras(f'''
        from stroma import {cls_name}
        try:
            {cls_name}("redis://localhost:6379")
        except ImportError as e:
            print(e)
    ''')
    assert out.returncode == 0, out.stderr
    assert cls_name in out.stdout and "pip install 'stroma[redis]'" in out.stdout


@pytest.mark.parametrize("cls_name", ["RedisStore", "SyncRedisStore"])
def test_a_redis_store_without_redis_says_redis_is_required_for_it(cls_name: str) -> None:
    """The ImportError of a Redis store built without redis starts ``redis is required for
    <the class>`` (the earlier library's words)."""
    out = _without_extras(f'''
        from stroma import {cls_name}
        try:
            {cls_name}("redis://localhost:6379")
        except ImportError as e:
            print(e)
    ''')
    assert out.stdout.startswith(f"redis is required for {cls_name}"), out.stdout


def test_constructing_a_postgres_store_without_asyncpg_says_how_to_install() -> None:
    """Without asyncpg, constructing a PostgresStore raises ImportError with the pip command."""
    out = _without_extras('''
        from stroma import PostgresStore
        try:
            PostgresStore("postgresql://postgres@127.0.0.1:5432/test")
        except ImportError as e:
            print(e)
    ''')
    assert out.returncode == 0, out.stderr
    assert "pip install 'stroma[postgres]'" in out.stdout


# ------------------------------------------------------------ 10: schema errors


@pytest.mark.anyio
@pytest.mark.parametrize("bad", [dict, "In", None, In(value=1)], ids=repr)
async def test_save_typed_refuses_a_schema_that_is_not_a_model_class(
    anyio_backend: str, bad: Any
) -> None:
    """``save_typed`` with a schema that is not a BaseModel class is a TypeError saying
    ``schema must be a BaseModel type``, and nothing is saved."""
    sync_store = InMemoryStore()
    with pytest.raises(TypeError, match="schema must be a BaseModel type"):
        sync_store.save_typed("r", "n", In(value=1), bad)
    async_store = AsyncInMemoryStore()
    with pytest.raises(TypeError, match="schema must be a BaseModel type"):
        await async_store.save_typed("r", "n", In(value=1), bad)
    assert sync_store.load("r", "n") is None and await async_store.load("r", "n") is None

    sync_store.save_typed("r", "n", In(value=1), In)
    assert sync_store.load_typed("r", "n", In) == In(value=1)


def test_resolve_schema_of_a_class_that_is_not_a_model_says_so() -> None:
    """``_resolve_schema("builtins:dict")`` raises TypeError containing ``resolved schema is
    not a BaseModel``, naming the reference."""
    with pytest.raises(TypeError, match="resolved schema is not a BaseModel") as info:
        _resolve_schema("builtins:dict")
    assert "'builtins:dict'" in str(info.value)


# ------------------------------------------------------------------ 20: version


def test_the_version_sorts_after_the_earlier_library_and_is_what_is_installed() -> None:
    """``stroma.__version__`` sorts after 0.3.2 (the earlier library), is the installed
    distribution's version, and is read from stroma/_version.py by the packaging."""
    assert Version(stroma.__version__) >= Version("0.4.0") > Version("0.3.2")
    assert importlib.metadata.version("stroma") == stroma.__version__
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "version" not in project["project"] and project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "stroma._version.__version__"
    }


def test_the_version_string_is_written_in_one_place() -> None:
    """The version string appears in no Python file or pyproject.toml but stroma/_version.py."""
    files = [ROOT / "pyproject.toml", *(ROOT / "stroma").rglob("*.py"),
             *(ROOT / "interpreters").rglob("*.py")]
    found = [str(p.relative_to(ROOT)) for p in files
             if f'"{stroma.__version__}"' in p.read_text(encoding="utf-8")]
    assert found == ["stroma/_version.py"]


@pytest.mark.anyio
async def test_a_run_log_header_carries_the_version(anyio_backend: str) -> None:
    """The effect log header of a run records ``stroma.__version__``."""
    runner = StromaRunner.quick()
    a, _ = _pair(runner)
    result = await runner.run([a], In(value=1))
    assert result.log is not None and result.log.header.version == stroma.__version__
