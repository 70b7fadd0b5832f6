"""Reliability for one callable without a runner: ``ReliabilityContext``, ``execute_step``
and ``StromaStep``.

A ``ReliabilityContext`` holds one run's settings and trackers; ``execute_step`` runs a
single callable through the same machine and interpreter as a pipeline (contracts,
classification, retries, budgets, timeouts, hooks, checkpoint) and folds the step's
usage and trace into the context, so several steps can share one budget and trace.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import attrs
from pydantic import BaseModel

from interpreters.live import Collaborators
from interpreters.session import run_session
from stroma.checkpoint import CheckpointManager, InMemoryStore
from stroma.contracts import ContractRegistry, NodeContract
from stroma.cost import CostTracker, NodeUsage
from stroma.errors import PlanError
from stroma.failures import RetryBudget
from stroma.plan import NODE_ATTR, NodeMarker, compile_plan
from stroma.runner import RunConfig, _is_async_callable, machine_config
from stroma.trace import ExecutionResult, ExecutionTrace, RunStatus

__all__ = ("ReliabilityContext", "StromaStep", "execute_step")


@dataclass
class ReliabilityContext:
    """One run's settings, trackers and trace, shared by the steps executed in it."""

    config: RunConfig
    registry: ContractRegistry
    checkpoint_manager: CheckpointManager
    cost_tracker: CostTracker = field(default_factory=CostTracker)
    retry_budget: RetryBudget = field(default_factory=RetryBudget)
    trace: ExecutionTrace = field(default_factory=ExecutionTrace)

    @property
    def run_id(self) -> str:
        return self.config.run_id

    @classmethod
    def for_run(
        cls,
        config: RunConfig | None = None,
        registry: ContractRegistry | None = None,
        checkpoint_manager: CheckpointManager | None = None,
    ) -> ReliabilityContext:
        return cls(
            config=config if config is not None else RunConfig(),
            registry=registry if registry is not None else ContractRegistry(),
            checkpoint_manager=checkpoint_manager or CheckpointManager(InMemoryStore()),
        )

    def build_result(self, status: RunStatus, final_state: BaseModel) -> ExecutionResult:
        return ExecutionResult(
            run_id=self.run_id,
            status=status,
            final_state=final_state,
            trace=ExecutionTrace.from_events(list(self.trace)),
            total_cost_usd=self.cost_tracker.total_cost_usd,
            total_tokens=self.cost_tracker.total_tokens,
        )


async def execute_step(
    step_id: str,
    func: Callable[..., Any],
    input_state: BaseModel,
    ctx: ReliabilityContext,
    *,
    contract: NodeContract | None = None,
) -> ExecutionResult:
    """Run one callable with the full reliability loop; returns that step's result.

    The step's usage counts against the context's budget together with earlier steps,
    and its attempts are appended to the context's trace.
    """
    if contract is None:
        if step_id not in ctx.registry:
            raise PlanError(
                f"step {step_id!r} has no contract: pass contract=NodeContract(...) or "
                "register one in the context's registry"
            )
        contract = ctx.registry.get(step_id)
    if not isinstance(input_state, BaseModel):
        raise TypeError(
            f"execute_step({step_id!r}, ...): input_state must be a pydantic BaseModel "
            f"instance, got {input_state!r:.80} (a {type(input_state).__name__}): e.g. "
            f"{contract.input_schema.__name__}(...)"
        )
    if not _is_async_callable(func):
        name = getattr(func, "__qualname__", None) or repr(func)
        raise PlanError(
            f"step {step_id!r} ({name}) is not an async function: define it with "
            "'async def' (execute_step awaits it)"
        )
    marker = NodeMarker(step_id, contract)

    @functools.wraps(func)
    async def node(*args: Any) -> Any:
        return await func(*args)

    if _takes_two(func):
        async def node2(state: Any, context: Any) -> Any:
            return await func(state, context)
        target: Any = node2
    else:
        target = node
    setattr(target, NODE_ATTR, marker)
    plan = compile_plan([target])
    config = ctx.config
    mc = machine_config(config, ctx.run_id)
    tracker = ctx.cost_tracker
    base_tokens, base_cost = tracker.total_tokens, tracker.total_cost_usd
    if config.budget is not None or config.model_fallbacks:
        # The run's totals start at what earlier steps of this context spent, so the
        # budget (and the model fallback) see the context's cumulative spend.
        mc = attrs.evolve(
            mc, base_tokens=base_tokens, base_cost_usd=base_cost,
            base_latency_ms=int(tracker.total_latency_ms),
        )
    world = Collaborators(ctx.checkpoint_manager, hooks=config.hooks,
                          classifiers=tuple(config.classifiers), context=config.context)
    result = await run_session(plan, input_state, machine=mc, explicit_run_id=False,
                               world=world)
    # The step's own usage: the run's totals less what it started from.
    result.total_tokens -= mc.base_tokens
    result.total_cost_usd -= mc.base_cost_usd
    latency = sum(e.duration_ms for e in result.trace)
    tracker.record(
        NodeUsage(step_id, result.total_tokens, result.total_cost_usd, latency)
    )
    for event in result.trace:
        ctx.trace.append(event)
        if event.failure is not None:
            ctx.retry_budget.increment(ctx.run_id, step_id)
    return result


def _takes_two(func: Callable[..., Any]) -> bool:
    from stroma.plan import _takes_context

    return _takes_context(func)


class StromaStep:
    """Wraps callables so that calling them runs ``execute_step`` in a shared context."""

    def __init__(self, ctx: ReliabilityContext) -> None:
        self.ctx = ctx

    def wrap(
        self, step_id: str, func: Callable[..., Any], *, contract: NodeContract | None = None
    ) -> Callable[..., Any]:
        ctx = self.ctx

        @functools.wraps(func)
        async def wrapped(input_state: BaseModel) -> ExecutionResult:
            return await execute_step(step_id, func, input_state, ctx, contract=contract)

        return wrapped

    def __call__(
        self,
        step_id: str,
        *,
        input: type[BaseModel] | None = None,
        output: type[BaseModel] | None = None,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        contract = None
        if input is not None and output is not None:
            contract = NodeContract(node_id=step_id, input_schema=input, output_schema=output)
            self.ctx.registry.register(contract)

        def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
            return self.wrap(step_id, func, contract=contract)

        return decorate


