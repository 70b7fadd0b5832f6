"""Reliability for one callable without a runner: ``ReliabilityContext``, ``execute_step``
and ``StromaStep``.

A ``ReliabilityContext`` holds one run's settings and trackers; ``execute_step`` runs a
single callable through the same machine and interpreter as a pipeline (contracts,
classification, retries, budgets, timeouts, hooks, checkpoint) and folds the step's
usage and trace into the context, so several steps can share one budget and trace.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import attrs
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from interpreters.live import Collaborators
from interpreters.session import run_session
from stroma import effects as fx
from stroma.checkpoint import CheckpointManager, InMemoryStore
from stroma.contracts import ContractRegistry, NodeContract
from stroma.cost import CostTracker, NodeUsage, normalize_node_return
from stroma.errors import PlanError, StromaTypeError
from stroma.failures import RetryBudget
from stroma.plan import NODE_ATTR, STEP_ATTR, NodeMarker, compile_plan
from stroma.runner import (
    RunConfig,
    _is_async_callable,
    _run_config_of,
    _traced,
    machine_config,
)
from stroma.trace import ExecutionResult, ExecutionTrace, RunStatus

__all__ = ("ReliabilityContext", "StromaStep", "UnvalidatedOutput", "execute_step")


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
        if registry is not None and not isinstance(registry, ContractRegistry):
            raise StromaTypeError(
                f"ReliabilityContext.for_run(registry=...): expected a ContractRegistry, got "
                f"{registry!r:.80} (a {type(registry).__name__}); or leave it out for an "
                "empty one"
            )
        if checkpoint_manager is not None and not isinstance(checkpoint_manager,
                                                             CheckpointManager):
            raise StromaTypeError(
                "ReliabilityContext.for_run(checkpoint_manager=...): expected a "
                f"CheckpointManager, got {checkpoint_manager!r:.80} (a "
                f"{type(checkpoint_manager).__name__}): wrap a store in one, "
                "CheckpointManager(store)"
            )
        return cls(
            config=_run_config_of(config, "ReliabilityContext.for_run"),
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

    The contract is ``contract``, else the one the context's registry has for
    ``step_id``. With neither, the step runs unvalidated (classification, retries,
    budget, hooks and checkpoint still apply) and the result's final state is a model of
    the type the step returned, or of the input's type when the output fits it, else an
    ``UnvalidatedOutput`` holding what it returned. The step's usage counts against the
    context's budget together with earlier steps, and its attempts are appended to the
    context's trace.
    """
    _check_step(step_id, contract, "execute_step")
    _check_context(ctx, f"execute_step({step_id!r}, ...)")
    if contract is None and step_id in ctx.registry:
        contract = ctx.registry.get(step_id)
    if not isinstance(input_state, BaseModel):
        example = contract.input_schema.__name__ if contract is not None else "YourInput"
        raise StromaTypeError(
            f"execute_step({step_id!r}, ...): input_state must be a pydantic BaseModel "
            f"instance, got {input_state!r:.80} (a {type(input_state).__name__}): e.g. "
            f"{example}(...)"
        )
    unvalidated = contract is None
    if contract is None:
        # No contract passed or registered: the step runs unvalidated. Its input is the
        # state as given, and whatever it returns is accepted (see UnvalidatedOutput).
        contract = NodeContract(
            node_id=step_id, input_schema=type(input_state), output_schema=UnvalidatedOutput
        )
    if not _is_async_callable(func):
        name = getattr(func, "__qualname__", None) or repr(func)
        raise PlanError(
            f"step {step_id!r} ({name}) is not an async function: define it with "
            "'async def' (execute_step awaits it)"
        )
    marker = NodeMarker(step_id, contract)
    returned: list[type] = []

    @functools.wraps(func)
    async def node(*args: Any) -> Any:
        out = await func(*args)
        returned[:] = [type(normalize_node_return(out)[0])]  # (usage split off)
        return out

    if _takes_two(func):
        async def node2(state: Any, context: Any) -> Any:
            return await node(state, context)
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
    tracer = _traced(config, mc, world, plan)
    if tracer is None:
        result = await run_session(plan, input_state, machine=mc, explicit_run_id=False,
                                   world=world)
    else:
        world = attrs.evolve(world, observer=tracer)
        result = await tracer.around(run_session(plan, input_state, machine=mc,
                                                 explicit_run_id=False, world=world))
    # The step's own usage: the run's totals less what it started from.
    result.total_tokens -= mc.base_tokens
    result.total_cost_usd -= mc.base_cost_usd
    latency = sum(e.duration_ms for e in result.trace)
    model, output_tokens = _model_and_output_tokens(result)
    tracker.record(
        NodeUsage(step_id, result.total_tokens, result.total_cost_usd, latency, model,
                  output_tokens)
    )
    for event in result.trace:
        ctx.trace.append(event)
        if event.failure is not None:
            ctx.retry_budget.increment(ctx.run_id, step_id)
    if unvalidated and isinstance(result.final_state, UnvalidatedOutput):
        result.final_state = _as_model(result.final_state, type(input_state), returned)
    return result


