"""OpenTelemetry, built in: the switch, and the names of what a traced run makes.

One switch turns it on: ``runner.with_tracing()`` (or ``RunConfig(tracing=True)`` for
``interpret``, ``simulate`` and ``execute_step``) uses the global tracer and meter
providers; ``with_tracing(tracer_provider=..., meter_provider=...)`` (or
``RunConfig(tracing=Tracing(...))``) uses yours. Only ``opentelemetry-api`` is needed
(``pip install 'stroma[otel]'``); the SDK and its exporters are your choice. With tracing
off nothing is imported, looked up or created.

A traced run makes, from the records of its effect log as they are appended (tracing is
told of the run; it decides nothing, and what it raises changes nothing):

* one span per run, ``stroma run``, a child of the caller's current span and the current
  span while the run goes (spans your nodes make nest under it); a run that stops without
  its Finish (cancelled, interrupted, a store that failed) has ``stroma.status``
  ``UNFINISHED``, its totals so far and the exception, and the attempt it was running is
  an ``unfinished`` attempt span (a group's: with an ``unfinished`` span for each child
  that had begun and not finished, and the spans of those that had finished);
* one span per node attempt, ``stroma node <node_id>``: retries are sibling spans; a
  failed attempt has status ERROR, its failure class and message and an ``exception``
  event; a hook that raised is a ``stroma.hook_failed`` event on it;
* one span per attempt of a group, ``stroma parallel <step_id>`` or ``stroma map
  <step_id>``, with one child span per child: a node child is a node attempt span, a
  child that is a whole plan is ``stroma child <child_id>`` with its nodes' attempts
  beneath it (one its group cancelled carries ``stroma.total_tokens`` and
  ``stroma.cost_usd`` when it had used any); a failed group attempt is ERROR with its
  failure class and message, an ``exception`` event and ``error.type`` (its first failed
  child's error, or the group's ``TimeoutError``);
* span events on the run's span (or a plan child's): ``stroma.backoff`` (the wait before a
  retry), ``stroma.budget_stop`` (a step not started because a budget was spent),
  ``stroma.branch`` (a branch's choice), ``stroma.checkpoint_loaded`` (a resume),
  ``stroma.route`` (the key a route's selector chose), ``stroma.loop`` (a loop's ``until``
  answer after an iteration), ``stroma.wait`` (an await_input found no input: the run ends
  WAITING, its span's ``stroma.status``) and ``stroma.input`` (the input was there);
* an attempt in a loop or a map_each carries ``stroma.iteration`` (of the innermost loop),
  ``stroma.item`` (of the innermost map_each) and ``stroma.where`` (all its coordinates,
  as ``TraceEvent.where`` writes them: ``agent#3/map_each(...)[2]``);
* metrics: ``stroma.node.duration`` (histogram, seconds), ``stroma.node.attempts``
  (counter, by node, outcome and failure class), ``stroma.tokens`` (counter, by
  ``gen_ai.token.type``) and ``stroma.cost`` (counter, USD).

Attributes use the names below; model and token usage follow the OpenTelemetry GenAI
semantic conventions (``gen_ai.request.model``, ``gen_ai.usage.input_tokens``,
``gen_ai.usage.output_tokens``). Span times are the run's own: an attempt's span starts
when the attempt started and lasts its recorded duration (virtual time under
``interpreters.simulate``).
"""

from __future__ import annotations

from typing import Any

import attrs

from stroma.errors import StromaTypeError

__all__ = (
    "ATTEMPT",
    "BACKOFF_EVENT",
    "BACKOFF_SECONDS",
    "BRANCH_EVENT",
    "BRANCH_TAKEN",
    "BUDGET_STOP_EVENT",
    "CHECKPOINT_FOUND",
    "CHECKPOINT_LOADED_EVENT",
    "CHILD_ID",
    "CHILD_INDEX",
    "COST",
    "COST_USD",
    "DIGEST",
    "ERROR_TYPE",
    "FAILURE_CLASS",
    "FAILURE_MESSAGE",
    "HOOK",
    "HOOK_FAILED_EVENT",
    "INPUT_EVENT",
    "INPUT_KEY",
    "INPUT_NAME",
    "INPUT_TOKENS",
    "ITEM",
    "ITEM_INDEX",
    "ITERATION",
    "KIND",
    "LATENCY_MS",
    "LOOP_DONE",
    "LOOP_EVENT",
    "MESSAGE",
    "MODEL",
    "NODE_ATTEMPTS",
    "NODE_DURATION",
    "NODE_ID",
    "OUTCOME",
    "OUTPUT_TOKENS",
    "REPLAYED",
    "ROUTE_EVENT",
    "ROUTE_KEY",
    "RUN_ID",
    "RUN_SPAN",
    "SCOPE",
    "STATUS",
    "STOP_REASON",
    "TIMEOUT_MS",
    "TOKENS",
    "TOKEN_TYPE",
    "TOTAL_TOKENS",
    "UNFINISHED",
    "WAIT_EVENT",
    "WHERE",
    "Tracing",
    "tracing_of",
)

SCOPE = "stroma"
"""The instrumentation scope (tracer and meter name)."""

RUN_SPAN = "stroma run"
"""The run's span; node attempts are ``stroma node <node_id>``, group attempts ``stroma
parallel <step_id>`` / ``stroma map <step_id>``, plan children ``stroma child <child_id>``."""

