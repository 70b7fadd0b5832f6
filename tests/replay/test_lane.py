"""The plain lane: a plain run keeps one compact row per successful node in its log, and
replay goes past a chain of rows at once. Both must mean exactly what the machine's
record-by-record path means: the same records, the same result, the same errors."""

from __future__ import annotations

import gc
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from stroma import (
    EffectLog,
    NodeContract,
    NondeterminismError,
    RunStatus,
    replay,
    stroma_node,
)
from stroma import effects as fx
from stroma.checkpoint import AsyncInMemoryStore, InMemoryStore
from stroma.log import RecordList, ResumeMarker, is_row, row_attempt, row_records, trace_event
from stroma.plan import compile_plan
from stroma.runner import interpret


class Num(BaseModel):
    value: int


class Other(BaseModel):
    value: int
    note: str = ""


async def no_sleep(seconds: float) -> None:
    await anyio.sleep(0)


def chain(n: int, script: dict[int, list[str]] | None = None) -> list[Any]:
    """n nodes adding 1. ``script[i]`` lists what node i does on its attempts, in order,
    before it succeeds: "raise" (recoverable), "invalid" output, "usage" (succeeds
    reporting tokens), "other" (a node whose output contract differs, so the next call
    is not straight)."""
    script = script or {}
    nodes = []
    for i in range(n):
        plan = list(script.get(i, []))
        out = Other if "other" in plan else Num
        contract = NodeContract(node_id=f"n{i}", input_schema=Num, output_schema=out)

        async def step(s: Num, _plan: list[str] = plan) -> Any:
            todo = _plan.pop(0) if _plan and _plan[0] != "other" else "ok"
            if todo == "raise":
                raise ConnectionError("flaky")
            if todo == "invalid":
                return {"value": "not a number"}
            if todo == "usage":
                return {"value": s.value + 1}, 7, "gpt-4o-mini"
            return {"value": s.value + 1}

        nodes.append(stroma_node(f"n{i}", contract)(step))
    return nodes


def rows_of(log: EffectLog) -> list[Any]:
    items = log.records.items
    return [x for k, x in enumerate(items) if is_row(x) and (k == 0 or items[k - 1] is not x)]


@pytest.mark.anyio
async def test_a_plain_run_keeps_a_row_per_node_that_reads_as_its_three_records() -> None:
    result = await interpret(chain(30), Num(value=0))
    log = result.log
    assert isinstance(log, EffectLog)
    assert len(rows_of(log)) == 30  # every node went down the lane
    assert len(log.records) == 3 * 30 + 1  # three records a node, then the Finish
    effect, event = log.records[3]
    assert effect == fx.CallNode("n1", 1) and isinstance(event, fx.NodeReturned)
    assert event.output == {"value": 2}
    attempt = log.records[4][0]
    assert isinstance(attempt, fx.RecordAttempt)
    assert (attempt.event.input_state, attempt.event.output_state) == ({"value": 1},
                                                                       {"value": 2})
    save, saved = log.records[5]
    assert save.node_id == "n1" and save.schema_ref.endswith(":Num") and saved.node_id == "n1"
    assert result.final_state == Num(value=30)
    assert [e.node_id for e in result.trace] == [f"n{i}" for i in range(30)]


@pytest.mark.anyio
async def test_the_lane_writes_the_checkpoints_a_store_reads_back() -> None:
    store = InMemoryStore()
    result = await interpret(chain(5), Num(value=10), store=store)
    for i in range(5):
        assert store.load(result.run_id, f"n{i}") == Num(value=11 + i)


