"""API.md statements that no other test pinned: each test names the statement it checks.

Every async test runs on asyncio and on trio (see tests/conftest.py). Nothing sleeps: retry
policies use ``backoff_seconds=0`` and no node timeout is ever reached.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from datetime import timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from stroma import (
    AsyncCheckpointStore,
    AsyncInMemoryStore,
    CheckpointManager,
    CheckpointStore,
    ContractRegistry,
    ExecutionBudget,
    ExecutionResult,
    FailureClass,
    FailurePolicy,
    FallbackPolicy,
    InMemoryStore,
    NodeContext,
    NodeContract,
    NodeHooks,
    NodeUsage,
    ReliabilityContext,
    RunConfig,
    RunStatus,
    StromaRunner,
    execute_step,
    parallel,
    stroma_node,
    stroma_step,
)
from stroma import effects as fx
from stroma.checkpoint import _resolve_schema, _schema_ref
from stroma.log import EffectLog
from stroma.plan import node_marker
from stroma.runner import machine_config

# ----------------------------------------------------------------------------- models


class Num(BaseModel):
    value: int


class Left(BaseModel):
    left: int


class Right(BaseModel):
    right: int


class Outer:
    """A plain class holding nested schemas (for ``_schema_ref`` / ``_resolve_schema``)."""

    class Inner(BaseModel):
        x: int

        class Deeper(BaseModel):
            y: str

    class NotAModel:
        pass


def no_backoff(max_retries: int) -> dict[FailureClass, FailurePolicy]:
    return {c: FailurePolicy(max_retries=max_retries, backoff_seconds=0) for c in FailureClass}


def add(runner: StromaRunner, node_id: str, n: int = 1, calls: list[str] | None = None) -> Any:
    @runner.node(node_id, input=Num, output=Num)
    async def node(state: Num) -> dict[str, int]:
        if calls is not None:
            calls.append(node_id)
        return {"value": state.value + n}

    return node


def failing(runner: StromaRunner, node_id: str, exc: Exception, calls: list[str]) -> Any:
    @runner.node(node_id, input=Num, output=Num)
    async def node(state: Num) -> dict[str, int]:
        calls.append(node_id)
        raise exc

    return node


# --------------------------------------------------------------------------- trace


@pytest.mark.anyio
async def test_trace_events_of_a_run_have_aware_utc_timestamps_and_one_based_attempts(
    anyio_backend: str,
) -> None:
    """A real run's TraceEvents carry timezone-aware UTC timestamps and 1-based attempts."""
    runner = StromaRunner.quick(policy_map=no_backoff(1))
    calls: list[str] = []
    flaky_state = {"failed": False}

    @runner.node("flaky", input=Num, output=Num)
    async def flaky(state: Num) -> dict[str, int]:
        if not flaky_state["failed"]:
            flaky_state["failed"] = True
            raise TimeoutError("once")
        return {"value": state.value}

    result = await runner.run([add(runner, "a", calls=calls), flaky], Num(value=1))

    assert result.status is RunStatus.COMPLETED
    assert [(e.node_id, e.attempt) for e in result.trace] == [("a", 1), ("flaky", 1), ("flaky", 2)]
    for e in result.trace:
        assert e.timestamp_utc.tzinfo is not None
        assert e.timestamp_utc.utcoffset() == timedelta(0)
        assert e.run_id == result.run_id
        assert isinstance(e.duration_ms, int) and e.duration_ms >= 0
    assert result.trace.replay() == list(result.trace)
    assert len(result.trace) == 3


def test_execution_result_has_exactly_the_documented_leading_fields() -> None:
    """ExecutionResult is a dataclass whose fields start run_id, status, final_state, trace,
    total_cost_usd, total_tokens."""
    names = [f.name for f in dataclasses.fields(ExecutionResult)]
    assert names[:6] == [
        "run_id", "status", "final_state", "trace", "total_cost_usd", "total_tokens"
    ]


