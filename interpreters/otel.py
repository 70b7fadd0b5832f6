"""OpenTelemetry spans and metrics of a run, made from its records (``stroma.otel`` says
what they are and names them).

``RunTracer`` is the run's ``RunObserver`` (``interpreters.live``): the live loop tells it
of every record it appends, in order, and of how the run ended; a fan-out child's sub-plan
gets a child observer of its own. It decides nothing and changes nothing: it folds the
records into spans, the way the trace is a fold over the log. Every span is made with the
times the records carry (an attempt's ``started_at`` and ``duration_ms``), so it is made
when the attempt's account is complete: after its Commit or RecordAttempt, or after the
success or failure hook that follows it when the run has one. A group's span and its
children's spans are made when the group's record arrives; a sub-plan child's records wait
in its observer until then (its span's parent, the group attempt's span, exists only then).
A run that stops without its Finish is told (``stopped``) of the call in flight then: its
span is made when the run ends, ``unfinished``, from the last record's time to the end;
a group's (told first, ``stopped_in_group``, of its children that had begun) has a span
per node child that had begun: ``unfinished`` from when it began, or as it finished.

Importing this module needs ``opentelemetry-api``; nothing imports it unless tracing is
switched on.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

try:
    from opentelemetry import context as _context
    from opentelemetry import metrics as _metrics
    from opentelemetry import trace as _trace
    from opentelemetry.trace import Status, StatusCode
except ImportError as _missing:
    raise ImportError(
        "tracing (RunConfig(tracing=...) or StromaRunner.with_tracing()) needs "
        "opentelemetry-api, which is not installed: pip install 'stroma[otel]' (and an "
        "SDK such as opentelemetry-sdk to export the spans and metrics somewhere)"
    ) from _missing

from stroma import effects as fx
from stroma._version import __version__
from stroma.cost import estimate_cost_usd
from stroma.machine import _child_outcome, failed_child
from stroma.otel import (
    ATTEMPT,
    BACKOFF_EVENT,
    BACKOFF_SECONDS,
    BRANCH_EVENT,
    BRANCH_TAKEN,
    BUDGET_STOP_EVENT,
    CHECKPOINT_FOUND,
    CHECKPOINT_LOADED_EVENT,
    CHILD_ID,
    CHILD_INDEX,
    COST,
    COST_USD,
    DIGEST,
    ERROR_TYPE,
    FAILURE_CLASS,
    FAILURE_MESSAGE,
    HOOK,
    HOOK_FAILED_EVENT,
    INPUT_EVENT,
    INPUT_KEY,
    INPUT_NAME,
    INPUT_TOKENS,
    ITEM,
    ITEM_INDEX,
    ITERATION,
    KIND,
    LATENCY_MS,
    LOOP_DONE,
    LOOP_EVENT,
    MESSAGE,
    MODEL,
    NODE_ATTEMPTS,
    NODE_DURATION,
    NODE_ID,
    OUTCOME,
    OUTPUT_TOKENS,
    REPLAYED,
    ROUTE_EVENT,
    ROUTE_KEY,
    RUN_ID,
    RUN_SPAN,
    SCOPE,
    STATUS,
    STOP_REASON,
    TIMEOUT_MS,
    TOKEN_TYPE,
    TOKENS,
    TOTAL_TOKENS,
    UNFINISHED,
    WAIT_EVENT,
    WHERE,
    Tracing,
)
from stroma.plan import LoopStart, MapStep, ParallelStep
from stroma.trace import RunStatus

__all__ = ("RunTracer",)

_log = logging.getLogger("stroma")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_OK = Status(StatusCode.OK)
_DONE = (RunStatus.COMPLETED, RunStatus.RESUMED)
# The GenAI semantic conventions' advice for operation durations, in seconds.
_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
            40.96, 81.92)


def _ns(at: datetime) -> int:
    """An aware datetime as nanoseconds since the epoch (exact to the microsecond)."""
    return (at - _EPOCH) // _MICROSECOND * 1000


def _type_name(error: fx.ErrorInfo) -> str:
    """An error's type as OpenTelemetry writes it: qualified, builtins unqualified."""
    name = error.type_name
    return name[len("builtins."):] if name.startswith("builtins.") else name


def _quietly(fn: Callable[..., Any], *args: Any) -> None:
    try:
        fn(*args)
    except Exception as exc:  # tracing never changes the run
        _log.warning("tracing raised %r; the run goes on", exc)


# ------------------------------------------------------------------ tracer and meter


class _Telemetry:
    """The tracer and instruments of one pair of providers."""

    __slots__ = ("attempts", "cost", "duration", "tokens", "tracer")

    def __init__(self, tracer_provider: Any, meter_provider: Any) -> None:
        self.tracer = tracer_provider.get_tracer(SCOPE, __version__)
        meter = meter_provider.get_meter(SCOPE, __version__)
        description = "How long a node attempt (or a group's attempt) took"
        try:
            self.duration = meter.create_histogram(
                NODE_DURATION, unit="s", description=description,
                explicit_bucket_boundaries_advisory=_BUCKETS,
            )
        except TypeError:  # an opentelemetry-api before 1.23 takes no advice
            self.duration = meter.create_histogram(NODE_DURATION, unit="s",
                                                   description=description)
        self.attempts = meter.create_counter(
            NODE_ATTEMPTS, unit="{attempt}",
            description="Node attempts, by node, outcome and failure class",
        )
        self.tokens = meter.create_counter(
            TOKENS, unit="{token}", description="Tokens the nodes reported, input and output"
        )
        self.cost = meter.create_counter(
            COST, unit="USD", description="What the nodes' tokens cost (stroma.cost prices)"
        )


