"""The web UI in a real browser (headless Chromium): the run list and its status filter,
a run's timeline with the right bars, and an attempt's state shown on click."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

from tests.timeline import pipelines as P
from tests.ui.conftest import snapshot

MAP = "map_each(fetch, over=urls, into=pages)"


def bars(page: Any) -> list[tuple[str, str, str]]:
    """The timeline's bars as (row key, attempt, outcome), in drawing order."""
    return [tuple(x) for x in page.eval_on_selector_all(
        "#timeline svg rect.bar",
        "els => els.map(e => [e.dataset.row, e.dataset.attempt, e.dataset.outcome])")]


def test_run_list_shows_every_run_and_filters_by_status(
    page: Any, ui_url: str, screenshots: Path,
) -> None:
    """The run list has a row per run with its status (running/crashed too); the FAILED
    filter leaves only the failed run."""
    page.goto(ui_url)
    rows = page.eval_on_selector_all(
        "#runs tbody tr", "els => els.map(e => [e.dataset.run, e.dataset.status])")
    assert sorted(map(tuple, rows)) == [
        ("agent", "WAITING"), ("crashed", "running/crashed"), ("map", "COMPLETED"),
        ("parallel", "COMPLETED"), ("retries", "COMPLETED"), ("terminal", "FAILED")]
    page.screenshot(path=str(screenshots / "runs.png"), full_page=True)
    page.click('.filters a[data-status="FAILED"]')
    page.wait_for_url("**/?status=FAILED")
    shown = page.eval_on_selector_all("#runs tbody tr", "els => els.map(e => e.dataset.run)")
    assert shown == ["terminal"]
    assert "Contract violation" in page.inner_text("#runs")


def test_run_with_retries_in_a_fan_out_has_the_right_bars(
    page: Any, ui_url: str, screenshots: Path,
) -> None:
    """Opening the map_each run from the list shows a row per item and one bar per
    attempt (the item that failed twice has three), backoff gaps, and a clean replay."""
    page.goto(ui_url)
    page.click('#runs a[href="/runs/map"]')
    page.wait_for_selector("#timeline svg")
    assert bars(page) == [
        (MAP, "1", "ok"), (f"{MAP}[0]", "1", "ok"),
        (f"{MAP}[1]", "1", "AMBIGUOUS"), (f"{MAP}[1]", "2", "AMBIGUOUS"),
        (f"{MAP}[1]", "3", "ok"), (f"{MAP}[2]", "1", "ok")]
    labels = page.eval_on_selector_all("#timeline svg .row .label",
                                       "els => els.map(e => e.lastChild.textContent)")
    assert labels[1:] == ["fetch [item 0]", "fetch [item 1]", "fetch [item 2]"]
    assert page.locator(f'#timeline svg g.row[data-row="{MAP}[1]"] line.gap').count() == 2
    assert page.inner_text("#replay").startswith("OK: ")
    assert "COMPLETED" in page.inner_text("#facts")
    page.screenshot(path=str(screenshots / "run.png"), full_page=True)


def test_clicking_an_attempt_shows_its_state_and_usage(
    page: Any, ui_url: str, screenshots: Path,
) -> None:
    """Clicking a bar opens the attempt's details: outcome, failure message, input and
    output state, tokens, model and cost."""
    page.goto(ui_url + "runs/map")
    assert page.is_hidden("#detail")
    failed = page.locator(f'#timeline svg rect.bar[data-row="{MAP}[1]"][data-attempt="1"]')
    failed.click()
    assert page.is_visible("#detail")
    assert page.inner_text("#detail-title") == "fetch [item 1] · attempt 1"
    assert page.inner_text("#detail-outcome") == "AMBIGUOUS"
    assert page.inner_text("#detail-message") == "503 from b"
    assert json.loads(page.inner_text("#detail-input")) == {"item": "b"}
    assert page.inner_text("#detail-output") == "—"
    page.locator(f'#timeline svg rect.bar[data-row="{MAP}[1]"][data-attempt="3"]').click()
    assert page.inner_text("#detail-outcome") == "ok"
    assert json.loads(page.inner_text("#detail-output")) == {"page": "page b"}
    assert page.inner_text("#detail-usage") == "100 in / 20 out"
    assert page.inner_text("#detail-model") == "gpt-4o-mini"
    assert page.inner_text("#detail-cost") == "$0.000027"
    page.screenshot(path=str(screenshots / "run-attempt.png"), full_page=True)


def test_hovering_a_bar_gives_its_summary(page: Any, ui_url: str) -> None:
    """Each bar carries a hover title with its attempt, outcome and message."""
    page.goto(ui_url + "runs/parallel")
    title = page.locator(
        '#timeline svg rect.bar[data-row="parallel(left, right)[1]"][data-attempt="1"] title')
    text = title.text_content()
    assert text.startswith("right: attempt 1") and "connection reset" in text
    outcomes = [b[2] for b in bars(page) if b[0] == "parallel(left, right)[0]"]
    assert outcomes == ["cancelled", "ok"]
    assert page.inner_text("#replay").startswith("DIVERGED")  # recorded by another plan


def test_a_crashed_run_shows_its_finished_children(page: Any, ui_url: str) -> None:
    """A run that crashed inside a fan-out shows the children that had finished under
    its unfinished group, and says replay needs a finished run."""
    page.goto(ui_url + "runs/" + quote("crashed", safe=""))
    outcomes = [b[2] for b in bars(page)]
    assert outcomes == ["unfinished", "ok", "ok", "ok", "ok"]
    assert "has not finished" in page.inner_text("#replay")


