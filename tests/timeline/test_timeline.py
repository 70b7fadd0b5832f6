"""The timeline of real runs: one row per step and fan-out child, one bar per attempt with
its outcome, states, usage and backoffs, read from the log a FileStore kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from interpreters.stores.file import FileStore
from stroma.checkpoint import InMemoryStore
from stroma.cost import estimate_cost_usd
from stroma.errors import LogCorrupted
from stroma.timeline import (
    BUDGET_STOP,
    CANCELLED,
    OK,
    RUNNING_OR_CRASHED,
    UNFINISHED,
    Timeline,
    summary,
    timeline,
)
from tests.timeline import pipelines as P

pytestmark = pytest.mark.anyio


async def stored(store: FileStore, run_id: str) -> Timeline:
    log = await store.read_log(run_id)
    assert log is not None
    return timeline(log)


def outcomes(tl: Timeline, key: str) -> list[str]:
    return [b.outcome for b in tl.row(key).bars]


async def test_retries_are_bars_of_one_row_with_backoffs_between(tmp_path: Path) -> None:
    """A node that fails twice then succeeds is one row of three bars (AMBIGUOUS,
    RECOVERABLE, ok) with the two recorded backoffs between them."""
    store = FileStore(tmp_path)
    result = await P.retries_run(store)
    tl = await stored(store, "retries")
    assert [r.key for r in tl.rows] == ["flaky", "double"]
    assert outcomes(tl, "flaky") == ["AMBIGUOUS", "RECOVERABLE", OK]
    flaky = tl.row("flaky")
    assert [b.attempt for b in flaky.bars] == [1, 2, 3]
    assert [b.message for b in flaky.bars[:2]] == ["malformed model output", "upstream timeout"]
    assert [g.after_attempt for g in flaky.gaps] == [1, 2]
    sleeps = [rec[0].seconds for rec in result.log.records  # type: ignore[union-attr]
              if type(rec[0]).__name__ == "Sleep"]
    assert [g.duration_ms for g in flaky.gaps] == pytest.approx([s * 1000 for s in sleeps])
    assert flaky.gaps[0].offset_ms == pytest.approx(flaky.bars[0].end_ms)
    assert flaky.bars[2].input_state == {"value": 1}
    assert flaky.bars[2].output_state == {"value": 2}
    assert tl.status == "COMPLETED" and tl.finished and tl.stop_reason is None


async def test_usage_per_attempt_is_priced_from_its_model(tmp_path: Path) -> None:
    """Each attempt's tokens in/out and model come from what the node reported, its cost
    from the model's price, and the run's totals are the sums."""
    store = FileStore(tmp_path)
    result = await P.retries_run(store)
    tl = await stored(store, "retries")
    ok = tl.row("flaky").bars[2].usage
    assert (ok.input_tokens, ok.output_tokens, ok.model) == (120, 30, "gpt-4o-mini")
    assert ok.cost_usd == pytest.approx(estimate_cost_usd("gpt-4o-mini", 120, 30))
    double = tl.row("double").bars[0].usage
    assert (double.input_tokens, double.output_tokens, double.model) == (
        50, 0, "claude-haiku-4-5")
    assert [b.usage.tokens for b in tl.row("flaky").bars[:2]] == [0, 0]
    assert tl.tokens == result.total_tokens == 200
    assert tl.cost_usd == pytest.approx(result.total_cost_usd)


async def test_a_fallback_model_shows_on_the_attempts_it_priced_only(tmp_path: Path) -> None:
    """With a model fallback in force every call is given the fallback model; the
    timeline names it for the attempt whose tokens it priced, and no model for a step
    that used none (a tool that ignores the model)."""
    from pydantic import BaseModel

    from stroma import FallbackPolicy, RunConfig, StromaRunner, interpret
    from stroma.cost import ExecutionBudget

    class Q(BaseModel):
        text: str = ""

    runner = StromaRunner.quick()

    @runner.node("think", input=Q, output=Q)
    async def think(q: Q, ctx: dict[str, object]) -> tuple[dict[str, str], int, int, None]:
        return {"text": f"asked {ctx.get('_stroma_model')}"}, 100, 20, None

    @runner.node("tool", input=Q, output=Q)
    async def tool(q: Q) -> Q:
        return q

    store = FileStore(tmp_path)
    config = RunConfig(run_id="fell-back", context={"model": "gpt-4o"},
                       budget=ExecutionBudget(max_cost_usd=1.0),
                       model_fallbacks=[FallbackPolicy("gpt-4o", "gpt-4o-mini",
                                                       at_budget_pct=0.0)])
    result = await interpret([think, tool], Q(), store=store, config=config)
    assert result.final_state.text == "asked gpt-4o-mini"  # type: ignore[attr-defined]
    tl = await stored(store, "fell-back")
    thought = tl.row("think").bars[0].usage
    assert (thought.tokens, thought.model) == (120, "gpt-4o-mini")
    assert thought.cost_usd == pytest.approx(estimate_cost_usd("gpt-4o-mini", 100, 20))
    assert tl.row("tool").bars[0].usage.model is None


async def test_a_timeout_is_a_recoverable_bar_naming_the_timeout(tmp_path: Path) -> None:
    """A node cancelled by its timeout is a RECOVERABLE bar saying it timed out, lasting
    at least the timeout; the retry that returns is the next bar."""
    store = FileStore(tmp_path)
    await P.timeout_run(store)
    tl = await stored(store, "timeout")
    first, second = tl.row("slow").bars
    assert (first.outcome, second.outcome) == ("RECOVERABLE", OK)
    assert first.message is not None and "timed out after 10 ms" in first.message
    assert first.duration_ms >= 10
    assert second.output_state == {"value": 11}


async def test_parallel_children_have_rows_under_their_group(tmp_path: Path) -> None:
    """A parallel group is a row with one bar per group attempt, and each child a row
    beneath it with one bar per group attempt: the failing child's class, the sibling it
    cancelled shown as cancelled, then both ok."""
    store = FileStore(tmp_path)
    await P.parallel_run(store)
    tl = await stored(store, "parallel")
    group = "parallel(left, right)"
    assert [(r.key, r.depth, r.parent) for r in tl.rows] == [
        (group, 0, None), (f"{group}[0]", 1, group), (f"{group}[1]", 1, group),
        ("total", 0, None)]
    assert tl.row(group).kind == "parallel"
    assert outcomes(tl, group) == ["AMBIGUOUS", OK]
    assert outcomes(tl, f"{group}[0]") == [CANCELLED, OK]
    assert outcomes(tl, f"{group}[1]") == ["AMBIGUOUS", OK]
    right = tl.row(f"{group}[1]")
    assert right.label == "right" and right.child_index == 1 and right.item_index is None
    assert right.bars[0].message == "right: connection reset"
    assert right.bars[1].input_state == {"value": 5}
    assert right.bars[1].output_state == {"right": 4}
    assert [g.after_attempt for g in tl.row(group).gaps] == [1]
    assert tl.row(group).bars[1].usage.tokens == 30  # the children's, summed


async def test_map_children_retrying_inside_show_each_attempt(tmp_path: Path) -> None:
    """In a map_each whose node retries on its own, each item is a row; the item that
    failed twice has three bars and two backoffs, all within the group's one attempt."""
    store = FileStore(tmp_path)
    await P.map_run(store)
    tl = await stored(store, "map")
    group = "map_each(fetch, over=urls, into=pages)"
    assert tl.row(group).kind == "map" and outcomes(tl, group) == [OK]
    items = [tl.row(f"{group}[{j}]") for j in range(3)]
    assert [r.label for r in items] == ["fetch [item 0]", "fetch [item 1]", "fetch [item 2]"]
    assert [r.item_index for r in items] == [0, 1, 2]
    assert [[b.outcome for b in r.bars] for r in items] == [
        [OK], ["AMBIGUOUS", "AMBIGUOUS", OK], [OK]]
    flaky = items[1]
    assert [b.attempt for b in flaky.bars] == [1, 2, 3]
    assert {b.group_attempt for b in flaky.bars} == {1}
    assert [g.after_attempt for g in flaky.gaps] == [1, 2]
    assert flaky.bars[0].message == "503 from b"
    assert flaky.bars[2].input_state == {"item": "b"}
    assert flaky.bars[2].output_state == {"page": "page b"}
    assert tl.row(group).bars[0].usage.tokens == 3 * 120


