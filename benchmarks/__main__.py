"""``python -m benchmarks`` (what ``make bench`` runs): every benchmark, ratios first.

Each figure is a ratio against a bare baseline measured in the same process, so it
survives a noisy machine better than an absolute time.
"""

from __future__ import annotations

from benchmarks import fanout, filestore, loop, machine, overhead, replay, stores, tracing


def main() -> None:
    for title, run in (
        ("pure machine", machine.main),
        ("runner overhead (issue: ratio <= 4)", overhead.main),
        ("FileStore (ratio <= 1.5)", filestore.main),
        ("replay and memory", replay.main),
        ("fan-out (ratio <= 3)", fanout.main),
        ("loops: per-iteration overhead (issue 12: ratio <= 2, flat)", loop.main),
        ("Redis and PostgreSQL stores (ratio <= 1.5)", stores.main),
        ("tracing on vs off (OpenTelemetry SDK, dropping exporter)", tracing.main),
    ):
        print(f"\n=== {title} ===")
        run()


if __name__ == "__main__":
    main()
