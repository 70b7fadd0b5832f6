"""``benchmarks.tracing`` runs: the same pipeline and fan-out timed with tracing on and off."""

from __future__ import annotations

from benchmarks import tracing


def test_the_tracing_benchmark_times_both_ways() -> None:
    """A small pipeline and fan-out are timed bare, untraced and traced (every traced run
    completing with the SDK's dropping exporter), giving a positive time for each."""
    bare, off, on = tracing.measure_pipeline(5, 1)
    fan_off, fan_on = tracing.measure_fanout(5, 1)
    assert min(bare, off, on, fan_off, fan_on) > 0
    assert tracing.DropSpans().export(()) is tracing.SpanExportResult.SUCCESS
