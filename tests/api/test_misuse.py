"""Plausible user mistakes, each refused at once with an error that names the thing, what
was expected, what was found and the fix (STYLE.md, Errors)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from stroma import (
    CheckpointManager,
    ExecutionBudget,
    FailurePolicy,
    InMemoryStore,
    NodeContract,
    NodeHooks,
    ReliabilityContext,
    RunConfig,
    StromaRunner,
    execute_step,
    parallel,
    stroma_node,
)
from stroma.errors import LogCorrupted, PlanError, StromaError, StromaTypeError
from stroma.log import EffectLog
from stroma.plan import map_each
from stroma.runner import interpret, replay


class Num(BaseModel):
    value: int


class Items(BaseModel):
    items: list[int]


def runner_with_node() -> tuple[StromaRunner, Any]:
    runner = StromaRunner.quick()

    @runner.node("inc", input=Num, output=Num)
    async def inc(state: Num) -> dict[str, int]:
        return {"value": state.value + 1}

    return runner, inc


# ------------------------------------------------------------------------------ nodes


@pytest.mark.parametrize("bad", [dict, Num(value=1), "Num", None], ids=repr)
def test_runner_node_with_a_non_basemodel_input_names_the_argument_and_the_fix(bad: Any) -> None:
    """``@runner.node(input=<not a model class>)`` is a PlanError (a TypeError) naming the
    node, the argument, what was given and how to declare a model; nothing is registered."""
    runner = StromaRunner.quick()
    with pytest.raises(TypeError) as info:
        runner.node("summarize", input=bad, output=Num)
    msg = str(info.value)
    assert isinstance(info.value, PlanError)
    assert "@runner.node('summarize', input=...)" in msg
    assert "pydantic BaseModel subclass" in msg
    assert ("dict" in msg) if bad is dict else (repr(bad) in msg)
    assert "input=MyState" in msg
    assert "summarize" not in runner.registry


def test_runner_node_with_a_non_basemodel_output_names_output() -> None:
    """The same check applies to ``output=``, and the message says ``output``."""
    with pytest.raises(PlanError, match=r"output=\.\.\.\) must be a pydantic BaseModel"):
        StromaRunner.quick().node("n", input=Num, output=int)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["", 3, None])
def test_runner_node_with_a_bad_id_is_refused_before_registering(bad: Any) -> None:
    """An empty or non-string node id is refused at ``@runner.node(...)`` with an example."""
    runner = StromaRunner.quick()
    with pytest.raises(PlanError, match="node id must be a non-empty string") as info:
        runner.node(bad, input=Num, output=Num)
    assert repr(bad) in str(info.value) and "@runner.node('summarize'" in str(info.value)
    assert len(runner.registry) == 0


def test_stroma_node_with_a_bad_id_names_the_call_and_the_fix() -> None:
    """``stroma_node(None)`` names the call, what an id must be, and an example."""
    with pytest.raises(PlanError, match=r"stroma_node\(node_id=None\)") as info:
        stroma_node(None)  # type: ignore[arg-type]
    assert "non-empty string" in str(info.value) and "stroma_node('fetch'" in str(info.value)


@pytest.mark.anyio
async def test_a_sync_function_in_a_plan_is_named_with_both_fixes(anyio_backend: str) -> None:
    """An undecorated plain ``def`` in a pipeline is a TypeError naming it, the decorator,
    and that it must be async."""
    runner, inc = runner_with_node()

    def tidy(state: Num) -> dict[str, int]:
        return {"value": state.value}

    with pytest.raises(TypeError) as info:
        await runner.run([inc, tidy], Num(value=1))
    msg = str(info.value)
    assert "tidy" in msg and "not a stroma node" in msg
    assert "@runner.node(" in msg and "async def" in msg


@pytest.mark.anyio
async def test_a_marked_sync_function_in_a_plan_is_named(anyio_backend: str) -> None:
    """A sync function marked with ``stroma_node`` is refused at run time, before any node
    runs, naming the node id, the function and 'async def'."""
    runner, inc = runner_with_node()
    contract = NodeContract(node_id="tidy", input_schema=Num, output_schema=Num)
    ran: list[str] = []

    @stroma_node("tidy", contract)
    def tidy(state: Num) -> dict[str, int]:
        ran.append("tidy")
        return {"value": state.value}

    with pytest.raises(TypeError, match=r"node 'tidy' \(.*tidy\) is not an async function") as info:
        await runner.run([inc, tidy], Num(value=1))
    assert "async def" in str(info.value)
    assert ran == []


def test_runner_node_on_a_sync_function_says_async_def() -> None:
    """``@runner.node`` on a plain ``def`` is refused at decoration, naming it."""
    runner = StromaRunner.quick()
    with pytest.raises(TypeError, match=r"@runner.node\('tidy'\) decorates .*tidy, which is not"
                                        r" async: define it with 'async def'"):
        @runner.node("tidy", input=Num, output=Num)
        def tidy(state: Num) -> dict[str, int]:
            return {}


# ------------------------------------------------------------------------- RunConfig


@pytest.mark.parametrize("hooks", [{"on_node_start": None}, "hooks", [1]], ids=repr)
def test_run_config_hooks_that_are_not_node_hooks(hooks: Any) -> None:
    """``RunConfig(hooks=<not NodeHooks>)`` is a TypeError naming the field, the value, and
    ``NodeHooks(...)``; for a dict the fix is ``NodeHooks(**your_dict)``."""
    with pytest.raises(TypeError) as info:
        RunConfig(hooks=hooks)
    msg = str(info.value)
    assert "RunConfig.hooks must be a NodeHooks" in msg
    assert type(hooks).__name__ in msg and repr(hooks) in msg
    fix = "NodeHooks(**your_dict)" if isinstance(hooks, dict) else "NodeHooks(on_node_start="
    assert fix in msg
    with pytest.raises(TypeError, match=r"RunConfig\.hooks must be a NodeHooks"):
        StromaRunner.quick().with_hooks(hooks)


def test_an_unknown_run_config_field_is_refused_with_the_closest_one() -> None:
    """A typo (``hook=`` for ``hooks=``) is a TypeError naming it and the field meant,
    not a setting silently dropped; ``StromaRunner.quick`` refuses it too."""
    with pytest.raises(TypeError) as info:
        RunConfig(hook=None)
    msg = str(info.value)
    assert "unknown field 'hook'" in msg and "did you mean 'hooks'?" in msg
    with pytest.raises(TypeError, match=r"unexpected keyword argument.*'node_timeout'"):
        StromaRunner.quick(node_timeout={"a": 5})
    with pytest.raises(TypeError, match=r"unknown field 'zzz' \(remove it\)"):
        RunConfig(zzz=1)


@pytest.mark.parametrize("ms", [-5, 0, float("nan"), float("inf")], ids=repr)
def test_node_timeouts_must_be_positive_milliseconds(ms: float) -> None:
    """``node_timeouts={'x': -5}`` (or 0, NaN, inf) is refused naming the node, the value,
    the unit and an example."""
    with pytest.raises(ValueError) as info:
        RunConfig(node_timeouts={"x": ms})
    msg = str(info.value)
    assert "node_timeouts['x'] must be a number of milliseconds > 0" in msg
    assert f"got {float(ms)!r}" in msg
    assert "node_timeouts={'x': 30_000}" in msg
    with pytest.raises(ValueError, match=r"node_timeouts\['x'\]"):
        StromaRunner.quick().with_node_timeouts({"x": ms})


@pytest.mark.parametrize(("arg", "unit"), [("tokens", "tokens"), ("cost_usd", "US dollars"),
                                           ("latency_ms", "milliseconds")])
def test_with_budget_negative_limit_names_the_argument(arg: str, unit: str) -> None:
    """``with_budget(tokens=-1)`` is a ValueError naming the builder argument, its unit,
    the None alternative and an example, and leaves the runner's budget alone."""
    runner = StromaRunner.quick()
    with pytest.raises(ValueError) as info:
        runner.with_budget(**{arg: -1})
    msg = str(info.value)
    assert msg.startswith(f"with_budget({arg}=-1)")
    assert f"number of {unit} >= 0" in msg and "None for no limit" in msg
    assert f"e.g. with_budget({arg}=" in msg
    assert runner.config.budget is None


