"""0.3.x code that the compatibility probe found refused or changed, pinned to run as the
earlier library ran it (API.md: input is validated against the node's input schema when
the node runs).

Every run goes through the real engine on asyncio and on trio (the ``anyio_backend``
fixture of tests/conftest.py); nothing sleeps.
"""

from __future__ import annotations

import functools
import pickle
from typing import Any

import pytest
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

from stroma import (
    CheckpointManager,
    ContractRegistry,
    FailureClass,
    FailurePolicy,
    InMemoryStore,
    NodeContract,
    NodeHooks,
    PlanError,
    ReliabilityContext,
    RunConfig,
    RunStatus,
    StromaRunner,
    branch,
    execute_step,
    loop,
    parallel,
    seq,
    stroma_node,
)


class In(BaseModel):
    value: int


class Open(BaseModel):
    """An output schema that keeps the fields a node returns beyond its own."""

    model_config = ConfigDict(extra="allow")
    value: int


class Named(BaseModel):
    value: int
    name: str


class Derived(BaseModel):
    """An input schema whose ``name`` is derived from ``value`` when absent."""

    value: int
    name: str

    @model_validator(mode="before")
    @classmethod
    def _fill(cls, data: Any) -> Any:
        if isinstance(data, dict) and "name" not in data:
            return {**data, "name": f"n{data.get('value')}"}
        return data


class Labelled(BaseModel):
    """An input schema that also takes ``value`` as its ``label``."""

    label: str = Field(validation_alias=AliasChoices("label", "value"))


class OnlyName(BaseModel):
    name: str


class Text(BaseModel):
    value: str


def _pipeline(runner: StromaRunner, out: type[BaseModel], needs: type[BaseModel],
              first_in: type[BaseModel], returned: dict[str, Any]) -> list[Any]:
    @runner.node("make", input=first_in, output=out)
    async def make(state: BaseModel) -> dict[str, Any]:
        return returned

    @runner.node("use", input=needs, output=needs)
    async def use(state: BaseModel) -> dict[str, Any]:
        return state.model_dump()

    return [make, use]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("out", "needs", "first_in", "returned", "final"),
    [
        (Open, Named, In, {"value": 1, "name": "x"}, {"value": 1, "name": "x"}),
        (In, Derived, In, {"value": 1}, {"value": 1, "name": "n1"}),
        (Text, Labelled, Text, {"value": "x"}, {"label": "x"}),
    ],
    ids=["extra-allow-output", "before-validator-input", "validation-alias"],
)
async def test_a_pipeline_that_validates_at_run_time_is_not_refused_when_built(
    anyio_backend: str, out: type[BaseModel], needs: type[BaseModel],
    first_in: type[BaseModel], returned: dict[str, Any], final: dict[str, Any],
) -> None:
    """A required input field that the step before may well provide (an output schema with
    ``extra="allow"``, an input schema deriving it in a ``mode="before"`` validator, or
    taking it under a validation alias) is no PlanError: the run validates it and
    completes, as the earlier library's runs did."""
    runner = StromaRunner.quick()
    nodes = _pipeline(runner, out, needs, first_in, returned)
    result = await runner.run(nodes, first_in.model_validate(returned))
    assert result.status is RunStatus.COMPLETED
    assert result.final_state.model_dump() == final


def test_a_field_surely_missing_is_still_refused_when_built() -> None:
    """The build-time check still refuses a required field nothing can provide: one the
    step before lacks, a validation alias it lacks under every name, and after a branch
    one that an arm lacks (an open arm beside it does not excuse that arm)."""
    runner = StromaRunner.quick()
    make, use = _pipeline(runner, In, Named, In, {"value": 1})
    with pytest.raises(PlanError, match=r"'use' needs 'name'"):
        seq(make, use)
    runner = StromaRunner.quick()
    make, use = _pipeline(runner, OnlyName, Labelled, In, {"name": "x"})
    with pytest.raises(PlanError, match=r"'use' needs 'label'"):
        seq(make, use)

    runner = StromaRunner.quick()

    @runner.node("open", input=In, output=Open)
    async def to_open(state: In) -> dict[str, Any]:
        return {"value": state.value, "name": "x"}

    @runner.node("closed", input=In, output=In)
    async def to_closed(state: In) -> dict[str, Any]:
        return {"value": state.value}

    @runner.node("use", input=Named, output=Named)
    async def use_named(state: Named) -> dict[str, Any]:
        return state.model_dump()

    @runner.node("open2", input=In, output=Open)
    async def to_open2(state: In) -> dict[str, Any]:
        return {"value": state.value, "name": "y"}

    with pytest.raises(PlanError, match=r"'use' needs 'name'"):
        seq(branch(lambda s: True, then=to_open, otherwise=to_closed), use_named)
    seq(branch(lambda s: True, then=to_open, otherwise=to_open2), use_named)


