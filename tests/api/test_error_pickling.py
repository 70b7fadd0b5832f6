"""stroma's errors pickle and unpickle as they were raised (their message, class and
attributes), so they cross a process boundary: multiprocessing, a task queue's worker.
Those whose ``__init__`` takes other arguments than their message used to fail to unpickle
(RunLocked, NondeterminismError, LogCorrupted, UnsafeSchemaRef, ContractViolation,
BudgetExceeded)."""

from __future__ import annotations

import pickle

import pytest

from stroma import RunConfig
from stroma.contracts import ContractViolation
from stroma.cost import BudgetExceeded
from stroma.errors import (
    ChildFailed,
    LogCorrupted,
    NondeterminismError,
    PlanError,
    RunLocked,
    StoreError,
    StromaError,
    StromaKeyError,
    StromaTypeError,
    StromaValidationError,
    UnsafeSchemaRef,
)
from stroma.inputs import InputRefused


def _validation_error() -> StromaValidationError:
    with pytest.raises(StromaValidationError) as caught:
        RunConfig(seed="not a seed")  # type: ignore[arg-type]
    return caught.value


ERRORS = [
    RunLocked("run-1", "worker-7", this_process=True),
    RunLocked("run-2", "worker-8", holder_exited=True),
    NondeterminismError(3, "CallNode('a')", "CallNode('b')", "a node renamed"),
    LogCorrupted("runs/r/log.jsonl", "line 4: not JSON"),
    UnsafeSchemaRef("evil.module.Thing", source="the checkpoint"),
    ContractViolation("fetch", "output", {"x": 1}, [{"loc": ("x",), "msg": "bad",
                                                     "type": "int_parsing"}]),
    BudgetExceeded("tokens", 100, 120, "summarize"),
    InputRefused("the payload does not fit"),
    StoreError("the server went away"),
    ChildFailed("child 2 FAILED"),
    StromaTypeError("expected a model"),
    PlanError("two steps share the id 'a'"),
    StromaKeyError("no contract for 'b'"),
]


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
def test_an_error_unpickles_as_it_was_raised(error: StromaError) -> None:
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is type(error)
    assert str(again) == str(error)
    assert again.args == error.args
    assert vars(again) == vars(error)


def test_a_validation_error_unpickles_with_its_errors() -> None:
    error = _validation_error()
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is StromaValidationError and isinstance(again, StromaError)
    assert again.errors(include_url=False) == error.errors(include_url=False)