def test_execution_budget_negative_limit_names_the_field_and_the_fix() -> None:
    """``ExecutionBudget(max_cost_usd=-1)`` names the field, the value and None."""
    with pytest.raises(ValidationError) as info:
        ExecutionBudget(max_cost_usd=-1)
    msg = str(info.value)
    assert "ExecutionBudget.max_cost_usd must be >= 0, got -1" in msg
    assert "use None for no limit" in msg


def test_failure_policy_negative_retries_explains_the_count_and_the_fix() -> None:
    """``FailurePolicy(max_retries=-1)`` names the field and value, says what the number
    counts, and suggests ``max_retries=0``."""
    with pytest.raises(ValidationError) as info:
        FailurePolicy(max_retries=-1)
    msg = str(info.value)
    assert "FailurePolicy.max_retries must be >= 0, got -1" in msg
    assert "retries after the first attempt" in msg
    assert "FailurePolicy(max_retries=0)" in msg
    with pytest.raises(ValidationError, match=r"backoff_seconds must be >= 0, got -0.5"):
        FailurePolicy(backoff_seconds=-0.5)


@pytest.mark.parametrize("bad", ["nope", 42, "FailureClass.TERMINAL"], ids=repr)
def test_a_classifier_that_is_not_callable_is_named_by_position(bad: Any) -> None:
    """A non-callable classifier is a TypeError naming its position and value, the expected
    signature, and the fix."""
    def fine(exc: Exception, ctx: Any) -> None:
        return None

    with pytest.raises(TypeError) as info:
        RunConfig(classifiers=[fine, bad])
    msg = str(info.value)
    assert f"classifiers[1] is {bad!r}" in msg and "not callable" in msg
    assert "(exc, NodeContext) -> FailureClass | None" in msg
    assert "classifiers=[my_classifier]" in msg
    with pytest.raises(TypeError, match=r"classifiers\[0\]"):
        StromaRunner.quick().with_classifiers([bad])