def _model_and_output_tokens(result: ExecutionResult) -> tuple[str | None, int]:
    """The model that priced a step's calls (the latest that was named) and the output
    tokens they reported, from its log."""
    model: str | None = None
    output_tokens = 0
    log = result.log
    for record in log.records if log is not None else ():
        if not isinstance(record, tuple):
            continue
        call, answer = record
        if isinstance(call, fx.CallNode) and isinstance(answer, fx.NodeReturned):
            output_tokens += answer.output_tokens
            model = call.model or answer.model or model
    return model, output_tokens


class UnvalidatedOutput(BaseModel):
    """What a step without a contract returned, accepted as it is (the output schema
    ``execute_step`` gives such a step). A dict's keys become the model's fields, a model
    is taken as its fields, any other value is kept as ``value``. A step's result holds a
    model of the type it returned, or of its input's type when the output fits it, and
    this model otherwise."""

    model_config = ConfigDict(extra="allow", defer_build=True)

    @model_validator(mode="before")
    @classmethod
    def _anything(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            return {str(k): v for k, v in data.items()}
        if isinstance(data, BaseModel):
            return {name: getattr(data, name) for name in type(data).model_fields}
        return {"value": data}


def _as_model(
    output: UnvalidatedOutput, input_type: type[BaseModel], returned: list[type]
) -> BaseModel:
    """An unvalidated step's final state: a model of the type the step returned, else of
    the input's type when the output fits it (its fields and nothing else), else the
    output as it came."""
    data = output.model_dump()
    kind = returned[0] if returned else None
    if kind is None or not issubclass(kind, Mapping | BaseModel):
        return output  # not a dict or a model: kept as ``value``
    for schema in (kind, input_type):
        if not (isinstance(schema, type) and issubclass(schema, BaseModel)):
            continue
        extra_allowed = schema.model_config.get("extra") == "allow"
        if not extra_allowed and not set(data) <= set(schema.model_fields):
            continue
        try:
            return schema.model_validate(data)
        except ValidationError:
            continue
    return output


def _check_step(step_id: Any, contract: Any, where: str) -> None:
    if not isinstance(step_id, str) or not step_id:
        raise StromaTypeError(
            f"{where}(step_id={step_id!r}): the step id must be a non-empty string, e.g. "
            f"{where}('summarize', ...)"
        )
    if contract is not None and not isinstance(contract, NodeContract):
        raise StromaTypeError(
            f"{where}({step_id!r}, contract=...): expected a NodeContract, got "
            f"{contract!r:.80} (a {type(contract).__name__}): e.g. contract=NodeContract("
            f"node_id={step_id!r}, input_schema=In, output_schema=Out)"
        )


def _check_context(ctx: Any, where: str) -> None:
    if not isinstance(ctx, ReliabilityContext):
        raise StromaTypeError(
            f"{where}: expected a ReliabilityContext, got {ctx!r:.80} (a "
            f"{type(ctx).__name__}): make one with ReliabilityContext.for_run(config)"
        )


def _takes_two(func: Callable[..., Any]) -> bool:
    from stroma.plan import _takes_context

    return _takes_context(func)


class StromaStep:
    """Wraps callables so that calling them runs ``execute_step`` in a shared context."""

    def __init__(self, ctx: ReliabilityContext) -> None:
        _check_context(ctx, "StromaStep(ctx)")
        self.ctx = ctx

    def wrap(
        self, step_id: str, func: Callable[..., Any], *, contract: NodeContract | None = None
    ) -> Callable[..., Any]:
        """``func`` as a function of the input state that runs ``execute_step`` in this
        context and returns its ExecutionResult. It carries ``_stroma_node_id`` and
        ``_stroma_contract`` (the contract passed, else the one registered for the id when
        wrapping, else None: the step then runs unvalidated)."""
        ctx = self.ctx
        _check_step(step_id, contract, "StromaStep.wrap")
        if not callable(func):
            raise StromaTypeError(
                f"StromaStep.wrap({step_id!r}, func=...): expected an async function, got "
                f"{func!r:.80}"
            )

        @functools.wraps(func)
        async def wrapped(input_state: BaseModel) -> ExecutionResult:
            return await execute_step(step_id, func, input_state, ctx, contract=contract)

        # functools.wraps copied func's attributes: the wrapper returns an ExecutionResult,
        # so it is not a pipeline node even when func is one.
        for attr in (NODE_ATTR, STEP_ATTR):
            wrapped.__dict__.pop(attr, None)
        wrapped._stroma_node_id = step_id  # type: ignore[attr-defined]
        wrapped._stroma_contract = (  # type: ignore[attr-defined]
            contract if contract is not None
            else ctx.registry.get(step_id) if step_id in ctx.registry else None
        )
        return wrapped

    def __call__(
        self,
        step_id: str,
        *,
        input: type[BaseModel] | None = None,
        output: type[BaseModel] | None = None,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        _check_step(step_id, None, "StromaStep")
        for what, schema in (("input", input), ("output", output)):
            if schema is not None and not (isinstance(schema, type)
                                           and issubclass(schema, BaseModel)):
                raise StromaTypeError(
                    f"StromaStep({step_id!r}, {what}=...): expected a pydantic BaseModel "
                    f"class, got {schema!r:.80}: e.g. {what}=My{what.title()}"
                )
        contract = None
        if input is not None and output is not None:
            contract = NodeContract(node_id=step_id, input_schema=input, output_schema=output)
            self.ctx.registry.register(contract)

        def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
            return self.wrap(step_id, func, contract=contract)

        return decorate