@pytest.mark.anyio
async def test_final_state_on_a_terminal_failure_is_the_last_valid_state(
    anyio_backend: str,
) -> None:
    """On FAILED, ``final_state`` is the output of the last node that succeeded."""
    runner = StromaRunner.quick(policy_map=no_backoff(3))
    calls: list[str] = []
    first = add(runner, "first", 10)
    second = add(runner, "second", 100)

    @runner.node("bad", input=Num, output=Num)
    async def bad(state: Num) -> dict[str, str]:
        calls.append("bad")
        return {"value": "not a number"}  # output contract violation: TERMINAL

    result = await runner.run([first, second, bad, add(runner, "never", calls=calls)], Num(value=1))

    assert result.status is RunStatus.FAILED
    assert result.final_state == Num(value=111)
    assert calls == ["bad"]


# ------------------------------------------------------------------------- failures


@pytest.mark.anyio
async def test_per_node_policy_overrides_the_global_map_in_a_run(anyio_backend: str) -> None:
    """``node_policies[node_id][cls]`` wins over ``policy_map[cls]`` for that node only."""
    calls: list[str] = []
    runner = StromaRunner.quick(
        policy_map=no_backoff(2),
        node_policies={"strict": {FailureClass.RECOVERABLE: FailurePolicy(
            max_retries=0, backoff_seconds=0)}},
    )
    strict = failing(runner, "strict", TimeoutError("down"), calls)
    lenient = failing(runner, "lenient", TimeoutError("down"), calls)

    one = await runner.run([strict], Num(value=1))
    two = await runner.run([lenient], Num(value=1))

    assert (one.status, two.status) == (RunStatus.PARTIAL, RunStatus.PARTIAL)
    assert calls == ["strict", "lenient", "lenient", "lenient"]


@pytest.mark.anyio
async def test_without_any_policy_the_default_map_applies(anyio_backend: str) -> None:
    """With no policy_map, a RECOVERABLE failure gets default_policy_map's 3 retries (4
    attempts) and an AMBIGUOUS one 1 retry (2 attempts); the backoff is asked of ``sleep``."""
    from stroma.runner import interpret

    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    runner = StromaRunner.quick()
    calls: list[str] = []
    recoverable = failing(runner, "r", TimeoutError("t"), calls)
    ambiguous = failing(runner, "a", RuntimeError("?"), calls)

    r = await interpret([recoverable], Num(value=0), registry=runner.registry, sleep=sleep)
    a = await interpret([ambiguous], Num(value=0), registry=runner.registry, sleep=sleep)

    assert calls == ["r"] * 4 + ["a"] * 2
    assert (r.status, a.status) == (RunStatus.PARTIAL, RunStatus.PARTIAL)
    assert len(slept) == 4
    assert all(0 <= s <= 1.0 for s in slept[:3]) and 0 <= slept[3] <= 0.5


# ----------------------------------------------------------------------------- cost


def test_execution_budget_unlimited_has_no_limit_on_any_dimension() -> None:
    """``ExecutionBudget.unlimited()`` is a budget with every limit None."""
    b = ExecutionBudget.unlimited()
    assert isinstance(b, ExecutionBudget)
    assert (b.max_tokens_total, b.max_cost_usd, b.max_latency_ms) == (None, None, None)
    assert b == ExecutionBudget()


def test_node_usage_defaults() -> None:
    """NodeUsage's model defaults to None and output_tokens to 0."""
    u = NodeUsage("n", 10, 0.5, 3)
    assert (u.model, u.output_tokens) == (None, 0)


@pytest.mark.anyio
async def test_hook_gets_input_plus_output_tokens_of_the_attempt(anyio_backend: str) -> None:
    """on_node_success's tokens_used is input + output tokens of that attempt (0 if none)."""
    got: list[tuple[str, int]] = []

    async def on_success(run_id: str, node_id: str, out: dict[str, Any], tokens: int) -> None:
        got.append((node_id, tokens))

    runner = StromaRunner.quick(hooks=NodeHooks(on_node_success=on_success))

    @runner.node("llm", input=Num, output=Num)
    async def llm(state: Num) -> Any:
        return {"value": 1}, 100, 40, "gpt-4o"

    result = await runner.run([llm, add(runner, "plain")], Num(value=0))

    assert got == [("llm", 140), ("plain", 0)]
    assert result.total_tokens == 140
    assert result.total_cost_usd == pytest.approx((100 * 2.50 + 40 * 10.00) / 1e6)


# ----------------------------------------------------------------------- checkpoint