def test_a_single_classifier_not_in_a_list_says_wrap_it() -> None:
    """Passing one classifier function instead of a list says to wrap it in a list."""
    def openai_classifier(exc: Exception, ctx: Any) -> None:
        return None

    with pytest.raises(TypeError) as info:
        StromaRunner.quick().with_classifiers(openai_classifier)  # type: ignore[arg-type]
    msg = str(info.value)
    assert "single callable" in msg and "openai_classifier" in msg
    assert "classifiers=[openai_classifier]" in msg
    with pytest.raises(TypeError, match=r"classifiers=\[my_classifier\]"):
        RunConfig(classifiers=lambda e, c: None)  # type: ignore[arg-type]


def test_node_policies_given_a_single_policy_shows_the_nested_shape() -> None:
    """``node_policies={'x': FailurePolicy()}`` (one level short) shows the nested shape."""
    with pytest.raises(TypeError) as info:
        StromaRunner.quick().with_node_policies({"x": FailurePolicy()})  # type: ignore[dict-item]
    msg = str(info.value)
    assert "node_policies['x'] must map failure classes to policies" in msg
    assert "{'x': {FailureClass.RECOVERABLE: FailurePolicy(...)}}" in msg


def test_context_that_is_not_a_dict() -> None:
    """``with_context([...])`` names RunConfig.context, the value found and an example."""
    with pytest.raises(TypeError) as info:
        StromaRunner.quick().with_context([("http", None)])  # type: ignore[arg-type]
    msg = str(info.value)
    assert "RunConfig.context must be a dict" in msg and "list" in msg
    assert "context={'http': client" in msg


def test_quick_with_an_unknown_field_is_a_type_error_listing_the_fields() -> None:
    """A misspelt keyword to ``StromaRunner.quick`` is not silently ignored: the TypeError
    names it and lists the accepted fields."""
    with pytest.raises(TypeError) as info:
        StromaRunner.quick(node_timeout={"x": 5})
    msg = str(info.value)
    assert "unexpected keyword argument(s) 'node_timeout'" in msg
    assert "node_timeouts" in msg and "resume_from" in msg


