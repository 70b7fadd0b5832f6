"""The web UI: a read-only Starlette app over a store, served by uvicorn on 127.0.0.1.

Routes (all GET; nothing here writes to the store)::

    /                      the store's runs (``?status=S``, repeatable, filters them)
    /runs/{run_id}         a run: facts, replay check, timeline, attempts
    /svg/{run_id}          the run's timeline as a standalone SVG file
    /api/runs              the runs as JSON (see ``stroma.timeline.RunSummary.to_json``)
    /api/runs/{run_id}     the run's timeline as JSON (``Timeline.to_json``)
    /favicon.ico           the UI's icon (an SVG; the pages also declare it inline)

Run ids are percent-encoded in the path, so any id works; a path that names no run (an
empty id, a NUL character) is a 404. Errors are pages saying what happened and what to
do, JSON (``{"error": ...}``) under ``/api/``: 404 for no such run, 500 for a damaged log,
503 when the store cannot be read. A store failure is logged as one line on the
terminal (``uvicorn.error``), not as a traceback; only an error the UI does not expect (a
bug) is logged with its traceback. The replay check needs the
plan the run was recorded with: given one (``python -m stroma ui STORE --plan mod:attr``),
each run page replays the run's log against it (calling no node); without one the page
says how to give it.
"""

from __future__ import annotations

import errno
import json
import logging
import socket
from typing import Any
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from interpreters.ui.pages import ICON_SVG, error_page, run_page, runs_page
from stroma.errors import LogCorrupted, StromaError
from stroma.timeline import Timeline, json_safe, timeline

__all__ = ("create_app", "serve")

_log = logging.getLogger("uvicorn.error")  # where uvicorn logs the server's errors