class _BareSync:
    def save(self, run_id: str, node_id: str, state: BaseModel) -> None: ...

    def load(self, run_id: str, node_id: str) -> BaseModel | None: ...

    def delete(self, run_id: str) -> None: ...


def test_store_protocols_are_structural() -> None:
    """The store Protocols are runtime-checkable and satisfied by any class with the methods."""
    assert isinstance(InMemoryStore(), CheckpointStore)
    assert isinstance(AsyncInMemoryStore(), AsyncCheckpointStore)
    assert isinstance(_BareSync(), CheckpointStore)
    assert not isinstance(object(), CheckpointStore)
    assert _BareSync.__mro__ == (_BareSync, object)  # no base class needed


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_memory_stores_round_trip_through_json(anyio_backend: str, kind: str) -> None:
    """InMemoryStore / AsyncInMemoryStore give back a new object equal to the one saved."""
    store: Any = InMemoryStore() if kind == "sync" else AsyncInMemoryStore()
    state = Outer.Inner(x=3)

    async def call(result: Any) -> Any:
        return await result if kind == "async" else result

    await call(store.save("r", "n", state))
    loaded = await call(store.load("r", "n"))
    assert loaded == state and loaded is not state and type(loaded) is Outer.Inner
    assert await call(store.load("r", "other")) is None
    await call(store.delete("r"))
    assert await call(store.load("r", "n")) is None


class _Recording:
    """A sync store recording which load method was used."""

    def __init__(self, typed: bool) -> None:
        self.data: dict[tuple[str, str], dict[str, Any]] = {}
        self.used: list[str] = []
        if typed:
            self.load_typed = self._load_typed

    def save(self, run_id: str, node_id: str, state: BaseModel) -> None:
        self.data[(run_id, node_id)] = state.model_dump()

    def load(self, run_id: str, node_id: str) -> Any:
        self.used.append("load")
        return self.data.get((run_id, node_id))  # a plain dict: the manager validates it

    def _load_typed(self, run_id: str, node_id: str, schema: type[BaseModel]) -> Any:
        self.used.append("load_typed")
        raw = self.data.get((run_id, node_id))
        return None if raw is None else schema.model_validate(raw)

    def delete(self, run_id: str) -> None:
        for key in [k for k in self.data if k[0] == run_id]:
            del self.data[key]


class _AsyncRecording(_Recording):
    async def save(self, run_id: str, node_id: str, state: BaseModel) -> None:  # type: ignore[override]
        super().save(run_id, node_id, state)

    async def load(self, run_id: str, node_id: str) -> Any:
        return super().load(run_id, node_id)

    async def _load_typed(self, run_id: str, node_id: str, schema: type[BaseModel]) -> Any:
        return super()._load_typed(run_id, node_id, schema)

    async def delete(self, run_id: str) -> None:  # type: ignore[override]
        super().delete(run_id)


@pytest.mark.anyio
@pytest.mark.parametrize("store_cls", [_Recording, _AsyncRecording], ids=["sync", "async"])
@pytest.mark.parametrize("typed", [True, False], ids=["load_typed", "load_only"])
async def test_checkpoint_manager_takes_sync_and_async_stores_and_prefers_load_typed(
    anyio_backend: str, store_cls: type[_Recording], typed: bool
) -> None:
    """CheckpointManager checkpoints, resumes (as the given schema) and clears through a sync
    or an async store, using ``load_typed`` when the store has it and ``load`` otherwise."""
    store = store_cls(typed)
    manager = CheckpointManager(store)

    await manager.checkpoint("run", "n", Num(value=5))
    resumed = await manager.resume("run", "n", Num)
    assert resumed == Num(value=5) and type(resumed) is Num
    assert store.used == (["load_typed"] if typed else ["load"])
    assert await manager.resume("run", "missing", Num) is None
    await manager.clear("run")
    assert await manager.resume("run", "n", Num) is None


def test_schema_ref_and_resolve_schema_handle_nested_qualnames() -> None:
    """``_schema_ref`` gives ``module:qualname`` and ``_resolve_schema`` walks nested names."""
    ref = _schema_ref(Outer.Inner.Deeper)
    assert ref == f"{__name__}:Outer.Inner.Deeper"
    assert _resolve_schema(ref) is Outer.Inner.Deeper
    assert _resolve_schema(_schema_ref(Num)) is Num