@pytest.mark.anyio
async def test_a_config_that_is_not_a_run_config_says_how_to_make_one(
    anyio_backend: str,
) -> None:
    """``config={"run_id": ...}`` (a dict where a RunConfig goes) is a TypeError naming
    the argument, what it got and the fix, for interpret, simulate and StromaRunner."""
    from interpreters.simulate import simulate

    _, inc = runner_with_node()
    for call in (lambda: interpret([inc], Num(value=1), config={"run_id": "r"}),
                 lambda: simulate([inc], Num(value=1), config={"run_id": "r"})):
        with pytest.raises(TypeError) as info:
            await call()  # type: ignore[arg-type]
        assert "(config=...): expected a RunConfig, got {'run_id': 'r'} (a dict)" in str(
            info.value)
        assert "pass RunConfig(**config)" in str(info.value)
    with pytest.raises(TypeError, match=r"StromaRunner\(config=\.\.\.\): expected a RunConfig"):
        StromaRunner(config="fast")  # type: ignore[arg-type]


# ---------------------------------------------------------------------- initial state


@pytest.mark.anyio
async def test_interpret_with_a_dict_as_initial_state_shows_how_to_build_the_model(
    anyio_backend: str,
) -> None:
    """``interpret([...], {"value": 1})`` is a TypeError naming initial_state, the dict,
    and the fix using the plan's own input schema."""
    _, inc = runner_with_node()
    with pytest.raises(TypeError) as info:
        await interpret([inc], {"value": 1})  # type: ignore[arg-type]
    msg = str(info.value)
    assert "initial_state must be a pydantic BaseModel instance" in msg
    assert "{'value': 1}" in msg and "dict" in msg
    assert "Num(**state)" in msg and "Num.model_validate(state)" in msg


@pytest.mark.anyio
async def test_run_with_the_schema_class_as_initial_state_says_pass_an_instance(
    anyio_backend: str,
) -> None:
    """Passing the model class instead of an instance says to pass an instance."""
    runner, inc = runner_with_node()
    with pytest.raises(TypeError, match=r"pass an instance, e.g. Num\(\.\.\.\), not the class"):
        await runner.run([inc], Num)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_execute_step_with_a_dict_input_names_the_step_and_the_schema(
    anyio_backend: str,
) -> None:
    """``execute_step(..., {"value": 1}, ...)`` is a TypeError naming the step and the model."""
    async def step(state: Num) -> dict[str, int]:
        return {"value": 1}

    contract = NodeContract(node_id="s", input_schema=Num, output_schema=Num)
    with pytest.raises(TypeError) as info:
        await execute_step("s", step, {"value": 1}, ReliabilityContext.for_run(),  # type: ignore[arg-type]
                           contract=contract)
    msg = str(info.value)
    assert "execute_step('s', ...): input_state must be a pydantic BaseModel" in msg
    assert "{'value': 1}" in msg and "Num(...)" in msg


# ----------------------------------------------------------------------- combinators


def test_parallel_with_no_steps() -> None:
    """``parallel()`` says it needs at least one step, that it got none, and shows usage."""
    with pytest.raises(PlanError) as info:
        parallel()
    msg = str(info.value)
    assert "parallel() needs at least one step, got none" in msg
    assert "parallel(fetch_a, fetch_b)" in msg


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"over": "not an id", "into": "out"}, "over"),
    ({"over": "items", "into": "2nd"}, "into"),
    ({"over": 3, "into": "out"}, "over"),
])
def test_map_each_with_a_field_that_is_not_an_identifier(kwargs: dict[str, Any], name: str) -> None:
    """``map_each(over='not an id')`` names the argument and value, says a field name is
    expected, and shows usage."""
    _, inc = runner_with_node()
    with pytest.raises(PlanError) as info:
        map_each(inc, **kwargs)
    msg = str(info.value)
    assert msg.startswith(f"map_each({name}={kwargs[name]!r})")
    assert "expected a field name" in msg and f"got {kwargs[name]!r}" in msg
    assert "map_each(step, over='items', into='results')" in msg


# ------------------------------------------------------------------- hooks, stores, logs


def test_node_hooks_with_a_sync_lambda_shows_the_async_signature() -> None:
    """``NodeHooks(on_node_start=lambda ...: None)`` says lambdas cannot be async and gives
    the ``async def`` with the hook's own parameters."""
    with pytest.raises(TypeError) as info:
        NodeHooks(on_node_start=lambda run_id, node_id, state: None)
    msg = str(info.value)
    assert "NodeHooks.on_node_start must be an async function" in msg
    assert "lambda" in msg and "cannot be async" in msg
    assert "async def on_node_start(run_id, node_id, input_state)" in msg
    with pytest.raises(TypeError,
                       match=r"async def on_node_failure\(run_id, node_id, exc, failure_class\)"):
        NodeHooks(on_node_failure=lambda *a: None)