# -- span attributes
RUN_ID = "stroma.run_id"
NODE_ID = "stroma.node_id"  # a node's id, or a group's / branch's step id
ATTEMPT = "stroma.attempt"  # 1-based; a group child's is its group's attempt
ITEM_INDEX = "stroma.item_index"  # a map_each child: the index of its item
CHILD_INDEX = "stroma.child_index"  # a parallel child: its position in the group
CHILD_ID = "stroma.child_id"  # a child that is a whole plan, e.g. "pages[2]"
OUTCOME = "stroma.outcome"  # "succeeded", "failed", "cancelled" or "unfinished"
FAILURE_CLASS = "stroma.failure_class"  # RECOVERABLE, TERMINAL or AMBIGUOUS
FAILURE_MESSAGE = "stroma.failure_message"
ERROR_TYPE = "error.type"  # the exception's type, where the attempt raised one
TIMEOUT_MS = "stroma.timeout_ms"
MODEL = "gen_ai.request.model"
INPUT_TOKENS = "gen_ai.usage.input_tokens"
OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
COST_USD = "stroma.cost_usd"  # an attempt's cost (a run's: its total)
STATUS = "stroma.status"  # a run's (or plan child's) RunStatus, or UNFINISHED
UNFINISHED = "UNFINISHED"  # the status of a run that stopped without its Finish
TOTAL_TOKENS = "stroma.total_tokens"
LATENCY_MS = "stroma.latency_ms"
STOP_REASON = "stroma.stop_reason"
ITERATION = "stroma.iteration"  # the innermost loop's iteration (1-based), in a loop
ITEM = "stroma.item"  # the innermost map_each's item, in a map_each
WHERE = "stroma.where"  # every loop iteration and map item around it: "agent#3/m[2]"
ROUTE_KEY = "stroma.route_key"  # the key a route's selector chose
LOOP_DONE = "stroma.loop_done"  # a loop's until answer: True ends the loop
INPUT_NAME = "stroma.input_name"  # an await_input's name ("approval")
INPUT_KEY = "stroma.input_key"  # where its input is kept ("approval@agent#3")
DIGEST = "stroma.digest"  # the digest of the state a wait asks about
REPLAYED = "stroma.replayed"  # the run had finished before: its result came from its log

# -- span events and their attributes
BACKOFF_EVENT = "stroma.backoff"
BACKOFF_SECONDS = "stroma.backoff_seconds"
BUDGET_STOP_EVENT = "stroma.budget_stop"
MESSAGE = "stroma.message"
HOOK_FAILED_EVENT = "stroma.hook_failed"
HOOK = "stroma.hook"  # "start", "success" or "failure"
BRANCH_EVENT = "stroma.branch"
BRANCH_TAKEN = "stroma.branch_taken"
CHECKPOINT_LOADED_EVENT = "stroma.checkpoint_loaded"
CHECKPOINT_FOUND = "stroma.checkpoint_found"
ROUTE_EVENT = "stroma.route"
LOOP_EVENT = "stroma.loop"
WAIT_EVENT = "stroma.wait"
INPUT_EVENT = "stroma.input"

# -- metrics and their attributes (besides NODE_ID, OUTCOME, FAILURE_CLASS and MODEL)
NODE_DURATION = "stroma.node.duration"
NODE_ATTEMPTS = "stroma.node.attempts"
TOKENS = "stroma.tokens"
COST = "stroma.cost"
KIND = "stroma.kind"  # "node", "parallel", "map" or "branch" (a predicate that raised)
TOKEN_TYPE = "gen_ai.token.type"  # "input" or "output"


def _provider(kind: str, method: str, example: str) -> Any:
    def check(instance: Any, attribute: Any, value: Any) -> None:
        if value is None or callable(getattr(value, method, None)):
            return
        made = next((what for what, has in (("a Tracer", "start_span"),
                                             ("a Meter", "create_counter"))
                     if callable(getattr(value, has, None))), None)
        fix = (f"that is {made}, not a provider: pass the provider it came from"
               if made is not None else f"e.g. {attribute.name}={example}")
        raise StromaTypeError(
            f"{attribute.name} must be an OpenTelemetry {kind} (an object with {method}()) "
            f"or None for the global one, got {value!r:.80} (a {type(value).__name__}): "
            f"{fix}"
        )

    return check


@attrs.frozen
class Tracing:
    """Where a traced run's spans and metrics go.

    ``None`` stands for the global provider (``opentelemetry.trace.set_tracer_provider``,
    ``opentelemetry.metrics.set_meter_provider``), looked up when each run starts.
    ``RunConfig(tracing=True)`` is ``Tracing()``.
    """

    tracer_provider: Any = attrs.field(
        default=None,
        validator=_provider("TracerProvider", "get_tracer",
                            "opentelemetry.sdk.trace.TracerProvider()"),
    )
    meter_provider: Any = attrs.field(
        default=None,
        validator=_provider("MeterProvider", "get_meter",
                            "opentelemetry.sdk.metrics.MeterProvider()"),
    )


def tracing_of(value: Any, where: str = "RunConfig.tracing") -> Tracing | None:
    """What a ``tracing`` setting means: a ``Tracing``, or None when tracing is off.

    ``False`` and ``None`` are off, ``True`` is the global providers, a ``Tracing`` is
    itself; anything else is a TypeError saying what to pass.
    """
    if value is None or value is False:
        return None
    if value is True:
        return _GLOBAL
    if isinstance(value, Tracing):
        return value
    raise StromaTypeError(
        f"{where} must be True (the global OpenTelemetry providers), False (no tracing) or "
        f"a stroma.otel.Tracing, got {value!r:.80} (a {type(value).__name__}): e.g. "
        "tracing=True, or tracing=Tracing(tracer_provider=provider)"
    )


_GLOBAL = Tracing()
