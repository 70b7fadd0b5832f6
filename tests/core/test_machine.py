"""The machine's exact effect order in a few runs, written out with ``perform_sequence``."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from stroma import effects as fx
from stroma.contracts import NodeContract
from stroma.cost import estimate_cost_usd
from stroma.failures import FailureClass
from stroma.machine import MachineConfig, Phase, error_info, start
from stroma.plan import Plan, compile_plan, parallel
from stroma.runner import stroma_node
from stroma.schemas import _schema_ref
from stroma.testing import (
    EPOCH,
    SequenceMismatch,
    cancelled,
    hook_fired,
    loaded,
    parallel_returned,
    perform_sequence,
    raised,
    returned,
    run_scripted,
    slept,
)
from stroma.trace import RunStatus, TraceEvent

RUN = "run-1"


class Num(BaseModel):
    value: int


class Left(BaseModel):
    left: int


class Right(BaseModel):
    right: int


def node(node_id: str, inp: type[BaseModel] = Num, out: type[BaseModel] = Num) -> Any:
    async def fn(state: BaseModel) -> Any:  # pragma: no cover - the machine never calls it
        raise AssertionError("the pure machine never calls a node")

    return stroma_node(node_id, NodeContract(node_id=node_id, input_schema=inp, output_schema=out))(
        fn
    )


def plan(*items: Any) -> Plan:
    return compile_plan(list(items))


def config(**changes: Any) -> MachineConfig:
    changes.setdefault("hook_timeout_ms", None)  # hooks without a bound unless a test says
    return MachineConfig(run_id=RUN, seed=7, started_at=EPOCH, **changes)


def ok(
    node_id: str, attempt: int, inp: dict[str, Any], out: dict[str, Any],
    schema: type[BaseModel] | None = None,
) -> fx.Commit:
    """The Commit of a successful attempt (its record and checkpoint)."""
    ref = _schema_ref(schema or Num)
    return fx.Commit(node_id, RUN, attempt, EPOCH, inp, out, 0, ref)


def failed(
    node_id: str, attempt: int, inp: dict[str, Any], cls: FailureClass, message: str
) -> fx.RecordAttempt:
    return fx.RecordAttempt.of(TraceEvent(node_id, RUN, attempt, EPOCH, inp, None, 0, cls, message))


def finish(status: RunStatus, tokens: int = 0, cost: float = 0.0) -> Any:
    """A predicate on Finish: its status and totals (the reason is checked where it matters)."""

    def is_finish(effect: Any) -> bool:
        return (
            isinstance(effect, fx.Finish)
            and effect.status == status
            and effect.total_tokens == tokens
            and effect.total_cost_usd == pytest.approx(cost)
        )

    is_finish.__qualname__ = f"Finish({status}, tokens={tokens}, cost={cost})"
    return is_finish


def test_plain_success() -> None:
    """A node that returns: CallNode, Commit (its record and checkpoint), Finish(COMPLETED)."""
    state, effects = start(plan(node("inc")), Num(value=1), config())
    cost = estimate_cost_usd("gpt-4o", 10, 5)
    end = perform_sequence(state, effects, [
        (fx.CallNode("inc", 1), returned({"value": 2}, input_tokens=10, output_tokens=5,
                                         model="gpt-4o")),
        (lambda e: e == ok("inc", 1, {"value": 1}, {"value": 2}) and e.state == Num(value=2),
         None),
        (fx.Finish(RunStatus.COMPLETED, Num(value=2), 15, cost, 0), None),
    ])
    assert end.phase is Phase.DONE and end.state == Num(value=2)


def test_retry_with_backoff() -> None:
    """A RECOVERABLE failure is recorded, then a jittered Sleep within the backoff, then
    the second attempt."""
    cfg = config(policy_map=((FailureClass.RECOVERABLE, 2, 30.0),))
    state, effects = start(plan(node("fetch")), Num(value=1), cfg)
    perform_sequence(state, effects, [
        (fx.CallNode("fetch", 1), raised(TimeoutError("upstream slow"), duration_ms=40)),
        (fx.RecordAttempt.of(TraceEvent("fetch", RUN, 1, EPOCH, {"value": 1}, None, 40,
                                     FailureClass.RECOVERABLE, "upstream slow")), None),
        (lambda e: isinstance(e, fx.Sleep) and 0 <= e.seconds <= 30.0, slept),
        (fx.CallNode("fetch", 2), returned({"value": 5})),
        (ok("fetch", 2, {"value": 1}, {"value": 5}), None),
        (finish(RunStatus.COMPLETED), None),
    ])


def test_terminal_failure_stops_the_run() -> None:
    """An output that breaks the contract is TERMINAL: recorded, then Finish(FAILED) with the
    last valid state, and the next node never starts."""
    state, effects = start(plan(node("a"), node("b")), Num(value=1), config())

    def failed_terminal(effect: Any) -> bool:
        te = effect.event
        return te.failure == FailureClass.TERMINAL and "Contract violation for 'a' (output)" in (
            te.failure_message or ""
        )

    end = perform_sequence(state, effects, [
        (fx.CallNode("a", 1), returned({"value": "not a number"})),
        (failed_terminal, None),
        (finish(RunStatus.FAILED), None),
    ])
    assert end.state == Num(value=1)


def test_hooks_fire_start_then_success_or_failure() -> None:
    """Each attempt fires start before its call and failure after its record, or success
    after its checkpoint; a hook that raises changes nothing."""
    cfg = config(
        hooks=frozenset({"start", "success", "failure"}),
        policy_map=((FailureClass.AMBIGUOUS, 1, 0.0),),
    )
    state, effects = start(plan(node("inc")), Num(value=1), cfg)
    perform_sequence(state, effects, [
        (fx.FireHook("start", "inc", 1, {"value": 1}), hook_fired()),
        (fx.CallNode("inc", 1), raised(ValueError("malformed"))),
        (failed("inc", 1, {"value": 1}, FailureClass.AMBIGUOUS, "malformed"), None),
        (fx.FireHook("failure", "inc", 1, None, 0, FailureClass.AMBIGUOUS,
                     error_info(ValueError("malformed"))), hook_fired(RuntimeError("down"))),
        (fx.FireHook("start", "inc", 2, {"value": 1}), hook_fired()),
        (fx.CallNode("inc", 2), returned({"value": 2}, input_tokens=7)),
        (ok("inc", 2, {"value": 1}, {"value": 2}), None),
        (fx.FireHook("success", "inc", 2, {"value": 2}, 7), hook_fired()),
        (finish(RunStatus.COMPLETED, tokens=7), None),
    ])


def test_hooks_sequence_with_records_skipped() -> None:
    """With skip_records=True the sequence lists only what reaches the world, and Finish."""
    cfg = config(hooks=frozenset({"start", "success"}))
    state, effects = start(plan(node("inc")), Num(value=1), cfg)
    perform_sequence(state, effects, [
        (fx.FireHook("start", "inc", 1, {"value": 1}), hook_fired()),
        (fx.CallNode, returned({"value": 2})),
        (fx.FireHook("success", "inc", 1, {"value": 2}, 0), hook_fired()),
        (fx.Finish, None),
    ], skip_records=True)


def test_input_contract_violation_fires_start_then_failure() -> None:
    """An input that breaks the contract fails without a call, between start and failure."""
    cfg = config(hooks=frozenset({"start", "failure"}))
    state, effects = start(plan(node("left", Left, Left)), Num(value=1), cfg)
    perform_sequence(state, effects, [
        (fx.FireHook("start", "left", 1, {"value": 1}), hook_fired()),
        (fx.RecordAttempt, None),
        (lambda e: isinstance(e, fx.FireHook) and e.kind == "failure"
         and e.failure == FailureClass.TERMINAL, hook_fired()),
        (finish(RunStatus.FAILED), None),
    ])


def test_parallel_group_is_one_step() -> None:
    """A parallel group is one CallParallel, one Commit of the merged output, summed tokens."""
    step = parallel(node("left", Num, Left), node("right", Num, Right))
    state, effects = start(plan(step), Num(value=1), config())
    perform_sequence(state, effects, [
        (fx.CallParallel("parallel(left, right)", 1,
                         (fx.CallNode("left", 1), fx.CallNode("right", 1)), indices=(0, 1)),
         parallel_returned(returned({"left": 2}, input_tokens=3),
                           returned({"right": 3}, input_tokens=4))),
        (lambda e: isinstance(e, fx.Commit) and e.event.output_state == {"left": 2, "right": 3}
         and e.state.model_dump() == {"left": 2, "right": 3}, None),
        (finish(RunStatus.COMPLETED, tokens=7), None),
    ])


def test_parallel_child_failure_fails_the_group() -> None:
    """A child that raises fails the whole group (its sibling cancelled), classified once."""
    step = parallel(node("left", Num, Left), node("right", Num, Right))
    cfg = config(policy_map=((FailureClass.AMBIGUOUS, 0, 0.0),))
    state, effects = start(plan(step), Num(value=1), cfg)
    perform_sequence(state, effects, [
        (fx.CallParallel, parallel_returned(raised(ValueError("left broke")), cancelled())),
        (failed("parallel(left, right)", 1, {"value": 1}, FailureClass.AMBIGUOUS,
                "left broke"), None),
        (finish(RunStatus.PARTIAL), None),
    ])


@pytest.mark.parametrize("deadline_passed", [True, False])
def test_a_group_is_timed_out_by_its_deadline_even_when_every_child_returned(
    deadline_passed: bool,
) -> None:
    """A group answered with every child returned and ``deadline_passed`` (a child returned
    after the deadline) fails its attempt as a TimeoutError (RECOVERABLE); without it, the
    same answer, its duration past the timeout included, completes as before (a log
    recorded before such groups were told of replays as it was)."""
    step = parallel(node("left", Num, Left), node("right", Num, Right))
    grouped = plan(step).with_timeout("parallel(left, right)", 100)
    cfg = config(policy_map=((FailureClass.RECOVERABLE, 0, 0.0),))
    state, effects = start(grouped, Num(value=1), cfg)
    answer = parallel_returned(returned({"left": 2}), returned({"right": 3}, duration_ms=400),
                               duration_ms=400)._replace(deadline_passed=deadline_passed)
    message = ("'parallel(left, right)' timed out after 100 ms: a child returned after its "
               "deadline (it shielded or swallowed the cancellation, or blocked the event loop)")
    outcome: list[Any] = [
        (lambda e: isinstance(e, fx.RecordAttempt)
         and e.event.failure is FailureClass.RECOVERABLE and e.event.failure_message == message,
         None),
        (finish(RunStatus.PARTIAL), None),
    ] if deadline_passed else [
        (lambda e: isinstance(e, fx.Commit)
         and e.state.model_dump() == {"left": 2, "right": 3}, None),
        (finish(RunStatus.COMPLETED), None),
    ]
    perform_sequence(state, effects, [(fx.CallParallel, answer), *outcome])


def test_resume_from_loads_the_checkpoint_before() -> None:
    """resume_from='b' loads a's checkpoint first, runs only b, and finishes RESUMED."""
    state, effects = start(plan(node("a"), node("b")), Num(value=1), config(resume_from="b"))
    end = perform_sequence(state, effects, [
        (fx.LoadCheckpoint("a", Num), loaded(Num(value=10))),
        (fx.CallNode("b", 1), returned({"value": 20})),
        (ok("b", 1, {"value": 10}, {"value": 20}), None),
        (finish(RunStatus.RESUMED), None),
    ])
    assert end.state == Num(value=20)


