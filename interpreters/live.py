"""The live interpreter: performs effects for real, on anyio (asyncio or trio).

It calls nodes (with the context when they take one), enforces timeouts with cancel
scopes (a timed-out node is really cancelled, then reported as a TimeoutError), runs
parallel children in a task group (the first failure cancels the rest), sleeps the
backoff, fires hooks, runs the user's classifiers and saves checkpoints. Every decision
is the machine's; this module only reports what happened.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from time import perf_counter
from typing import Any

import anyio
from pydantic import BaseModel

from stroma import effects as fx
from stroma.checkpoint import InMemoryStore
from stroma.cost import normalize_node_return
from stroma.failures import FailureClass, NodeContext
from stroma.log import EffectLog, LogHeader
from stroma.machine import error_info, start
from stroma.plan import Choose, NodeStep, Plan
from stroma.trace import RunStatus

__all__ = ("LivePerformer", "RunLogger")

_log = logging.getLogger("stroma")


class RunLogger(logging.LoggerAdapter):
    """Every log line of a run carries its run_id."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        extra = dict(kwargs.get("extra") or {})
        extra.setdefault("run_id", (self.extra or {}).get("run_id"))
        kwargs["extra"] = extra
        return f"[run {extra['run_id']}] {msg}", kwargs


class LivePerformer:
    """Turns effects into events by doing them."""

    def __init__(
        self,
        plan: Plan,
        *,
        run_id: str,
        manager: Any,
        recorder: Any,
        hooks: Any = None,
        classifiers: Sequence[Callable[..., Any]] = (),
        context: dict[str, Any] | None = None,
        sleep: Callable[[float], Any] | None = None,
        clock: Callable[[], datetime] | None = None,
        timer: Callable[[], float] = perf_counter,
        prefilled: Mapping[int, tuple[Any, Any]] | None = None,
    ) -> None:
        self.run_id = run_id
        self.manager = manager
        self.recorder = recorder
        self.durable = recorder.store is not None
        self.sync_save = None if manager.is_async else manager.store.save
        # Effects that can be performed without awaiting (the driver calls these directly).
        self.sync_table: dict[type, Callable[[Any], Any]] = (
            {fx.SaveCheckpoint: self.save_checkpoint_sync}
            if self.sync_save is not None and not self.durable else {}
        )
        # The plain lane (see driver.drive): how a checkpoint is saved without an effect
        # object, for a synchronous store that holds no log; None where it can't be.
        self.lane_save: Callable[[str, Any, bytes], None] | None = None
        if self.sync_table:
            if type(manager.store) is InMemoryStore:
                slots = manager.store._run_slots
                run: list[Any] = []  # the run's checkpoint dicts, made at the first save

                def lane_save(node_id: str, state: Any, data: bytes) -> None:
                    if not run:
                        run.extend(slots(run_id))
                    run[0][node_id] = data  # the same text save() keeps, as bytes
                    run[1][node_id] = type(state)
            else:
                save = manager.store.save

                def lane_save(node_id: str, state: Any, data: bytes) -> None:
                    save(run_id, node_id, state)

            self.lane_save = lane_save
        self.hooks = hooks
        self.classifiers = tuple(classifiers)
        self.context = context if context is not None else {}
        self.sleep = sleep or anyio.sleep
        self.now = clock or functools.partial(datetime.now, UTC)
        self.timer = timer
        self.log = RunLogger(_log, {"run_id": run_id})
        self.nodes: dict[str, NodeStep] = {n.node_id: n for n in plan.nodes()}
        self.branches = {
            ins.step_id: ins.branch for ins in plan.program if isinstance(ins, Choose)
        }
        self.prefilled: dict[int, tuple[Any, Any]] = dict(prefilled or {})
        self.durable_children = recorder.store is not None or recorder.keeps_partials
        self.table: Mapping[type, Callable[[Any], Any]] = {
            fx.CallNode: self.call_node,
            fx.CallParallel: self.call_parallel,
            fx.SaveCheckpoint: self.save_checkpoint,
            fx.LoadCheckpoint: self.load_checkpoint,
            fx.FireHook: self.fire_hook,
            fx.ClassifyFailure: self.classify,
            fx.Sleep: self.do_sleep,
            fx.ChooseBranch: self.choose,
        }

    async def __call__(self, effect: Any) -> Any:
        return await self.table[type(effect)](effect)

    # -- nodes

    async def call_plain(self, node_id: str, inp: Any) -> Any:
        """Call a node with no timeout and no fallback model: ``(output, started_at,
        duration_ms)`` when it returned a dict or a model (no usage), else its event."""
        node = self.nodes[node_id]
        if node.takes_context:
            ctx = self.context
            if "_stroma_model" in ctx:
                del ctx["_stroma_model"]
        started = self.now()
        t0 = self.timer()
        try:
            raw = await (node.fn(inp, self.context) if node.takes_context else node.fn(inp))
        except Exception as exc:
            return fx.NodeRaised(error_info(exc), started, _ms(self.timer() - t0))
        duration = int((self.timer() - t0) * 1000)
        if type(raw) is dict or isinstance(raw, BaseModel):  # no usage: the common case
            return raw, started, duration
        output, tin, tout, model = normalize_node_return(raw)
        return fx.NodeReturned(output, started, duration, tin, tout, model)

    async def call_node(self, eff: fx.CallNode) -> Any:
        if eff.timeout_ms is None and eff.model is None:
            got = await self.call_plain(eff.node_id, eff.input)
            return fx.NodeReturned(*got) if type(got) is tuple else got
        node = self.nodes[eff.node_id]
        ctx = self.context
        if node.takes_context:
            if eff.model is not None:
                ctx["_stroma_model"] = eff.model
            elif "_stroma_model" in ctx:
                del ctx["_stroma_model"]
        started = self.now()
        t0 = self.timer()
        try:
            if eff.timeout_ms is None:
                raw = await (node.fn(eff.input, ctx) if node.takes_context else node.fn(eff.input))
            else:
                with anyio.move_on_after(eff.timeout_ms / 1000) as scope:
                    raw = await (
                        node.fn(eff.input, ctx) if node.takes_context else node.fn(eff.input)
                    )
                # cancel_called, not cancelled_caught: a node that swallowed the
                # cancellation and returned late has timed out all the same.
                if scope.cancel_called:
                    raise TimeoutError(
                        f"node {eff.node_id!r} timed out after {eff.timeout_ms} ms and was "
                        "cancelled"
                    )
        except Exception as exc:
            return fx.NodeRaised(error_info(exc), started, _ms(self.timer() - t0))
        duration = int((self.timer() - t0) * 1000)
        if type(raw) is dict:  # no usage reported: the common case
            return fx.NodeReturned(raw, started, duration)
        output, tin, tout, model = normalize_node_return(raw)
        return fx.NodeReturned(output, started, duration, tin, tout, model)

    async def call_parallel(self, eff: fx.CallParallel) -> fx.ParallelReturned:
        started = self.now()
        t0 = self.timer()
        n = len(eff.calls)
        outcomes: list[Any] = [None] * n
        began: list[tuple[datetime, float] | None] = [None] * n
        # Children that finished before a crash (their outcomes are in the log): not again.
        prefilled, self.prefilled = self.prefilled, {}
        for j, (call, outcome) in prefilled.items():
            if j < n and eff.calls[j] == call and not isinstance(outcome, fx.NodeCancelled):
                outcomes[j] = outcome
                await self.recorder.flush_partial(j, call, outcome)
        limiter = anyio.CapacityLimiter(eff.max_concurrency) if eff.max_concurrency else None
        perform_child = self.call_child

        async with anyio.create_task_group() as tg:

            async def child(i: int, call: Any) -> None:
                if limiter is not None:
                    async with limiter:
                        began[i] = (self.now(), self.timer())
                        outcome = await perform_child(call)
                else:
                    began[i] = (self.now(), self.timer())
                    outcome = await perform_child(call)
                outcomes[i] = outcome
                if isinstance(outcome, fx.NodeRaised) or (
                    isinstance(outcome, fx.PlanFinished)
                    and outcome.status not in (RunStatus.COMPLETED, RunStatus.RESUMED)
                ):
                    tg.cancel_scope.cancel()
                elif self.durable_children:
                    # Durable as soon as it finishes: a crash now does not lose it.
                    with anyio.CancelScope(shield=True):
                        await self.recorder.flush_partial(i, call, outcome)

            if eff.timeout_ms is not None:
                tg.cancel_scope.deadline = anyio.current_time() + eff.timeout_ms / 1000
            for i, call in enumerate(eff.calls):
                if outcomes[i] is None:
                    tg.start_soon(child, i, call)
        end = self.timer()
        for i in range(n):
            if outcomes[i] is None:
                b = began[i]
                outcomes[i] = (
                    fx.NodeCancelled(started, 0) if b is None
                    else fx.NodeCancelled(b[0], _ms(end - b[1]))
                )
        if (
            eff.timeout_ms is not None
            and not any(isinstance(o, fx.NodeRaised | fx.PlanFinished)
                        and getattr(o, "status", None) not in (RunStatus.COMPLETED,
                                                                RunStatus.RESUMED)
                        for o in outcomes)
            and any(isinstance(o, fx.NodeCancelled) for o in outcomes)
        ):
            # The group's deadline passed: report it on the first unfinished child.
            k = next(i for i, o in enumerate(outcomes) if isinstance(o, fx.NodeCancelled))
            c = outcomes[k]
            outcomes[k] = fx.NodeRaised(
                error_info(TimeoutError(
                    f"{eff.step_id!r} timed out after {eff.timeout_ms} ms and was cancelled"
                )),
                c.started_at, c.duration_ms,
            )
        return fx.ParallelReturned(started, _ms(end - t0), tuple(outcomes))

    async def call_child(self, call: Any) -> Any:
        if type(call) is fx.CallNode:
            return await self.call_node(call)
        return await self.run_plan(call)

    async def run_plan(self, call: fx.RunPlan) -> fx.PlanFinished:
        """Run a fan-out child's sub-plan to its end, with its own (embedded) log."""
        from interpreters.driver import Recorder, drive

        started = self.now()
        t0 = self.timer()
        header = LogHeader(
            run_id=self.run_id, plan=call.plan_fingerprint, seed=call.config.seed,
            version="", started_at=started.isoformat(),
        )
        recorder = Recorder(EffectLog(header, []), None)
        performer = LivePerformer(
            call.plan, run_id=self.run_id, manager=self.manager, recorder=recorder,
            hooks=self.hooks, classifiers=self.classifiers, context=self.context,
            sleep=self.sleep, clock=self.now, timer=self.timer,
        )
        assert call.input is not None
        state, effects = start(call.plan, call.input, call.config)
        result = await drive(call.plan, state, effects, recorder, performer)
        finish: Any = recorder.records[-1][0]
        return fx.PlanFinished(
            result.status, result.final_state.model_dump(mode="json", exclude_unset=True),
            result.total_tokens,
            result.total_cost_usd, finish.total_latency_ms, result.stop_reason, started,
            _ms(self.timer() - t0), tuple(recorder.records),
        )

    async def choose(self, eff: fx.ChooseBranch) -> fx.BranchChosen:
        step = self.branches[eff.step_id]
        try:
            taken = step.predicate(eff.state)
            if inspect.isawaitable(taken):
                close = getattr(taken, "close", None)
                if close is not None:
                    close()  # never awaited: close it, or it warns when collected
                raise TypeError(
                    f"the predicate of {eff.step_id!r} returned an awaitable: branch "
                    "predicates are plain (pure) functions of the state"
                )
        except Exception as exc:
            return fx.BranchChosen(False, error_info(exc))
        return fx.BranchChosen(bool(taken))

    # -- store

    def save_checkpoint_sync(self, eff: fx.SaveCheckpoint) -> fx.CheckpointSaved:
        """A synchronous store that holds no log: saved without a coroutine."""
        self.sync_save(self.run_id, eff.node_id, eff.state)  # type: ignore[misc]
        return fx.CheckpointSaved(eff.node_id)

    async def save_checkpoint(self, eff: fx.SaveCheckpoint) -> fx.CheckpointSaved:
        event = fx.CheckpointSaved(eff.node_id)
        if self.durable:
            # The log up to and including this record goes into the checkpoint's commit.
            await self.recorder.flush((eff.node_id, eff.state), including=(eff, event))
        elif self.sync_save is not None:
            self.sync_save(self.run_id, eff.node_id, eff.state)  # a sync store: no await
        else:
            await self.manager.checkpoint(self.run_id, eff.node_id, eff.state)
        return event

    async def load_checkpoint(self, eff: fx.LoadCheckpoint) -> fx.CheckpointLoaded:
        state = await self.manager.resume(self.run_id, eff.node_id, eff.schema)
        return fx.CheckpointLoaded(eff.node_id, state)

    # -- hooks, classifiers, sleep

    async def fire_hook(self, eff: fx.FireHook) -> fx.HookFired:
        hooks = self.hooks
        fn = None
        if hooks is not None:
            fn = getattr(hooks, f"on_node_{eff.kind}", None)
        if fn is None:
            return fx.HookFired()
        try:
            if eff.kind == "start":
                await fn(self.run_id, eff.node_id, copy.deepcopy(eff.state))
            elif eff.kind == "success":
                # The hook gets its own copy: the state dict is also the trace's and the
                # log's record, which a hook must not be able to change.
                await fn(self.run_id, eff.node_id, copy.deepcopy(eff.state), eff.tokens)
            else:
                assert eff.error is not None
                exc = eff.error.exc or RuntimeError(eff.error.message)
                await fn(self.run_id, eff.node_id, exc, eff.failure)
        except Exception as exc:
            self.log.warning(
                "hook on_node_%s raised for node %r (attempt %d): %r; the run goes on",
                eff.kind, eff.node_id, eff.attempt, exc,
            )
            return fx.HookFired(error_info(exc))
        return fx.HookFired()

    async def classify(self, eff: fx.ClassifyFailure) -> fx.FailureClassified:
        exc = eff.error.exc
        if exc is None:
            exc = RuntimeError(eff.error.message)
        ctx = NodeContext(node_id=eff.node_id, attempt=eff.attempt, run_id=self.run_id)
        for classifier in self.classifiers:
            try:
                verdict = classifier(exc, ctx)
            except Exception as e:
                self.log.warning(
                    "classifier %r raised on node %r: %r; trying the next one",
                    getattr(classifier, "__name__", classifier), eff.node_id, e,
                )
                continue
            if verdict is None:
                continue
            try:
                return fx.FailureClassified(FailureClass(verdict))
            except ValueError:
                self.log.warning(
                    "classifier %r returned %r on node %r, which is not a FailureClass or "
                    "None; skipping it (return FailureClass.RECOVERABLE, TERMINAL, "
                    "AMBIGUOUS, or None to defer)",
                    getattr(classifier, "__name__", classifier), verdict, eff.node_id,
                )
        return fx.FailureClassified(None)

    async def do_sleep(self, eff: fx.Sleep) -> fx.Slept:
        await self.sleep(eff.seconds)
        return fx.Slept(eff.seconds)


def _ms(seconds: float) -> int:
    return int(seconds * 1000)
