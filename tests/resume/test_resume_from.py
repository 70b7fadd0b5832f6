"""``resume_from`` (the API's resume) on a run whose FileStore log finished: a restart segment."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from interpreters.stores.file import LOG_NAME, FileStore
from stroma import NondeterminismError, replay
from stroma.log import ResumeMarker
from stroma.runner import interpret
from stroma.trace import RunStatus
from tests.resume.pipeline import Num, Pipeline, config
from tests.resume.test_crash_boundaries import _cuts, _done_in

pytestmark = pytest.mark.anyio

RUN = "restart-me"
BEFORE_TARGET = {"a", "flaky", "left", "right"}


async def test_resume_from_appends_a_restart_segment_that_replays_and_survives_a_crash(
    tmp_path: Path,
) -> None:
    """resume_from on a finished log appends a restart segment run from the checkpoint
    before the target (RESUMED); replay of the stored log gives that segment's result, and a
    crash anywhere inside the segment resumes to it without running finished nodes again."""
    folder = tmp_path / "store"
    baseline = await interpret(Pipeline().nodes(), Num(value=1), store=FileStore(folder),
                               config=config(RUN))
    assert baseline.status is RunStatus.COMPLETED
    log_path = folder / "runs" / RUN / LOG_NAME
    before = log_path.read_bytes()

    pipeline = Pipeline()
    restarted = await interpret(pipeline.nodes(), Num(value=1), store=FileStore(folder),
                                config=config(RUN, resume_from="total"))
    assert restarted.status is RunStatus.RESUMED
    assert restarted.final_state == baseline.final_state
    assert dict(pipeline.calls) == {"total": 1, "e": 1, "f": 1}
    assert [e.node_id for e in restarted.trace] == ["total", "e", "f"]

    # The restart is appended: the first session's bytes stay as they were.
    after = log_path.read_bytes()
    assert after.startswith(before)
    stored = await FileStore(folder).read_log(RUN)
    assert stored is not None
    restarts = [r for r in stored.records if isinstance(r, ResumeMarker) and r.restart]
    assert len(restarts) == 1 and restarts[0].restart["resume_from"] == "total"

    # Replay gives the last segment's result; a plain call returns it, running nothing.
    replayed = await replay(Pipeline().nodes(), stored)
    assert replayed.status is RunStatus.RESUMED
    assert replayed.final_state == restarted.final_state
    assert replayed.trace.diff(restarted.trace) == []
    idle = Pipeline()
    again = await interpret(idle.nodes(), Num(value=1), store=FileStore(folder),
                            config=config(RUN))
    assert again.status is RunStatus.RESUMED and again.final_state == baseline.final_state
    assert not idle.called

    # A crash inside the restarted segment (at each line boundary, and inside each line
    # from the restart record on) resumes that segment.
    marker_end = after.index(b'"restart":')
    marker_end = after.index(b"\n", marker_end) + 1
    cuts = [(label, p) for label, p in _cuts(after) if len(p) >= marker_end]
    assert len(cuts) > 10
    for k, (label, prefix) in enumerate(cuts):
        copy = tmp_path / f"cut{k}"
        shutil.copytree(folder, copy)
        (copy / "runs" / RUN / LOG_NAME).write_bytes(prefix)
        done, finished, _, _ = _done_in(b"header\n" + prefix[marker_end:])
        where = f"log cut {label} ({len(prefix)} bytes)"

        resumed_pipeline = Pipeline()
        result = await interpret(resumed_pipeline.nodes(), Num(value=1),
                                 store=FileStore(copy), config=config(RUN))
        assert result.status is RunStatus.RESUMED, where
        assert result.final_state == baseline.final_state, where
        assert [e.node_id for e in result.trace] == ["total", "e", "f"], where
        assert result.trace.diff(restarted.trace) == [], where
        assert not resumed_pipeline.called & (done | BEFORE_TARGET), where
        if finished:
            assert not resumed_pipeline.called, where
        final_log = await FileStore(copy).read_log(RUN)
        assert final_log is not None
        again_replayed = await replay(Pipeline().nodes(), final_log)
        assert again_replayed.final_state == result.final_state, where
        assert again_replayed.trace.diff(result.trace) == [], where


async def test_a_restart_with_a_changed_plan_is_matched_against_that_plan(
    tmp_path: Path,
) -> None:
    """After resume_from with a changed plan, the run is resumed and replayed with the plan
    of its last session, and the old plan diverges at that session's record in the log."""
    folder = tmp_path / "store"
    await interpret(Pipeline().nodes(), Num(value=1), store=FileStore(folder),
                    config=config(RUN))
    renamed = {"f": "f2"}
    restarted = await interpret(Pipeline(rename=renamed).nodes(), Num(value=1),
                                store=FileStore(folder), config=config(RUN, resume_from="total"))
    assert restarted.status is RunStatus.RESUMED

    idle = Pipeline(rename=renamed)
    again = await interpret(idle.nodes(), Num(value=1), store=FileStore(folder),
                            config=config(RUN))
    assert again.status is RunStatus.RESUMED and not idle.called
    stored = await FileStore(folder).read_log(RUN)
    assert stored is not None
    assert (await replay(Pipeline(rename=renamed).nodes(), stored)).final_state == (
        restarted.final_state
    )

    old = Pipeline()
    with pytest.raises(NondeterminismError) as caught:
        await interpret(old.nodes(), Num(value=1), store=FileStore(folder), config=config(RUN))
    assert not old.called
    index = next(n for n, r in enumerate(stored.records)
                 if not isinstance(r, ResumeMarker) and getattr(r[0], "node_id", "") == "f2")
    assert caught.value.index == index
    with pytest.raises(NondeterminismError):
        await replay(Pipeline().nodes(), stored)


