"""A zero limit waits for some use before it stops a run (a node reporting no usage
runs, as in 0.3.x); logs written before that read it as spent from the start. Such a log
(``recorded/zero_budget_0.4.0.jsonl``, written by that version: the run stopped before its
first node) still replays and goes on as its run decided: its header says nothing of the
rule, and a new run's header says which rule it ran by."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydantic import BaseModel

from stroma import EffectLog, RunStatus, StromaRunner, replay

RECORDED = Path(__file__).parent / "recorded" / "zero_budget_0.4.0.jsonl"


class In(BaseModel):
    value: int


def plan() -> tuple[StromaRunner, list[Any]]:
    runner = StromaRunner.quick().with_budget(tokens=0)

    @runner.node("free", input=In, output=In)
    async def free(state: In) -> dict[str, int]:
        return {"value": state.value + 1}

    @runner.node("paid", input=In, output=In)
    async def paid(state: In) -> tuple[dict[str, int], int]:
        return {"value": state.value + 1}, 5

    return runner, [free, paid]


@pytest.mark.anyio
async def test_a_zero_budget_log_from_before_replays_as_its_run_decided(
    anyio_backend: str,
) -> None:
    log = EffectLog.from_jsonl(RECORDED.read_text(encoding="utf-8"))
    assert "zero_limit_spent" not in log.header.config
    _, nodes = plan()
    result = await replay(nodes, log)
    assert result.status is RunStatus.PARTIAL
    assert result.final_state == In(value=1)
    assert result.stop_reason == "budget spent (tokens 0 of 0): 'free' was not started"


@pytest.mark.anyio
async def test_a_new_zero_budget_run_runs_what_uses_nothing_and_says_its_rule(
    anyio_backend: str,
) -> None:
    runner, nodes = plan()
    result = await runner.run(nodes, In(value=1))
    assert result.status is RunStatus.PARTIAL
    assert result.final_state == In(value=2)  # (free ran; paid spent the budget)
    header = json.loads(result.log.lines()[0])
    assert header["config"]["zero_limit_spent"] is False
    assert await replay(nodes, result.log) == result


def test_a_header_without_zero_limits_is_as_it_was() -> None:
    """(No zero limit: nothing more in the header, so every other log is unchanged.)"""
    runner = StromaRunner.quick().with_budget(tokens=10)

    @runner.node("free", input=In, output=In)
    async def free(state: In) -> dict[str, int]:
        return {"value": state.value + 1}

    result = anyio.run(lambda: runner.run([free], In(value=1)))
    assert "zero_limit_spent" not in json.loads(result.log.lines()[0])["config"]
