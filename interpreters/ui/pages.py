"""The web UI's pages as HTML text, made from timelines and run summaries (no I/O).

Server-rendered, with the stylesheet and the small script beside this module (``ui.css``,
``ui.js``, package data) inlined, so a page needs nothing else: no JavaScript build, no
external resource. The run page embeds the same SVG drawing as ``show --svg``
(``stroma.svg``) and the timeline's JSON, which the script reads to show an attempt's
states and usage when its bar is clicked.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from html import escape
from importlib import resources
from urllib.parse import quote, urlencode

from stroma.svg import timeline_svg
from stroma.timeline import RUNNING_OR_CRASHED, RunSummary, Timeline, Wait, json_safe

__all__ = ("ICON_SVG", "STATUS_ORDER", "error_page", "run_page", "run_url", "runs_page",
           "svg_url")

STATUS_ORDER = ("COMPLETED", "RESUMED", "WAITING", RUNNING_OR_CRASHED, "PARTIAL", "FAILED",
                "damaged", "no log")
"""The order of the status filters on the runs page (others follow, sorted)."""


ICON_SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
    '<rect width="16" height="16" rx="3" fill="#1f2328"/>'
    '<rect x="2" y="3" width="6" height="3" fill="#2e7d32"/>'
    '<rect x="5" y="7" width="4" height="3" fill="#ef6c00"/>'
    '<rect x="10" y="7" width="4" height="3" fill="#2e7d32"/>'
    '<rect x="3" y="11" width="8" height="3" fill="#00838f"/></svg>'
)
"""The UI's icon: three rows of attempt bars. Each page declares it inline (a data: URL),
so a browser asks for no /favicon.ico (whose 404 was a console error on every page); the
app serves it there too, for its JSON and SVG files."""

_ICON_LINK = f'<link rel="icon" type="image/svg+xml" href="data:image/svg+xml,{quote(ICON_SVG)}">'


def _static(name: str) -> str:
    return resources.files("interpreters.ui").joinpath(name).read_text("utf-8")


_CSS = _static("ui.css")
_JS = _static("ui.js")


def run_url(run_id: str) -> str:
    """The run page's path (any run id: it is percent-encoded)."""
    return "/runs/" + quote(run_id, safe="")


def svg_url(run_id: str) -> str:
    return "/svg/" + quote(run_id, safe="")


def _status_class(status: str) -> str:
    return "s-" + status.replace(" ", "-").replace("/", "-")


def _badge(status: str) -> str:
    return f'<span class="status {_status_class(status)}">{escape(status)}</span>'


def _duration(ms: float | None) -> str:
    if ms is None:
        return ""
    if ms >= 60_000:
        return f"{ms / 60_000:.1f} min"
    if ms >= 1000:
        return f"{ms / 1000:.2f} s"
    return f"{ms:.0f} ms"


def _started(iso: str | None) -> str:
    if not iso:
        return ""
    return iso.replace("T", " ")[:19] + (" UTC" if iso.endswith("+00:00") else "")


def _page(title: str, store: str, body: str, *, script: str = "") -> str:
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"{_ICON_LINK}<title>{escape(title)} · stroma</title><style>{_CSS}</style></head><body>"
        f'<header class="top"><a class="brand" href="/">stroma</a>'
        f'<span class="store" title="the store this UI reads">{escape(store)}</span>'
        '<span class="ro">read-only: this UI never writes to the store</span></header>'
        f"<main>{body}</main>{script}</body></html>\n"
    )


