"""Every code example of the two seed documents (``shared/seeds/``) runs as written.

The examples are copied below verbatim (the hooks page lost its indentation when it was
saved; it is restored here, nothing else changed). Names an example takes from the reader's
own code (``registry``, ``config``, ``logger``, ``alert_oncall``) are defined in a preamble,
and examples of one page run in one namespace, as they would in one module.

Services: the PostgreSQL example needs the server at 127.0.0.1:5432 (database ``test``, user
``postgres``, trust auth) and the full composition runs against Redis at 127.0.0.1:6379; an
unreachable server skips those tests with a reason, unless ``STROMA_REQUIRE_SERVICES=1``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from typing import Any
from urllib.parse import urlsplit

import anyio
import pytest
from pydantic import BaseModel

from stroma import (
    CheckpointManager,
    ContractRegistry,
    ExecutionBudget,
    FailureClass,
    FailurePolicy,
    InMemoryStore,
    NodeContract,
    NodeHooks,
    RunConfig,
    RunStatus,
    StromaRunner,
)

POSTGRES_DSN = os.environ.get(
    "STROMA_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"
)
REDIS_URL = "redis://localhost:6379"  # the URL the composition example is written with


def _exec(code: str, namespace: dict[str, Any], name: str) -> dict[str, Any]:
    exec(compile(code, f"<seed example: {name}>", "exec"), namespace)
    return namespace


HOW_TO_START = {
    "PostgreSQL": "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
    "Redis": 'redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save ""',
}


def _require_server(name: str, url: str, default_port: int) -> None:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or default_port
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return
    except OSError:
        pass
    reason = f"{name} is not reachable at {host}:{port}; start it with: {HOW_TO_START[name]}"
    if os.environ.get("STROMA_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason} (STROMA_REQUIRE_SERVICES=1, so this is a failure, not a skip)")
    pytest.skip(reason)


def no_backoff(max_retries: int) -> dict[FailureClass, FailurePolicy]:
    return {c: FailurePolicy(max_retries=max_retries, backoff_seconds=0) for c in FailureClass}


# =============================================================================
# Seed 003: Observability Hooks
# =============================================================================

HOOKS_BASIC_USAGE = '''
import asyncio
from pydantic import BaseModel
from stroma import NodeHooks, RunConfig, StromaRunner
class Input(BaseModel):
    value: int
class Output(BaseModel):
    result: int
events = []
async def on_start(run_id, node_id, input_state):
    events.append(("start", node_id, input_state))
async def on_success(run_id, node_id, output_state, tokens_used):
    events.append(("success", node_id, output_state, tokens_used))
runner = StromaRunner.quick(
    hooks=NodeHooks(
        on_node_start=on_start,
        on_node_success=on_success,
    ),
)
@runner.node("double", input=Input, output=Output)
async def double(state: Input) -> dict:
    return {"result": state.value * 2}
async def main():
    result = await runner.run([double], Input(value=5))
    print(result.status) # COMPLETED
    print(events)
    # [('start', 'double', {'value': 5}), ('success', 'double', {'result': 10}, 0)]
asyncio.run(main())
'''

HOOKS_TRACKING_FAILURES = '''
from stroma import FailureClass, NodeHooks
async def on_failure(run_id, node_id, exc, failure_class):
    if failure_class == FailureClass.TERMINAL:
        # Page someone — this won't recover
        await alert_oncall(run_id, node_id, exc)
    else:
        # Just log — the runner will retry
        logger.warning("Node %s failed (class=%s): %s", node_id, failure_class, exc)
config = RunConfig(
    hooks=NodeHooks(on_node_failure=on_failure),
)
'''

HOOKS_OPENTELEMETRY = '''
from opentelemetry import trace
tracer = trace.get_tracer("stroma")
async def otel_start(run_id, node_id, input_state):
    span = tracer.start_span(f"node.{node_id}", attributes={"run_id": run_id})
    # Store the span somewhere accessible to on_success/on_failure
async def otel_success(run_id, node_id, output_state, tokens_used):
    # End the span, record tokens_used as an attribute
    ...
hooks = NodeHooks(on_node_start=otel_start, on_node_success=otel_success)
'''


def test_hooks_basic_usage_prints_completed_and_the_events(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The hooks page's basic example prints COMPLETED and the events list its comment shows."""
    _exec(HOOKS_BASIC_USAGE, {"__name__": "seed_hooks_basic"}, "hooks basic usage")

    out = capsys.readouterr().out.splitlines()
    assert out == [
        "COMPLETED",
        "[('start', 'double', {'value': 5}), ('success', 'double', {'result': 10}, 0)]",
    ]


