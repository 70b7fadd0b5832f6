"""The value-level API of stroma.trace, stroma.failures, stroma.contracts and stroma.cost."""

from __future__ import annotations

import ast
import dataclasses
import json
import pickle
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from stroma import contracts, cost, failures, trace
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
    fallback_for,
    normalize_node_return,
    resolve_model,
)
from stroma.errors import StromaError, StromaTypeError
from stroma.failures import (
    FailureClass,
    FailurePolicy,
    NodeContext,
    RetryBudget,
    StepContext,
    builtin_class_for_names,
    classify,
    default_policy_map,
    exception_type_names,
    resolve_policy,
)
from stroma.trace import (
    ExecutionResult,
    ExecutionTrace,
    RunStatus,
    TraceEvent,
    format_trace_table,
)

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
CTX = NodeContext(node_id="n", attempt=1, run_id="r")


class In(BaseModel):
    x: int


class Out(BaseModel):
    y: int
    label: str = ""


class Many(BaseModel):
    a: int
    b: int
    c: int
    d: int
    e: int
    f: int
    g: int


def event(
    node_id: str = "a",
    attempt: int = 1,
    *,
    output: dict[str, object] | None = None,
    failure: FailureClass | None = None,
    message: str | None = None,
    at: datetime = T0,
    duration_ms: int = 5,
    run_id: str = "r1",
) -> TraceEvent:
    return TraceEvent(
        node_id=node_id,
        run_id=run_id,
        attempt=attempt,
        timestamp_utc=at,
        input_state={"x": 1},
        output_state=output,
        duration_ms=duration_ms,
        failure=failure,
        failure_message=message,
    )


# --------------------------------------------------------------------------- module surface


CORE_MODULES = (trace, failures, contracts, cost)


@pytest.mark.parametrize("module", CORE_MODULES, ids=lambda m: m.__name__)
def test_all_is_a_tuple_of_real_names(module: ModuleType) -> None:
    """Each module's ``__all__`` is a tuple, and every name in it exists."""
    assert isinstance(module.__all__, tuple)
    assert len(set(module.__all__)) == len(module.__all__)
    for name in module.__all__:
        assert hasattr(module, name), f"{module.__name__}.__all__ lists missing {name}"


