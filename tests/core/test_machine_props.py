"""Properties of the pure machine, driven synchronously by scripted events (no event loop).

Each example is a random plan, config and per-attempt script (``tests.strategies``); a
``ScriptedWorld`` answers every effect and ``stroma.testing.run_scripted`` feeds the
answers to ``advance`` until ``Finish``. The hypothesis profile comes from conftest.py.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

import pytest
from attrs import evolve
from hypothesis import given, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from stroma import effects as fx
from stroma.cost import estimate_cost_usd
from stroma.failures import FailureClass
from stroma.machine import MachineConfig, Phase, RunState, advance, error_info, start
from stroma.plan import Plan, Step
from stroma.testing import run_scripted
from stroma.trace import RunStatus, TraceEvent
from tests.strategies import (
    Scenario,
    ScriptedWorld,
    outcomes,
    policy_for,
    retry_bound,
    scenarios,
)

Records = list[tuple[Any, Any]]


def run(scenario: Scenario, *, hook_errors: bool | None = None) -> Records:
    state, effects = start(scenario.plan, scenario.initial, scenario.config)
    _, records = run_scripted(state, effects, ScriptedWorld(scenario, hook_errors=hook_errors))
    note("\n".join(f"{e!r}  ->  {v!r}" for e, v in records))
    return records


def effects_of(records: Records) -> list[Any]:
    return [e for e, _ in records]


def attempts_of(records: Records) -> list[TraceEvent]:
    return [e.event for e, _ in records if isinstance(e, fx.RecordAttempt | fx.Commit)]


def finish_of(records: Records) -> fx.Finish:
    last = records[-1][0]
    assert isinstance(last, fx.Finish)
    return last


def step_of(plan: Plan, step_id: str) -> Step:
    return next(s for s in plan.steps if s.step_id == step_id)


def usage(effect: Any, event: Any) -> tuple[int, float, int]:
    """Tokens, cost and latency that one answered effect adds to the run's totals."""
    if isinstance(event, fx.NodeReturned):
        tokens = event.input_tokens + event.output_tokens
        model = effect.model or event.model
        cost = estimate_cost_usd(model, event.input_tokens, event.output_tokens) if tokens else 0.0
        return tokens, cost, event.duration_ms
    if isinstance(event, fx.NodeRaised):
        return 0, 0.0, event.duration_ms
    if isinstance(event, fx.ParallelReturned):
        tokens, cost = 0, 0.0
        for child in event.outcomes:
            if isinstance(child, fx.NodeReturned):
                t, c, _ = usage(effect.calls[0], child)
                tokens, cost = tokens + t, cost + c
        return tokens, cost, event.duration_ms
    return 0, 0.0, 0


def spent(config: MachineConfig, tokens: int, cost: float, latency: int) -> bool:
    """At or over a limit, with some of it used (nothing used spends no zero limit)."""
    return (
        (config.max_tokens is not None and 0 < tokens >= config.max_tokens)
        or (config.max_cost_usd is not None and 0 < cost >= config.max_cost_usd)
        or (config.max_latency_ms is not None and 0 < latency >= config.max_latency_ms)
    )


def is_budget_stop(te: TraceEvent) -> bool:
    return (te.failure_message or "").startswith("budget spent")


def is_input_violation(te: TraceEvent) -> bool:
    message = te.failure_message or ""
    return message.startswith("Contract violation for") and "(input)" in message


# ---------------------------------------------------------------------------- properties


@given(scenarios())
def test_attempts_never_exceed_one_plus_max_retries(scenario: Scenario) -> None:
    """A step makes at most 1 + the largest max_retries of a retrying class, numbered 1..n."""
    records = run(scenario)
    per_step: dict[str, list[int]] = defaultdict(list)
    for te in attempts_of(records):
        per_step[te.node_id].append(te.attempt)
    calls = Counter(
        e.node_id if isinstance(e, fx.CallNode) else e.step_id
        for e in effects_of(records) if isinstance(e, fx.CallNode | fx.CallParallel)
    )
    for step_id, numbers in per_step.items():
        step = step_of(scenario.plan, step_id)
        assert numbers == list(range(1, len(numbers) + 1))
        assert len(numbers) <= retry_bound(scenario.config, step)
        assert calls[step_id] <= len(numbers)