def test_resume_without_a_checkpoint_is_partial() -> None:
    """resume_from with no checkpoint of the step before runs nothing and ends PARTIAL."""
    state, effects = start(plan(node("a"), node("b")), Num(value=1), config(resume_from="b"))
    perform_sequence(state, effects, [
        (fx.LoadCheckpoint, loaded(None)),
        (lambda e: isinstance(e, fx.Finish) and e.status == RunStatus.PARTIAL
         and "no checkpoint of 'a'" in (e.reason or ""), None),
    ])


# ------------------------------------------------------------------- the helper itself


def test_mismatch_shows_the_sequence_so_far() -> None:
    """A wrong expectation raises SequenceMismatch naming what was expected and what came."""
    state, effects = start(plan(node("inc")), Num(value=1), config())
    with pytest.raises(SequenceMismatch) as info:
        perform_sequence(state, effects, [
            (fx.CallNode("inc", 1), returned({"value": 2})),
            (fx.RecordAttempt, None),
        ])
    message = str(info.value)
    assert "ok   CallNode(node_id='inc'" in message
    assert "next expected: any RecordAttempt" in message
    assert "got:           Commit('inc', attempt 1, ok)" in message


def test_too_short_and_too_long_sequences_fail() -> None:
    """Effects beyond the sequence, or a sequence beyond the run, are both mismatches."""
    state, effects = start(plan(node("inc")), Num(value=1), config())
    with pytest.raises(SequenceMismatch, match="more effects than the sequence"):
        perform_sequence(state, effects, [(fx.CallNode, returned({"value": 2}))])
    with pytest.raises(SequenceMismatch, match="stopped emitting effects"):
        perform_sequence(state, effects, [
            (fx.CallNode, returned({"value": 2})),
            (fx.Finish, None),
            (fx.Finish, None),
        ], skip_records=True)


