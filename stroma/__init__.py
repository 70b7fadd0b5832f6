"""stroma: the reliability layer for multi-step LLM and agent pipelines.

Contracts at every node boundary, failure classification and retries with jittered
backoff, timeouts that really cancel, token/cost/latency budgets, checkpoints in
pluggable stores, hooks, parallel fan-out, a full trace, and an effect log that replays
a run deterministically.
"""

import logging as _logging
from typing import TYPE_CHECKING

from stroma._version import __version__
from stroma.checkpoint import (
    AsyncCheckpointStore,
    AsyncInMemoryStore,
    CheckpointKey,
    CheckpointManager,
    CheckpointStore,
    InMemoryStore,
    LeaseStore,
    LogStore,
    _resolve_schema,
    _schema_ref,
)
from stroma.contracts import (
    BoundaryValidator,
    ContractRegistry,
    ContractViolation,
    NodeContract,
    StepContract,
    StepViolation,
)
from stroma.cost import (
    KNOWN_MODELS,
    BudgetExceeded,
    CostTracker,
    ExecutionBudget,
    FallbackPolicy,
    ModelHint,
    NodeUsage,
    StepUsage,
    estimate_cost_usd,
    resolve_model,
)
from stroma.errors import (
    ChildFailed,
    ChildFailedTerminally,
    LogCorrupted,
    NondeterminismError,
    PlanError,
    RunLocked,
    StoreError,
    StromaError,
    StromaWarning,
    UnsafeSchemaRef,
)
from stroma.failures import (
    Classifier,
    FailureClass,
    FailurePolicy,
    NodeContext,
    RetryBudget,
    StepContext,
    classify,
    default_policy_map,
)
from stroma.inputs import InputRefused, send_input
from stroma.log import EffectLog
from stroma.middleware import ReliabilityContext, StromaStep, execute_step
from stroma.plan import Plan, await_input, branch, loop, map_each, parallel, route, seq
from stroma.runner import (
    NodeHooks,
    RunConfig,
    StepHooks,
    StromaRunner,
    current_idempotency_key,
    interpret,
    replay,
    stroma_node,
    stroma_step,
)
from stroma.trace import ExecutionResult, ExecutionTrace, RunStatus, TraceEvent

if TYPE_CHECKING:
    # The stores live with the other I/O in interpreters/ and are imported when first
    # asked for (see __getattr__ below); type checkers see their real classes.
    from interpreters.stores.file import FileStore
    from interpreters.stores.postgres import PostgresStore
    from interpreters.stores.redis import RedisStore, SyncRedisStore

__all__ = (
    "KNOWN_MODELS",
    "AsyncCheckpointStore",
    "AsyncInMemoryStore",
    "BoundaryValidator",
    "BudgetExceeded",
    "CheckpointKey",
    "CheckpointManager",
    "ChildFailed",
    "ChildFailedTerminally",
    "CheckpointStore",
    "Classifier",
    "ContractRegistry",
    "ContractViolation",
    "CostTracker",
    "EffectLog",
    "ExecutionBudget",
    "ExecutionResult",
    "ExecutionTrace",
    "FailureClass",
    "FailurePolicy",
    "FallbackPolicy",
    "FileStore",
    "InMemoryStore",
    "InputRefused",
    "LeaseStore",
    "LogCorrupted",
    "LogStore",
    "ModelHint",
    "NodeContext",
    "NodeContract",
    "NodeHooks",
    "NodeUsage",
    "NondeterminismError",
    "Plan",
    "PlanError",
    "PostgresStore",
    "RedisStore",
    "ReliabilityContext",
    "RetryBudget",
    "RunConfig",
    "RunLocked",
    "RunStatus",
    "StepContext",
    "StepContract",
    "StepHooks",
    "StepUsage",
    "StepViolation",
    "StoreError",
    "StromaError",
    "StromaWarning",
    "StromaRunner",
    "StromaStep",
    "SyncRedisStore",
    "TraceEvent",
    "UnsafeSchemaRef",
    "__version__",
    "await_input",
    "_resolve_schema",
    "_schema_ref",
    "branch",
    "classify",
    "current_idempotency_key",
    "default_policy_map",
    "estimate_cost_usd",
    "execute_step",
    "interpret",
    "loop",
    "map_each",
    "parallel",
    "replay",
    "resolve_model",
    "route",
    "send_input",
    "seq",
    "stroma_node",
    "stroma_step",
)

# A library's logger: records go to whatever the application configured, and nowhere
# (not to stderr) when it configured nothing.
_logging.getLogger("stroma").addHandler(_logging.NullHandler())

_LAZY = {
    "RedisStore": "interpreters.stores.redis",
    "SyncRedisStore": "interpreters.stores.redis",
    "PostgresStore": "interpreters.stores.postgres",
    "FileStore": "interpreters.stores.file",
}


def __getattr__(name: str) -> object:
    # Stores live with the other I/O in interpreters/; import them when first asked for.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'stroma' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
