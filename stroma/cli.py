"""Command line: ``python -m stroma demo | runs PATH | show PATH RUN_ID | replay PATH RUN_ID
--plan module:attr``. Errors are one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import anyio
from pydantic import BaseModel

from stroma.cost import ExecutionBudget
from stroma.errors import NondeterminismError, StromaError
from stroma.failures import FailureClass, FailurePolicy, NodeContext
from stroma.runner import RunConfig, StromaRunner, interpret, parallel, replay
from stroma.trace import format_trace_table

__all__ = (
    "Analysis",
    "Answer",
    "CliError",
    "Document",
    "Keywords",
    "Question",
    "Summary",
    "build",
    "demo_main",
    "main",
    "network_errors",
    "run_demo",
)


class CliError(Exception):
    """A one-line error for the user; exit status 2."""


def _store(path: str) -> Any:
    from interpreters.stores.file import FileStore

    if not os.path.isdir(path):
        raise CliError(f"no FileStore at {path!r}: the folder does not exist")
    return FileStore(path)


def _load_plan(ref: str) -> Any:
    if ":" not in ref:
        raise CliError(f"--plan {ref!r}: expected 'package.module:attribute'")
    module_name, attr = ref.split(":", 1)
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise CliError(f"--plan {ref!r} does not import: {e}") from None
    if callable(obj) and not hasattr(obj, "__stroma_node__") and not hasattr(obj, "steps"):
        obj = obj()  # a factory returning the plan
    return obj


async def _read(path: str, run_id: str) -> Any:
    store = _store(path)
    log = await store.read_log(run_id)
    if log is None:
        known = await store.run_ids()
        hint = f" (runs there: {', '.join(known[:5])}{', ...' if len(known) > 5 else ''})" \
            if known else " (the store has no runs)"
        raise CliError(f"no run {run_id!r} in {path}{hint}")
    return log


async def _runs(path: str) -> None:
    store = _store(path)
    infos = await store.list_runs()
    print(f"{'run id':<38} {'status':<10} {'nodes':>5}  {'started':<32} {'duration_ms':>11}")
    for info in infos:
        duration = "" if info.duration_ms is None else str(info.duration_ms)
        print(f"{info.run_id:<38} {info.status!s:<10} {info.nodes_done:>5}  "
              f"{info.started!s:<32} {duration:>11}")


async def _show(path: str, run_id: str) -> None:
    log = await _read(path, run_id)
    finish = log.finish
    print(f"run {run_id}: {finish.status if finish else 'unfinished (crashed or running)'}")
    if finish is not None and finish.reason:
        print(f"reason: {finish.reason}")
    print(format_trace_table(log.trace()))


async def _replay(path: str, run_id: str, plan_ref: str) -> int:
    from stroma.runner import replay

    log = await _read(path, run_id)
    plan = _load_plan(plan_ref)
    try:
        result = await replay(plan, log)
    except NondeterminismError as e:
        print(f"DIVERGED: {e}")
        return 1
    print(f"OK: {len(log)} records replayed; status {result.status}, "
          f"{len(result.trace)} trace events, {result.total_tokens} tokens")
    return 0


# ---------------------------------------------------------------------------- the demo
# ``python -m stroma demo``: a small, realistic pipeline run for real. A research
# assistant: fetch a document (a flaky API that fails twice, then succeeds on retry), then
# two analyses in parallel (summary and keywords, each reporting tokens and a model so cost
# is priced), then a final answer. The run's status, final state, tokens, cost and trace
# are printed, and the run is replayed from its effect log.


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
        return {"keywords": sorted({w.strip(".") for w in doc.text.split()[:8]})}, 900, (
            "claude-haiku-4-5"
        )

    @runner.node("answer", input=Analysis, output=Answer)
    async def answer(a: Analysis) -> tuple[dict[str, str], int, int, str]:
        await anyio.sleep(0.01)
        return {"answer": f"{a.summary} [{', '.join(a.keywords[:3])}]"}, 400, 80, "gpt-4o-mini"

    return runner, [fetch, parallel(summarize, keywords), answer]


async def demo_main() -> None:
    from interpreters.stores.file import FileStore

    runner, pipeline = build()
    with tempfile.TemporaryDirectory(prefix="stroma-demo-") as folder:
        store = FileStore(folder)
        settings = {k: getattr(runner.config, k) for k in runner.config.model_fields_set}
        config = RunConfig(**{**settings, "run_id": "demo-run"})
        plan = runner.compile(pipeline)
        result = await interpret(plan, Question(topic="solar sails"), store=store, config=config)
        print(f"status:       {result.status}")
        print(f"final state:  {result.final_state!r}")
        print(f"total tokens: {result.total_tokens}")
        print(f"total cost:   ${result.total_cost_usd:.6f}")
        print()
        print(format_trace_table(result.trace))
        print()
        stored = await store.read_log("demo-run")
        assert stored is not None
        replayed = await replay(plan, stored)
        same = replayed == result and not replayed.trace.diff(result.trace)
        print(f"effect log: {len(stored)} records in {folder}/...; replayed offline without "
              f"calling a node: {'identical result' if same else 'DIFFERENT'}")


def run_demo() -> None:
    anyio.run(demo_main)


# ---------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stroma", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run a small real pipeline and print its result and trace")
    p = sub.add_parser("runs", help="list the runs in a FileStore")
    p.add_argument("path")
    p = sub.add_parser("show", help="print a stored run's trace")
    p.add_argument("path")
    p.add_argument("run_id")
    p = sub.add_parser("replay", help="replay a stored run against a plan")
    p.add_argument("path")
    p.add_argument("run_id")
    p.add_argument("--plan", required=True, help="module:attribute of the plan (or node list)")
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            run_demo()
            return 0
        if args.command == "runs":
            anyio.run(_runs, args.path)
            return 0
        if args.command == "show":
            anyio.run(_show, args.path, args.run_id)
            return 0
        return int(anyio.run(_replay, args.path, args.run_id, args.plan))
    except (CliError, StromaError, OSError) as e:
        print(f"stroma: error: {e}", file=sys.stderr)
        return 2
