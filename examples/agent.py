"""A ReAct agent as a durable stroma plan: think, pick a tool, run it, repeat.

    python examples/agent.py run                       # runs until it asks for approval
    python examples/agent.py approve RUN_ID [--no]     # a person approves (or declines)
                                                       # (--replace: answer again)
    python examples/agent.py run --run-id RUN_ID       # goes on from the approval
    python examples/agent.py replay RUN_ID             # offline, from the log: no model call
    python -m stroma runs runs/agent                   # every run in the store

The agent is one plan (``agent`` below)::

    loop(seq(think, route(lambda s: s.tool, {tools})), until=lambda s: s.done,
         max_iterations=10)

``think`` asks a model for the next step (a JSON object naming a tool), ``route`` runs
the tool the model chose, and the loop goes round until the model answers. Booking a
flight costs money, so its route waits for a person first: ``seq(await_input("approval",
Approval), book_flight)`` ends the run WAITING until ``approve`` sends the answer.

What stroma adds, and where to look:

* Every run is kept in a FileStore (``--store``, default ``runs/agent``): kill the process
  at any point (Ctrl-C, ``kill -9``) and ``run --run-id RUN_ID`` goes on from the last
  committed node; nothing committed runs again, the model is not asked again.
* A token and cost budget (``budget`` below) with a model fallback: once half the cost
  budget is spent, ``think`` is handed the cheaper model in ``ctx["_stroma_model"]``.
* ``book_flight`` passes ``ctx["_stroma_idempotency_key"]`` to the (fake) airline API,
  which keeps a ledger (``bookings.jsonl`` in the store folder) and books a key once: a
  crash after the charge and before the checkpoint does not charge twice on resume.
* ``replay`` feeds the recorded log back through the same plan: the same trace and result
  with no model, tool or API call, so a run can be debugged offline.

The model is pluggable (``ChatModel``). By default it is ``ScriptedModel``, a
deterministic stand-in (no network, no API key), so this file runs on a fresh machine;
``OpenAIModel`` and ``AnthropicModel`` show where a real client goes.
"""

from __future__ import annotations

import argparse
import ast
import getpass
import hashlib
import json
import operator
import os
import re
import sys
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol, TypeVar

import anyio
import anyio.to_thread
from pydantic import BaseModel

from stroma import (
    ExecutionBudget,
    ExecutionResult,
    FailureClass,
    FallbackPolicy,
    FileStore,
    InputRefused,
    NodeContract,
    NodeHooks,
    RunConfig,
    RunLocked,
    RunStatus,
    await_input,
    interpret,
    loop,
    replay,
    route,
    send_input,
    seq,
    stroma_node,
)
from stroma import effects as fx
from stroma.inputs import pending_wait

# ------------------------------------------------------------------------- settings

MODEL = "gpt-4o"  # what think asks for (priced by stroma.cost.KNOWN_MODELS)
FALLBACK_MODEL = "gpt-4o-mini"  # what it gets once the budget runs low
MAX_TOKENS = 20_000  # the run's token budget (input + output, every model call)
MAX_COST_USD = 0.0025  # the run's cost budget (small, so the fallback shows in a short run)
FALLBACK_AT = 0.5  # fall back to FALLBACK_MODEL at this share of MAX_COST_USD
QUESTION = (
    "Book the cheapest flight from Lisbon to Berlin on 2026-12-14 for 2 passengers, "
    "and tell me what it costs in total."
)
STORE = "runs/agent"

# -------------------------------------------------------------------------- state


class Approval(BaseModel):
    """What a person answers before a booking."""

    approved: bool
    by: str = ""
    note: str = ""


class Step(BaseModel):
    """One turn of the ReAct scratchpad: what the model thought and chose, what came back."""

    thought: str
    tool: str
    args: dict[str, Any] = {}
    model: str = ""  # the model that took this step (the fallback shows here)
    tokens: int = 0
    observation: str | None = None


class AgentState(BaseModel):
    """The state the loop passes round: the question, the scratchpad, the route to take."""

    question: str
    steps: list[Step] = []
    tool: str = ""  # the tool the model chose last: what route() reads
    done: bool = False
    answer: str = ""
    approval: Approval | None = None  # await_input("approval", Approval) fills this field