@given(scenarios())
def test_terminal_failure_is_the_last_attempt(scenario: Scenario) -> None:
    """A TERMINAL attempt is the run's last, only its failure hook follows, and the run FAILED."""
    records = run(scenario)
    attempts = attempts_of(records)
    finish = finish_of(records)
    terminal = [i for i, te in enumerate(attempts) if te.failure == FailureClass.TERMINAL]
    assert terminal in ([], [len(attempts) - 1])
    assert (finish.status == RunStatus.FAILED) == bool(terminal)
    if terminal:
        effects = effects_of(records)
        k = max(i for i, e in enumerate(effects) if isinstance(e, fx.RecordAttempt))
        tail = effects[k + 1 :]
        assert all(isinstance(e, fx.FireHook) and e.kind == "failure" for e in tail[:-1])
        assert len(tail) <= 2


@given(scenarios())
def test_one_checkpoint_per_successful_step_in_order(scenario: Scenario) -> None:
    """Each successful step is committed (its record and checkpoint) once, right after its
    validated output arrived, before the next step's first effect; no failed attempt is
    ever committed, and the committed state is the recorded output."""
    records = run(scenario)
    effects = effects_of(records)
    ids = scenario.plan.step_ids()
    first = 0
    if scenario.config.resume_from in ids:
        first = ids.index(scenario.config.resume_from)
    saved: list[str] = []
    for i, eff in enumerate(effects):
        if isinstance(eff, fx.CallNode | fx.CallParallel | fx.RecordAttempt):
            step_id = eff.event.node_id if isinstance(eff, fx.RecordAttempt) else (
                eff.node_id if isinstance(eff, fx.CallNode) else eff.step_id
            )
            assert saved == list(ids[first : ids.index(step_id)])
            if isinstance(eff, fx.RecordAttempt):
                assert eff.failure is not None or eff.output_state is None
        elif isinstance(eff, fx.Commit):
            before = effects[i - 1]
            assert isinstance(before, fx.CallNode | fx.CallParallel)
            assert (before.node_id if isinstance(before, fx.CallNode) else before.step_id) \
                == eff.node_id
            schema = step_of(scenario.plan, eff.node_id).output_schema
            assert isinstance(eff.state, schema)
            assert eff.state.model_dump(mode="json") == eff.event.output_state
            assert saved == list(ids[first : ids.index(eff.node_id)])
            saved.append(eff.node_id)
    if finish_of(records).status in (RunStatus.COMPLETED, RunStatus.RESUMED):
        assert saved == list(ids[first:])


@given(scenarios())
def test_hooks_bracket_each_attempt(scenario: Scenario) -> None:
    """Per attempt the hooks come as start, then success or failure (those configured); an
    attempt stopped by a spent budget fires none."""
    records = run(scenario)
    hooks = scenario.config.hooks
    markers: dict[tuple[str, int], list[str]] = defaultdict(list)
    attempts: dict[tuple[str, int], TraceEvent] = {}
    last: tuple[str, int] | None = None
    for eff in effects_of(records):
        if isinstance(eff, fx.FireHook):
            markers[(eff.node_id, eff.attempt)].append(eff.kind)
        elif isinstance(eff, fx.CallNode | fx.CallParallel):
            step_id = eff.node_id if isinstance(eff, fx.CallNode) else eff.step_id
            markers[(step_id, eff.attempt)].append("call")
        elif isinstance(eff, fx.RecordAttempt | fx.Commit):
            last = (eff.event.node_id, eff.event.attempt)
            attempts[last] = eff.event
            markers[last].append("failed" if eff.event.failure else "ok+save")
    assert set(markers) == set(attempts)
    for key, te in attempts.items():
        if is_budget_stop(te):
            expected = ["failed"]
        else:
            expected = ["start"] if "start" in hooks else []
            if not is_input_violation(te):
                expected.append("call")
            if te.failure is None:
                expected += ["ok+save"] + (["success"] if "success" in hooks else [])
            else:
                expected += ["failed"] + (["failure"] if "failure" in hooks else [])
        assert markers[key] == expected, key


