"""Token and cost accounting, budgets, and model fallback near the budget.

Everything here is arithmetic on numbers the run already has: no clock, no I/O. A run
keeps running totals (never re-summed from history) and checks them against its
``ExecutionBudget`` after each node.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from stroma.errors import StromaError, StromaTypeError, StromaValueError, _validated_init

__all__ = (
    "KNOWN_MODELS",
    "BudgetExceeded",
    "CostTracker",
    "ExecutionBudget",
    "FallbackPolicy",
    "ModelHint",
    "NodeUsage",
    "StepUsage",
    "SPEND_SLACK",
    "estimate_cost_usd",
    "fallback_for",
    "normalize_node_return",
    "resolve_model",
)

# USD per 1M tokens: (input, output).
KNOWN_MODELS: dict[str, tuple[float, float]] = {
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4-turbo": (10.00, 30.00),
    "claude-opus-4-6": (15.00, 75.00),
    "claude-sonnet-4-6": (3.00, 15.00),
    "claude-haiku-4-5": (0.80, 4.00),
    "gemini-1.5-pro": (3.50, 10.50),
    "gemini-1.5-flash": (0.35, 1.05),
}


def estimate_cost_usd(
    model: str | None, input_tokens: int, output_tokens: int = 0, *,
    prices: Mapping[str, tuple[float, float]] | None = None,
) -> float:
    """The price of a call in USD from ``prices`` (USD per 1M input / output tokens by
    model; KNOWN_MODELS by default); 0.0 for an unknown or absent model. A run prices its
    calls from the prices it began with, which its log keeps: a replay or a resume prices
    them the same, whatever KNOWN_MODELS says by then."""
    table = KNOWN_MODELS if prices is None else prices
    rate = table.get(model) if model is not None else None
    if rate is None:
        return 0.0
    try:
        if input_tokens < 0 or output_tokens < 0:
            raise StromaValueError(
                f"estimate_cost_usd({model!r}, {input_tokens!r}, {output_tokens!r}): token "
                "counts must be >= 0 (the tokens a call used)"
            )
        return (input_tokens * rate[0] + output_tokens * rate[1]) / 1_000_000
    except TypeError:  # (checked here only, off the common path)
        for name, value in (("input_tokens", input_tokens), ("output_tokens", output_tokens)):
            if not isinstance(value, int | float):
                raise StromaTypeError(
                    f"estimate_cost_usd({model!r}, {input_tokens!r:.40}, "
                    f"{output_tokens!r:.40}): {name} must be a number (a count of tokens), "
                    f"got {value!r:.80} (a {type(value).__name__}): pass int(...) of it"
                ) from None
        raise


_DIMENSIONS = ("tokens", "cost", "latency")

SPEND_SLACK = 1e-12
"""How far a sum of float costs (or a share of the cost limit) may be off and still count
as at its limit (threshold): a millionth of a millionth, below any price of a token, above
the rounding of a float sum (3 x 0.003 is 0.009000000000000001)."""


@_validated_init
class ExecutionBudget(BaseModel):
    """Limits on a run's cumulative totals; None means no limit on that dimension."""

    model_config = ConfigDict(frozen=True, defer_build=True)

    max_tokens_total: int | None = Field(default=None, ge=0)
    max_cost_usd: float | None = Field(default=None, ge=0.0)
    max_latency_ms: int | None = Field(default=None, ge=0)

    @field_validator("max_tokens_total", "max_cost_usd", "max_latency_ms", mode="before")
    @classmethod
    def _not_negative(cls, value: object, info: ValidationInfo) -> object:
        if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
            raise StromaValueError(
                f"ExecutionBudget.{info.field_name} must be >= 0, got {value!r}: it is a "
                f"limit on the run's cumulative total; use None for no limit"
            )
        return value

    @classmethod
    def unlimited(cls) -> ExecutionBudget:
        return cls()

    def _pairs(
        self, tokens: float, cost_usd: float, latency_ms: float
    ) -> tuple[tuple[str, float | None, float], ...]:
        return (
            ("tokens", self.max_tokens_total, tokens),
            ("cost", self.max_cost_usd, cost_usd),
            ("latency", self.max_latency_ms, latency_ms),
        )

    def first_exceeded(
        self, tokens: float, cost_usd: float, latency_ms: float
    ) -> tuple[str, float, float] | None:
        """``(dimension, limit, actual)`` of the first dimension over its limit, else None.
        (A sum of costs that is the limit but for the last bits of a float, as 3 x $0.003
        is, is at the limit, not over it: see ``SPEND_SLACK``.)"""
        for dimension, limit, actual in self._pairs(tokens, cost_usd, latency_ms):
            if limit is not None and actual > limit + SPEND_SLACK:
                return dimension, limit, actual
        return None

    def first_spent(
        self, tokens: float, cost_usd: float, latency_ms: float
    ) -> tuple[str, float, float] | None:
        """``(dimension, limit, actual)`` of the first dimension at or over its limit (a
        dimension the run has used none of is not spent, even with a zero limit: the
        check after each node stops a run that used any of it)."""
        for dimension, limit, actual in self._pairs(tokens, cost_usd, latency_ms):
            if limit is not None and actual > 0 and actual >= limit - SPEND_SLACK:
                return dimension, limit, actual
        return None