def test_a_loop_body_fed_by_an_open_output_is_not_refused() -> None:
    """A loop body whose output has ``extra="allow"`` may feed its own input's fields."""
    runner = StromaRunner.quick()

    @runner.node("step", input=Named, output=Open)
    async def step(state: Named) -> dict[str, Any]:
        return {"value": state.value + 1, "name": state.name}

    loop(step, until=lambda s: True, max_iterations=2)
    seq(loop(step, until=lambda s: True, max_iterations=2))


# ------------------------------------------- resume_from with the config's default run id


def _resumable(runner: StromaRunner, fail: list[bool], calls: list[str]) -> list[Any]:
    @runner.node("first", input=In, output=In)
    async def first(state: In) -> dict[str, Any]:
        calls.append("first")
        return {"value": state.value + 1}

    @runner.node("second", input=In, output=In)
    async def second(state: In) -> dict[str, Any]:
        calls.append("second")
        if fail[0]:
            raise RuntimeError("down")
        return {"value": state.value * 10}

    return [first, second]


_ONE_TRY = {c: FailurePolicy(max_retries=0, backoff_seconds=0) for c in FailureClass}


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["model_copy", "set_on_the_config"])
async def test_resume_from_resumes_the_run_its_config_names_by_default(
    anyio_backend: str, how: str
) -> None:
    """A config whose run_id was never passed still names one run (``config.run_id``, the
    run it ran as): the same config (or a ``model_copy`` of it) with ``resume_from`` set
    resumes that run from the checkpoint before the step, RESUMED, as 0.3.x did; it does
    not start a fresh run id that has no checkpoint to resume from."""
    store = InMemoryStore()
    config = RunConfig(policy_map=_ONE_TRY)
    fail: list[bool] = [True]
    calls: list[str] = []
    runner = StromaRunner(ContractRegistry(), CheckpointManager(store), config)
    nodes = _resumable(runner, fail, calls)
    first = await runner.run(nodes, In(value=1))
    assert first.status is RunStatus.PARTIAL and first.run_id == config.run_id

    fail[0] = False
    calls.clear()
    if how == "model_copy":
        again = StromaRunner(ContractRegistry(), CheckpointManager(store),
                             config.model_copy(update={"resume_from": "second"}))
        nodes = _resumable(again, fail, calls)
    else:
        runner.config.resume_from = "second"
        again = runner
    resumed = await again.run(nodes, In(value=1))
    assert resumed.status is RunStatus.RESUMED
    assert resumed.run_id == first.run_id
    assert resumed.final_state == In(value=20)
    assert calls == ["second"]


@pytest.mark.anyio
async def test_without_resume_from_a_default_id_config_still_runs_afresh(
    anyio_backend: str,
) -> None:
    """Running the same runner twice without resume_from shares nothing (a fresh run id)."""
    runner = StromaRunner.quick(policy_map=_ONE_TRY)
    fail: list[bool] = [False]
    calls: list[str] = []
    nodes = _resumable(runner, fail, calls)
    one = await runner.run(nodes, In(value=1))
    two = await runner.run(nodes, In(value=2))
    assert one.run_id != two.run_id and two.final_state == In(value=30)
    assert calls == ["first", "second", "first", "second"]


# ------------------------------- async functions under a decorator's plain wrapper