@given(scenarios())
def test_running_totals_equal_the_sums_of_recorded_usage(scenario: Scenario) -> None:
    """Finish's tokens, cost and latency are the sums of the usage the events reported."""
    records = run(scenario)
    tokens, cost, latency = 0, 0.0, 0
    for effect, event in records:
        t, c, ms = usage(effect, event)
        tokens, cost, latency = tokens + t, cost + c, latency + ms
    finish = finish_of(records)
    assert finish.total_tokens == tokens
    assert finish.total_cost_usd == pytest.approx(cost, rel=1e-9, abs=1e-12)
    assert finish.total_latency_ms == latency


@given(scenarios())
def test_same_script_and_seed_give_the_same_effects(scenario: Scenario) -> None:
    """Two runs of one scenario emit equal effects and answer with equal events."""
    assert run(scenario) == run(scenario)


@given(scenarios())
def test_hook_errors_change_no_effect(scenario: Scenario) -> None:
    """Hooks that raise leave every effect of the run as it is with hooks that do not."""
    assert effects_of(run(scenario, hook_errors=True)) == effects_of(
        run(scenario, hook_errors=False)
    )


@given(scenarios(), st.integers(0, 2**64 - 1))
def test_backoff_sleeps_are_within_the_policy(scenario: Scenario, seed: int) -> None:
    """A retry sleeps exactly when its class's backoff is positive, for a delay in [0, backoff]."""
    scenario = evolve(scenario, config=evolve(scenario.config, seed=seed))
    effects = effects_of(run(scenario))
    for i, eff in enumerate(effects):
        if not isinstance(eff, fx.RecordAttempt) or eff.event.failure is None:
            continue
        after = [e for e in effects[i + 1 :] if not isinstance(e, fx.FireHook)]
        if isinstance(after[0], fx.Finish):
            continue
        step = step_of(scenario.plan, eff.event.node_id)
        _, backoff = policy_for(scenario.config, step, eff.event.failure)
        if backoff > 0:
            assert isinstance(after[0], fx.Sleep)
            assert 0.0 <= after[0].seconds <= backoff
        else:
            assert not isinstance(after[0], fx.Sleep)


@given(scenarios())
def test_no_node_starts_once_a_budget_is_spent(scenario: Scenario) -> None:
    """No call is made while a budget is spent; a budget stop ends the run at once, PARTIAL."""
    records = run(scenario)
    tokens, cost, latency = 0, 0.0, 0
    for effect, event in records:
        if isinstance(effect, fx.CallNode | fx.CallParallel):
            assert not spent(scenario.config, tokens, cost, latency)
        t, c, ms = usage(effect, event)
        tokens, cost, latency = tokens + t, cost + c, latency + ms
    attempts = attempts_of(records)
    finish = finish_of(records)
    if attempts and is_budget_stop(attempts[-1]):
        assert isinstance(records[-2][0], fx.RecordAttempt)
        assert finish.status == RunStatus.PARTIAL
        assert attempts[-1].failure == FailureClass.RECOVERABLE
        assert finish.reason == attempts[-1].failure_message
    assert not any(is_budget_stop(te) for te in attempts[:-1])


@given(scenarios())
def test_resume_loads_the_step_before_and_skips_earlier_steps(scenario: Scenario) -> None:
    """resume_from names no step: the only effect is Finish(PARTIAL); else resuming loads the
    checkpoint of the step before first, and never runs the steps before the target."""
    records = run(scenario)
    target = scenario.config.resume_from
    ids = scenario.plan.step_ids()
    if target is None:
        return
    if target not in ids:
        assert len(records) == 1 and finish_of(records).status == RunStatus.PARTIAL
        return
    k = ids.index(target)
    if k > 0:
        load = records[0][0]
        assert load == fx.LoadCheckpoint(ids[k - 1], load.schema)
    ran = {te.node_id for te in attempts_of(records)}
    assert not ran & set(ids[:k])


# ------------------------------------------------------------------ a stateful variant


