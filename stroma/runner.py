"""The runner facade: ``StromaRunner``, ``RunConfig``, ``NodeHooks`` and ``interpret``.

This is where the pure core meets the interpreters: a pipeline (a list of node functions
or a Plan) is compiled to an immutable plan, the run's settings become a
``MachineConfig``, and ``interpreters.session`` performs the run.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import anyio
import attrs
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

import stroma.plan as _plan_module
from interpreters.live import CURRENT_CALL, Collaborators
from interpreters.session import new_seed, replay_log, run_session, utcnow
from stroma import effects as fx
from stroma.checkpoint import CheckpointManager, InMemoryStore, is_async_callable
from stroma.contracts import ContractRegistry, ContractViolation, NodeContract
from stroma.cost import KNOWN_MODELS, ExecutionBudget, FallbackPolicy
from stroma.errors import (
    ChildFailed,
    ChildFailedTerminally,
    LogCorrupted,
    PlanError,
    StromaError,
    StromaImportError,
    StromaTypeError,
    StromaValueError,
    StromaWarning,
    _user_stacklevel,
    _validated_init,
)
from stroma.failures import Classifier, FailureClass, FailurePolicy, NodeContext
from stroma.inputs import InputRefused, _dropping_fields, _near_misses, _refused_keys
from stroma.log import EffectLog
from stroma.machine import (
    DEFAULT_HOOK_TIMEOUT_MS,
    MachineConfig,
    failed_child,
    idempotency_key,
)
from stroma.otel import Tracing, tracing_of
from stroma.plan import (
    NODE_ATTR,
    NodeMarker,
    NodeStep,
    ParallelGroup,
    ParallelStep,
    Plan,
    PlanLike,
    WaitStep,
    compile_plan,
    parallel,
)
from stroma.schemas import declare_schemas
from stroma.trace import ExecutionResult, RunStatus

__all__ = (
    "NodeHooks",
    "RunConfig",
    "StepHooks",
    "StromaRunner",
    "current_idempotency_key",
    "interpret",
    "machine_config",
    "parallel",
    "replay",
    "stroma_node",
    "stroma_step",
)

_F = TypeVar("_F", bound=Callable[..., Any])


def _close_matches(word: str, possibilities: list[str], n: int) -> list[str]:
    """``difflib.get_close_matches``, imported when a misspelt name is to be explained
    (difflib is not worth its import time on every ``import stroma``)."""
    import difflib

    return difflib.get_close_matches(word, possibilities, n=n)


def _is_async_callable(fn: object) -> bool:
    # (an async def, one under a functools.wraps wrapper, or an object whose __call__ is
    # one: calling it gives a coroutine, which stroma awaits; see is_async_callable)
    return is_async_callable(fn)


_HOOK_FIELDS = frozenset({"on_node_start", "on_node_success", "on_node_failure"})
_HOOK_SIGNATURES = {
    "on_node_start": "(run_id, node_id, input_state)",
    "on_node_success": "(run_id, node_id, output_state, tokens_used)",
    "on_node_failure": "(run_id, node_id, exc, failure_class)",
}


@dataclass
class NodeHooks:
    """Optional async callbacks at node boundaries (see the hooks guide).

    They fire for each attempt of a step of the plan: a node (at the top, in a ``seq``, a
    branch arm, a route, a loop's body) and a ``parallel`` or ``map_each`` group, which is
    one attempt to its hooks: ``node_id`` is the group's step id, ``on_node_start`` gets
    the group's input, ``on_node_success`` its output and the tokens its children used,
    ``on_node_failure`` the exception and class its attempt failed with (its first failed
    child's). No hook fires for the nodes inside a fan-out (a node child, or the nodes of a
    child that is a whole plan); with tracing on (``stroma.otel``) each of their attempts
    has a span, beneath the group attempt's.
    """

    on_node_start: Callable[..., Any] | None = None
    on_node_success: Callable[..., Any] | None = None
    on_node_failure: Callable[..., Any] | None = None

    def __setattr__(self, name: str, fn: Any) -> None:
        # Checked on every assignment (the dataclass __init__ assigns too), so a sync
        # function set after construction is refused as well instead of failing per call.
        if name in _HOOK_FIELDS and fn is not None and not _is_async_callable(fn):
            label = getattr(fn, "__qualname__", None) or repr(fn)
            fn_name = getattr(fn, "__name__", None)
            if not isinstance(fn_name, str) or not fn_name.isidentifier():
                fn_name = name  # a lambda (which cannot be async) or an odd callable
            what = "a lambda, which cannot be async" if label.endswith("<lambda>") else (
                f"{label}, which is not"
            )
            raise StromaTypeError(
                f"NodeHooks.{name} must be an async function, got {what}: define it with "
                f"'async def {fn_name}{_HOOK_SIGNATURES[name]}: ...' and pass that"
            )
        object.__setattr__(self, name, fn)

    def kinds(self) -> frozenset[str]:
        return frozenset(
            kind for kind in ("start", "success", "failure")
            if getattr(self, f"on_node_{kind}") is not None
        )


StepHooks = NodeHooks


@_validated_init
class RunConfig(BaseModel):
    """Everything about one run except the pipeline and its input."""

    model_config = ConfigDict(
        arbitrary_types_allowed=True, validate_assignment=False, defer_build=True
    )

    run_id: str = Field(default_factory=lambda: str(uuid.uuid4()))
    budget: ExecutionBudget | None = None
    policy_map: dict[FailureClass, FailurePolicy] | None = None
    node_policies: dict[str, dict[FailureClass, FailurePolicy]] = Field(default_factory=dict)
    hooks: Any = None
    classifiers: list[Any] = Field(default_factory=list)
    context: Any = Field(default_factory=dict)
    node_timeouts: dict[str, float] = Field(default_factory=dict)
    resume_from: str | None = None
    model_fallbacks: list[Any] = Field(default_factory=list)
    seed: int | None = None
    # How long a hook may run before it is cancelled (a hook error that changes nothing);
    # None: hooks run unbounded.
    hook_timeout_ms: int | None = DEFAULT_HOOK_TIMEOUT_MS
    # OpenTelemetry (stroma.otel): True for the global providers, or a Tracing. Not a
    # decision of the run: it is in neither the MachineConfig nor the log's header.
    tracing: bool | Tracing = False
    # Whether a run took this config's default run id; the box is shared with the
    # config's copies (model_copy keeps it). The first run made with a config whose
    # run_id was not given runs under that id (as RunConfig().run_id says); later ones get
    # fresh ids, so no two runs share one.
    _default_id_taken: list[bool] = PrivateAttr(default_factory=lambda: [False])

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            unknown = [k for k in data if k not in cls.model_fields]
            if unknown:
                name = str(unknown[0])
                close = _close_matches(name, list(cls.model_fields), n=1)
                fix = f"did you mean {close[0]!r}?" if close else "remove it"
                raise StromaTypeError(
                    f"RunConfig got an unknown field {name!r} ({fix}); its fields are "
                    f"{', '.join(cls.model_fields)}"
                )
        return data

    @field_validator("context", mode="plain")
    @classmethod
    def _context(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            raise StromaTypeError(
                f"RunConfig.context must be a dict (got {value!r:.80}, a "
                f"{type(value).__name__}): pass a dict of shared resources, e.g. "
                "context={'http': client, 'model': 'gpt-4o'}"
            )
        return value  # the same dict, by reference: nodes share it

    @field_validator("tracing", mode="plain")
    @classmethod
    def _tracing(cls, value: Any) -> Any:
        tracing_of(value)  # a TypeError saying what to pass, for anything else
        return False if value is None else value

    @field_validator("hooks", mode="plain")
    @classmethod
    def _hooks(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, NodeHooks):
            hint = "NodeHooks(**your_dict)" if isinstance(value, Mapping) else (
                "NodeHooks(on_node_start=..., on_node_success=..., on_node_failure=...)"
            )
            raise StromaTypeError(
                f"RunConfig.hooks must be a NodeHooks or None (got {value!r:.80}, a "
                f"{type(value).__name__}): pass hooks={hint}"
            )
        return value

    @field_validator("classifiers", mode="plain")
    @classmethod
    def _classifiers(cls, value: Any) -> Any:
        if callable(value) and not isinstance(value, list | tuple):
            name = getattr(value, "__qualname__", None) or repr(value)
            short = getattr(value, "__name__", "")
            short = short if short.isidentifier() else "my_classifier"
            raise StromaTypeError(
                f"classifiers must be a list of classifiers, got the single callable {name}: "
                f"wrap it in a list, e.g. classifiers=[{short}]"
            )
        if value is not None and not isinstance(value, Iterable):
            raise StromaTypeError(
                f"classifiers must be a list of functions (exc, NodeContext) -> "
                f"FailureClass | None, got {value!r} (a {type(value).__name__})"
            )
        value = list(value or [])
        for i, c in enumerate(value):
            if not callable(c):
                raise StromaTypeError(
                    f"classifiers[{i}] is {c!r:.80} (a {type(c).__name__}), which is not "
                    "callable: a classifier is a function (exc, NodeContext) -> "
                    "FailureClass | None; pass the function itself, e.g. "
                    "classifiers=[my_classifier]"
                )
        return value

    @field_validator("node_timeouts", mode="after")
    @classmethod
    def _timeouts(cls, value: dict[str, float]) -> dict[str, float]:
        for node_id, ms in value.items():
            if not (math.isfinite(ms) and ms > 0):
                raise StromaValueError(
                    f"node_timeouts[{node_id!r}] must be a number of milliseconds > 0, got "
                    f"{ms!r}: e.g. node_timeouts={{{node_id!r}: 30_000}} for 30 s; leave the "
                    "node out for no timeout"
                )
        return value

    @field_validator("run_id", mode="after")
    @classmethod
    def _run_id(cls, value: str) -> str:
        if not value.strip():
            raise StromaValueError(
                f"RunConfig.run_id must name the run, got {value!r}: e.g. "
                "RunConfig(run_id='nightly-2026-12-03'), or leave it out for a fresh one"
            )
        return value

    @field_validator("hook_timeout_ms", mode="after")
    @classmethod
    def _hook_timeout(cls, value: int | None) -> int | None:
        if value is not None and value <= 0:
            raise StromaValueError(
                f"hook_timeout_ms must be a number of milliseconds > 0, or None for hooks "
                f"without a bound, got {value!r}: e.g. hook_timeout_ms=5_000 for 5 s"
            )
        return value

    @field_validator("node_policies", mode="before")
    @classmethod
    def _node_policies(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            for node_id, policies in value.items():
                if isinstance(policies, FailurePolicy):
                    raise StromaTypeError(
                        f"node_policies[{node_id!r}] must map failure classes to policies, "
                        f"got the single policy {policies!r}: write "
                        f"node_policies={{{node_id!r}: {{FailureClass.RECOVERABLE: "
                        "FailurePolicy(...)}}"
                    )
        return value

    @field_validator("model_fallbacks", mode="plain")
    @classmethod
    def _fallbacks(cls, value: Any) -> Any:
        if isinstance(value, FallbackPolicy):
            value = [value]  # (one policy: the list of it)
        elif value is not None and not isinstance(value, Iterable):
            raise StromaTypeError(
                f"model_fallbacks must be a list of FallbackPolicy values, got {value!r:.80} "
                f"(a {type(value).__name__}): e.g. model_fallbacks=[FallbackPolicy("
                "'gpt-4o', 'gpt-4o-mini', at_budget_pct=0.8)]"
            )
        value = list(value or [])
        for f in value:
            if not isinstance(f, FallbackPolicy):
                raise StromaTypeError(
                    f"model_fallbacks takes FallbackPolicy values (got {f!r}): "
                    "FallbackPolicy('gpt-4o', 'gpt-4o-mini', at_budget_pct=0.8)"
                )
        return value


def _table(
    policies: Mapping[Any, FailurePolicy] | None,
) -> tuple[tuple[FailureClass, int, float], ...]:
    if not policies:
        return ()
    return tuple(
        (FailureClass(c), p.max_retries, p.backoff_seconds) for c, p in policies.items()
    )


def machine_config(config: RunConfig, run_id: str) -> MachineConfig:
    budget = config.budget
    declared = config.context.get("model")
    return MachineConfig(
        run_id=run_id,
        seed=config.seed if config.seed is not None else new_seed(),
        started_at=utcnow(),
        max_tokens=budget.max_tokens_total if budget else None,
        max_cost_usd=budget.max_cost_usd if budget else None,
        max_latency_ms=budget.max_latency_ms if budget else None,
        policy_map=_table(config.policy_map),
        custom_classifiers=bool(config.classifiers),
        hooks=config.hooks.kinds() if config.hooks is not None else frozenset(),
        fallbacks=tuple(config.model_fallbacks),
        declared_model=declared if isinstance(declared, str) else None,
        resume_from=config.resume_from,
        node_timeouts={k: int(v) for k, v in config.node_timeouts.items()},
        node_policies={k: _table(v) for k, v in config.node_policies.items()},
        hook_timeout_ms=config.hook_timeout_ms,
        prices=dict(KNOWN_MODELS),  # (the prices this run goes by, kept in its log)
    )


def _run_config_of(config: Any, where: str) -> RunConfig:
    """``config=``: a RunConfig, or None for the defaults."""
    if config is None:
        return RunConfig()
    if isinstance(config, RunConfig):
        return config
    fix = "RunConfig(**config)" if isinstance(config, Mapping) else "RunConfig(...)"
    raise StromaTypeError(
        f"{where}(config=...): expected a RunConfig, got {config!r:.80} (a "
        f"{type(config).__name__}): pass {fix}"
    )


async def interpret(
    plan: PlanLike,
    initial_state: BaseModel | None = None,
    *,
    store: Any = None,
    config: RunConfig | None = None,
    registry: ContractRegistry | None = None,
    manager: CheckpointManager | None = None,
    sleep: Callable[[float], Any] | None = None,
    inputs: Mapping[str, Any] | None = None,
) -> ExecutionResult:
    """Run a plan (or a list of nodes) live and return its result and effect log.

    With an explicit ``config.run_id`` whose log is in the store, the run resumes from
    that log (finished nodes are not run again) or, if it finished, returns its result;
    such a run needs no ``initial_state`` (its log holds the one it started from).
    """
    compiled = compile_plan(plan, registry)
    config = _run_config_of(config, "interpret")
    # A run id given, or a resume: ``resume_from`` resumes the run ``config.run_id``
    # names, given or not (a config that ran under its default id, with resume_from set
    # on it or on a copy of it, resumes that run rather than starting a fresh one).
    given = "run_id" in config.model_fields_set
    explicit = given or config.resume_from is not None
    if initial_state is None:
        if not explicit:
            raise StromaTypeError(
                "interpret(plan): initial_state is required to start a run, e.g. "
                f"interpret(plan, {_input_name(compiled)}(...)); without one, interpret "
                "goes on with a run the store holds, named by config=RunConfig(run_id=...)"
            )
    elif not isinstance(initial_state, BaseModel):
        raise StromaTypeError(_initial_state_error(initial_state, compiled.input_schema))
    if inputs is not None:
        _check_inputs(inputs, compiled)
    if config.node_timeouts or config.node_policies:
        _warn_of_unknown_steps(config, compiled)
    if manager is None:
        manager = CheckpointManager(store if store is not None else InMemoryStore())
    run_id = config.run_id if explicit else _default_run_id(config)
    if not given and explicit:
        config._default_id_taken[0] = True  # (a later run without resume_from: a fresh id)
    if initial_state is not None:
        declare_schemas((type(initial_state),))
    world = Collaborators(
        manager, hooks=config.hooks, classifiers=tuple(config.classifiers),
        context=config.context, sleep=sleep if sleep is not None else anyio.sleep,
        inputs=dict(inputs or {}),
    )
    machine = machine_config(config, run_id)
    tracer = _traced(config, machine, world, compiled)
    if tracer is None:
        return await run_session(compiled, initial_state, machine=machine,
                                 explicit_run_id=explicit, world=world)
    world = attrs.evolve(world, observer=tracer)
    return await tracer.around(run_session(compiled, initial_state, machine=machine,
                                           explicit_run_id=explicit, world=world))


def _warn_of_unknown_steps(config: RunConfig, plan: Plan) -> None:
    """A node timeout or policy whose id is no step of the plan but close to one that has
    none (``fetch_page`` for ``fetch``) is likely misspelt, leaving the node without the
    timeout meant for it: warn, naming both. (Ids far from every step are taken for steps
    of another plan: a config can be shared by several.)"""
    ids = {s.step_id for s in plan.walk()}
    for what, table in (("node_timeouts", config.node_timeouts),
                        ("node_policies", config.node_policies)):
        for key in table:
            if key in ids:
                continue
            close = _close_matches(key, sorted(i for i in ids if i not in table), n=1)
            if close:
                warnings.warn(
                    f"RunConfig.{what} names {key!r}, which is no step of this plan, so it "
                    f"applies to nothing; did you mean {close[0]!r}? (no {what} entry "
                    "names it)", StromaWarning, stacklevel=_user_stacklevel(),
                )


_T = TypeVar("_T")


def _settings(where: str, make: Callable[[], _T]) -> _T:
    """``make()`` (a RunConfig or a budget the runner builds from its arguments), a bad
    value in it a StromaValueError naming the setting, what it got and what it takes
    (pydantic's ValidationError is for the models a caller builds itself)."""
    try:
        return make()
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        original = (first.get("ctx") or {}).get("error")
        if isinstance(original, StromaError):
            raise original from None
        setting = ".".join(str(p) for p in first.get("loc", ())) or "(the settings)"
        raise StromaValueError(
            f"{where}: {setting} {first.get('msg', 'is not valid')[:1].lower()}"
            f"{first.get('msg', '')[1:]}, got {first.get('input')!r:.80}"
            f"{f' (and {e.error_count() - 1} more)' if e.error_count() > 1 else ''}; see "
            f"{e.title}'s fields for what each setting takes"
        ) from None


def _default_run_id(config: RunConfig) -> str:
    """The id of a run whose config names none: the config's own default the first time,
    a fresh one after (a runner running twice shares nothing)."""
    taken = config._default_id_taken
    if taken[0]:
        return str(uuid.uuid4())
    taken[0] = True
    return config.run_id


def _check_inputs(inputs: Mapping[str, Any], plan: Plan) -> None:
    """Each of interpret's ``inputs`` is for a wait of the plan: by its name, or by a
    wait's key (``approval@agent#3``, as a WAITING run's stop reason names it)."""
    waits = [s for s in plan.walk() if isinstance(s, WaitStep)]
    names = sorted({s.name for s in waits})
    if not isinstance(inputs, Mapping):
        raise InputRefused(
            f"interpret(inputs=...) must map each wait's name to its payload, got "
            f"{inputs!r:.80} (a {type(inputs).__name__}): e.g. inputs={{'approval': "
            "{'approved': True}}. Nothing was run"
        )
    for key in inputs:
        if not isinstance(key, str) or key.split("@", 1)[0] not in names:
            there = (f"its waits are {', '.join(map(repr, names))}" if names
                     else "it has no await_input step")
            close = _close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise InputRefused(
                f"interpret(inputs=...): {key!r} is not the name of a wait in this plan; "
                f"{there}{hint}. Nothing was run"
            )
        payload = inputs[key]
        for step in waits:
            if step.name != key.split("@", 1)[0]:
                continue
            fields = _dropping_fields(step.schema)
            near = [] if fields is None else _near_misses(payload, fields)
            if near:
                raise _refused_keys("interpret(inputs=...)", key, near, step.schema.__name__,
                                   "nothing was run")


def _traced(config: RunConfig, machine: MachineConfig, world: Collaborators, plan: Plan) -> Any:
    """The run's OpenTelemetry observer when ``config.tracing`` is on (its span starts
    now), else None: with tracing off nothing is imported, looked up or made."""
    tracing = tracing_of(config.tracing)
    if tracing is None:
        return None
    from interpreters.otel import RunTracer

    try:
        return RunTracer.start(tracing, run_id=machine.run_id, started_at=machine.started_at,
                               clock=world.clock, hooks=machine.hooks, plan=plan)
    except Exception as exc:  # tracing never stops a run: it goes on untraced
        logging.getLogger("stroma").warning(
            "[run %s] tracing could not start (%r); the run goes on untraced",
            machine.run_id, exc,
        )
        return None


def _initial_state_error(value: object, schema: type[BaseModel] | None) -> str:
    name = schema.__name__ if schema is not None else "YourInput"
    if isinstance(value, type) and issubclass(value, BaseModel):
        fix = f"pass an instance, e.g. {value.__name__}(...), not the class itself"
    elif isinstance(value, Mapping):
        fix = f"build the model from it: {name}(**state) or {name}.model_validate(state)"
    else:
        fix = f"pass the first node's input model, e.g. {name}(...)"
    return (
        f"initial_state must be a pydantic BaseModel instance, got {value!r:.80} (a "
        f"{type(value).__name__}): {fix}"
    )


def current_idempotency_key() -> str:
    """The idempotency key of the node call running now (the same as its
    ``ctx["_stroma_idempotency_key"]``): the same for every retry and resume of the call,
    different for every other call. Unlike the context dict, which a fan-out's children
    share, it is the calling node's own key at any point of its run, after an await too."""
    call = CURRENT_CALL.get()
    if call is None:
        raise StromaError(
            "current_idempotency_key() is asked outside a node call: call it in a node's "
            "body while stroma runs it (a hook or a classifier has no call of its own; "
            "NodeContext.idempotency_key names the call a classifier sees)"
        )
    return idempotency_key(*call)


async def replay(
    plan: PlanLike, log: EffectLog | str | bytes | None
) -> ExecutionResult:
    """Replay a recorded run: the same result, calling no node, classifier or hook.

    ``log`` is a run's ``EffectLog`` (``result.log``, ``await store.read_log(run_id)``) or
    its JSON-lines text; anything else (None included) is a TypeError saying what to pass.
    Raises ``NondeterminismError`` (naming the record) when the plan no longer matches.
    """
    if isinstance(log, str | bytes):
        text = log.decode("utf-8", "replace") if isinstance(log, bytes) else log
        if not text.lstrip().startswith("{"):
            raise LogCorrupted(
                "replay(plan, log)",
                f"log must be an EffectLog or the JSON-lines text of one (its first line is "
                f"the {{\"stroma_log\": 2, ...}} header), got the text {text[:60]!r}: pass "
                "result.log, log.to_jsonl(), or await store.read_log(run_id); if this is a "
                "file path, read it first: Path(path).read_text()",
            )
        log = EffectLog.from_jsonl(log, source="replay(plan, log)")
    elif not isinstance(log, EffectLog):
        raise StromaTypeError(
            f"replay(plan, log): log must be an EffectLog or the JSON-lines text of one, "
            f"got {log!r:.80} (a {type(log).__name__}): pass result.log, log.to_jsonl(), "
            "or await store.read_log(run_id)"
        )
    return await replay_log(compile_plan(plan), log)


# ------------------------------------------------------------- a group on its own

_ONE_ATTEMPT = {c: FailurePolicy(max_retries=0, backoff_seconds=0.0) for c in FailureClass}


async def _run_group_alone(
    group: ParallelGroup, state: BaseModel, context: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``await parallel(a, b)(state)``: the group compiled to a one-step plan and
    interpreted once (no retries); the merged output as a plain dict of what the children
    returned, or ``ChildFailed`` naming the child that failed and how."""
    plan = compile_plan([group])
    step = plan.steps[0]
    assert isinstance(step, ParallelStep)
    if not isinstance(state, BaseModel):
        raise StromaTypeError(
            f"await {step.step_id}(state): state must be a pydantic BaseModel instance, "
            f"got {state!r:.80} (a {type(state).__name__}): pass the children's input model, "
            f"e.g. {_input_name(plan)}(...)"
        )
    if context is not None and not isinstance(context, dict):
        raise StromaTypeError(
            f"await {step.step_id}(state, context): context must be a dict (got "
            f"{context!r:.80}, a {type(context).__name__}): the children that take a context "
            "get it, e.g. {'http': client}"
        )
    raised: list[BaseException] = []

    def remember(exc: Exception, ctx: NodeContext) -> FailureClass | None:
        raised.append(exc)
        return None  # the built-in rules classify it, as in any run

    config = RunConfig(
        policy_map=_ONE_ATTEMPT, classifiers=[remember],
        context=context if context is not None else {},
    )
    result = await interpret(plan, state, config=config)
    if result.status is RunStatus.COMPLETED:
        final = result.final_state
        returned = final.model_fields_set
        return {k: v for k, v in final.model_dump().items() if k in returned}
    failed = result.trace.failures()
    failure = failed[-1].failure if failed else None
    message = (failed[-1].failure_message if failed else None) or result.stop_reason or ""
    child, cause = _failed_child(step, result, raised)
    who = f"child {child!r}" if child is not None else "a child"
    error = ChildFailedTerminally if failure is FailureClass.TERMINAL else ChildFailed
    raise error(
        f"{step.step_id}: {who} failed ({failure or result.status}): {message}"
    ) from cause


def _input_name(plan: Plan) -> str:
    schema = plan.input_schema
    return schema.__name__ if schema is not None else "YourInput"


def _failed_child(
    step: ParallelStep, result: ExecutionResult, raised: list[BaseException]
) -> tuple[str | None, BaseException | None]:
    """Which child of the group failed (``stroma.machine.failed_child``, the machine's own
    rule) and the exception it raised (the first a classifier was asked about that the
    machine did not make itself)."""
    cause = next((e for e in raised if not isinstance(e, ChildFailed)),
                 raised[-1] if raised else None)
    log = result.log
    records = list(log.records) if log is not None else []
    for record in reversed(records):
        if not (isinstance(record, tuple) and isinstance(record[0], fx.CallParallel)
                and isinstance(record[1], fx.ParallelReturned)):
            continue
        index = failed_child(step, record[0], record[1])
        if index is None:
            break
        child = step.children[index]
        label = child.node_id if isinstance(child, NodeStep) else (
            f"seq({', '.join(child.step_ids())})"
        )
        return label, cause
    if isinstance(cause, ContractViolation):
        return cause.node_id, cause  # a child's input broke its contract
    return None, cause


_plan_module._run_group_alone = _run_group_alone


def stroma_node(node_id: str, contract: NodeContract | None = None) -> Callable[[_F], _F]:
    """Mark a function as the node ``node_id`` (without registering its contract)."""
    if not isinstance(node_id, str) or not node_id:
        raise PlanError(
            f"stroma_node(node_id={node_id!r}): the node id must be a non-empty string, "
            "e.g. stroma_node('fetch', NodeContract(node_id='fetch', ...))"
        )
    if contract is not None and not isinstance(contract, NodeContract):
        raise PlanError(
            f"stroma_node({node_id!r}, contract={contract!r}): the contract must be a "
            f"NodeContract, got a {type(contract).__name__}; e.g. stroma_node({node_id!r}, "
            f"NodeContract(node_id={node_id!r}, input_schema=In, output_schema=Out)), or "
            "declare the schemas with runner.node(node_id, input=In, output=Out)"
        )

    def mark(fn: _F) -> _F:
        if not callable(fn):
            raise PlanError(
                f"stroma_node({node_id!r}) marks a function, got {fn!r}: put "
                f"@stroma_node({node_id!r}) above an async def"
            )
        try:
            setattr(fn, NODE_ATTR, NodeMarker(node_id, contract))
        except AttributeError:  # a bound method, or an object without a __dict__
            fn = _carrier(fn)
            setattr(fn, NODE_ATTR, NodeMarker(node_id, contract))
        # The earlier library's marker attributes, which adapters and users' code read.
        setattr(fn, "_stroma_node_id", node_id)  # noqa: B010
        setattr(fn, "_stroma_contract", contract)  # noqa: B010
        if contract is not None:
            declare_schemas((contract.input_schema, contract.output_schema))
        return fn

    return mark


stroma_step = stroma_node


def _carrier(fn: _F) -> _F:
    """A function calling ``fn`` that can carry the node's marks, for a callable that cannot
    (a bound method, an object with ``__slots__``): async if ``fn`` is, with its signature."""
    if _is_async_callable(fn):
        async def call_async(*args: Any, **kwargs: Any) -> Any:
            return await fn(*args, **kwargs)

        node: Callable[..., Any] = call_async
    else:
        def call(*args: Any, **kwargs: Any) -> Any:
            return fn(*args, **kwargs)

        node = call
    with contextlib.suppress(AttributeError, TypeError):
        functools.update_wrapper(node, fn)
    return cast(_F, node)


class StromaRunner:
    """Runs pipelines of contract-checked async nodes with retries, budgets and checkpoints."""

    def __init__(
        self,
        registry: ContractRegistry | None = None,
        checkpoint_manager: CheckpointManager | None = None,
        config: RunConfig | None = None,
    ) -> None:
        if registry is not None and not isinstance(registry, ContractRegistry):
            raise StromaTypeError(
                f"StromaRunner(registry, ...): registry must be a ContractRegistry, got "
                f"{registry!r:.80} (a {type(registry).__name__}): pass ContractRegistry() "
                "or None")
        if checkpoint_manager is not None and not isinstance(checkpoint_manager,
                                                             CheckpointManager):
            store = (" (it is a store: pass CheckpointManager(store), or "
                     "StromaRunner.quick(store=store))"
                     if callable(getattr(checkpoint_manager, "save", None)) else "")
            raise StromaTypeError(
                f"StromaRunner(registry, checkpoint_manager, ...): checkpoint_manager must be "
                f"a CheckpointManager, got {checkpoint_manager!r:.80} (a "
                f"{type(checkpoint_manager).__name__}){store}")
        self.registry = registry if registry is not None else ContractRegistry()
        self.checkpoint_manager = checkpoint_manager or CheckpointManager(InMemoryStore())
        self.config = _run_config_of(config, "StromaRunner")
        self._plans: dict[Any, Plan] = {}

    def compile(self, nodes: Plan | Sequence[Any] | ParallelGroup) -> Plan:
        """The immutable plan for ``nodes`` (cached: a pipeline compiles once per runner)."""
        if isinstance(nodes, Plan):
            return nodes
        items: Any = [nodes] if isinstance(nodes, ParallelGroup) else nodes
        if isinstance(items, Iterable) and not isinstance(
            items, list | tuple | str | bytes | AbstractSet | Mapping
        ):  # (a set or a mapping is refused by compile_plan: no order)
            items = list(items)  # (a generator is read once: for the key and the plan)
        try:
            key: Any = (self.registry.version, tuple(items))
            plan = self._plans.get(key)
        except TypeError:  # something unhashable in the list: compile it uncached
            return compile_plan(items, self.registry)
        if plan is None:
            plan = compile_plan(items, self.registry)
            if len(self._plans) > 64:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    @classmethod
    def quick(
        cls,
        *,
        store: Any = None,
        budget: ExecutionBudget | None = None,
        policy_map: dict[FailureClass, FailurePolicy] | None = None,
        classifiers: list[Classifier] | None = None,
        hooks: NodeHooks | None = None,
        **fields: Any,
    ) -> StromaRunner:
        """A runner with an in-memory store (or ``store``) and the given settings."""
        unknown = sorted(set(fields) - set(RunConfig.model_fields))
        if unknown:
            raise StromaTypeError(
                f"StromaRunner.quick() got unexpected keyword argument(s) "
                f"{', '.join(map(repr, unknown))}: it takes store, budget, policy_map, "
                f"classifiers, hooks and the RunConfig fields "
                f"({', '.join(RunConfig.model_fields)})"
            )
        config = _settings("StromaRunner.quick", lambda: RunConfig(
            budget=budget, policy_map=policy_map, classifiers=classifiers or [], hooks=hooks,
            **fields,
        ))
        manager = CheckpointManager(store if store is not None else InMemoryStore())
        return cls(ContractRegistry(), manager, config)

    # -- fluent builders

    def _update(self, **changes: Any) -> StromaRunner:
        # Keep what was set explicitly (an explicit run_id stays explicit).
        fields = {k: getattr(self.config, k) for k in self.config.model_fields_set}
        fields.update(changes)
        self.config = _settings(f"StromaRunner.with_{next(iter(changes), 'settings')}",
                                lambda: RunConfig(**fields))
        return self

    def with_redis(self, url: str, ttl_seconds: int = 3600) -> StromaRunner:
        """Checkpoints (and the effect log) in Redis at ``url``: a ``RedisStore``. Needs the
        ``redis`` extra; without it this raises ImportError saying how to install it."""
        try:
            import redis  # noqa: F401  (the optional extra: say how to install it)
        except ImportError as e:
            raise StromaImportError(
                "redis is required for StromaRunner.with_redis() (a RedisStore), but the "
                "'redis' package is not installed: pip install 'stroma[redis]'"
            ) from e
        from stroma.checkpoint import RedisStore

        self.checkpoint_manager = CheckpointManager(RedisStore(url, ttl_seconds=ttl_seconds))
        return self

    def with_store(self, store: Any) -> StromaRunner:
        self.checkpoint_manager = CheckpointManager(store)
        return self

    def with_budget(
        self, *, tokens: int | None = None, cost_usd: float | None = None,
        latency_ms: int | None = None,
    ) -> StromaRunner:
        for arg, value, unit in (
            ("tokens", tokens, "tokens"), ("cost_usd", cost_usd, "US dollars"),
            ("latency_ms", latency_ms, "milliseconds"),
        ):
            if isinstance(value, int | float) and not isinstance(value, bool) and not (
                value >= 0  # (False for NaN too)
            ):
                raise StromaValueError(
                    f"with_budget({arg}={value!r}): the limit must be a number of {unit} "
                    f">= 0, or None for no limit on it: e.g. with_budget({arg}="
                    f"{'0.50' if arg == 'cost_usd' else '10_000'})"
                )
        return self._update(budget=_settings("StromaRunner.with_budget", lambda: ExecutionBudget(
            max_tokens_total=tokens, max_cost_usd=cost_usd, max_latency_ms=latency_ms
        )))

    def with_model_fallback(
        self, model: str, *, to: str, at_budget_pct: float = 0.80
    ) -> StromaRunner:
        fallbacks = [*self.config.model_fallbacks, FallbackPolicy(model, to, at_budget_pct)]
        return self._update(model_fallbacks=fallbacks)

    def with_classifiers(self, classifiers: list[Classifier]) -> StromaRunner:
        return self._update(classifiers=classifiers)

    def with_hooks(self, hooks: NodeHooks) -> StromaRunner:
        return self._update(hooks=hooks)

    def with_tracing(
        self, tracer_provider: Any = None, meter_provider: Any = None
    ) -> StromaRunner:
        """Trace every run with OpenTelemetry (see ``stroma.otel``): a span per run, per
        node attempt and per fan-out child, and metrics; ``None`` uses the global
        provider. Needs ``opentelemetry-api`` (``pip install 'stroma[otel]'``); without
        it this raises ImportError saying so."""
        import interpreters.otel  # noqa: F401  (the optional extra: say how to install it)

        tracing: bool | Tracing = True
        if tracer_provider is not None or meter_provider is not None:
            tracing = Tracing(tracer_provider, meter_provider)
        return self._update(tracing=tracing)

    def with_context(self, context: dict[str, Any]) -> StromaRunner:
        return self._update(context=context)

    def with_policy_map(self, policy_map: dict[FailureClass, FailurePolicy]) -> StromaRunner:
        return self._update(policy_map=policy_map)

    def with_node_policies(
        self, node_policies: dict[str, dict[FailureClass, FailurePolicy]]
    ) -> StromaRunner:
        return self._update(node_policies=node_policies)

    def with_node_timeouts(self, node_timeouts: dict[str, float]) -> StromaRunner:
        return self._update(node_timeouts=node_timeouts)

    # -- nodes

    def node(
        self, node_id: str, *, input: type[BaseModel], output: type[BaseModel]
    ) -> Callable[[_F], _F]:
        """Register the contract ``input -> output`` for ``node_id`` and mark the function."""
        if not isinstance(node_id, str) or not node_id:
            raise PlanError(
                f"@runner.node(node_id={node_id!r}): the node id must be a non-empty string, "
                "e.g. @runner.node('summarize', input=Doc, output=Summary)"
            )
        for arg, schema in (("input", input), ("output", output)):
            if not (isinstance(schema, type) and issubclass(schema, BaseModel)):
                found = (
                    f"the class {schema.__qualname__}" if isinstance(schema, type)
                    else f"{schema!r:.80} (a {type(schema).__name__})"
                )
                raise PlanError(
                    f"@runner.node({node_id!r}, {arg}=...) must be a pydantic BaseModel "
                    f"subclass, got {found}: declare a model (class MyState(BaseModel): ...) "
                    f"and pass the class, e.g. {arg}=MyState"
                )
        contract = NodeContract(node_id=node_id, input_schema=input, output_schema=output)
        self.registry.register(contract)

        def mark(fn: _F) -> _F:
            if not _is_async_callable(fn):
                raise PlanError(
                    f"@runner.node({node_id!r}) decorates {getattr(fn, '__qualname__', fn)}, "
                    "which is not async: define it with 'async def'"
                )
            return stroma_node(node_id, contract)(fn)

        return mark

    async def run(
        self, nodes: Plan | Sequence[Any] | ParallelGroup, initial_state: BaseModel
    ) -> ExecutionResult:
        """Run the pipeline on ``initial_state``; every run has its own totals and trace."""
        return await interpret(
            self.compile(nodes),
            initial_state,
            config=self.config,
            registry=self.registry,
            manager=self.checkpoint_manager,
        )
