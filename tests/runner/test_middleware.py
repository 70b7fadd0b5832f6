"""``stroma.middleware``: ReliabilityContext, execute_step and StromaStep (API.md)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from stroma import (
    AsyncInMemoryStore,
    CheckpointManager,
    ContractRegistry,
    ExecutionBudget,
    ExecutionResult,
    FailureClass,
    FailurePolicy,
    FallbackPolicy,
    InMemoryStore,
    NodeContract,
    NodeHooks,
    ReliabilityContext,
    RunConfig,
    RunStatus,
    StromaStep,
    execute_step,
)

pytestmark = pytest.mark.anyio


class Num(BaseModel):
    value: int


class Text(BaseModel):
    text: str


NUM = NodeContract(node_id="step", input_schema=Num, output_schema=Num)


def contract(step_id: str, output: type[BaseModel] = Num) -> NodeContract:
    return NodeContract(node_id=step_id, input_schema=Num, output_schema=output)


def no_backoff(max_retries: int) -> dict[FailureClass, FailurePolicy]:
    return {c: FailurePolicy(max_retries=max_retries, backoff_seconds=0) for c in FailureClass}


# ----------------------------------------------------------------- ReliabilityContext


def test_for_run_keeps_what_it_is_given() -> None:
    """``for_run`` holds the given config, registry and manager, and takes the config's run id."""
    config = RunConfig(run_id="ctx-run")
    registry = ContractRegistry()
    manager = CheckpointManager(AsyncInMemoryStore())

    ctx = ReliabilityContext.for_run(config, registry, manager)

    assert ctx.config is config
    assert ctx.registry is registry
    assert ctx.checkpoint_manager is manager
    assert ctx.run_id == "ctx-run"
    assert len(ctx.trace) == 0
    assert ctx.cost_tracker.total_tokens == 0


def test_for_run_defaults_give_independent_contexts() -> None:
    """``for_run()`` with no arguments builds fresh settings, registry, store and trackers."""
    a = ReliabilityContext.for_run()
    b = ReliabilityContext.for_run()

    assert a.run_id != b.run_id
    assert a.registry is not b.registry
    assert a.checkpoint_manager is not b.checkpoint_manager
    assert a.trace is not b.trace
    assert a.cost_tracker is not b.cost_tracker


async def test_build_result_reports_the_whole_context(anyio_backend: str) -> None:
    """``build_result`` gives the context's run id, the given status and state, every step's
    trace events and the summed usage."""
    ctx = ReliabilityContext.for_run(RunConfig(run_id="summed"))

    async def one(state: Num) -> tuple[dict[str, int], int, str]:
        return {"value": state.value + 1}, 1000, "gpt-4o"

    await execute_step("one", one, Num(value=1), ctx, contract=contract("one"))
    await execute_step("two", one, Num(value=2), ctx, contract=contract("two"))

    result = ctx.build_result(RunStatus.COMPLETED, Num(value=3))

    assert isinstance(result, ExecutionResult)
    assert result.run_id == "summed"
    assert result.status is RunStatus.COMPLETED
    assert result.final_state == Num(value=3)
    assert [e.node_id for e in result.trace] == ["one", "two"]
    assert result.trace is not ctx.trace
    assert result.total_tokens == 2000
    assert result.total_cost_usd == pytest.approx(2 * 1000 * 2.50 / 1e6)


# ------------------------------------------------------------------------ execute_step


async def test_execute_step_retries_until_success(anyio_backend: str) -> None:
    """A failing callable is retried under the context's policy and the step completes."""
    ctx = ReliabilityContext.for_run(RunConfig(run_id="retrying", policy_map=no_backoff(3)))
    calls: list[int] = []

    async def flaky(state: Num) -> dict[str, int]:
        calls.append(1)
        if len(calls) < 3:
            raise TimeoutError("later")
        return {"value": state.value * 2}

    result = await execute_step("step", flaky, Num(value=4), ctx, contract=NUM)

    assert result.status is RunStatus.COMPLETED
    assert result.final_state == Num(value=8)
    assert len(calls) == 3
    assert [(e.attempt, e.failure) for e in result.trace] == [
        (1, FailureClass.RECOVERABLE), (2, FailureClass.RECOVERABLE), (3, None)
    ]
    assert [e.attempt for e in ctx.trace] == [1, 2, 3]
    assert ctx.retry_budget.count("retrying", "step") == 2
    assert ctx.checkpoint_manager.store.load("retrying", "step") == Num(value=8)


async def test_execute_step_gives_up_after_max_retries(anyio_backend: str) -> None:
    """Out of retries the step is PARTIAL with the input as its last valid state."""
    ctx = ReliabilityContext.for_run(RunConfig(policy_map=no_backoff(1)))
    calls: list[int] = []

    async def down(state: Num) -> dict[str, int]:
        calls.append(1)
        raise ConnectionError("down")

    result = await execute_step("step", down, Num(value=4), ctx, contract=NUM)

    assert result.status is RunStatus.PARTIAL
    assert result.final_state == Num(value=4)
    assert len(calls) == 2


