"""Command line: ``python -m stroma demo | runs PATH | show PATH RUN_ID | replay PATH RUN_ID
--plan module:attr``. Errors are one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any

import anyio

from stroma.demo import run_demo
from stroma.errors import NondeterminismError, StromaError
from stroma.trace import format_trace_table

__all__ = ("CliError", "main")


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
