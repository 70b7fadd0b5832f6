"""The switch: ``with_tracing()`` and ``RunConfig(tracing=...)`` turn tracing on (the global
providers by default, beside the seed's hand-written hooks), nothing is looked up or made
when it is off, misuse says what to pass, a missing ``opentelemetry-api`` says how to
install it, and tracing is neither in the machine's config nor in the log's header."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import attrs
import pytest

import interpreters.session
import stroma  # before interpreters.simulate, which imports stroma's modules
from interpreters.simulate import simulate
from stroma import (
    ReliabilityContext,
    RunConfig,
    RunStatus,
    StromaRunner,
    execute_step,
    interpret,
    stroma_node,
)
from stroma.machine import MachineConfig
from stroma.otel import Tracing, tracing_of
from tests.otel.telemetry import Telemetry
from tests.otel.test_spans import Num, contract, retries, traced

ROOT = Path(__file__).resolve().parents[2]


def _node() -> Any:
    @stroma_node("inc", contract("inc", Num, Num))
    async def inc(state: Num) -> tuple[dict[str, int], int, str]:
        return {"value": state.value + 1}, 3, "gpt-4o"

    return inc


def _python(code: str, backend: str = "asyncio") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), backend], cwd=ROOT,
        capture_output=True, text=True, timeout=120,
    )


# --------------------------------------------------------------------------- settings


def test_tracing_settings_and_what_they_mean() -> None:
    """``tracing`` is off by default; True means the global providers, a Tracing itself,
    False and None off; ``with_tracing`` sets True, or a Tracing of the providers given."""
    assert RunConfig().tracing is False
    assert tracing_of(RunConfig().tracing) is None
    assert RunConfig(tracing=None).tracing is False
    assert tracing_of(RunConfig(tracing=True).tracing) == Tracing()
    telemetry = Telemetry()
    try:
        mine = Tracing(telemetry.tracer_provider, telemetry.meter_provider)
        assert RunConfig(tracing=mine).tracing is mine
        assert StromaRunner.quick().with_tracing().config.tracing is True
        runner = StromaRunner.quick().with_tracing(telemetry.tracer_provider)
        assert runner.config.tracing == Tracing(tracer_provider=telemetry.tracer_provider)
        assert StromaRunner.quick(tracing=True).config.tracing is True
    finally:
        telemetry.shutdown()


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: RunConfig(tracing="yes"),
         "RunConfig.tracing must be True (the global OpenTelemetry providers), False (no "
         "tracing) or a stroma.otel.Tracing, got 'yes' (a str): e.g. tracing=True, or "
         "tracing=Tracing(tracer_provider=provider)"),
        (lambda: Tracing(tracer_provider=object()),
         "tracer_provider must be an OpenTelemetry TracerProvider (an object with "
         "get_tracer()) or None for the global one, got <object object"),
        (lambda: StromaRunner.quick().with_tracing(Telemetry().tracer_provider.get_tracer("x")),
         "that is a Tracer, not a provider: pass the provider it came from"),
        (lambda: StromaRunner.quick().with_tracing(meter_provider=Telemetry().tracer_provider),
         "meter_provider must be an OpenTelemetry MeterProvider (an object with "
         "get_meter()) or None for the global one"),
    ],
    ids=["not_a_setting", "not_a_provider", "a_tracer", "swapped_providers"],
)
def test_misuse_says_what_to_pass(make: Any, expected: str) -> None:
    """A tracing setting that is not one, or a provider that is not one (a tracer, the
    other kind of provider), is a TypeError naming it, what was expected and the fix."""
    with pytest.raises(TypeError) as caught:
        make()
    assert expected in str(caught.value)


@pytest.mark.anyio
async def test_tracing_is_not_a_decision_of_the_run(anyio_backend: str,
                                                   telemetry: Telemetry) -> None:
    """Tracing is in neither the MachineConfig nor the log's header: a traced run and an
    untraced one of the same settings record the same header config."""
    assert "tracing" not in {f.name for f in attrs.fields(MachineConfig)}
    plain = await interpret([_node()], Num(value=1), config=RunConfig(run_id="h", seed=5))
    on = await interpret([_node()], Num(value=1), config=traced(telemetry, run_id="h", seed=5))

    assert plain.log is not None and on.log is not None
    assert on.log.header.config == plain.log.header.config
    assert "tracing" not in on.log.to_jsonl().splitlines()[0]
    assert telemetry.named("stroma run")


# --------------------------------------------------------------------------- when off


@pytest.fixture
def observers(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The observer of every run that goes live (what the live loop is given)."""
    seen: list[Any] = []
    real = interpreters.session.run_live

    async def spy(state: Any, effects: Any, recorder: Any, performer: Any) -> Any:
        seen.append(performer.world.observer)
        return await real(state, effects, recorder, performer)

    monkeypatch.setattr(interpreters.session, "run_live", spy)
    return seen