@pytest.mark.parametrize("target", ["Outer.NotAModel", "Outer", "no_backoff"])
def test_resolve_schema_refuses_a_target_that_is_not_a_basemodel(target: str) -> None:
    """``_resolve_schema`` raises TypeError (naming the reference) for a non-BaseModel target."""
    ref = f"{__name__}:{target}"
    with pytest.raises(TypeError, match="not a pydantic BaseModel") as info:
        _resolve_schema(ref)
    assert ref in str(info.value)


# (Without the redis extra: tests/api/test_compat.py, in a subprocess that blocks it.)


# --------------------------------------------------------------------------- runner


def test_run_config_defaults() -> None:
    """RunConfig's run_id is a fresh uuid4 string; the other fields default to empty/None."""
    a, b = RunConfig(), RunConfig()
    assert isinstance(a.run_id, str) and uuid.UUID(a.run_id).version == 4
    assert a.run_id != b.run_id
    assert (a.budget, a.policy_map, a.hooks, a.resume_from) == (None, None, None, None)
    assert (a.node_policies, a.classifiers, a.context) == ({}, [], {})
    assert (a.node_timeouts, a.model_fallbacks) == ({}, [])
    assert a.context is not b.context


def test_quick_passes_every_run_config_field_and_defaults_to_memory() -> None:
    """``StromaRunner.quick(**RunConfig fields)`` sets each field; the store defaults to an
    InMemoryStore, and a given store is used as is."""
    context: dict[str, Any] = {"k": 1}
    hooks = NodeHooks()
    fallback = FallbackPolicy("gpt-4o", "gpt-4o-mini")
    per_node = {"n": {FailureClass.AMBIGUOUS: FailurePolicy(max_retries=0)}}
    budget = ExecutionBudget(max_tokens_total=9)
    runner = StromaRunner.quick(
        budget=budget, policy_map=no_backoff(2), classifiers=[lambda e, c: None],
        hooks=hooks, run_id="quick-run", node_policies=per_node, context=context,
        node_timeouts={"n": 250}, resume_from="n", model_fallbacks=[fallback], seed=7,
    )
    c = runner.config
    assert c.run_id == "quick-run" and c.budget == budget and c.hooks is hooks
    assert c.policy_map == no_backoff(2) and len(c.classifiers) == 1
    assert c.node_policies == per_node and c.context is context
    assert c.node_timeouts == {"n": 250} and c.resume_from == "n"
    assert c.model_fallbacks == [fallback] and c.seed == 7
    assert isinstance(runner.checkpoint_manager.store, InMemoryStore)
    assert isinstance(runner.registry, ContractRegistry) and len(runner.registry) == 0

    store = AsyncInMemoryStore()
    assert StromaRunner.quick(store=store).checkpoint_manager.store is store


def test_quick_keeps_a_given_store_even_if_it_is_falsy() -> None:
    """A store that is falsy (an empty store with ``__len__``) is still the store used."""

    class EmptyLooking(InMemoryStore):
        def __len__(self) -> int:
            return 0

    store = EmptyLooking()
    assert StromaRunner.quick(store=store).checkpoint_manager.store is store


BUILDERS: list[tuple[str, Any, str, Any]] = [
    ("with_budget", lambda r: r.with_budget(tokens=5, cost_usd=1.5, latency_ms=60),
     "budget", ExecutionBudget(max_tokens_total=5, max_cost_usd=1.5, max_latency_ms=60)),
    ("with_classifiers", lambda r: r.with_classifiers([no_backoff]), "classifiers", [no_backoff]),
    ("with_policy_map", lambda r: r.with_policy_map(no_backoff(1)), "policy_map", no_backoff(1)),
    ("with_node_policies", lambda r: r.with_node_policies({"n": no_backoff(0)}),
     "node_policies", {"n": no_backoff(0)}),
    ("with_node_timeouts", lambda r: r.with_node_timeouts({"n": 40}), "node_timeouts", {"n": 40}),
]


@pytest.mark.parametrize(("name", "build", "field", "expected"), BUILDERS,
                         ids=[b[0] for b in BUILDERS])