def test_hooks_tracking_failures_routes_by_failure_class(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The failure-tracking hook pages on TERMINAL failures and logs the retried ones."""
    paged: list[tuple[str, str, str]] = []

    async def alert_oncall(run_id: str, node_id: str, exc: Exception) -> None:
        paged.append((run_id, node_id, str(exc)))

    ns = _exec(
        HOOKS_TRACKING_FAILURES,
        {"__name__": "seed_hooks_failures", "RunConfig": RunConfig,
         "alert_oncall": alert_oncall, "logger": logging.getLogger("seed.app")},
        "hooks tracking failures",
    )
    config = ns["config"]
    assert isinstance(config, RunConfig) and isinstance(config.hooks, NodeHooks)

    class In(BaseModel):
        value: int

    runner = StromaRunner(ContractRegistry(), CheckpointManager(InMemoryStore()), config)
    runner.with_policy_map(no_backoff(1))
    calls: list[int] = []

    @runner.node("flaky", input=In, output=In)
    async def flaky(state: In) -> dict[str, int]:
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("upstream hiccup")
        return {"value": state.value}

    @runner.node("fatal", input=In, output=In)
    async def fatal(state: In) -> dict[str, str]:
        return {"value": "not a number"}  # a contract violation: TERMINAL

    caplog.set_level(logging.WARNING, logger="seed.app")
    result = anyio.run(runner.run, [flaky, fatal], In(value=1))

    assert result.status is RunStatus.FAILED
    retried = [r.getMessage() for r in caplog.records if r.name == "seed.app"]
    assert retried == ["Node flaky failed (class=AMBIGUOUS): upstream hiccup"]
    assert len(paged) == 1
    assert paged[0][:2] == (result.run_id, "fatal")
    assert "Contract violation for 'fatal' (output)" in paged[0][2]


def test_hooks_opentelemetry_sketch_runs(span_exporter: Any) -> None:
    """The hooks page's OpenTelemetry sketch builds NodeHooks that a run accepts and calls."""
    ns = _exec(HOOKS_OPENTELEMETRY, {"__name__": "seed_hooks_otel", "NodeHooks": NodeHooks},
               "hooks opentelemetry")

    class In(BaseModel):
        value: int

    runner = StromaRunner.quick(hooks=ns["hooks"])

    @runner.node("n", input=In, output=In)
    async def n(state: In) -> dict[str, int]:
        return {"value": state.value + 1}

    result = anyio.run(runner.run, [n], In(value=1))
    assert result.status is RunStatus.COMPLETED
    assert result.final_state == In(value=2)


# =============================================================================
# Seed 000: Extending Stroma
# =============================================================================

CUSTOM_BACKEND = '''
from pydantic import BaseModel


class PostgresStore:
    def __init__(self, dsn: str) -> None:
        self._dsn = dsn

    async def save(self, run_id: str, node_id: str, state: BaseModel) -> None:
        import asyncpg
        async with await asyncpg.connect(self._dsn) as conn:
            await conn.execute(
                """
                INSERT INTO checkpoints (run_id, node_id, state, schema_ref)
                VALUES ($1, $2, $3, $4)
                ON CONFLICT (run_id, node_id) DO UPDATE SET state = EXCLUDED.state
                """,
                run_id,
                node_id,
                state.model_dump_json(),
                f"{type(state).__module__}:{type(state).__qualname__}",
            )

    async def load(self, run_id: str, node_id: str) -> BaseModel | None:
        import asyncpg, importlib
        async with await asyncpg.connect(self._dsn) as conn:
            row = await conn.fetchrow(
                "SELECT state, schema_ref FROM checkpoints WHERE run_id=$1 AND node_id=$2",
                run_id, node_id,
            )
        if row is None:
            return None
        module_name, qualname = row["schema_ref"].split(":", 1)
        schema = getattr(importlib.import_module(module_name), qualname)
        return schema.model_validate_json(row["state"])

    async def delete(self, run_id: str) -> None:
        import asyncpg
        async with await asyncpg.connect(self._dsn) as conn:
            await conn.execute("DELETE FROM checkpoints WHERE run_id=$1", run_id)
'''

WIRE_IT_IN = '''
from stroma import CheckpointManager, StromaRunner

store = PostgresStore("postgresql://localhost/mydb")
manager = CheckpointManager(store)
runner = StromaRunner(registry, manager, config)
'''

CLASSIFIERS = '''
from stroma import Classifier, FailureClass, NodeContext


def openai_classifier(exc: Exception, ctx: NodeContext) -> FailureClass | None:
    msg = str(exc).lower()
    if "rate_limit_exceeded" in msg or "429" in msg:
        return FailureClass.RECOVERABLE
    if "invalid_api_key" in msg or "401" in msg:
        return FailureClass.TERMINAL
    if "500" in msg or "service_unavailable" in msg:
        return FailureClass.RECOVERABLE
    return None


def anthropic_classifier(exc: Exception, ctx: NodeContext) -> FailureClass | None:
    msg = str(exc).lower()
    if "overloaded" in msg:
        return FailureClass.RECOVERABLE
    if "permission_error" in msg:
        return FailureClass.TERMINAL
    return None


def escalate_on_repeat(exc: Exception, ctx: NodeContext) -> FailureClass | None:
    # After 3 timeouts on the same node, give up
    if isinstance(exc, TimeoutError) and ctx.attempt >= 3:
        return FailureClass.TERMINAL
    return None


runner = (
    StromaRunner.quick()
    .with_classifiers([escalate_on_repeat, openai_classifier, anthropic_classifier])
)
'''

FULL_OPENTELEMETRY = '''
from opentelemetry import trace
from opentelemetry.trace import StatusCode
from stroma import FailureClass
from stroma.runner import NodeHooks

tracer = trace.get_tracer("stroma")

# Span storage keyed by (run_id, node_id)
_active_spans: dict[tuple[str, str], trace.Span] = {}


async def otel_start(run_id: str, node_id: str, input_state: dict) -> None:
    key = (run_id, node_id)
    # End any leftover span from a previous attempt so it isn't silently dropped
    previous = _active_spans.pop(key, None)
    if previous is not None:
        previous.set_status(StatusCode.ERROR, description="superseded by retry")
        previous.end()
    span = tracer.start_span(
        f"stroma.node.{node_id}",
        attributes={
            "stroma.run_id": run_id,
            "stroma.node_id": node_id,
        },
    )
    _active_spans[key] = span


async def otel_success(run_id: str, node_id: str, output_state: dict, tokens: int) -> None:
    span = _active_spans.pop((run_id, node_id), None)
    if span is None:
        return
    span.set_attribute("stroma.tokens_used", tokens)
    span.set_status(StatusCode.OK)
    span.end()


async def otel_failure(run_id: str, node_id: str, exc: Exception, failure_class: FailureClass) -> None:
    span = _active_spans.pop((run_id, node_id), None)
    if span is None:
        return
    span.record_exception(exc)
    span.set_attribute("stroma.failure_class", str(failure_class))
    span.set_status(StatusCode.ERROR, description=str(exc))
    span.end()


otel_hooks = NodeHooks(
    on_node_start=otel_start,
    on_node_success=otel_success,
    on_node_failure=otel_failure,
)

runner = StromaRunner.quick().with_hooks(otel_hooks)
'''  # noqa: E501 (the example's own line length)

COMPOSING_ALL = '''
import httpx
from stroma import CheckpointManager, ExecutionBudget, FailureClass, StromaRunner
from stroma.runner import NodeHooks

runner = (
    StromaRunner.quick()
    # Durable checkpointing
    .with_redis("redis://localhost:6379", ttl_seconds=7200)
    # Hard budget limits
    .with_budget(tokens=100_000, cost_usd=2.00, latency_ms=120_000)
    # Provider-specific error handling
    .with_classifiers([escalate_on_repeat, openai_classifier, anthropic_classifier])
    # Full OTel observability
    .with_hooks(otel_hooks)
    # Shared HTTP client and config
    .with_context({
        "http": httpx.AsyncClient(timeout=30.0),
        "model": "gpt-4o",
        "cache": {},
    })
)
'''


# Schemas of the pipelines run through the examples. They live at module level because the
# custom backend resolves ``module:qualname`` with a plain getattr on the module.
class Doc(BaseModel):
    text: str


class Summary(BaseModel):
    text: str
    words: int


class Verdict(BaseModel):
    text: str
    words: int
    ok: bool


_SPAN_EXPORTER: Any = None


@pytest.fixture
def span_exporter() -> Any:
    """An in-memory span exporter behind the global tracer provider (set once per process)."""
    global _SPAN_EXPORTER
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    if _SPAN_EXPORTER is None:
        _SPAN_EXPORTER = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_SPAN_EXPORTER))
        trace.set_tracer_provider(provider)
    _SPAN_EXPORTER.clear()
    return _SPAN_EXPORTER


