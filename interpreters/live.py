"""The live performer: does what effects ask, for real, on anyio (asyncio or trio).

It calls nodes (with the context when they take one) under their timeout (a node whose
timeout expires is really cancelled, and reported as raising TimeoutError), runs a group's children
in a task group (cancelling the siblings once a child fails, as ``child_fails`` says),
sleeps the backoff, fires hooks under their timeout, asks the user's classifiers and
commits checkpoints. Every decision is the machine's; this module only reports what
happened. Each effect type is performed by one entry of ``LivePerformer.table``.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import logging
import sys
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from math import inf
from time import perf_counter
from typing import Any, Protocol

import anyio
import anyio.lowlevel
import attrs
from pydantic import BaseModel
from pydantic_core import from_json

from stroma import effects as fx
from stroma.checkpoint import awaitable_from_sync, store_failed
from stroma.contracts import (
    ContractViolation,
    _has_extra_keys,
    _stray_output_keys,
    _warn_stray_output_keys,
)
from stroma.cost import normalize_node_return
from stroma.errors import StromaError
from stroma.failures import NodeContext, check_verdict
from stroma.machine import (
    child_added,
    child_fails,
    error_info,
    group_budget_spent,
    idempotency_key,
)
from stroma.plan import Choose, LoopEnd, NodeStep, Plan, RouteTo

__all__ = (
    "Collaborators",
    "HookGuard",
    "HookTimedOut",
    "CURRENT_CALL",
    "LivePerformer",
    "RunLogger",
    "RunObserver",
    "single_error",
)

# The node call running in this task: (run id, node id, coords), set as each call starts.
CURRENT_CALL: ContextVar[tuple[str, str, Any] | None] = ContextVar(
    "stroma_current_call", default=None)

_log = logging.getLogger("stroma")


class RunLogger(logging.LoggerAdapter):
    """Every log line of a run carries its run_id."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        extra = dict(kwargs.get("extra") or {})
        extra.setdefault("run_id", (self.extra or {}).get("run_id"))
        kwargs["extra"] = extra
        return f"[run {extra['run_id']}] {msg}", kwargs


class RunObserver(Protocol):
    """What is told of a run as it happens (``Collaborators.observer``): the records the
    live loop appends, in order, as effect and event values (``event`` is None for the
    machine's own records), and how the run ended. An observer decides nothing and
    changes nothing; it must not raise (what it raises is logged and ignored)."""

    def record(self, effect: Any, event: Any) -> None: ...

    def child(self, call: Any, started: datetime) -> RunObserver:
        """The observer of a fan-out child's sub-plan (its records, its end)."""
        ...

    def ended(self, finish: Any | None, error: BaseException | None) -> None:
        """The run ended: its Finish, or the exception that ended it (cancelled too)."""
        ...

    # Optional (told only to an observer that has it): ``stopped(effect, tokens,
    # cost_usd, latency_ms)``, just before ``ended`` with the exception of a run the live
    # loop leaves without its Finish: the effect being performed then (a CallNode or
    # CallParallel whose answer never came; None when none was) and the run's totals so
    # far, as its Finish would have given them. And ``stopped_in_group(effect, children)``,
    # just before ``stopped`` when that effect is a CallParallel: its children that had
    # begun or finished then, as ``(child index, call, began_at, outcome)`` (outcome None:
    # the child had not finished; began_at None: it finished before a crash).


def _utc_now() -> datetime:
    return datetime.now(UTC)


_now_utc = functools.partial(datetime.now, UTC)  # _utc_now, as one C-level call
_tuple_new = tuple.__new__  # a NodeReturned made with every field, per node
_TAKEN, _NOT_TAKEN = fx.BranchChosen(True), fx.BranchChosen(False)  # frozen: shared
_HOOK_RAN = fx.HookFired()


@attrs.frozen
class Collaborators:
    """What a run talks to besides its plan: the store (through its manager), the user's
    hooks, classifiers and context, the clock, timer and sleep (real time by default;
    virtual time in ``interpreters.simulate``), and an observer of its records."""

    manager: Any
    hooks: Any = None
    classifiers: tuple[Callable[..., Any], ...] = ()
    context: dict[str, Any] = attrs.field(factory=dict, eq=False)
    sleep: Callable[[float], Any] = anyio.sleep
    clock: Callable[[], datetime] = attrs.field(default=_utc_now)
    timer: Callable[[], float] = perf_counter
    # Told of every record the run appends (``RunObserver``; OpenTelemetry is one), or None.
    observer: Any = None
    # Inputs for the run's waits, given to interpret (name or key -> payload).
    inputs: dict[str, Any] = attrs.field(factory=dict, eq=False)


