"""examples/agent.py, the ReAct agent users copy: it runs end to end with its scripted model
on a FileStore, as the README walks through it (run, wait for approval, approve, run again,
kill -9 mid-loop and resume, replay offline, budget fallback).

The slow tests run the example as a user does, as subprocesses; the example's test hooks
(AGENT_CALL_LOG, AGENT_PAUSE_AT, AGENT_PAUSE_FILE) count its model and tool calls and stop
it at a known point so a SIGKILL lands there. The others import it and run its plan in
this process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from stroma import (
    FileStore,
    InMemoryStore,
    RunStatus,
    estimate_cost_usd,
    interpret,
    replay,
    send_input,
)
from stroma import effects as fx
from stroma.log import EffectLog
from stroma.machine import idempotency_key

ROOT = Path(__file__).resolve().parents[2]
AGENT = ROOT / "examples" / "agent.py"
THIRD = (("loop", "agent", 3),)  # where the booking is asked for: iteration 3 of the loop



def _load_agent() -> ModuleType:
    """The example imported as the module ``agent``, as its log names its schemas."""
    loaded = sys.modules.get("agent")
    if loaded is not None and getattr(loaded, "__file__", None) == str(AGENT):
        return loaded
    spec = importlib.util.spec_from_file_location("agent", AGENT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["agent"] = module  # pydantic resolves the models' annotations there
    spec.loader.exec_module(module)
    return module


class Agent:
    """``python examples/agent.py ...`` on one store, with its calls counted."""

    def __init__(self, folder: Path, backend: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.store = folder / "store"
        self.calls = folder / "calls.log"
        self.backend = backend

    @property
    def ledger(self) -> Path:
        return self.store / "bookings.jsonl"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_")}
        return {**env, "PYTHONPATH": str(ROOT), "AGENT_CALL_LOG": str(self.calls), **extra}

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, str(AGENT), *args, "--store", str(self.store),
                "--backend", self.backend]

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        extra = ("--latency", "0") if args[0] == "run" else ()
        return subprocess.run(self.argv(*args, *extra), cwd=ROOT, env=self.env(),
                              capture_output=True, text=True, timeout=120)

    def start_paused_at(self, point: str, flag: Path, *args: str) -> subprocess.Popen[str]:
        """Start ``run ...`` that stops at ``point`` (creating ``flag``) and waits there."""
        env = self.env(AGENT_PAUSE_AT=point, AGENT_PAUSE_FILE=str(flag))
        proc = subprocess.Popen(self.argv("run", *args, "--latency", "0"), cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not flag.exists():
            if proc.poll() is not None:
                out, err = proc.communicate()
                raise AssertionError(f"the agent ended before {point}: {out}{err}")
            assert time.monotonic() < deadline, f"the agent never reached {point}"
            time.sleep(0.01)
        return proc

    def made_calls(self) -> list[str]:
        if not self.calls.exists():
            return []
        return self.calls.read_text(encoding="utf-8").splitlines()

    def log(self, run_id: str) -> EffectLog:
        import anyio

        log = anyio.run(FileStore(self.store).read_log, run_id)
        assert log is not None, f"no log for {run_id} in {self.store}"
        return log

    def bookings(self) -> list[dict[str, Any]]:
        if not self.ledger.exists():
            return []
        return [json.loads(line) for line in self.ledger.read_text().splitlines() if line]


def _ok(done: subprocess.CompletedProcess[str], code: int = 0) -> str:
    assert done.returncode == code, done.stdout + done.stderr
    return done.stdout


def _node_lines(out: str) -> list[str]:
    """The per-node lines an agent command printed (``  #3  think  ...``)."""
    return [line for line in out.splitlines() if line.startswith("  #")]


def _progress_lines(out: str) -> list[str]:
    """The lines an agent command printed per node call: ``  #3 ...`` and ``  !   ...``."""
    return [line for line in out.splitlines() if line.startswith(("  #", "  !"))]


def _think_models(log: EffectLog) -> list[tuple[int, str | None, str | None]]:
    """Each recorded call of think: its iteration, the model stroma handed it (the
    fallback, or None) and the model its usage was reported and priced with."""
    found = []
    for record in log.records:
        if not isinstance(record, tuple):
            continue
        effect, event = record
        if isinstance(effect, fx.CallNode) and effect.node_id == "think":
            assert isinstance(event, fx.NodeReturned)
            found.append((effect.coords[-1][2], effect.model, event.model))
    return found


def _status(log: EffectLog) -> RunStatus | None:
    return None if log.finish is None else log.finish.status


def _final(log: EffectLog) -> dict[str, Any]:
    assert log.finish is not None
    state = log.finish.final_state
    return state if isinstance(state, dict) else state.model_dump(mode="json")


# ----------------------------------------------------------- the walkthrough, for real


@pytest.mark.slow
def test_a_run_waits_for_approval_and_books_once_approved(
    tmp_path: Path, anyio_backend: str
) -> None:
    """run ends WAITING at the approval before the booking (nothing booked), approve sends
    it, run again goes on from the wait (RESUMED) without asking the model again for what
    was committed, and books once with the call's idempotency key."""
    agent = Agent(tmp_path, anyio_backend)

    first = _ok(agent("run", "--run-id", "trip"))
    assert "WAITING for approval@agent#3: book_flight(flight='FR 8356', passengers=2)" in first
    assert _status(agent.log("trip")) is RunStatus.WAITING
    assert agent.bookings() == []
    before = agent.made_calls()
    assert [c for c in before if c.startswith("model")] == [
        "model think#1 gpt-4o", "model think#2 gpt-4o", "model think#3 gpt-4o-mini"]

    approved = _ok(agent("approve", "trip", "--by", "ana"))
    assert approved.startswith("approved approval@agent#3 of trip")

    second = _ok(agent("run", "--run-id", "trip"))
    assert "resuming trip: 5 node calls committed, not run again" in second
    after = agent.made_calls()[len(before):]
    key = idempotency_key("trip", "book_flight", THIRD)
    assert after == [f"tool book_flight#3 {key}", "model think#4 gpt-4o-mini"]
    [booking] = agent.bookings()
    assert booking["idempotency_key"] == key
    assert booking == {**booking, "flight": "FR 8356", "passengers": 2, "charged_eur": 178.0}
    final = _final(agent.log("trip"))
    assert _status(agent.log("trip")) is RunStatus.RESUMED
    assert final["done"] is True and final["approval"] is None
    assert final["answer"] == (f"Booked FR 8356 for 2 passengers, 178.00 EUR in total; "
                               f"confirmation {booking['confirmation']}.")
    assert [s["tool"] for s in final["steps"]] == ["search", "calculator", "book_flight",
                                                   "answer"]
    assert "RESUMED: Booked FR 8356" in second

    # Replay offline: the lines it prints are the ones the two live runs printed, and no
    # model, tool or API call is made.
    replayed = _ok(agent("replay", "trip"))
    assert agent.made_calls() == before + after
    assert _node_lines(replayed) == _node_lines(first) + _node_lines(second)
    assert replayed.splitlines()[-1].startswith("RESUMED (as recorded: yes): Booked FR 8356")


@pytest.mark.slow
def test_a_declined_booking_books_nothing(tmp_path: Path, anyio_backend: str) -> None:
    """approve --no sends a refusal: book_flight never calls the airline, nothing is in the
    ledger, and the model's answer says the flight was not booked."""
    agent = Agent(tmp_path, anyio_backend)
    _ok(agent("run", "--run-id", "nope"))
    assert _ok(agent("approve", "nope", "--no", "--by", "bob")).startswith("declined")

    out = _ok(agent("run", "--run-id", "nope"))

    assert "  #3  book_flight declined by bob" in out
    assert agent.bookings() == []
    assert not [c for c in agent.made_calls() if c.startswith("tool book_flight")]
    assert _final(agent.log("nope"))["answer"].startswith("I did not book FR 8356 (declined")


@pytest.mark.slow
def test_a_second_answer_is_refused_naming_replace_which_takes_its_place(
    tmp_path: Path
) -> None:
    """A second approve before the run took the first is refused (exit 2) with a hint
    naming --replace; approve --replace takes the first answer's place, and the run goes
    on with the second answer."""
    agent = Agent(tmp_path, "asyncio")
    _ok(agent("run", "--run-id", "twice"))
    _ok(agent("approve", "twice", "--by", "ana"))

    again = agent("approve", "twice", "--no", "--by", "bob")
    replaced = agent("approve", "twice", "--no", "--by", "bob", "--replace")

    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert "--replace" in again.stderr
    assert _ok(replaced).startswith("declined approval@agent#3 of twice")
    out = _ok(agent("run", "--run-id", "twice"))
    assert "  #3  book_flight declined by bob" in out
    assert agent.bookings() == []


@pytest.mark.slow
def test_approving_a_run_that_does_not_wait_is_refused(tmp_path: Path) -> None:
    """approve on a run that is not waiting exits 2 with send_input's refusal (no
    traceback), and replay of a run the store does not have says so."""
    agent = Agent(tmp_path, "asyncio")
    _ok(agent("run", "--run-id", "small", "--max-tokens", "300"), code=1)

    refused = agent("approve", "small")
    missing = agent("replay", "ghost")

    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "run 'small' is not waiting for input (it is PARTIAL)" in refused.stderr
    assert missing.returncode == 2 and "no run 'ghost'" in missing.stderr


@pytest.mark.slow
def test_a_run_running_in_another_process_is_refused_in_one_line(tmp_path: Path) -> None:
    """run --run-id of a run another process is executing exits 2 with one agent.py line
    naming the run and the fix (no traceback), and says nothing of resuming it; the first
    process goes on undisturbed."""
    agent = Agent(tmp_path, "asyncio")
    flag = tmp_path / "paused"
    proc = agent.start_paused_at("think#2", flag, "--run-id", "dup")
    try:
        second = agent("run", "--run-id", "dup")
    finally:
        flag.unlink()
        out, err = proc.communicate(timeout=60)

    assert second.returncode == 2, second.stdout + second.stderr
    assert "Traceback" not in second.stderr
    [line] = second.stderr.splitlines()
    assert line.startswith("agent.py: run 'dup' is locked by worker ")
    assert "use another run id" in line
    assert "resuming" not in second.stdout and "run dup in" not in second.stdout
    assert proc.returncode == 0, out + err
    assert out.startswith("run dup in ") and "WAITING for approval@agent#3" in out


# ----------------------------------------------------------------------- crashes


@pytest.mark.slow
def test_sigkill_inside_the_loop_resumes_without_calling_committed_nodes(
    tmp_path: Path, anyio_backend: str
) -> None:
    """A run SIGKILLed while the model is thinking in iteration 3 resumes in a new process:
    only that call is made again (think#1, #2 and the tools are not), the iterations go on
    from 3, and it ends where an uninterrupted run ends (WAITING, the same state)."""
    ref = Agent(tmp_path / "ref", anyio_backend)
    _ok(ref("run", "--run-id", "crash"))
    agent = Agent(tmp_path / "killed", anyio_backend)
    flag = tmp_path / "paused"

    proc = agent.start_paused_at("think#3", flag, "--run-id", "crash")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    crashed = agent.log("crash")
    assert crashed.finish is None
    assert [f"{e.node_id}#{e.iteration}" for e in crashed.trace()] == [
        "think#1", "search#1", "think#2", "calculator#2"]
    before = agent.made_calls()
    assert before == ["model think#1 gpt-4o", "tool search#1", "model think#2 gpt-4o",
                      "tool calculator#2", "model think#3 gpt-4o-mini"]

    out = _ok(agent("run", "--run-id", "crash"))

    assert ("resuming crash: 4 node calls committed, not run again: think#1, search#1, "
            "think#2, calculator#2") in out
    assert agent.made_calls()[len(before):] == ["model think#3 gpt-4o-mini"]
    assert _node_lines(out) == [line for line in _node_lines(_ok(agent("replay", "crash")))
                                if line.startswith("  #3")]
    resumed = agent.log("crash")
    assert resumed.finish is not None and resumed.finish.status is RunStatus.WAITING
    assert [(e.node_id, e.iteration) for e in resumed.trace()][-1] == ("think", 3)
    assert _final(resumed) == _final(ref.log("crash"))
    assert agent.made_calls()[len(before) + 1:] == []  # the replay called nothing


@pytest.mark.slow
def test_sigkill_after_the_charge_books_once(tmp_path: Path, anyio_backend: str) -> None:
    """Killed after the airline charged and before book_flight's checkpoint, the resumed
    run calls book_flight again with the same idempotency key: the airline finds the key
    and the ledger keeps one booking, the one the answer names."""
    agent = Agent(tmp_path, anyio_backend)
    _ok(agent("run", "--run-id", "charge"))
    _ok(agent("approve", "charge"))

    proc = agent.start_paused_at("booked", tmp_path / "paused", "--run-id", "charge")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert len(agent.bookings()) == 1
    assert "book_flight" not in agent.log("charge").completed_nodes()

    _ok(agent("run", "--run-id", "charge"))

    key = idempotency_key("charge", "book_flight", THIRD)
    booked = [c for c in agent.made_calls() if c.startswith("tool book_flight")]
    assert booked == [f"tool book_flight#3 {key}"] * 2
    [booking] = agent.bookings()
    assert booking["idempotency_key"] == key
    final = _final(agent.log("charge"))
    assert booking["confirmation"] in final["answer"]
    assert final["steps"][2]["observation"] == (
        f"booked {booking['confirmation']}, charged 178.00 EUR")


# ------------------------------------------------------------------------ budgets


@pytest.mark.slow
def test_the_budget_falls_back_to_the_cheaper_model(tmp_path: Path, anyio_backend: str) -> None:
    """Once half the cost budget is spent, think is handed gpt-4o-mini: the log records the
    fallback on the call and the model its usage was priced with, the trace's steps show
    it, and the run's cost is each call priced with its own model. With a budget ten times
    larger no call falls back."""
    agent = Agent(tmp_path / "tight", anyio_backend)
    out = _ok(agent("run", "--run-id", "fb"))
    roomy = Agent(tmp_path / "roomy", anyio_backend)
    _ok(roomy("run", "--run-id", "fb", "--budget-usd", "0.025"))

    log = agent.log("fb")
    assert _think_models(log) == [(1, None, "gpt-4o"), (2, None, "gpt-4o"),
                                  (3, "gpt-4o-mini", "gpt-4o-mini")]
    assert [m for _, _, m in _think_models(roomy.log("fb"))] == ["gpt-4o"] * 3
    thinks = [e for e in log.trace() if e.node_id == "think"]
    assert [(e.output_state or {})["steps"][-1]["model"] for e in thinks] == [
        "gpt-4o", "gpt-4o", "gpt-4o-mini"]
    assert "#3  think       gpt-4o-mini  book_flight(" in out
    priced = 0.0
    for record in log.records:
        if isinstance(record, tuple) and isinstance(record[1], fx.NodeReturned):
            ev = record[1]
            if ev.model is not None:
                priced += estimate_cost_usd(ev.model, ev.input_tokens, ev.output_tokens)
    assert log.finish is not None
    assert log.finish.total_cost_usd == pytest.approx(priced)
    assert log.finish.total_cost_usd < 0.0025


@pytest.mark.slow
def test_a_spent_token_budget_ends_the_run_partial(tmp_path: Path, anyio_backend: str) -> None:
    """With a token budget smaller than two model calls the run ends PARTIAL (exit 1) with
    a stop reason naming the tokens, and the second thought is not kept."""
    agent = Agent(tmp_path, anyio_backend)

    out = _ok(agent("run", "--run-id", "tokens", "--max-tokens", "300"), code=1)

    log = agent.log("tokens")
    assert log.finish is not None and log.finish.status is RunStatus.PARTIAL
    assert log.finish.reason is not None and log.finish.reason.startswith("budget spent (tokens")
    assert f"PARTIAL: {log.finish.reason}" in out
    assert len(_final(log)["steps"]) == 1

    # Replay prints the lines the live run printed, the failed attempt's `!` line too, and
    # nothing for the retry the budget stopped before it started (the hook never saw it).
    live = _progress_lines(out)
    assert [line.split()[:3] for line in live] == [
        ["#1", "think", "gpt-4o"], ["#1", "search", "3"], ["!", "think", "RECOVERABLE:"]]
    replayed = _ok(agent("replay", "tokens"), code=0)
    assert _progress_lines(replayed) == live
    assert "was not started" not in "\n".join(_progress_lines(replayed))


# ------------------------------------------------------------------------- replay


@pytest.mark.slow
def test_the_stroma_cli_replays_the_example_log_with_the_imported_plan(tmp_path: Path) -> None:
    """The example's log names its schemas by the module (agent:AgentState, not __main__),
    so ``python -m stroma replay`` with ``--plan agent:agent`` replays it clean."""
    agent = Agent(tmp_path, "asyncio")
    _ok(agent("run", "--run-id", "cli"))

    done = subprocess.run(
        [sys.executable, "-m", "stroma", "replay", str(agent.store), "cli", "--plan",
         "agent:agent"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{AGENT.parent}"},
        capture_output=True, text=True, timeout=120,
    )

    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("OK: ")
    assert '"schema":"agent:Approval"' in agent.log("cli").to_jsonl()


@pytest.mark.slow
def test_the_example_passes_mypy_strict(tmp_path: Path) -> None:
    """Users copy the example: it type-checks under ``mypy --strict`` as the README's code
    does (make lint's settings)."""
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", "--cache-dir",
         str(tmp_path / "cache"), str(AGENT)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr


# ------------------------------------------------------------------ in this process


@pytest.mark.anyio
async def test_the_plan_waits_then_books_in_memory(anyio_backend: str, tmp_path: Path) -> None:
    """The example's plan on the in-memory store: WAITING at the approval, send_input, then
    RESUMED with one booking under the key stroma gave book_flight; a replay of the log
    gives the same result with no model or tool call."""
    agent = _load_agent()
    llm = agent.ScriptedModel(latency=0)
    store = InMemoryStore()
    ledger = tmp_path / "bookings.jsonl"
    state = agent.AgentState(question=agent.QUESTION)

    first = await interpret(agent.agent, state, store=store,
                            config=agent.config("mem", llm, ledger))
    assert first.status is RunStatus.WAITING
    await send_input(store, "mem", "approval", agent.Approval(approved=True, by="ana"))
    done = await interpret(agent.agent, state, store=store,
                           config=agent.config("mem", llm, ledger))

    assert done.status is RunStatus.RESUMED
    [booking] = agent.bookings(ledger)
    assert booking["idempotency_key"] == idempotency_key("mem", "book_flight", THIRD)
    assert done.final_state.model_dump()["answer"].endswith(
        f"confirmation {booking['confirmation']}.")
    assert [e.where for e in done.trace if e.node_id == "think"] == [
        "agent#1", "agent#2", "agent#3", "agent#4"]
    assert done.log is not None and await replay(agent.agent, done.log) == done


@pytest.mark.anyio
async def test_an_approval_given_to_interpret_runs_it_in_one_go(
    anyio_backend: str, tmp_path: Path
) -> None:
    """``interpret(..., inputs={"approval": ...})`` answers the wait at once: the run
    completes in one call, and a refusal given so books nothing."""
    agent = _load_agent()
    llm = agent.ScriptedModel(latency=0)
    ledger = tmp_path / "bookings.jsonl"
    state = agent.AgentState(question=agent.QUESTION)

    no = await interpret(agent.agent, state, config=agent.config("no", llm, ledger),
                         inputs={"approval": agent.Approval(approved=False)})

    assert no.status is RunStatus.COMPLETED
    assert no.final_state.model_dump()["answer"].startswith("I did not book FR 8356 (declined)")
    assert agent.bookings(ledger) == []


@pytest.mark.anyio
async def test_the_airline_books_a_key_once(anyio_backend: str, tmp_path: Path) -> None:
    """The fake airline API deduplicates by idempotency key: the same key gives back the
    first booking (marked deduplicated) and one ledger line; another key books again."""
    agent = _load_agent()
    api = agent.FlightAPI(tmp_path / "ledger.jsonl")

    first = await api.book("FR 8356", 2, idempotency_key="k1")
    again = await api.book("FR 8356", 2, idempotency_key="k1")
    other = await api.book("TP 542", 1, idempotency_key="k2")

    assert again == {**first, "deduplicated": True}
    assert other["confirmation"] != first["confirmation"] and other["charged_eur"] == 129.0
    assert [b["idempotency_key"] for b in agent.bookings(api.ledger)] == ["k1", "k2"]


def test_the_calculator_does_arithmetic_and_nothing_else() -> None:
    """The calculator tool evaluates arithmetic on numbers and refuses anything else (no
    eval: names, calls, attributes and booleans are errors); as a node it hands a bad
    expression back to the model as an observation instead of failing the run."""
    import anyio

    agent = _load_agent()
    assert agent.calculate("2 * 89.00") == 178.0
    assert agent.calculate("-(1 + 2) ** 2 / 3") == -3.0
    for hostile in ("__import__('os').system('true')", "x + 1", "(1).real", "True + 1"):
        with pytest.raises(ValueError, match="is not arithmetic on numbers"):
            agent.calculate(hostile)
    asked = agent.AgentState(question="?", steps=[agent.Step(
        thought="", tool="calculator", args={"expression": "1 / 0"})])
    out = anyio.run(agent.calculator, asked)
    assert out.steps[-1].observation == "error: float division by zero"


def test_the_scripted_model_is_a_function_of_the_chat() -> None:
    """The scripted model answers the same chat the same way (so a resumed think asks and
    gets what the killed one did), and its steps are JSON the think node accepts."""
    import anyio

    agent = _load_agent()
    llm = agent.ScriptedModel(latency=0)
    chat = agent.messages_for(agent.AgentState(question=agent.QUESTION))

    a = anyio.run(llm.complete, "gpt-4o", chat)
    b = anyio.run(llm.complete, "gpt-4o-mini", chat)

    assert a == b and json.loads(a.text)["tool"] == "search"
    assert a.input_tokens == sum(len(m["content"]) for m in chat) // 4


@pytest.mark.anyio
async def test_a_log_recorded_by_a_script_replays_with_the_imported_plan(
    anyio_backend: str, tmp_path: Path
) -> None:
    """A WAITING run recorded with the plan's module run as a script (its wait's schema is
    ``__main__:Approval``) replays with the same plan imported under its name."""
    agent = _load_agent()
    llm = agent.ScriptedModel(latency=0)
    state = agent.AgentState(question=agent.QUESTION)
    run = await interpret(agent.agent, state,
                          config=agent.config("script", llm, tmp_path / "b.jsonl"))
    assert run.log is not None
    text = run.log.to_jsonl()
    assert text.count('"schema":"agent:Approval"') == 1
    as_script = text.replace('"schema":"agent:Approval"', '"schema":"__main__:Approval"')

    again = await replay(agent.agent, as_script)

    assert again.status is RunStatus.WAITING and again.final_state == run.final_state

