"""The UI's HTTP surface: pages, the SVG and JSON of a run, clear errors, GET only, and the
same pages over a Redis store."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from html import escape, unescape
from pathlib import Path
from urllib.parse import quote

import anyio
import anyio.to_thread
import httpx
import pytest
from starlette.applications import Starlette

from interpreters.ui.app import create_app
from stroma import FileStore
from stroma.errors import StoreError
from tests.services import REDIS_URL, START_REDIS, drop_redis_prefix, require, unique
from tests.timeline import pipelines as P
from tests.ui.conftest import (
    NO_LOG,
    NON_LATIN_1,
    ODD_WAITING,
    ROOT,
    run_in_thread,
    serving,
)

MAP = "map_each(fetch, over=urls, into=pages)"


def test_runs_and_status_filter_over_http(ui_url: str) -> None:
    """The runs page lists every run; ?status= keeps only those with that status."""
    page = httpx.get(ui_url).text
    for run_id in ("map", "parallel", "retries", "terminal", "crashed"):
        assert f'data-run="{run_id}"' in page
    crashed = httpx.get(ui_url, params={"status": "running/crashed"}).text
    assert 'data-run="crashed"' in crashed and 'data-run="map"' not in crashed


def test_svg_and_json_of_a_run(ui_url: str) -> None:
    """/svg/RUN is the standalone picture; /api/runs/RUN the timeline's JSON."""
    svg = httpx.get(ui_url + "svg/map")
    assert svg.status_code == 200 and svg.headers["content-type"].startswith("image/svg+xml")
    root = ET.fromstring(svg.content)
    assert root.get("data-run") == "map" and root.get("data-status") == "COMPLETED"
    data = httpx.get(ui_url + "api/runs/map").json()
    assert [r["key"] for r in data["rows"]] == [MAP, *(f"{MAP}[{j}]" for j in range(3))]
    runs = httpx.get(ui_url + "api/runs").json()
    assert {r["run_id"]: r["status"] for r in runs}["crashed"] == "running/crashed"


def test_the_svg_of_a_run_whose_id_is_not_latin_1_downloads(odd_url: str) -> None:
    """The SVG of a run whose id an HTTP header cannot hold is served with an ASCII file
    name and the id's own letters as RFC 5987's filename* (was an HTTP 500)."""
    svg = httpx.get(odd_url + "svg/" + quote(NON_LATIN_1, safe=""))
    assert svg.status_code == 200
    assert svg.headers["content-disposition"] == (
        "inline; filename=\"r_sum_-__.svg\"; "
        "filename*=UTF-8''r%C3%A9sum%C3%A9-%E6%97%A5%E6%9C%AC.svg")
    assert ET.fromstring(svg.content).get("data-run") == NON_LATIN_1


def test_unknown_run_is_a_404_page_saying_what_to_do(ui_url: str) -> None:
    """An unknown run id is a 404 page naming it and pointing back at the list."""
    answer = httpx.get(ui_url + "runs/no-such-run")
    assert answer.status_code == 404
    assert "There is no run &#x27;no-such-run&#x27;" in answer.text
    assert httpx.get(ui_url + "api/runs/no-such-run").status_code == 404


