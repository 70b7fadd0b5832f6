"""``python -m stroma demo`` (what ``make demo`` runs): a small, realistic pipeline, run for real.

A research assistant: fetch a document (a flaky API that fails twice, then succeeds on
retry), then two analyses in parallel (summary and keywords, each reporting tokens and a
model, so cost is priced), then a final answer. The run is kept in a FileStore folder
(``runs/`` in the current directory), under a fresh run id each time, so the demo can run
again and again and every run stays there to look at. It prints the run's status, final
state, tokens, cost and trace, replays the run from its stored effect log, and ends with
the commands that replay the run against its plan (``--plan stroma.demo:plan``) and show
it again.
"""

from __future__ import annotations

import shlex
from datetime import UTC, datetime
from pathlib import Path

import anyio
from pydantic import BaseModel

# The demo is a user of stroma: it goes through the facade, as a user's script does.
from stroma import FileStore, Plan, RunConfig, StromaRunner, interpret, parallel, replay
from stroma.cost import ExecutionBudget
from stroma.failures import FailureClass, FailurePolicy, NodeContext
from stroma.trace import format_trace_table

__all__ = (
    "REPLAY_PLAN",
    "RUNS_FOLDER",
    "Analysis",
    "Answer",
    "Document",
    "Keywords",
    "Question",
    "Summary",
    "build",
    "demo_main",
    "network_errors",
    "new_run_id",
    "plan",
    "run_demo",
)

RUNS_FOLDER = "runs"  # relative to the current directory: the checkout, under make demo
REPLAY_PLAN = "stroma.demo:plan"  # the --plan that replays a demo run (see plan below)


class Question(BaseModel):
    topic: str


class Document(BaseModel):
    topic: str
    text: str


class Summary(BaseModel):
    summary: str


class Keywords(BaseModel):
    keywords: list[str]


class Analysis(BaseModel):
    summary: str
    keywords: list[str]


class Answer(BaseModel):
    answer: str


def network_errors(exc: Exception, ctx: NodeContext) -> FailureClass | None:
    """A classifier: connection trouble is worth retrying."""
    if isinstance(exc, ConnectionError) or "503" in str(exc):
        return FailureClass.RECOVERABLE
    return None


def build() -> tuple[StromaRunner, list[object]]:
    """The demo's runner (classifier, budget, retry policies) and its pipeline."""
    runner = StromaRunner.quick(
        classifiers=[network_errors],
        budget=ExecutionBudget(max_tokens_total=20_000, max_cost_usd=0.50),
        policy_map={
            FailureClass.RECOVERABLE: FailurePolicy(max_retries=3, backoff_seconds=0.05),
            FailureClass.AMBIGUOUS: FailurePolicy(max_retries=1, backoff_seconds=0.0),
        },
    )
    attempts = {"fetch": 0}

    @runner.node("fetch", input=Question, output=Document)
    async def fetch(q: Question) -> dict[str, str]:
        attempts["fetch"] += 1
        await anyio.sleep(0.01)  # the network
        if attempts["fetch"] < 3:
            raise ConnectionError("503 service_unavailable from the document API")
        return {"topic": q.topic, "text": f"A long article about {q.topic}. " * 20}

    @runner.node("summarize", input=Document, output=Summary)
    async def summarize(doc: Document) -> tuple[dict[str, str], int, int, str]:
        await anyio.sleep(0.02)  # the model
        return {"summary": doc.text[:60] + "..."}, 1_200, 150, "gpt-4o"

    @runner.node("keywords", input=Document, output=Keywords)
    async def keywords(doc: Document) -> tuple[dict[str, list[str]], int, str]:
        await anyio.sleep(0.015)
        words = sorted({w.strip(".") for w in doc.text.split()[:8]})
        return {"keywords": words}, 900, "claude-haiku-4-5"

    @runner.node("answer", input=Analysis, output=Answer)
    async def answer(a: Analysis) -> tuple[dict[str, str], int, int, str]:
        await anyio.sleep(0.01)
        return {"answer": f"{a.summary} [{', '.join(a.keywords[:3])}]"}, 400, 80, "gpt-4o-mini"

    return runner, [fetch, parallel(summarize, keywords), answer]


def plan() -> Plan:
    """The demo's pipeline, compiled: what replays a demo run from the command line,
    ``python -m stroma replay runs RUN_ID --plan stroma.demo:plan``."""
    runner, pipeline = build()
    return runner.compile(pipeline)


async def new_run_id(store: FileStore, now: datetime | None = None) -> str:
    """``demo-<UTC date>-<time>``, with ``-2``, ``-3``... when the store already has it."""
    stamp = (now or datetime.now(UTC)).strftime("demo-%Y%m%d-%H%M%S")
    taken = set(await store.run_ids())
    run_id, n = stamp, 1
    while run_id in taken:
        n += 1
        run_id = f"{stamp}-{n}"
    return run_id


async def demo_main(folder: str = RUNS_FOLDER) -> str:
    """Run the demo into the FileStore at ``folder`` (made if missing); returns the run id."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    store = FileStore(folder)
    run_id = await new_run_id(store)
    runner, pipeline = build()
    settings = {k: getattr(runner.config, k) for k in runner.config.model_fields_set}
    config = RunConfig(**{**settings, "run_id": run_id})
    plan = runner.compile(pipeline)
    result = await interpret(plan, Question(topic="solar sails"), store=store, config=config)
    print(f"status:       {result.status}")
    print(f"final state:  {result.final_state!r}")
    print(f"total tokens: {result.total_tokens}")
    print(f"total cost:   ${result.total_cost_usd:.6f}")
    print()
    print(format_trace_table(result.trace))
    print()
    stored = await store.read_log(run_id)
    if stored is None:
        raise RuntimeError(f"the demo run {run_id!r} left no effect log in {folder}")
    replayed = await replay(plan, stored)
    same = replayed == result and not replayed.trace.diff(result.trace)
    print(f"effect log: {len(stored)} records, kept in the FileStore at {folder}/ as run "
          f"{run_id}; replayed offline without calling a node: "
          f"{'identical result' if same else 'DIFFERENT'}")
    print("replay it against its plan with:")
    print(f"python -m stroma replay {shlex.quote(folder)} {shlex.quote(run_id)} "
          f"--plan {REPLAY_PLAN}")
    print("see the run again with:")
    print(f"python -m stroma show {shlex.quote(folder)} {shlex.quote(run_id)}")
    return run_id


def run_demo() -> None:
    """``python -m stroma demo``."""
    anyio.run(demo_main)