_TELEMETRY: dict[tuple[int, int], tuple[Any, Any, _Telemetry]] = {}

_SECOND = 1_000_000_000


class _Counts:
    """A run's counter increments, added to the counters together: when the run ends, and
    whenever a second of the run's time has passed since the last time (an add costs the
    SDK microseconds, and an attempt makes up to four; a metric reader collects far less
    often than once a second)."""

    __slots__ = ("flushed_at", "pending", "tel")

    def __init__(self, tel: _Telemetry) -> None:
        self.tel = tel
        self.pending: dict[tuple[Any, ...], float] = {}
        self.flushed_at: int | None = None

    def add(self, key: tuple[Any, ...], amount: float) -> None:
        pending = self.pending
        pending[key] = pending.get(key, 0) + amount

    def tick(self, at: int) -> None:
        """The run's time is ``at`` (ns): add what is pending once a second has passed."""
        if self.flushed_at is None:
            self.flushed_at = at
        elif at - self.flushed_at >= _SECOND:
            self.flush()
            self.flushed_at = at

    def flush(self) -> None:
        pending, self.pending = self.pending, {}
        tel = self.tel
        for key, amount in pending.items():
            what = key[0]
            if what == "attempts":
                _, node_id, kind, outcome, failure = key
                attributes: dict[str, Any] = {NODE_ID: node_id, KIND: kind, OUTCOME: outcome}
                if failure is not None:
                    attributes[FAILURE_CLASS] = failure
                tel.attempts.add(int(amount), attributes)
                continue
            _, node_id, model, token_type = key
            attributes = {NODE_ID: node_id}
            if model is not None:
                attributes[MODEL] = model
            if what == "tokens":
                attributes[TOKEN_TYPE] = token_type
                tel.tokens.add(int(amount), attributes)
            else:
                tel.cost.add(amount, attributes)


def _telemetry(tracing: Tracing) -> _Telemetry:
    """The tracer and instruments for ``tracing``'s providers (the global ones for None),
    made once per pair of providers."""
    tp = tracing.tracer_provider
    mp = tracing.meter_provider
    if tp is None:
        tp = _trace.get_tracer_provider()
    if mp is None:
        mp = _metrics.get_meter_provider()
    key = (id(tp), id(mp))
    hit = _TELEMETRY.get(key)
    if hit is not None and hit[0]() is tp and hit[1]() is mp:
        return hit[2]
    made = _Telemetry(tp, mp)
    try:
        refs = (weakref.ref(tp), weakref.ref(mp))
    except TypeError:  # a provider that takes no weak reference: not kept
        return made
    if len(_TELEMETRY) >= 64:
        _TELEMETRY.clear()
    _TELEMETRY[key] = (*refs, made)
    return made


# ------------------------------------------------------------------------- attempts


class _Attempt:
    """An attempt whose span is not made yet: what its records said so far."""

    __slots__ = ("call", "coords", "duration_ms", "error", "event", "failure", "hooks",
                 "kind", "message", "node_id", "number", "start", "succeeded")

    def __init__(
        self, kind: str, node_id: str, number: int, start: datetime, duration_ms: int,
        call: Any = None, event: Any = None, hooks: list[tuple[str, fx.ErrorInfo]] | None = None,
    ) -> None:
        self.kind = kind  # "node", "group" or "branch"
        self.node_id = node_id
        self.number = number
        self.start = start
        self.duration_ms = duration_ms
        self.call = call
        self.event = event
        self.hooks = hooks if hooks is not None else []
        self.failure: Any = None
        self.message: str | None = None
        # The error the machine failed the attempt with (live runs; None when replayed).
        self.error: fx.ErrorInfo | None = None
        self.succeeded = False
        self.coords: tuple[tuple[str, str, int], ...] = getattr(call, "coords", None) or ()


def _where(coords: Any) -> dict[str, Any]:
    """An attempt's place in loops and maps as attributes (none at the top)."""
    if not coords:
        return {}
    attributes: dict[str, Any] = {WHERE: "/".join(
        f"{step}#{n}" if kind == "loop" else f"{step}[{n}]" for kind, step, n in coords)}
    iteration = next((n for kind, _, n in reversed(coords) if kind == "loop"), None)
    item = next((n for kind, _, n in reversed(coords) if kind == "item"), None)
    if iteration is not None:
        attributes[ITERATION] = iteration
    if item is not None:
        attributes[ITEM] = item
    return attributes


def _usage(call: Any, event: Any) -> tuple[dict[str, Any], str | None, int, int, float] | None:
    """A returned call's usage attributes, model, tokens and cost (priced as the machine
    prices it: the model the call was given, else the one the node reported); None when
    the node reported no usage."""
    model = (call.model if call is not None else None) or event.model
    tin, tout = event.input_tokens, event.output_tokens
    if not (tin or tout or model):
        return None
    cost = estimate_cost_usd(model, tin, tout) if (tin or tout) else 0.0
    attributes: dict[str, Any] = {INPUT_TOKENS: tin, OUTPUT_TOKENS: tout, COST_USD: cost}
    if model is not None:
        attributes[MODEL] = model
    return attributes, model, tin, tout, cost