def test_the_send_it_command_is_the_one_show_prints_shell_quoted(
    odd_store: Path, odd_url: str, tmp_path: Path,
) -> None:
    """A WAITING run's page shows `show`'s send-input command (every argument shell-quoted),
    HTML-escaped; pasted into a shell it passes the store path and the run id as one
    argument each and runs nothing they hold (`$(touch pwned)` stays text)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for run_id in ODD_WAITING:
        page = httpx.get(odd_url + "runs/" + quote(run_id, safe=""))
        assert page.status_code == 200
        found = re.search(r"<code>(.*?)</code>", page.text)
        assert found is not None, page.text
        shown = subprocess.run([sys.executable, "-m", "stroma", "show", str(odd_store), run_id],
                               cwd=ROOT, env=env, capture_output=True, text=True, check=True)
        command = shown.stdout.rstrip("\n").rsplit("\n", 1)[1].removeprefix("send it: ")
        assert found.group(1) == escape(command)
        digest = httpx.get(odd_url + "api/runs/" + quote(run_id, safe="")).json()[
            "waiting_for"][0]["digest"]
        # `python` as a shell function printing its arguments: the command's words as the
        # shell splits them, without running stroma.
        pasted = subprocess.run(["bash", "-c", 'python() { printf "%s\\0" "$@"; }; ' +
                                 unescape(found.group(1))],
                                cwd=tmp_path, capture_output=True, text=True, check=True)
        assert pasted.stdout.split("\0")[:-1] == [
            "-m", "stroma", "send-input", str(odd_store), run_id, P.AGENT_KEY, "JSON",
            "--digest", digest]
    assert not (tmp_path / "pwned").exists()


def get(app: Starlette, *paths: str) -> list[httpx.Response]:
    """GET each of ``paths`` from ``app`` in this process; an exception the app lets out
    (which uvicorn would log as a traceback) is raised here."""

    async def each() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=True)
        async with httpx.AsyncClient(transport=transport, base_url="http://ui") as client:
            return [await client.get(path) for path in paths]

    return anyio.run(each)


NO_RUN = ("runs/", "svg/", "runs/%00", "svg/%00")
NO_RUN_API = ("api/runs/", "api/runs/%00")


def test_a_path_naming_no_run_is_a_404_without_a_traceback(
    odd_store: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """An empty run id or one with a NUL is a 404 saying no run is named, JSON under
    /api/; nothing is raised out of the app (which uvicorn would log as a traceback) and
    nothing is logged (was a 503 "The store could not be read", in HTML under /api/)."""
    app = create_app(FileStore(odd_store), "the store")
    pages = get(app, *("/" + path for path in NO_RUN))
    for path, answer in zip(NO_RUN, pages, strict=True):
        assert answer.status_code == 404, path
        assert answer.headers["content-type"].startswith("text/html")
        assert "<h1>No such run</h1>" in answer.text
        assert "pick one from the list of runs" in answer.text
    assert "This path names no run (its run id is empty)" in pages[0].text
    assert "There is no run &#x27;\\x00&#x27; in the store (a run id has no NUL" in pages[2].text
    for path, answer in zip(NO_RUN_API, get(app, *("/" + p for p in NO_RUN_API)), strict=True):
        assert answer.status_code == 404, path
        assert "pick one from the list of runs" in answer.json()["error"]
    assert not caplog.records


class Unreachable:
    """A store whose every read fails, as a store whose server is down does."""

    async def read_log(self, run_id: str) -> None:
        raise StoreError("ExampleStore.read_log: cannot reach 127.0.0.1:1 (connection "
                         "refused): is the server up?")

    async def list_runs(self) -> list[str]:
        raise StoreError("ExampleStore.list_runs: cannot reach 127.0.0.1:1 (connection "
                         "refused): is the server up?")


def test_a_store_that_cannot_be_read_is_a_503_and_one_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A store failure is a 503 page (JSON under /api/) with the store's message and
    what to do, and one line in the log per request, not an exception out of the app."""
    app = create_app(Unreachable(), "the store")
    for path, api in (("/", False), ("/runs/r1", False), ("/svg/r1", False),
                      ("/api/runs", True), ("/api/runs/r1", True)):
        caplog.clear()
        [answer] = get(app, path)
        assert answer.status_code == 503, path
        error = answer.json()["error"] if api else answer.text
        assert "cannot reach 127.0.0.1:1 (connection refused): is the server up?" in error
        assert "once the store can be read again, reload this page" in error
        if not api:
            assert "<h1>The store could not be read</h1>" in error
        [record] = caplog.records
        assert record.levelname == "ERROR" and record.exc_info is None
        line = record.getMessage()
        assert line.startswith(f"stroma ui: GET {path}: 503, the store could not be read: ")
        assert "\n" not in line


def test_the_terminal_gets_one_line_per_store_failure_and_no_traceback(
    odd_store: Path, tmp_path: Path,
) -> None:
    """Served for real, paths naming no run are 404s and a run the store refuses to read
    (its folder a planted symlink) a 503: the server's terminal shows one line for the
    503 and no traceback."""
    store = tmp_path / "store"
    shutil.copytree(odd_store, store)
    (tmp_path / "elsewhere").mkdir()
    (store / "runs" / "linked").symlink_to(tmp_path / "elsewhere")
    written: list[str] = []
    with serving(str(store), stderr=written) as url:
        for path in (*NO_RUN, *NO_RUN_API):
            assert httpx.get(url + path).status_code == 404, path
        refused = httpx.get(url + "api/runs/linked")
        assert refused.status_code == 503
        assert "a symlink was planted" in refused.json()["error"]
    [terminal] = written
    assert "Traceback" not in terminal
    lines = [line for line in terminal.splitlines() if line.strip()]
    assert [line.split("stroma ui: ", 1)[1].split(":", 1)[0] for line in lines
            if "stroma ui: " in line] == ["GET /api/runs/linked"]
    assert not [line for line in lines if "Exception" in line or line.startswith(" ")]


