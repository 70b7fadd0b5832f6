"""A run's timeline as a standalone SVG picture (pure: text in, text out).

``timeline_svg(tl)`` draws a ``stroma.timeline.Timeline``: a header with the run's status
and totals, a time axis, one row per step and fan-out child (indented under its group),
one bar per attempt coloured by its outcome (at least 3 px wide, and nudged right rather
than drawn over the previous attempt of its row), the backoff sleeps between attempts as
dashed lines, the moments the run was resumed, and a legend. A step in a loop has a row
per iteration (``think @agent#3``); a loop's ``until`` answers are thin dotted lines across
the rows, a route's choice a diamond on the row of the step it chose, a wait for input a
circle on the wait's row (each just left of its moment, clear of the bars), and a
``waiting`` bar lasts as long as the run waited; each mark has a ``<title>`` saying what
it was (``class="marker mark-route"``, ``mark-until``, ``mark-wait``, ``mark-input``).
Hovering a bar shows its attempt, outcome, duration, failure message and usage (an SVG
``<title>``). The picture
needs no external resource (no fonts, scripts or images), so it can go into a bug report
or a CI artifact as it is; ``python -m stroma show STORE RUN_ID --svg run.svg`` writes
one, and the web UI embeds the same drawing (``standalone=False``) and makes its bars
clickable.

Every bar is a ``<rect class="bar ...">`` carrying ``data-row`` (the row's key),
``data-attempt``, ``data-outcome`` and ``data-index`` (``"row:bar"``, the position in the
timeline), so tests and scripts can read the picture back.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from html import escape as _html_escape

from stroma.timeline import (
    BUDGET_STOP,
    CANCELLED,
    OK,
    OUTCOMES,
    UNFINISHED,
    WAITING,
    Bar,
    Row,
    Timeline,
)

# Characters XML 1.0 cannot hold at all (C0 controls but tab, newline and carriage
# return): an error message with terminal colour codes would make the file unreadable.
_NOT_XML = {c: "\N{REPLACEMENT CHARACTER}" for c in (*range(0x00, 0x09), 0x0B, 0x0C,
                                                       *range(0x0E, 0x20))}


def _escape(text: str) -> str:
    """``text`` as SVG text or an attribute value: markup escaped, and the characters XML
    cannot hold shown as U+FFFD."""
    return _html_escape(text).translate(_NOT_XML)

__all__ = ("COLOURS", "ROW_HEIGHT", "timeline_svg")

COLOURS: dict[str, str] = {
    OK: "#2e7d32",
    "RECOVERABLE": "#f9a825",
    "AMBIGUOUS": "#ef6c00",
    "TERMINAL": "#c62828",
    CANCELLED: "#9e9e9e",
    BUDGET_STOP: "#6a1b9a",
    UNFINISHED: "#1565c0",
    WAITING: "#00838f",
}
"""The fill of a bar for each outcome."""

ROW_HEIGHT = 24
_BAR_HEIGHT = 14
_LABEL_WIDTH = 300
_TOP = 84  # where the first row starts
_CHAR = 6.6  # the width of a character of the 12 px label font, roughly
_FONT = "system-ui, -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif"


def _f(x: float) -> str:
    """A coordinate, written the same way every time."""
    text = f"{x:.1f}"
    return text[:-2] if text.endswith(".0") else text


def _duration(ms: float) -> str:
    if ms >= 60_000:
        return f"{ms / 60_000:.1f} min"
    if ms >= 1000:
        return f"{ms / 1000:.2f} s"
    return f"{ms:.0f} ms"


def _step(span: float) -> float:
    """A round tick interval giving about 6 ticks over ``span`` ms."""
    raw = span / 6
    power = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    for m in (1, 2, 5, 10):
        if m * power >= raw:
            return float(m * power)
    return float(10 * power)


def _clip(text: str, room: float) -> str:
    n = max(4, int(room / _CHAR))
    return text if len(text) <= n else text[: n - 1] + "…"


def _bar_title(row: Row, bar: Bar) -> str:
    lines = [f"{row.label}: attempt {bar.attempt}"
             + (f" (group attempt {bar.group_attempt})" if bar.group_attempt is not None
                and bar.group_attempt != bar.attempt else ""),
             f"{bar.outcome}, {_duration(bar.duration_ms)}, at +{_duration(bar.offset_ms)}"]
    if bar.message:
        lines.append(bar.message if len(bar.message) <= 300 else bar.message[:297] + "...")
    u = bar.usage
    if u.tokens or u.model:
        lines.append(f"tokens {u.input_tokens} in / {u.output_tokens} out"
                     + (f", {u.model}" if u.model else "") + f", ${u.cost_usd:.6f}")
    lines.extend(f"hook error: {h}" for h in bar.hook_errors)
    return "\n".join(lines)


def _diamond(x: float, y: float, title: str) -> str:
    points = f"{_f(x)},{_f(y - 6)} {_f(x + 5)},{_f(y)} {_f(x)},{_f(y + 6)} {_f(x - 5)},{_f(y)}"
    return (f'<polygon class="marker mark-route" points="{points}" fill="#5e35b1" '
            f'stroke="#ffffff"><title>{title}</title></polygon>')


def _circle(kind: str, fill: str) -> Callable[[float, float, str], str]:
    def draw(x: float, y: float, title: str) -> str:
        return (f'<circle class="marker mark-{kind}" cx="{_f(x)}" cy="{_f(y)}" r="5" '
                f'fill="{fill}" stroke="#ffffff"><title>{title}</title></circle>')

    return draw


_ROW_MARKS: dict[str, Callable[[float, float, str], str]] = {
    "route": _diamond,
    "wait": _circle("wait", "#00838f"),
    "input": _circle("input", "#2e7d32"),
}


def timeline_svg(tl: Timeline, *, width: int = 1100, standalone: bool = True) -> str:
    """The timeline as SVG text; ``standalone`` adds the XML declaration (for a file)."""
    plot_x = _LABEL_WIDTH + 10
    plot_w = max(100, width - plot_x - 24)
    ends = [tl.duration_ms] + [b.end_ms for r in tl.rows for b in r.bars] + [
        g.end_ms for r in tl.rows for g in r.gaps]
    span = max(max(ends), 1.0)
    scale = plot_w / span
    rows_h = len(tl.rows) * ROW_HEIGHT
    legend_y = _TOP + rows_h + 22
    height = legend_y + 30
    out: list[str] = []
    if standalone:
        out.append('<?xml version="1.0" encoding="UTF-8"?>')
    out.append(
        f'<svg xmlns="http://www.w3.org/2000/svg" class="stroma-timeline" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" font-family="{_escape(_FONT)}" '
        f'font-size="12" data-run="{_escape(tl.run_id)}" data-status="{_escape(tl.status)}">'
    )
    out.append(f"<title>stroma run {_escape(tl.run_id)}: {_escape(tl.status)}</title>")
    out.append(f'<rect width="{width}" height="{height}" fill="#ffffff"/>')
    # Header: the run and its totals.
    colour = COLOURS.get(OK if tl.status in ("COMPLETED", "RESUMED") else (
        UNFINISHED if not tl.finished else WAITING if tl.status == "WAITING" else "TERMINAL"),
        "#333333")
    out.append(
        f'<text x="12" y="24" font-size="15" font-weight="600" fill="#222">run '
        f'{_escape(tl.run_id)} <tspan fill="{colour}">{_escape(tl.status)}</tspan></text>'
    )
    facts = (f"{_duration(tl.duration_ms)} wall clock · {tl.attempts} attempt(s), "
             f"{tl.failures} failed · {tl.tokens} tokens · ${tl.cost_usd:.6f}")
    out.append(f'<text x="12" y="44" fill="#555">{_escape(facts)}</text>')
    if tl.stop_reason:
        reason = _escape(_clip(tl.stop_reason, width - 24))
        out.append(f'<text x="12" y="60" fill="#8a1c1c">{reason}</text>')
    # The time axis.
    axis_y = _TOP - 8
    step = _step(span)
    out.append('<g class="axis" fill="#777" stroke="#ddd">')
    k = 0
    while k * step <= span + 1e-9:
        x = plot_x + k * step * scale
        out.append(f'<line x1="{_f(x)}" y1="{axis_y}" x2="{_f(x)}" y2="{_TOP + rows_h}"/>')
        out.append(f'<text x="{_f(x)}" y="{axis_y - 4}" text-anchor="middle" stroke="none">'
                   f"{_escape(_duration(k * step))}</text>")
        k += 1
    out.append("</g>")
    # Rows: zebra background, label, gaps, bars.
    for i, row in enumerate(tl.rows):
        y = _TOP + i * ROW_HEIGHT
        mid = y + ROW_HEIGHT / 2
        out.append(f'<g class="row" data-row="{_escape(row.key)}" data-kind="{row.kind}" '
                   f'data-depth="{row.depth}">')
        if i % 2 == 0:
            out.append(f'<rect x="0" y="{y}" width="{width}" height="{ROW_HEIGHT}" '
                       'fill="#f6f7f9"/>')
        indent = 12 + row.depth * 14
        weight = ' font-weight="600"' if row.depth == 0 else ""
        label = _clip(row.label, _LABEL_WIDTH - indent)
        out.append(f'<text class="label" x="{indent}" y="{_f(mid + 4)}" fill="#222"{weight}>'
                   f"<title>{_escape(row.label)}</title>{_escape(label)}</text>")
        for gap in row.gaps:
            x1 = plot_x + gap.offset_ms * scale
            x2 = plot_x + gap.end_ms * scale
            out.append(
                f'<line class="gap" x1="{_f(x1)}" y1="{_f(mid)}" x2="{_f(max(x2, x1 + 2))}" '
                f'y2="{_f(mid)}" stroke="#888" stroke-width="2" stroke-dasharray="3 3">'
                f"<title>backoff after attempt {gap.after_attempt}: "
                f"{_escape(_duration(gap.duration_ms))}</title></line>"
            )
        free_x = 0.0  # bars of a row never overlap: a quick retry is nudged right
        for j, bar in enumerate(row.bars):
            x = max(plot_x + bar.offset_ms * scale, free_x)
            w = max(3.0, bar.duration_ms * scale)
            free_x = x + w + 1.5
            fill = COLOURS.get(bar.outcome, "#555555")
            dash = ' stroke="#0d47a1" stroke-dasharray="4 2"' if bar.outcome == UNFINISHED else (
                ' stroke="#00000033"')
            out.append(
                f'<rect class="bar outcome-{bar.outcome.replace(" ", "-")}" x="{_f(x)}" '
                f'y="{_f(mid - _BAR_HEIGHT / 2)}" width="{_f(w)}" height="{_BAR_HEIGHT}" '
                f'rx="2" fill="{fill}"{dash} data-row="{_escape(row.key)}" '
                f'data-attempt="{bar.attempt}" data-outcome="{_escape(bar.outcome)}" '
                f'data-index="{i}:{j}"><title>{_escape(_bar_title(row, bar))}</title></rect>'
            )
        out.append("</g>")
    # Marks: where the run was resumed or restarted; a loop's until answers; and, on their
    # rows, route choices and waits.
    row_of = {row.key: i for i, row in enumerate(tl.rows)}
    for mark in tl.marks:
        if mark.kind == "branch" or mark.offset_ms is None:
            continue
        x = plot_x + mark.offset_ms * scale
        if mark.kind == "until":
            out.append(
                f'<line class="marker mark-until" x1="{_f(x)}" y1="{axis_y}" x2="{_f(x)}" '
                f'y2="{_TOP + rows_h}" stroke="#78909c" stroke-dasharray="1 3">'
                f"<title>{_escape(mark.label)}</title></line>"
            )
            continue
        if mark.kind in _ROW_MARKS:
            i = row_of.get(mark.row or "", -1)
            if i < 0:
                continue
            mid = _TOP + i * ROW_HEIGHT + ROW_HEIGHT / 2
            # Just before the moment, so it never covers the bar that starts there.
            out.append(_ROW_MARKS[mark.kind](x - 6, mid, _escape(mark.kind + ": " + mark.label)))
            continue
        out.append(
            f'<line class="mark" x1="{_f(x)}" y1="{axis_y}" x2="{_f(x)}" y2="{_TOP + rows_h}" '
            f'stroke="#1565c0" stroke-dasharray="6 3"><title>{_escape(mark.kind)} '
            f"{_escape(mark.label)}</title>"
            "</line>"
        )
    # Legend.
    x = 12.0
    out.append('<g class="legend">')
    used = {b.outcome for r in tl.rows for b in r.bars}
    for outcome in OUTCOMES:
        if outcome == WAITING and WAITING not in used:
            continue  # only runs that waited have waits
        out.append(f'<rect x="{_f(x)}" y="{legend_y}" width="12" height="12" rx="2" '
                   f'fill="{COLOURS[outcome]}"/>')
        out.append(f'<text x="{_f(x + 16)}" y="{legend_y + 10}" fill="#444">'
                   f"{_escape(outcome)}</text>")
        x += 16 + len(outcome) * _CHAR + 18
    out.append(f'<line x1="{_f(x)}" y1="{legend_y + 6}" x2="{_f(x + 24)}" y2="{legend_y + 6}" '
               'stroke="#888" stroke-width="2" stroke-dasharray="3 3"/>')
    out.append(f'<text x="{_f(x + 30)}" y="{legend_y + 10}" fill="#444">backoff</text>')
    out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"
