"""The web UI in a real browser (headless Chromium): the run list and its status filter,
a run's timeline with the right bars, and an attempt's state shown on click."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

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
        ("crashed", "running/crashed"), ("map", "COMPLETED"), ("parallel", "COMPLETED"),
        ("retries", "COMPLETED"), ("terminal", "FAILED")]
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
    for run_id in ("map", "parallel", "retries", "terminal", "crashed"):
        page.goto(ui_url + "runs/" + run_id)
        page.goto(ui_url + "svg/" + run_id)
        page.goto(ui_url + "api/runs/" + run_id)
    page.goto(ui_url + "api/runs")
    assert snapshot(ui_store) == before