def test_each_builder_returns_the_runner_and_keeps_earlier_settings(
    name: str, build: Any, field: str, expected: Any
) -> None:
    """Each ``with_*`` builder returns the same runner, sets its field, and keeps what was
    set before (an explicit run_id, a context, hooks)."""
    context: dict[str, Any] = {}
    hooks = NodeHooks()
    runner = StromaRunner.quick(run_id="kept").with_context(context).with_hooks(hooks)
    assert build(runner) is runner
    assert getattr(runner.config, field) == expected
    assert runner.config.run_id == "kept" and "run_id" in runner.config.model_fields_set
    assert runner.config.context is context and runner.config.hooks is hooks


def test_with_context_hooks_and_redis_return_the_runner() -> None:
    """with_context, with_hooks and with_redis return the runner; with_redis swaps the store."""
    runner = StromaRunner.quick()
    context: dict[str, Any] = {"a": 1}
    hooks = NodeHooks()
    assert runner.with_context(context) is runner and runner.config.context is context
    assert runner.with_hooks(hooks) is runner and runner.config.hooks is hooks
    assert runner.with_redis("redis://localhost:6379", ttl_seconds=7200) is runner
    from interpreters.stores.redis import RedisStore

    assert isinstance(runner.checkpoint_manager.store, RedisStore)


def test_with_node_timeouts_reach_the_machine_in_milliseconds() -> None:
    """``with_node_timeouts`` values are milliseconds by node id in the run's machine config."""
    runner = StromaRunner.quick().with_node_timeouts({"slow": 1500, "fast": 20})
    mc = machine_config(runner.config, "r")
    assert mc.node_timeouts == {"slow": 1500, "fast": 20}


def test_with_model_fallback_appends() -> None:
    """``with_model_fallback`` appends a FallbackPolicy; earlier ones stay, in order."""
    runner = (
        StromaRunner.quick()
        .with_model_fallback("gpt-4o", to="gpt-4o-mini")
        .with_model_fallback("claude-opus-4-6", to="claude-haiku-4-5", at_budget_pct=0.5)
    )
    assert runner.config.model_fallbacks == [
        FallbackPolicy("gpt-4o", "gpt-4o-mini", 0.80),
        FallbackPolicy("claude-opus-4-6", "claude-haiku-4-5", 0.5),
    ]


@pytest.mark.anyio
async def test_builders_take_effect_in_the_next_run(anyio_backend: str) -> None:
    """A builder called between two runs changes the second run, not the first."""
    runner = StromaRunner.quick(policy_map=no_backoff(0))
    calls: list[str] = []
    node = failing(runner, "n", TimeoutError("t"), calls)
    started: list[str] = []

    async def on_start(run_id: str, node_id: str, state: dict[str, Any]) -> None:
        started.append(node_id)

    first = await runner.run([node], Num(value=1))
    assert (first.status, calls, started) == (RunStatus.PARTIAL, ["n"], [])

    calls.clear()
    runner.with_policy_map(no_backoff(2)).with_hooks(NodeHooks(on_node_start=on_start))
    second = await runner.run([node], Num(value=1))
    assert (second.status, calls, started) == (RunStatus.PARTIAL, ["n"] * 3, ["n"] * 3)

    calls.clear()
    runner.with_classifiers([lambda exc, ctx: FailureClass.TERMINAL])
    third = await runner.run([node], Num(value=1))
    assert (third.status, calls) == (RunStatus.FAILED, ["n"])

    spend = StromaRunner.quick(policy_map=no_backoff(0))

    @spend.node("spend", input=Num, output=Num)
    async def spender(state: Num) -> Any:
        return {"value": 1}, 50

    assert (await spend.run([spender], Num(value=0))).status is RunStatus.COMPLETED
    spend.with_budget(tokens=10)
    assert (await spend.run([spender], Num(value=0))).status is RunStatus.PARTIAL


def test_runner_node_registers_the_contract_and_marks_the_function() -> None:
    """``@runner.node`` registers the contract under the id and marks (and returns) the
    function itself."""
    runner = StromaRunner.quick()

    async def fn(state: Num) -> dict[str, int]:
        return {"left": state.value}

    marked = runner.node("split", input=Num, output=Left)(fn)

    assert marked is fn
    contract = runner.registry.get("split")
    assert (contract.input_schema, contract.output_schema) == (Num, Left)
    marker = node_marker(fn)
    assert marker is not None and marker.node_id == "split" and marker.contract == contract