def single_error(group: BaseExceptionGroup[Any]) -> BaseException:
    """One exception for what a task group raised: the first stroma error (or the first
    exception), the others attached to it as notes; ``except StoreError`` then works."""
    leaves: list[BaseException] = []

    def walk(eg: BaseExceptionGroup[Any]) -> None:
        for exc in eg.exceptions:
            if isinstance(exc, BaseExceptionGroup):
                walk(exc)
            else:
                leaves.append(exc)

    walk(group)
    first = next((e for e in leaves if isinstance(e, StromaError)), leaves[0])
    for other in leaves:
        if other is not first:
            first.add_note(f"also: {type(other).__name__}: {other}")
    return first


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def _said(exc: BaseException) -> str:
    """``Type: message`` of an exception (its message as error_info makes it)."""
    return f"{type(exc).__name__}: {error_info(exc).message}"


class LivePerformer:
    """Turns effects into events by doing them."""

    def __init__(
        self,
        plan: Plan,
        *,
        run_id: str,
        world: Collaborators,
        recorder: Any,
        prefilled: Mapping[int, tuple[Any, Any]] | None = None,
        hook_timeout_ms: int | None = None,
    ) -> None:
        self.plan = plan
        self.run_id = run_id
        self.world = world
        self.recorder = recorder
        manager = world.manager
        self.manager = manager
        self.store = manager.store
        self.durable = recorder.store is not None
        # How a commit's checkpoint is saved when the store holds no log: the JSON text
        # the machine made (a store that takes it), a synchronous save, or an awaited one.
        self.save_text = manager.save_json  # (None for a store whose save is overridden)
        self.save_sync = None if manager.is_async else manager.save_checkpoint
        # A commit a synchronous store takes at once (no coroutine): what the loop calls
        # instead of ``commit`` when there is one.
        self.commit_now: Callable[[fx.Commit], None] | None = None
        # A sub-plan child's run: (the run's recorder, the child's index, its call, when
        # it started), set by run_plan when the run keeps its children's progress.
        self.parent: tuple[Any, int, fx.RunPlan, datetime] | None = None
        if not self.durable and not manager.is_async:
            save_text, save_sync, rid = self.save_text, self.save_sync, run_id
            store = manager.store
            if save_text is not None and not inspect.iscoroutinefunction(save_text):
                def commit_now(eff: fx.Commit) -> None:
                    try:  # (node_id, output, state)
                        result = save_text(rid, eff[0], eff[5], type(eff[8]))
                    except StromaError:
                        raise
                    except Exception as exc:  # (the store's own: a subclass's override)
                        raise store_failed(store, "save_state_json", exc, rid,
                                           eff[0]) from exc
                    if result is not None:
                        _sync_saved(store, result, rid, eff[0], "save_state_json")
            else:
                assert save_sync is not None
                name = manager.save_name

                def commit_now(eff: fx.Commit) -> None:
                    try:
                        result = save_sync(rid, eff.node_id, eff.state)
                    except StromaError:
                        raise
                    except Exception as exc:  # (the store's own error, its wrong signature)
                        raise store_failed(store, name, exc, rid, eff.node_id) from exc
                    if result is not None:  # (a coroutine: the save was not done)
                        _sync_saved(store, result, rid, eff.node_id, name)
            self.commit_now = commit_now
        self.hooks = world.hooks
        # Each kind's hook function, looked up once (None where the hooks have none).
        self.hook_fns: dict[str, Any] = {
            kind: None if world.hooks is None else getattr(world.hooks, f"on_node_{kind}", None)
            for kind in ("start", "success", "failure")
        }
        # Hooks are bounded by one watchdog per run (see HookGuard), when there are hooks.
        self.guard: HookGuard | None = None
        if hook_timeout_ms is not None and any(
            fn is not None for fn in self.hook_fns.values()
        ):
            self.guard = HookGuard(hook_timeout_ms)
        self.classifiers = tuple(world.classifiers)
        self.context = world.context
        self.now = _now_utc if world.clock is _utc_now else world.clock
        self.timer = world.timer
        self.log = RunLogger(_log, {"run_id": run_id})
        self.nodes: dict[str, NodeStep] = {n.node_id: n for n in plan.nodes()}
        self.stray_checked: set[str] = set()  # nodes whose stray output keys were looked at
        # The user's pure functions the program asks: branch predicates and loops' until
        # (answered as BranchChosen), routes' selectors (RouteChosen).
        self.predicates: dict[str, Callable[[Any], Any]] = {}
        self.selectors: dict[str, Callable[[Any], Any]] = {}
        for ins in plan.program:
            if isinstance(ins, Choose):
                self.predicates[ins.step_id] = ins.branch.predicate
            elif isinstance(ins, LoopEnd):
                self.predicates[ins.step_id] = ins.loop.until
            elif isinstance(ins, RouteTo):
                self.selectors[ins.step_id] = ins.route.selector
        self.inputs: dict[str, Any] = world.inputs
        self.prefilled: dict[int, tuple[Any, Any]] = dict(prefilled or {})
        self.durable_children = recorder.store is not None or recorder.keeps_partials
        self._running_children: dict[int, Any] = {}
        # The group being performed: its call, and when each child began and what it
        # returned so far (kept if the run stops inside it, for ``children_so_far``).
        self._group: tuple[fx.CallParallel, list[Any], list[Any]] | None = None
        self.table: Mapping[type, Callable[[Any], Any]] = {
            fx.CallNode: self.call_node,
            fx.CallParallel: self.call_parallel,
            fx.LoadCheckpoint: self.load_checkpoint,
            fx.FireHook: self.fire_hook,
            fx.ClassifyFailure: self.classify,
            fx.Sleep: self.do_sleep,
            fx.ChooseBranch: self.choose,
            fx.ChooseRoute: self.choose_route,
            fx.AwaitInput: self.await_input,
        }

    # -- nodes

    async def call_node(self, eff: fx.CallNode, in_group: bool = False) -> Any:
        node_id, _, timeout_ms, model, given, coords = eff  # (unpacked: the hot path)
        node = self.nodes[node_id]
        ctx = self.context
        # The call this task runs, for current_idempotency_key() (a fan-out child runs in a
        # task of its own, so each sees its own call, whatever its siblings do).
        token = CURRENT_CALL.set((self.run_id, node_id, coords))
        if node.takes_context:
            if model is not None:
                ctx["_stroma_model"] = model
            elif "_stroma_model" in ctx:
                del ctx["_stroma_model"]
            # (the context is shared by the run's nodes: a fan-out child reads it before its
            # first await, or asks current_idempotency_key())
            ctx["_stroma_idempotency_key"] = idempotency_key(self.run_id, node_id, coords)
        started = self.now()
        t0 = self.timer()
        fn = node.fn
        try:
            if timeout_ms is None:
                raw = await (fn(given, ctx) if node.takes_context else fn(given))
            else:
                with anyio.move_on_after(timeout_ms / 1000) as scope:
                    try:
                        raw = await (fn(given, ctx) if node.takes_context else fn(given))
                    except Exception as exc:
                        if not scope.cancel_called:
                            raise
                        # Cancelled by its timeout, the node raised an error of its own
                        # (an HTTP client's when its call is cut off, a failed cleanup):
                        # the timeout is what happened, and it says what the node raised.
                        raise TimeoutError(
                            f"node {node_id!r} timed out after {timeout_ms} ms and was "
                            f"cancelled (it then raised {_said(exc)})"
                        ) from exc
                # cancel_called, not cancelled_caught: a node that swallowed the
                # cancellation and returned late has timed out all the same.
                if scope.cancel_called:
                    raise TimeoutError(
                        f"node {node_id!r} timed out after {timeout_ms} ms and was "
                        "cancelled"
                    )
        except Exception as exc:
            if not in_group:
                # An error the node raised as its call was cancelled from outside (the run
                # cut short, the group its sub-plan is in cancelled): what happened is the
                # cancellation, not a failure of the node, and the call has no outcome (a
                # failure reported here was a durable failed attempt, and the run went on
                # to a Finish of its own). A group's node child: its group says (below).
                await anyio.lowlevel.checkpoint_if_cancelled()
                cancelled = _native_cancellation(exc)  # (asyncio.wait_for around the run)
                if cancelled is not None:
                    raise cancelled() from exc
            return fx.NodeRaised(error_info(exc), started, _ms(self.timer() - t0))
        finally:
            CURRENT_CALL.reset(token)
        duration = int((self.timer() - t0) * 1000)
        output: Any
        if type(raw) is dict or isinstance(raw, BaseModel):  # no usage reported
            output, tin, tout, model = raw, 0, 0, None
        else:
            output, tin, tout, model = normalize_node_return(raw)
        if node_id not in self.stray_checked and _has_extra_keys(node.output_schema, output):
            warned = self._warn_stray(node, output, started, duration)
            if warned is not None:
                return warned
        return _tuple_new(fx.NodeReturned, (output, started, duration, tin, tout, model))

    def _warn_stray(self, node: NodeStep, output: object, started: datetime,
                    duration: int) -> fx.NodeRaised | None:
        """Look once per node of the run at output keys its schema drops, and warn of the
        near misses of its fields: a typo. With warnings made errors (``-W error``), the
        warning is the attempt's output contract violation (TERMINAL: a retry would call
        the node again to drop the key again)."""
        self.stray_checked.add(node.node_id)
        stray = _stray_output_keys(node.output_schema, output)
        if not stray:
            return None
        self.log.warning("node %r returned keys its output schema %s drops: %s",
                         node.node_id, node.output_schema.__name__,
                         ", ".join(key for key, _ in stray))
        try:
            _warn_stray_output_keys(node.node_id, node.output_schema, stray, node.fn)
        except Exception as exc:
            violation = ContractViolation(node.node_id, "output", output, [
                {"loc": (key,), "msg": f"{exc}", "type": "near_miss_key"}
                for key, _ in stray[:1]])
            return fx.NodeRaised(error_info(violation), started, duration)
        return None

    async def call_parallel(self, eff: fx.CallParallel) -> fx.ParallelReturned:
        started = self.now()
        t0 = self.timer()
        n = len(eff.calls)
        outcomes: list[Any] = [None] * n
        began: list[tuple[datetime, float] | None] = [None] * n
        self._group = (eff, began, outcomes)
        # Children that finished before a crash (their outcomes are in the log): not again.
        prefilled, self.prefilled = self.prefilled, {}
        resumed: dict[int, Any] = {}  # sub-plan children going on from durable records
        finished: list[tuple[int, Any, Any]] = []
        for k, (index, call) in enumerate(zip(eff.indices, eff.calls, strict=True)):
            done = prefilled.get(index)
            if done is None or done[0] != call:
                continue
            if type(done[1]) is not fx.NodeCancelled:
                outcomes[k] = done[1]
                finished.append((index, call, done[1]))
            elif type(call) is fx.RunPlan and (done[1].records or done[1].partials):
                # A sub-plan child that was running: it goes on from its durable records
                # (and the children of its own group in flight that it kept).
                resumed[k] = done[1]
        await self.recorder.flush_partials(finished)
        limiter = anyio.CapacityLimiter(eff.max_concurrency) if eff.max_concurrency else None
        group = eff.group
        merged = eff.kind == "parallel"
        failed = [any(o is not None and child_fails(group, eff.calls[k], o)
                      for k, o in enumerate(outcomes))]
        # What the children that finished used, and whether that spent the run's budget
        # (the machine says; then no more children start, and those running finish).
        spent: list[Any] = [0, 0.0, False]

        prices, counted = eff.allowance[4:6] if eff.allowance is not None else (None, {})

        def count(k: int, call: Any, outcome: Any) -> None:
            tokens, cost = child_added(call, eff.indices[k], outcome, prices, counted)
            spent[0] += tokens
            spent[1] += cost
            if not spent[2]:
                spent[2] = group_budget_spent(
                    eff, spent[0], spent[1], _ms(self.timer() - t0)) is not None

        if eff.allowance is not None:
            for k, o in enumerate(outcomes):
                if o is not None:
                    count(k, eff.calls[k], o)
        # The group's deadline (on the event loop's clock), and whether a child returned
        # after it: one that shielded or swallowed the cancellation, or blocked the loop.
        deadline = inf
        late = [False]
        try:
            async with anyio.create_task_group() as tg:

                async def child(k: int, call: Any, token: object) -> None:
                    try:
                        began[k] = (self.now(), self.timer())
                        outcome = await self.call_child(k, call, merged, eff.indices[k],
                                                        resumed.get(k))
                    except BaseException as exc:
                        if not isinstance(exc, anyio.get_cancelled_exc_class()):
                            failed[0] = True  # (Ctrl-C, say: no child takes its place)
                        if limiter is not None:
                            limiter.release_on_behalf_of(token)
                        raise
                    if deadline != inf:
                        if anyio.current_time() >= deadline:
                            late[0] = True
                        if (type(outcome) is fx.NodeRaised and not failed[0]
                                and tg.cancel_scope.cancel_called):
                            outcome = self._cut_off(eff, call, outcome)
                    if (type(outcome) is fx.NodeRaised and failed[0]
                            and tg.cancel_scope.cancel_called
                            and _raised_on_cancel(outcome.error.exc)):
                        # Cancelled because a sibling failed, the child raised an error of
                        # its own as it handled its cancellation (an HTTP client's when cut
                        # off): it was cancelled, as a child that let the cancellation
                        # through was; its error is not the group's (the first failed child
                        # in argument order is). (An error it raised before it saw the
                        # cancellation is its own failure.)
                        if limiter is not None:
                            limiter.release_on_behalf_of(token)
                        return
                    outcomes[k] = outcome
                    fails = child_fails(group, call, outcome)
                    if fails:
                        failed[0] = True
                        tg.cancel_scope.cancel()
                    elif eff.allowance is not None:
                        count(k, call, outcome)
                    # (its place is given up once the group knows it failed: no child takes
                    # it then)
                    if limiter is not None:
                        limiter.release_on_behalf_of(token)
                    if not fails and self.durable_children:
                        # Durable as soon as it finishes: a crash now does not lose it.
                        with anyio.CancelScope(shield=True):
                            await self.recorder.flush_partial(eff.indices[k], call, outcome)

                if eff.timeout_ms is not None:
                    deadline = anyio.current_time() + eff.timeout_ms / 1000
                    tg.cancel_scope.deadline = deadline
                if not (failed[0] or spent[2]):
                    for k, call in enumerate(eff.calls):
                        if outcomes[k] is None:
                            # A bounded group's children take their places in argument
                            # order (on every backend: trio starts tasks in any order).
                            token = object()
                            if limiter is not None:
                                try:  # (no trip through the scheduler while places are free)
                                    limiter.acquire_on_behalf_of_nowait(token)
                                except anyio.WouldBlock:
                                    await limiter.acquire_on_behalf_of(token)
                                if failed[0] or spent[2] or tg.cancel_scope.cancel_called:
                                    # a child failed, or the budget was spent, while this
                                    # one waited: it is not started
                                    limiter.release_on_behalf_of(token)
                                    break
                            tg.start_soon(child, k, call, token)
        except BaseExceptionGroup as eg:
            error = single_error(eg)
            raise error from error.__cause__  # (its own cause kept: the store's error, say)
        if failed[0] or None in outcomes:
            # A child failed, or some did not finish, while the run itself was cancelled
            # (its children then raise errors of their own, the cancellation the group's
            # scope swallowed on trio): the group has no outcome, the run stops here.
            await anyio.lowlevel.checkpoint_if_cancelled()
        end = self.timer()
        # Nothing failed, yet some children did not finish: the group's deadline passed
        # (or the budget was spent, and those were not started: then only if the deadline
        # cancelled the group all the same). Or they all finished, one of them after the
        # deadline: the group's timeout passed all the same, as a node's does.
        deadline_passed = eff.timeout_ms is not None and not failed[0] and (
            late[0]
            or (None in outcomes and (not spent[2] or tg.cancel_scope.cancel_called))
        )
        for k in range(n):
            if outcomes[k] is None:
                b = began[k]
                running = self._running_children.pop(k, None)
                records: Any = ()
                partials: tuple[Any, ...] = ()
                tokens, cost = 0, 0.0
                if running is not None:  # a sub-plan: its records, and its group's children
                    records = running.log.records
                    partials = running.finished_children()
                    child_call = eff.calls[k]
                    if running.stopped_totals is not None and type(child_call) is fx.RunPlan:
                        config = child_call.config  # (its totals less where they began)
                        tokens = running.stopped_totals[0] - config.base_tokens
                        cost = running.stopped_totals[1] - config.base_cost_usd
                outcomes[k] = (
                    fx.NodeCancelled(started, 0, records, partials, tokens, cost) if b is None
                    else fx.NodeCancelled(b[0], _ms(end - b[1]), records, partials, tokens,
                                          cost)
                )
        self._running_children.clear()
        self._group = None
        return fx.ParallelReturned(started, _ms(end - t0), tuple(outcomes), deadline_passed)

    def children_so_far(self, eff: Any) -> tuple[tuple[int, Any, datetime | None, Any], ...]:
        """The children of the group ``eff`` that had begun or finished when the run
        stopped inside it, as ``(child index, call, when it began, its outcome or None:
        it had not finished)`` (the began time is None for a child that finished before a
        crash, read from the log); none when the run did not stop inside ``eff``."""
        group = self._group
        if group is None or group[0] is not eff:
            return ()
        _, began, outcomes = group
        return tuple((eff.indices[k], call, b[0] if b is not None else None, outcomes[k])
                     for k, (call, b) in enumerate(zip(eff.calls, began, strict=True))
                     if b is not None or outcomes[k] is not None)

    @staticmethod
    def _cut_off(eff: fx.CallParallel, call: fx.CallNode, raised: fx.NodeRaised,
                 ) -> fx.NodeRaised:
        """A node child that the group's deadline cancelled and that raised an error of its
        own (an HTTP client's when cut off): a TimeoutError of the group, which says what
        the child raised (a TimeoutError, its own timeout's, stays as it is)."""
        error = raised.error
        if "builtins.TimeoutError" in error.type_names:
            return raised
        timeout = TimeoutError(
            f"{eff.step_id!r} timed out after {eff.timeout_ms} ms and was cancelled (its "
            f"child {call.node_id!r} then raised {error.short})"
        )
        timeout.__cause__ = error.exc
        return raised._replace(error=error_info(timeout))

    async def call_child(self, k: int, call: Any, merged: bool = False,
                         index: int | None = None,
                         prior: fx.NodeCancelled | None = None) -> Any:
        if type(call) is fx.CallNode:
            outcome = await self.call_node(call, True)
            if merged and type(outcome) is fx.NodeReturned and isinstance(outcome.output,
                                                                          BaseModel):
                # A parallel child adds the fields it set, not its model's defaults: the
                # log keeps just those (as a sub-plan child's output does), so a replay
                # or a resume merges what this run merged.
                outcome = outcome._replace(output=outcome.output.model_dump(exclude_unset=True))
            return outcome
        return await self.run_plan(k, call, index, prior)

    async def run_plan(self, k: int, call: fx.RunPlan, index: int | None = None,
                       prior: fx.NodeCancelled | None = None) -> fx.PlanFinished:
        """Run a fan-out child's sub-plan to its end, with its own (embedded) log; a child
        cancelled on an earlier attempt goes on from its records, and one that was running
        when the run stopped from what the run's log kept of it (``prior``: its records,
        and the children of its own group in flight that had finished or kept progress)."""
        from interpreters.loop import Recorder, run

        started = self.now()
        t0 = self.timer()
        recorder = Recorder.in_memory(self.run_id, call.plan_fingerprint, call.config.seed,
                                      started.isoformat())
        recorder.keeps_partials = True  # (a group of its own that is cancelled keeps them)
        self._running_children[k] = recorder
        world = self.world
        if world.observer is not None:  # the child's records are told to its own observer
            world = attrs.evolve(world, observer=world.observer.child(call, started))
        records, partials = call.records, call.partials
        if prior is not None:  # (what the log kept of this try is newer than the call's)
            records = prior.records
            partials = prior.partials or partials
        performer = LivePerformer(call.plan, run_id=self.run_id, world=world,
                                  recorder=recorder, hook_timeout_ms=call.config.hook_timeout_ms,
                                  prefilled={j: (c, o) for j, c, o in partials})
        if self.durable_children and index is not None:
            # Each commit of the child goes into this run's log as it happens, and so does
            # what sub-plans inside the child do (through the child's recorder's ``up``).
            performer.parent = (self.recorder, index, call, started)
            performer.commit_now = None  # (every commit goes through commit)
            recorder.up = (self.recorder, index, call, started)
        assert call.input is not None
        result = await run(call.plan, call.input, call.config, recorder, performer,
                           prior=records)
        self._running_children.pop(k, None)
        finish: Any = recorder.log.finish
        config = call.config  # (its totals start at the run's: what the child itself used)
        return fx.PlanFinished(
            # (its whole state: what it adds to a merge, the machine works out)
            result.status, result.final_state.model_dump(mode="json"),
            result.total_tokens - config.base_tokens,
            result.total_cost_usd - config.base_cost_usd,
            finish.total_latency_ms - config.base_latency_ms,
            result.stop_reason, started, _ms(self.timer() - t0), recorder.log.records,
        )

    async def choose(self, eff: fx.ChooseBranch) -> fx.BranchChosen:
        return self.choose_now(eff)

    def choose_now(self, eff: fx.ChooseBranch) -> fx.BranchChosen:
        """A branch predicate's or a loop's until's answer (a plain function: the loop
        calls it without a coroutine)."""
        try:
            taken = _pure(self.predicates[eff.step_id], eff.state, eff.step_id)
        except Exception as exc:
            return fx.BranchChosen(False, error_info(exc))
        return _TAKEN if taken else _NOT_TAKEN

    async def choose_route(self, eff: fx.ChooseRoute) -> fx.RouteChosen:
        try:
            key = _pure(self.selectors[eff.step_id], eff.state, eff.step_id)
            if not isinstance(key, str):
                raise TypeError(
                    f"the selector of {eff.step_id!r} returned {key!r} (a "
                    f"{type(key).__name__}): a selector returns the key (a str) of a route"
                )
        except Exception as exc:
            return fx.RouteChosen(None, error_info(exc))
        return fx.RouteChosen(key)

    async def await_input(self, eff: fx.AwaitInput) -> Any:
        """Look for a wait's input: given to ``interpret``, or sent to the store."""
        # An input given to interpret answers one wait: the one at its key, or (by its
        # name) the first wait of that name the run meets; a later iteration's wait asks
        # again, as it would have in a run of its own. It stays at its key, as an input
        # sent to the store does: the same wait asked again (its group retried, its
        # sub-plan child run again from its start) gets it again.
        given = self.inputs
        payload = given.get(eff.key)
        if payload is None and eff.key != eff.name:
            payload = given.pop(eff.name, None)
            if payload is not None:
                given[eff.key] = payload
        if payload is None:
            get = getattr(self.store, "get_input", None)
            if callable(get):
                payload = get(self.run_id, eff.key)
                if inspect.isawaitable(payload):
                    payload = await payload
        if payload is None:
            return fx.InputMissing(self.now())
        if isinstance(payload, BaseModel):
            payload = payload.model_dump(mode="json")
        elif isinstance(payload, bytes | str):
            try:
                payload = json.loads(payload)
            except ValueError:  # not JSON text: the value itself (the machine checks it)
                payload = payload.decode("utf-8", "replace") if isinstance(
                    payload, bytes) else payload
        return fx.InputReceived(payload, self.now())

    # -- store

    async def commit(self, eff: fx.Commit) -> None:
        """Make an attempt's record and its checkpoint durable (before what follows)."""
        state = eff.state
        assert state is not None
        if self.durable:
            # The log up to and including this record goes into the checkpoint's commit.
            await self.recorder.flush((eff.node_id, state))
            return
        if self.parent is not None and await self._kept_as_progress((eff.node_id, state)):
            return
        if self.save_text is not None:
            try:
                result = self.save_text(self.run_id, eff.node_id, eff.output_state,
                                        type(state))
                if result is not None:
                    await result
            except StromaError:
                raise
            except Exception as exc:  # (the store's own: a subclass's override)
                raise store_failed(self.store, "save_state_json", exc, self.run_id,
                                   eff.node_id) from exc
        elif self.save_sync is not None:
            name = self.manager.save_name
            try:
                result = self.save_sync(self.run_id, eff.node_id, state)
            except StromaError:
                raise
            except Exception as exc:
                raise store_failed(self.store, name, exc, self.run_id, eff.node_id) from exc
            if result is not None:
                _sync_saved(self.store, result, self.run_id, eff.node_id, name)
        else:
            await self.manager.checkpoint(self.run_id, eff.node_id, state)

    async def keep_records(self) -> None:
        """Make the records so far durable without a checkpoint (a failed attempt's,
        before its retry): in the store's log, or, for a fan-out child that is a sub-plan,
        as the group's progress in the run's log."""
        if self.durable:
            await self.recorder.flush()
        elif self.parent is not None:
            await self._kept_as_progress(None)

    async def _kept_as_progress(self, checkpoint: tuple[str, BaseModel] | None) -> bool:
        """A fan-out child that is a sub-plan: its records so far go into the run's log
        (as the group's progress), with ``checkpoint`` if given, in one append. False when
        nothing was kept (the caller then saves the checkpoint itself)."""
        assert self.parent is not None
        recorder, index, call, started = self.parent
        with anyio.CancelScope(shield=True):
            kept: bool = await recorder.flush_progress(
                index, call, started, self.recorder.log.records, checkpoint)
        return kept

    async def load_checkpoint(self, eff: fx.LoadCheckpoint) -> fx.CheckpointLoaded:
        state = await self.manager.resume(self.run_id, eff.node_id, eff.schema)
        return fx.CheckpointLoaded(eff.node_id, state)

    # -- hooks, classifiers, sleep

    async def fire_hook(self, eff: fx.FireHook) -> fx.HookFired:
        fn = self.hook_fns[eff.kind]
        if fn is None:
            return _HOOK_RAN
        try:
            if eff.kind == "start":
                # The hook gets its own copy: the state is also the log's record.
                call = fn(self.run_id, eff.node_id, _fresh(eff.state))
            elif eff.kind == "success":
                call = fn(self.run_id, eff.node_id, _fresh(eff.state), eff.tokens)
            else:
                assert eff.error is not None
                call = fn(self.run_id, eff.node_id, eff.error.exception(), eff.failure)
            guard = self.guard
            if guard is None or eff.timeout_ms is None:
                await call
            else:
                await guard.bounded(call, eff.timeout_ms)
        except HookTimedOut:
            raise  # the loop leaves the cancelled scope, then answers with hook_timed_out
        except Exception as exc:
            self.log.warning(
                "hook on_node_%s raised for node %r (attempt %d): %r; the run goes on",
                eff.kind, eff.node_id, eff.attempt, exc,
            )
            return fx.HookFired(error_info(exc))
        return _HOOK_RAN

    def hook_timed_out(self, eff: fx.FireHook) -> fx.HookFired:
        """The answer to a hook the guard cancelled at its deadline."""
        self.log.warning(
            "hook on_node_%s for node %r (attempt %d) did not return within %d ms and was "
            "cancelled; the run goes on", eff.kind, eff.node_id, eff.attempt, eff.timeout_ms,
        )
        return fx.HookFired(error_info(TimeoutError(
            f"hook on_node_{eff.kind} did not return within {eff.timeout_ms} ms and was "
            "cancelled"
        )))

    async def classify(self, eff: fx.ClassifyFailure) -> fx.FailureClassified:
        """Ask the classifiers in order until one answers; a classifier that raises or
        answers something that is not a FailureClass is noted (and logged), and the next
        one is asked: the machine passes over such answers."""
        exc = eff.error.exception()
        ctx = NodeContext(node_id=eff.node_id, attempt=eff.attempt, run_id=self.run_id,
                          idempotency_key=idempotency_key(self.run_id, eff.node_id, eff.coords),
                          coords=eff.coords)
        answers: list[Any] = []
        for classifier in self.classifiers:
            name = getattr(classifier, "__qualname__", None) or repr(classifier)
            try:
                answer = classifier(exc, ctx)
            except Exception as e:
                self.log.warning("classifier %r raised on node %r: %r; trying the next one",
                                 name, eff.node_id, e)
                answers.append(f"classifier {name} raised {type(e).__name__}: {e}")
                continue
            try:
                verdict = check_verdict(classifier, answer, eff.node_id)
            except TypeError as e:
                self.log.warning("%s; skipping it", e)
                answers.append(f"skipped: {e}")
                continue
            answers.append(verdict)
            if verdict is not None:
                break
        return fx.FailureClassified(tuple(answers))

    async def do_sleep(self, eff: fx.Sleep) -> fx.Slept:
        await self.world.sleep(eff.seconds)
        return fx.Slept(eff.seconds)