async def test_execute_step_checks_the_output_contract(anyio_backend: str) -> None:
    """An output breaking the contract is a TERMINAL failure: FAILED after one attempt."""
    ctx = ReliabilityContext.for_run(RunConfig(policy_map=no_backoff(3)))
    calls: list[int] = []

    async def wrong(state: Num) -> dict[str, Any]:
        calls.append(1)
        return {"value": "many"}

    result = await execute_step("step", wrong, Num(value=1), ctx, contract=NUM)

    assert result.status is RunStatus.FAILED
    assert calls == [1]
    [event] = result.trace.events
    assert event.failure is FailureClass.TERMINAL
    assert "Contract violation for 'step' (output)" in (event.failure_message or "")


async def test_execute_step_checks_the_input_contract(anyio_backend: str) -> None:
    """An input that does not fit the contract fails the step without calling the callable."""
    ctx = ReliabilityContext.for_run(RunConfig(policy_map=no_backoff(3)))
    calls: list[int] = []

    async def never(state: Text) -> dict[str, str]:
        calls.append(1)
        return {"text": "x"}

    text_contract = NodeContract(node_id="step", input_schema=Text, output_schema=Text)
    result = await execute_step("step", never, Num(value=1), ctx, contract=text_contract)

    assert result.status is RunStatus.FAILED
    assert calls == []
    assert "Contract violation for 'step' (input)" in (result.trace.events[0].failure_message or "")


async def test_execute_step_takes_the_contract_from_the_registry(anyio_backend: str) -> None:
    """Without ``contract=`` the context's registry supplies it, and it is enforced: an output
    that breaks it fails the step (with neither, the step runs unvalidated: see
    tests/api/test_compat.py)."""
    registry = ContractRegistry()
    registry.register(contract("known"))
    ctx = ReliabilityContext.for_run(RunConfig(), registry)

    async def inc(state: Num) -> dict[str, int]:
        return {"value": state.value + 1}

    async def broken(state: Num) -> dict[str, str]:
        return {"value": "not a number"}

    result = await execute_step("known", inc, Num(value=1), ctx)
    assert result.final_state == Num(value=2)

    bad = await execute_step("known", broken, Num(value=1), ctx)
    assert bad.status is RunStatus.FAILED
    assert "Contract violation for 'known' (output)" in (bad.trace.events[0].failure_message or "")


async def test_execute_step_refuses_a_sync_callable_before_calling_it(anyio_backend: str) -> None:
    """A plain ``def`` is refused with an error naming it, and is never called."""
    ctx = ReliabilityContext.for_run(RunConfig(policy_map=no_backoff(3)))
    calls: list[int] = []

    def sync_step(state: Num) -> dict[str, int]:
        calls.append(1)
        return {"value": 1}

    with pytest.raises(TypeError, match="sync_step") as info:
        await execute_step("step", sync_step, Num(value=1), ctx, contract=NUM)
    assert "async def" in str(info.value)
    assert calls == []


async def test_execute_step_shares_one_budget_across_steps(anyio_backend: str) -> None:
    """Steps of one context spend one budget: the step that takes the cumulative total over
    the limit fails with BudgetExceeded on that total, and a later step is not started."""
    ctx = ReliabilityContext.for_run(
        RunConfig(budget=ExecutionBudget(max_tokens_total=100), policy_map=no_backoff(2))
    )
    calls: list[str] = []

    def spender(name: str) -> Any:
        async def spend(state: Num) -> tuple[dict[str, int], int]:
            calls.append(name)
            return {"value": state.value + 1}, 60

        return spend

    first = await execute_step("a", spender("a"), Num(value=0), ctx, contract=contract("a"))
    second = await execute_step("b", spender("b"), Num(value=1), ctx, contract=contract("b"))
    third = await execute_step("c", spender("c"), Num(value=2), ctx, contract=contract("c"))

    assert first.status is RunStatus.COMPLETED
    assert second.status is RunStatus.PARTIAL
    assert third.status is RunStatus.PARTIAL
    assert calls == ["a", "b"]
    over = second.trace.events[0]
    assert over.failure is FailureClass.RECOVERABLE
    assert "used 120 tokens, over the limit of 100 tokens" in (over.failure_message or "")
    assert "tokens 120 of 100" in (third.stop_reason or "")
    assert (first.total_tokens, second.total_tokens, third.total_tokens) == (60, 60, 0)
    assert ctx.cost_tracker.total_tokens == 120