@pytest.mark.anyio
async def test_stroma_node_marks_without_registering_and_stroma_step_is_the_alias(
    anyio_backend: str,
) -> None:
    """``stroma_node`` / ``stroma_step`` mark a function with its contract without touching
    any registry; the runner uses the marked contract."""
    contract = NodeContract(node_id="triple", input_schema=Num, output_schema=Num)
    assert stroma_step is stroma_node

    @stroma_step("triple", contract)
    async def triple(state: Num) -> dict[str, int]:
        return {"value": state.value * 3}

    runner = StromaRunner.quick()
    marker = node_marker(triple)
    assert marker is not None and marker.node_id == "triple" and marker.contract is contract
    assert "triple" not in runner.registry and len(runner.registry) == 0

    result = await runner.run([triple], Num(value=2))
    assert result.final_state == Num(value=6)
    assert "triple" not in runner.registry


@pytest.mark.anyio
async def test_each_successful_node_and_parallel_group_is_checkpointed(anyio_backend: str) -> None:
    """Each successful node's output is checkpointed under its id (a parallel group once,
    under ``parallel(a, b)``); a failed node has no checkpoint."""
    store = InMemoryStore()
    runner = StromaRunner.quick(store=store, run_id="ckpt-run", policy_map=no_backoff(0))
    calls: list[str] = []

    @runner.node("l", input=Num, output=Left)
    async def left(state: Num) -> dict[str, int]:
        return {"left": state.value}

    @runner.node("r", input=Num, output=Right)
    async def right(state: Num) -> dict[str, int]:
        return {"right": state.value * 2}

    @runner.node("sum", input=Left, output=Num)
    async def total(state: Left) -> dict[str, int]:
        return {"value": state.left + 1}

    broken = failing(runner, "broken", RuntimeError("x"), calls)
    result = await runner.run([add(runner, "a"), parallel(left, right), total, broken],
                              Num(value=1))

    assert result.status is RunStatus.PARTIAL
    assert store.load("ckpt-run", "a") == Num(value=2)
    group = store.load("ckpt-run", "parallel(l, r)")
    assert group is not None and group.model_dump() == {"left": 2, "right": 4}
    assert store.load("ckpt-run", "l") is None and store.load("ckpt-run", "r") is None
    assert store.load("ckpt-run", "sum") == Num(value=3)
    assert store.load("ckpt-run", "broken") is None


@pytest.mark.anyio
async def test_without_hooks_no_hook_effect_is_performed(anyio_backend: str) -> None:
    """With no hooks set the run performs no FireHook effect; with only on_node_start set,
    only start hooks are fired."""
    runner = StromaRunner.quick()
    node = add(runner, "a")
    bare = await runner.run([node], Num(value=1))
    assert isinstance(bare.log, EffectLog)
    effects = [rec[0] for rec in bare.log.records if isinstance(rec, tuple)]
    assert not any(isinstance(e, fx.FireHook) for e in effects)

    async def on_start(run_id: str, node_id: str, state: dict[str, Any]) -> None:
        return None

    runner.with_hooks(NodeHooks(on_node_start=on_start))
    hooked = await runner.run([node], Num(value=1))
    assert isinstance(hooked.log, EffectLog)
    kinds = [rec[0].kind for rec in hooked.log.records
             if isinstance(rec, tuple) and isinstance(rec[0], fx.FireHook)]
    assert kinds == ["start"]


# ------------------------------------------------------------------------- logging


def _run_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "stroma" or r.name.startswith("stroma.")]


