"""A FileStore log cut at every record boundary (and inside its last line) resumes correctly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import anyio
import pytest

from interpreters.stores.file import LOG_NAME, FileStore
from stroma import replay
from stroma.log import ResumeMarker
from stroma.runner import interpret
from stroma.trace import RunStatus
from tests.resume.pipeline import CHILDREN, Num, Pipeline, config

pytestmark = pytest.mark.anyio

RUN = "crash-me"


def _cuts(raw: bytes) -> list[tuple[str, bytes]]:
    """Every prefix of ``raw`` ending at a line boundary, and each one plus half a line."""
    cuts: list[tuple[str, bytes]] = [("empty", b"")]
    ends = [i + 1 for i, b in enumerate(raw) if b == 0x0A]
    start = 0
    for n, end in enumerate(ends, 1):
        mid = start + max(1, (end - start) // 2)
        cuts.append((f"inside line {n}", raw[:mid]))
        cuts.append((f"after line {n}", raw[:end]))
        start = end
    return cuts


def _done_in(prefix: bytes) -> tuple[set[str], bool, bool, bool]:
    """Nodes that the prefix's whole lines record as finished; whether it holds a Finish, a
    whole header, and flaky's failed first attempt."""
    done: set[str] = set()
    finished = flaky_failed = False
    lines = prefix.split(b"\n")[:-1]  # whole lines only
    for line in lines[1:]:
        obj = json.loads(line)
        if "ckpt" in obj:
            continue
        effect = obj["effect"]
        if effect["t"] == "Commit":
            done.update(CHILDREN.get(effect["node_id"], (effect["node_id"],)))
        elif "partial" in obj:
            done.add(effect["node_id"])  # a fan-out child made durable before its group
        elif effect["t"] == "Finish":
            finished = True
        if (obj.get("event") or {}).get("t") == "NodeRaised":
            flaky_failed = True
    return done, finished, bool(lines), flaky_failed




async def _record(tmp_path: Path) -> tuple[Any, bytes, Path]:
    folder = tmp_path / "original"
    pipeline = Pipeline()
    result = await interpret(pipeline.nodes(), Num(value=1), store=FileStore(folder),
                             config=config(RUN))
    assert result.status is RunStatus.COMPLETED
    assert pipeline.calls["flaky"] == 2  # the retried failure is in the log
    raw = (folder / "runs" / RUN / LOG_NAME).read_bytes()
    return result, raw, folder


async def test_resume_after_a_crash_at_every_record_boundary(tmp_path: Path) -> None:
    """Any prefix of a finished run's log resumes to the same final state and trace, RESUMED,
    without calling again a node whose checkpoint record (or fan-out partial) is in it."""
    baseline, raw, original = await _record(tmp_path)
    cuts = _cuts(raw)
    labels = [label for label, _ in cuts]
    # The fan-out's partial lines and the group's child lines are among the cut points.
    lines = raw.split(b"\n")
    partial_lines = [n for n, line in enumerate(lines, 1) if b'"partial":' in line]
    child_lines = [n for n, line in enumerate(lines, 1) if b'"child":' in line]
    assert len(partial_lines) == 2 and len(child_lines) == 2
    for n in (*partial_lines, *child_lines):
        assert f"after line {n}" in labels and f"inside line {n}" in labels

    for k, (label, prefix) in enumerate(cuts):
        folder = tmp_path / f"cut{k}"
        shutil.copytree(original, folder)
        (folder / "runs" / RUN / LOG_NAME).write_bytes(prefix)
        done, finished, has_header, flaky_failed = _done_in(prefix)

        pipeline = Pipeline(flaky_failed=flaky_failed)
        result = await interpret(pipeline.nodes(), Num(value=1), store=FileStore(folder),
                                 config=config(RUN))
        where = f"log cut {label} ({len(prefix)} bytes)"
        assert result.final_state == baseline.final_state, where
        assert result.trace.diff(baseline.trace) == [], where
        assert not (pipeline.called & done), f"{where}: ran again {pipeline.called & done}"
        if finished:
            assert result.status is baseline.status, where
            assert not pipeline.called, where
        elif has_header:
            assert result.status is RunStatus.RESUMED, where
        else:  # not even the header was durable: a new run
            assert result.status is RunStatus.COMPLETED, where

        # What the resumed run left in the store reads back whole, replays to the same
        # result, and a further call returns it without running anything.
        stored = await FileStore(folder).read_log(RUN)
        assert stored is not None and stored.finish is not None, where
        replayed = await replay(Pipeline().nodes(), stored)
        assert replayed.status is result.status, where
        assert replayed.final_state == result.final_state, where
        assert replayed.trace.diff(result.trace) == [], where
        again = Pipeline()
        third = await interpret(again.nodes(), Num(value=1), store=FileStore(folder),
                                config=config(RUN))
        assert third.status is result.status and third.final_state == result.final_state
        assert not again.called, where