@pytest.mark.anyio
async def test_the_lane_log_is_what_the_machine_emits_record_by_record() -> None:
    """The compact log, written out and read back as plain records (no rows), replays
    through ``advance`` one record at a time: every lane record is the machine's."""
    result = await interpret(chain(40, {3: ["raise"], 9: ["invalid"], 20: ["usage"]}),
                             Num(value=0), sleep=no_sleep)
    parsed = EffectLog.from_jsonl(result.log.to_jsonl())
    assert rows_of(parsed) == []
    slow = await replay(chain(40), parsed)
    fast = await replay(chain(40), result.log)
    assert slow == fast == result
    assert slow.trace.diff(result.trace) == [] and fast.trace.diff(result.trace) == []


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 12),
    script=st.dictionaries(
        st.integers(0, 11),
        st.lists(st.sampled_from(["raise", "invalid", "usage", "other"]), max_size=2),
        max_size=5,
    ),
)
def test_lane_and_general_path_agree(n: int, script: dict[int, list[str]]) -> None:
    """For random plain pipelines with failures, usage and contract changes: the run on a
    store with the lane and the run on one without it (an async store) end the same, with
    the same attempts; the lane's log replays fast and record by record to the same result."""

    async def main() -> None:
        copy = {k: list(v) for k, v in script.items()}
        lane = await interpret(chain(n, {k: list(v) for k, v in script.items()}), Num(value=0),
                               store=InMemoryStore(), sleep=no_sleep)
        general = await interpret(chain(n, copy), Num(value=0), store=AsyncInMemoryStore(),
                                  sleep=no_sleep)
        assert rows_of(general.log) == []
        assert (lane.status, lane.final_state, lane.total_tokens) == (
            general.status, general.final_state, general.total_tokens)
        key = [(e.node_id, e.attempt, e.failure, e.input_state, e.output_state)
               for e in lane.trace]
        assert key == [(e.node_id, e.attempt, e.failure, e.input_state, e.output_state)
                       for e in general.trace]
        assert [(type(a).__name__, type(b).__name__) for a, b in _pairs(lane.log)] == [
            (type(a).__name__, type(b).__name__) for a, b in _pairs(general.log)]
        nodes = chain(n, {k: [t for t in v if t == "other"] for k, v in script.items()})
        fast = await replay(nodes, lane.log)
        slow = await replay(nodes, EffectLog.from_jsonl(lane.log.to_jsonl()))
        assert fast == slow == lane

    anyio.run(main)


def _pairs(log: Any) -> list[tuple[Any, Any]]:
    return [rec for rec in log.records if not isinstance(rec, ResumeMarker)]


@pytest.mark.anyio
async def test_a_tampered_row_is_named_by_its_record_index() -> None:
    """Replay goes past rows at once, yet a difference is reported at the exact record."""
    result = await interpret(chain(20), Num(value=0))
    items = result.log.records.items
    row = items[21]  # node n7's row fills records 21, 22 and 23
    assert is_row(row) and row[0] == "n7"
    bad = (*row[:2], 2, *row[3:])  # attempt 2, where the machine makes attempt 1
    items[21:24] = [bad, bad, bad]
    with pytest.raises(NondeterminismError) as caught:
        await replay(chain(20), result.log)
    assert caught.value.index == 21
    assert "attempt: recorded 2, now 1" in str(caught.value)


@pytest.mark.anyio
async def test_a_timeout_added_since_the_run_stops_the_chain_at_that_node() -> None:
    """A timeout is not in the plan's fingerprint; the chain of rows ends at the node that
    has one now, and its call record differs (timeout_ms)."""
    result = await interpret(chain(12), Num(value=0))
    plan = compile_plan(chain(12)).with_timeout("n5", 1000)
    with pytest.raises(NondeterminismError) as caught:
        await replay(plan, result.log)
    assert caught.value.index == 15
    assert "timeout_ms: recorded None, now 1000" in str(caught.value)


@pytest.mark.anyio
async def test_a_changed_contract_is_refused_before_any_row() -> None:
    result = await interpret(chain(6), Num(value=0))
    changed = chain(6, {4: ["other"]})
    with pytest.raises(NondeterminismError, match="contracts"):
        await replay(changed, result.log)


@pytest.mark.anyio
async def test_resume_markers_inside_a_log_of_rows_are_found_without_expanding() -> None:
    result = await interpret(chain(4), Num(value=0))
    records = RecordList(result.log.records)
    assert records.markers == []
    records.append(ResumeMarker("2026-11-23T00:00:00+00:00"))
    assert records.markers == [13]
    assert sum(is_row(x) for x in records.items) == 12  # still compact
    del records[0]
    assert records.markers == [12] and not any(is_row(x) for x in records.items)


