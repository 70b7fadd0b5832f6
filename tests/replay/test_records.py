"""A run's log in memory: flat records of atoms, two per successful node, that read as the
machine's effects and events and replay through the same ``advance`` as the live run."""


from __future__ import annotations

import gc
import json
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
from stroma.log import RecordList, ResumeMarker
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

        async def step(s: Num, *, _plan: list[str] = plan) -> Any:
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


def _pairs(log: Any) -> list[tuple[Any, Any]]:
    return [rec for rec in log.records if not isinstance(rec, ResumeMarker)]


@pytest.mark.anyio
async def test_a_run_keeps_two_records_per_node_that_read_as_call_and_commit() -> None:
    """A successful node is its call with the answer and its Commit (trace record and
    checkpoint together); the records read back as effect and event values."""
    result = await interpret(chain(30), Num(value=0))
    log = result.log
    assert isinstance(log, EffectLog)
    assert len(log.records) == 2 * 30 + 1  # two records a node, then the Finish
    effect, event = log.records[2]
    assert effect == fx.CallNode("n1", 1) and isinstance(event, fx.NodeReturned)
    assert isinstance(event.output, fx.Validated)  # it kept its contract: the log says so
    assert json.loads(event.output.json) == {"value": 2}
    commit, none = log.records[3]
    assert isinstance(commit, fx.Commit) and none is None
    assert (commit.event.input_state, commit.event.output_state) == ({"value": 1},
                                                                   {"value": 2})
    assert commit.schema is not None and commit.schema.endswith(":Num")
    assert result.final_state == Num(value=30)
    assert [e.node_id for e in result.trace] == [f"n{i}" for i in range(30)]


@pytest.mark.anyio
async def test_commits_write_the_checkpoints_a_store_reads_back() -> None:
    """Every Commit saved its node's output: the store loads each one back."""
    store = InMemoryStore()
    result = await interpret(chain(5), Num(value=10), store=store)
    for i in range(5):
        assert store.load(result.run_id, f"n{i}") == Num(value=11 + i)


@pytest.mark.anyio
async def test_the_memory_log_and_its_text_replay_alike() -> None:
    """The log as kept in memory and the same log written out and read back replay to the
    run's result, with the same trace."""
    result = await interpret(chain(40, {3: ["raise"], 9: ["invalid"], 20: ["usage"]}),
                             Num(value=0), sleep=no_sleep)
    parsed = EffectLog.from_jsonl(result.log.to_jsonl())
    assert parsed == result.log
    from_text = await replay(chain(40), parsed)
    from_memory = await replay(chain(40), result.log)
    assert from_text == from_memory == result
    assert from_text.trace.diff(result.trace) == [] and from_memory.trace.diff(result.trace) == []


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 12),
    script=st.dictionaries(
        st.integers(0, 11),
        st.lists(st.sampled_from(["raise", "invalid", "usage", "other"]), max_size=2),
        max_size=5,
    ),
)
def test_sync_and_async_stores_give_the_same_run(n: int, script: dict[int, list[str]]) -> None:
    """For random pipelines with failures, usage and contract changes: a run on a sync
    store and one on an async store end the same, with the same attempts and the same
    kinds of records; the log replays from memory and from its text to the same result."""

    async def main() -> None:
        copy = {k: list(v) for k, v in script.items()}
        sync = await interpret(chain(n, {k: list(v) for k, v in script.items()}), Num(value=0),
                               store=InMemoryStore(), sleep=no_sleep)
        other = await interpret(chain(n, copy), Num(value=0), store=AsyncInMemoryStore(),
                                sleep=no_sleep)
        assert (sync.status, sync.final_state, sync.total_tokens) == (
            other.status, other.final_state, other.total_tokens)
        key = [(e.node_id, e.attempt, e.failure, e.input_state, e.output_state)
               for e in sync.trace]
        assert key == [(e.node_id, e.attempt, e.failure, e.input_state, e.output_state)
                       for e in other.trace]
        assert [(type(a).__name__, type(b).__name__) for a, b in _pairs(sync.log)] == [
            (type(a).__name__, type(b).__name__) for a, b in _pairs(other.log)]
        nodes = chain(n, {k: [t for t in v if t == "other"] for k, v in script.items()})
        from_memory = await replay(nodes, sync.log)
        from_text = await replay(nodes, EffectLog.from_jsonl(sync.log.to_jsonl()))
        assert from_memory == from_text == sync

    anyio.run(main)