def create_app(store: Any, label: str, *, plan: Any = None, plan_ref: str | None = None,
               ) -> Starlette:
    """The UI's app over ``store`` (already open; shown as ``label``)."""
    from stroma.cli import _run_ids, damaged_hint, replay_check, run_summaries

    async def load(run_id: str) -> Timeline | tuple[int, str, str]:
        """The run's timeline, or (status code, title, message) saying why not."""
        if not run_id or "\0" in run_id:  # no store holds such a run: it is not asked
            what = ("This path names no run (its run id is empty)" if not run_id else
                    f"There is no run {run_id!r} in {label} (a run id has no NUL character)")
            return 404, "No such run", f"{what}: pick one from the list of runs."
        try:
            log = await store.read_log(run_id)
            if log is None:
                if run_id in await _run_ids(store):  # listed as "no log", as `show` says
                    return 404, "The run has no log", (
                        f"The run {run_id!r} in {label} has no log: it never recorded a "
                        "step (it stopped before its first, or its log was emptied), so "
                        "there is nothing to show; running it again with its run id starts "
                        "it.")
                return 404, "No such run", (f"There is no run {run_id!r} in {label}: pick "
                                            "one from the list of runs.")
            return timeline(log)
        except LogCorrupted as e:
            return 500, "Damaged log", damaged_hint(e)

    def problem(why: tuple[int, str, str], request: Request) -> Response:
        """The error page (``why`` is status code, title, message), JSON under /api/."""
        code, title, message = why
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": message}, status_code=code)
        return HTMLResponse(error_page(label, title, message), status_code=code)

    async def runs(request: Request) -> Response:
        selected = [s for s in request.query_params.getlist("status") if s]
        return HTMLResponse(runs_page(label, await run_summaries(store), selected))

    async def run(request: Request) -> Response:
        run_id = request.path_params["run_id"]
        tl = await load(run_id)
        if not isinstance(tl, Timeline):
            return problem(tl, request)
        if plan is None:
            replay = ("none", "To check that this run replays clean, start the UI with the "
                      "plan it was recorded with: python -m stroma ui STORE --plan "
                      "module:attr (or run python -m stroma replay STORE RUN_ID --plan "
                      "module:attr).")
        elif not tl.finished:
            replay = ("none", "The run has not finished (it crashed or is still running): "
                      "replay checks a finished run; resume it with interpret(plan, state, "
                      "store=..., config=RunConfig(run_id=...)).")
        else:
            log = await store.read_log(run_id)
            ok, text = await replay_check(plan, log)
            replay = ("ok" if ok else "bad", f"{text} (against --plan {plan_ref})")
        return HTMLResponse(run_page(label, tl, replay))

    async def svg(request: Request) -> Response:
        from stroma.svg import timeline_svg

        tl = await load(request.path_params["run_id"])
        if not isinstance(tl, Timeline):
            return problem(tl, request)
        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in tl.run_id) + ".svg"
        # A header is Latin-1: an ASCII file name for every client, and the run id's own
        # letters (percent-encoded UTF-8, RFC 5987) for those that read filename*.
        plain = "".join(c if c.isascii() else "_" for c in name)
        return Response(timeline_svg(tl), media_type="image/svg+xml", headers={
            "content-disposition": f"inline; filename=\"{plain}\"; "
                                   f"filename*=UTF-8''{quote(name, safe='')}"})

    async def api_runs(request: Request) -> Response:
        return JSONResponse([s.to_json() for s in await run_summaries(store)])

    async def api_run(request: Request) -> Response:
        tl = await load(request.path_params["run_id"])
        if not isinstance(tl, Timeline):
            return problem(tl, request)
        return Response(json.dumps(json_safe(tl.to_json()), allow_nan=False, default=str),
                        media_type="application/json")

    async def icon(request: Request) -> Response:
        return Response(ICON_SVG, media_type="image/svg+xml",
                        headers={"cache-control": "max-age=86400"})

    async def unreadable(request: Request, exc: Exception) -> Response:
        """A StromaError out of the store: a 503 page, and one line on the terminal
        (handled here, in Starlette's ExceptionMiddleware, it is not raised further)."""
        message = " ".join(str(exc).split())
        _log.error("stroma ui: %s %s: 503, the store could not be read: %s", request.method,
                   request.url.path, message)
        return problem((503, "The store could not be read", (
            f"{message} (once the store can be read again, reload this page; the terminal "
            "running python -m stroma ui logs each such error)")), request)

    async def failed(request: Request, exc: Exception) -> Response:
        """Any other error is a bug: a 500 page saying so (Starlette's
        ServerErrorMiddleware logs its traceback, to report with it)."""
        message = " ".join(str(exc).split())
        return problem((500, "Unexpected error", (
            f"unexpected {type(exc).__name__}: {message} (this is a bug in stroma: please "
            "report it with the traceback the terminal running python -m stroma ui shows)")),
            request)

    return Starlette(
        routes=[
            Route("/", runs, methods=["GET"]),
            Route("/runs/{run_id:path}", run, methods=["GET"]),
            Route("/svg/{run_id:path}", svg, methods=["GET"]),
            Route("/api/runs", api_runs, methods=["GET"]),
            Route("/api/runs/{run_id:path}", api_run, methods=["GET"]),
            Route("/favicon.ico", icon, methods=["GET"]),
        ],
        exception_handlers={StromaError: unreadable, Exception: failed},
    )


def _listen(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise OSError(e.errno, f"port {port} on 127.0.0.1 is in use: pass --port 0 for a "
                          "free one, or another port") from None
        raise OSError(e.errno, f"cannot listen on 127.0.0.1:{port}: {e.strerror}") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


async def serve(store: Any, label: str, *, port: int = 8765, plan: Any = None,
                plan_ref: str | None = None) -> None:
    """Serve the UI on 127.0.0.1:``port`` (0: a free port) until interrupted; prints the
    URL once it listens."""
    import uvicorn

    sock = _listen(port)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
    app = create_app(store, label, plan=plan, plan_ref=plan_ref)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    print(f"stroma ui: {label} at {url} (read-only; Ctrl-C stops it)", flush=True)
    try:
        await server.serve(sockets=[sock])
    finally:
        sock.close()