class _ZeroLimitSpentBudget(ExecutionBudget):
    """A budget as the logs recorded before a zero limit waited for some use read it: a
    dimension at a zero limit is spent from the start (so a replay or resume of such a
    log decides as its run did). The machine makes it from such a log's header only."""

    def first_spent(
        self, tokens: float, cost_usd: float, latency_ms: float
    ) -> tuple[str, float, float] | None:
        for dimension, limit, actual in self._pairs(tokens, cost_usd, latency_ms):
            if limit is not None and actual >= limit - SPEND_SLACK:
                return dimension, limit, actual
        return None


@dataclass(slots=True)
class NodeUsage:
    """What one node used. ``tokens_used`` is input plus output tokens."""

    node_id: str
    tokens_used: int
    cost_usd: float
    latency_ms: float
    model: str | None = None
    output_tokens: int = 0


StepUsage = NodeUsage

_LIMIT_FIELDS = {"tokens": "max_tokens_total", "cost": "max_cost_usd", "latency": "max_latency_ms"}


def _amount(dimension: str, value: float) -> str:
    if dimension == "cost":
        return f"${value:.6g}"
    if dimension == "latency":
        return f"{value:g} ms"
    return f"{value:g} tokens"


class BudgetExceeded(StromaError):
    """The run's cumulative total on one dimension went over its budget."""

    def __init__(self, dimension: str, limit: float, actual: float, node_id: str) -> None:
        self.dimension = dimension
        self.limit = limit
        self.actual = actual
        self.node_id = node_id
        field = _LIMIT_FIELDS.get(dimension, dimension)
        super().__init__(
            f"{dimension} budget exceeded after node {node_id!r}: the run has used "
            f"{_amount(dimension, actual)}, "
            f"{'over' if actual > limit else 'all of'} the limit of {_amount(dimension, limit)}. "
            f"Raise ExecutionBudget({field}=...) or make the pipeline use less."
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.dimension, self.limit, self.actual, self.node_id))