@pytest.mark.anyio
async def test_record_list_reads_like_the_list_of_its_records() -> None:
    result = await interpret(chain(5), Num(value=0))
    compact = result.log.records
    expanded = list(EffectLog.from_jsonl(result.log.to_jsonl()).records)
    assert len(compact) == len(expanded) == 16
    assert compact[-1] == expanded[-1] and compact[-2] == expanded[-2]
    assert compact[4:10] == expanded[4:10]
    assert compact == expanded  # equal as lists, and every row is now expanded
    assert not any(is_row(x) for x in compact.items)
    assert compact.index(expanded[7]) == 7


def test_a_row_expands_to_the_records_the_machine_emits() -> None:
    from datetime import UTC, datetime

    at = datetime(2026, 11, 23, tzinfo=UTC)
    row = ("a", "run", 2, at, 5, {"value": 2, "x": 1}, b'{"value":1}', b'{"value":2}', Num)
    call, attempt, save = row_records(row)
    assert call == (fx.CallNode("a", 2), fx.NodeReturned({"value": 2, "x": 1}, at, 5))
    assert call[1].output == {"value": 2, "x": 1}  # what the node returned, as it was
    expected = fx.RecordAttempt("a", "run", 2, at, Num(value=1), Num(value=2), 5)
    assert attempt == (expected, None) and row_attempt(row) == expected
    assert trace_event(row) == expected.event == trace_event(expected)
    assert save[0] == fx.SaveCheckpoint("a", Num(value=2)) and save[0].state == Num(value=2)
    assert save[1] == fx.CheckpointSaved("a")


@pytest.mark.anyio
async def test_a_long_plain_run_keeps_about_one_tracked_object_per_node() -> None:
    """What the garbage collector walks grows by about one object per node (the row), not
    by the five effect objects the records stand for: a long run stays cheap to collect."""
    n = 3000
    plan = compile_plan(chain(n))
    await interpret(plan, Num(value=0))  # warm every cache
    gc.collect()
    before = len(gc.get_objects())
    result = await interpret(plan, Num(value=0))
    gc.collect()
    kept = len(gc.get_objects()) - before
    assert result.status is RunStatus.COMPLETED and len(result.log.records) == 3 * n + 1
    assert kept / n < 2, f"{kept / n:.1f} tracked objects kept per node"


class Reading(BaseModel):
    x: float
    note: str | None = None


def reading_nodes() -> list[Any]:
    values = [1.0, float("inf"), 2.0]

    def node(i: int) -> Any:
        contract = NodeContract(node_id=f"r{i}", input_schema=Reading, output_schema=Reading)

        async def step(s: Reading) -> Reading:
            return Reading(x=values[i])  # a model, not a dict: the lane takes those too

        return stroma_node(f"r{i}", contract)(step)

    return [node(i) for i in range(3)]


@pytest.mark.anyio
async def test_a_state_with_infinity_keeps_it_in_trace_log_and_checkpoint(tmp_path: Any) -> None:
    """JSON has no infinity (pydantic writes null): the trace, the log text and every
    checkpoint keep the very value, on the lane and on a durable store alike."""
    store = InMemoryStore()
    result = await interpret(reading_nodes(), Reading(x=0.0), store=store)
    assert [e.output_state["x"] for e in result.trace] == [1.0, float("inf"), 2.0]
    assert result.trace.events[2].input_state["x"] == float("inf")
    assert len(rows_of(result.log)) == 3
    assert store.load(result.run_id, "r1") == Reading(x=float("inf"))
    text = result.log.to_jsonl()
    assert '"x":Infinity' in text
    assert EffectLog.from_jsonl(text) == result.log
    again = await replay(reading_nodes(), text)
    assert again == result and again.trace.diff(result.trace) == []

    from stroma import FileStore
    from stroma.runner import RunConfig

    durable = FileStore(tmp_path / "store")
    on_file = await interpret(reading_nodes(), Reading(x=0.0), store=durable,
                              config=RunConfig(run_id="inf"))
    assert on_file.status is RunStatus.COMPLETED
    assert await durable.load("inf", "r1") == Reading(x=float("inf"))
    assert await replay(reading_nodes(), await durable.read_log("inf")) == on_file
