"""Wrong arguments to the less-used entry points (step options, middleware, stores'
typed loads, configs): each is a stroma error naming the argument, what was expected and
the fix, before anything runs; and settings that would apply to nothing are warned of."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
from pydantic import BaseModel

from stroma import (
    CheckpointManager,
    ContractRegistry,
    FailureClass,
    FailurePolicy,
    InMemoryStore,
    ReliabilityContext,
    RunConfig,
    StromaRunner,
    StromaStep,
    StromaWarning,
    await_input,
    execute_step,
    interpret,
    map_each,
    seq,
    stroma_node,
)
from stroma.errors import PlanError, StoreError, StromaError, StromaTypeError

pytestmark = pytest.mark.anyio


class A(BaseModel):
    x: int


class B(BaseModel):
    y: int


RUNNER = StromaRunner.quick()


@RUNNER.node("a", input=A, output=A)
async def a(state: A) -> dict[str, int]:
    return {"x": state.x + 1}


async def plain(state: A) -> dict[str, int]:
    return {"x": 1}


@pytest.mark.parametrize(
    ("make", "names"),
    [
        (lambda: stroma_node("x", contract="c"), ["contract", "NodeContract"]),
        (lambda: stroma_node("x", contract=A), ["contract", "NodeContract", "runner.node"]),
        (lambda: stroma_node("x")(5), ["stroma_node('x')", "async def"]),
        (lambda: map_each(a, over="items", into="out", input=5), ["input", "BaseModel"]),
        (lambda: await_input("ok", B, input=5), ["input", "BaseModel"]),
        (lambda: await_input("ok", B, timeout_ms=math.inf), ["timeout_ms", "milliseconds"]),
        (lambda: await_input("ok", B, timeout_ms=True), ["timeout_ms", "milliseconds"]),
        (lambda: seq(a).with_timeout("a", math.inf), ["with_timeout('a'", "milliseconds"]),
        (lambda: seq(a).with_timeout("a", 1e300), ["with_timeout('a'", "milliseconds"]),
        (lambda: seq(a).with_retry("a", 5), ["failure classes", "FailurePolicy"]),
        (lambda: seq(a).with_retry("a", {"BAD": FailurePolicy()}),
         ["'BAD' is not a failure class", "RECOVERABLE"]),
        (lambda: RUNNER.compile({a}), ["ordered list", "set", "pass a list"]),
        (lambda: seq(*{a: 1}) and RUNNER.compile({a: 1}), ["ordered list", "dict"]),
    ],
)
def test_a_bad_step_argument_is_a_plan_error_naming_it(make: Any, names: list[str]) -> None:
    with pytest.raises(PlanError) as caught:
        make()
    for name in names:
        assert name in str(caught.value)


@pytest.mark.parametrize("backoff", [math.inf, 1e300, math.nan, 86_401])
def test_a_backoff_that_would_hang_a_run_is_refused(backoff: float) -> None:
    """An infinite (or absurd) backoff would make the first retry wait for ever."""
    with pytest.raises(ValueError, match="backoff_seconds must be a number of seconds up to"):
        FailurePolicy(backoff_seconds=backoff)
    assert FailurePolicy(backoff_seconds=86_400).backoff_seconds == 86_400


def test_a_fraction_of_a_millisecond_is_one_millisecond() -> None:
    assert await_input("ok", B, timeout_ms=0.5).timeout_ms == 1
    assert seq(a).with_timeout("a", 0.4).steps[0].timeout_ms == 1


def test_model_fallbacks_and_inputs_of_the_wrong_kind_are_named() -> None:
    with pytest.raises(StromaTypeError, match="model_fallbacks must be a list of FallbackPolicy"):
        RunConfig(model_fallbacks=5)
    with pytest.raises(StromaError, match=r"inputs=\.\.\.\) must map each wait's name"):
        asyncio.run(interpret(seq(a), A(x=1), inputs=5))  # type: ignore[arg-type]


async def test_execute_step_and_stroma_step_name_a_bad_argument() -> None:
    ctx = ReliabilityContext.for_run(RunConfig(), ContractRegistry(),
                                     CheckpointManager(InMemoryStore()))
    cases: list[tuple[Any, str]] = [
        (lambda: execute_step(5, plain, A(x=1), ctx), "step id must be a non-empty string"),
        (lambda: execute_step("s", plain, A(x=1), None), "expected a ReliabilityContext"),
        (lambda: execute_step("s", plain, A(x=1), ctx, contract=5), "expected a NodeContract"),
    ]
    for call, message in cases:
        with pytest.raises(StromaTypeError, match=message):
            await call()
    with pytest.raises(StromaTypeError, match="expected a ReliabilityContext"):
        StromaStep(5)  # type: ignore[arg-type]
    with pytest.raises(StromaTypeError, match=r"input=\.\.\.\): expected a pydantic BaseModel"):
        StromaStep(ctx)("s", input=int, output=A)  # type: ignore[arg-type]
    with pytest.raises(StromaTypeError, match="expected a ContractRegistry"):
        ReliabilityContext.for_run(RunConfig(), 5)  # type: ignore[arg-type]
    with pytest.raises(StromaTypeError, match="expected a RunConfig"):
        ReliabilityContext.for_run(5)  # type: ignore[arg-type]
    # and the step still runs when the arguments are right
    assert (await execute_step("s", plain, A(x=1), ctx)).final_state == A(x=1)


def test_a_typed_load_as_another_schema_is_a_store_error_naming_both() -> None:
    store = InMemoryStore()
    store.save_typed("r", "n", A(x=1), A)
    with pytest.raises(StoreError, match="holds a A, which does not validate as B") as caught:
        store.load_typed("r", "n", B)
    assert "load it as A" in str(caught.value)
    assert store.load_typed("r", "n", A) == A(x=1)  # nothing changed


async def test_a_custom_store_loading_another_state_on_resume_is_a_store_error() -> None:
    """A store whose load returns a state of another schema: the resume says which store,
    run and node, instead of a bare validation error."""

    class Confused:
        def save(self, run_id: str, node_id: str, state: BaseModel) -> None:
            pass

        def load(self, run_id: str, node_id: str) -> BaseModel | None:
            return B(y=1)

        def delete(self, run_id: str) -> None:
            pass

    with pytest.raises(StoreError, match=r"Confused, run 'r': the checkpoint of 'n'"):
        await CheckpointManager(Confused()).resume("r", "n", A)


async def test_a_node_timeout_or_policy_for_no_step_of_the_plan_is_warned_of() -> None:
    """A misspelt id in node_timeouts would leave the node without its timeout: the run
    warns, naming the id and the close one; ids of the plan, and ids far from all of them
    (steps of another plan sharing the config), warn of nothing."""
    runner = StromaRunner.quick()

    @runner.node("fetch", input=A, output=A)
    async def fetch(state: A) -> dict[str, int]:
        return {"x": state.x}

    config = RunConfig(node_timeouts={"fetch_page": 1_000},
                       node_policies={"fetc": {FailureClass.AMBIGUOUS: FailurePolicy()}})
    with pytest.warns(StromaWarning) as caught:
        result = await interpret(seq(fetch), A(x=1), config=config)
    assert result.final_state == A(x=1)
    messages = [str(w.message) for w in caught]
    assert any("node_timeouts names 'fetch_page'" in m and "did you mean 'fetch'?" in m
               for m in messages)
    assert any("node_policies names 'fetc'" in m for m in messages)
    assert {w.filename for w in caught} == {__file__}  # the user's interpret(...) call
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", StromaWarning)
        await interpret(seq(fetch), A(x=1), config=RunConfig(node_timeouts={"fetch": 1_000}))
        await interpret(seq(fetch), A(x=1), config=RunConfig(
            node_timeouts={"summarize": 1_000, "fetch": 60_000}))


async def test_an_initial_state_that_cannot_be_json_is_state_not_serializable() -> None:
    from pydantic import ConfigDict

    from stroma.errors import StateNotSerializable

    class Loose(BaseModel):
        model_config = ConfigDict(arbitrary_types_allowed=True)
        v: Any = None

    runner = StromaRunner.quick()
    calls: list[str] = []

    @runner.node("n", input=Loose, output=Loose)
    async def n(state: Loose) -> dict[str, Any]:
        calls.append("n")
        return {}

    with pytest.raises(StateNotSerializable, match=r"the initial state \(Loose\) cannot be "
                                                    "written as JSON"):
        await interpret(seq(n), Loose(v=object()))
    assert calls == []  # nothing ran


@pytest.mark.parametrize("kind", ["none", "three", "keyword"])
def test_a_node_that_cannot_be_called_with_the_state_is_refused_when_built(kind: str) -> None:
    """Called with the state (and the context when it takes two), a node with another
    signature would fail at run time with Python's TypeError, retried as any failure."""
    runner = StromaRunner.quick()

    async def none() -> dict[str, int]:
        return {}

    async def three(state: A, ctx: Any, extra: Any) -> dict[str, int]:
        return {}

    async def keyword(state: A, *, must: int) -> dict[str, int]:
        return {}

    fn = {"none": none, "three": three, "keyword": keyword}[kind]
    node = runner.node("x", input=A, output=A)(fn)
    with pytest.raises(PlanError, match=r"node 'x' \(.*\) cannot be called with the state"
                       ) as caught:
        runner.compile([node])
    assert "async def step(state: In)" in str(caught.value)

    async def fine(state: A, ctx: Any, extra: Any = None) -> dict[str, int]:
        return {}

    assert runner.compile([runner.node("y", input=A, output=A)(fine)]).program