async def test_a_sub_plan_child_has_a_row_per_node_beneath_it(tmp_path: Path) -> None:
    """A parallel child that is a two-node sub-plan is a row for the child and, beneath
    it, a row per node with that node's own attempts (polish retried once)."""
    store = FileStore(tmp_path)
    await P.subplan_run(store)
    tl = await stored(store, "subplan")
    group = "parallel(seq(draft, polish), tag)"
    child = f"{group}[0]"
    assert [r.key for r in tl.rows] == [group, child, f"{child}/draft", f"{child}/polish",
                                        f"{group}[1]"]
    assert tl.row(child).kind == "plan" and tl.row(child).label == "seq(draft, polish)"
    assert [r.depth for r in tl.rows] == [0, 1, 2, 2, 1]
    assert tl.row(f"{child}/draft").parent == child
    assert outcomes(tl, f"{child}/polish") == ["RECOVERABLE", OK]
    assert len(tl.row(f"{child}/polish").gaps) == 1
    assert tl.row(f"{child}/polish").bars[1].output_state == {"polished": "DRAFT 2"}
    assert tl.row(child).bars[0].usage.tokens == 340


async def test_a_budget_stop_is_its_own_outcome(tmp_path: Path) -> None:
    """An attempt that a spent budget did not start is a 'budget stop' bar of no
    duration, and the run's stop reason says which budget."""
    store = FileStore(tmp_path)
    await P.budget_run(store)
    tl = await stored(store, "budget")
    assert outcomes(tl, "spend1") == ["RECOVERABLE", BUDGET_STOP]
    stop = tl.row("spend1").bars[1]
    assert stop.duration_ms == 0 and stop.message == tl.stop_reason
    assert tl.stop_reason is not None and "budget spent (tokens 120 of 100)" in tl.stop_reason
    assert tl.status == "PARTIAL" and "spend2" not in [r.key for r in tl.rows]