_F = TypeVar("_F", bound=Callable[..., Any])


def agent_node(node_id: str) -> Callable[[_F], _F]:
    """Mark an async function as a node from AgentState to AgentState."""
    contract = NodeContract(node_id=node_id, input_schema=AgentState, output_schema=AgentState)
    return stroma_node(node_id, contract)


def observed(s: AgentState, observation: str, **changes: Any) -> AgentState:
    """The state with the observation of the last step filled in."""
    last = s.steps[-1].model_copy(update={"observation": observation})
    return s.model_copy(update={"steps": [*s.steps[:-1], last], **changes})


# -------------------------------------------------------------------------- model


class Completion(NamedTuple):
    text: str
    input_tokens: int
    output_tokens: int


class ChatModel(Protocol):
    """What ``think`` needs from an LLM client: chat messages in, text and usage out."""

    async def complete(self, model: str, messages: list[dict[str, str]]) -> Completion: ...


class OpenAIModel:
    """A real model through OpenAI's client (``pip install openai``; OPENAI_API_KEY set).
    Pass ``--model openai`` to ``run``; this example itself does not depend on it."""

    async def complete(self, model: str, messages: list[dict[str, str]]) -> Completion:
        from openai import AsyncOpenAI

        r = await AsyncOpenAI().chat.completions.create(
            model=model, messages=messages, response_format={"type": "json_object"},
        )
        return Completion(r.choices[0].message.content or "", r.usage.prompt_tokens,
                          r.usage.completion_tokens)


class AnthropicModel:
    """A real model through Anthropic's client (``pip install anthropic``;
    ANTHROPIC_API_KEY set). Pass ``--model anthropic`` to ``run``, and set MODEL and
    FALLBACK_MODEL to Claude models (e.g. claude-sonnet-4-6 and claude-haiku-4-5)."""

    async def complete(self, model: str, messages: list[dict[str, str]]) -> Completion:
        from anthropic import AsyncAnthropic

        system = "\n".join(m["content"] for m in messages if m["role"] == "system")
        chat = [m for m in messages if m["role"] != "system"]
        r = await AsyncAnthropic().messages.create(
            model=model, system=system, messages=chat, max_tokens=1024,
        )
        return Completion(r.content[0].text, r.usage.input_tokens, r.usage.output_tokens)


SYSTEM_PROMPT = """\
You are a travel assistant. Work step by step: think, then call one tool, then read its
observation. Reply with one JSON object and nothing else:
  {"thought": "...", "tool": "<tool>", "args": {...}}
Tools:
  search(query)                 flight schedules and fares matching the query
  calculator(expression)        arithmetic, e.g. "2 * 89.00"
  book_flight(flight, passengers)  books and pays; a person approves it first
  answer(text)                  your final answer to the user; ends the task
"""


def messages_for(s: AgentState) -> list[dict[str, str]]:
    """The chat the model sees: the system prompt, the question, then each step."""
    chat = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": s.question}]
    for step in s.steps:
        said = {"thought": step.thought, "tool": step.tool, "args": step.args}
        chat.append({"role": "assistant", "content": json.dumps(said)})
        if step.observation is not None:
            chat.append({"role": "user", "content": f"Observation: {step.observation}"})
    return chat


_FARE = re.compile(r"([A-Z0-9]{2} \d+) [^;]*? (\d+\.\d\d) EUR")