class MachineWalk(RuleBasedStateMachine):
    """The machine answered effect by effect, each answer drawn when it is asked for."""

    @initialize(scenario=scenarios(max_steps=4))
    def begin(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.world = ScriptedWorld(scenario)
        self.records: Records = []
        self.state: RunState
        self.pending: Any = None
        self.take(*start(scenario.plan, scenario.initial, scenario.config))

    def take(self, state: RunState, effects: list[Any]) -> None:
        self.state = state
        self.pending = None
        for eff in effects:
            assert self.pending is None, "an effect after one that needs an answer"
            if isinstance(eff, fx.Commit | fx.RecordAttempt | fx.Finish):
                self.records.append((eff, None))
            else:
                self.pending = eff
        assert (self.pending is None) == (self.state.phase is Phase.DONE)

    def answer(self, event: Any) -> None:
        self.records.append((self.pending, event))
        self.take(*advance(self.state, event))

    def waiting_for(self, kind: type) -> bool:
        return isinstance(self.pending, kind)

    @precondition(lambda self: self.waiting_for(fx.CallNode))
    @rule(outcome=outcomes())
    def node_answers(self, outcome: Any) -> None:
        event = self.world.outcome_event(self.pending, outcome)
        self.answer(event)

    @precondition(lambda self: self.waiting_for(fx.CallParallel))
    @rule(children=st.lists(outcomes(), min_size=3, max_size=3))
    def group_answers(self, children: list[Any]) -> None:
        events: list[Any] = []
        for call, outcome in zip(self.pending.calls, children, strict=False):
            if events and isinstance(events[-1], fx.NodeRaised | fx.NodeCancelled):
                events.append(fx.NodeCancelled(self.world.now, 0))
            else:
                events.append(self.world.outcome_event(call, outcome))
        duration = max(e.duration_ms for e in events)
        self.answer(fx.ParallelReturned(self.world.now, duration, tuple(events)))

    @precondition(lambda self: self.waiting_for(fx.ClassifyFailure))
    @rule(answer=st.sampled_from((None, *FailureClass)))
    def classifier_answers(self, answer: FailureClass | None) -> None:
        self.answer(fx.FailureClassified((answer,)))

    @precondition(lambda self: self.waiting_for(fx.FireHook))
    @rule(fails=st.booleans())
    def hook_answers(self, fails: bool) -> None:
        error = error_info(RuntimeError("the hook is down")) if fails else None
        self.answer(fx.HookFired(error))

    @precondition(lambda self: self.waiting_for(fx.Sleep | fx.LoadCheckpoint))
    @rule()
    def world_answers(self) -> None:
        self.answer(self.world(self.pending))

    @precondition(lambda self: self.state.phase is Phase.DONE)
    @rule()
    def finished(self) -> None:
        assert isinstance(self.records[-1][0], fx.Finish)

    @invariant()
    def totals_are_the_sums_so_far(self) -> None:
        """The state's running totals equal the usage answered so far."""
        tokens, cost, latency = 0, 0.0, 0
        for effect, event in self.records:
            t, c, ms = usage(effect, event)
            tokens, cost, latency = tokens + t, cost + c, latency + ms
        assert self.state.tokens == tokens
        assert self.state.cost_usd == pytest.approx(cost, rel=1e-9, abs=1e-12)
        assert self.state.latency_ms == latency

    @invariant()
    def attempts_stay_within_the_bound(self) -> None:
        """No step has made more attempts than its policies allow."""
        counts = Counter(te.node_id for te in attempts_of(self.records))
        for step_id, n in counts.items():
            assert n <= retry_bound(self.scenario.config, step_of(self.scenario.plan, step_id))

    @invariant()
    def finish_is_last_and_once(self) -> None:
        """At most one Finish, and nothing after it."""
        finishes = [i for i, (e, _) in enumerate(self.records) if isinstance(e, fx.Finish)]
        assert finishes in ([], [len(self.records) - 1])


TestMachineWalk = MachineWalk.TestCase
# A run is over in well under 30 answers; the profile's other settings still apply.
TestMachineWalk.settings = settings(stateful_step_count=30)
