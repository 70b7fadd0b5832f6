"""The lease shared by the Redis and PostgreSQL stores: claim, renew, release.

A run is claimed for one worker; a background task renews the claim while the run is in
progress and cancels the run if the claim is lost; the claim is released on the way out
(shielded from cancellation). The stores supply how to claim once, how to retry a claim
on transient errors, and how to release.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio

from stroma.errors import RunLocked, StoreError

__all__ = ("hold_lease",)

_log = logging.getLogger("stroma.stores")


@asynccontextmanager
async def hold_lease(
    run_id: str,
    holder: str,
    lease_s: float,
    claim_once: Callable[[], Awaitable[tuple[bool, str]]],
    retry: Callable[[Callable[[], Awaitable[tuple[bool, str]]]], Awaitable[tuple[bool, str]]],
    release: Callable[[], Awaitable[None]],
    store: object,
    is_transient: Callable[[BaseException], bool],
) -> AsyncIterator[None]:
    """Claim (with retries), renew in a background task, release; see ``lease``."""
    started = 0.0

    async def first_claim() -> tuple[bool, str]:
        nonlocal started
        started = anyio.current_time()  # the lease runs from the attempt that took it
        return await claim_once()

    ok, current = await retry(first_claim)
    if not ok:
        raise RunLocked(run_id, current)
    lost: list[BaseException] = []
    body_exc: BaseException | None = None
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                _renew, run_id, lease_s, started, claim_once, lost, tg.cancel_scope, store,
                is_transient,
            )
            try:
                yield
            except BaseException as exc:  # re-raised below, outside the task group
                body_exc = exc
            finally:
                tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(max(lease_s, 1.0)):
            try:
                await release()
            except Exception as exc:  # it expires on its own; do not mask the body's outcome
                _log.warning(
                    "%r: could not release the lease on run %r held by %r (%s: %s); it "
                    "expires after %.3g s",
                    store,
                    run_id,
                    holder,
                    type(exc).__name__,
                    exc,
                    lease_s,
                    extra={"run_id": run_id},
                )
    if lost:
        cancelled = isinstance(body_exc, anyio.get_cancelled_exc_class())
        raise lost[0] from (None if cancelled else body_exc)
    if body_exc is not None:
        raise body_exc


async def _renew(
    run_id: str,
    lease_s: float,
    last_ok: float,
    claim_once: Callable[[], Awaitable[tuple[bool, str]]],
    lost: list[BaseException],
    scope: anyio.CancelScope,
    store: object,
    is_transient: Callable[[BaseException], bool],
) -> None:
    """Renew the lease every ``lease_s / 3`` until cancelled; on loss, cancel the body."""
    interval = lease_s / 3
    healthy = True
    while True:
        await anyio.sleep(interval if healthy else interval / 4)
        tried_at = anyio.current_time()
        problem: BaseException | None = None
        if tried_at - last_ok >= lease_s:
            problem = StoreError(
                f"{store!r}: the lease on run {run_id!r} could not be renewed for {lease_s:.3g} s "
                "and has expired, so another worker may take the run; the body was cancelled. "
                "Check the connection to the server, or use a longer lease."
            )
        else:
            try:
                ok, current = await claim_once()
            except Exception as exc:
                if is_transient(exc):
                    healthy = False
                    continue
                problem = StoreError(
                    f"{store!r}: renewing the lease on run {run_id!r} failed: "
                    f"{type(exc).__name__}: {exc}; the body was cancelled"
                )
            else:
                if ok:
                    last_ok, healthy = tried_at, True
                    continue
                problem = RunLocked(run_id, current)
        lost.append(problem)
        scope.cancel()
        return