class HookTimedOut(Exception):
    """The hook in flight passed its deadline and was cancelled (raised out of the run's
    hook scope, which the live loop then replaces)."""


class HookGuard:
    """Bounds a run's hooks without a cancel scope (and its timer) per hook call.

    The live loop runs inside one cancel scope (``scope``), made again only after a hook
    timed out. Before a hook is awaited its deadline is set here; a watchdog task, waking
    every quarter of the hook timeout, cancels the scope when the hook in flight is past
    its deadline: the hook is cancelled where it waits, and ``fire_hook`` answers
    ``HookFired`` with the timeout. A hook is so cancelled between its deadline and a
    quarter of its timeout later.
    """

    __slots__ = ("clock", "deadline", "fired", "poll", "scope")

    def __init__(self, timeout_ms: int) -> None:
        # anyio.current_time, looked up for the running backend once (made in a run).
        self.clock: Callable[[], float] = _backend_clock()
        self.poll = max(timeout_ms / 4000, 0.001)
        self.deadline: float | None = None
        self.fired = False
        self.scope: anyio.CancelScope | None = None

    async def watch(self) -> None:
        while True:
            await anyio.sleep(self.poll)
            deadline = self.deadline
            if deadline is not None and self.clock() >= deadline:
                self.fired = True
                self.deadline = None
                assert self.scope is not None
                self.scope.cancel()

    async def bounded(self, call: Any, timeout_ms: int) -> None:
        """Await a hook's coroutine; HookTimedOut when the watchdog cancelled it."""
        self.deadline = self.clock() + timeout_ms / 1000
        try:
            await call
        except Exception as exc:
            if self.fired:
                # Cancelled at its deadline, the hook raised an error of its own (an HTTP
                # client's when cut off): it timed out all the same. (Taken for its own
                # error, the loop went on in the cancelled scope and, cancelled at its next
                # await, started again from where it last began: nodes ran again.)
                raise HookTimedOut from exc
            raise
        except anyio.get_cancelled_exc_class():
            if self.fired:
                raise HookTimedOut from None
            raise
        finally:
            self.deadline = None
        if self.fired:  # the hook swallowed its cancellation: leave the cancelled scope
            raise HookTimedOut