def _exception_event(span: Any, error: fx.ErrorInfo | None, message: str | None,
                     at: int) -> None:
    """The attempt's ``exception`` event: the live exception with its stack, else its
    recorded type and message, else the failure message alone."""
    if error is not None and error.exc is not None:
        span.record_exception(error.exc, timestamp=at)
    elif error is not None:
        span.add_event("exception", {"exception.type": _type_name(error),
                                     "exception.message": error.message}, timestamp=at)
    else:
        span.add_event("exception", {"exception.message": message or ""}, timestamp=at)


def _finished(attributes: dict[str, Any], status: RunStatus, tokens: int, cost: float,
              latency_ms: int, reason: str | None) -> Status:
    """A run's (or plan child's) end as attributes, and its span status."""
    attributes[STATUS] = status.value
    attributes[TOTAL_TOKENS] = tokens
    attributes[COST_USD] = cost
    attributes[LATENCY_MS] = latency_ms
    if reason is not None:
        attributes[STOP_REASON] = reason
    if status in _DONE:
        return _OK
    if status is RunStatus.WAITING:  # not an error: it goes on once its input is sent
        return Status(StatusCode.UNSET)
    return Status(StatusCode.ERROR, reason or status.value)


# ---------------------------------------------------------------------------- scopes

# Records without a time of their own.
_TIMED = frozenset({fx.Sleep, fx.ChooseBranch, fx.ChooseRoute, fx.LoadCheckpoint})


