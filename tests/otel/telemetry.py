"""An OpenTelemetry SDK to trace runs into: providers with an in-memory span exporter (a
SimpleSpanProcessor) and an in-memory metric reader, and the finished spans as a tree."""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

__all__ = ("Telemetry", "node")


def node(name: str, status: str, attributes: dict[str, Any],
         events: list[tuple[str, dict[str, Any]]] | None = None,
         children: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A span as the tree renders it (for writing the expected tree)."""
    return {"name": name, "status": status, "attributes": attributes,
            "events": events or [], "children": children or []}


class Telemetry:
    """A tracer provider and a meter provider of the SDK, recording in memory."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider(shutdown_on_exit=False)
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader],
                                            shutdown_on_exit=False)

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()

    def spans(self) -> tuple[ReadableSpan, ...]:
        return tuple(self.exporter.get_finished_spans())

    def tree(self) -> list[dict[str, Any]]:
        """The finished spans as trees: each span's name, status (``OK``, ``UNSET`` or
        ``ERROR: description``), attributes, events (an exception event by its type and
        message) and children, in the order they were exported."""
        spans = self.spans()
        ids = {s.context.span_id for s in spans}
        by_parent: dict[int | None, list[ReadableSpan]] = {}
        for s in spans:
            parent = s.parent.span_id if s.parent is not None else None
            by_parent.setdefault(parent if parent in ids else None, []).append(s)

        def render(s: ReadableSpan) -> dict[str, Any]:
            code = s.status.status_code.name
            status = f"{code}: {s.status.description}" if s.status.description else code
            events = []
            for e in s.events:
                attributes = dict(e.attributes or {})
                if e.name == "exception":
                    attributes = {k: v for k, v in attributes.items()
                                  if k in ("exception.type", "exception.message")}
                events.append((e.name, attributes))
            return node(s.name, status, dict(s.attributes or {}), events,
                        [render(c) for c in by_parent.get(s.context.span_id, [])])

        return [render(s) for s in by_parent.get(None, [])]

    def named(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.spans() if s.name == name]

    def points(self, metric: str) -> list[tuple[dict[str, Any], Any]]:
        """A metric's data points: (attributes, value) for a counter, (attributes,
        (count, sum)) for a histogram, sorted by attributes."""
        data = self.reader.get_metrics_data()
        found: list[tuple[dict[str, Any], Any]] = []
        for rm in data.resource_metrics if data is not None else ():
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.name != metric:
                        continue
                    for p in m.data.data_points:
                        value = (p.count, p.sum) if hasattr(p, "count") else p.value
                        found.append((dict(p.attributes or {}), value))
        return sorted(found, key=lambda item: sorted(item[0].items()))