def test_small_gaps_are_named_too() -> None:
    """A fallback without model names, a step name that is no string, an empty run id,
    negative token counts: each refused, saying what was expected."""
    from stroma import FallbackPolicy, branch, estimate_cost_usd, loop, route
    from stroma.errors import StromaValueError

    with pytest.raises(StromaTypeError, match="preferred_model must be a model name"):
        StromaRunner.quick().with_model_fallback(5, to=None)  # type: ignore[arg-type]
    with pytest.raises(StromaTypeError, match="fallback_model must be a model name"):
        FallbackPolicy("gpt-4o", "")
    with pytest.raises(StromaValueError, match="at_budget_pct must be a fraction"):
        FallbackPolicy("gpt-4o", "gpt-4o-mini", "high")  # type: ignore[arg-type]
    for make in (lambda: branch(lambda s: True, then=a, name=5),
                 lambda: loop(a, until=lambda s: True, max_iterations=2, name=""),
                 lambda: route(lambda s: "a", {"a": a}, name=7)):
        with pytest.raises(PlanError, match=r"name=.*a step's name is its id"):
            make()
    with pytest.raises(ValueError, match=r"RunConfig\.run_id must name the run"):
        RunConfig(run_id=" ")
    with pytest.raises(StromaValueError, match="token counts must be >= 0"):
        estimate_cost_usd("gpt-4o", -1_000_000)
    assert estimate_cost_usd("gpt-4o", 1_000_000) > 0