@pytest.mark.anyio
async def test_every_log_line_of_a_run_carries_its_run_id(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Records logged during a run (hook errors, raising and nonsense classifiers) carry the
    run's id in ``record.run_id``, for a generated run id as for an explicit one."""
    caplog.set_level(logging.DEBUG, logger="stroma")

    async def bad_hook(run_id: str, node_id: str, state: dict[str, Any]) -> None:
        raise RuntimeError("hook broke")

    def raising(exc: Exception, ctx: NodeContext) -> FailureClass | None:
        raise KeyError("classifier broke")

    def nonsense(exc: Exception, ctx: NodeContext) -> Any:
        return "retry please"

    for explicit in (False, True):
        caplog.clear()
        fields: dict[str, Any] = {"run_id": "logged-run"} if explicit else {}
        runner = StromaRunner.quick(
            policy_map=no_backoff(1), classifiers=[raising, nonsense],
            hooks=NodeHooks(on_node_start=bad_hook), **fields,
        )
        calls: list[str] = []
        result = await runner.run([failing(runner, "n", RuntimeError("x"), calls)], Num(value=1))
        records = _run_records(caplog)
        messages = " | ".join(r.getMessage() for r in records)
        assert "hook" in messages and "classifier broke" in messages
        assert "retry please" in messages
        assert len(records) >= 6  # 2 attempts x (hook + 2 classifiers)
        for record in records:
            assert record.__dict__.get("run_id") == result.run_id, record.getMessage()
        if explicit:
            assert result.run_id == "logged-run"


@pytest.mark.anyio
async def test_execute_step_log_lines_carry_the_context_run_id(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Log records of ``execute_step`` (a hook error) carry the context's run_id."""
    caplog.set_level(logging.DEBUG, logger="stroma")

    async def bad_hook(run_id: str, node_id: str, state: dict[str, Any]) -> None:
        raise RuntimeError("hook broke")

    ctx = ReliabilityContext.for_run(
        RunConfig(run_id="step-run", hooks=NodeHooks(on_node_start=bad_hook))
    )

    async def step(state: Num) -> dict[str, int]:
        return {"value": state.value + 1}

    contract = NodeContract(node_id="s", input_schema=Num, output_schema=Num)
    result = await execute_step("s", step, Num(value=1), ctx, contract=contract)

    assert result.status is RunStatus.COMPLETED
    records = _run_records(caplog)
    assert records
    assert all(r.__dict__.get("run_id") == "step-run" for r in records)


def test_the_run_logger_is_a_logger_adapter() -> None:
    """The logger a run writes through is a ``logging.LoggerAdapter`` adding ``run_id``."""
    from interpreters.live import RunLogger

    assert issubclass(RunLogger, logging.LoggerAdapter)
    adapter = RunLogger(logging.getLogger("stroma"), {"run_id": "r-1"})
    msg, kwargs = adapter.process("hello", {})
    assert kwargs["extra"]["run_id"] == "r-1" and "r-1" in msg


@pytest.mark.anyio
async def test_latency_budget_is_the_sum_of_node_durations_checked_after_each_node(
    anyio_backend: str,
) -> None:
    """The latency budget counts the sum of node durations, checked after each node: with
    30 ms nodes and a 50 ms limit the second node goes over (a RECOVERABLE BudgetExceeded)
    and the run stops PARTIAL with the first node's output."""
    from interpreters.session import run_session

    ticks = iter(range(10_000))

    def timer() -> float:  # every reading is 30 ms after the previous one: no real time
        return next(ticks) * 0.030

    runner = StromaRunner.quick(policy_map=no_backoff(2)).with_budget(latency_ms=50)
    calls: list[str] = []
    plan = runner.compile([add(runner, "one", calls=calls), add(runner, "two", calls=calls),
                           add(runner, "three", calls=calls)])
    result = await run_session(
        plan, Num(value=0), manager=CheckpointManager(InMemoryStore()),
        machine=machine_config(runner.config, "latency-run"), explicit_run_id=False,
        timer=timer,
    )

    assert calls == ["one", "two"]
    assert result.status is RunStatus.PARTIAL
    assert result.final_state == Num(value=1)
    assert [e.duration_ms for e in result.trace.events[:2]] == [30, 30]
    over = result.trace.events[1]
    assert over.node_id == "two" and over.failure is FailureClass.RECOVERABLE
    assert "latency budget exceeded after node 'two'" in (over.failure_message or "")
    assert "60 ms" in (over.failure_message or "")


def test_classify_accepts_a_class_name_like_a_run_does() -> None:
    """``classify`` takes a classifier's ``"TERMINAL"`` answer as FailureClass.TERMINAL, as
    a live run does, and still refuses junk with a TypeError."""
    from stroma.failures import classify

    ctx = NodeContext(node_id="n", attempt=1, run_id="r")
    assert classify(RuntimeError(), ctx, [lambda e, c: "TERMINAL"]) is FailureClass.TERMINAL
    with pytest.raises(TypeError, match="must return a FailureClass or None"):
        classify(RuntimeError(), ctx, [lambda e, c: "retry please"])
