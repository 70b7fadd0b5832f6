"""A recorded effect that needs an answer but has none is damage, never a place to go live.

stroma's writers record an answered effect only together with its answer (the driver
appends ``(effect, event)`` after performing it; a crash loses the whole record), so a
record like ``{"effect":{"t":"CallNode",...},"event":null}`` means the log was altered.
Going live there would give the new records indices that the durable log already uses.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from interpreters.stores.file import LOG_NAME, FileStore
from stroma import AsyncInMemoryStore, EffectLog, LogCorrupted, replay
from stroma import effects as fx
from stroma.runner import interpret
from tests.resume.pipeline import Num, Pipeline, config

pytestmark = pytest.mark.anyio

RUN = "unanswered"
_NO_ANSWER = (fx.Commit, fx.RecordAttempt, fx.Finish)


def _unanswer(line: bytes) -> bytes:
    obj = json.loads(line)
    obj["event"] = None
    return json.dumps(obj, separators=(",", ":")).encode()


async def _recorded(folder: Path) -> list[bytes]:
    await interpret(Pipeline().nodes(), Num(value=1), store=FileStore(folder),
                    config=config(RUN))
    return (folder / "runs" / RUN / LOG_NAME).read_bytes().split(b"\n")


async def test_stromas_own_logs_answer_every_effect_that_needs_an_answer(
    tmp_path: Path,
) -> None:
    """Every record a live run writes, except Commit, RecordAttempt and Finish, has its
    event."""
    await _recorded(tmp_path)
    log = await FileStore(tmp_path).read_log(RUN)
    assert log is not None
    pairs = [r for r in log.records if isinstance(r, tuple)]
    assert all(ev is not None for eff, ev in pairs if not isinstance(eff, _NO_ANSWER))


@pytest.mark.parametrize("where", ["middle", "end"])
@pytest.mark.parametrize("effect", ["CallNode", "CallParallel"])
async def test_resuming_a_log_with_an_unanswered_record_is_log_corrupted(
    tmp_path: Path, where: str, effect: str
) -> None:
    """Resuming a log with an answerable effect recorded without its event raises
    LogCorrupted naming that record, before any node runs and without writing to the log."""
    folder = tmp_path / "store"
    lines = await _recorded(folder)
    n = next(k for k, line in enumerate(lines) if f'"effect":{{"t":"{effect}"'.encode() in line
             and b'"child"' not in line and b'"partial"' not in line)
    lines[n] = _unanswer(lines[n])
    if where == "end":
        tail = n + 1
        while b'"child"' in lines[tail]:  # keep a group's child lines with it
            tail += 1
        lines = lines[:tail]
    else:
        lines = lines[:-1]  # (the text's final newline)
    path = folder / "runs" / RUN / LOG_NAME
    text = b"".join(line + b"\n" for line in lines)
    path.write_bytes(text)
    log = await FileStore(folder).read_log(RUN)
    assert log is not None
    index = next(i for i, r in enumerate(log.records)
                 if isinstance(r, tuple) and type(r[0]).__name__ == effect and r[1] is None)

    pipeline = Pipeline()
    with pytest.raises(LogCorrupted) as caught:
        await interpret(pipeline.nodes(), Num(value=1), store=FileStore(folder),
                        config=config(RUN))
    assert f"record {index} " in str(caught.value) and effect in str(caught.value)
    assert not pipeline.called
    assert path.read_bytes() == text
    with pytest.raises(LogCorrupted):
        await replay(Pipeline().nodes(), log)


async def test_an_unanswered_record_in_a_memory_log_is_log_corrupted_and_kept(
    tmp_path: Path,
) -> None:
    """In a memory store, the same damage raises LogCorrupted before any node runs, and the
    store keeps the log it had (it is not replaced by a new, shorter one)."""
    lines = await _recorded(tmp_path)
    n = next(k for k, line in enumerate(lines) if b'"CallNode","node_id":"total"' in line)
    lines[n] = _unanswer(lines[n])
    text = "".join(line.decode() + "\n" for line in lines[: n + 1]
                   if not line.startswith(b'{"ckpt"'))
    damaged = EffectLog.from_jsonl(text)
    before = damaged.to_jsonl()
    store = AsyncInMemoryStore()
    store.attach_log(RUN, damaged)
    pipeline = Pipeline()
    with pytest.raises(LogCorrupted):
        await interpret(pipeline.nodes(), Num(value=1), store=store, config=config(RUN))
    assert not pipeline.called
    assert store.get_log(RUN) is damaged and damaged.to_jsonl() == before