async def test_send_input_to_something_that_is_no_store_says_so() -> None:
    from stroma import send_input
    from stroma.inputs import InputRefused

    with pytest.raises(InputRefused, match="expected the store the run is in"):
        await send_input(5, "w", "ok", {"y": 1})


@pytest.mark.parametrize(("run_id", "name", "said"), [
    (5, "approval", "send_input: run_id must be a str ('agent-1'), got 5 (a int)"),
    ("agent", None, "send_input: name must be a str ("),
])
async def test_send_input_names_an_argument_of_the_wrong_type(
    run_id: Any, name: Any, said: str
) -> None:
    """``send_input(store, 5, ...)`` said the store had no run 5; it names the argument."""
    from stroma import send_input
    from stroma.errors import StromaTypeError

    with pytest.raises(StromaTypeError) as info:
        await send_input(InMemoryStore(), run_id, name, {"ok": True})
    assert str(info.value).startswith(said)


def test_a_log_of_one_line_without_its_newline_says_so() -> None:
    from stroma import EffectLog
    from stroma.errors import LogCorrupted

    text = asyncio.run(interpret(seq(a), A(x=1))).log.to_jsonl()
    with pytest.raises(LogCorrupted, match="does not end with a newline"):
        EffectLog.from_jsonl(text.splitlines()[0])
    assert EffectLog.from_jsonl(text).finish is not None