def _passthrough(fn: Any) -> Any:
    """A decorator whose wrapper is a plain function returning what ``fn`` returns (for an
    async ``fn``, its coroutine), made with ``functools.wraps``: the earlier library
    awaited what a node or a hook returned, so such functions ran."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    return wrapper


@pytest.mark.anyio
async def test_a_decorated_async_node_and_hook_run(anyio_backend: str) -> None:
    """An async node or hook under a ``functools.wraps`` plain wrapper is taken as async
    (calling it gives the coroutine, which stroma awaits): ``@runner.node``,
    ``stroma_node``, ``NodeHooks`` and ``execute_step`` accept it and it runs."""
    seen: list[tuple[str, str]] = []

    @_passthrough
    async def on_start(run_id: str, node_id: str, input_state: dict[str, Any]) -> None:
        seen.append(("start", node_id))

    runner = StromaRunner.quick(hooks=NodeHooks(on_node_start=on_start))

    @runner.node("inc", input=In, output=In)
    @_passthrough
    async def inc(state: In, ctx: dict[str, Any]) -> dict[str, Any]:
        return {"value": state.value + ctx.get("step", 1)}

    @stroma_node("double", NodeContract(node_id="double", input_schema=In, output_schema=In))
    @_passthrough
    async def double(state: In) -> dict[str, Any]:
        return {"value": state.value * 2}

    runner.with_context({"step": 2})
    result = await runner.run([inc, double], In(value=1))
    assert result.status is RunStatus.COMPLETED and result.final_state == In(value=6)
    assert seen == [("start", "inc"), ("start", "double")]

    async def triple(state: In) -> dict[str, Any]:
        return {"value": state.value * 3}

    ctx = ReliabilityContext.for_run()
    step = await execute_step("triple", _passthrough(triple), In(value=2), ctx)
    assert step.status is RunStatus.COMPLETED and step.final_state == In(value=6)


def test_a_plain_function_under_a_wrapper_is_still_refused() -> None:
    """A wrapper over a plain function is no async function: still refused at once."""

    @_passthrough
    def sync_hook(run_id: str, node_id: str, input_state: dict[str, Any]) -> None:
        return None

    with pytest.raises(TypeError, match="must be an async function"):
        NodeHooks(on_node_start=sync_hook)
    runner = StromaRunner.quick()
    with pytest.raises(PlanError, match="not async"):
        runner.node("plain", input=In, output=In)(_passthrough(lambda state: state))


# ------------------------------------------------------------------ a zero budget


@pytest.mark.anyio
@pytest.mark.parametrize("limit", [{"tokens": 0}, {"cost_usd": 0.0}])
async def test_a_zero_budget_runs_nodes_that_use_nothing(
    anyio_backend: str, limit: dict[str, Any]
) -> None:
    """The budget is checked after each node on the run's cumulative totals (API.md), so a
    zero limit stops a run only once a node used something: nodes reporting no usage run
    and the run completes, as in 0.3.x (a run that had used nothing was taken as having
    spent a zero budget, and started no node at all)."""
    runner = StromaRunner.quick().with_budget(**limit)
    calls: list[str] = []

    @runner.node("free", input=In, output=In)
    async def free(state: In) -> dict[str, Any]:
        calls.append("free")
        return {"value": state.value + 1}

    result = await runner.run([free], In(value=1))
    assert result.status is RunStatus.COMPLETED, result.stop_reason
    assert calls == ["free"] and result.final_state == In(value=2)


@pytest.mark.anyio
async def test_a_zero_budget_still_stops_after_a_node_that_used_some(
    anyio_backend: str,
) -> None:
    """A node that reports usage over a zero limit fails with BudgetExceeded after it ran,
    and the spent budget then starts no node: PARTIAL, the node called once."""
    runner = StromaRunner.quick(policy_map={
        FailureClass.RECOVERABLE: FailurePolicy(max_retries=3, backoff_seconds=0)
    }).with_budget(tokens=0)
    calls: list[str] = []

    @runner.node("paid", input=In, output=In)
    async def paid(state: In) -> tuple[dict[str, Any], int]:
        calls.append("paid")
        return {"value": state.value + 1}, 5

    result = await runner.run([paid], In(value=1))
    assert result.status is RunStatus.PARTIAL and calls == ["paid"]
    first = result.trace.events[0]
    assert first.failure is FailureClass.RECOVERABLE
    assert "tokens budget exceeded after node 'paid'" in (first.failure_message or "")


# --------------------------------------------------------------- pickling a result


class _A(BaseModel):
    a: int


class _B(BaseModel):
    b: int


@pytest.mark.anyio
async def test_a_run_result_pickles_and_comes_back_equal(anyio_backend: str) -> None:
    """An ExecutionResult is plain data, as 0.3.x's was: it pickles (a process pool or a
    task queue sends results so) and comes back equal, its trace's events and all. A
    run's trace, read lazily from the run's records, could not be pickled before it was
    read."""
    runner = StromaRunner.quick(policy_map={
        c: FailurePolicy(max_retries=1, backoff_seconds=0) for c in FailureClass
    })
    tries: list[int] = []

    @runner.node("left", input=In, output=_A)
    async def left(state: In) -> tuple[dict[str, Any], int]:
        tries.append(1)
        if len(tries) == 1:
            raise TimeoutError("slow")
        return {"a": state.value}, 5

    @runner.node("right", input=In, output=_B)
    async def right(state: In) -> dict[str, Any]:
        return {"b": state.value * 2}

    result = await runner.run([parallel(left, right)], In(value=3))
    back = pickle.loads(pickle.dumps(result))  # (the trace not read before)
    assert back == result
    assert back.status is RunStatus.COMPLETED and back.total_tokens == 5
    assert [(e.node_id, e.attempt, e.failure) for e in back.trace] == [
        ("parallel(left, right)", 1, FailureClass.RECOVERABLE),
        ("parallel(left, right)", 2, None),
    ]
    assert back.final_state.model_dump() == {"a": 3, "b": 6}
    trace = pickle.loads(pickle.dumps(result.trace))
    assert trace == result.trace and len(trace) == 2