async def test_a_terminal_failure_ends_the_rows(tmp_path: Path) -> None:
    """A contract violation is a TERMINAL bar; the run is FAILED with that reason."""
    store = FileStore(tmp_path)
    await P.terminal_run(store)
    tl = await stored(store, "terminal")
    assert outcomes(tl, "ok") == [OK] and outcomes(tl, "broken") == ["TERMINAL"]
    bar = tl.row("broken").bars[0]
    assert bar.message is not None and "Contract violation for 'broken'" in bar.message
    assert tl.status == "FAILED" and tl.failures == 1 and tl.attempts == 2


async def test_hook_errors_are_on_the_attempt_they_fired_for(tmp_path: Path) -> None:
    """A hook that raised is listed on the bar of the attempt it fired for."""
    store = FileStore(tmp_path)
    await P.hooks_run(store)
    tl = await stored(store, "hooks")
    first = tl.row("flaky").bars[0]
    assert first.hook_errors == (
        "on_node_start: RuntimeError: telemetry backend down",
        "on_node_failure: RuntimeError: telemetry backend down",
    )
    assert tl.row("double").bars[0].hook_errors[-1].startswith("on_node_success")


async def test_a_crashed_fan_out_shows_the_children_that_finished(tmp_path: Path) -> None:
    """A run cut short inside a map_each is running/crashed, and its timeline has the
    children that had finished (made durable at once) under the unfinished group."""
    store = FileStore(tmp_path)
    await P.crashed_fan_out(store)
    tl = await stored(store, "crashed")
    assert tl.status == RUNNING_OR_CRASHED and not tl.finished
    group = tl.rows[0]
    assert group.kind == "map" and [b.outcome for b in group.bars] == [UNFINISHED]
    children = tl.rows[1:]
    assert [r.label for r in children] == [f"fetch [item {j}]" for j in range(4)]
    assert all([b.outcome for b in r.bars] == [OK] for r in children)
    assert [r.bars[0].output_state for r in children] == [
        {"page": f"page {x}"} for x in P.CRASH_ITEMS[:4]]
    assert [r.bars[0].input_state for r in children] == [
        {"item": x} for x in P.CRASH_ITEMS[:4]]
    assert tl.tokens == 4 * 120