def test_browsing_never_writes_to_the_store(page: Any, ui_url: str, ui_store: Path) -> None:
    """Opening every page of the UI leaves every file of the store as it was."""
    before = snapshot(ui_store)
    page.goto(ui_url)
    for run_id in ("map", "parallel", "retries", "terminal", "crashed", "agent"):
        page.goto(ui_url + "runs/" + run_id)
        page.goto(ui_url + "svg/" + run_id)
        page.goto(ui_url + "api/runs/" + run_id)
    page.goto(ui_url + "api/runs")
    assert snapshot(ui_store) == before


AGENT_MAP = f"{P.AGENT_MAP}@agent#2"
AGENT_WAIT = f"{P.AGENT_WAIT}@agent#3"


def test_a_waiting_run_has_a_badge_and_its_own_filter(
    page: Any, ui_url: str, screenshots: Path,
) -> None:
    """The agent run shows WAITING with what it waits for (the input's key and digest);
    the WAITING filter leaves only it."""
    page.goto(ui_url)
    row = page.locator('#runs tr[data-run="agent"]')
    assert row.locator(".status").inner_text() == "WAITING"
    waits = row.locator(".waits").inner_text()
    assert waits.startswith(f"waits for {P.AGENT_KEY} (Approval) digest ")
    page.click('.filters a[data-status="WAITING"]')
    page.wait_for_url("**/?status=WAITING")
    shown = page.eval_on_selector_all("#runs tbody tr", "els => els.map(e => e.dataset.run)")
    assert shown == ["agent"]
    colour = page.eval_on_selector('#runs tr[data-run="agent"] .status',
                                   "e => getComputedStyle(e).backgroundColor")
    assert colour == "rgb(0, 131, 143)"  # the waiting colour, not the crashed runs' blue
    page.screenshot(path=str(screenshots / "runs-waiting.png"), full_page=True)


def test_a_loop_run_has_rows_per_iteration_and_marks_for_choices(
    page: Any, ui_url: str, ui_store: Path, screenshots: Path,
) -> None:
    """The agent's timeline has a row per step and iteration (the map's items beneath its
    row of iteration 2), a waiting bar on the wait's row, a diamond per route choice on the
    row it chose, dotted lines for the until answers; the choices are listed, and the facts
    say what the run waits for and how to send it."""
    page.goto(ui_url + "runs/agent")
    page.wait_for_selector("#timeline svg")
    assert bars(page) == [
        ("think@agent#1", "1", "ok"), ("work@agent#1", "1", "AMBIGUOUS"),
        ("work@agent#1", "2", "ok"), ("think@agent#2", "1", "ok"), (AGENT_MAP, "1", "ok"),
        (f"{AGENT_MAP}[0]", "1", "ok"), (f"{AGENT_MAP}[1]", "1", "ok"),
        ("think@agent#3", "1", "ok"), (AGENT_WAIT, "1", "waiting")]
    labels = page.eval_on_selector_all("#timeline svg .row .label",
                                       "els => els.map(e => e.lastChild.textContent)")
    assert labels[:3] == ["think @agent#1", "work @agent#1", "think @agent#2"]
    assert labels[4:6] == ["lookup @agent#2 item 0", "lookup @agent#2 item 1"]
    diamonds = page.eval_on_selector_all(
        "#timeline svg polygon.mark-route", "els => els.map(e => e.textContent)")
    assert diamonds == ["route: pick @agent#1: work", "route: pick @agent#2: search",
                        "route: pick @agent#3: ship"]
    assert page.locator("#timeline svg line.mark-until").count() == 2
    assert page.locator("#timeline svg circle.mark-wait").count() == 1
    choices = page.eval_on_selector_all(
        "#choices li", "els => els.map(e => [e.dataset.kind, e.dataset.row])")
    assert [tuple(c) for c in choices] == [
        ("route", "work@agent#1"), ("until", ""), ("route", AGENT_MAP), ("until", ""),
        ("route", AGENT_WAIT), ("wait", AGENT_WAIT)]
    facts = page.inner_text("#facts")
    assert f"{P.AGENT_KEY} (Approval) at {P.AGENT_WAIT} @agent#3" in facts
    assert f"python -m stroma send-input {ui_store} agent '{P.AGENT_KEY}' 'JSON' --digest" in facts
    page.locator(f'#timeline svg rect.bar[data-row="{AGENT_WAIT}"]').click()
    assert page.inner_text("#detail-title") == f"{P.AGENT_WAIT} @agent#3 · attempt 1"
    assert page.inner_text("#detail-outcome") == "waiting"
    assert P.AGENT_KEY in page.inner_text("#detail-message")
    assert json.loads(page.inner_text("#detail-input"))["hits"] == [{"hit": "X"},
                                                                    {"hit": "Y"}]
    page.screenshot(path=str(screenshots / "run-agent.png"), full_page=True)


def test_pages_load_without_console_errors(page: Any, ui_url: str) -> None:
    """The runs page and run pages load with no console message, no page error and no
    failed request: no 404 for /favicon.ico (the pages declare their icon inline)."""
    messages: list[str] = []
    page.on("console", lambda m: messages.append(f"{m.type}: {m.text} ({page.url})"))
    page.on("pageerror", lambda e: messages.append(f"pageerror: {e} ({page.url})"))
    page.on("response", lambda r: r.status >= 400 and messages.append(f"{r.status} {r.url}"))
    page.on("requestfailed", lambda r: messages.append(f"failed: {r.url}"))
    for path in ("", "runs/map", "runs/agent"):
        # networkidle: the favicon is fetched after the load event, by then it is done
        page.goto(ui_url + path, wait_until="networkidle")
        assert page.locator("main h1").count() == 1
    assert messages == []