@pytest.mark.parametrize("before", ["header", "partial", "Commit"])
async def test_a_torn_checkpoint_line_keeps_the_whole_line_before_it(
    tmp_path: Path, before: str
) -> None:
    """A log cut inside a checkpoint line reads back every whole record before it, and
    resumes RESUMED without running again what those records finished."""
    _, raw, original = await _record(tmp_path)
    lines = raw.split(b"\n")
    marker = {"header": b'{"stroma_log"', "partial": b'"partial":1',
              "Commit": b'"t":"Commit"'}[before]
    # (the first such line a checkpoint line follows: a batch's checkpoint comes first)
    n = next(k for k, line in enumerate(lines)
             if marker in line and lines[k + 1].startswith(b'{"ckpt":1,'))
    assert lines[n + 1].startswith(b'{"ckpt":1,')
    prefix = b"".join(line + b"\n" for line in lines[: n + 1]) + lines[n + 1][:20]
    folder = tmp_path / "cut"
    shutil.copytree(original, folder)
    (folder / "runs" / RUN / LOG_NAME).write_bytes(prefix)
    done, _, _, flaky_failed = _done_in(prefix)

    # (the records: not checkpoint lines, nor a group's child lines, which are part of
    # its record, nor the progress of a child in flight)
    whole = [line for line in lines[1 : n + 1] if line.startswith(b'{"i":')
             and b'"partial"' not in line and b'"child":' not in line]
    log = await FileStore(folder).read_log(RUN)
    assert log is not None and len(log.records) == len(whole)
    assert len(log.partials) == sum(b'"partial"' in line for line in lines[: n + 1])

    pipeline = Pipeline(flaky_failed=flaky_failed)
    result = await interpret(pipeline.nodes(), Num(value=1), store=FileStore(folder),
                             config=config(RUN))
    assert result.status is RunStatus.RESUMED
    assert not (pipeline.called & done)


async def test_a_second_crash_inside_the_same_fan_out_keeps_the_first_finished_child(
    tmp_path: Path,
) -> None:
    """A run that crashed inside a fan-out after one child finished, resumed, and crashed
    again inside the same fan-out still does not run that child again."""
    _, raw, original = await _record(tmp_path)
    lines = raw.split(b"\n")
    n = next(k for k, line in enumerate(lines) if b'"partial":0' in line)
    folder = tmp_path / "twice"
    shutil.copytree(original, folder)
    (folder / "runs" / RUN / LOG_NAME).write_bytes(b"".join(x + b"\n" for x in lines[: n + 1]))

    entered, gate = anyio.Event(), anyio.Event()  # the gate is never opened
    second = Pipeline(flaky_failed=True, gate=gate, entered=entered, gate_at="right")
    async with anyio.create_task_group() as tg:
        async def run() -> None:
            await interpret(second.nodes(), Num(value=1), store=FileStore(folder),
                            config=config(RUN))

        tg.start_soon(run)
        await entered.wait()
        tg.cancel_scope.cancel()
    assert second.calls["left"] == 0 and second.calls["right"] == 1

    third = Pipeline(flaky_failed=True)
    result = await interpret(third.nodes(), Num(value=1), store=FileStore(folder),
                             config=config(RUN))
    assert result.status is RunStatus.RESUMED and result.final_state == Num(value=23)
    assert third.calls["left"] == 0 and third.calls["right"] == 1
    assert not third.called & {"a", "flaky"}


async def test_a_run_resumed_after_its_last_node_returned_finishes_resumed(
    tmp_path: Path,
) -> None:
    """A log cut after the last node's answer resumes inside the effects that end the run:
    the Finish written after the resume record says RESUMED, and replays as RESUMED (a log
    written before this was fixed, with COMPLETED there, still replays as recorded)."""
    _, raw, original = await _record(tmp_path)
    lines = raw.split(b"\n")
    n = next(k for k, line in enumerate(lines) if b'"CallNode","node_id":"f"' in line)
    folder = tmp_path / "late"
    shutil.copytree(original, folder)
    path = folder / "runs" / RUN / LOG_NAME
    path.write_bytes(b"".join(x + b"\n" for x in lines[: n + 1]))

    pipeline = Pipeline(flaky_failed=True)
    result = await interpret(pipeline.nodes(), Num(value=1), store=FileStore(folder),
                             config=config(RUN))
    assert result.status is RunStatus.RESUMED and not pipeline.called
    stored = await FileStore(folder).read_log(RUN)
    assert stored is not None
    kinds = [type(r).__name__ if isinstance(r, ResumeMarker) else type(r[0]).__name__
             for r in stored.records[-3:]]
    assert kinds == ["ResumeMarker", "Commit", "Finish"]
    assert stored.finish is not None and stored.finish.status is RunStatus.RESUMED
    assert (await replay(Pipeline().nodes(), stored)).status is RunStatus.RESUMED

    old_style = stored.to_jsonl().replace('"status":"RESUMED"', '"status":"COMPLETED"')
    assert (await replay(Pipeline().nodes(), old_style)).status is RunStatus.COMPLETED


async def test_a_crash_inside_a_first_step_fan_out_keeps_its_finished_child(
    tmp_path: Path,
) -> None:
    """A log holding only its header and a finished child's partial line (a crash inside
    a fan-out that is the first step) resumes without running that child again."""
    folder = tmp_path / "first"
    await interpret(Pipeline().nodes()[2:4], Num(value=1), store=FileStore(folder),
                    config=config(RUN))
    path = folder / "runs" / RUN / LOG_NAME
    lines = path.read_bytes().split(b"\n")
    assert b'"partial":0' in lines[1]
    path.write_bytes(lines[0] + b"\n" + lines[1] + b"\n")
    log = await FileStore(folder).read_log(RUN)
    assert log is not None and len(log.records) == 0 and len(log.partials) == 1

    pipeline = Pipeline()
    result = await interpret(pipeline.nodes()[2:4], Num(value=1), store=FileStore(folder),
                             config=config(RUN))
    assert result.status is RunStatus.RESUMED and result.final_state == Num(value=11)
    assert dict(pipeline.calls) == {"right": 1, "total": 1}