@pytest.mark.anyio
async def test_a_tampered_record_is_named_by_its_index() -> None:
    """A record changed in the log is reported at its exact index, with the field."""
    result = await interpret(chain(20), Num(value=0))
    items = result.log.records.items
    record = items[14]  # node n7's call, with its answer (one flat tuple of atoms)
    assert record[:3] == ("CallNode", "n7", 1)
    items[14] = (*record[:2], 2, *record[3:])  # attempt 2, where the machine makes 1
    with pytest.raises(NondeterminismError) as caught:
        await replay(chain(20), result.log)
    assert caught.value.index == 14
    assert "attempt: recorded 2, now 1" in str(caught.value)


@pytest.mark.anyio
async def test_a_tampered_state_is_shown_as_its_json_text() -> None:
    """A state in a divergence reads as the JSON it is, not as a Python bytes repr."""
    result = await interpret(chain(6), Num(value=0))
    items = result.log.records.items
    k = next(i for i, item in enumerate(items) if item[:2] == ("Commit", "n3"))
    items[k] = (*items[k][:6], b'{"value":99}', *items[k][7:])
    with pytest.raises(NondeterminismError) as caught:
        await replay(chain(6), result.log)
    assert caught.value.index == k
    assert 'output_state: recorded {"value":99}, now {"value":4}' in str(caught.value)


@pytest.mark.anyio
async def test_a_changed_output_schema_is_named_with_the_fingerprints() -> None:
    """A contract change every record still replays through changes only the plan's
    fingerprint: the error names the step whose output the log recorded under another
    schema, and the two schemas."""
    result = await interpret(chain(4), Num(value=0))
    with pytest.raises(NondeterminismError) as caught:
        await replay(chain(4, {2: ["other"]}), result.log)
    assert caught.value.index == 0
    assert "'n2' output tests.replay.test_records:Num then, " \
           "tests.replay.test_records:Other now" in str(caught.value)


@pytest.mark.anyio
async def test_a_timeout_added_since_the_run_is_named_at_its_call() -> None:
    """A timeout is not in the plan's fingerprint; replay reports the call record of the
    node that has one now (timeout_ms differs)."""
    result = await interpret(chain(12), Num(value=0))
    plan = compile_plan(chain(12)).with_timeout("n5", 1000)
    with pytest.raises(NondeterminismError) as caught:
        await replay(plan, result.log)
    assert caught.value.index == 10
    assert "timeout_ms: recorded None, now 1000" in str(caught.value)


@pytest.mark.anyio
async def test_a_changed_contract_is_refused_before_any_record() -> None:
    """A contract changed since the run is refused by the plan's fingerprint."""
    result = await interpret(chain(6), Num(value=0))
    changed = chain(6, {4: ["other"]})
    with pytest.raises(NondeterminismError, match="contracts"):
        await replay(changed, result.log)


@pytest.mark.anyio
async def test_resume_markers_are_indexed() -> None:
    """A record list knows where its resume markers are, also after an edit."""
    result = await interpret(chain(4), Num(value=0))
    records = RecordList(result.log.records)
    assert records.markers == []
    records.append(ResumeMarker("2026-11-23T00:00:00+00:00"))
    assert records.markers == [9]
    del records[0]
    assert records.markers == [8]