def test_skip_records_rejects_a_record_expectation() -> None:
    """Expecting a RecordAttempt while skipping them is a usage error, said up front."""
    state, effects = start(plan(node("inc")), Num(value=1), config())
    with pytest.raises(ValueError, match="skip_records=True"):
        perform_sequence(state, effects, [(fx.RecordAttempt, None)], skip_records=True)


def test_a_rejected_answer_is_a_mismatch() -> None:
    """Answering with an event the machine does not wait for is reported with the log."""
    state, effects = start(plan(node("inc")), Num(value=1), config())
    with pytest.raises(SequenceMismatch, match="rejected the answer"):
        perform_sequence(state, effects, [(fx.CallNode, hook_fired())])


def test_run_scripted_returns_the_log() -> None:
    """run_scripted drives to Finish and returns (effect, event) pairs like an effect log."""
    state, effects = start(plan(node("a"), node("b")), Num(value=1), config())
    answers = {fx.CallNode: lambda e: returned({"value": e.input.value * 2})}
    end, records = run_scripted(state, effects, lambda e: answers[type(e)](e))
    assert [type(e).__name__ for e, _ in records] == [
        "CallNode", "Commit", "CallNode", "Commit", "Finish",
    ]
    assert end.state == Num(value=4)
    assert records[-1][1] is None