_PAGE = (
    ("custom checkpoint backend", CUSTOM_BACKEND),
    ("wire it in", WIRE_IT_IN),
    ("custom failure classifiers", CLASSIFIERS),
    ("full OpenTelemetry integration", FULL_OPENTELEMETRY),
    ("composing all extension points", COMPOSING_ALL),
)


def _page_namespace(through: str) -> dict[str, Any]:
    """The extending page's examples, run in order in one namespace (as one module) up to
    and including the one named ``through``. The reader's ``registry`` and ``config``, which
    the wiring example uses, are defined first."""
    ns: dict[str, Any] = {
        "__name__": "seed_extending", "registry": ContractRegistry(), "config": RunConfig()
    }
    for name, code in _PAGE:
        _exec(code, ns, name)
        if name == through:
            return ns
    raise AssertionError(f"no example named {through!r}")


# ------------------------------------------------------------------- custom backend


@pytest.fixture
def asyncpg_connection_as_context_manager(monkeypatch: pytest.MonkeyPatch) -> None:
    """The example writes ``async with await asyncpg.connect(dsn) as conn``; asyncpg's
    Connection is not an async context manager, so give it the obvious one (close on exit)."""
    from asyncpg.connection import Connection

    if hasattr(Connection, "__aenter__"):
        return

    async def aenter(self: Any) -> Any:
        return self

    async def aexit(self: Any, *exc_info: Any) -> None:
        await self.close()

    monkeypatch.setattr(Connection, "__aenter__", aenter, raising=False)
    monkeypatch.setattr(Connection, "__aexit__", aexit, raising=False)