@pytest.mark.anyio
async def test_record_list_reads_like_the_list_of_its_records() -> None:
    """Indexing, slicing, equality and ``index`` work as on the list of decoded records."""
    result = await interpret(chain(5), Num(value=0))
    records = result.log.records
    decoded = list(EffectLog.from_jsonl(result.log.to_jsonl()).records)
    assert len(records) == len(decoded) == 11
    assert records[-1] == decoded[-1] and records[-2] == decoded[-2]
    assert records[4:10] == decoded[4:10]
    assert records == decoded
    assert records.index(decoded[7]) == 7


@pytest.mark.anyio
async def test_a_long_run_keeps_no_tracked_object_per_node() -> None:
    """The records are atoms (tuples of strings, numbers, times and JSON text) that the
    garbage collector stops tracking: a long run adds next to nothing for it to walk."""
    n = 3000
    plan = compile_plan(chain(n))
    await interpret(plan, Num(value=0))  # warm every cache
    gc.collect()
    before = len(gc.get_objects())
    result = await interpret(plan, Num(value=0))
    gc.collect()
    kept = len(gc.get_objects()) - before
    assert result.status is RunStatus.COMPLETED and len(result.log.records) == 2 * n + 1
    assert kept / n < 0.5, f"{kept / n:.2f} tracked objects kept per node"


@pytest.mark.anyio
async def test_each_record_is_one_flat_tuple_of_atoms() -> None:
    """A record is one tuple: its effect's atoms (the effect's name first, a fixed count
    of them), then its event's; atoms are strings, numbers, times, JSON bytes and tuples
    of atoms, nothing live (no model, no exception): one tuple the collector soon stops
    tracking, not a pair of tuples that stays tracked while its parts are. A loop's
    records (with their coordinates) read back as the decoded records."""
    from datetime import datetime

    from stroma import loop
    from stroma.log import decode_effect, decode_event, record_effect, record_event

    def atoms_only(value: Any) -> bool:
        if type(value) is tuple:
            return all(atoms_only(v) for v in value)
        return value is None or type(value) in (str, int, float, bool, bytes, datetime)

    plan = compile_plan([loop(chain(2), until=lambda s: s.value >= 6, max_iterations=5,
                              name="L")])
    result = await interpret(plan, Num(value=0))
    assert result.status is RunStatus.COMPLETED
    items = result.log.records.items
    assert {type(item[0]) for item in items} == {str}
    assert all(atoms_only(item) for item in items)
    for item, (effect, event) in zip(items, result.log.records, strict=True):
        assert decode_effect(record_effect(item)) == effect
        answer = record_event(item)
        assert (None if answer is None else decode_event(answer)) == event
        assert item == record_effect(item) + (answer or ())
    commits = [item for item in items if item[0] == "Commit"]
    assert [c[9] for c in commits][:3] == [(("loop", "L", 1),)] * 2 + [(("loop", "L", 2),)]


class Reading(BaseModel):
    x: float
    note: str | None = None


def reading_nodes() -> list[Any]:
    values = [1.0, float("inf"), 2.0]

    def node(i: int) -> Any:
        contract = NodeContract(node_id=f"r{i}", input_schema=Reading, output_schema=Reading)

        async def step(s: Reading) -> Reading:
            return Reading(x=values[i])  # a model, not a dict

        return stroma_node(f"r{i}", contract)(step)

    return [node(i) for i in range(3)]


@pytest.mark.anyio
async def test_a_state_with_infinity_keeps_it_in_trace_log_and_checkpoint(tmp_path: Any) -> None:
    """JSON has no infinity (pydantic writes null): the trace, the log text and every
    checkpoint keep the very value, in memory and on a durable store alike."""
    store = InMemoryStore()
    result = await interpret(reading_nodes(), Reading(x=0.0), store=store)
    assert [e.output_state["x"] for e in result.trace] == [1.0, float("inf"), 2.0]
    assert result.trace.events[2].input_state["x"] == float("inf")
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
