"""``benchmarks.tracing`` runs: the same pipeline and fan-out timed with tracing on and off."""

from __future__ import annotations

from benchmarks import tracing


def test_the_tracing_benchmark_times_both_ways() -> None:
    """A small pipeline is timed bare, untraced, traced with no-op providers, with SDK
    spans only and with SDK spans and metrics, and a small fan-out untraced and traced
    (every run completing), giving a positive time for each."""
    row = tracing.measure_pipeline(5, 1)
    fan_off, fan_on = tracing.measure_fanout(5, 1)
    assert set(row) == {"bare", "off", "noop", "spans", "on"}
    assert min(*row.values(), fan_off, fan_on) > 0
    assert tracing.DropSpans().export(()) is tracing.SpanExportResult.SUCCESS