def runs_page(store: str, runs: Sequence[RunSummary], selected: Sequence[str] = ()) -> str:
    """The runs of a store, newest first, filtered to the ``selected`` statuses."""
    counts: dict[str, int] = {}
    for s in runs:
        counts[s.status] = counts.get(s.status, 0) + 1
    statuses = [s for s in STATUS_ORDER if s in counts or s in selected]
    statuses += sorted(s for s in {*counts, *selected} if s not in STATUS_ORDER)
    shown = [s for s in runs if not selected or s.status in selected]
    chips = [f'<a class="chip{"" if selected else " active"}" href="/" data-status="">all '
             f'<span class="count">{len(runs)}</span></a>']
    for status in statuses:
        active = status in selected
        href = "/?" + urlencode({"status": status})
        chips.append(f'<a class="chip{" active" if active else ""}" href="{escape(href)}" '
                     f'data-status="{escape(status)}">{escape(status)} '
                     f'<span class="count">{counts.get(status, 0)}</span></a>')
    rows = []
    for s in shown:
        problem = (f'<div class="problem">{escape(s.problem)}</div>' if s.problem else "")
        reason = (_waits_html(s.waiting_for) if s.waiting_for else
                  f'<div class="reason">{escape(s.stop_reason)}</div>' if s.stop_reason
                  else f'<div class="reason held">running in {escape(s.held_by)}</div>'
                  if s.held_by else "")
        rows.append(
            f'<tr data-run="{escape(s.run_id)}" data-status="{escape(s.status)}">'
            f'<td class="mono"><a href="{escape(run_url(s.run_id))}">{escape(s.run_id)}</a>'
            f"{problem}</td><td>{_badge(s.status)}{reason}</td>"
            f'<td>{escape(_started(s.started))}</td>'
            f'<td class="num">{escape(_duration(s.duration_ms))}</td>'
            f'<td class="num">{s.attempts}</td><td class="num">{s.failures}</td>'
            f'<td class="num">{s.tokens}</td><td class="num">${s.cost_usd:.6f}</td></tr>'
        )
    table = (
        '<table class="runs" id="runs"><thead><tr><th>run id</th><th>status</th>'
        '<th>started</th><th class="num">duration</th><th class="num">attempts</th>'
        '<th class="num">failed</th><th class="num">tokens</th><th class="num">cost</th>'
        f"</tr></thead><tbody>{''.join(rows)}</tbody></table>"
        if shown else
        '<p class="empty" id="runs">' + ("No run has that status." if runs else
                                         "This store has no runs yet.") + "</p>"
    )
    body = (f'<h1>Runs <span class="count">{len(shown)}</span></h1>'
            f'<nav class="filters" aria-label="filter by status">status: {"".join(chips)}</nav>'
            f"{table}")
    return _page("runs", store, body)


def _waits_html(waits: Sequence[Wait]) -> str:
    """What a WAITING run waits for: each input's key and its digest, short."""
    return "".join(
        f'<div class="waits" data-wait="{escape(w.key)}">waits for <span class="mono">'
        f'{escape(w.key)}</span> ({escape(w.schema)}) <span class="mono" title="'
        f'{escape(w.digest)}">digest {escape(w.short_digest)}</span></div>'
        for w in waits
    )


_CHOICES = ("route", "until", "wait", "input")


def _send_input_command(store: str, run_id: str, wait: Wait) -> str:
    """The shell command that answers ``wait``, as ``show`` prints it (``send_input_line``:
    pasted, no argument is ever run as shell code)."""
    from stroma.cli import send_input_line

    return send_input_line(store, run_id, wait)