class _Scope:
    """The spans of one plan's records (the run's, or a fan-out child's sub-plan) under
    the scope's span. Records told before that span exists (a sub-plan child's, whose
    group span is made when the group's record arrives) wait in ``buffer``."""

    def __init__(
        self, tel: _Telemetry, run_id: str, hooks: frozenset[str],
        clock: Callable[[], datetime], plan: Any, counts: _Counts, call: Any = None,
        started: datetime | None = None,
    ) -> None:
        self.tel = tel
        self.counts = counts  # the run's, shared by its children's scopes
        self.run_id = run_id
        self.hooks = hooks  # which hooks the run has: an attempt's account ends after them
        self.clock = clock
        self.plan = plan
        self.call = call  # a child's RunPlan
        self.started = started
        self.span: Any = None
        self.ctx: Any = None
        self.buffer: list[tuple[Any, Any, datetime | None]] = []
        self.current: _Attempt | None = None
        self.start_hooks: list[tuple[str, fx.ErrorInfo]] = []
        self.children: dict[int, _Scope] = {}
        self.finish: fx.Finish | None = None
        self.error: BaseException | None = None
        self.ended_at: datetime | None = None
        self.last: tuple[str, int] | None = None  # the last attempt's node and number
        self.last_end: int | None = None  # and when it ended (ns)
        self.failed_branch: str | None = None
        # The latest end of a span made in this scope (ns): the scope's own span ends no
        # sooner (recorded durations are whole milliseconds, cut short, so a child's end
        # can be later than its parent's start plus its parent's duration).
        self.latest = 0
        self._groups: dict[str, Any] | None = None
        self._loops: set[str] | None = None
        self.coords: tuple[tuple[str, str, int], ...] = ()  # the last step record's
        self.routes: list[tuple[dict[str, Any], datetime | None]] = []  # to place
        self.told_at: datetime | None = None  # when the last record was told
        # The run stopped without its Finish: the call then in flight and when it began
        # (the last record's time: the loop performs the next effect at once), and the
        # run's totals so far.
        self.in_flight: tuple[Any, datetime] | None = None
        self.totals: tuple[int, float, int] | None = None
        # And, that call a group: its children that had begun or finished then, as
        # ``(child index, call, began_at, outcome or None)``.
        self.in_group: tuple[Any, tuple[tuple[int, Any, Any, Any], ...]] | None = None

    # -- the RunObserver protocol

    def record(self, effect: Any, event: Any) -> None:
        self.told_at = told = self.clock()
        now = told if type(effect) in _TIMED else None
        if self.span is None:
            self.buffer.append((effect, event, now))
            return
        handler = _HANDLERS.get(type(effect))
        if handler is not None:
            handler(self, effect, event, now)

    def child(self, call: Any, started: datetime) -> _Scope:
        scope = _Scope(self.tel, self.run_id, self.hooks, self.clock,
                       getattr(call, "plan", None), self.counts, call, started)
        self.children[id(call)] = scope
        return scope

    def ended(self, finish: Any | None, error: BaseException | None) -> None:
        if finish is not None:
            self.finish = finish
        self.error = error
        self.ended_at = self.clock()

    def stopped(self, effect: Any, tokens: int, cost_usd: float, latency_ms: int) -> None:
        """The run stops without its Finish (``ended`` follows): the call in flight then,
        if one was, becomes an ``unfinished`` attempt span when the scope closes."""
        if type(effect) is fx.CallNode or type(effect) is fx.CallParallel:
            self.in_flight = (effect, self.told_at or self.started or self.clock())
        self.totals = (tokens, cost_usd, latency_ms)

    def stopped_in_group(self, effect: Any, children: Any) -> None:
        """The run stops inside the group ``effect`` (``stopped`` follows): its children
        that had begun or finished; its node children's spans are made with the group's."""
        self.in_group = (effect, tuple(children))

    # -- spans

    def attach(self, span: Any) -> None:
        """The scope's span exists: the records told so far become spans beneath it."""
        self.span = span
        self.ctx = _trace.set_span_in_context(span)
        buffered, self.buffer = self.buffer, []
        for effect, event, now in buffered:
            handler = _HANDLERS.get(type(effect))
            if handler is not None:
                handler(self, effect, event, now)

    def close_all(self) -> None:
        """The scope's records are all in: the open attempt's span, the span of the call
        in flight when the run stopped (``unfinished``), and spans for children of a group
        whose record never came (the run ended inside the group: beneath its span)."""
        self._close()
        if self.in_flight is not None:
            eff, began = self.in_flight
            self.in_flight = None
            end = self.ended_at or self.clock()
            duration_ms = max(0, (end - began) // timedelta(milliseconds=1))
            hooks = self._take_start_hooks()
            if type(eff) is fx.CallNode:
                self._placed(eff.coords)
                self.current = _Attempt("node", eff.node_id, eff.attempt, began,
                                        duration_ms, eff, None, hooks)
            else:
                self.current = _Attempt("group", eff.step_id, eff.attempt, began,
                                        duration_ms, eff, None, hooks)
            self._close()
        self.latest = max(self.latest, self._unfinished_children(self.ctx))

    def _unfinished_children(self, parent: Any) -> int:
        """Spans, under ``parent``, for the sub-plan children of a group whose record
        never came; returns the latest end of them (0: none)."""
        latest = 0
        for scope in sorted(self.children.values(), key=_child_order):
            call = scope.call
            start = scope.started or self.clock()
            attributes: dict[str, Any] = {RUN_ID: self.run_id, CHILD_ID: call.child_id,
                                          ATTEMPT: call.attempt}
            finish = scope.finish
            if finish is not None:  # it finished; its group did not
                attributes[OUTCOME] = "succeeded" if finish.status in _DONE else "failed"
                status = _finished(attributes, finish.status, finish.total_tokens,
                                   finish.total_cost_usd, finish.total_latency_ms,
                                   finish.reason)
            else:
                attributes[OUTCOME] = "unfinished"
                why = "the run ended before the child did"
                if scope.error is not None:
                    why += f" ({type(scope.error).__name__})"
                status = Status(StatusCode.ERROR, why)
            span = self.tel.tracer.start_span(f"stroma child {call.child_id}",
                                              context=parent, start_time=_ns(start),
                                              attributes=attributes)
            scope.attach(span)
            scope.close_all()
            span.set_status(status)
            end = max(_ns(scope.ended_at or self.clock()), scope.latest)
            span.end(end_time=end)
            latest = max(latest, end)
        self.children.clear()
        return latest

    def _unfinished_status(self) -> Status:
        why = "the run ended before the attempt's account was recorded"
        if self.error is not None:
            why += f" ({type(self.error).__name__})"
        return Status(StatusCode.ERROR, why)

    def _close(self) -> None:
        att = self.current
        if att is None:
            return
        self.current = None
        if att.kind == "group":
            self._group_span(att)
        else:
            self._node_span(att)
        self.last = (att.node_id, att.number)
        self.last_end = _ns(att.start) + att.duration_ms * 1_000_000

    def _take_start_hooks(self) -> list[tuple[str, fx.ErrorInfo]]:
        hooks, self.start_hooks = self.start_hooks, []
        return hooks

    def _mine(self, node_id: str, number: int) -> _Attempt | None:
        att = self.current
        if att is not None and att.node_id == node_id and att.number == number:
            return att
        return None

    def _event(self, name: str, attributes: dict[str, Any], at: datetime | None) -> None:
        when = _ns(at) if at is not None else self.last_end
        self.span.add_event(name, attributes, timestamp=when)

    # -- records

    def _on_call(self, eff: fx.CallNode, ev: Any, now: datetime | None) -> None:
        self._close()
        self._placed(eff.coords)
        self.current = _Attempt("node", eff.node_id, eff.attempt, ev.started_at,
                                ev.duration_ms, eff, ev, self._take_start_hooks())

    def _on_group(self, eff: fx.CallParallel, ev: fx.ParallelReturned,
                  now: datetime | None) -> None:
        self._close()
        self.current = _Attempt("group", eff.step_id, eff.attempt, ev.started_at,
                                ev.duration_ms, eff, ev, self._take_start_hooks())

    def _on_commit(self, eff: fx.Commit, ev: None, now: datetime | None) -> None:
        self._placed(eff.coords)
        att = self._mine(eff.node_id, eff.attempt)
        if att is not None and eff.coords:
            att.coords = eff.coords
        if att is None:
            self._close()
            return
        att.succeeded = True
        if "success" not in self.hooks:
            self._close()

    def _on_record_attempt(self, eff: fx.RecordAttempt, ev: None,
                           now: datetime | None) -> None:
        self._placed(eff.coords)
        att = self._mine(eff.node_id, eff.attempt)
        if att is None or att.succeeded or att.failure is not None:
            self._close()
            message = eff.failure_message or ""
            if message.startswith("budget spent"):
                # A budget stop: the step was not started. An event, not an attempt.
                self._event(BUDGET_STOP_EVENT, {NODE_ID: eff.node_id, ATTEMPT: eff.attempt,
                                                MESSAGE: message}, eff.timestamp_utc)
                return
            # An attempt that failed without a call: an input that broke its contract,
            # or a branch whose predicate raised.
            kind = "branch" if self.failed_branch == eff.node_id else "node"
            att = _Attempt(kind, eff.node_id, eff.attempt, eff.timestamp_utc,
                           eff.duration_ms, hooks=self._take_start_hooks())
            self.current = att
        if eff.coords:
            att.coords = eff.coords
        att.failure = eff.failure
        att.message = eff.failure_message
        att.error = eff.error
        if att.kind == "branch" or "failure" not in self.hooks:
            self._close()

    def _on_hook(self, eff: fx.FireHook, ev: fx.HookFired, now: datetime | None) -> None:
        if eff.kind == "start":  # before the attempt's call: it opens the next attempt
            self._close()
            if ev.error is not None:
                self.start_hooks.append(("start", ev.error))
            return
        att = self._mine(eff.node_id, eff.attempt)
        if att is None:
            if ev.error is not None:
                self._event(HOOK_FAILED_EVENT, _hook_attributes(eff.kind, ev.error), None)
            return
        if ev.error is not None:
            att.hooks.append((eff.kind, ev.error))
        self._close()  # the success or failure hook is the attempt's last record

    def _on_sleep(self, eff: fx.Sleep, ev: fx.Slept, now: datetime | None) -> None:
        self._close()
        attributes: dict[str, Any] = {BACKOFF_SECONDS: eff.seconds}
        if self.last is not None:  # the wait before the next attempt of the last node
            attributes[NODE_ID] = self.last[0]
            attributes[ATTEMPT] = self.last[1] + 1
        # It began when the last attempt's account ended: the clock now, less the wait
        # (never before the attempt's end, if the sleep took less than it asked).
        when = self.last_end
        if now is not None:
            began = _ns(now - timedelta(seconds=eff.seconds))
            when = began if when is None else max(when, began)
        self.span.add_event(BACKOFF_EVENT, attributes, timestamp=when)

    def _on_branch(self, eff: fx.ChooseBranch, ev: fx.BranchChosen,
                   now: datetime | None) -> None:
        self._close()
        if ev.error is None and eff.step_id in self._loop_ids():
            # A loop's until, asked after the iteration the last step record was in.
            n = next((n for kind, step, n in self.coords
                      if kind == "loop" and step == eff.step_id), None)
            done: dict[str, Any] = {NODE_ID: eff.step_id, LOOP_DONE: ev.taken}
            if n is not None:
                at = self.coords[:next(i for i, c in enumerate(self.coords)
                                       if c[1] == eff.step_id) + 1]
                done.update(_where(at))
            self._event(LOOP_EVENT, done, now)
            return
        attributes: dict[str, Any] = {NODE_ID: eff.step_id, BRANCH_TAKEN: ev.taken}
        if ev.error is not None:
            attributes[MESSAGE] = ev.error.short
            self.failed_branch = eff.step_id
        self._event(BRANCH_EVENT, attributes, now)

    def _on_route(self, eff: fx.ChooseRoute, ev: fx.RouteChosen, now: datetime | None) -> None:
        """A route's choice: an event once the step it chose shows where it is."""
        self._close()
        attributes: dict[str, Any] = {NODE_ID: eff.step_id}
        if ev.key is not None:
            attributes[ROUTE_KEY] = ev.key
        if ev.error is not None:
            attributes[MESSAGE] = ev.error.short
            self.failed_branch = eff.step_id
        self.routes.append((attributes, now))

    def _on_wait(self, eff: fx.AwaitInput, ev: Any, now: datetime | None) -> None:
        """An await_input: ``stroma.input`` when the input was there, ``stroma.wait`` when
        it was not (the run ends WAITING)."""
        self._close()
        self._placed(eff.coords)
        attributes: dict[str, Any] = {NODE_ID: eff.step_id, INPUT_NAME: eff.name,
                                      INPUT_KEY: eff.key, DIGEST: eff.digest,
                                      **_where(eff.coords)}
        if eff.timeout_ms is not None:
            attributes[TIMEOUT_MS] = eff.timeout_ms
        name = INPUT_EVENT if type(ev) is fx.InputReceived else WAIT_EVENT
        self._event(name, attributes, getattr(ev, "at", None))

    def _placed(self, coords: Any) -> None:
        """The step after a route's choice began: the choice's events, with its place."""
        if coords:
            self.coords = coords
            if self._loops is not None:
                self._loops.update(step for kind, step, _ in coords if kind == "loop")
        if not self.routes:
            return
        routes, self.routes = self.routes, []
        for attributes, at in routes:
            self._event(ROUTE_EVENT, {**attributes, **_where(coords)}, at)

    def _loop_ids(self) -> set[str]:
        """The loops of the scope's plan, and those its records' coordinates named."""
        if self._loops is None:
            program = getattr(self.plan, "program", ())
            self._loops = {ins.step_id for ins in program if isinstance(ins, LoopStart)}
            self._loops.update(step for kind, step, _ in self.coords if kind == "loop")
        return self._loops

    def _on_load(self, eff: fx.LoadCheckpoint, ev: fx.CheckpointLoaded,
                 now: datetime | None) -> None:
        self._close()
        self._event(CHECKPOINT_LOADED_EVENT,
                    {NODE_ID: eff.node_id, CHECKPOINT_FOUND: ev.state is not None}, now)

    def _on_finish(self, eff: fx.Finish, ev: None, now: datetime | None) -> None:
        self._close()
        self._placed(())
        self.finish = eff

    def _on_other(self, eff: Any, ev: Any, now: datetime | None) -> None:
        """ClassifyFailure: the failure's class comes with the RecordAttempt after it."""

    # -- making the spans

    def _node_span(self, att: _Attempt) -> None:
        """The span of a node attempt (or a branch whose predicate raised)."""
        start = _ns(att.start)
        end = start + att.duration_ms * 1_000_000
        call, ev = att.call, att.event
        attributes: dict[str, Any] = {RUN_ID: self.run_id, NODE_ID: att.node_id,
                                      ATTEMPT: att.number, **_where(att.coords)}
        if call is not None and call.timeout_ms is not None:
            attributes[TIMEOUT_MS] = call.timeout_ms
        usage = _usage(call, ev) if type(ev) is fx.NodeReturned else None
        if usage is not None:
            attributes.update(usage[0])
        # (an output that broke its contract, came too late or cannot be stored: the
        # machine's error, as the attempt's account carried it)
        error = ev.error if type(ev) is fx.NodeRaised else att.error
        if att.succeeded:
            outcome = "succeeded"
        elif att.failure is not None:
            outcome = "failed"
            attributes[FAILURE_CLASS] = att.failure.value
            attributes[FAILURE_MESSAGE] = att.message or ""
            if error is not None:
                attributes[ERROR_TYPE] = _type_name(error)
        else:
            outcome = "unfinished"
        attributes[OUTCOME] = outcome
        name = f"stroma {'branch' if att.kind == 'branch' else 'node'} {att.node_id}"
        span = self.tel.tracer.start_span(name, context=self.ctx, start_time=start,
                                          attributes=attributes)
        _hook_events(span, att.hooks, start, True)
        if outcome == "failed":
            _exception_event(span, error, att.message, end)
        _hook_events(span, att.hooks, end, False)
        if outcome == "failed":
            span.set_status(Status(StatusCode.ERROR, att.message or "failed"))
        elif outcome == "succeeded":
            span.set_status(_OK)
        else:
            span.set_status(self._unfinished_status())
        span.end(end_time=end)
        self.latest = max(self.latest, end)
        self._measure(att.kind, att.node_id, outcome, att.failure, att.duration_ms, usage, end)

    def _group_span(self, att: _Attempt) -> None:
        """The span of a group's attempt, with one span per child beneath it."""
        eff: fx.CallParallel = att.call
        ev: fx.ParallelReturned | None = att.event  # (None: in flight when the run stopped)
        group = eff.group if eff.group is not None else self._group_step(eff.step_id)
        start = _ns(att.start)
        end = start + att.duration_ms * 1_000_000
        attributes: dict[str, Any] = {RUN_ID: self.run_id, NODE_ID: eff.step_id,
                                      ATTEMPT: att.number, **_where(att.coords)}
        if eff.timeout_ms is not None:
            attributes[TIMEOUT_MS] = eff.timeout_ms
        if att.succeeded:
            outcome = "succeeded"
        elif att.failure is not None:
            outcome = "failed"
            attributes[FAILURE_CLASS] = att.failure.value
            attributes[FAILURE_MESSAGE] = att.message or ""
        else:
            outcome = "unfinished"
        attributes[OUTCOME] = outcome
        span = self.tel.tracer.start_span(f"stroma {eff.kind} {eff.step_id}", context=self.ctx,
                                          start_time=start, attributes=attributes)
        ctx = _trace.set_span_in_context(span)
        first_failed = (failed_child(group, eff, ev) if group is not None and ev is not None
                        else None)
        failing_error: fx.ErrorInfo | None = None
        if ev is None:  # in flight when the run stopped: its children so far
            end = max(end, self._stopped_node_children(ctx, eff, att, group),
                      self._unfinished_children(ctx))
        else:
            for k, (call, child_outcome) in enumerate(zip(eff.calls, ev.outcomes,
                                                          strict=False)):
                index = eff.indices[k] if k < len(eff.indices) else k
                error, child_end = self._child_span(
                    ctx, eff, ev.started_at, ev.deadline_passed, index, call,
                    child_outcome, group, att.failure if index == first_failed else None,
                    first_failed, att.coords,
                )
                end = max(end, child_end)
                if index == first_failed:
                    failing_error = error
        _hook_events(span, att.hooks, start, True)
        if outcome == "failed":
            # The error is the first failed child's; a group that timed out has the
            # machine's (its timeout), as its account carried it.
            error = failing_error if failing_error is not None else att.error
            if error is not None:
                span.set_attribute(ERROR_TYPE, _type_name(error))
            _exception_event(span, error, att.message, end)
        _hook_events(span, att.hooks, end, False)
        if outcome == "failed":
            span.set_status(Status(StatusCode.ERROR, att.message or "failed"))
        elif outcome == "succeeded":
            span.set_status(_OK)
        else:
            span.set_status(self._unfinished_status())
        span.end(end_time=end)
        self.latest = max(self.latest, end)
        self._measure(eff.kind, eff.step_id, outcome, att.failure, att.duration_ms, None, end)

    def _stopped_node_children(self, parent: Any, eff: fx.CallParallel, att: _Attempt,
                               group: Any) -> int:
        """Spans, under ``parent``, for the node children of the group ``eff`` that the
        run stopped inside: each that finished by its outcome, each that had begun and not
        finished ``unfinished`` (from when it began to the run's end); returns the latest
        end of them (0: none). Sub-plan children have scopes of their own."""
        in_group, self.in_group = self.in_group, None
        if in_group is None or in_group[0] is not eff:
            return 0
        latest = 0
        where = ITEM_INDEX if eff.kind == "map" else CHILD_INDEX
        for index, call, began, outcome in sorted(in_group[1], key=lambda c: c[0]):
            if type(call) is not fx.CallNode:
                continue
            if outcome is not None:
                _, end = self._child_span(parent, eff, att.start, False, index, call,
                                          outcome, group, None, None, att.coords)
                latest = max(latest, end)
                continue
            start = _ns(began)
            end = max(start, _ns(self.ended_at or self.clock()))
            attributes: dict[str, Any] = {RUN_ID: self.run_id, NODE_ID: call.node_id,
                                          ATTEMPT: call.attempt, where: index,
                                          **_where(call.coords)}
            if call.timeout_ms is not None:
                attributes[TIMEOUT_MS] = call.timeout_ms
            attributes[OUTCOME] = "unfinished"
            span = self.tel.tracer.start_span(f"stroma node {call.node_id}", context=parent,
                                              start_time=start, attributes=attributes)
            span.set_status(self._unfinished_status())
            span.end(end_time=end)
            latest = max(latest, end)
            self._measure("node", call.node_id, "unfinished", None,
                          (end - start) // 1_000_000, None, end)
        return latest

    def _child_span(
        self, parent: Any, eff: fx.CallParallel, group_start: datetime,
        deadline_passed: bool, index: int, call: Any, outcome: Any, group: Any,
        failure: Any, first_failed: int | None, coords: Any = (),
    ) -> tuple[fx.ErrorInfo | None, int]:
        """One child's span under its group's (which began at ``group_start``; its
        timeout passed: ``deadline_passed``): a node attempt, or a plan child with its
        nodes' spans beneath it. Returns why the child failed (None: it did not) and when
        its span ended."""
        cancelled = type(outcome) is fx.NodeCancelled
        error: fx.ErrorInfo | None = None
        if not cancelled:
            if group is not None:
                node = group.child_node(getattr(call, "node_id", ""))
                _, error = _child_outcome(call, node, outcome)
            elif type(outcome) is fx.NodeRaised:
                error = outcome.error
            elif type(outcome) is fx.PlanFinished and outcome.status not in _DONE:
                error = fx.ErrorInfo(("stroma.errors.ChildFailed",),
                                     f"{call.child_id} {outcome.status}: {outcome.reason}")
        began = getattr(outcome, "started_at", None) or group_start
        start = _ns(began)
        end = start + outcome.duration_ms * 1_000_000
        where = ITEM_INDEX if eff.kind == "map" else CHILD_INDEX
        outcome_name = "cancelled" if cancelled else "failed" if error is not None else (
            "succeeded"
        )
        attributes: dict[str, Any] = {RUN_ID: self.run_id}
        usage = None
        scope: _Scope | None = None
        if type(call) is fx.CallNode:
            name = f"stroma node {call.node_id}"
            attributes[NODE_ID] = call.node_id
            attributes[ATTEMPT] = call.attempt
            attributes[where] = index
            attributes.update(_where(call.coords))
            if call.timeout_ms is not None:
                attributes[TIMEOUT_MS] = call.timeout_ms
            if type(outcome) is fx.NodeReturned:
                usage = _usage(call, outcome)
                if usage is not None:
                    attributes.update(usage[0])
        else:
            name = f"stroma child {call.child_id}"
            attributes[CHILD_ID] = call.child_id
            attributes[ATTEMPT] = call.attempt
            attributes[where] = index
            attributes.update(_where((*coords, ("item", eff.step_id, index))
                                     if eff.kind == "map" else coords))
            scope = self.children.pop(id(call), None)
            if scope is None:  # finished in an earlier session: read from its records
                scope = _Scope(self.tel, self.run_id, self.hooks, self.clock,
                               getattr(call, "plan", None), self.counts, call)
                for record in getattr(outcome, "records", None) or ():
                    if type(record) is tuple:
                        scope.buffer.append((record[0], record[1], None))
        if failure is not None:
            attributes[FAILURE_CLASS] = failure.value
        if error is not None:
            attributes[FAILURE_MESSAGE] = error.message
            attributes[ERROR_TYPE] = _type_name(error)
        attributes[OUTCOME] = outcome_name
        status = _OK
        if type(outcome) is fx.PlanFinished:
            status = _finished(attributes, outcome.status, outcome.total_tokens,
                               outcome.total_cost_usd, outcome.total_latency_ms,
                               outcome.reason)
        elif cancelled and scope is not None and (outcome.total_tokens
                                                  or outcome.total_cost_usd):
            # A sub-plan child cut short: what it had used until then (its run counted it).
            attributes[TOTAL_TOKENS] = outcome.total_tokens
            attributes[COST_USD] = outcome.total_cost_usd
        span = self.tel.tracer.start_span(name, context=parent, start_time=start,
                                          attributes=attributes)
        if scope is not None:
            scope.attach(span)
            scope.close_all()
            end = max(end, scope.latest)
        if error is not None:
            _exception_event(span, error, error.message, end)
            span.set_status(Status(StatusCode.ERROR, error.message))
        elif cancelled:
            why = ("the group's timeout passed" if deadline_passed
                   else f"child {first_failed} failed" if first_failed is not None
                   else "the group was cancelled")
            span.set_status(Status(StatusCode.ERROR, f"cancelled: {why}"))
        else:
            span.set_status(status)
        span.end(end_time=end)
        if type(call) is fx.CallNode:
            self._measure("node", call.node_id, outcome_name, failure, outcome.duration_ms,
                          usage, end)
        return error, end

    def _group_step(self, step_id: str) -> Any:
        """A group step of the scope's plan by its id (for records read from a log,
        whose group calls do not carry their step)."""
        if self._groups is None:
            program = getattr(self.plan, "program", ())
            self._groups = {ins.step_id: ins for ins in program
                            if isinstance(ins, ParallelStep | MapStep)}
        return self._groups.get(step_id)

    def _measure(self, kind: str, node_id: str, outcome: str, failure: Any,
                 duration_ms: int, usage: Any, end: int) -> None:
        """An attempt's duration (recorded now) and its counts (added with the run's)."""
        failure_class = None if failure is None else failure.value
        attributes: dict[str, Any] = {NODE_ID: node_id, KIND: kind, OUTCOME: outcome}
        if failure_class is not None:
            attributes[FAILURE_CLASS] = failure_class
        self.tel.duration.record(duration_ms / 1000, attributes)
        counts = self.counts
        counts.add(("attempts", node_id, kind, outcome, failure_class), 1)
        if usage is not None:
            _, model, tin, tout, cost = usage
            if tin:
                counts.add(("tokens", node_id, model, "input"), tin)
            if tout:
                counts.add(("tokens", node_id, model, "output"), tout)
            if cost:
                counts.add(("cost", node_id, model, None), cost)
        counts.tick(end)


def _child_order(scope: _Scope) -> tuple[int, str]:
    """Children in their group's order: by the index their id ends with (``step[2]``)."""
    child_id = scope.call.child_id
    head, _, tail = child_id.rpartition("[")
    index = tail[:-1]
    return (int(index) if head and index.isdigit() else -1, child_id)


def _hook_attributes(kind: str, error: fx.ErrorInfo) -> dict[str, Any]:
    return {HOOK: kind, "exception.type": _type_name(error),
            "exception.message": error.message}


def _hook_events(span: Any, hooks: list[tuple[str, fx.ErrorInfo]], at: int,
                 start: bool) -> None:
    """The hooks that raised, as events on their attempt: the start hook's at its start,
    a success or failure hook's at its end."""
    for kind, error in hooks:
        if (kind == "start") is start:
            span.add_event(HOOK_FAILED_EVENT, _hook_attributes(kind, error), timestamp=at)


_HANDLERS: dict[type, Callable[[_Scope, Any, Any, datetime | None], None]] = {
    fx.CallNode: _Scope._on_call,
    fx.CallParallel: _Scope._on_group,
    fx.Commit: _Scope._on_commit,
    fx.RecordAttempt: _Scope._on_record_attempt,
    fx.FireHook: _Scope._on_hook,
    fx.Sleep: _Scope._on_sleep,
    fx.ChooseBranch: _Scope._on_branch,
    fx.ChooseRoute: _Scope._on_route,
    fx.AwaitInput: _Scope._on_wait,
    fx.LoadCheckpoint: _Scope._on_load,
    fx.Finish: _Scope._on_finish,
    fx.ClassifyFailure: _Scope._on_other,
}


# ------------------------------------------------------------------------------- run


class RunTracer(_Scope):
    """A run's observer: its span (from when the run starts), its records' spans and
    metrics, and its end. Made by the facade (``interpret``, ``execute_step``,
    ``simulate``) when tracing is on; ``around`` runs the session with the run's span
    as the current span."""

    done = False

    @classmethod
    def start(
        cls, tracing: Tracing, *, run_id: str, started_at: datetime,
        clock: Callable[[], datetime], hooks: frozenset[str], plan: Any = None,
    ) -> RunTracer:
        """The run's span starts (at ``started_at``, under the caller's current span)."""
        tel = _telemetry(tracing)
        tracer = cls(tel, run_id, frozenset(hooks), clock, plan, _Counts(tel),
                     started=started_at)
        tracer.attach(tel.tracer.start_span(RUN_SPAN, start_time=_ns(started_at),
                                            attributes={RUN_ID: run_id}))
        return tracer

    def ended(self, finish: Any | None, error: BaseException | None) -> None:
        if self.done:
            return
        self.done = True
        self.error = error
        self.close_all()
        self.counts.flush()
        span = self.span
        finish = finish if finish is not None else self.finish
        attributes: dict[str, Any] = {}
        if finish is not None:
            status = _finished(attributes, finish.status, finish.total_tokens,
                               finish.total_cost_usd, finish.total_latency_ms, finish.reason)
            span.set_attributes(attributes)
            span.set_status(status)
        elif error is not None:  # stopped without its Finish: what it did so far
            attributes[STATUS] = UNFINISHED
            if self.totals is not None:
                tokens, cost_usd, latency_ms = self.totals
                attributes[TOTAL_TOKENS] = tokens
                attributes[COST_USD] = cost_usd
                attributes[LATENCY_MS] = latency_ms
            span.set_attributes(attributes)
        if error is not None:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"
                                   if str(error) else type(error).__name__))
        span.end(end_time=max(_ns(self.clock()), self.latest))

    def replayed(self, result: Any) -> None:
        """The session returned without running (its log had finished): the run's span
        ends with the recorded result."""
        if self.done:
            return
        self.done = True
        span = self.span
        log = getattr(result, "log", None)
        finish = getattr(log, "finish", None) if log is not None else None
        latency = finish.total_latency_ms if finish is not None else 0
        attributes: dict[str, Any] = {REPLAYED: True}
        status = _finished(attributes, result.status, result.total_tokens,
                           result.total_cost_usd, latency, result.stop_reason)
        span.set_attributes(attributes)
        span.set_status(status)
        span.end(end_time=_ns(self.clock()))

    async def around(self, session: Awaitable[Any]) -> Any:
        """Await the run's session with the run's span as the current span (so spans its
        nodes make nest under it), and end the span however the session ends."""
        token = _context.attach(self.ctx)
        try:
            result = await session
        except BaseException as exc:
            _quietly(self.ended, None, exc)
            raise
        finally:
            _context.detach(token)
        _quietly(self.replayed, result)
        return result