class CostTracker:
    """Running totals of a run, overall and per node."""

    __slots__ = ("_by_node", "_cost", "_latency", "_tokens")

    def __init__(self) -> None:
        self._by_node: dict[str, NodeUsage] = {}
        self._tokens = 0
        self._cost = 0.0
        self._latency = 0.0

    def record(self, usage: NodeUsage) -> None:
        """Add one node's usage to its node's totals and to the run's."""
        if not isinstance(usage, NodeUsage):
            raise StromaTypeError(
                f"CostTracker.record: expected a NodeUsage, got {usage!r:.80} (a "
                f"{type(usage).__name__}): record(NodeUsage(node_id, tokens_used, cost_usd, "
                "latency_ms))")
        for name in ("tokens_used", "cost_usd", "latency_ms", "output_tokens"):
            value = getattr(usage, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise StromaTypeError(
                    f"CostTracker.record: NodeUsage.{name} must be a number, got "
                    f"{value!r:.80} (a {type(value).__name__}) for node {usage.node_id!r}")
        self._tokens += usage.tokens_used
        self._cost += usage.cost_usd
        self._latency += usage.latency_ms
        prev = self._by_node.get(usage.node_id)
        if prev is None:
            self._by_node[usage.node_id] = NodeUsage(
                usage.node_id, usage.tokens_used, usage.cost_usd, usage.latency_ms,
                usage.model, usage.output_tokens,
            )
        else:
            prev.tokens_used += usage.tokens_used
            prev.cost_usd += usage.cost_usd
            prev.latency_ms += usage.latency_ms
            prev.output_tokens += usage.output_tokens
            prev.model = usage.model if usage.model is not None else prev.model

    def check_budget(self, budget: ExecutionBudget | None, node_id: str) -> None:
        """Raise BudgetExceeded if a cumulative total is over its limit."""
        if budget is None:
            return
        try:
            hit = budget.first_exceeded(self._tokens, self._cost, self._latency)
        except AttributeError:  # (checked here only, off the common path)
            if isinstance(budget, ExecutionBudget):
                raise
            raise _not_a_budget("CostTracker.check_budget(budget, node_id)", budget) from None
        if hit is not None:
            raise BudgetExceeded(*hit, node_id)

    @property
    def total_tokens(self) -> int:
        return self._tokens

    @property
    def total_cost_usd(self) -> float:
        return self._cost

    @property
    def total_latency_ms(self) -> float:
        return self._latency

    @property
    def by_node(self) -> Mapping[str, NodeUsage]:
        """Each node's accumulated usage (read-only view)."""
        return MappingProxyType(self._by_node)

    def summary(self) -> dict[str, NodeUsage]:
        """Each node's usage summed over its records, by node id (in the order the nodes
        were first recorded): tokens, cost, latency and output tokens added up, ``model``
        the latest one that was not None. The values are copies: changing them changes
        nothing in the tracker."""
        return {
            node_id: NodeUsage(
                u.node_id, u.tokens_used, u.cost_usd, u.latency_ms, u.model, u.output_tokens
            )
            for node_id, u in self._by_node.items()
        }


@dataclass(frozen=True, slots=True)
class ModelHint:
    """The model a node prefers, and what to use instead near the budget."""

    node_id: str
    preferred_model: str
    fallback_model: str | None = None
    max_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class FallbackPolicy:
    """Use ``fallback_model`` instead of ``preferred_model`` once spend reaches
    ``at_budget_pct`` of ``max_cost_usd``."""

    preferred_model: str
    fallback_model: str
    at_budget_pct: float = 0.80

    def __post_init__(self) -> None:
        for name in ("preferred_model", "fallback_model"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise StromaTypeError(
                    f"FallbackPolicy.{name} must be a model name (a non-empty string), got "
                    f"{value!r}: e.g. FallbackPolicy('gpt-4o', 'gpt-4o-mini', "
                    "at_budget_pct=0.8)"
                )
        pct = self.at_budget_pct
        if isinstance(pct, bool) or not isinstance(pct, int | float) or not 0.0 <= pct <= 1.0:
            raise StromaValueError(
                f"FallbackPolicy.at_budget_pct must be a fraction in [0, 1], got "
                f"{self.at_budget_pct!r}; write 0.8 for 80% of max_cost_usd"
            )


def fallback_for(
    spent_usd: float,
    budget: ExecutionBudget | None,
    fallbacks: Sequence[FallbackPolicy],
    declared: str | None,
) -> FallbackPolicy | None:
    """The fallback in force at this spend for a node declaring ``declared``, if any.

    That is the first policy whose ``preferred_model`` is ``declared`` (any policy when
    ``declared`` is None) and whose threshold is reached:
    ``spent_usd / max_cost_usd >= at_budget_pct`` (a zero cost limit is always reached).
    Without a cost limit nothing falls back.
    """
    try:
        if budget is None or budget.max_cost_usd is None:
            return None
        limit = budget.max_cost_usd
        for policy in fallbacks:
            if declared is not None and policy.preferred_model != declared:
                continue
            if limit == 0 or spent_usd / limit >= policy.at_budget_pct - SPEND_SLACK:
                return policy
        return None
    except (AttributeError, TypeError):  # (checked here only, off the common path)
        problem = _fallback_misuse("fallback_for(spent_usd, budget, fallbacks, declared)",
                                   spent_usd, budget, fallbacks)
        if problem is None:
            raise
        raise problem from None


def resolve_model(
    declared: str | None,
    tracker: CostTracker,
    budget: ExecutionBudget | None,
    fallbacks: Sequence[FallbackPolicy],
) -> str | None:
    """The model a node should use now: its fallback near the budget, else ``declared``."""
    try:
        spent = tracker.total_cost_usd
    except AttributeError:
        if isinstance(tracker, CostTracker):
            raise
        raise StromaTypeError(
            f"resolve_model(declared, tracker, budget, fallbacks): tracker must be a "
            f"CostTracker, got {tracker!r:.80} (a {type(tracker).__name__}): pass the run's "
            "CostTracker (CostTracker() for a run that has spent nothing)"
        ) from None
    try:
        policy = fallback_for(spent, budget, fallbacks, declared)
    except StromaTypeError:  # (named as the caller called it)
        problem = _fallback_misuse("resolve_model(declared, tracker, budget, fallbacks)",
                                   spent, budget, fallbacks)
        if problem is None:
            raise
        raise problem from None
    return declared if policy is None else policy.fallback_model


def _not_a_budget(call: str, budget: object) -> StromaTypeError:
    return StromaTypeError(
        f"{call}: budget must be an ExecutionBudget or None, got {budget!r:.80} (a "
        f"{type(budget).__name__}): e.g. ExecutionBudget(max_cost_usd=1.0), or "
        "ExecutionBudget(**settings) for a dict of them"
    )


def _fallback_misuse(
    call: str, spent_usd: object, budget: object, fallbacks: object
) -> StromaTypeError | None:
    """Which argument of ``fallback_for`` is of the wrong kind (None if none is)."""
    if budget is not None and not isinstance(budget, ExecutionBudget):
        return _not_a_budget(call, budget)
    if isinstance(spent_usd, bool) or not isinstance(spent_usd, int | float):
        return StromaTypeError(
            f"{call}: spent_usd must be a number (USD), got {spent_usd!r:.80} (a "
            f"{type(spent_usd).__name__})")
    if not isinstance(fallbacks, list | tuple):
        if hasattr(fallbacks, "__iter__") and not isinstance(fallbacks, str | bytes):
            return None
        return StromaTypeError(
            f"{call}: fallbacks must be a sequence of FallbackPolicy, got "
            f"{fallbacks!r:.80} (a {type(fallbacks).__name__}): pass [] for no fallback, "
            "or e.g. [FallbackPolicy('gpt-4o', 'gpt-4o-mini')]")
    for n, policy in enumerate(fallbacks):
        if not isinstance(policy, FallbackPolicy):
            return StromaTypeError(
                f"{call}: fallbacks[{n}] must be a FallbackPolicy, got {policy!r:.80} (a "
                f"{type(policy).__name__}): e.g. FallbackPolicy('gpt-4o', 'gpt-4o-mini')")
    return None


def _count(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def normalize_node_return(value: object) -> tuple[object, int, int, str | None]:
    """Split usage off what a node returned: ``(output, input_tokens, output_tokens, model)``.

    Recognised forms: ``out``; ``(out, tokens)``; ``(out, input_tokens, model)``;
    ``(out, input_tokens, output_tokens, model)``, where ``out`` is a dict or a model and
    token counts are non-negative ints. Anything else comes back unchanged with no usage,
    for the output contract to reject.
    """
    if not isinstance(value, tuple) or not 2 <= len(value) <= 4:
        return value, 0, 0, None
    out = value[0]
    if not isinstance(out, Mapping | BaseModel):
        return value, 0, 0, None
    model: object = None
    output_tokens: int | None = 0
    if len(value) == 2:
        input_tokens = _count(value[1])
    elif len(value) == 3:
        input_tokens, model = _count(value[1]), value[2]
    else:
        input_tokens, output_tokens, model = _count(value[1]), _count(value[2]), value[3]
    if input_tokens is None or output_tokens is None:
        return value, 0, 0, None
    if model is not None and not isinstance(model, str):
        return value, 0, 0, None
    return out, input_tokens, output_tokens, model