def test_checkpoint_manager_with_something_that_is_not_a_store() -> None:
    """``CheckpointManager(object())`` names what it got, the missing methods and the fix."""
    with pytest.raises(TypeError) as info:
        CheckpointManager(object())
    msg = str(info.value)
    assert "CheckpointManager() needs a checkpoint store" in msg
    assert "lacks save, load, delete" in msg
    assert "save(run_id, node_id, state)" in msg and "InMemoryStore()" in msg


@pytest.mark.parametrize("given", ["runs", Path("runs"), "redis://localhost:6379/0"])
def test_a_store_given_as_a_path_or_url_names_the_store_to_build(given: Any) -> None:
    """``interpret(plan, state, store="runs")`` (a folder's name where the store goes)
    says which store to build from it, not only the methods a str lacks."""
    with pytest.raises(StromaTypeError) as info:
        CheckpointManager(given)
    msg = str(info.value)
    assert "lacks save, load, delete" in msg
    assert f"A path or URL is no store: for a folder, FileStore({given!r}); for a server, " \
           "RedisStore('redis://...') or PostgresStore('postgresql://...')." in msg


def test_checkpoint_manager_given_a_store_class_says_pass_an_instance() -> None:
    """``CheckpointManager(InMemoryStore)`` (the class) says to pass an instance."""
    with pytest.raises(TypeError, match=r"got the class InMemoryStore.*CheckpointManager\("
                                        r"InMemoryStore\(\)\)"):
        CheckpointManager(InMemoryStore)
    with pytest.raises(TypeError, match="pass an instance"):
        StromaRunner.quick(store=InMemoryStore)


@pytest.mark.anyio
async def test_resume_with_a_schema_that_is_not_a_model(anyio_backend: str) -> None:
    """``CheckpointManager.resume(..., dict)`` names the schema argument and the fix."""
    with pytest.raises(TypeError) as info:
        await CheckpointManager().resume("r", "n", dict)  # type: ignore[arg-type]
    msg = str(info.value)
    assert "schema must be the pydantic BaseModel class" in msg and "dict" in msg
    assert "resume(run_id, 'n', MyState)" in msg


@pytest.mark.anyio
@pytest.mark.parametrize("log", ["not a log", "runs/abc/log.jsonl", b"garbage"], ids=repr)
async def test_replay_with_text_that_is_not_a_log(anyio_backend: str, log: Any) -> None:
    """``replay(plan, "not a log")`` is a LogCorrupted naming replay's log argument, what a
    log looks like, what was given, and where to get one (a path must be read first)."""
    _, inc = runner_with_node()
    with pytest.raises(LogCorrupted) as info:
        await replay([inc], log)
    msg = str(info.value)
    assert isinstance(info.value, StromaError)
    assert msg.startswith("replay(plan, log): log must be an EffectLog or the JSON-lines text")
    assert '{"stroma_log": 2, ...}' in msg
    text = log.decode() if isinstance(log, bytes) else log
    assert repr(text) in msg
    assert "result.log" in msg and "Path(path).read_text()" in msg


@pytest.mark.anyio
async def test_replay_with_a_value_that_is_not_a_log_at_all(anyio_backend: str) -> None:
    """``replay(plan, 42)`` is a TypeError (not an AttributeError) naming the log argument."""
    _, inc = runner_with_node()
    with pytest.raises(TypeError) as info:
        await replay([inc], 42)  # type: ignore[arg-type]
    msg = str(info.value)
    assert "replay(plan, log): log must be an EffectLog" in msg
    assert "got 42 (a int)" in msg and "result.log" in msg


@pytest.mark.anyio
async def test_replay_accepts_a_real_log_as_text(anyio_backend: str) -> None:
    """The log check does not refuse a real log: its JSON-lines text replays to the result."""
    runner, inc = runner_with_node()
    result = await runner.run([inc], Num(value=1))
    assert isinstance(result.log, EffectLog)
    replayed = await replay([inc], result.log.to_jsonl())
    assert replayed.final_state == result.final_state == Num(value=2)


# ------------------------------------------------------------------ the error classes