async def test_a_restart_does_not_reuse_fan_out_children_of_the_crashed_session(
    tmp_path: Path,
) -> None:
    """resume_from on a run that crashed inside a fan-out runs the group's children again:
    the finished child's outcome belonged to the crashed session's input, not the restart's."""
    folder = tmp_path / "store"
    await interpret(Pipeline().nodes(), Num(value=1), store=FileStore(folder),
                    config=config(RUN))
    path = folder / "runs" / RUN / LOG_NAME
    lines = path.read_bytes().split(b"\n")
    n = next(k for k, line in enumerate(lines) if b'"partial":0' in line)
    path.write_bytes(b"".join(line + b"\n" for line in lines[: n + 1]))  # left is durable

    pipeline = Pipeline()
    result = await interpret(pipeline.nodes(), Num(value=5), store=FileStore(folder),
                             config=config(RUN, resume_from="a"))
    fresh = await interpret(Pipeline().nodes(), Num(value=5),
                            store=FileStore(tmp_path / "fresh"), config=config(RUN))
    assert result.status is RunStatus.RESUMED
    assert result.final_state == fresh.final_state == Num(value=47)
    assert pipeline.calls["left"] == 1 and pipeline.calls["right"] == 1


# ------------------------------------------------- a resume_from that cannot go on


@pytest.mark.parametrize("target", ["totl", "nope"])
async def test_a_resume_from_naming_no_step_leaves_the_finished_run_as_it_was(
    tmp_path: Path, target: str,
) -> None:
    """A typo in resume_from is PARTIAL (API.md), runs nothing and writes nothing: the
    finished run's log is unchanged, and running it again returns its result."""
    folder = tmp_path / "store"
    baseline = await interpret(Pipeline().nodes(), Num(value=1), store=FileStore(folder),
                               config=config(RUN))
    log_path = folder / "runs" / RUN / LOG_NAME
    before = log_path.read_bytes()

    pipeline = Pipeline()
    typo = await interpret(pipeline.nodes(), Num(value=1), store=FileStore(folder),
                           config=config(RUN, resume_from=target))

    assert typo.status is RunStatus.PARTIAL
    assert f"resume_from={target!r} is not a step" in (typo.stop_reason or "")
    assert not pipeline.calls
    assert log_path.read_bytes() == before
    assert typo.log is not None  # its own log replays to it
    assert (await replay(Pipeline().nodes(), typo.log)).stop_reason == typo.stop_reason
    again = await interpret(Pipeline().nodes(), Num(value=1), store=FileStore(folder),
                            config=config(RUN))
    assert (again.status, again.final_state) == (baseline.status, baseline.final_state)