async def test_execute_step_records_the_model_and_output_tokens_of_its_calls(
        anyio_backend: str) -> None:
    """The context's tracker has each step's usage as the step reported it: its model and
    its output tokens too (summary() said model=None, output_tokens=0)."""
    ctx = ReliabilityContext.for_run(RunConfig())

    async def ask(state: Num) -> tuple[dict[str, int], int, int, str]:
        return {"value": state.value + 1}, 1_000, 200, "claude-sonnet-4-6"

    result = await execute_step("ask", ask, Num(value=0), ctx, contract=contract("ask"))

    usage = ctx.cost_tracker.summary()["ask"]
    assert (usage.tokens_used, usage.output_tokens, usage.model) == (
        1_200, 200, "claude-sonnet-4-6")
    assert usage.cost_usd == pytest.approx(result.total_cost_usd)
    assert result.total_cost_usd == pytest.approx((1_000 * 3.0 + 200 * 15.0) / 1e6)


async def test_execute_step_model_fallback_counts_earlier_steps(anyio_backend: str) -> None:
    """The model fallback threshold is measured on the spend of the whole context."""
    context: dict[str, Any] = {"model": "gpt-4o"}
    ctx = ReliabilityContext.for_run(
        RunConfig(
            budget=ExecutionBudget(max_cost_usd=1.0),
            model_fallbacks=[FallbackPolicy("gpt-4o", "gpt-4o-mini", at_budget_pct=0.5)],
            context=context,
        )
    )
    seen: list[str] = []

    async def llm(state: Num, ctx_: dict[str, Any]) -> tuple[dict[str, int], int, str]:
        seen.append(ctx_.get("_stroma_model", "<absent>"))
        return {"value": state.value + 1}, 240_000, "gpt-4o"  # $0.60 with gpt-4o

    await execute_step("a", llm, Num(value=0), ctx, contract=contract("a"))
    second = await execute_step("b", llm, Num(value=1), ctx, contract=contract("b"))

    assert seen == ["<absent>", "gpt-4o-mini"]
    assert second.total_cost_usd == pytest.approx(240_000 * 0.15 / 1e6)


async def test_execute_step_passes_the_context_and_fires_hooks(anyio_backend: str) -> None:
    """A callable taking two parameters gets the config's context dict, and hooks fire."""
    context: dict[str, Any] = {}
    events: list[str] = []

    async def on_start(run_id: str, node_id: str, state: dict[str, Any]) -> None:
        events.append(f"start {node_id}")

    async def on_success(run_id: str, node_id: str, out: dict[str, Any], tokens: int) -> None:
        events.append(f"success {node_id}")

    ctx = ReliabilityContext.for_run(
        RunConfig(context=context, hooks=NodeHooks(on_node_start=on_start,
                                                   on_node_success=on_success))
    )
    got: list[Any] = []

    async def with_ctx(state: Num, c: dict[str, Any]) -> dict[str, int]:
        got.append(c)
        return {"value": state.value}

    await execute_step("step", with_ctx, Num(value=1), ctx, contract=NUM)

    assert got == [context] and got[0] is context
    assert events == ["start step", "success step"]


# -------------------------------------------------------------------------- StromaStep


async def test_wrap_returns_a_callable_giving_an_execution_result(anyio_backend: str) -> None:
    """``StromaStep(ctx).wrap`` gives a function whose call runs the step in the context."""
    ctx = ReliabilityContext.for_run(RunConfig(policy_map=no_backoff(1)))

    async def double(state: Num) -> dict[str, int]:
        return {"value": state.value * 2}

    wrapped = StromaStep(ctx).wrap("double", double, contract=contract("double"))
    result = await wrapped(Num(value=21))

    assert wrapped.__name__ == "double"
    assert isinstance(result, ExecutionResult)
    assert result.status is RunStatus.COMPLETED
    assert result.final_state == Num(value=42)
    assert [e.node_id for e in ctx.trace] == ["double"]


async def test_decorator_registers_the_contract_and_returns_results(anyio_backend: str) -> None:
    """``@StromaStep(ctx)(id, input=, output=)`` registers the contract in the context's
    registry; calling the function returns an ExecutionResult, validated by that contract."""
    store = InMemoryStore()
    ctx = ReliabilityContext.for_run(
        RunConfig(run_id="deco", policy_map=no_backoff(0)), None, CheckpointManager(store)
    )
    step = StromaStep(ctx)

    @step("describe", input=Num, output=Text)
    async def describe(state: Num) -> dict[str, str]:
        return {"text": f"n={state.value}"}

    @step("broken", input=Num, output=Text)
    async def broken(state: Num) -> dict[str, int]:
        return {"wrong": 1}

    ok = await describe(Num(value=3))
    bad = await broken(Num(value=3))

    assert ctx.registry.get("describe").output_schema is Text
    assert ok.status is RunStatus.COMPLETED and ok.final_state == Text(text="n=3")
    assert bad.status is RunStatus.FAILED and bad.final_state == Num(value=3)
    assert store.load("deco", "describe") == Text(text="n=3")
    assert [e.node_id for e in ctx.trace] == ["describe", "broken"]
