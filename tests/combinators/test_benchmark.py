"""The fan-out benchmark stays runnable (its figures are not asserted: no wall clock)."""

from __future__ import annotations

from benchmarks import fanout


def test_the_fanout_benchmark_runs_and_reports_its_figures(capsys: object) -> None:
    """``benchmarks.fanout.main`` runs a small fan-out and returns its table's figures."""
    figures = fanout.main(["--children", "40", "--repeats", "1"])
    assert set(figures) == {"stroma_us", "bare_us", "ratio", "children", "max_concurrency"}
    assert figures["children"] == 40 and figures["ratio"] > 0


def test_the_loop_benchmark_runs_every_configuration_to_the_end() -> None:
    """``benchmarks.loop.measure`` runs each configuration's loop to its last iteration
    (it asserts the final value itself) beside its floor, giving positive figures."""
    from benchmarks import loop

    for name, *_ in loop.CONFIGS:
        ours, floor = loop.measure(name, 7, 1)
        assert ours > 0 and floor > 0


def test_the_import_benchmark_times_each_program_in_a_fresh_interpreter() -> None:
    """``benchmarks.imports.main`` times ``import stroma`` and its two baselines, each in
    fresh processes, and returns positive figures for all three."""
    from benchmarks import imports

    figures = imports.main(["1"])
    assert set(figures) == set(imports.PROGRAMS)
    assert all(ms > 0 for ms in figures.values())


def test_the_replay_benchmark_replays_from_every_source() -> None:
    """``benchmarks.replay.speed`` runs a chain live (with retries, a budget and hooks, the
    run checked to its end) and replays it from memory, text and a FileStore, each giving
    the live result (asserted inside), with a positive time for every source."""
    from benchmarks import replay

    live, replays = replay.speed(30, 1, busy=True)
    assert live > 0 and set(replays) == set(replay.SOURCES)
    assert all(us > 0 for us in replays.values())
