"""Command line: ``python -m stroma demo | runs | show | replay | send-input | ui``.

STORE is a FileStore folder, a Redis URL (``redis://host:6379/0``, ``rediss://...``; add
``?key_prefix=NAME`` for a store made with another ``key_prefix``) or a PostgreSQL DSN
(``postgresql://user@host/db`` or ``postgres://...``; add ``?table_prefix=NAME`` and
``&schema=NAME`` for a store made with other ones)::

    python -m stroma runs STORE [--status S] [--json]       the runs, their status and totals
    python -m stroma show STORE RUN_ID [--json] [--svg F]   a run's attempts, fan-out children too
    python -m stroma replay STORE RUN_ID --plan mod:attr    OK, or the first divergence (exit 1)
    python -m stroma send-input STORE RUN_ID NAME JSON      answer a WAITING run's await_input
    python -m stroma ui STORE [--port N] [--plan mod:attr]  a local, read-only web UI

A WAITING run (stopped at an ``await_input`` step) shows in ``runs`` with what it waits
for; ``send-input`` checks the payload (JSON text, ``@file`` or ``-`` for stdin) against
the wait's schema and keeps it in the store (a bad one is refused, naming the fields, and
nothing is written); running the plan again with the run id goes on from the wait.

``--plan`` names a plan as ``package.module:attribute`` (importable from here) or as
``path/to/file.py:attribute``.

Every error is one line on stderr, ``stroma: error: ...`` naming the problem and the fix,
with exit status 2 (a replay that diverges prints ``DIVERGED: ...`` and exits 1).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import errno
import importlib
import inspect
import json
import os
import re
import shlex
import sys
import unicodedata
from collections.abc import AsyncIterator, Sequence
from typing import Any, NoReturn
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
import attrs

from stroma.demo import run_demo
from stroma.errors import LogCorrupted, NondeterminismError, StromaError
from stroma.inputs import InputRefused, pending_wait, send_input
from stroma.log import EffectLog
from stroma.runner import replay
from stroma.timeline import (
    DAMAGED,
    NO_LOG,
    RUNNING_OR_CRASHED,
    RunSummary,
    Timeline,
    Wait,
    damaged_summary,
    json_safe,
    no_log_summary,
    summary,
    timeline,
)
from stroma.trace import RunStatus

__all__ = (
    "DEFAULT_UI_PORT",
    "EXIT_PIPE_CLOSED",
    "CliError",
    "damaged_hint",
    "describe_store",
    "format_runs",
    "format_timeline",
    "load_plan",
    "main",
    "open_store",
    "printable",
    "read_payload",
    "read_run",
    "replay_check",
    "run_summaries",
    "send_input_command",
    "send_input_line",
    "store_expression",
)

DEFAULT_UI_PORT = 8765


class CliError(Exception):
    """A one-line error for the user; exit status 2."""


def _one_line(text: str) -> str:
    return re.sub(r"\s*\n\s*", " ", str(text)).strip()


# ------------------------------------------------------------------------- stores

_STORE_FORMS = ("a FileStore folder, a Redis URL (redis://host:6379/0) or a PostgreSQL DSN "
                "(postgresql://user@host:5432/db)")


def _split_options(spec: str, names: tuple[str, ...]) -> tuple[str, dict[str, str]]:
    """A URL without the stroma options in its query string, and those options."""
    parts = urlsplit(spec)
    kept: list[tuple[str, str]] = []
    options: dict[str, str] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in names:
            options[key] = value
        else:
            kept.append((key, value))
    return urlunsplit(parts._replace(query=urlencode(kept))), options


# The query parameters asyncpg reads from a DSN itself (asyncpg.connect_utils); it sends
# any other one to the server as a setting (application_name, search_path, ...).
_ASYNCPG_PARAMETERS = (
    "host", "port", "dbname", "database", "user", "password", "passfile", "sslmode",
    "sslcert", "sslkey", "sslrootcert", "sslnegotiation", "sslcrl", "sslpassword",
    "ssl_min_protocol_version", "ssl_max_protocol_version", "target_session_attrs",
    "krbsrvname", "gsslib", "service",
)


def _redis_parameters() -> tuple[tuple[str, ...], frozenset[str]]:
    """The query parameters redis-py's ``from_url`` documents (its parsers), and every one
    it takes (those, and the keyword arguments of its connection classes)."""
    from redis.asyncio import connection as c

    listed = tuple(sorted(c.URL_QUERY_ARGUMENT_PARSERS))
    taken = set(listed)
    for cls in (c.AbstractConnection, c.Connection, c.SSLConnection,
                c.UnixDomainSocketConnection):
        taken.update(p for p in inspect.signature(cls.__init__).parameters
                     if p not in ("self", "kwargs"))
    return listed, frozenset(taken)


def _check_parameters(spec: str, ours: tuple[str, ...], listed: tuple[str, ...],
                      taken: frozenset[str], driver: str, *, only_close: bool = False
                      ) -> None:
    """A CliError for a query parameter of the store URL that neither stroma (``ours``)
    nor the driver takes, naming the close one and the accepted ones. ``only_close``:
    only one close to an accepted name (the driver takes others, as server settings)."""
    known = [*ours, *listed, *sorted(taken - set(listed))]
    for name, _ in parse_qsl(urlsplit(spec).query, keep_blank_values=True):
        if name in ours or name in taken:
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.75 if only_close else 0.6)
        if only_close and not close:
            continue
        hint = f"did you mean {close[0]}? " if close else ""
        raise CliError(
            f"unknown parameter {name!r} in the store URL {describe_store(spec)}; {hint}the "
            f"parameters it takes are stroma's {' and '.join(ours)}, and {driver}'s "
            f"{', '.join(listed)}")


def describe_store(spec: str) -> str:
    """The store spec as it may be shown (a password is replaced by ***)."""
    parts = urlsplit(spec)
    if parts.scheme and parts.password is not None:
        host = parts.netloc.rsplit("@", 1)[1]
        return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))
    return spec


def _make_store(spec: str) -> Any:
    try:
        scheme = urlsplit(spec).scheme.lower() if "://" in spec else ""
    except ValueError as e:
        raise CliError(f"cannot read the store URL {spec.split('@')[-1]!r}: {e}; STORE is "
                       f"{_STORE_FORMS}") from None
    try:
        if scheme in ("redis", "rediss", "unix"):
            from interpreters.stores.redis import RedisStore

            listed, taken = _redis_parameters()
            _check_parameters(spec, ("key_prefix",), listed, taken, "redis")
            url, options = _split_options(spec, ("key_prefix",))
            return RedisStore(url, key_prefix=options.get("key_prefix") or "stroma")
        if scheme in ("postgresql", "postgres"):
            from interpreters.stores.postgres import PostgresStore

            _check_parameters(spec, ("table_prefix", "schema"), _ASYNCPG_PARAMETERS,
                              frozenset(_ASYNCPG_PARAMETERS), "asyncpg", only_close=True)
            dsn, options = _split_options(spec, ("table_prefix", "schema"))
            return PostgresStore(dsn, table_prefix=options.get("table_prefix") or "stroma",
                                 schema=options.get("schema") or "public")
    except ImportError as e:
        raise CliError(f"cannot open {describe_store(spec)}: {_one_line(str(e))}") from None
    except ValueError as e:
        raise CliError(f"cannot open {describe_store(spec)}: {_one_line(str(e))}") from None
    if scheme:
        raise CliError(
            f"unknown store {describe_store(spec)!r}: the scheme {scheme!r} is not one stroma "
            f"reads; STORE is {_STORE_FORMS}"
        )
    from interpreters.stores.file import FileStore

    if not os.path.exists(spec):
        raise CliError(
            f"no FileStore at {spec!r}: the folder does not exist; STORE is {_STORE_FORMS}"
        )
    if not os.path.isdir(spec):
        raise CliError(f"no FileStore at {spec!r}: it is a file, not a folder; STORE is "
                       f"{_STORE_FORMS}")
    return FileStore(spec)


async def _check_tables(store: Any, spec: str) -> None:
    """A PostgresStore makes its tables on first use; reading a store must not, so a DSN
    whose tables are not there is an error saying which prefix and schema were looked for."""
    import asyncpg

    try:
        conn = await asyncpg.connect(store.dsn, timeout=10)
    except asyncpg.InvalidCatalogNameError as e:  # the server answered: no such database
        said = re.search(r'database "(.*)" does not exist', str(e))
        name = said.group(1) if said else urlsplit(store.dsn).path.lstrip("/")
        raise CliError(
            f"cannot read {describe_store(spec)}: the server answers but has no database "
            f"{name!r}; name the database the runs are stored in, or create it with: "
            f"createdb {_quote(name)}") from None
    except asyncpg.InvalidAuthorizationSpecificationError as e:  # (InvalidPasswordError too)
        user = urlsplit(store.dsn).username or "the default user"
        raise CliError(
            f"cannot read {describe_store(spec)}: the server answers, and refuses the user "
            f"{user!r} ({_one_line(str(e))}); check the user and password in the URL "
            "(postgresql://USER:PASSWORD@host:5432/db), or the server's pg_hba.conf"
        ) from None
    except asyncpg.ClientConfigurationError as e:  # asyncpg cannot read the DSN itself
        raise CliError(
            f"cannot read {describe_store(spec)}: {_one_line(str(e)).rstrip('.')}; fix the "
            "URL (postgresql://user@host:5432/db?PARAMETER=VALUE)") from None
    except asyncpg.UndefinedObjectError as e:  # a DSN parameter sent as a server setting
        said = re.search(r'unrecognized configuration parameter "(.*)"', str(e))
        if said is None:
            raise CliError(f"cannot read {describe_store(spec)}: {_one_line(str(e))}") from None
        raise CliError(
            f"unknown parameter {said.group(1)!r} in the store URL {describe_store(spec)}: "
            "neither stroma, asyncpg nor PostgreSQL (as a server setting) knows it; the "
            "parameters it takes are stroma's table_prefix and schema, asyncpg's "
            f"{', '.join(_ASYNCPG_PARAMETERS)}, and PostgreSQL's settings "
            "(application_name, ...)") from None
    except Exception as e:
        raise CliError(
            f"cannot read {describe_store(spec)}: "
            f"{': '.join(filter(None, (type(e).__name__, _one_line(str(e)))))}. "
            "Is the PostgreSQL server running and reachable?") from None
    try:
        found = [await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", table)
                 for table in store.tables[:2]]
    finally:
        await conn.close()
    if not all(found):
        raise CliError(
            f"no stroma tables {store.tables[0]} and {store.tables[1]} in "
            f"{describe_store(spec)}: no run was ever stored there; pass the store's "
            "?table_prefix=NAME (default stroma) and &schema=NAME (default public)")


@contextlib.asynccontextmanager
async def open_store(spec: str) -> AsyncIterator[Any]:
    """The store a STORE argument names (a FileStore folder, ``redis://...`` or
    ``postgresql://...``), closed again on exit; a bad spec is a CliError saying what
    STORE may be. The store is only read (a PostgreSQL store's tables must exist)."""
    store = _make_store(spec)
    try:
        if type(store).__name__ == "PostgresStore":
            await _check_tables(store, spec)
        yield store
    finally:
        close = getattr(store, "close", None)
        if close is not None:
            with anyio.CancelScope(shield=True):
                with contextlib.suppress(Exception):
                    await close()


async def read_run(store: Any, spec: str, run_id: str) -> EffectLog:
    """The run's effect log, or a CliError naming the runs there are."""
    log: EffectLog | None = await store.read_log(run_id)
    if log is None:
        known = await _run_ids(store)
        if run_id in known:  # the run is there, with no log to show (`runs`: "no log")
            raise CliError(
                f"run {run_id!r} in {describe_store(spec)} has no log: it never recorded "
                "a step (it stopped before its first, or its log was emptied), so there is "
                "nothing to show; running it again with its run id starts it")
        shown = describe_store(spec)
        close = _close_run_ids(run_id, known)
        if close:
            raise CliError(f"no run {run_id!r} in {shown}: did you mean "
                           f"{' or '.join(map(repr, close))}? (python -m stroma runs {shown} "
                           "lists its runs)")
        hint = (f" (runs there: {', '.join(known[:5])}{', ...' if len(known) > 5 else ''})"
                if known else f" (the store has no runs{_no_runs_hint(store, spec)})")
        raise CliError(f"no run {run_id!r} in {shown}{hint}: pass one of its run ids "
                       f"(python -m stroma runs {shown} lists them)")
    return log


def _close_run_ids(typed: str, known: Sequence[str], n: int = 5) -> list[str]:
    """The run ids ``typed`` was likely meant to be, closest first: those it is the start
    of (``waiting`` for ``waiting-1``), the same id but for case, then the near misses
    (difflib), at most ``n``."""
    folded = typed.casefold()
    found = [k for k in known if k.casefold() == folded]
    found += sorted((k for k in known if k.casefold().startswith(folded) and k not in found),
                    key=lambda k: (len(k), k))
    by_fold = {k.casefold(): k for k in reversed(known)}
    for near in difflib.get_close_matches(folded, list(by_fold), n=n, cutoff=0.6):
        if by_fold[near] not in found:
            found.append(by_fold[near])
    return found[:n]


def _no_runs_hint(store: Any, spec: str) -> str:
    """Why a store may show no runs although it has some: a Redis store under another key
    prefix (a PostgreSQL one under another table prefix is an error of its own)."""
    prefix = getattr(store, "key_prefix", None)
    if type(store).__name__ != "RedisStore" or not isinstance(prefix, str):
        return ""
    _, options = _split_options(spec, ("key_prefix",))
    looked = (f"key prefix {prefix!r}" if options.get("key_prefix")
              else f"the default key prefix {prefix!r}")
    return (f" under {looked}; if the store was made with another key_prefix, name it: "
            "?key_prefix=NAME")


async def _run_ids(store: Any) -> list[str]:
    """The store's run ids (``list_runs`` gives RunInfo values or ids, by store)."""
    run_ids = getattr(store, "run_ids", None)
    items = await (run_ids() if callable(run_ids) else store.list_runs())
    return [item if isinstance(item, str) else item.run_id for item in items]


async def run_summaries(store: Any) -> list[RunSummary]:
    """Every run in the store, with its status and totals, newest first."""
    found: list[RunSummary] = []
    for run_id in await _run_ids(store):
        try:
            log = await store.read_log(run_id)
            if log is None:
                found.append(no_log_summary(run_id))
                continue
            line = summary(timeline(log))
            if line.status == RUNNING_OR_CRASHED:
                line = attrs.evolve(line, held_by=await _lease_holder(store, run_id))
            found.append(line)
        except LogCorrupted as e:
            found.append(damaged_summary(run_id, _one_line(str(e))))
    found.sort(key=lambda s: s.run_id)
    found.sort(key=lambda s: s.started or "", reverse=True)
    return found


async def _lease_holder(store: Any, run_id: str) -> str | None:
    """Who runs ``run_id`` now, if the store leases runs (None: nobody, or it cannot say)."""
    ask = getattr(store, "lease_holder", None)
    if not callable(ask):
        return None
    try:
        holder = ask(run_id)
        if inspect.isawaitable(holder):
            holder = await holder
    except Exception:  # the column is a hint: a store that cannot say leaves it blank
        return None
    return holder if isinstance(holder, str) else None


# Characters a run's text may hold that must not reach a terminal as they are: controls
# (an error message with colour codes, a newline in a run id that would print a row of
# its own, a tab), format characters (the bidi overrides U+202A-U+202E and isolates
# U+2066-U+2069 that reorder what follows, zero-width ones), line and paragraph
# separators, and lone surrogates. Each is shown as an escape (\n, \t, \x1b, \u202e).
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _unsafe(c: str) -> bool:
    return unicodedata.category(c) in _UNSAFE_CATEGORIES


def _escape(c: str) -> str:
    code = ord(c)
    return _NAMED_ESCAPES.get(c) or (f"\\x{code:02x}" if code < 0x100 else
                                     f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")


def printable(text: str) -> str:
    """``text`` for a terminal, on one line: every control, format (bidi, zero-width),
    line-separator and surrogate character as an escape (``\\n``, ``\\x1b``,
    ``\\u202e``); a text that holds none comes back as it is."""
    if text.isprintable():
        return text
    return "".join(_escape(c) if _unsafe(c) else c for c in text)


def _display_width(text: str) -> int:
    """The columns ``text`` takes on a terminal: an East Asian wide or full-width
    character two, a combining mark none, any other one (``text`` already printable)."""
    return sum(0 if unicodedata.combining(c) or unicodedata.category(c) in ("Mn", "Me")
               else 2 if unicodedata.east_asian_width(c) in ("W", "F") else 1 for c in text)


def _clip(text: str, width: int) -> str:
    """``text`` cut to ``width`` columns, ending in ``...`` when it was cut."""
    if _display_width(text) <= width:
        return text
    kept, used = [], 0
    for c in text:
        used += _display_width(c)
        if used > width - 3:
            break
        kept.append(c)
    return "".join(kept) + "..."


def damaged_hint(e: LogCorrupted) -> str:
    """The one-line message for a damaged log: what is wrong, and what to do."""
    return (f"{_one_line(str(e))}; the run's log is damaged: restore it from a copy, or "
            "delete the run and start it again")


# --------------------------------------------------------------------------- plans


def load_plan(ref: str) -> Any:
    """The plan ``module:attribute`` (or ``path/to/file.py:attribute``) names (a Plan, a
    list of nodes, or a function of no arguments returning one), compiled; a CliError
    saying what is wrong otherwise."""
    from stroma.plan import NODE_ATTR, compile_plan

    if ":" not in ref or not all(ref.rsplit(":", 1)):
        raise CliError(f"--plan {ref!r}: expected 'package.module:attribute' or "
                       "'path/to/file.py:attribute', e.g. --plan myapp.pipeline:plan")
    module_name, attr = ref.rsplit(":", 1)
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would: modules beside you import
    try:
        obj: Any = (_import_file(ref, module_name) if module_name.endswith(".py")
                    else importlib.import_module(module_name))
    except CliError:
        raise
    except ImportError as e:
        raise CliError(f"--plan {ref!r} does not import: {_one_line(str(e))}; run from the "
                       "folder the module is in, or add it to PYTHONPATH") from None
    except SystemExit as e:
        raise CliError(f"--plan {ref!r}: importing {module_name!r} called {_exit_call(e)}; "
                       "a plan's module must not exit when imported: put its script part "
                       "under if __name__ == '__main__':") from None
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            raise
        raise CliError(f"--plan {ref!r}: importing {module_name!r} raised "
                       f"{type(e).__name__}: {_one_line(str(e))}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise CliError(f"--plan {ref!r}: {module_name!r} has no attribute {attr!r}; "
                           "name the plan (or node list) defined there") from None
    called = False
    if (inspect.isfunction(obj) or inspect.ismethod(obj)) and not hasattr(obj, NODE_ATTR):
        called = True
        try:
            obj = obj()  # a factory returning the plan
        except SystemExit as e:
            raise CliError(f"--plan {ref!r}: calling the factory called {_exit_call(e)}; a "
                           "plan factory must return the plan, not exit") from None
        except Exception as e:
            raise CliError(f"--plan {ref!r}: calling the factory raised {type(e).__name__}: "
                           f"{_one_line(str(e))}") from None
    try:
        return compile_plan(obj)
    except Exception as e:
        raise CliError(_not_a_plan(ref, obj, called, e)) from None


_PLAN_FORMS = "a Plan, a list of nodes, or a function of no arguments returning one"


def _not_a_plan(ref: str, obj: Any, called: bool, e: Exception) -> str:
    """Why what ``--plan`` names (or its factory returned: ``called``) is not a plan."""
    from stroma.plan import Plan

    gives = f"{ref!r} returns" if called else f"{ref!r} is"
    if isinstance(obj, list):  # a node list with a bad step: the plan's own error
        return f"--plan {gives} a list that is not a plan: {_one_line(str(e))}"
    if isinstance(obj, tuple):
        kinds = ", ".join(type(x).__name__ for x in obj[:4]) + (", ..." if len(obj) > 4 else "")
        if any(isinstance(x, Plan | list) for x in obj):  # (runner, pipeline), say
            fix = ("one of its items is the plan: name a function returning that item alone "
                   "(e.g. def plan(): runner, nodes = build(); return runner.compile(nodes))")
        else:
            fix = f"as a list of nodes its items must be nodes ({_one_line(str(e))})"
        return (f"--plan {gives} a tuple ({kinds}), not a plan: --plan needs {_PLAN_FORMS}; "
                f"{fix}")
    return (f"--plan {gives} a {type(obj).__name__}, not a plan: --plan needs {_PLAN_FORMS} "
            f"({_one_line(str(e))})")


def _exit_call(e: SystemExit) -> str:
    """The call that raised ``e``: ``sys.exit(3)``, ``sys.exit()``."""
    return "sys.exit()" if e.code is None else f"sys.exit({e.code!r})"


def _import_file(ref: str, path: str) -> Any:
    """A plan's file imported as the module its name makes (``agent.py``: ``agent``),
    with its folder on the path for the modules beside it, as ``python path`` runs it."""
    import importlib.util

    file = os.path.abspath(path)
    if not os.path.isfile(file):
        raise CliError(f"--plan {ref!r}: there is no file {path!r} (from {os.getcwd()})")
    name = os.path.splitext(os.path.basename(file))[0]
    loaded = sys.modules.get(name)
    if loaded is not None:
        if os.path.abspath(getattr(loaded, "__file__", None) or "") == file:
            return loaded
        raise CliError(f"--plan {ref!r}: a module named {name!r} is imported already (from "
                       f"{getattr(loaded, '__file__', None) or 'built in'}); rename the file, "
                       "or name it as package.module:attribute")
    folder = os.path.dirname(file)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise CliError(f"--plan {ref!r}: {path!r} is not a Python file that imports")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


async def replay_check(plan: Any, log: EffectLog) -> tuple[bool, str]:
    """Replay ``log`` against ``plan``: (True, "OK: ...") or (False, why not)."""
    try:
        result = await replay(plan, log)
    except NondeterminismError as e:
        return False, f"DIVERGED: {_one_line(str(e))}"
    except StromaError as e:
        return False, _one_line(str(e))
    except Exception as e:  # the plan's own code, or a log this stroma cannot replay
        return False, f"replay failed: {type(e).__name__}: {_one_line(str(e))}"
    return True, (f"OK: {len(log)} records replayed; status {result.status}, "
                  f"{len(result.trace)} trace events, {result.total_tokens} tokens")


# ----------------------------------------------------------------------- commands


def _waits_for(waits: Sequence[Wait]) -> str:
    """What a run waits for, short: ``approval@agent#3 (digest 7f70d632)``."""
    return ", ".join(f"{w.key} (digest {w.short_digest})" for w in waits)


def _holder_shown(holder: str | None) -> str:
    """The ``running in`` cell: the worker holding the run's lease, and whether it is a
    process of this host that exited (killed: it holds the lease until the lease expires,
    and nothing runs the run)."""
    if holder is None:
        return ""
    from interpreters.stores._lease import _exited

    return f"{holder} (exited: resume the run once its lease expires)" if _exited(holder) \
        else holder


def format_runs(runs: Sequence[RunSummary]) -> str:
    """A fixed-width table of runs (with a ``waiting for`` column when a run waits)."""
    header: tuple[str, ...] = ("run id", "status", "started", "duration_ms", "attempts",
                               "failed", "tokens", "cost_usd")
    waiting = any(s.waiting_for for s in runs)
    held = any(s.held_by for s in runs)
    if waiting:
        header = (*header, "waiting for")
    if held:
        header = (*header, "running in")
    rows = [header]
    for s in runs:
        row: tuple[str, ...] = (
            s.run_id, s.status, s.started or "",
            "" if s.duration_ms is None else str(s.duration_ms), str(s.attempts),
            str(s.failures), str(s.tokens), f"{s.cost_usd:.6f}")
        if waiting:
            row = (*row, _waits_for(s.waiting_for))
        if held:
            row = (*row, _holder_shown(s.held_by))
        rows.append(row)
    return _table(rows, right={3, 4, 5, 6, 7}) + "".join(
        f"\n  {printable(s.run_id)}: {printable(s.problem)}" for s in runs if s.problem)


def _table(rows: Sequence[Sequence[str]], right: set[int]) -> str:
    """Fixed-width columns of the cells shown printable, measured as shown: after their
    escapes, a wide (CJK) character as the two columns it takes."""
    shown = [[printable(c) for c in r] for r in rows]
    widths = [max(_display_width(r[i]) for r in shown) for i in range(len(rows[0]))]

    def line(row: Sequence[str]) -> str:
        cells = []
        for i, (c, w) in enumerate(zip(row, widths, strict=True)):
            pad = " " * (w - _display_width(c))
            cells.append(pad + c if i in right else c + pad)
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(shown[0]), rule, *(line(r) for r in shown[1:])])


_MESSAGE_WIDTH = 60


_CHOICES = ("route", "until", "wait", "input")


def format_timeline(tl: Timeline, spec: str | None = None) -> str:
    """A run's facts, then one line per attempt: the run's steps (a row per loop iteration,
    ``think @agent#3``) and, indented beneath their group, the fan-out children. A loop's
    ``until`` answers, route choices and waits are listed in order before the table; a
    WAITING run ends with what it waits for and the ``send-input`` command (for the store
    ``spec``) that answers it."""
    lines = [f"run {tl.run_id}: {tl.status}",
             f"started {tl.started}; {tl.duration_ms} ms wall clock, {tl.latency_ms} ms in "
             f"nodes; {tl.attempts} attempt(s), {tl.failures} failed; {tl.tokens} tokens, "
             f"${tl.cost_usd:.6f}"]
    if tl.stop_reason:
        lines.append(f"reason: {tl.stop_reason}")
    for m in tl.marks:
        if m.kind in _CHOICES:
            lines.append(f"{m.kind + ':':7} {m.label}")
        elif m.kind != "branch":
            lines.append(f"{m.kind} {m.label}")
    header = ("step", "attempt", "group", "outcome", "at_ms", "duration_ms", "backoff_ms",
              "tokens", "cost_usd", "model", "message")
    rows: list[tuple[str, ...]] = [header]
    for r in tl.rows:
        backoff = {(g.group_attempt, g.after_attempt): g.duration_ms for g in r.gaps}
        for b in r.bars:
            message = (b.message or "").replace("\n", " ")
            if b.hook_errors:
                message = (message + "; " if message else "") + "; ".join(b.hook_errors)
            message = _clip(printable(message), _MESSAGE_WIDTH)
            gap = backoff.get((b.group_attempt, b.attempt))
            rows.append((
                "  " * r.depth + r.label, str(b.attempt),
                "" if b.group_attempt in (None, b.attempt) else str(b.group_attempt), b.outcome,
                f"{b.offset_ms:.0f}", str(b.duration_ms), "" if gap is None else f"{gap:.0f}",
                str(b.usage.tokens) if b.usage.tokens else "",
                f"{b.usage.cost_usd:.6f}" if b.usage.cost_usd else "", b.usage.model or "",
                message,
            ))
    table = _table(rows, right={1, 2, 4, 5, 6, 7, 8})  # printable, cell by cell
    head, lines = lines, []
    if tl.waits:
        lines.append("")
        for w in tl.waits:
            at = f" @{w.where}" if w.where else ""
            lines.append(f"WAITING for {w.key} ({w.schema}) at {w.step_id}{at}, digest "
                         f"{w.digest}")
        w = tl.waits[0]
        lines.append(f"send it: {send_input_line(describe_store(spec), tl.run_id, w)}"
                     if spec is not None else "send it with stroma.send_input(...)")
    elif tl.status == RUNNING_OR_CRASHED:
        lines.append("")
        lines.append("not finished: a worker runs it now, or it crashed (runs names the worker "
                     "holding it); a crashed run resumes when its plan runs again with this run "
                     "id on this store: interpret(plan, store=..., "
                     f"config=RunConfig(run_id={tl.run_id!r}))")
    return "\n".join([*map(printable, head), "", table, *map(printable, lines)])


def send_input_line(store: str, run_id: str, wait: Wait) -> str:
    """The shell command that answers ``wait`` (``'JSON'`` is the payload's place), every
    argument one shell word (``_quote``): pasted, a run id or store path holding spaces,
    quotes, ``$(...)`` or control characters is one argument, never shell code."""
    return (f"python -m stroma send-input {_quote(store)} {_quote(run_id)} "
            f"{_quote(wait.key)} 'JSON' --digest {_quote(wait.digest)}")


def _quote(text: str) -> str:
    """``text`` as one shell word; a text holding characters that must not reach the
    terminal is quoted ``$'...'`` (bash, zsh) with them as escapes, so that the command
    pasted back gives the same text."""
    if printable(text) == text:
        return shlex.quote(text)
    return "$'" + "".join(_escape(c) if _unsafe(c) else "\\" + c if c in "\\'" else c
                          for c in text) + "'"


async def _runs(spec: str, statuses: list[str], as_json: bool) -> None:
    async with open_store(spec) as store:
        runs = await run_summaries(store)
    if statuses:
        known = [*(s.value for s in RunStatus), RUNNING_OR_CRASHED, NO_LOG, DAMAGED]
        for status in statuses:
            if status.lower() not in {k.lower() for k in known}:
                close = difflib.get_close_matches(status.upper(), known, n=1)
                hint = f"did you mean {close[0]}? " if close else ""
                raise CliError(f"--status {status}: no run has such a status; {hint}the "
                               f"statuses are {', '.join(known)}")
        wanted = {s.lower() for s in statuses}
        runs = [s for s in runs if s.status.lower() in wanted]
    if as_json:
        print(json.dumps([s.to_json() for s in runs], indent=2))
    elif not runs:
        print(f"no runs in {describe_store(spec)}" + (" with that status" if statuses else
                                                       _no_runs_hint(store, spec)))
    else:
        print(format_runs(runs))


async def _show(spec: str, run_id: str, as_json: bool, svg: str | None) -> None:
    async with open_store(spec) as store:
        try:
            log = await read_run(store, spec, run_id)
            tl = timeline(log)
        except LogCorrupted as e:
            raise CliError(damaged_hint(e)) from None
    if svg == "-" and as_json:
        raise CliError("--json and --svg - would both write to standard output: pass one, "
                       "or write the picture to a file (--svg run.svg)")
    if svg is not None:
        from stroma.svg import timeline_svg

        picture = timeline_svg(tl)
        if svg == "-":
            sys.stdout.write(picture)
            return
        try:
            with open(svg, "w", encoding="utf-8") as f:
                f.write(picture)
        except OSError as e:
            raise CliError(f"--svg {svg!r}: cannot write the file ({e.strerror or e}); "
                           "pass a path in a folder you can write") from None
        if not as_json:
            bars = sum(len(r.bars) for r in tl.rows)
            print(f"wrote {svg}: {len(tl.rows)} rows, {bars} attempt bars ({tl.status})")
    if as_json:
        print(json.dumps(json_safe(tl.to_json()), indent=2, allow_nan=False, default=str))
    elif svg is None:
        print(format_timeline(tl, spec))


async def _replay(spec: str, run_id: str, plan_ref: str) -> int:
    plan = load_plan(plan_ref)
    async with open_store(spec) as store:
        try:
            log = await read_run(store, spec, run_id)
        except LogCorrupted as e:
            raise CliError(damaged_hint(e)) from None
    ok, text = await replay_check(plan, log)
    if ok or text.startswith("DIVERGED"):
        print(text)
        return 0 if ok else 1
    raise CliError(f"cannot replay run {run_id!r}: {text}")


def read_payload(text: str) -> Any:
    """The JSON value a ``send-input`` argument gives: JSON text, ``@FILE`` (the file's
    text) or ``-`` (standard input); a CliError naming where the JSON is wrong."""
    where = "the JSON argument"
    if text == "-":
        where, text = "standard input", sys.stdin.read()
    elif text.startswith("@"):
        path = text[1:]
        where = f"the file {path!r}"
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise CliError(f"send-input: cannot read {where} ({e.strerror or e}); pass @FILE "
                           "naming a JSON file, '-' for standard input, or the JSON itself"
                           ) from None
        except UnicodeDecodeError as e:
            raise CliError(f"send-input: {where} is not UTF-8 text ({e.reason}); save it "
                           "as UTF-8 JSON") from None
    try:
        return json.loads(text)
    except ValueError as e:
        shown = text.strip()
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise CliError(f"send-input: {where} is not JSON ({e}): got {shown!r}; pass a JSON "
                       "value, e.g. '{\"approved\": true}' (quoted for your shell), @FILE or -"
                       ) from None


def store_expression(spec: str) -> str:
    """Python that opens the store a STORE argument names (a password shown as ***)."""
    shown = describe_store(spec)
    scheme = urlsplit(spec).scheme.lower() if "://" in spec else ""
    if scheme in ("redis", "rediss", "unix"):
        url, options = _split_options(shown, ("key_prefix",))
        prefix = options.get("key_prefix")
        return f"RedisStore({url!r}" + (f", key_prefix={prefix!r})" if prefix else ")")
    if scheme in ("postgresql", "postgres"):
        dsn, options = _split_options(shown, ("table_prefix", "schema"))
        extra = "".join(f", {k}={v!r}" for k, v in options.items() if v)
        return f"PostgresStore({dsn!r}{extra})"
    return f"FileStore({spec!r})"


async def send_input_command(spec: str, run_id: str, name: str, payload: Any,
                             digest: str | None, replace: bool = False) -> str:
    """Send ``payload`` to the run's wait ``name`` (checked, then kept in the store);
    returns what to print: what was sent, and how to resume the run."""
    async with open_store(spec) as store:
        log = await read_run(store, spec, run_id)
        try:
            key = await send_input(store, run_id, name, payload, digest=digest,
                                   replace=replace)
        except InputRefused as e:
            raise CliError(str(e)) from None
    wait = next((w for w in pending_wait(log) if w.key == key), None)
    what = f" ({wait.schema.rsplit(':', 1)[-1]})" if wait is not None else ""
    sent = json.dumps(payload, ensure_ascii=False, separators=(", ", ": "))
    return (f"sent {key}{what} to run {run_id!r} in {describe_store(spec)}: {sent}\n"
            f"the run still shows WAITING until it runs again; resume it by running its plan "
            f"with the same run id on this store (no initial state needed):\n"
            f"  await interpret(plan, store={store_expression(spec)}, "
            f"config=RunConfig(run_id={run_id!r}))")


async def _send_input(spec: str, run_id: str, name: str, text: str,
                      digest: str | None, replace: bool) -> None:
    payload = read_payload(text)
    said = await send_input_command(spec, run_id, name, payload, digest, replace)
    print("\n".join(map(printable, said.splitlines())))


async def _ui(spec: str, port: int, plan_ref: str | None) -> None:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        missing = getattr(e, "name", None) or "starlette or uvicorn"
        raise CliError(f"the web UI needs the 'ui' extra ({missing} is not installed): "
                       "pip install 'stroma[ui]'") from None
    from interpreters.ui.app import serve

    plan = load_plan(plan_ref) if plan_ref else None
    async with open_store(spec) as store:
        await _run_ids(store)  # a store that cannot be read fails now, not on a page
        try:
            await serve(store, describe_store(spec), port=port, plan=plan, plan_ref=plan_ref)
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
            raise CliError(f"--port {port}: port {port} on 127.0.0.1 is in use (another "
                           "program, or another stroma ui, listens there); pass another "
                           "--port N, or --port 0 for a free one") from None


# ---------------------------------------------------------------------------- main


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (``stroma: error: ...``, exit 2)."""

    def error(self, message: str) -> NoReturn:
        print(f"stroma: error: {printable(_one_line(message))} (see {self.prog} --help)",
              file=sys.stderr)
        raise SystemExit(2)

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        """argparse's, but an argument the subcommand does not take is its error (pointing
        at its --help), with the option it likely meant (``--jsn``: ``--json``)."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            command = str(getattr(parsed, "command", None))
            sub = next((a.choices.get(command) for a in self._actions
                        if isinstance(a, argparse._SubParsersAction)), None)
            target = sub if isinstance(sub, argparse.ArgumentParser) else self
            options = [o for a in target._actions for o in a.option_strings]
            meant = [close[0] for x in extras if x.startswith("-")
                     for close in [difflib.get_close_matches(x.split("=")[0], options, n=1)]
                     if close]
            hint = f"; did you mean {' '.join(meant)}?" if meant else ""
            target.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
        return parsed


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m stroma", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("demo", help="run a small real pipeline and print its result and trace")
    store_help = ("a FileStore folder, redis://host:port/db or postgresql://user@host/db")
    p = sub.add_parser("runs", help="list the runs in a store, with status and totals")
    p.add_argument("store", metavar="STORE", help=store_help)
    p.add_argument("--status", action="append", default=[], metavar="S",
                   help="only runs with this status (COMPLETED, FAILED, PARTIAL, RESUMED, "
                   "WAITING, running/crashed, damaged, ...); repeat for several")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list of runs (run_id, status, started, duration_ms, "
                   "tokens, cost_usd, attempts, failures, stop_reason, problem, waiting_for)")
    p = sub.add_parser("show", help="print a stored run's attempts, fan-out children too")
    p.add_argument("store", metavar="STORE", help=store_help)
    p.add_argument("run_id", metavar="RUN_ID")
    p.add_argument("--json", action="store_true",
                   help="print the run's timeline as JSON (see stroma.timeline)")
    p.add_argument("--svg", metavar="FILE",
                   help="write the run's timeline as a standalone SVG picture ('-': stdout)")
    p = sub.add_parser("replay", help="replay a stored run against a plan")
    p.add_argument("store", metavar="STORE", help=store_help)
    p.add_argument("run_id", metavar="RUN_ID")
    p.add_argument("--plan", required=True, metavar="MODULE:ATTR",
                   help="module:attribute (or path/to/file.py:attribute) of the plan (or "
                   "node list, or a function giving one)")
    p = sub.add_parser(
        "send-input", help="send a WAITING run the input its await_input step waits for",
        description="Check JSON against the wait's schema and keep it in the store; run the "
        "plan again with the same run id to go on from the wait. A payload that does not "
        "fit is refused (exit 2), naming the fields, and nothing is written.")
    p.add_argument("store", metavar="STORE", help=store_help)
    p.add_argument("run_id", metavar="RUN_ID")
    p.add_argument("name", metavar="NAME",
                   help="the input's name (approval) or key (approval@agent#3), as `runs` "
                   "shows it")
    p.add_argument("payload", metavar="JSON",
                   help="the input: JSON text, @FILE for a file's, or - for standard input")
    p.add_argument("--digest", metavar="D",
                   help="refuse the input unless the run still asks about this state (the "
                   "digest `runs` and `show` print)")
    p.add_argument("--replace", action="store_true",
                   help="take the place of an input sent earlier that the run has not "
                   "taken yet (else it is refused)")
    p = sub.add_parser("ui", help="serve a local, read-only web UI of a store's runs")
    p.add_argument("store", metavar="STORE", help=store_help)
    p.add_argument("--port", type=int, default=DEFAULT_UI_PORT,
                   help=f"port on 127.0.0.1 (default {DEFAULT_UI_PORT}; 0 picks a free one)")
    p.add_argument("--plan", metavar="MODULE:ATTR",
                   help="the plan the runs were recorded with, to check that they replay")
    return parser