async def test_a_resume_from_without_its_checkpoint_leaves_a_crashed_run_to_go_on(
) -> None:
    """A run that crashed in ``b``, asked to resume from ``c``: ``b``'s checkpoint is not
    there (PARTIAL, nothing run, nothing written), and a plain run then goes on from the
    crash."""
    from collections import Counter

    from stroma import InMemoryStore, NodeContract, stroma_node

    calls: Counter[str] = Counter()
    crash = [True]

    def node(node_id: str) -> Any:
        async def fn(s: Num) -> dict[str, int]:
            calls[node_id] += 1
            if node_id == "b" and crash[0]:
                crash[0] = False
                raise KeyboardInterrupt  # the process is stopped mid-run
            return {"value": s.value + 1}
        return stroma_node(node_id, NodeContract(node_id=node_id, input_schema=Num,
                                                 output_schema=Num))(fn)

    plan = [node("a"), node("b"), node("c")]
    store = InMemoryStore()
    with pytest.raises(KeyboardInterrupt):
        await interpret(plan, Num(value=1), store=store, config=config(RUN))
    log = store.get_log(RUN)
    assert log is not None and log.finish is None
    length = len(log.records)

    missing = await interpret(plan, Num(value=1), store=store,
                              config=config(RUN, resume_from="c"))
    assert missing.status is RunStatus.PARTIAL
    assert "no checkpoint of 'b'" in (missing.stop_reason or "")
    assert calls == {"a": 1, "b": 1}
    assert len(log.records) == length

    done = await interpret(plan, Num(value=1), store=store, config=config(RUN))
    assert done.status is RunStatus.RESUMED
    assert done.final_state == Num(value=4)
    assert calls == {"a": 1, "b": 2, "c": 1}


async def test_a_resume_from_inside_a_loop_is_partial_and_names_the_loop() -> None:
    """A step inside a loop is no place to resume from (which iteration?): PARTIAL, with
    the loop and the steps it can resume from named, nothing run; before, a ValueError
    left the run unable to go on."""
    from stroma import InMemoryStore, NodeContract, loop, stroma_node

    def node(node_id: str) -> Any:
        async def fn(s: Num) -> dict[str, int]:
            return {"value": s.value + 1}
        return stroma_node(node_id, NodeContract(node_id=node_id, input_schema=Num,
                                                 output_schema=Num))(fn)

    plan = [node("pre"), loop(node("step"), until=lambda s: s.value >= 4, max_iterations=5,
                             name="L"), node("post")]
    store = InMemoryStore()
    first = await interpret(plan, Num(value=0), store=store, config=config(RUN))
    assert first.status is RunStatus.COMPLETED

    inside = await interpret(plan, Num(value=0), store=store,
                             config=config(RUN, resume_from="step"))
    assert inside.status is RunStatus.PARTIAL
    reason = inside.stop_reason or ""
    assert "'step' is a step inside loop 'L'" in reason
    assert "('pre', 'post')" in reason
    again = await interpret(plan, Num(value=0), store=store, config=config(RUN))
    assert (again.status, again.final_state) == (first.status, first.final_state)
    after = await interpret(plan, Num(value=0), store=store,
                            config=config(RUN, resume_from="post"))
    assert (after.status, after.final_state) == (RunStatus.RESUMED, first.final_state)
