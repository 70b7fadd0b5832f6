"""A run traced with the global providers, beside the seed's hand-written OTel hooks, in a
process of its own (the global providers can be set once per process).

``python -m tests.otel.global_run BACKEND`` sets the SDK's providers as the global ones,
runs the seed's "Full OpenTelemetry integration" runner with ``.with_tracing()`` (no
providers: the global ones) on a node that fails twice, and prints what was exported as
JSON: each span's name, parent's name, status and attributes, and the metrics' names.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import anyio
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import BaseModel

from stroma import RunStatus, StromaRunner
from tests.test_seeds import _page_namespace, no_backoff

__all__ = ("main",)


class Q(BaseModel):
    q: str


def main(backend: str) -> dict[str, Any]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    reader = InMemoryMetricReader()
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))

    ns = _page_namespace("full OpenTelemetry integration")  # the seed's hooks, as written
    runner: StromaRunner = ns["runner"].with_policy_map(no_backoff(3)).with_tracing()
    calls: list[int] = []

    @runner.node("ask", input=Q, output=Q)
    async def ask(state: Q) -> tuple[dict[str, str], int, int, str]:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError(f"attempt {len(calls)} dropped")
        return {"q": state.q + "!"}, 120, 30, "gpt-4o"

    result = anyio.run(runner.run, [ask], Q(q="hi"), backend=backend)
    assert result.status is RunStatus.COMPLETED
    spans = exporter.get_finished_spans()
    names = {s.context.span_id: s.name for s in spans}
    data = reader.get_metrics_data()
    return {
        "run_id": result.run_id,
        "left_open": len(ns["_active_spans"]),
        "spans": [
            {"name": s.name,
             "parent": names.get(s.parent.span_id) if s.parent is not None else None,
             "status": s.status.status_code.name,
             "attributes": dict(s.attributes or {})}
            for s in spans
        ],
        "metrics": sorted({m.name for rm in data.resource_metrics for sm in rm.scope_metrics
                           for m in sm.metrics}) if data is not None else [],
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