def _misuses() -> list[tuple[str, Any, type[Exception]]]:
    from interpreters.simulate import VirtualClock
    from stroma import ContractRegistry, FallbackPolicy, FileStore, RedisStore
    from stroma.schemas import _resolve_schema

    def node_hooks_sync() -> Any:
        return NodeHooks(on_node_start=lambda run_id, node_id, state: None)  # type: ignore[arg-type]

    return [
        ("FileStore(123)", lambda: FileStore(123), TypeError),  # type: ignore[arg-type]
        ("FileStore('')", lambda: FileStore(""), ValueError),
        ("StromaRunner.quick(foo=1)", lambda: StromaRunner.quick(foo=1), TypeError),
        ("RunConfig(bogus=1)", lambda: RunConfig(bogus=1), TypeError),
        ("NodeHooks(sync)", node_hooks_sync, TypeError),
        ("ContractRegistry().get('x')", lambda: ContractRegistry().get("x"), KeyError),
        ("FallbackPolicy(at_budget_pct=3)",
         lambda: FallbackPolicy("a", "b", at_budget_pct=3), ValueError),
        ("RedisStore(ttl_seconds=0)",
         lambda: RedisStore("redis://127.0.0.1:6379/0", ttl_seconds=0), ValueError),
        ("CheckpointManager(InMemoryStore)",
         lambda: CheckpointManager(InMemoryStore), TypeError),  # type: ignore[arg-type]
        ("_resolve_schema('nocolon')", lambda: _resolve_schema("nocolon"), ValueError),
        ("VirtualClock().advance(-1)", lambda: VirtualClock().advance(-1), ValueError),
    ]


@pytest.mark.parametrize("what,misuse,kind", _misuses(), ids=[m[0] for m in _misuses()])
def test_a_misused_argument_is_a_stroma_error_and_the_builtin_kind_it_was(
    what: str, misuse: Any, kind: type[Exception]
) -> None:
    """Only stroma's own errors leave the library: a wrong argument is a StromaError, and
    still the TypeError, ValueError or KeyError that code written for 0.3 catches; its
    message is the message as written (a KeyError's is not quoted)."""
    with pytest.raises(StromaError) as info:
        misuse()
    assert isinstance(info.value, kind), (what, type(info.value).__mro__)
    text = str(info.value)
    assert text and not text.startswith(("'", '"')), text


@pytest.mark.parametrize(
    ("ref", "builtin", "named"),
    [
        ("no_such_module_for_stroma:Num", ModuleNotFoundError, "no_such_module_for_stroma"),
        (f"{__name__}:NoSuchModel", AttributeError, "NoSuchModel"),
        (f"{__name__}:Num.Missing", AttributeError, "Missing"),
    ],
)
def test_resolve_schema_of_a_reference_that_names_nothing(
    ref: str, builtin: type[Exception], named: str
) -> None:
    """``_resolve_schema`` (which custom stores call) of a reference naming a module or a
    class that is not there is a StromaError, still the built-in error the earlier library
    raised, and names the reference, the missing part and the form a reference takes."""
    from stroma.checkpoint import _resolve_schema

    with pytest.raises(builtin) as info:
        _resolve_schema(ref)
    msg = str(info.value)
    assert isinstance(info.value, StromaError)
    assert repr(ref) in msg and repr(named) in msg
    assert "package.module:QualName" in msg


@pytest.mark.parametrize(
    "returned", [({"value": 1}, "gpt-4o"), ({"value": 1}, -5), ({"value": 1}, 2, 3)], ids=repr)
async def test_a_node_returning_a_tuple_that_is_no_usage_form_is_told_the_forms(
    anyio_backend: str, returned: Any
) -> None:
    """A node returning a tuple that reports usage wrongly fails its output contract with a
    message that says so and lists the forms, not only that the output is no dict."""
    runner = StromaRunner.quick()

    @runner.node("llm", input=Num, output=Num)
    async def llm(state: Num) -> Any:
        return returned

    result = await runner.run([llm], Num(value=0))
    message = result.trace.failures()[0].failure_message or ""
    assert message.startswith("Contract violation for 'llm' (output): (root): the node "
                              f"returned a tuple of {len(returned)}")
    assert "(output, tokens), (output, input_tokens, model)" in message
