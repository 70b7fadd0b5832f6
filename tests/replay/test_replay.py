"""Replay: a recorded run comes back equal, calling no node, classifier or hook; a plan
that no longer matches its log is a NondeterminismError naming the record."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydantic import BaseModel

from stroma import (
    EffectLog,
    NodeContract,
    NondeterminismError,
    RunStatus,
    StromaError,
    replay,
    stroma_node,
)
from stroma.runner import RunConfig, interpret
from tests.replay.pipelines import SCENARIOS, V1_SCENARIOS, Called, Num, record

GOLDEN = Path(__file__).parent.parent / "golden"
EXPECTED = {
    "retries": RunStatus.COMPLETED,
    "fan_out": RunStatus.COMPLETED,
    "terminal": RunStatus.FAILED,
    "budget": RunStatus.PARTIAL,
    "hook_errors": RunStatus.COMPLETED,
    "loop": RunStatus.COMPLETED,
    "route": RunStatus.COMPLETED,
    "wait": RunStatus.RESUMED,
}
# Every golden log: format version 1 (recorded by stroma 0.2, never rewritten) and the
# current version 2 (``python -m tests.golden.make_golden``).
GOLDEN_LOGS = [
    *(pytest.param(1, name, id=f"v1-{name}") for name in V1_SCENARIOS),
    *(pytest.param(2, name, id=f"v2-{name}") for name in sorted(SCENARIOS)),
]


def golden(version: int, name: str) -> str:
    return (GOLDEN / f"v{version}" / f"{name}.jsonl").read_text(encoding="utf-8")


def test_the_golden_folders_hold_one_log_per_scenario_of_their_version() -> None:
    """v1/ holds the five 0.2 logs, each in format 1; v2/ one log per scenario, in format
    2: a scenario without its golden log (or a stray file) is seen."""
    assert sorted(p.stem for p in (GOLDEN / "v1").glob("*.jsonl")) == sorted(V1_SCENARIOS)
    assert sorted(p.stem for p in (GOLDEN / "v2").glob("*.jsonl")) == sorted(SCENARIOS)
    assert not list(GOLDEN.glob("*.jsonl"))
    for version in (1, 2):
        for path in (GOLDEN / f"v{version}").glob("*.jsonl"):
            header = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
            assert header["stroma_log"] == version, path
            assert EffectLog.from_jsonl(path.read_text(encoding="utf-8")).header.format == \
                version


def forbidden_plan(name: str) -> list[Any]:
    build, _ = SCENARIOS[name]
    return build(False)


@pytest.mark.parametrize(("version", "name"), GOLDEN_LOGS)
def test_golden_log_round_trips_exactly(version: int, name: str) -> None:
    """A checked-in log parses and serializes back to the very same text."""
    text = golden(version, name)
    assert EffectLog.from_jsonl(text).to_jsonl() == text


@pytest.mark.anyio
@pytest.mark.parametrize(("version", "name"), GOLDEN_LOGS)
async def test_golden_log_replays_without_calling_anything(version: int, name: str) -> None:
    """Replaying a golden log against nodes (and loop predicates and route selectors) that
    raise if called gives the recorded run."""
    log = EffectLog.from_jsonl(golden(version, name))
    result = await replay(forbidden_plan(name), log)
    assert result.status is EXPECTED[name]
    assert result.trace == log.trace()
    finish = log.finish
    assert finish is not None
    assert result.total_tokens == finish.total_tokens
    assert result.total_cost_usd == finish.total_cost_usd
    assert result.final_state.model_dump(mode="json") == finish.final_state


@pytest.mark.anyio
@pytest.mark.parametrize("name", V1_SCENARIOS)
async def test_a_cut_v1_log_resumes_live_in_version_2(name: str) -> None:
    """A version 1 log cut after its first checkpoint (a crash) resumes on a store with
    the live nodes: the node it has is not run again, the run ends as the whole v1 log
    did, its text keeps the v1 lines exactly as read and goes on in version 2, and the
    whole replays calling nothing."""
    from stroma import InMemoryStore

    text = golden(1, name)
    whole = EffectLog.from_jsonl(text)
    lines = text.splitlines(keepends=True)
    cut = 1 + next(k for k, line in enumerate(lines) if '"t":"SaveCheckpoint"' in line)
    log = EffectLog.from_jsonl("".join(lines[:cut]))
    first = json.loads(lines[cut - 1])["effect"]["node_id"]
    store = InMemoryStore()
    store.attach_log(log.header.run_id, log)
    build, config = SCENARIOS[name]

    async def no_sleep(seconds: float) -> None:
        return None

    resumed = await interpret(build(True), Num(value=1), store=store, sleep=no_sleep,
                              config=config().model_copy(update={"seed": whole.header.seed}))
    finish = whole.finish
    assert finish is not None
    assert resumed.final_state.model_dump(mode="json") == finish.final_state
    assert resumed.total_tokens == finish.total_tokens
    expected = RunStatus.RESUMED if EXPECTED[name] is RunStatus.COMPLETED else EXPECTED[name]
    assert resumed.status is expected
    out = resumed.log.to_jsonl()
    assert out.startswith("".join(lines[:cut]))
    assert '"resumed":' in out.splitlines()[cut]
    assert EffectLog.from_jsonl(out).to_jsonl() == out
    assert await replay(forbidden_plan(name), EffectLog.from_jsonl(out)) == resumed
    assert [e.node_id for e in resumed.trace].count(first) == [
        e.node_id for e in whole.trace()].count(first)  # recorded, not run again
    from stroma.log import ResumeMarker

    records = list(resumed.log.records)
    at = next(k for k, r in enumerate(records) if isinstance(r, ResumeMarker))
    called = [r[0].node_id for r in records[at + 1:]
              if type(r[0]).__name__ in ("CallNode", "CallParallel")]
    assert called and first not in called


@pytest.mark.anyio
@pytest.mark.parametrize("name", sorted(SCENARIOS))
async def test_live_run_and_its_replay_are_equal(name: str) -> None:
    """A fresh live run and its replay agree on status, state, totals and every trace
    event, timestamps and durations included."""
    live = await record(name)
    again = await replay(forbidden_plan(name), live.log)
    assert again == live
    assert again.trace.diff(live.trace) == []
    assert [e.timestamp_utc for e in again.trace] == [e.timestamp_utc for e in live.trace]
    assert [e.duration_ms for e in again.trace] == [e.duration_ms for e in live.trace]


@pytest.mark.anyio
async def test_replay_of_a_real_timeout_is_equal() -> None:
    """A node cancelled by its timeout replays to the same trace without waiting."""

    class T(BaseModel):
        value: int

    contract = NodeContract(node_id="hang", input_schema=T, output_schema=T)

    @stroma_node("hang", contract)
    async def hang(state: T) -> Any:
        await anyio.sleep_forever()

    config = RunConfig(run_id="timeout-replay", node_timeouts={"hang": 5},
                       policy_map={"RECOVERABLE": {"max_retries": 1, "backoff_seconds": 0}})
    live = await interpret([hang], T(value=1), config=config)
    assert live.status is RunStatus.PARTIAL
    assert [e.failure for e in live.trace] == ["RECOVERABLE", "RECOVERABLE"]

    @stroma_node("hang", contract)
    async def hang_forbidden(state: T) -> Any:
        raise Called("hang")

    again = await replay([hang_forbidden], live.log)
    assert again == live


def _mutated(name: str, fn: Any) -> EffectLog:
    lines = golden(1, name).splitlines()
    objs = [json.loads(line) for line in lines]
    fn(objs)
    return EffectLog.from_jsonl("".join(json.dumps(o) + "\n" for o in objs))


@pytest.mark.anyio
@pytest.mark.parametrize("version", [1, 2])
async def test_renamed_node_is_named_in_the_error(version: int) -> None:
    """Renaming a node makes replay stop at the first record, naming both effects."""
    from tests.replay.pipelines import _node

    async def body(s: Num) -> Any:
        raise Called

    plan = [_node("flaky_v2", Num, Num, False, body), *forbidden_plan("retries")[1:]]
    log = EffectLog.from_jsonl(golden(version, "retries"))
    with pytest.raises(NondeterminismError) as info:
        await replay(plan, log)
    assert info.value.index == 0
    assert "flaky" in str(info.value.recorded) and "flaky_v2" in str(info.value.new)


@pytest.mark.anyio
@pytest.mark.parametrize(
    "change",
    ["added", "removed", "reordered", "contract"],
)
async def test_changed_plan_is_nondeterminism(change: str) -> None:
    """Adding, removing or reordering a node, or changing a contract, is detected."""
    from tests.replay.pipelines import Left, _node

    base = forbidden_plan("retries")

    async def body(s: Any) -> Any:
        raise Called

    if change == "added":
        plan = [*base, _node("extra", Num, Num, False, body)]
    elif change == "removed":
        plan = base[:1]
    elif change == "reordered":
        plan = base[::-1]
    else:
        plan = [base[0], _node("double", Num, Left, False, body)]
    log = EffectLog.from_jsonl(golden(1, "retries"))
    with pytest.raises(NondeterminismError) as info:
        await replay(plan, log)
    assert "record" in str(info.value)


@pytest.mark.anyio
async def test_altered_log_is_nondeterminism() -> None:
    """Editing a recorded node output so it disagrees with the recorded trace is caught."""

    def edit(objs: list[dict[str, Any]]) -> None:
        for o in objs[1:]:
            if o.get("event") and o["event"].get("t") == "NodeReturned":
                o["event"]["output"] = {"value": 999}
                return

    with pytest.raises(NondeterminismError) as info:
        await replay(forbidden_plan("retries"), _mutated("retries", edit))
    assert "999" in str(info.value.new) or "999" in str(info.value)


@pytest.mark.anyio
@pytest.mark.parametrize("version", [1, 2])
async def test_unfinished_log_cannot_be_replayed_only_resumed(version: int) -> None:
    """A log cut short by a crash replays its prefix, then says to resume instead."""
    text = golden(version, "retries")
    cut = "".join(text.splitlines(keepends=True)[:5])
    with pytest.raises(StromaError, match="resume"):
        await replay(forbidden_plan("retries"), EffectLog.from_jsonl(cut))


@pytest.mark.anyio
async def test_resume_from_memory_log_skips_finished_nodes() -> None:
    """A run id whose (in-process) log is finished returns that result and runs nothing."""
    from stroma import AsyncInMemoryStore

    store = AsyncInMemoryStore()
    build, config = SCENARIOS["retries"]
    first = await interpret(build(True), Num(value=1), store=store,
                            config=config().model_copy(update={"seed": 7}))
    second = await interpret(forbidden_plan("retries"), Num(value=1), store=store,
                             config=RunConfig(run_id="golden-retries"))
    assert second.status is first.status
    assert second.final_state == first.final_state
    assert second.trace == first.trace


# Plans for the command-line tests (`--plan tests.replay.test_replay:RETRIES_PLAN`).
RETRIES_PLAN = forbidden_plan("retries")
REORDERED_PLAN = RETRIES_PLAN[::-1]


@pytest.mark.anyio
async def test_outputs_with_datetimes_and_tuples_log_and_replay() -> None:
    """A node returning values json does not know (datetime, tuple) is logged as JSON and
    its log round-trips and replays equal."""
    import datetime as dt

    class Stamp(BaseModel):
        when: dt.datetime
        tags: list[str]

    contract = NodeContract(node_id="stamp", input_schema=Stamp, output_schema=Stamp)

    @stroma_node("stamp", contract)
    async def stamp(state: Stamp) -> Any:
        return {"when": dt.datetime(2026, 1, 1, tzinfo=dt.UTC), "tags": ("x", "y")}

    live = await interpret([stamp], Stamp(when=dt.datetime(2025, 1, 1, tzinfo=dt.UTC), tags=[]))
    text = live.log.to_jsonl()
    assert '"tags":["x","y"]' in text and '"when":"2026-01-01T00:00:00Z"' in text
    assert EffectLog.from_jsonl(text).to_jsonl() == text
    assert await replay([stamp], EffectLog.from_jsonl(text)) == live