def run_page(store: str, tl: Timeline, replay: tuple[str, str]) -> str:
    """A run: its facts, whether it replays clean, its timeline and its attempts.

    ``replay`` is (kind, text): kind ``ok``, ``bad`` or ``none`` (no plan to replay with).
    """
    kind, replay_text = replay
    facts = [
        ("status", _badge(tl.status)),
        ("started", escape(_started(tl.started))),
        ("wall clock", escape(_duration(tl.duration_ms))),
        ("time in nodes", escape(_duration(tl.latency_ms))),
        ("attempts", f"{tl.attempts} ({tl.failures} failed)"),
        ("tokens", str(tl.tokens)),
        ("cost", f"${tl.cost_usd:.6f}"),
        ("plan", f'<span class="mono" title="{escape(tl.plan)}">{escape(tl.plan[:16])}</span>'),
    ]
    if tl.stop_reason:
        facts.append(("stop reason", f'<span class="reason">{escape(tl.stop_reason)}</span>'))
    facts.extend((m.kind, escape(m.label)) for m in tl.marks if m.kind not in _CHOICES)
    for w in tl.waits:
        where = f" @{w.where}" if w.where else ""
        facts.append(("waiting for", (
            f'<span class="waits" data-wait="{escape(w.key)}"><span class="mono">'
            f"{escape(w.key)}</span> ({escape(w.schema)}) at {escape(w.step_id + where)}, "
            f'digest <span class="mono">{escape(w.digest)}</span>; send it with '
            f"<code>{escape(_send_input_command(store, tl.run_id, w))}</code></span>")))
    facts_html = "".join(f"<dt>{escape(k)}</dt><dd>{v}</dd>" for k, v in facts)
    choices = [m for m in tl.marks if m.kind in _CHOICES]
    choices_html = (
        '<h2>Choices and waits</h2><ol class="choices" id="choices">' + "".join(
            f'<li data-kind="{escape(m.kind)}" data-row="{escape(m.row or "")}">'
            f'<span class="status s-mark-{escape(m.kind)}">{escape(m.kind)}</span> '
            f"{escape(m.label)}</li>" for m in choices) + "</ol>"
        if choices else "")
    attempts = []
    for i, row in enumerate(tl.rows):
        for j, bar in enumerate(row.bars):
            message = bar.message or ""
            attempts.append(
                f'<tr data-index="{i}:{j}" data-row="{escape(row.key)}">'
                f'<td class="mono" style="padding-left:{0.7 + row.depth * 1.2:.1f}em">'
                f"{escape(row.label)}</td><td class=\"num\">{bar.attempt}</td>"
                f"<td>{_badge(bar.outcome)}</td>"
                f'<td class="num">{bar.offset_ms:.0f}</td>'
                f'<td class="num">{bar.duration_ms}</td>'
                f'<td class="num">{bar.usage.tokens or ""}</td>'
                f'<td class="num">{f"${bar.usage.cost_usd:.6f}" if bar.usage.cost_usd else ""}'
                f"</td><td>{escape(message)}</td></tr>"
            )
    data = json.dumps(json_safe(tl.to_json()), ensure_ascii=False, default=str)
    # Inside <script>: every "<" as the JSON escape \u003c (no "</script>" or "<!--"
    # can end or bend the script, and the text stays JSON).
    data = data.replace("<", "\\u003c")
    body = (
        f'<p class="crumbs"><a href="/">runs</a> / <span class="mono">{escape(tl.run_id)}'
        f"</span></p>"
        f'<h1>run <span class="mono">{escape(tl.run_id)}</span> {_badge(tl.status)}</h1>'
        f'<dl class="facts" id="facts">{facts_html}</dl>'
        f'<h2>Replay</h2><p id="replay" class="replay-{kind}">{escape(replay_text)}</p>'
        f"{choices_html}"
        '<h2>Timeline</h2><p class="empty">One row per step and fan-out child (and per loop '
        "iteration: <span class=\"mono\">think @agent#3</span>), one bar per attempt "
        "coloured by its outcome, dashed lines for backoffs; diamonds for route choices, "
        "circles for waits, dotted lines for a loop's until answers. Hover a bar or a mark "
        "for its summary; click a bar for its input and output state and usage.</p>"
        f'<div class="svg-wrap" id="timeline">{timeline_svg(tl, standalone=False)}</div>'
        f'<p class="links"><a href="{escape(svg_url(tl.run_id))}" download>download SVG</a>'
        f'<a href="/api/runs/{escape(quote(tl.run_id, safe=""))}">timeline JSON</a></p>'
        '<section class="detail" id="detail" hidden><h2 id="detail-title"></h2>'
        '<dl class="facts"><dt>outcome</dt><dd><span id="detail-outcome"></span></dd>'
        '<dt>group attempt</dt><dd id="detail-group"></dd>'
        '<dt>started</dt><dd id="detail-start"></dd>'
        '<dt>duration</dt><dd id="detail-duration"></dd>'
        '<dt>message</dt><dd id="detail-message"></dd>'
        '<dt>tokens</dt><dd id="detail-usage"></dd>'
        '<dt>model</dt><dd id="detail-model"></dd>'
        '<dt>cost</dt><dd id="detail-cost"></dd>'
        '<dt>hook errors</dt><dd id="detail-hooks"></dd></dl>'
        '<div class="states"><div><h3>input state</h3><pre id="detail-input"></pre></div>'
        '<div><h3>output state</h3><pre id="detail-output"></pre></div></div></section>'
        '<h2>Attempts</h2><table class="attempts" id="attempts"><thead><tr><th>step</th>'
        '<th class="num">attempt</th><th>outcome</th><th class="num">at ms</th>'
        '<th class="num">duration ms</th><th class="num">tokens</th>'
        f'<th class="num">cost</th><th>message</th></tr></thead><tbody>{"".join(attempts)}'
        "</tbody></table>"
    )
    script = (f'<script type="application/json" id="timeline-data">{data}</script>'
              f"<script>{_JS}</script>")
    return _page(f"run {tl.run_id}", store, body, script=script)


def error_page(store: str, title: str, message: str) -> str:
    """A page saying what went wrong and how to go on."""
    body = (f'<p class="crumbs"><a href="/">runs</a></p><h1>{escape(title)}</h1>'
            f'<p class="problem" id="error">{escape(message)}</p>')
    return _page(title, store, body)