async def test_a_resumed_fan_out_does_not_run_finished_children_again(
    tmp_path: Path,
) -> None:
    """After the crashed fan-out is resumed, the timeline is RESUMED with a resume mark,
    and each child has one ok bar: the finished ones were not run again."""
    store = FileStore(tmp_path)
    await P.crashed_fan_out(store)
    calls: list[str] = []
    result = await P.run(P.crash_plan(calls), P.Urls(urls=P.CRASH_ITEMS), store, "crashed")
    assert calls == [P.CRASH_ITEMS[-1]]
    tl = await stored(store, "crashed")
    assert tl.status == "RESUMED" == str(result.status)
    assert [m.kind for m in tl.marks] == ["resumed"]
    group = "map_each(fetch, over=urls, into=pages)"
    assert [r.key for r in tl.rows] == [group, *(f"{group}[{j}]" for j in range(5))]
    assert all(outcomes(tl, f"{group}[{j}]") == [OK] for j in range(5))


async def test_the_live_log_and_the_stored_log_give_the_same_timeline(
    tmp_path: Path,
) -> None:
    """The timeline of a run's in-memory log (result.log) equals that of its log read
    back from a FileStore, and the in-memory store's log gives it too."""
    store = FileStore(tmp_path)
    result = await P.map_run(store)
    live = timeline(result.log)  # type: ignore[arg-type]
    assert live.to_json() == (await stored(store, "map")).to_json()
    memory = timeline((await P.map_run(InMemoryStore())).log)  # type: ignore[arg-type]
    assert [[b.outcome for b in r.bars] for r in memory.rows] == [
        [b.outcome for b in r.bars] for r in live.rows]


async def test_json_shape_and_summary(tmp_path: Path) -> None:
    """to_json() is plain JSON with the run's facts and rows of bars; summary() is the
    run-list line with the same totals."""
    store = FileStore(tmp_path)
    await P.parallel_run(store)
    tl = await stored(store, "parallel")
    data = json.loads(json.dumps(tl.to_json()))
    assert set(data) >= {"run_id", "status", "started", "duration_ms", "tokens", "cost_usd",
                         "stop_reason", "rows", "attempts", "failures", "marks"}
    row = data["rows"][2]
    assert row["label"] == "right" and row["parent"] == "parallel(left, right)"
    bar = row["bars"][0]
    assert set(bar) >= {"attempt", "start", "offset_ms", "duration_ms", "outcome", "message",
                        "input_state", "output_state", "usage"}
    assert bar["usage"] == {"input_tokens": 0, "output_tokens": 0, "tokens": 0,
                            "model": None, "cost_usd": 0.0}
    line = summary(tl)
    assert (line.run_id, line.status, line.tokens, line.attempts, line.failures) == (
        "parallel", "COMPLETED", 30, 3, 1)
    assert line.duration_ms == tl.duration_ms and line.started == tl.started


def test_timeline_of_something_else_names_what_to_pass() -> None:
    """timeline() of a non-log is a TypeError saying what to pass."""
    with pytest.raises(TypeError, match=r"result\.log or await store\.read_log"):
        timeline("not a log")  # type: ignore[arg-type]


async def test_a_damaged_record_is_log_corrupted(tmp_path: Path) -> None:
    """A stored log whose attempt record has a field of the wrong type ("duration_ms":
    "x") is a LogCorrupted naming the run, never a raw error from the reader."""
    import re

    from stroma.log import EffectLog

    result = await P.retries_run(FileStore(tmp_path))
    text = result.log.to_jsonl()  # type: ignore[union-attr]
    damaged, n = re.subn(r'("t":"RecordAttempt".*?"duration_ms":)\d+', r'\1"x"', text, count=1)
    assert n == 1
    with pytest.raises(LogCorrupted, match="retries"):
        timeline(EffectLog.from_jsonl(damaged, source="run 'retries'"))
