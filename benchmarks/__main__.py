"""``python -m benchmarks`` (what ``make bench`` runs): every benchmark, ratios first.

Each figure is a ratio against a bare baseline measured in the same process, so it
survives a noisy machine better than an absolute time.
"""

from __future__ import annotations

from benchmarks import (
    fanout,
    filestore,
    imports,
    loop,
    machine,
    overhead,
    replay,
    stores,
    tracing,
)


def main() -> None:
    for title, run in (
        ("pure machine", machine.main),
        ("runner overhead, every configuration (target: ratio <= 2, flat in N)", overhead.main),
        ("FileStore (target: ratio <= 1.5)", filestore.main),
        ("replay and memory (target: replay >= 10x faster than live, <= 0.6 KiB kept/node)",
         replay.main),
        ("fan-out (target: ratio <= 3)", fanout.main),
        ("loops: per-iteration overhead (target: ratio <= 2, flat)", loop.main),
        ("Redis and PostgreSQL stores (target: ratio <= 1.5)", stores.main),
        ("import time (target: import stroma <= 1.5x import pydantic)", imports.main),
        ("tracing on vs off (OpenTelemetry SDK, dropping exporter)", tracing.main),
    ):
        print(f"\n=== {title} ===")
        run()


if __name__ == "__main__":
    main()