def _native_cancellation(exc: BaseException) -> type[BaseException] | None:
    """asyncio's CancelledError if ``exc`` was raised as the task running it was
    cancelled by asyncio itself (``task.cancel()``: an ``asyncio.wait_for`` or
    ``asyncio.timeout`` around the run, not an anyio cancel scope, which
    ``checkpoint_if_cancelled`` sees) and that cancellation is still pending; else None."""
    asyncio = sys.modules.get("asyncio")
    if asyncio is None:
        return None
    try:
        task = asyncio.current_task()
    except RuntimeError:  # (not on asyncio)
        return None
    if task is not None and task.cancelling() > 0 and _raised_on_cancel(exc):
        cancelled: type[BaseException] = asyncio.CancelledError
        return cancelled
    return None


def _raised_on_cancel(exc: BaseException | None) -> bool:
    """Whether ``exc`` was raised while a cancellation was being handled (one is in its
    chain of contexts: ``raise ConnectionError(...) from None`` in an ``except`` of it)."""
    cancelled = anyio.get_cancelled_exc_class()
    seen = 0
    while exc is not None and seen < 32:
        if isinstance(exc, cancelled):
            return True
        exc, seen = exc.__context__, seen + 1
    return False


def _backend_clock() -> Callable[[], float]:
    """The running backend's clock, as ``anyio.current_time`` reads it (which looks the
    backend up on every call). A backend that runs has been imported by anyio, so its
    module is looked up, not imported: ``import stroma`` does not load asyncio."""
    asyncio = sys.modules.get("asyncio")
    if asyncio is not None:
        try:
            return asyncio.get_running_loop().time  # (what anyio's asyncio backend reads)
        except RuntimeError:  # not on asyncio
            pass
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            trio.current_time()
            return trio.current_time
        except RuntimeError:  # not on trio either
            pass
    return anyio.current_time  # (made outside a run: looked up on every call)


def _sync_saved(store: Any, result: Any, run_id: str, node_id: str,
                method: str = "save") -> None:
    """A synchronous store's ``save`` returned something: an awaitable is an error (it
    was never awaited, so nothing was saved); anything else is ignored."""
    if inspect.isawaitable(result):
        raise awaitable_from_sync(store, method, result, run_id, node_id)


def _pure(fn: Callable[[Any], Any], state: Any, step_id: str) -> Any:
    """What a branch predicate, loop's until or route's selector says of the state."""
    answer = fn(state)
    if hasattr(answer, "__await__"):
        close = getattr(answer, "close", None)
        if close is not None:
            close()  # never awaited: close it, or it warns when collected
        raise TypeError(
            f"the function of {step_id!r} returned an awaitable: branch predicates, loops' "
            "until and routes' selectors are plain (pure) functions of the state"
        )
    return answer


def _fresh(state: Any) -> Any:
    """A state for a hook: a new dict (from the state's JSON text, or a deep copy)."""
    if type(state) is bytes:
        try:
            return from_json(state)
        except ValueError:
            return json.loads(state)  # (nested deeper than the fast reader goes)
    return copy.deepcopy(state)

