"""What the durable stores share: checks, schema resolution, run summaries, the backend.

``RunInfo`` is the one shape every store's ``list_runs()`` returns (FileStore, RedisStore,
SyncRedisStore, PostgresStore); ``run_info`` builds it from a run's log the same way for all
of them.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pydantic import BaseModel

from stroma.errors import LogCorrupted, StoreError, StromaTypeError
from stroma.schemas import resolve_declared

if TYPE_CHECKING:
    from stroma.log import EffectLog

__all__ = (
    "DAMAGED",
    "NO_LOG",
    "RUNNING_OR_CRASHED",
    "RunInfo",
    "check_input_text",
    "check_lines",
    "check_state",
    "current_async_library",
    "require_asyncio",
    "resolve",
    "run_info",
)

# Status of a run in ``list_runs`` besides the RunStatus values of a finished run.
RUNNING_OR_CRASHED = "running/crashed"
NO_LOG = "no log"
DAMAGED = "damaged"


def check_state(state: object, node_id: object, op: str) -> BaseModel:
    if not isinstance(state, BaseModel):
        raise StromaTypeError(
            f"{op}: the checkpoint state for node {node_id!r} must be a pydantic BaseModel "
            f"instance, got {type(state).__name__}; save the node's output model"
        )
    return state


def check_lines(lines: Sequence[str], op: str, *, nul: bool = False) -> list[str]:
    """The log lines to append: each a str holding one JSON line (and no NUL if ``nul``)."""
    if isinstance(lines, str | bytes):
        raise StromaTypeError(
            f"{op}: lines must be a sequence of str (one JSON line each), got a str")
    out = list(lines)
    for n, line in enumerate(out):
        if not isinstance(line, str):
            raise StromaTypeError(
                f"{op}: line {n} must be a str (one JSON line), got {type(line).__name__}"
            )
        if "\n" in line or "\r" in line or (nul and "\x00" in line):
            what = "a line break or a NUL character" if nul else "a line break"
            raise StoreError(
                f"{op}: line {n} contains {what}; each item must be one JSON line (JSON "
                "escapes these) without its trailing newline"
            )
    return out


def check_input_text(text: object, run_id: object, key: object, op: str) -> str:
    """The text of an input to keep (``put_input``): a str of JSON that encodes as UTF-8
    (a waiting run reads it as JSON, so anything else could never be read)."""
    if not isinstance(text, str):
        raise StromaTypeError(
            f"{op}: the input {key!r} of run {run_id!r} must be given as a str (its JSON "
            f"text), got {type(text).__name__}; pass json.dumps(payload), or use send_input"
        )
    try:
        json.loads(text)
    except (ValueError, RecursionError) as e:
        raise StoreError(
            f"{op}: the input {key!r} of run {run_id!r} is not JSON text ({e}), and a "
            "waiting run reads its input as JSON; pass json.dumps(payload), or use send_input"
        ) from None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise StoreError(
            f"{op}: the input {key!r} of run {run_id!r} has a lone surrogate and does not "
            "encode as UTF-8; pass JSON text (json.dumps escapes such characters)"
        ) from None
    return text


def resolve(ref: object, source: str) -> type[BaseModel]:
    """The declared schema a stored reference names; never imports anything."""
    return resolve_declared(ref, source=source)


# ------------------------------------------------------------------------ the backend


def current_async_library() -> str | None:
    """``"asyncio"``, ``"trio"`` or None: the async library running this code.

    Found without sniffio (not a dependency of stroma): asyncio has a running loop in this
    thread, trio a current task.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        return "asyncio"
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            return None
        return "trio"
    return None


def require_asyncio(what: str, client: str) -> None:
    """A StoreError unless this runs on asyncio (``client`` is the asyncio-only library)."""
    library = current_async_library()
    if library != "asyncio":
        raise StoreError(
            f"{what} needs the asyncio backend: {client} runs on asyncio only, but this "
            f"code runs on {library or 'no async library'}. Run it under asyncio "
            "(anyio.run(main, backend='asyncio')), or use FileStore, which also works on trio."
        )


# ------------------------------------------------------------------------ run summaries


@dataclass(frozen=True, slots=True)
class RunInfo:
    """One run in a store, as ``list_runs`` sums it up (the same shape from every store).

    ``status`` is the finished run's status (``"COMPLETED"``, ``"FAILED"``, ``"PARTIAL"``,
    ``"RESUMED"``), ``"running/crashed"`` for a log without a Finish record, ``"no log"``
    for a run that has checkpoints only, or ``"damaged"`` (``problem`` says what is wrong).
    ``nodes_done`` counts the saved checkpoints; ``started`` is the log header's ISO 8601
    ``started_at``; ``duration_ms`` is the sum of the trace's attempt durations (None
    without a log or attempts). ``total_tokens`` and ``total_cost_usd`` are the finished
    run's totals (None for a run that has not finished); being derived from the Finish
    record, they take no part in comparing two summaries.
    """

    run_id: str
    status: str
    nodes_done: int
    started: str | None
    duration_ms: int | None
    problem: str | None = None
    total_tokens: int | None = field(default=None, compare=False)
    total_cost_usd: float | None = field(default=None, compare=False)


def run_info(
    run_id: str, log: EffectLog | LogCorrupted | None, checkpoints: int, source: str
) -> RunInfo:
    """The summary of a run from what its store read: its log (or the damage found reading
    it, or None without a log) and how many checkpoints it has."""
    if isinstance(log, LogCorrupted):
        return RunInfo(run_id, DAMAGED, 0, None, None, str(log))
    if log is None:
        return RunInfo(run_id, NO_LOG, checkpoints, None, None)
    try:
        finish = log.finish
        status = RUNNING_OR_CRASHED if finish is None else str(finish.status)
        events = list(log.trace())
        duration = sum(int(e.duration_ms) for e in events) if events else None
        tokens = None if finish is None else int(finish.total_tokens)
        cost = None if finish is None else float(finish.total_cost_usd)
        return RunInfo(
            run_id, status, len(log.completed_nodes()), log.header.started_at, duration,
            None, tokens, cost,
        )
    except (TypeError, ValueError, AttributeError, OverflowError) as e:  # wrong field types
        problem = f"{source}: a record has a field of the wrong type ({e})"
        return RunInfo(run_id, DAMAGED, 0, log.header.started_at, None, problem)