# The exit status of a command whose reader stopped reading (``| head -1``): 128 + SIGPIPE,
# what the shell reports for ``cat`` or ``grep`` killed by the signal.
EXIT_PIPE_CLOSED = 141


def _stdout_closed() -> int:
    """The reader of standard output went away: no message (as ``cat`` gives none), and
    standard output pointed at /dev/null so Python's flush at exit does not fail again."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return EXIT_PIPE_CLOSED


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit:  # --help (or an argument error): the help text may meet a closed pipe
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            return _stdout_closed()
        raise
    try:
        code = _command(args)
        sys.stdout.flush()  # a reader that went away is seen here, not at exit
        return code
    except BrokenPipeError:  # `... | head -1`: the reader has what it wanted
        return _stdout_closed()
    except KeyboardInterrupt:
        return 130
    except CliError as e:
        print(f"stroma: error: {printable(_one_line(str(e)))}", file=sys.stderr)
        return 2
    except LogCorrupted as e:
        print(f"stroma: error: {printable(damaged_hint(e))}", file=sys.stderr)
        return 2
    except StromaError as e:
        print(f"stroma: error: {printable(_one_line(str(e)))}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"stroma: error: {printable(_one_line(str(e)))}", file=sys.stderr)
        return 2
    except Exception as e:  # never a traceback: say what happened and where to report it
        print(f"stroma: error: unexpected {type(e).__name__}: {printable(_one_line(str(e)))} "
              "(this is a bug in stroma: please report it with the command you ran)",
              file=sys.stderr)
        return 2


def _command(args: argparse.Namespace) -> int:
    if args.command == "demo":
        run_demo()
        return 0
    if args.command == "runs":
        anyio.run(_runs, args.store, args.status, args.json)
        return 0
    if args.command == "show":
        anyio.run(_show, args.store, args.run_id, args.json, args.svg)
        return 0
    if args.command == "send-input":
        anyio.run(_send_input, args.store, args.run_id, args.name, args.payload, args.digest,
                  args.replace)
        return 0
    if args.command == "ui":
        if not 0 <= args.port <= 65535:
            raise CliError(f"--port {args.port}: expected 0..65535 (0 picks a free port)")
        anyio.run(_ui, args.store, args.port, args.plan)
        return 0
    return int(anyio.run(_replay, args.store, args.run_id, args.plan))
