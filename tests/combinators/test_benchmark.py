"""The fan-out benchmark stays runnable (its figures are not asserted: no wall clock)."""

from __future__ import annotations

from benchmarks import fanout


def test_the_fanout_benchmark_runs_and_reports_its_figures(capsys: object) -> None:
    """``benchmarks.fanout.main`` runs a small fan-out and returns its table's figures."""
    figures = fanout.main(["--children", "40", "--repeats", "1"])
    assert set(figures) == {"stroma_us", "bare_us", "ratio", "children", "max_concurrency"}
    assert figures["children"] == 40 and figures["ratio"] > 0