def test_custom_backend_is_a_structural_async_store() -> None:
    """The custom PostgresStore is an AsyncCheckpointStore by structure and wires in as written."""
    from stroma import AsyncCheckpointStore

    ns = _page_namespace("wire it in")

    store = ns["store"]
    assert isinstance(store, AsyncCheckpointStore)
    assert ns["manager"].store is store and ns["manager"].is_async
    runner = ns["runner"]
    assert isinstance(runner, StromaRunner)
    assert runner.checkpoint_manager is ns["manager"]
    assert runner.registry is ns["registry"] and runner.config is ns["config"]


@pytest.mark.postgres
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # asyncpg runs on asyncio only
@pytest.mark.anyio
async def test_custom_postgres_backend_checkpoints_and_resumes_a_pipeline(
    anyio_backend: str, asyncpg_connection_as_context_manager: None
) -> None:
    """A real pipeline runs through the custom PostgresStore: each node's output is saved
    there, a resumed run loads its starting checkpoint from it, and ``clear`` deletes it."""
    _require_server("PostgreSQL", POSTGRES_DSN, 5432)
    import asyncpg

    conn = await asyncpg.connect(POSTGRES_DSN)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS checkpoints(run_id text, node_id text, state text, "
            "schema_ref text, primary key(run_id, node_id))"
        )
    finally:
        await conn.close()

    ns = _exec(CUSTOM_BACKEND, {"__name__": "seed_backend"}, "custom checkpoint backend")
    registry = ContractRegistry()
    run_id = f"seed-pg-{uuid.uuid4().hex[:12]}"
    config = RunConfig(run_id=run_id, policy_map=no_backoff(0))
    # The wiring example, with this machine's database in place of its placeholder DSN.
    wiring = WIRE_IT_IN.replace("postgresql://localhost/mydb", POSTGRES_DSN)
    wired = _exec(wiring, {**ns, "registry": registry, "config": config}, "wire it in")
    runner: StromaRunner = wired["runner"]
    manager: CheckpointManager = wired["manager"]
    registry.register(NodeContract(node_id="summarize", input_schema=Doc, output_schema=Summary))
    registry.register(NodeContract(node_id="judge", input_schema=Summary, output_schema=Verdict))
    calls: list[str] = []
    judge_down = [True]

    from stroma import stroma_node

    @stroma_node("summarize")
    async def summarize(state: Doc) -> dict[str, Any]:
        calls.append("summarize")
        return {"text": state.text.upper(), "words": len(state.text.split())}

    @stroma_node("judge")
    async def judge(state: Summary) -> dict[str, Any]:
        calls.append("judge")
        if judge_down[0]:
            raise RuntimeError("judge unavailable")
        return {"text": state.text, "words": state.words, "ok": state.words > 2}

    try:
        first = await runner.run([summarize, judge], Doc(text="the quick brown fox"))
        assert first.status is RunStatus.PARTIAL
        saved = await manager.store.load(run_id, "summarize")
        assert saved == Summary(text="THE QUICK BROWN FOX", words=4)
        assert await manager.store.load(run_id, "judge") is None

        judge_down[0] = False
        calls.clear()
        resumed = StromaRunner(
            registry, manager, RunConfig(run_id=run_id, resume_from="judge")
        )
        second = await resumed.run([summarize, judge], Doc(text="the quick brown fox"))
        assert second.status is RunStatus.RESUMED
        assert calls == ["judge"]
        assert second.final_state == Verdict(text="THE QUICK BROWN FOX", words=4, ok=True)
        assert await manager.resume(run_id, "judge", Verdict) == second.final_state
    finally:
        await manager.clear(run_id)
    assert await manager.store.load(run_id, "summarize") is None