def test_a_run_listed_as_no_log_opens_a_page_saying_it_has_no_log(odd_store: Path) -> None:
    """A run the list shows as "no log" (its log emptied or removed) opens a 404 saying the
    run has no log and how to start it, as `show` says, JSON under /api/ (was: "There is
    no run ...", which sent the operator back to the list that has it)."""
    app = create_app(FileStore(odd_store), "the store")
    [listing] = get(app, "/")
    for run_id in NO_LOG:
        link = re.search(f'<tr data-run="{run_id}" data-status="no log"><td class="mono">'
                         '<a href="([^"]+)">', listing.text)
        assert link is not None, listing.text
        page, api = get(app, link.group(1), "/api" + link.group(1))
        assert page.status_code == api.status_code == 404
        assert "<h1>The run has no log</h1>" in page.text
        said = (f"The run {run_id!r} in the store has no log: it never recorded a step (it "
                "stopped before its first, or its log was emptied), so there is nothing to "
                "show; running it again with its run id starts it.")
        assert escape(said) in page.text and api.json() == {"error": said}
        assert "There is no run" not in page.text


def test_the_icon_is_declared_by_each_page_and_served_at_favicon_ico(ui_url: str) -> None:
    """Each page's head declares the UI's SVG icon as a data: URL, and /favicon.ico
    serves the same SVG (was a 404 on every page, a browser console error)."""
    icon = httpx.get(ui_url + "favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"] == "image/svg+xml"
    assert ET.fromstring(icon.content).tag == "{http://www.w3.org/2000/svg}svg"
    link = (f'<link rel="icon" type="image/svg+xml" href="data:image/svg+xml,'
            f'{escape(quote(icon.text))}">')
    for path in ("", "runs/map", "runs/no-such-run"):
        head = httpx.get(ui_url + path).text.split("</head>", 1)[0]
        assert link in head, path


def test_only_get_is_served(ui_url: str) -> None:
    """The UI is read-only: any other method is refused (405)."""
    for method in ("POST", "PUT", "DELETE"):
        assert httpx.request(method, ui_url + "runs/map").status_code == 405
        assert httpx.request(method, ui_url).status_code == 405


@pytest.fixture(scope="module")
def redis_spec() -> Iterator[str]:
    """A Redis URL naming a key prefix that holds a map_each run."""
    from interpreters.stores.redis import RedisStore

    url = require("Redis", REDIS_URL, 6379, START_REDIS)
    prefix = unique("stroma-ui")

    async def record() -> None:
        store = RedisStore(url, key_prefix=prefix)
        try:
            await P.map_run(store)
        finally:
            await store.close()

    run_in_thread(record)
    try:
        yield f"{url}?key_prefix={prefix}"
    finally:
        run_in_thread(drop_redis_prefix, url, prefix)


@pytest.mark.redis
def test_the_ui_over_a_redis_store(redis_spec: str) -> None:
    """`ui redis://...` serves the runs and timelines of a Redis store."""
    with serving(redis_spec) as url:
        assert 'data-run="map"' in httpx.get(url).text
        data = httpx.get(url + "api/runs/map").json()
        assert [[b["outcome"] for b in r["bars"]] for r in data["rows"]] == [
            ["ok"], ["ok"], ["AMBIGUOUS", "AMBIGUOUS", "ok"], ["ok"]]


def test_the_runs_page_names_the_worker_running_an_unfinished_run(
    ui_store: Path, tmp_path: Path,
) -> None:
    """A run that has not ended shows who runs it while a worker holds its lease, and no
    worker once it is released (the worker is gone: the run crashed)."""
    store = tmp_path / "store"
    shutil.copytree(ui_store, store)
    held = threading.Event()
    release = threading.Event()

    async def hold() -> None:
        async with FileStore(store).lease("crashed", "host-a:4242:worker"):
            held.set()
            await anyio.to_thread.run_sync(release.wait)

    worker = threading.Thread(target=run_in_thread, args=(hold,))
    worker.start()
    try:
        assert held.wait(30)
        with serving(str(store)) as url:
            page = httpx.get(url).text
            listed = {r["run_id"]: r for r in httpx.get(url + "api/runs").json()}
            release.set()
            worker.join(30)
            after = {r["run_id"]: r for r in httpx.get(url + "api/runs").json()}
    finally:
        release.set()
        worker.join(30)
    assert "running in host-a:4242:worker" in page
    assert listed["crashed"]["held_by"] == "host-a:4242:worker"
    assert listed["map"]["held_by"] is None  # a finished run is held by nobody
    assert after["crashed"]["held_by"] is None