@pytest.mark.anyio
async def test_with_tracing_off_nothing_is_looked_up_or_made(
    anyio_backend: str, monkeypatch: pytest.MonkeyPatch, observers: list[Any]
) -> None:
    """With tracing off, runs through every entry point look up no tracer or meter (the
    global lookups would raise) and have no observer."""
    from opentelemetry import metrics, trace

    def looked_up(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a tracer or meter was looked up with tracing off")

    for module, name in ((trace, "get_tracer_provider"), (trace, "get_tracer"),
                         (metrics, "get_meter_provider"), (metrics, "get_meter")):
        monkeypatch.setattr(module, name, looked_up)

    runner = StromaRunner.quick(policy_map=retries(1))
    results = [
        await runner.run([_node()], Num(value=1)),
        await interpret([_node()], Num(value=1)),
        await simulate([_node()], Num(value=1)),
        await execute_step("inc", _node(), Num(value=1), ReliabilityContext.for_run(),
                           contract=contract("inc", Num, Num)),
    ]

    assert [r.status for r in results] == [RunStatus.COMPLETED] * 4
    assert observers == [None] * 4


@pytest.mark.anyio
async def test_with_tracing_on_every_entry_point_has_the_observer(
    anyio_backend: str, telemetry: Telemetry, observers: list[Any]
) -> None:
    """With tracing on, runs through every entry point have a RunTracer as their observer
    and each makes its run span."""
    from interpreters.otel import RunTracer

    config = traced(telemetry)
    runner = StromaRunner.quick().with_tracing(telemetry.tracer_provider,
                                               telemetry.meter_provider)
    await runner.run([_node()], Num(value=1))
    await interpret([_node()], Num(value=1), config=config)
    await simulate([_node()], Num(value=1), config=config)
    await execute_step("inc", _node(), Num(value=1), ReliabilityContext.for_run(config),
                       contract=contract("inc", Num, Num))

    assert [type(o) for o in observers] == [RunTracer] * 4
    assert len(telemetry.named("stroma run")) == 4
    assert len(telemetry.named("stroma node inc")) == 4


@pytest.mark.slow
def test_an_untraced_run_imports_no_opentelemetry() -> None:
    """In a fresh process, importing stroma and running pipelines with tracing off (and
    building a config with it on) imports neither opentelemetry nor the tracing module."""
    out = _python("""
        import sys, anyio
        from pydantic import BaseModel
        import stroma
        from stroma import RunConfig, StromaRunner, interpret

        class S(BaseModel):
            v: int

        runner = StromaRunner.quick()

        @runner.node("n", input=S, output=S)
        async def n(s: S) -> dict[str, int]:
            return {"v": s.v + 1}

        assert anyio.run(runner.run, [n], S(v=1)).final_state == S(v=2)
        assert anyio.run(lambda: interpret([n], S(v=1))).final_state == S(v=2)
        RunConfig(tracing=True)
        loaded = sorted(m for m in sys.modules
                        if m.startswith("opentelemetry") or m == "interpreters.otel")
        print(loaded)
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_without_opentelemetry_tracing_says_how_to_install_it() -> None:
    """Where opentelemetry-api is not installed, stroma imports and runs untraced, and
    ``with_tracing()`` or a run with ``tracing=True`` raises ImportError saying to
    ``pip install 'stroma[otel]'``."""
    out = _python("""
        import sys
        sys.modules["opentelemetry"] = None  # as if opentelemetry-api were not installed
        import anyio
        from pydantic import BaseModel
        from stroma import RunConfig, StromaRunner, interpret

        class S(BaseModel):
            v: int

        runner = StromaRunner.quick()

        @runner.node("n", input=S, output=S)
        async def n(s: S) -> dict[str, int]:
            return {"v": s.v + 1}

        assert anyio.run(runner.run, [n], S(v=1)).final_state == S(v=2)
        for attempt in (lambda: runner.with_tracing(),
                        lambda: anyio.run(lambda: interpret(
                            [n], S(v=1), config=RunConfig(tracing=True)))):
            try:
                attempt()
            except ImportError as e:
                print(e)
            else:
                print("no error")
    """)
    assert out.returncode == 0, out.stderr
    message = ("tracing (RunConfig(tracing=...) or StromaRunner.with_tracing()) needs "
               "opentelemetry-api, which is not installed: pip install 'stroma[otel]'")
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith(message) for line in lines)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_global_providers_beside_the_seeds_hand_written_hooks(backend: str) -> None:
    """``with_tracing()`` traces into the global providers; beside it the seed's
    hand-written OTel hooks keep working as before (a span per attempt, ERROR, ERROR, OK,
    none left open), their spans nested under the built-in run span."""
    out = subprocess.run([sys.executable, "-m", "tests.otel.global_run", backend], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    spans = got["spans"]
    run_id = got["run_id"]
    seed = [s for s in spans if s["name"] == "stroma.node.ask"]
    built_in = [s for s in spans if s["name"] == "stroma node ask"]
    [run] = [s for s in spans if s["name"] == "stroma run"]

    assert [s["status"] for s in seed] == ["ERROR", "ERROR", "OK"]
    assert [s["attributes"].get("stroma.failure_class") for s in seed] == [
        "AMBIGUOUS", "AMBIGUOUS", None
    ]
    assert seed[2]["attributes"]["stroma.tokens_used"] == 150
    assert got["left_open"] == 0
    assert [(s["status"], s["attributes"]["stroma.attempt"]) for s in built_in] == [
        ("ERROR", 1), ("ERROR", 2), ("OK", 3)
    ]
    assert all(s["parent"] == "stroma run" for s in seed + built_in)
    assert run["parent"] is None and run["status"] == "OK"
    assert run["attributes"]["stroma.run_id"] == run_id
    assert got["metrics"] == ["stroma.cost", "stroma.node.attempts", "stroma.node.duration",
                              "stroma.tokens"]
    assert stroma.RunStatus.COMPLETED.value == run["attributes"]["stroma.status"]