@pytest.mark.parametrize("module", CORE_MODULES, ids=lambda m: m.__name__)
def test_core_module_imports_nothing_impure(module: ModuleType) -> None:
    """A core module imports neither anyio, aiofiles, asyncio, time, random nor interpreters."""
    forbidden = {"anyio", "aiofiles", "asyncio", "time", "random", "interpreters", "logging"}
    assert module.__file__ is not None
    tree = ast.parse(Path(module.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots = {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots = {(node.module or "").split(".")[0]}
        else:
            continue
        assert not roots & forbidden, f"{module.__name__} imports {roots & forbidden}"


def test_aliases_are_the_same_objects() -> None:
    """The Step* aliases are the Node* names themselves, not copies."""
    assert StepContext is NodeContext
    assert StepContract is NodeContract
    assert StepViolation is ContractViolation
    assert StepUsage is NodeUsage


# ------------------------------------------------------------------------------------ trace


def test_enums_print_their_names() -> None:
    """``str()`` and f-strings of RunStatus and FailureClass give the member name."""
    assert str(RunStatus.COMPLETED) == "COMPLETED"
    assert f"{RunStatus.PARTIAL}" == "PARTIAL"
    assert [str(s) for s in RunStatus] == ["COMPLETED", "FAILED", "PARTIAL", "RESUMED", "WAITING"]
    assert [str(c) for c in FailureClass] == ["RECOVERABLE", "TERMINAL", "AMBIGUOUS"]
    assert FailureClass("TERMINAL") is FailureClass.TERMINAL


def test_trace_event_fields_and_step_id() -> None:
    """TraceEvent has the documented fields, in order, then ``coords`` (where in loops and
    maps it ran, defaulted: code that builds events positionally keeps working), and
    step_id is node_id."""
    names = [f.name for f in dataclasses.fields(TraceEvent)]
    assert names == [
        "node_id", "run_id", "attempt", "timestamp_utc", "input_state", "output_state",
        "duration_ms", "failure", "failure_message", "coords",
    ]
    e = event("extract")
    assert e.step_id == "extract"
    assert e.failure is None and e.failure_message is None
    assert not hasattr(e, "__dict__")  # slotted


def test_trace_collection_basics() -> None:
    """append/len/iter/replay keep order; events_for and failures filter; replay is a copy."""
    t = ExecutionTrace()
    t.append(event("a", 1, failure=FailureClass.RECOVERABLE, message="boom"))
    t.append(event("a", 2, output={"y": 1}))
    t.append(event("b", 1, output={"y": 2}))
    assert len(t) == 3
    assert [(e.node_id, e.attempt) for e in t] == [("a", 1), ("a", 2), ("b", 1)]
    assert [e.attempt for e in t.events_for("a")] == [1, 2]
    assert [e.node_id for e in t.failures()] == ["a"]
    replayed = t.replay()
    assert replayed == t.events and replayed is not t.events
    assert ExecutionTrace.from_events(replayed) == t


def test_trace_equality_compares_full_events() -> None:
    """Two traces are equal only when their event lists are equal, timestamps included."""
    a = ExecutionTrace([event(at=T0)])
    assert a == ExecutionTrace([event(at=T0)])
    assert a != ExecutionTrace([event(at=T0 + timedelta(seconds=1))])
    assert a != ExecutionTrace()
    assert a != [event(at=T0)]


def test_to_json_uses_iso_datetimes_and_failure_names() -> None:
    """to_json gives JSON text of one object per attempt: ISO timestamps (nested ones too)
    and the failure's name."""
    e = event("a", failure=FailureClass.TERMINAL, message="bad")
    e.input_state = {"when": T0, "n": 1}
    text = ExecutionTrace([e]).to_json()
    assert isinstance(text, str)
    [d] = json.loads(text)
    assert d["timestamp_utc"] == "2024-05-01T12:00:00+00:00"
    assert d["input_state"] == {"when": "2024-05-01T12:00:00Z", "n": 1}
    assert d["failure"] == "TERMINAL" and type(d["failure"]) is str
    assert d["output_state"] is None
    assert datetime.fromisoformat(d["timestamp_utc"]) == T0
    json.dumps(d)  # serializable as is


def test_diff_ignores_timestamps_durations_and_run_ids() -> None:
    """diff is empty for traces that differ only in timestamps, durations and run ids."""
    a = ExecutionTrace([event("a", output={"y": 1}), event("b", output={"y": 2})])
    b = ExecutionTrace([
        event("a", output={"y": 1}, at=T0 + timedelta(hours=1), duration_ms=999, run_id="r2"),
        event("b", output={"y": 2}, duration_ms=0),
    ])
    assert a.diff(b) == []
    assert a != b


def test_diff_reports_changed_and_missing_events() -> None:
    """diff names each differing field and each event present on only one side."""
    a = ExecutionTrace([event("a", output={"y": 1}), event("b", output={"y": 2})])
    b = ExecutionTrace([
        event("a", output={"y": 3}),
        event("c", 2, failure=FailureClass.AMBIGUOUS, message="x"),
    ])
    assert a.diff(b) == [
        "Difference for a attempt 1: output_state: {'y': 1} != {'y': 3}",
        "Missing event in other trace: b attempt 1",
        "Extra event in other trace: c attempt 2",
    ]


def test_diff_pairs_repeated_keys_by_occurrence() -> None:
    """A node that ran twice with the same attempt number is matched occurrence by occurrence."""
    a = ExecutionTrace([event("a", output={"y": 1}), event("a", output={"y": 2})])
    b = ExecutionTrace([event("a", output={"y": 1})])
    assert a.diff(b) == ["Missing event in other trace: a attempt 1 (occurrence 2)"]


@pytest.mark.parametrize("bad", [{"node_id": "x", "attempt": 1}, None, "a"])
def test_a_trace_refuses_what_is_not_a_trace_event_up_front(bad: object) -> None:
    """append(), the constructor and diff() name the argument and the type it must be, and
    a refused append leaves the trace as it was (it still reads, prints and diffs)."""
    t = ExecutionTrace([event("a")])
    with pytest.raises(StromaTypeError, match=r"ExecutionTrace\.append\(event\): event must "
                                              "be a TraceEvent"):
        t.append(bad)  # type: ignore[arg-type]
    with pytest.raises(StromaTypeError, match=r"ExecutionTrace\(events\): event 1 must be a "
                                              "TraceEvent"):
        ExecutionTrace([event("a"), bad])  # type: ignore[list-item]
    with pytest.raises(StromaTypeError, match=r"ExecutionTrace\.diff\(other\): other must be "
                                              "an ExecutionTrace"):
        t.diff(bad)  # type: ignore[arg-type]
    with pytest.raises(StromaTypeError, match="other must be an ExecutionTrace"):
        t.diff([event("a")])  # type: ignore[arg-type]
    assert len(t) == 1 and t.failures() == [] and len(json.loads(t.to_json())) == 1
    assert t.diff(ExecutionTrace([event("a")])) == []


def test_format_trace_table() -> None:
    """The table has a header, one aligned row per attempt, outcomes, and truncated messages."""
    long_message = "x" * 100
    t = ExecutionTrace([
        event("extract", 1, failure=FailureClass.RECOVERABLE, message=long_message),
        event("extract", 2, output={"y": 1}, duration_ms=1234),
        event("child", 1, output=None),
    ])
    lines = format_trace_table(t).splitlines()
    assert lines[0].split() == ["node", "attempt", "outcome", "duration_ms", "message"]
    assert set(lines[1]) <= {"-", " "}
    assert lines[2].split()[:4] == ["extract", "1", "RECOVERABLE", "5"]
    assert lines[2].endswith("x" * 57 + "...")
    assert len(lines[2].split()[-1]) == 60
    assert lines[3].split() == ["extract", "2", "ok", "1234"]
    assert lines[4].split() == ["child", "1", "cancelled", "5"]
    # fixed width: the outcome column starts at the same offset on every row
    outcomes = ["RECOVERABLE", "ok", "cancelled"]
    assert len({row.index(o) for row, o in zip(lines[2:], outcomes, strict=True)}) == 1
    assert format_trace_table(ExecutionTrace()).count("\n") == 1


def test_execution_result_ignores_log_in_equality() -> None:
    """ExecutionResult compares by value but not by the attached log; stop_reason defaults None."""
    a = ExecutionResult("r", RunStatus.COMPLETED, Out(y=1), ExecutionTrace(), 0.0, 0, log=object())
    b = ExecutionResult("r", RunStatus.COMPLETED, Out(y=1), ExecutionTrace(), 0.0, 0)
    assert a == b
    assert a.stop_reason is None
    assert "log" not in repr(a)


# --------------------------------------------------------------------------------- failures


def test_default_policy_map_values_and_freshness() -> None:
    """default_policy_map has the documented policies and is a new dict each call."""
    m = default_policy_map()
    assert m[FailureClass.RECOVERABLE] == FailurePolicy(max_retries=3, backoff_seconds=1.0)
    assert m[FailureClass.TERMINAL] == FailurePolicy(max_retries=0, backoff_seconds=0.0)
    assert m[FailureClass.AMBIGUOUS] == FailurePolicy(max_retries=1, backoff_seconds=0.5)
    m[FailureClass.TERMINAL] = FailurePolicy(max_retries=9)
    del m[FailureClass.AMBIGUOUS]
    fresh = default_policy_map()
    assert fresh is not m
    assert fresh[FailureClass.TERMINAL].max_retries == 0
    assert FailureClass.AMBIGUOUS in fresh
    assert resolve_policy(FailureClass.TERMINAL, "n").max_retries == 0


def test_failure_policy_defaults_and_validation() -> None:
    """FailurePolicy defaults to 3 retries / 1.0 s and rejects negative values."""
    p = FailurePolicy()
    assert (p.max_retries, p.backoff_seconds) == (3, 1.0)
    with pytest.raises(ValidationError, match="max_retries"):
        FailurePolicy(max_retries=-1)
    with pytest.raises(ValidationError, match="backoff_seconds"):
        FailurePolicy(backoff_seconds=-0.1)


def test_resolve_policy_lookup_order() -> None:
    """Per-node override wins, then the run's policy map, then the default map."""
    node = FailurePolicy(max_retries=7)
    glob = FailurePolicy(max_retries=5)
    node_policies = {"a": {FailureClass.RECOVERABLE: node}}
    policy_map = {FailureClass.RECOVERABLE: glob, FailureClass.AMBIGUOUS: glob}
    R, A, T = FailureClass.RECOVERABLE, FailureClass.AMBIGUOUS, FailureClass.TERMINAL
    assert resolve_policy(R, "a", node_policies, policy_map) is node
    assert resolve_policy(R, "b", node_policies, policy_map) is glob
    assert resolve_policy(A, "a", node_policies, policy_map) is glob  # override lacks A
    assert resolve_policy(T, "a", node_policies, policy_map) == default_policy_map()[T]
    assert resolve_policy(R, "a", None, None) == default_policy_map()[R]
    # string keys work too: FailureClass values are their names
    assert resolve_policy(R, "z", None, {"RECOVERABLE": glob}) is glob  # type: ignore[dict-item]


def test_retry_budget_counts_retries_after_the_first_attempt() -> None:
    """max_retries=3 allows three retries; 0 allows none; counts are per (run, node)."""
    budget = RetryBudget()
    three = FailurePolicy(max_retries=3)
    assert not budget.exhausted("r", "a", three)
    assert [budget.increment("r", "a") for _ in range(3)] == [1, 2, 3]
    assert budget.exhausted("r", "a", three)
    assert budget.count("r", "a") == 3
    assert budget.count("r", "b") == 0 and budget.count("other", "a") == 0
    assert budget.exhausted("r", "b", FailurePolicy(max_retries=0))


def test_classify_builtin_rules() -> None:
    """The built-in rules map each documented exception type to its class."""
    assert classify(ContractViolation("n", "input", {}, []), CTX) is FailureClass.TERMINAL
    assert classify(BudgetExceeded("cost", 1.0, 2.0, "n"), CTX) is FailureClass.RECOVERABLE
    assert classify(TimeoutError(), CTX) is FailureClass.RECOVERABLE
    assert classify(ValueError(), CTX) is FailureClass.AMBIGUOUS
    assert classify(KeyError(), CTX) is FailureClass.AMBIGUOUS


def test_classify_checks_stroma_errors_before_value_error() -> None:
    """A ContractViolation or BudgetExceeded that is also a ValueError keeps its own class."""

    class VV(ContractViolation, ValueError):
        pass

    class BV(BudgetExceeded, ValueError):
        pass

    assert classify(VV("n", "output", {}, []), CTX) is FailureClass.TERMINAL
    assert classify(BV("tokens", 1, 2, "n"), CTX) is FailureClass.RECOVERABLE


def test_classify_custom_classifiers_in_order() -> None:
    """Custom classifiers run in list order, the first non-None wins, None defers to built-ins."""
    seen: list[str] = []

    def defer(exc: Exception, ctx: NodeContext) -> FailureClass | None:
        seen.append("defer")
        return None

    def terminal(exc: Exception, ctx: NodeContext) -> FailureClass | None:
        seen.append("terminal")
        return FailureClass.TERMINAL

    def never(exc: Exception, ctx: NodeContext) -> FailureClass | None:
        seen.append("never")
        return FailureClass.RECOVERABLE

    assert classify(TimeoutError(), CTX, [defer, terminal, never]) is FailureClass.TERMINAL
    assert seen == ["defer", "terminal"]
    assert classify(TimeoutError(), CTX, [defer]) is FailureClass.RECOVERABLE
    assert classify(TimeoutError(), CTX, []) is FailureClass.RECOVERABLE


def test_classify_passes_the_context() -> None:
    """A classifier sees the attempt number and node id of the failed attempt."""

    def escalate(exc: Exception, ctx: NodeContext) -> FailureClass | None:
        return FailureClass.TERMINAL if ctx.attempt >= 3 else None

    second, third = NodeContext("n", 2, "r"), NodeContext("n", 3, "r")
    assert classify(TimeoutError(), second, [escalate]) is FailureClass.RECOVERABLE
    assert classify(TimeoutError(), third, [escalate]) is FailureClass.TERMINAL


def test_classifier_returning_junk_is_a_clear_type_error() -> None:
    """A classifier returning neither a FailureClass nor None is named in a TypeError."""

    def sloppy(exc: Exception, ctx: NodeContext) -> FailureClass | None:
        return True  # type: ignore[return-value]

    with pytest.raises(TypeError, match=r"classifier .*sloppy returned True .*FailureClass or"):
        classify(ValueError(), CTX, [sloppy])


class _CVValue(ContractViolation, ValueError):
    pass


class _MyTimeout(TimeoutError):
    pass


class _MyValue(ValueError):
    pass


class _TimeoutValue(ValueError, TimeoutError):
    pass


_EXCEPTIONS: list[Exception] = [
    ContractViolation("n", "input", {}, []),
    _CVValue("n", "input", {}, []),
    BudgetExceeded("latency", 1, 2, "n"),
    TimeoutError("t"),
    _MyTimeout(),
    _TimeoutValue(),
    ValueError("v"),
    _MyValue(),
    UnicodeDecodeError("utf-8", b"", 0, 1, "bad"),
    KeyError("k"),
    RuntimeError("r"),
    OSError("o"),
    ConnectionError("c"),
    Exception("e"),
]


@given(st.sampled_from(_EXCEPTIONS))
def test_names_twin_agrees_with_classify(exc: Exception) -> None:
    """builtin_class_for_names on an exception's MRO names gives what classify gives it."""
    names = exception_type_names(exc)
    assert names[0] == f"{type(exc).__module__}.{type(exc).__qualname__}"
    assert names[-1] == "builtins.object"
    assert builtin_class_for_names(names) is classify(exc, CTX)
    assert builtin_class_for_names(list(names)) is classify(exc, CTX)


def test_builtin_class_for_names_fixed_names() -> None:
    """The data-level rules recognise the documented fully qualified names."""
    assert builtin_class_for_names(["x.Y", "stroma.contracts.ContractViolation",
                                    "builtins.ValueError"]) is FailureClass.TERMINAL
    assert builtin_class_for_names(["stroma.cost.BudgetExceeded"]) is FailureClass.RECOVERABLE
    assert builtin_class_for_names(["builtins.TimeoutError"]) is FailureClass.RECOVERABLE
    assert builtin_class_for_names(["builtins.ValueError"]) is FailureClass.AMBIGUOUS
    assert builtin_class_for_names([]) is FailureClass.AMBIGUOUS
    assert builtin_class_for_names(["mylib.ContractViolation"]) is FailureClass.AMBIGUOUS


# -------------------------------------------------------------------------------- contracts


def test_node_contract_rejects_non_models() -> None:
    """NodeContract names the field, what it got and what to pass when a schema is no model."""
    c = NodeContract(node_id="n", input_schema=In, output_schema=Out)
    assert c.input_schema is In
    with pytest.raises(ValidationError, match=r"output_schema must be a pydantic BaseModel "
                                              r"subclass, got the class dict"):
        NodeContract(node_id="n", input_schema=In, output_schema=dict)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match=r"input_schema .*got In\(x=1\) \(an instance of"):
        NodeContract(node_id="n", input_schema=In(x=1), output_schema=Out)  # type: ignore[arg-type]


def test_contract_violation_message_format() -> None:
    """str() is 'Contract violation for <id> (<direction>): loc: msg; loc: msg'."""
    errors: list[dict[str, object]] = [
        {"loc": ("y",), "msg": "Field required", "type": "missing"},
        {"loc": ("items", 0, "name"), "msg": "Input should be a valid string", "type": "x"},
    ]
    v = ContractViolation("summarize", "output", {"z": 1}, errors)
    assert str(v) == (
        "Contract violation for 'summarize' (output): y: Field required; "
        "items.0.name: Input should be a valid string"
    )
    assert (v.node_id, v.direction, v.raw, v.errors) == ("summarize", "output", {"z": 1}, errors)
    assert isinstance(v, StromaError)


@pytest.mark.parametrize(("count", "suffix"), [(4, ""), (5, ""), (6, "; ... and 1 more"),
                                                (12, "; ... and 7 more")])
def test_contract_violation_lists_at_most_five_errors(count: int, suffix: str) -> None:
    """At most five errors are listed, then '; ... and N more'."""
    errors = [{"loc": (f"f{i}",), "msg": "bad"} for i in range(count)]
    listed = "; ".join(f"f{i}: bad" for i in range(min(count, 5)))
    assert str(ContractViolation("n", "input", {}, errors)) == (
        f"Contract violation for 'n' (input): {listed}{suffix}"
    )


def test_contract_violation_from_real_validation_errors() -> None:
    """Seven missing fields give five listed, '... and 2 more', and pydantic's error dicts."""
    contract = NodeContract(node_id="n", input_schema=Many, output_schema=Out)
    with pytest.raises(ContractViolation) as info:
        BoundaryValidator()(contract, "input", {})
    v = info.value
    assert str(v) == (
        "Contract violation for 'n' (input): a: Field required; b: Field required; "
        "c: Field required; d: Field required; e: Field required; ... and 2 more"
    )
    assert len(v.errors) == 7 and v.errors[0]["type"] == "missing"
    assert isinstance(v.__cause__, ValidationError)


def test_exceptions_survive_pickling() -> None:
    """ContractViolation and BudgetExceeded pickle with their attributes and message."""
    v = ContractViolation("n", "input", {"x": "a"}, [{"loc": ("x",), "msg": "bad"}])
    v2 = pickle.loads(pickle.dumps(v))
    assert (str(v2), v2.node_id, v2.raw) == (str(v), "n", {"x": "a"})
    b = BudgetExceeded("cost", 1.0, 1.5, "n")
    b2 = pickle.loads(pickle.dumps(b))
    assert (str(b2), b2.dimension, b2.limit, b2.actual) == (str(b), "cost", 1.0, 1.5)
    assert b2.node_id == "n"


def test_boundary_validator_accepts_dicts_and_models() -> None:
    """A dict is validated, a schema instance returned as is, another model re-validated."""
    validate = BoundaryValidator()
    contract = NodeContract(node_id="n", input_schema=In, output_schema=Out)
    assert validate(contract, "input", {"x": "3"}) == In(x=3)
    same = Out(y=1)
    assert validate(contract, "output", same) is same

    class Other(BaseModel):
        y: int
        extra: str = "ignored"

    got = validate(contract, "output", Other(y=2))
    assert type(got) is Out and got == Out(y=2)


def test_boundary_validator_rejects_non_mappings_clearly() -> None:
    """A value that is neither a mapping nor a model is a ContractViolation naming its type."""
    validate = BoundaryValidator()
    contract = NodeContract(node_id="n", input_schema=In, output_schema=Out)
    with pytest.raises(ContractViolation, match=r"\(output\): \(root\): expected a dict or a Out "
                                                r"instance, got list$"):
        validate(contract, "output", [1, 2])
    with pytest.raises(ContractViolation, match=r"got tuple; a node reports usage by returning"):
        validate(contract, "output", ({"y": 1}, "lots"))
    with pytest.raises(ContractViolation) as info:
        validate(contract, "input", {"x": "nope"})
    assert info.value.direction == "input" and info.value.raw == {"x": "nope"}
    assert str(info.value).startswith("Contract violation for 'n' (input): x: Input should be")
    with pytest.raises(ValueError, match="direction must be 'input' or 'output', got 'sideways'"):
        validate(contract, "sideways", {})


def test_contract_registry() -> None:
    """register replaces by id; get raises a helpful KeyError; validation and iteration work."""
    reg = ContractRegistry()
    first = NodeContract(node_id="a", input_schema=In, output_schema=In)
    second = NodeContract(node_id="a", input_schema=In, output_schema=Out)
    reg.register(first)
    reg.register(second)
    reg.register(NodeContract(node_id="b", input_schema=Out, output_schema=Many))
    assert reg.get("a") is second
    assert "a" in reg and "zzz" not in reg
    assert [c.node_id for c in reg] == ["a", "b"]
    assert reg.schemas() == {In, Out, Many}
    assert reg.validate_input("a", {"x": 1}) == In(x=1)
    assert reg.validate_output("a", {"y": 1}) == Out(y=1)
    with pytest.raises(ContractViolation, match=r"'a' \(output\): y: Field required"):
        reg.validate_output("a", {})
    with pytest.raises(KeyError, match=r"no contract .* node 'zzz' \(registered: 'a', 'b'\)"):
        reg.get("zzz")
    with pytest.raises(TypeError, match="register\\(\\) expects a NodeContract, got dict"):
        reg.register({"node_id": "c"})  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------- cost


def test_known_model_prices() -> None:
    """KNOWN_MODELS holds the documented per-1M-token prices."""
    assert KNOWN_MODELS["gpt-4o"] == (2.50, 10.00)
    assert KNOWN_MODELS["gpt-4o-mini"] == (0.15, 0.60)
    assert KNOWN_MODELS["gpt-4-turbo"] == (10.0, 30.0)
    assert KNOWN_MODELS["claude-opus-4-6"] == (15.0, 75.0)
    assert KNOWN_MODELS["claude-sonnet-4-6"] == (3.0, 15.0)
    assert KNOWN_MODELS["claude-haiku-4-5"] == (0.80, 4.00)
    assert KNOWN_MODELS["gemini-1.5-pro"] == (3.50, 10.50)
    assert KNOWN_MODELS["gemini-1.5-flash"] == (0.35, 1.05)


def test_estimate_cost_arithmetic() -> None:
    """Cost is input and output tokens priced per million; unknown or absent models cost 0."""
    assert estimate_cost_usd("gpt-4o", 1_000_000, 1_000_000) == pytest.approx(12.50)
    assert estimate_cost_usd("claude-sonnet-4-6", 2_000) == pytest.approx(0.006)
    assert estimate_cost_usd("gpt-4o-mini", 1_000, 500) == pytest.approx(0.00045)
    assert estimate_cost_usd("my-local-llm", 10**9, 10**9) == 0.0
    assert estimate_cost_usd(None, 10**9) == 0.0


@pytest.mark.parametrize(("args", "name"), [
    (("5",), "input_tokens"), ((5, "5"), "output_tokens"), ((None,), "input_tokens"),
    (([1], 2), "input_tokens"),
])
def test_estimate_cost_names_a_token_count_that_is_no_number(
    args: tuple[object, ...], name: str
) -> None:
    """A token count of the wrong kind is a StromaTypeError naming the argument (a
    TypeError too), not the comparison's raw TypeError."""
    with pytest.raises(StromaTypeError, match=rf"estimate_cost_usd\('gpt-4o', .*\): {name} "
                                              "must be a number"):
        estimate_cost_usd("gpt-4o", *args)  # type: ignore[arg-type]
    assert estimate_cost_usd("gpt-4o", 1.5, True) == pytest.approx((1.5 * 2.5 + 10) / 1e6)


def test_budget_first_exceeded_and_first_spent() -> None:
    """first_exceeded needs actual > limit, first_spent actual >= limit; tokens come first."""
    b = ExecutionBudget(max_tokens_total=100, max_cost_usd=1.0, max_latency_ms=1000)
    assert b.first_exceeded(100, 1.0, 1000) is None
    assert b.first_spent(100, 1.0, 1000) == ("tokens", 100, 100)
    assert b.first_spent(99, 1.0, 1000) == ("cost", 1.0, 1.0)
    assert b.first_exceeded(101, 2.0, 2000) == ("tokens", 100, 101)
    assert b.first_exceeded(0, 0.0, 1001) == ("latency", 1000, 1001)
    unlimited = ExecutionBudget.unlimited()
    assert unlimited.first_exceeded(10**12, 1e9, 1e9) is None
    assert unlimited.first_spent(10**12, 1e9, 1e9) is None
    with pytest.raises(ValidationError):
        ExecutionBudget(max_cost_usd=-1)


def test_budget_exceeded_message() -> None:
    """BudgetExceeded names the dimension, node, usage, limit and the setting to raise."""
    e = BudgetExceeded("cost", 0.5, 0.75, "summarize")
    assert str(e) == (
        "cost budget exceeded after node 'summarize': the run has used $0.75, over the "
        "limit of $0.5. Raise ExecutionBudget(max_cost_usd=...) or make the pipeline use less."
    )
    assert "150 tokens" in str(BudgetExceeded("tokens", 100, 150, "n"))
    assert "max_latency_ms" in str(BudgetExceeded("latency", 10, 12, "n"))
    # At the limit (spent, as when a group starts no more children): not "over" it.
    assert "used 100 tokens, all of the limit of 100 tokens" in str(
        BudgetExceeded("tokens", 100, 100, "n"))


def test_cost_tracker_accumulates_running_totals() -> None:
    """record adds to per-node and run totals without touching the caller's NodeUsage."""
    tracker = CostTracker()
    first = NodeUsage("a", 100, 0.25, 10, model="gpt-4o", output_tokens=40)
    tracker.record(first)
    tracker.record(NodeUsage("a", 50, 0.5, 5, output_tokens=10))
    tracker.record(NodeUsage("b", 1, 0.0, 1))
    totals = (tracker.total_tokens, tracker.total_cost_usd, tracker.total_latency_ms)
    assert totals == (151, 0.75, 16)
    assert tracker.by_node["a"] == NodeUsage("a", 150, 0.75, 15, model="gpt-4o", output_tokens=50)
    assert first == NodeUsage("a", 100, 0.25, 10, model="gpt-4o", output_tokens=40)
    s = tracker.summary()
    assert s == {"a": tracker.by_node["a"], "b": NodeUsage("b", 1, 0.0, 1)}
    with pytest.raises(TypeError):
        tracker.by_node["c"] = first  # type: ignore[index]


def test_cost_tracker_check_budget_on_cumulative_totals() -> None:
    """check_budget raises only once a cumulative total goes over a limit."""
    tracker = CostTracker()
    budget = ExecutionBudget(max_tokens_total=100)
    tracker.record(NodeUsage("a", 60, 0.0, 1))
    tracker.check_budget(budget, "a")
    tracker.record(NodeUsage("b", 40, 0.0, 1))
    tracker.check_budget(budget, "b")  # exactly at the limit is fine
    tracker.check_budget(None, "b")
    tracker.record(NodeUsage("c", 1, 0.0, 1))
    with pytest.raises(BudgetExceeded) as info:
        tracker.check_budget(budget, "c")
    assert (info.value.dimension, info.value.limit, info.value.actual, info.value.node_id) == (
        "tokens", 100, 101, "c")


def test_budget_and_fallback_helpers_name_an_argument_of_the_wrong_kind() -> None:
    """check_budget, resolve_model and fallback_for raise a StromaTypeError naming the
    argument and the type it must be (not an AttributeError or a bare TypeError)."""
    budget = ExecutionBudget(max_cost_usd=1.0)
    policies = [FallbackPolicy("gpt-4o", "gpt-4o-mini")]
    with pytest.raises(StromaTypeError, match=r"^CostTracker\.check_budget\(budget, node_id\): "
                                              "budget must be an ExecutionBudget or None"):
        CostTracker().check_budget({"max_tokens_total": 1}, "a")  # type: ignore[arg-type]
    call = r"^resolve_model\(declared, tracker, budget, fallbacks\): "
    with pytest.raises(StromaTypeError, match=call + "tracker must be a CostTracker"):
        resolve_model("gpt-4o", None, budget, policies)  # type: ignore[arg-type]
    with pytest.raises(StromaTypeError, match=call + "fallbacks must be a sequence of "
                                                     "FallbackPolicy, got None"):
        resolve_model("gpt-4o", CostTracker(), budget, None)  # type: ignore[arg-type]
    with pytest.raises(StromaTypeError, match=call + r"fallbacks\[1\] must be a FallbackPolicy"):
        resolve_model("x", CostTracker(), budget, [*policies, "gpt-4o"])  # type: ignore[list-item]
    with pytest.raises(StromaTypeError, match=call + "budget must be an ExecutionBudget"):
        resolve_model("gpt-4o", CostTracker(), {"max_cost_usd": 1}, [])  # type: ignore[arg-type]
    with pytest.raises(StromaTypeError, match=r"^fallback_for\(.*\): budget must be an "
                                              "ExecutionBudget"):
        fallback_for(0.5, {"max_cost_usd": 1}, policies, None)  # type: ignore[arg-type]
    tracker = CostTracker()
    tracker.record(NodeUsage("a", 1, 0.9, 1))
    assert resolve_model("gpt-4o", tracker, budget, policies) == "gpt-4o-mini"  # (still works)


def test_model_fallback_thresholds() -> None:
    """A fallback applies at spend / max_cost_usd >= at_budget_pct, for its own model only."""
    budget = ExecutionBudget(max_cost_usd=1.0)
    fallbacks = [
        FallbackPolicy("gpt-4o", "gpt-4o-mini"),
        FallbackPolicy("claude-opus-4-6", "claude-haiku-4-5", 0.5),
    ]
    assert fallback_for(0.79, budget, fallbacks, "gpt-4o") is None
    assert fallback_for(0.80, budget, fallbacks, "gpt-4o") is fallbacks[0]
    assert fallback_for(0.5, budget, fallbacks, "claude-opus-4-6") is fallbacks[1]
    assert fallback_for(0.99, budget, fallbacks, "gemini-1.5-pro") is None
    assert fallback_for(0.99, budget, fallbacks, None) is fallbacks[0]
    assert fallback_for(0.99, None, fallbacks, "gpt-4o") is None
    assert fallback_for(0.99, ExecutionBudget(max_tokens_total=5), fallbacks, "gpt-4o") is None
    assert fallback_for(0.0, ExecutionBudget(max_cost_usd=0.0), fallbacks, "gpt-4o") is fallbacks[0]


def test_model_fallback_tiers() -> None:
    """With several policies for one model, the first whose threshold is reached applies."""
    budget = ExecutionBudget(max_cost_usd=10.0)
    tiers = [
        FallbackPolicy("gpt-4o", "gpt-4o-mini", 0.9),
        FallbackPolicy("gpt-4o", "gpt-4-turbo", 0.5),
    ]
    assert fallback_for(4.0, budget, tiers, "gpt-4o") is None
    assert fallback_for(6.0, budget, tiers, "gpt-4o") is tiers[1]
    assert fallback_for(9.5, budget, tiers, "gpt-4o") is tiers[0]


def test_resolve_model_uses_the_tracker_spend() -> None:
    """resolve_model returns the declared model below the threshold and the fallback at it."""
    budget = ExecutionBudget(max_cost_usd=2.0)
    fallbacks = [FallbackPolicy("gpt-4o", "gpt-4o-mini", at_budget_pct=0.5)]
    tracker = CostTracker()
    assert resolve_model("gpt-4o", tracker, budget, fallbacks) == "gpt-4o"
    tracker.record(NodeUsage("a", 0, 1.0, 0))
    assert resolve_model("gpt-4o", tracker, budget, fallbacks) == "gpt-4o-mini"
    assert resolve_model("claude-opus-4-6", tracker, budget, fallbacks) == "claude-opus-4-6"
    assert resolve_model(None, tracker, budget, fallbacks) == "gpt-4o-mini"
    assert resolve_model(None, tracker, budget, []) is None


def test_fallback_policy_and_model_hint_values() -> None:
    """FallbackPolicy defaults to 80%, rejects fractions outside [0, 1]; ModelHint has defaults."""
    assert FallbackPolicy("a", "b").at_budget_pct == 0.80
    with pytest.raises(ValueError, match=r"at_budget_pct must be a fraction in \[0, 1\], got 80"):
        FallbackPolicy("a", "b", 80)
    hint = ModelHint("n", "gpt-4o")
    assert (hint.fallback_model, hint.max_tokens) == (None, None)


def test_normalize_node_return_forms() -> None:
    """Each documented return form splits into (output, input_tokens, output_tokens, model)."""
    out = {"y": 1}
    model = Out(y=1)
    assert normalize_node_return(out) == (out, 0, 0, None)
    assert normalize_node_return(model) == (model, 0, 0, None)
    assert normalize_node_return((out, 120)) == (out, 120, 0, None)
    assert normalize_node_return((model, 120, "gpt-4o")) == (model, 120, 0, "gpt-4o")
    assert normalize_node_return((out, 120, None)) == (out, 120, 0, None)
    assert normalize_node_return((out, 100, 20, "gpt-4o")) == (out, 100, 20, "gpt-4o")
    assert normalize_node_return(normalize_node_return((out, 5))[0]) == (out, 0, 0, None)


@pytest.mark.parametrize("value", [
    None, 42, "text", [1, 2], ({"y": 1},), ({"y": 1}, 1, 2, "m", "extra"),
    ({"y": 1}, "many"), ({"y": 1}, True), ({"y": 1}, -5), ({"y": 1}, 10, 20),
    ({"y": 1}, 1, 2, 3), ([1], 10), ("not a dict", 10, "gpt-4o"),
])
def test_normalize_node_return_leaves_other_values_alone(value: object) -> None:
    """Anything that is not a documented form comes back unchanged, with no usage."""
    got = normalize_node_return(value)
    assert got[0] is value and got[1:] == (0, 0, None)


class _Spend(BaseModel):
    value: int = 0


@given(
    policies=st.lists(st.tuples(st.sampled_from(["a", "b"]), st.floats(0, 1)), max_size=3),
    limit=st.one_of(st.none(), st.just(0.0), st.floats(0.001, 100)),
    declared=st.sampled_from([None, "a", "b", "c"]),
    spend=st.floats(0, 200),
)
def test_the_machine_falls_back_exactly_when_fallback_for_says_so(
    policies: list[tuple[str, float]], limit: float | None, declared: str | None,
    spend: float,
) -> None:
    """The model the machine gives a call is ``fallback_for``'s answer at the run's spend,
    whatever the policies, the cost limit and the declared model (the machine asks it only
    when the spend reaches the least threshold, which must never change the answer)."""
    from stroma import stroma_node
    from stroma.machine import MachineConfig, _fallback_model, _next, start
    from stroma.plan import compile_plan

    async def f(s: _Spend) -> _Spend:
        return s

    node = stroma_node("f", NodeContract(node_id="f", input_schema=_Spend,
                                         output_schema=_Spend))(f)
    fallbacks = tuple(FallbackPolicy(p, f"{p}-mini", at_budget_pct=pct) for p, pct in policies)
    config = MachineConfig(run_id="r", seed=1, started_at=datetime(2026, 1, 1, tzinfo=UTC),
                           max_cost_usd=limit, fallbacks=fallbacks, declared_model=declared)
    state, _ = start(compile_plan([node]), _Spend(), config)
    state = _next(state, state.phase, state.current, cost_usd=spend)
    expected = fallback_for(spend, config.budget, fallbacks, declared)
    assert _fallback_model(state) == (None if expected is None else expected.fallback_model)
