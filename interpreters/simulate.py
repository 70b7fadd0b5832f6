"""A simulated interpreter: the real nodes, the real machinery, virtual time.

``simulate`` runs a plan exactly as ``stroma.interpret`` does (the same session, the same
live performer, the same effect log) except for time: a backoff ``Sleep`` moves a
``VirtualClock`` forward instead of sleeping, trace timestamps are read from that clock,
and node durations are measured on it. A test of a retry policy with
``backoff_seconds=30`` therefore finishes at once, and its trace shows the virtual
minutes that went by (in the spirit of trio's ``MockClock`` with autojump)::

    clock = VirtualClock()

    @stroma_node("fetch", contract)
    async def fetch(state: In) -> dict:
        await clock.sleep(2.5)          # takes 2.5 s of virtual time, none of real time
        ...

    result = await simulate([fetch], In(...), config=RunConfig(policy_map=...), clock=clock)
    assert clock.slept <= 90

A node's duration is 0 unless it moves the clock (``clock.advance`` or ``await
clock.sleep``); a node that awaits ``anyio.sleep`` takes real time that the virtual clock
does not see. Node timeouts are still enforced on real time. Unless ``config.seed`` says
otherwise the jitter is seeded with 0, so a simulation is reproducible.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio.lowlevel
import attrs
from pydantic import BaseModel

from interpreters.live import Collaborators
from interpreters.session import run_session
from interpreters.stores.memory import InMemoryStore
from stroma.checkpoint import CheckpointManager
from stroma.contracts import ContractRegistry
from stroma.errors import StromaTypeError, StromaValueError
from stroma.plan import Plan, compile_plan
from stroma.runner import RunConfig, _run_config_of, _traced, machine_config
from stroma.schemas import declare_schemas
from stroma.trace import ExecutionResult

__all__ = ("DEFAULT_START", "VirtualClock", "simulate")

DEFAULT_START = datetime(2024, 1, 1, tzinfo=UTC)
"""Where a VirtualClock starts unless told otherwise."""


class VirtualClock:
    """Time that passes only when told to: by a backoff, ``advance`` or ``sleep``.

    ``now()`` is the virtual wall clock (an aware datetime), ``time()`` the virtual
    monotonic clock in seconds since the start; ``slept`` is the total of the backoff
    sleeps and ``sleeps`` each of them, in order.
    """

    def __init__(self, start: datetime | None = None) -> None:
        start = DEFAULT_START if start is None else start
        if start.tzinfo is None:
            raise StromaValueError(
                f"VirtualClock(start={start!r}) needs an aware datetime: "
                "e.g. datetime(2024, 1, 1, tzinfo=UTC)"
            )
        self.start = start
        self.elapsed = 0.0
        self.slept = 0.0
        self.sleeps: list[float] = []

    def now(self) -> datetime:
        """The virtual wall-clock time."""
        return self.start + timedelta(seconds=self.elapsed)

    def time(self) -> float:
        """Virtual seconds since the start (the timer node durations are measured with)."""
        return self.elapsed

    def advance(self, seconds: float) -> None:
        """Move virtual time forward by ``seconds`` (a node 'taking' that long)."""
        if not seconds >= 0:
            raise StromaValueError(f"VirtualClock.advance({seconds!r}): time only moves forward")
        self.elapsed += seconds

    async def sleep(self, seconds: float) -> None:
        """Sleep in virtual time: the clock moves forward, the task only yields once."""
        self.advance(seconds)
        await anyio.lowlevel.checkpoint()

    async def backoff(self, seconds: float) -> None:
        """The interpreter's sleep between attempts: a virtual sleep that is counted."""
        self.sleeps.append(seconds)
        self.slept += seconds
        await self.sleep(seconds)

    def __repr__(self) -> str:
        return f"VirtualClock(now={self.now().isoformat()}, slept={self.slept:g}s)"


async def simulate(
    plan_or_nodes: Plan | Sequence[Any],
    initial_state: BaseModel,
    *,
    config: RunConfig | None = None,
    registry: ContractRegistry | None = None,
    start: datetime | None = None,
    clock: VirtualClock | None = None,
    store: Any = None,
) -> ExecutionResult:
    """Run ``plan_or_nodes`` like ``stroma.interpret``, but on virtual time.

    ``start`` sets where a fresh virtual clock begins; pass your own ``clock`` instead
    to let nodes move it (not both). ``store`` defaults to a fresh InMemoryStore.
    """
    if clock is not None and start is not None:
        raise StromaValueError(
            "simulate(start=..., clock=...): give one of them; the clock already has a "
            "start (VirtualClock(start=...))"
        )
    clock = clock if clock is not None else VirtualClock(start)
    compiled = compile_plan(plan_or_nodes, registry)
    config = _run_config_of(config, "simulate")
    if not isinstance(initial_state, BaseModel):
        raise StromaTypeError(
            f"initial_state must be a pydantic BaseModel instance (got "
            f"{type(initial_state).__name__}): e.g. Input(value=1)"
        )
    explicit = "run_id" in config.model_fields_set
    run_id = config.run_id if explicit else str(uuid.uuid4())
    machine = attrs.evolve(
        machine_config(config, run_id),
        seed=config.seed if config.seed is not None else 0,
        started_at=clock.now(),
    )
    declare_schemas((type(initial_state),))
    manager = CheckpointManager(store if store is not None else InMemoryStore())
    world = Collaborators(
        manager, hooks=config.hooks, classifiers=tuple(config.classifiers),
        context=config.context, sleep=clock.backoff, clock=clock.now, timer=clock.time,
    )
    tracer = _traced(config, machine, world, compiled)  # spans on the virtual clock
    if tracer is None:
        return await run_session(compiled, initial_state, machine=machine,
                                 explicit_run_id=explicit, world=world)
    world = attrs.evolve(world, observer=tracer)
    return await tracer.around(run_session(compiled, initial_state, machine=machine,
                                           explicit_run_id=explicit, world=world))