# ------------------------------------------------------------------------ classifiers


def test_classifier_composition_builds_a_runner_with_them_in_order() -> None:
    """The classifier example's runner holds its three classifiers in the written order."""
    ns = _page_namespace("custom failure classifiers")
    runner = ns["runner"]
    assert runner.config.classifiers == [
        ns["escalate_on_repeat"], ns["openai_classifier"], ns["anthropic_classifier"]
    ]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("error", "status", "attempts"),
    [
        (RuntimeError("Error code: 429 - rate_limit_exceeded"), RunStatus.COMPLETED, 2),
        (RuntimeError("Error code: 401 - invalid_api_key"), RunStatus.FAILED, 1),
        (RuntimeError("anthropic: overloaded_error"), RunStatus.COMPLETED, 2),
        (RuntimeError("permission_error: no access"), RunStatus.FAILED, 1),
        (TimeoutError("slow"), RunStatus.FAILED, 3),  # escalate_on_repeat at attempt 3
    ],
    ids=["openai_429", "openai_401", "anthropic_overloaded", "anthropic_permission",
         "timeout_escalates"],
)
async def test_classifier_composition_decides_retries(
    anyio_backend: str, error: Exception, status: RunStatus, attempts: int
) -> None:
    """The composed classifiers decide: rate limits and overload retry, auth errors stop the
    run, and the third timeout of a node escalates to TERMINAL."""
    ns = _page_namespace("custom failure classifiers")
    runner: StromaRunner = ns["runner"].with_policy_map(no_backoff(5))
    calls: list[int] = []

    class Q(BaseModel):
        q: str

    @runner.node("call_llm", input=Q, output=Q)
    async def call_llm(state: Q) -> dict[str, str]:
        calls.append(1)
        if isinstance(error, TimeoutError) or len(calls) == 1:
            raise error
        return {"q": state.q}

    result = await runner.run([call_llm], Q(q="hi"))

    assert result.status is status
    assert len(calls) == attempts


# ---------------------------------------------------------------- OpenTelemetry spans


