"""The web UI served for real (``python -m stroma ui STORE --port 0``, a subprocess) over a
FileStore of real runs, and headless Chromium driven by Playwright.

Chromium is Debian's ``chromium`` (``.ci/run`` installs it when missing); Playwright is
pointed at it, since ``playwright install`` cannot download browsers here. Without it
the browser tests skip, saying so, unless ``STROMA_REQUIRE_SERVICES=1`` (CI), where they
fail.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import select
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from interpreters.stores.file import FileStore
from tests.timeline import pipelines as P

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "screenshots"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]


@pytest.fixture(scope="session")
def ui_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A FileStore with a map_each whose item retries, a parallel group whose child
    failed (cancelling its sibling), a run with retries, a terminal failure, a run that
    crashed inside a fan-out and an agent (a loop with a route) WAITING for an approval."""
    path = tmp_path_factory.mktemp("uistore")

    async def record() -> None:
        fs = FileStore(path)
        await P.map_run(fs)
        await P.parallel_run(fs)
        await P.retries_run(fs)
        await P.terminal_run(fs)
        await P.crashed_fan_out(fs)
        await P.agent_run(fs)

    run_in_thread(record)
    return path


ODD_WAITING = ("wait $(touch pwned)", "ann's <b>&amp; run")
"""Run ids of WAITING agent runs that shell and HTML would take for code if not quoted."""
NON_LATIN_1 = "résumé-日本"
"""The id of a map run, with letters an HTTP header (Latin-1) cannot hold."""
NO_LOG = ("emptied", "log-removed")
"""Map runs whose log was emptied, or removed: the runs list shows them as "no log"."""


@pytest.fixture(scope="session")
def odd_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A FileStore whose path holds a space and a quote, with runs whose ids are hard to
    show: the agent WAITING under each of ``ODD_WAITING`` and the map run as
    ``NON_LATIN_1`` and under each of ``NO_LOG``, its log emptied or removed."""
    path = tmp_path_factory.mktemp("odd") / "ann's store"

    async def record() -> None:
        fs = FileStore(path)
        for run_id in ODD_WAITING:
            await P.agent_run(fs, run_id)
        await P.map_run(fs, NON_LATIN_1)
        for run_id in NO_LOG:
            await P.map_run(fs, run_id)
        (path / "runs" / "emptied" / "log.jsonl").write_bytes(b"")
        (path / "runs" / "log-removed" / "log.jsonl").unlink()

    run_in_thread(record)
    return path


@pytest.fixture(scope="session")
def odd_url(odd_store: Path) -> Iterator[str]:
    """The URL of `python -m stroma ui` serving ``odd_store``."""
    with serving(str(odd_store)) as url:
        yield url


def run_in_thread(fn: Any, *args: Any, backend: str = "asyncio") -> None:
    """``anyio.run(fn, *args)`` in a thread of its own (Playwright's sync API keeps an event
    loop in the main one), raising what it raised."""
    failures: list[BaseException] = []

    def target() -> None:
        try:
            anyio.run(fn, *args, backend=backend)
        except BaseException as e:
            failures.append(e)

    worker = threading.Thread(target=target)
    worker.start()
    worker.join()
    if failures:
        raise failures[0]


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``folder``: its content hash and modification time."""
    return {
        str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                     p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


@contextlib.contextmanager
def serving(store: str, *args: str, stderr: list[str] | None = None) -> Iterator[str]:
    """`python -m stroma ui STORE --port 0 ARGS` in a subprocess: its URL, until exit
    (then what it wrote on its standard error is appended to ``stderr``, if given)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "stroma", "ui", store, "--port", "0", *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 60
        line = ""
        while not line:
            assert process.poll() is None, f"the UI exited: {process.communicate()[1]}"
            assert time.monotonic() < deadline, "the UI did not print its URL within 60 s"
            ready, _, _ = select.select([process.stdout], [], [], 0.5)
            if ready:
                line = process.stdout.readline()
        assert line.startswith("stroma ui: ") and " at http://127.0.0.1:" in line, line
        yield line.split(" at ", 1)[1].split()[0]
    finally:
        process.terminate()
        try:
            written = process.communicate(timeout=20)[1]
        except subprocess.TimeoutExpired:
            process.kill()
            written = process.communicate()[1]
        if stderr is not None:
            stderr.append(written)


@pytest.fixture(scope="session")
def ui_url(ui_store: Path) -> Iterator[str]:
    """The URL of `python -m stroma ui` serving ``ui_store`` with the map run's plan."""
    with serving(str(ui_store), "--plan", "tests.timeline.pipelines:MAP_PLAN") as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium (Debian's), driven by Playwright, for one test module (Playwright's
    sync API holds an event loop in this thread while it is open)."""
    executable = shutil.which("chromium")
    reason = None
    if executable is None:
        reason = ("chromium is not installed: apt-get update && apt-get install -y chromium "
                  "(.ci/run does this)")
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            reason = "playwright is not installed: pip install -e '.[dev]'"
    if reason is not None:
        if os.environ.get("STROMA_REQUIRE_SERVICES") == "1":
            pytest.fail(f"{reason} (STROMA_REQUIRE_SERVICES=1, so this is a failure)")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh browser page, 1300 px wide."""
    context = browser.new_context(viewport={"width": 1300, "height": 900})
    try:
        yield context.new_page()
    finally:
        context.close()


@pytest.fixture(scope="session")
def screenshots() -> Path:
    """The git-ignored folder the browser tests leave their screenshots in."""
    SCREENSHOTS.mkdir(exist_ok=True)
    return SCREENSHOTS