class ScriptedModel:
    """A deterministic stand-in for an LLM (no network): it reads the chat and answers as
    a model would for the flight question, through search, calculator, book_flight and
    answer. ``latency`` seconds per call stand for the model's own time."""

    def __init__(self, latency: float = 0.5) -> None:
        self.latency = latency

    async def complete(self, model: str, messages: list[dict[str, str]]) -> Completion:
        seen = [m["content"].removeprefix("Observation: ") for m in messages[2:]
                if m["role"] == "user"]
        turn = len(seen) + 1
        _record_call(f"model think#{turn} {model}")
        await _pause_point(f"think#{turn}")
        if self.latency:
            await anyio.sleep(self.latency)
        reply = self._reply(messages[1]["content"], seen)
        text = json.dumps(reply)
        prompt = sum(len(m["content"]) for m in messages)
        return Completion(text, prompt // 4, len(text) // 4)  # ~4 characters a token

    @staticmethod
    def _reply(question: str, seen: list[str]) -> dict[str, Any]:
        people = re.search(r"(\d+) passengers?", question)
        passengers = int(people.group(1)) if people else 1
        if not seen:
            return {"thought": "I need the flights and fares first.", "tool": "search",
                    "args": {"query": "flights Lisbon Berlin 2026-12-14"}}
        fares = sorted(_FARE.findall(seen[0]), key=lambda f: float(f[1]))
        if not fares:
            return {"thought": "Nothing found.", "tool": "answer",
                    "args": {"text": "I found no flight for that day."}}
        flight, fare = fares[0]
        if len(seen) == 1:
            return {"thought": f"{flight} is the cheapest at {fare} EUR a seat.",
                    "tool": "calculator", "args": {"expression": f"{passengers} * {fare}"}}
        if len(seen) == 2:
            return {"thought": f"{seen[1]} EUR in total. I will book {flight}.",
                    "tool": "book_flight", "args": {"flight": flight, "passengers": passengers}}
        booked = re.match(r"booked (\S+),", seen[2])
        if booked:
            text = (f"Booked {flight} for {passengers} passengers, {seen[1]} EUR in total; "
                    f"confirmation {booked.group(1)}.")
        else:
            text = f"I did not book {flight} ({seen[2]}); it would be {seen[1]} EUR in total."
        return {"thought": "Done.", "tool": "answer", "args": {"text": text}}


# ------------------------------------------------------------------- the world


SCHEDULE: list[dict[str, Any]] = [  # what the fake airline API knows
    {"flight": "TP 542", "from": "Lisbon", "to": "Berlin", "date": "2026-12-14",
     "departs": "07:05", "arrives": "11:40", "fare_eur": 129.00},
    {"flight": "LH 1167", "from": "Lisbon", "to": "Berlin", "date": "2026-12-14",
     "departs": "12:30", "arrives": "17:05", "fare_eur": 164.00},
    {"flight": "FR 8356", "from": "Lisbon", "to": "Berlin", "date": "2026-12-14",
     "departs": "06:10", "arrives": "10:35", "fare_eur": 89.00},
    {"flight": "TP 550", "from": "Lisbon", "to": "Munich", "date": "2026-12-14",
     "departs": "09:15", "arrives": "13:20", "fare_eur": 119.00},
]


class FlightAPI:
    """A fake airline API, real enough to show deduplication: each booking is a line in
    a ledger file, and a booking whose idempotency key is already there is not made
    again (as with an ``Idempotency-Key`` header): the first booking comes back."""

    def __init__(self, ledger: Path) -> None:
        self.ledger = ledger

    async def book(self, flight: str, passengers: int, *, idempotency_key: str) -> dict[str, Any]:
        return await anyio.to_thread.run_sync(self._book, flight, passengers, idempotency_key)

    def _book(self, flight: str, passengers: int, key: str) -> dict[str, Any]:
        fare = next((f["fare_eur"] for f in SCHEDULE if f["flight"] == flight), None)
        if fare is None:
            raise ValueError(f"no flight {flight!r}")
        for booking in bookings(self.ledger):
            if booking["idempotency_key"] == key:
                return {**booking, "deduplicated": True}
        booking = {
            "confirmation": "BK-" + hashlib.sha256(key.encode()).hexdigest()[:6].upper(),
            "flight": flight, "passengers": passengers,
            "charged_eur": round(float(fare) * passengers, 2), "idempotency_key": key,
        }
        self.ledger.parent.mkdir(parents=True, exist_ok=True)
        with self.ledger.open("a", encoding="utf-8") as f:
            f.write(json.dumps(booking) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return booking


def bookings(ledger: Path) -> list[dict[str, Any]]:
    """The ledger's bookings, oldest first."""
    if not ledger.exists():
        return []
    lines = ledger.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


_OPS: dict[type, Callable[..., Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.Pow: operator.pow, ast.USub: operator.neg,
}


def calculate(expression: str) -> float:
    """Arithmetic on numbers (+ - * / ** and parentheses), without eval."""

    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            if not isinstance(node.value, bool):  # True + 1 is not arithmetic on numbers
                return float(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return float(_OPS[type(node.op)](value(node.left), value(node.right)))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return float(_OPS[type(node.op)](value(node.operand)))
        raise ValueError(f"calculator: {expression!r} is not arithmetic on numbers")

    return value(ast.parse(expression, mode="eval").body)


# -------------------------------------------------------------------------- nodes

TOOLS = ("search", "calculator", "book_flight", "answer")


@agent_node("think")
async def think(s: AgentState, ctx: dict[str, Any]) -> tuple[AgentState, int, int, str]:
    """Ask the model for the next step; report its tokens and model, so stroma prices the
    call and keeps the budget. A reply that is not a known tool raises: AMBIGUOUS, so it
    is retried (once, by default)."""
    model = ctx.get("_stroma_model") or ctx["model"]  # the fallback, once the budget is low
    llm: ChatModel = ctx["llm"]
    reply = await llm.complete(model, messages_for(s))
    said = json.loads(reply.text)
    if said.get("tool") not in TOOLS:
        raise ValueError(f"the model chose {said.get('tool')!r}, not one of {TOOLS}")
    step = Step(thought=str(said.get("thought", "")), tool=said["tool"],
                args=dict(said.get("args") or {}), model=model,
                tokens=reply.input_tokens + reply.output_tokens)
    out = s.model_copy(update={"steps": [*s.steps, step], "tool": step.tool})
    return out, reply.input_tokens, reply.output_tokens, model


@agent_node("search")
async def search(s: AgentState) -> AgentState:
    """Flights whose details hold every word of the query."""
    _record_call(f"tool search#{len(s.steps)}")
    words = str(s.steps[-1].args.get("query", "")).lower().split()
    terms = [w for w in words if w not in ("flight", "flights", "from", "to", "on")]
    found = [f for f in SCHEDULE
             if all(t in " ".join(str(v) for v in f.values()).lower() for t in terms)]
    lines = [f"{f['flight']} {f['departs']} {f['fare_eur']:.2f} EUR" for f in found]
    return observed(s, f"{len(found)} flights: " + "; ".join(lines) if found else "no flights")


@agent_node("calculator")
async def calculator(s: AgentState) -> AgentState:
    """The value of an arithmetic expression, to two decimals. A bad expression is an
    observation for the model to correct, not a failure of the run."""
    _record_call(f"tool calculator#{len(s.steps)}")
    try:
        value = calculate(str(s.steps[-1].args.get("expression", "")))
    except (ArithmeticError, SyntaxError, ValueError) as e:
        return observed(s, f"error: {e}")
    return observed(s, f"{value:.2f}")


@agent_node("book_flight")
async def book_flight(s: AgentState, ctx: dict[str, Any]) -> AgentState:
    """Book the flight the model chose, if the person approved: the API call carries the
    call's idempotency key, the same on every retry and resume of this call."""
    key = ctx["_stroma_idempotency_key"]
    args = s.steps[-1].args
    approval = s.approval
    if approval is None or not approval.approved:
        who = f" by {approval.by}" if approval is not None and approval.by else ""
        return observed(s, f"declined{who}", approval=None)
    _record_call(f"tool book_flight#{len(s.steps)} {key}")
    api: FlightAPI = ctx["flights"]
    booking = await api.book(str(args["flight"]), int(args["passengers"]), idempotency_key=key)
    await _pause_point("booked")  # (a test kills the process here: charged, not committed)
    return observed(s, f"booked {booking['confirmation']}, charged {booking['charged_eur']:.2f} "
                       f"EUR", approval=None)


@agent_node("answer")
async def answer(s: AgentState) -> AgentState:
    """The model's final answer: the loop ends here."""
    text = str(s.steps[-1].args.get("text", ""))
    return observed(s, "answered", answer=text, done=True)


agent = seq(
    loop(
        seq(think, route(lambda s: s.tool, {
            "search": search,
            "calculator": calculator,
            "book_flight": seq(await_input("approval", Approval), book_flight),
            "answer": answer,
        }, name="tool")),
        until=lambda s: s.done, max_iterations=10, name="agent",
    )
).with_timeout("think", 60_000)


def config(run_id: str, llm: ChatModel, ledger: Path, *, max_cost_usd: float = MAX_COST_USD,
           max_tokens: int = MAX_TOKENS, progress: Progress | None = None) -> RunConfig:
    """The run's settings: its id, budget, model fallback, shared resources and hooks."""
    progress = progress or Progress()
    return RunConfig(
        run_id=run_id,
        budget=ExecutionBudget(max_tokens_total=max_tokens, max_cost_usd=max_cost_usd),
        model_fallbacks=[FallbackPolicy(MODEL, FALLBACK_MODEL, at_budget_pct=FALLBACK_AT)],
        context={"model": MODEL, "llm": llm, "flights": FlightAPI(ledger)},
        hooks=NodeHooks(on_node_success=progress, on_node_failure=progress.failed),
    )


# ---------------------------------------------------------------------- printing


def describe(iteration: int | None, node_id: str, state: AgentState) -> str:
    """One line for a node that ran: ``#3 think  gpt-4o-mini  book_flight(...)``."""
    step = state.steps[-1] if state.steps else None
    where = f"#{iteration}" if iteration is not None else ""
    if step is None:
        return f"  {where:<3} {node_id}"
    if node_id.startswith("await_input"):
        a = state.approval
        said = "none" if a is None else ("approved" if a.approved else "declined")
        return f"  {where:<3} {'approval':<11} {said}{f' by {a.by}' if a and a.by else ''}"
    if node_id == "think":
        args = ", ".join(f"{k}={v!r}" for k, v in step.args.items())
        return (f"  {where:<3} {node_id:<11} {step.model:<12} {step.tool}({args})"
                f"  [{step.tokens} tokens]")
    return f"  {where:<3} {node_id:<11} {step.observation}"


def failed_line(node_id: str, failure: FailureClass | str, message: object) -> str:
    """The line for an attempt that failed: ``  !   think  RECOVERABLE: ...``."""
    return f"  !   {node_id:<11} {FailureClass(failure).value}: {message}"


class Progress:
    """The ``on_node_success`` and ``on_node_failure`` hooks: a line per node call as the
    run goes. Hooks run at least once: one whose record was not durable when the process
    died fires again on resume, so calls shown already (``shown``: ``think#3``, ...) are
    not shown twice. ``header`` (what the run is: new, resumed) is printed before the
    first line, once the run holds its lease and goes on (``flush_header``: now)."""

    def __init__(self, shown: set[str] | None = None, header: str | None = None) -> None:
        self.shown = set() if shown is None else shown
        self.header = header

    def flush_header(self) -> None:
        if self.header is not None:
            print(self.header, flush=True)
            self.header = None

    async def __call__(self, run_id: str, node_id: str, output: dict[str, Any],
                       tokens: int) -> None:
        state = AgentState.model_validate(output)
        call = f"{node_id}#{len(state.steps)}"  # the iteration: one step per think
        if call not in self.shown:
            self.shown.add(call)
            self.flush_header()
            print(describe(len(state.steps), node_id, state), flush=True)

    async def failed(self, run_id: str, node_id: str, exc: Exception,
                     failure: FailureClass) -> None:
        """The ``on_node_failure`` hook: an attempt that failed (stroma decides the retry)."""
        self.flush_header()
        print(failed_line(node_id, failure, exc), flush=True)


def report(result: ExecutionResult, store: str) -> None:
    """What the run ended with, and what to do next."""
    state = result.final_state
    assert isinstance(state, AgentState)
    models = Counter(s.model for s in state.steps if s.model)
    used = ", ".join(f"{m} x{n}" for m, n in models.items())
    spent = f"{result.total_tokens} tokens, ${result.total_cost_usd:.4f} ({used or 'no model'})"
    here = f"python {sys.argv[0]}"
    tail = "" if store == STORE else f" --store {store}"
    if result.status is RunStatus.WAITING:
        assert result.log is not None
        for wait in pending_wait(result.log):
            step = state.steps[-1]
            args = ", ".join(f"{k}={v!r}" for k, v in step.args.items())
            print(f"WAITING for {wait.key}: {step.tool}({args}); {spent}")
        print(f"  approve:  {here} approve {result.run_id}{tail}")
        print(f"  decline:  {here} approve {result.run_id} --no{tail}")
        print(f"  then:     {here} run --run-id {result.run_id}{tail}")
        return
    print(f"{result.status.value}: {state.answer or result.stop_reason or ''}")
    print(f"  {spent}; replay it: {here} replay {result.run_id}{tail}")


# --------------------------------------------------------------------- commands


async def run_command(args: argparse.Namespace) -> int:
    store = FileStore(args.store)
    run_id = args.run_id
    log = await store.read_log(run_id)
    done = [] if log is None else [
        f"{e.node_id}#{e.iteration}" for e in log.trace() if e.output_state is not None
    ]
    # Printed once the run goes on (before its first node's line, or its result): a run
    # another process holds is refused (RunLocked) and is not resumed here.
    if log is None:
        header = f"run {run_id} in {args.store} (resume it with --run-id {run_id})"
    elif log.finish is not None and log.finish.status is not RunStatus.WAITING:
        header = f"run {run_id} has finished ({log.finish.status.value}); nothing runs again"
    else:
        header = (f"resuming {run_id}: {len(done)} node calls committed, not run again"
                  f"{(': ' + ', '.join(done)) if done else ''}")
    llm = LLMS[args.model](args.latency)
    ledger = Path(args.ledger) if args.ledger else Path(args.store) / "bookings.jsonl"
    progress = Progress(set(done), header)
    result = await interpret(
        agent, AgentState(question=args.question), store=store,
        config=config(run_id, llm, ledger, max_cost_usd=args.budget_usd,
                      max_tokens=args.max_tokens, progress=progress),
    )
    progress.flush_header()
    report(result, args.store)
    return 0 if result.status in (RunStatus.COMPLETED, RunStatus.RESUMED,
                                  RunStatus.WAITING) else 1


async def approve_command(args: argparse.Namespace) -> int:
    store = FileStore(args.store)
    log = await store.read_log(args.run_id)
    waits = pending_wait(log) if log is not None else []
    # The digest names the state the person was shown: if the run moved on meanwhile,
    # send_input refuses the answer instead of applying it to another request.
    digest = waits[0].digest if waits else None
    answer = Approval(approved=not args.no, by=args.by, note=args.note)
    key = await send_input(store, args.run_id, "approval", answer, digest=digest,
                           replace=args.replace)
    verb = "approved" if answer.approved else "declined"
    print(f"{verb} {key} of {args.run_id}; go on with: python {sys.argv[0]} run "
          f"--run-id {args.run_id}" + ("" if args.store == STORE else f" --store {args.store}"))
    return 0


async def replay_command(args: argparse.Namespace) -> int:
    store = FileStore(args.store)
    log = await store.read_log(args.run_id)
    if log is None:
        raise InputRefused(f"no run {args.run_id!r} in {args.store}: see python -m stroma "
                           f"runs {args.store}")
    print(f"replaying {args.run_id} from {args.store}: no model, tool or API is called")
    result = await replay(agent, log)  # the nodes are not called: no context is needed
    # The live run printed a line per failed attempt from its on_node_failure hook, which
    # the log records firing; an attempt the hook did not see (one the budget stopped
    # before it started, one cancelled) printed nothing, so it prints nothing here either.
    failed: Counter[tuple[str, int, FailureClass | None, str | None]] = Counter(
        (effect.node_id, effect.attempt, effect.failure, effect.error.message)
        for effect, _ in (r for r in log.records if isinstance(r, tuple))
        if isinstance(effect, fx.FireHook) and effect.kind == "failure"
        and effect.failure is not None and effect.error is not None
    )
    for event in result.trace:
        if event.output_state is not None:
            state = AgentState.model_validate(event.output_state)
            print(describe(event.iteration, event.node_id, state))
            continue
        seen = (event.node_id, event.attempt, event.failure, event.failure_message)
        if event.failure is not None and failed[seen] > 0:
            failed[seen] -= 1
            print(failed_line(event.node_id, event.failure, event.failure_message))
    recorded = log.finish  # what the run's own Finish record says (its state as JSON)
    same = recorded is not None and (
        recorded.status, AgentState.model_validate(recorded.final_state), recorded.total_tokens
    ) == (result.status, result.final_state, result.total_tokens)
    final = result.final_state
    assert isinstance(final, AgentState)
    print(f"{result.status.value} (as recorded: {'yes' if same else 'no'}): "
          f"{final.answer or result.stop_reason or ''}")
    return 0 if same else 1


LLMS: dict[str, Callable[[float], ChatModel]] = {
    "scripted": ScriptedModel,
    "openai": lambda latency: OpenAIModel(),
    "anthropic": lambda latency: AnthropicModel(),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="agent.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run an agent, or go on with one (--run-id)")
    run.add_argument("--run-id", help="the run to go on with (default: a new run)")
    run.add_argument("--question", default=QUESTION,
                     help="what to ask (a new run's; a resumed run keeps its log's question, "
                          "budget and fallback)")
    run.add_argument("--model", choices=sorted(LLMS), default="scripted",
                     help="the LLM client (default: scripted, no network)")
    run.add_argument("--latency", type=float, default=0.5,
                     help="seconds per scripted model call (time to press Ctrl-C)")
    run.add_argument("--budget-usd", type=float, default=MAX_COST_USD,
                     help=f"the cost budget; {FALLBACK_MODEL} from {FALLBACK_AT * 100:.0f}%% of it")
    run.add_argument("--max-tokens", type=int, default=MAX_TOKENS, help="the token budget")
    run.add_argument("--ledger", help="the airline's bookings (default: STORE/bookings.jsonl)")
    approve = sub.add_parser("approve", help="approve (or --no: decline) a waiting booking")
    approve.add_argument("run_id")
    approve.add_argument("--no", action="store_true", help="decline instead")
    approve.add_argument("--by", default=getpass.getuser(), help="who answers")
    approve.add_argument("--note", default="")
    approve.add_argument("--replace", action="store_true",
                         help="take the place of an answer sent earlier that the run has not "
                              "taken yet (else it is refused)")
    rep = sub.add_parser("replay", help="replay a run from its log, offline")
    rep.add_argument("run_id")
    for command in (run, approve, rep):
        command.add_argument("--store", default=STORE, help=f"a FileStore folder ({STORE})")
        command.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio",
                             help="the event loop (stroma runs on both)")
    return p


COMMANDS = {"run": run_command, "approve": approve_command, "replay": replay_command}


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "run" and not args.run_id:
        args.run_id = f"agent-{uuid.uuid4().hex[:8]}"
    try:
        code: int = anyio.run(COMMANDS[args.command], args, backend=args.backend)
    except KeyboardInterrupt:
        print(f"\ninterrupted; what was committed is in {args.store}: go on with "
              f"python {sys.argv[0]} run --run-id {args.run_id}", file=sys.stderr)
        return 130
    except (InputRefused, RunLocked) as e:  # (RunLocked: the run is running elsewhere)
        print(f"agent.py: {e}", file=sys.stderr)
        return 2
    return code


# -------------------------------------------------- what the tests steer (inert here)
#
# tests/examples/test_agent.py runs this file as a subprocess. AGENT_CALL_LOG names a
# file that gets a line per model and tool call (to count them); AGENT_PAUSE_AT
# (``think#3``, ``booked``) with AGENT_PAUSE_FILE makes the process stop at that point,
# create the file and wait until it is removed, so a test can kill it there.


def _record_call(line: str) -> None:
    path = os.environ.get("AGENT_CALL_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


async def _pause_point(name: str) -> None:
    flag = os.environ.get("AGENT_PAUSE_FILE")
    if not flag or os.environ.get("AGENT_PAUSE_AT") != name:
        return
    Path(flag).write_text(str(os.getpid()), encoding="utf-8")
    while Path(flag).exists():
        await anyio.sleep(0.01)


if __name__ == "__main__":
    # Run as a script this file is the module __main__, and the log would name its
    # schemas __main__:AgentState. Running main from the module imported by its own name
    # keeps them agent:AgentState, so the log also replays where the plan is imported:
    # PYTHONPATH=examples python -m stroma replay runs/agent RUN_ID --plan agent:agent
    import agent as this_module

    sys.exit(this_module.main())
