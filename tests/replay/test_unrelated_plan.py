"""Replaying or resuming a log against an unrelated plan (issue 9, item 14).

A plan that is not the one that recorded a log (another pipeline: other node ids, other
schemas, an initial state that does not even fit its input) raises NondeterminismError
naming the log's plan fingerprint and the new plan's, before anything is validated or
run: no pydantic ValidationError escapes, and no node of the new plan is called.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from interpreters.stores.file import LOG_NAME, FileStore
from stroma import (
    EffectLog,
    FailureClass,
    FailurePolicy,
    NodeContract,
    NondeterminismError,
    RunStatus,
    map_each,
    parallel,
    replay,
    seq,
    stroma_node,
)
from stroma.checkpoint import InMemoryStore
from stroma.plan import Plan
from stroma.runner import RunConfig, interpret

pytestmark = pytest.mark.anyio

FAST = {c: FailurePolicy(max_retries=2, backoff_seconds=0) for c in FailureClass}


class Num(BaseModel):
    value: int


class Text(BaseModel):
    text: str
    lang: str


class Words(BaseModel):
    words: list[str]


class Word(BaseModel):
    item: str


class Count(BaseModel):
    n: int


class Left(BaseModel):
    left: int


class Right(BaseModel):
    right: int


def node(node_id: str, inp: type[BaseModel], out: type[BaseModel], body: Any,
         calls: Counter[str]) -> Any:
    async def fn(state: Any) -> Any:
        calls[node_id] += 1
        return body(state)

    fn.__name__ = node_id
    return stroma_node(node_id, NodeContract(node_id=node_id, input_schema=inp,
                                             output_schema=out))(fn)


def recorded_plan(calls: Counter[str]) -> Plan:
    """The plan that records the logs: a flaky node, then a parallel group."""
    tries = Counter[str]()

    def flaky(s: Num) -> dict[str, int]:
        tries["flaky"] += 1
        if tries["flaky"] == 1:
            raise TimeoutError("slow upstream")
        return {"value": s.value + 1}

    return seq(
        node("flaky", Num, Num, flaky, calls),
        parallel(node("left", Num, Left, lambda s: {"left": s.value}, calls),
                 node("right", Num, Right, lambda s: {"right": -s.value}, calls)),
    )


def unrelated_plans(calls: Counter[str]) -> dict[str, Plan]:
    """Plans that did not record the log: their first input does not fit its initial
    state (Text needs text and lang), their node ids and shapes are other ones."""
    return {
        "other pipeline": seq(
            node("split", Text, Words, lambda t: {"words": t.text.split()}, calls),
            map_each(node("count", Word, Count, lambda w: {"n": len(w.item)}, calls),
                     over="words", into="counts", input=Words),
        ),
        "same ids, other contracts": seq(
            node("flaky", Text, Text, lambda t: t, calls),
            parallel(node("left", Text, Words, lambda t: {"words": []}, calls),
                     node("right", Text, Count, lambda t: {"n": 0}, calls)),
        ),
        "one node": seq(node("only", Num, Count, lambda s: {"n": s.value}, calls)),
    }


def check_error(error: NondeterminismError, log: EffectLog, plan: Plan) -> None:
    message = str(error)
    assert log.header.plan[:16] in message, message
    assert plan.fingerprint[:16] in message, message
    assert log.header.plan != plan.fingerprint
    for cause in (error.__cause__, error.__context__):
        assert not isinstance(cause, ValidationError)


@pytest.mark.parametrize("which", ["other pipeline", "same ids, other contracts", "one node"])
async def test_replaying_against_an_unrelated_plan_names_both_fingerprints(
    anyio_backend: str, which: str
) -> None:
    """replay(plan, log) and replay(plan, text) with an unrelated plan raise
    NondeterminismError naming both fingerprints; no ValidationError, no node called."""
    recorded = await interpret(recorded_plan(Counter()), Num(value=1),
                               config=RunConfig(policy_map=FAST))
    assert recorded.status is RunStatus.COMPLETED
    calls: Counter[str] = Counter()
    plan = unrelated_plans(calls)[which]

    for log in (recorded.log, recorded.log.to_jsonl()):
        with pytest.raises(NondeterminismError) as caught:
            await replay(plan, log)
        check_error(caught.value, recorded.log, plan)
    assert calls == {}


@pytest.mark.parametrize("store_kind", ["memory", "file"])
@pytest.mark.parametrize("which", ["other pipeline", "same ids, other contracts"])
async def test_resuming_a_finished_run_with_an_unrelated_plan_raises_first(
    anyio_backend: str, store_kind: str, which: str, tmp_path: Path
) -> None:
    """interpret with the run id of a finished run and an unrelated plan raises the same
    NondeterminismError before anything runs, and leaves the stored log as it was."""
    store: Any = InMemoryStore() if store_kind == "memory" else FileStore(tmp_path)
    config = RunConfig(run_id="finished", policy_map=FAST)
    recorded = await interpret(recorded_plan(Counter()), Num(value=1), store=store,
                               config=config)
    calls: Counter[str] = Counter()
    plan = unrelated_plans(calls)[which]

    with pytest.raises(NondeterminismError) as caught:
        await interpret(plan, Text(text="a b", lang="en"), store=store, config=config)

    check_error(caught.value, recorded.log, plan)
    assert calls == {}
    if isinstance(store, FileStore):
        stored = await store.read_log("finished")
        assert stored is not None and stored.to_jsonl() == recorded.log.to_jsonl()


@pytest.mark.parametrize("which", ["other pipeline", "same ids, other contracts", "one node"])
async def test_resuming_a_crashed_run_with_an_unrelated_plan_raises_first(
    anyio_backend: str, which: str, tmp_path: Path
) -> None:
    """A crashed run's log (cut after its first commit) resumed with an unrelated plan:
    NondeterminismError naming both fingerprints, no node called, the log unchanged."""
    store = FileStore(tmp_path)
    config = RunConfig(run_id="crashed", policy_map=FAST)
    await interpret(recorded_plan(Counter()), Num(value=1), store=store, config=config)
    path = tmp_path / "runs" / "crashed" / LOG_NAME
    lines = path.read_bytes().split(b"\n")
    n = next(k for k, line in enumerate(lines) if b'"Commit","node_id":"flaky"' in line)
    path.write_bytes(b"".join(line + b"\n" for line in lines[: n + 1]))
    cut = path.read_bytes()
    log = await FileStore(tmp_path).read_log("crashed")
    assert log is not None and log.finish is None
    calls: Counter[str] = Counter()
    plan = unrelated_plans(calls)[which]

    with pytest.raises(NondeterminismError) as caught:
        await interpret(plan, Num(value=1), store=FileStore(tmp_path), config=config)

    check_error(caught.value, log, plan)
    assert calls == {}
    assert path.read_bytes() == cut


def test_the_command_line_replay_with_an_unrelated_plan_is_one_diverged_line(
    tmp_path: Path,
) -> None:
    """`python -m stroma replay STORE RUN --plan <another pipeline>` prints one DIVERGED
    line naming both fingerprints (exit status 1), never a traceback."""
    import anyio

    from tests.cli.test_cli import cli
    from tests.timeline import pipelines as P

    anyio.run(P.retries_run, FileStore(tmp_path))
    out = cli("replay", str(tmp_path), "retries", "--plan",
              "tests.timeline.pipelines:MAP_PLAN")

    assert out.returncode == 1, out.stderr
    assert out.stdout.startswith("DIVERGED: ") and len(out.stdout.strip().splitlines()) == 1
    assert P.RETRIES_PLAN.fingerprint[:16] in out.stdout
    assert P.MAP_PLAN.fingerprint[:16] in out.stdout
    assert "Traceback" not in out.stderr and "ValidationError" not in out.stdout
