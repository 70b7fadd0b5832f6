"""Tracing overhead per node: the same runs with OpenTelemetry on and off.

A linear pipeline of N trivial nodes (each takes ``S(value: int)`` and returns value + 1,
with usage: 10 input and 5 output tokens of a priced model, so every span carries the
GenAI attributes and every attempt feeds the token and cost counters) runs through
``StromaRunner.run`` on the default in-memory store, three ways in the same process:

* ``bare``: the unavoidable work per node only (validate the input, await the function,
  validate the output, serialize it), as in ``benchmarks.overhead``;
* ``off``: stroma with tracing off (the default), which must cost what it cost before:
  the one-engine-path target, ratio to bare <= 4;
* ``on``: stroma with ``with_tracing(tracer_provider, meter_provider)`` on the
  OpenTelemetry SDK: a TracerProvider whose SimpleSpanProcessor hands every span to an
  exporter that drops it, and a MeterProvider whose in-memory reader aggregates every
  measurement (never collected while timed): the SDK's own cost of making, ending and
  processing a span per attempt and recording four instruments, without any I/O;
* and, to say where the time goes, ``noop``: tracing on with the API's no-op providers
  (stroma's own cost of folding the records into spans and measurements), and ``spans``:
  the SDK's tracer with the no-op meter provider (spans without metrics).

A ``map_each`` over 1,000 items (max_concurrency=50) is timed on and off as well: per
child, a group span gets one child span each. Medians of several runs; the figures are
the ratios to tracing off (and off/bare: the nodes here report usage, which the
runner prices, so that ratio is above ``benchmarks.overhead``'s, whose nodes report none;
that benchmark is the one that says the runner with tracing off is unchanged).

Run: ``python -m benchmarks.tracing``.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import sys
from collections.abc import Sequence
from time import perf_counter
from typing import Any

from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import NoOpTracerProvider
from pydantic import BaseModel

from stroma import NodeContract, StromaRunner, map_each, stroma_node

__all__ = ("DropSpans", "main", "measure_fanout", "measure_pipeline")


class S(BaseModel):
    value: int


class Batch(BaseModel):
    items: list[int]


class Item(BaseModel):
    item: int


class Result(BaseModel):
    value: int


class DropSpans(SpanExporter):
    """A span exporter that drops every span (the SDK's cost without any I/O)."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def sdk() -> tuple[TracerProvider, MeterProvider]:
    tracer_provider = TracerProvider(shutdown_on_exit=False)
    tracer_provider.add_span_processor(SimpleSpanProcessor(DropSpans()))
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()],
                                   shutdown_on_exit=False)
    return tracer_provider, meter_provider


def make_pipeline(n: int) -> tuple[list[Any], list[Any]]:
    nodes, fns = [], []
    for i in range(n):

        async def step(state: S) -> tuple[dict[str, int], int, int, str]:
            return {"value": state.value + 1}, 10, 5, "gpt-4o-mini"

        fns.append(step)
        contract = NodeContract(node_id=f"n{i}", input_schema=S, output_schema=S)
        nodes.append(stroma_node(f"n{i}", contract)(step))
    return nodes, fns


async def bare(fns: list[Any], initial: S) -> S:
    state: BaseModel = initial
    for fn in fns:
        inp = S.model_validate(state)
        raw, _, _, _ = await fn(inp)
        state = S.model_validate(raw)
        state.model_dump_json()
    return state  # type: ignore[return-value]


def _timed(run: Any) -> tuple[float, Any]:
    gc.collect()
    t0 = perf_counter()
    out = asyncio.run(run())
    return perf_counter() - t0, out


def measure_pipeline(n: int, repeats: int) -> dict[str, float]:
    """Microseconds per node, medians, of each way: bare, off, noop, spans, on."""
    nodes, fns = make_pipeline(n)
    initial = S(value=0)
    tracer_provider, meter_provider = sdk()
    runners = {
        "off": StromaRunner.quick(),
        "noop": StromaRunner.quick().with_tracing(NoOpTracerProvider(), NoOpMeterProvider()),
        "spans": StromaRunner.quick().with_tracing(tracer_provider, NoOpMeterProvider()),
        "on": StromaRunner.quick().with_tracing(tracer_provider, meter_provider),
    }
    times: dict[str, list[float]] = {"bare": [], **{k: [] for k in runners}}
    for _ in range(repeats):
        t, out = _timed(lambda: bare(fns, initial))
        assert out.value == n
        times["bare"].append(t)
        for name, runner in runners.items():
            t, result = _timed(lambda r=runner: r.run(nodes, initial))  # type: ignore[misc]
            assert result.final_state.value == n, result.status
            times[name].append(t)
            del result
    tracer_provider.shutdown()
    meter_provider.shutdown()
    return {k: statistics.median(v) / n * 1e6 for k, v in times.items()}


def measure_fanout(children: int, repeats: int) -> tuple[float, float]:
    """Microseconds per child of a map_each, medians: (tracing off, tracing on)."""

    async def work(inp: Item) -> dict[str, int]:
        return {"value": inp.item * 2}

    node = stroma_node("work", NodeContract(node_id="work", input_schema=Item,
                                            output_schema=Result))(work)
    plan = [map_each(node, over="items", into="results", max_concurrency=50, input=Batch)]
    batch = Batch(items=list(range(children)))
    tracer_provider, meter_provider = sdk()
    off = StromaRunner.quick()
    on = StromaRunner.quick().with_tracing(tracer_provider, meter_provider)
    times: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(repeats):
        for name, runner in (("off", off), ("on", on)):
            t, result = _timed(lambda r=runner: r.run(plan, batch))  # type: ignore[misc]
            assert len(result.final_state.results) == children, result.status
            times[name].append(t)
            del result
    tracer_provider.shutdown()
    meter_provider.shutdown()
    return (statistics.median(times["off"]) / children * 1e6,
            statistics.median(times["on"]) / children * 1e6)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    rows: dict[str, dict[str, float]] = {}
    print("tracing overhead: microseconds per node (median of runs); ratios to tracing off")
    ways = ("bare", "off", "noop", "spans", "on")
    print(f"{'':>15}" + "".join(f"{w:>8}" for w in ways)
          + f"{'noop/off':>10}{'spans/off':>10}{'on/off':>8}{'off/bare':>10}")
    for n, repeats in ((100, 15), (1_000, 9)):
        row = measure_pipeline(n, repeats)
        off = row["off"]
        row.update({"noop/off": row["noop"] / off, "spans/off": row["spans"] / off,
                    "on/off": row["on"] / off, "off/bare": off / row["bare"]})
        rows[f"N={n}"] = row
        print(f"{f'N={n:,}':>15}" + "".join(f"{row[w]:>8.2f}" for w in ways)
              + f"{row['noop/off']:>10.2f}{row['spans/off']:>10.2f}{row['on/off']:>8.2f}"
              f"{row['off/bare']:>10.2f}")
    off, on = measure_fanout(1_000, 7)
    rows["map_each 1,000"] = {"off": off, "on": on, "on/off": on / off}
    print(f"{'map_each 1,000':>15}{'':>8}{off:>8.2f}{'':>16}{on:>8.2f}{'':>20}{on / off:>8.2f}"
          "   (per child)")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