@pytest.mark.parametrize(
    ("build", "names"),
    [
        (lambda: StromaRunner.quick().with_budget(tokens="10k"),  # type: ignore[arg-type]
         ["with_budget", "max_tokens_total", "'10k'", "ExecutionBudget's fields"]),
        (lambda: StromaRunner.quick().with_policy_map({"RETRYABLE": FailurePolicy()}),
         ["with_policy_map", "'RECOVERABLE', 'TERMINAL' or 'AMBIGUOUS'", "'RETRYABLE'"]),
        (lambda: StromaRunner.quick(budget=5), ["StromaRunner.quick", "budget", "5"]),
        (lambda: StromaRunner.quick(run_id=5), ["StromaRunner.quick", "run_id", "string"]),
        (lambda: StromaRunner.quick().with_node_timeouts({"a": -5}),
         ["node_timeouts['a']", "milliseconds > 0"]),
    ],
)
def test_a_bad_runner_setting_is_a_stroma_value_error_naming_it(
    build: Any, names: list[str]
) -> None:
    """The runner builds its RunConfig (and budget) from its arguments: a bad one is a
    StromaValueError (a ValueError, as pydantic's was) naming the setting and the value."""
    from stroma.errors import StromaValueError

    with pytest.raises(StromaValueError) as caught:
        build()
    for name in names:
        assert name in str(caught.value)


# ----------------------------------------------- settings models built directly


@pytest.mark.parametrize("build", [
    lambda: RunConfig(budget=5),
    lambda: RunConfig(run_id=5),
    lambda: RunConfig(node_timeouts={"a": -1}),
    lambda: FailurePolicy(max_retries=-1),
    lambda: __import__("stroma").ExecutionBudget(max_tokens_total=-1),
    lambda: __import__("stroma").NodeContract(node_id="a", input_schema=dict,
                                              output_schema=A),
], ids=["budget", "run_id", "timeout", "retries", "limit", "schema"])
def test_a_settings_model_given_a_bad_value_raises_a_stroma_validation_error(
        build: Any) -> None:
    """Both a StromaError (what leaves the library) and pydantic's ValidationError (what
    code written for 0.3.x catches), with pydantic's errors."""
    from pydantic import ValidationError

    from stroma.errors import StromaValidationError, StromaValueError

    with pytest.raises(StromaValidationError) as caught:
        build()
    assert isinstance(caught.value, StromaValueError | ValidationError)
    assert isinstance(caught.value, ValidationError) and caught.value.errors()
    assert caught.value.error_count() >= 1


def test_model_validate_of_a_settings_model_raises_the_same_stroma_error() -> None:
    from stroma.errors import StromaValidationError

    with pytest.raises(StromaValidationError):
        FailurePolicy.model_validate({"max_retries": -1})
    with pytest.raises(StromaValidationError):
        RunConfig.model_validate_json('{"hook_timeout_ms": "soon"}')
    assert RunConfig.model_validate({"run_id": "ok"}).run_id == "ok"  # (still a classmethod)


def test_a_store_passed_as_the_checkpoint_manager_names_the_fix() -> None:
    with pytest.raises(StromaTypeError, match=r"CheckpointManager\(store\)"):
        StromaRunner(ContractRegistry(), InMemoryStore(), RunConfig())  # type: ignore[arg-type]
    with pytest.raises(StromaTypeError, match="registry must be a ContractRegistry"):
        StromaRunner(InMemoryStore(), CheckpointManager(InMemoryStore()))  # type: ignore[arg-type]


def test_cost_tracker_record_names_a_usage_that_is_no_number() -> None:
    from stroma import CostTracker, NodeUsage

    tracker = CostTracker()
    with pytest.raises(StromaTypeError, match=r"NodeUsage\.tokens_used must be a number"):
        tracker.record(NodeUsage("a", "x", 0, 0))  # type: ignore[arg-type]
    with pytest.raises(StromaTypeError, match="expected a NodeUsage"):
        tracker.record({"node_id": "a"})  # type: ignore[arg-type]
    assert tracker.total_tokens == 0  # nothing was added