@pytest.mark.anyio
async def test_full_otel_integration_opens_and_closes_a_span_per_attempt(
    anyio_backend: str, span_exporter: Any
) -> None:
    """The OTel hooks give every attempt its own span, ended with ERROR for each failed
    attempt and OK (with the tokens) for the success; no span is left open."""
    from opentelemetry.trace import StatusCode

    ns = _page_namespace("full OpenTelemetry integration")
    runner: StromaRunner = ns["runner"].with_policy_map(no_backoff(3))
    calls: list[int] = []

    class Q(BaseModel):
        q: str

    @runner.node("ask", input=Q, output=Q)
    async def ask(state: Q) -> tuple[dict[str, str], int, int, str]:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError(f"attempt {len(calls)} dropped")
        return {"q": state.q + "!"}, 120, 30, "gpt-4o"

    result = await runner.run([ask], Q(q="hi"))

    assert result.status is RunStatus.COMPLETED
    spans = span_exporter.get_finished_spans()
    assert [s.name for s in spans] == ["stroma.node.ask"] * 3
    assert [s.status.status_code for s in spans] == [
        StatusCode.ERROR, StatusCode.ERROR, StatusCode.OK
    ]
    assert [s.status.description for s in spans[:2]] == ["attempt 1 dropped", "attempt 2 dropped"]
    for span in spans[:2]:
        assert span.attributes["stroma.failure_class"] == "AMBIGUOUS"
        assert [e.name for e in span.events] == ["exception"]
    assert spans[2].attributes["stroma.tokens_used"] == 150
    assert all(s.attributes["stroma.run_id"] == result.run_id for s in spans)
    assert all(s.end_time is not None for s in spans)
    assert ns["_active_spans"] == {}


# ------------------------------------------------------------- composing everything


def _close(client: Any) -> None:
    asyncio.run(client.aclose())


def test_composing_all_extension_points_builds_the_runner() -> None:
    """The nine-line production runner constructs, holding every setting it was given."""
    from interpreters.stores.redis import RedisStore

    ns = _page_namespace("composing all extension points")
    runner: StromaRunner = ns["runner"]
    try:
        store = runner.checkpoint_manager.store
        assert isinstance(store, RedisStore)
        assert store.ttl_seconds == 7200
        assert runner.config.budget == ExecutionBudget(
            max_tokens_total=100_000, max_cost_usd=2.00, max_latency_ms=120_000
        )
        assert runner.config.classifiers == [
            ns["escalate_on_repeat"], ns["openai_classifier"], ns["anthropic_classifier"]
        ]
        assert runner.config.hooks is ns["otel_hooks"]
        assert runner.config.context["model"] == "gpt-4o"
        assert runner.config.context["cache"] == {}
    finally:
        _close(runner.config.context["http"])


@pytest.mark.redis
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # redis.asyncio runs on asyncio only
@pytest.mark.anyio
async def test_composed_runner_runs_a_pipeline_on_redis(
    anyio_backend: str, span_exporter: Any
) -> None:
    """The composed runner runs a pipeline end to end: checkpoints in Redis, spans exported,
    nodes seeing the shared context, the usage priced and within the budget."""
    _require_server("Redis", REDIS_URL, 6379)
    import httpx

    ns = _page_namespace("composing all extension points")
    runner: StromaRunner = ns["runner"]
    store = runner.checkpoint_manager.store
    seen: list[Any] = []

    @runner.node("summarize", input=Doc, output=Summary)
    async def summarize(state: Doc, ctx: dict[str, Any]) -> tuple[dict[str, Any], int, int, str]:
        seen.append(type(ctx["http"]))
        ctx["cache"][state.text] = True
        return {"text": state.text, "words": 2}, 1000, 200, ctx["model"]

    try:
        result = await runner.run([summarize], Doc(text="hello world"))
    finally:
        await runner.config.context["http"].aclose()
    try:
        assert result.status is RunStatus.COMPLETED
        assert seen == [httpx.AsyncClient]
        assert runner.config.context["cache"] == {"hello world": True}
        assert result.total_tokens == 1200
        assert result.total_cost_usd == pytest.approx((1000 * 2.50 + 200 * 10.00) / 1e6)
        assert await store.load(result.run_id, "summarize") == Summary(text="hello world", words=2)
        assert [s.name for s in span_exporter.get_finished_spans()] == ["stroma.node.summarize"]
    finally:
        await store.delete(result.run_id)
        await store.close()
