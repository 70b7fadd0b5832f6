"""The lease shared by the Redis and PostgreSQL stores: claim, fence, renew, release.

A run is claimed for one worker session. Each claim gets a **fencing token** from the
server that grows with every claim of the run; the store object records it for the run
while the lease is held, and every write of the run (append_log, save, delete) is checked
against it atomically with the write (a Lua script in Redis, the same transaction in
PostgreSQL). A worker that stalled past its lease (a pause, a GC, SIGSTOP) while another
worker took the run over holds an old token: its writes are refused with ``LeaseLost`` and
the other worker's log stays intact.

A background task renews the claim while the run is in progress and cancels the run if the
claim is lost. The claim and its release are one unit: each claim round trip is shielded
from cancellation, and once a claim was sent the release runs on the way out (shielded,
retried a bounded number of times), so a run cancelled from outside does not leave its own
lease behind while the server answers. A session that was cancelled or interrupted gives
the release ``RELEASE_WHEN_STOPPED_S`` (a second): a release that cannot reach the server
by then is left to expire on its own, so the caller gets control back promptly when the
server stalls.

**Holders.** ``new_holder()`` gives ``<host>:<pid>:<worker nonce>/<session nonce>``: a
stable worker id for this process plus a nonce per session. This process keeps the set of
its live sessions: a claim that finds the run leased by this same worker for a session that
is not live any more (its release failed, say, on a broken connection) takes it over at
once instead of waiting for it to expire; two live sessions of the same run in one process
still exclude each other (``RunLocked``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio

from stroma.errors import RunLocked, StoreError

__all__ = (
    "RELEASE_WHEN_STOPPED_S",
    "LeaseLost",
    "hold_lease",
    "locked",
    "loop_gone",
    "new_holder",
    "session_loop",
    "worker_id",
)

_log = logging.getLogger("stroma.stores")

_WORKER: tuple[int, str] | None = None
# The sessions of this process that are inside a lease: (lease space, run id, holder).
_LIVE: set[tuple[str, str, str]] = set()

# claim(takeover) -> (granted, current holder, fencing token); takeover names a stale
# holder of this worker that the claim may replace.
_Claim = Callable[[str | None], Awaitable[tuple[bool, str, int]]]
# renew(token) -> (still ours, current holder)
_Renew = Callable[[int], Awaitable[tuple[bool, str]]]


def worker_id() -> str:
    """This process's worker id, ``<host>:<pid>:<nonce>`` (a new one after a fork)."""
    global _WORKER
    pid = os.getpid()
    if _WORKER is None or _WORKER[0] != pid:
        _WORKER = (pid, f"{socket.gethostname()}:{pid}:{secrets.token_hex(4)}")
    return _WORKER[1]


def new_holder() -> str:
    """A holder name for one lease session: this process's worker id and a fresh nonce."""
    return f"{worker_id()}/{secrets.token_hex(4)}"


def session_loop() -> Any:
    """A weak reference to the running asyncio event loop, or None (trio unwinds an
    interrupted session itself)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    return weakref.ref(loop)


def loop_gone(ref: Any) -> bool:
    """Whether the event loop ``ref`` (from ``session_loop``) is closed or gone: a session
    of that loop that has not ended was cut off (an interrupt left the loop before the
    session could end) and never runs again. False for None (no asyncio loop)."""
    if ref is None:
        return False
    loop = ref()
    return loop is None or loop.is_closed()


def locked(run_id: str, holder: str) -> RunLocked:
    """The RunLocked for ``holder``, saying so when the holder is a session of this
    process, or a process of this host that has exited."""
    return RunLocked(run_id, holder, this_process=_worker_of(holder) == worker_id(),
                     holder_exited=_exited(holder))


def _exited(holder: str) -> bool:
    """Whether ``holder`` names a process of this host that is not running."""
    host, _, rest = holder.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError, OSError):
        return False  # it runs (as another user), or cannot be asked
    return False


def _worker_of(holder: str) -> str | None:
    head, sep, _ = holder.rpartition("/")
    return head if sep else None


class LeaseLost(RunLocked):
    """A write of a leased run was refused: the writer's lease is no longer the current one.

    ``holder`` is who holds the run now (as in RunLocked), ``stale_holder`` and ``token`` the
    refused writer's lease, ``current_token`` the current lease's fencing token (None if the
    lease was released since).
    """

    def __init__(
        self,
        op: str,
        run_id: str,
        stale_holder: str,
        token: int,
        holder: str,
        current_token: int | None,
    ) -> None:
        self.run_id = run_id
        self.holder = holder
        self.stale_holder = stale_holder
        self.token = token
        self.current_token = current_token
        now = (
            f"worker {holder!r} holds it now (fencing token {current_token})"
            if holder and current_token is not None
            else "another worker claimed it since (and has released it)"
        )
        StoreError.__init__(
            self,
            f"{op} for run {run_id!r} was refused: this worker's lease on the run (holder "
            f"{stale_holder!r}, fencing token {token}) is no longer current; {now}. This "
            "worker stalled past its lease and the run was taken over: nothing was written, "
            "and the other worker's log is intact. Let that worker finish the run (or resume "
            "it later with the same run id), or use a longer lease.",
        )


@asynccontextmanager
async def hold_lease(
    store: object,
    run_id: str,
    holder: str,
    lease_s: float,
    *,
    space: str,
    claim: _Claim,
    renew: _Renew,
    release: Callable[[], Awaitable[None]],
    is_transient: Callable[[BaseException], bool],
    fences: dict[str, tuple[str, int]],
) -> AsyncIterator[None]:
    """Claim ``run_id`` for ``holder``, record its fencing token in ``fences``, renew it in a
    background task while the body runs, release it on the way out.

    ``space`` names the server and namespace of the store (leases of two stores with the same
    space are the same leases). ``claim`` retries transient errors itself and shields each
    round trip from cancellation; ``renew`` is one attempt; ``release`` retries itself.
    """
    me = (space, run_id, holder)
    if me in _LIVE:
        raise RunLocked(run_id, holder)  # the same holder name, live in this process
    _LIVE.add(me)
    token: int | None = None
    maybe_held = stopped = False
    try:
        started = anyio.current_time()  # the lease runs from (no later than) the claim
        maybe_held = True  # from here on the server may grant it, whatever happens to us
        try:
            ok, current, token = await claim(None)
            if not ok and _stale_own(space, run_id, holder, current):
                # This worker's own lease of a session that is over: take it over at once.
                ok, current, token = await claim(current)
        except Exception:
            # The claim failed after its retries (the server unreachable, say): nothing to
            # release (were it granted unseen, this worker takes it over when it claims again).
            maybe_held = False
            raise
        if not ok:
            maybe_held = False
            raise locked(run_id, current)
        fences[run_id] = (holder, token)
        async with _renewed(store, run_id, lease_s, started, token, renew, is_transient):
            yield
    except BaseException as exc:
        stopped = not isinstance(exc, Exception)  # cancelled or interrupted: be quick
        raise
    finally:
        if token is not None and fences.get(run_id) == (holder, token):
            del fences[run_id]
        try:
            if maybe_held:
                await _release(store, run_id, holder, lease_s, release, stopped)
        finally:
            _LIVE.discard(me)


def _stale_own(space: str, run_id: str, holder: str, current: str) -> bool:
    """Whether ``current`` is an ended session of the worker ``holder`` belongs to, and that
    worker is this process (so whether its session is live is known here)."""
    worker = _worker_of(current)
    return (
        worker == worker_id()
        and _worker_of(holder) == worker
        and (space, run_id, current) not in _LIVE
    )


@asynccontextmanager
async def _renewed(
    store: object,
    run_id: str,
    lease_s: float,
    started: float,
    token: int,
    renew: _Renew,
    is_transient: Callable[[BaseException], bool],
) -> AsyncIterator[None]:
    """Run the body with the renewal task beside it; a lost lease cancels the body."""
    lost: list[BaseException] = []
    body_exc: BaseException | None = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(
            _renew, run_id, lease_s, started, token, renew, lost, tg.cancel_scope, store,
            is_transient,
        )
        try:
            yield
        except BaseException as exc:  # re-raised below, outside the task group
            body_exc = exc
        finally:
            tg.cancel_scope.cancel()
    if lost:
        cancelled = isinstance(body_exc, anyio.get_cancelled_exc_class())
        raise lost[0] from (None if cancelled else body_exc)
    if body_exc is not None:
        raise body_exc


# How long a session that was cancelled or interrupted waits for its lease's release: the
# caller asked to stop, and a server that does not answer by then may not for a long while
# (a stall, a failover); the lease expires on its own after its lease time.
RELEASE_WHEN_STOPPED_S = 1.0


async def _release(
    store: object, run_id: str, holder: str, lease_s: float,
    release: Callable[[], Awaitable[None]], stopped: bool = False,
) -> None:
    """Release the lease, shielded and bounded in time (``RELEASE_WHEN_STOPPED_S`` when the
    session was cancelled or interrupted); a failure is logged, never raised."""
    bound = RELEASE_WHEN_STOPPED_S if stopped else max(lease_s, 5.0)
    with anyio.CancelScope(shield=True), anyio.move_on_after(bound) as scope:
        try:
            await release()
            return
        except Exception as exc:  # it expires on its own; do not mask the body's outcome
            problem = f"{type(exc).__name__}: {exc}"
    if scope.cancelled_caught:
        problem = f"no answer within {bound:.3g} s" + (
            " of the run being cancelled or interrupted" if stopped else "")
    _log.warning(
        "%r: could not release the lease on run %r held by %r (%s); it expires after %.3g s, "
        "and this worker takes it over at once if it claims the run again",
        store,
        run_id,
        holder,
        problem,
        lease_s,
        extra={"run_id": run_id},
    )


async def _renew(
    run_id: str,
    lease_s: float,
    last_ok: float,
    token: int,
    renew: _Renew,
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
                ok, current = await renew(token)
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
                problem = RunLocked(run_id, current or "<nobody: the lease was released>")
        lost.append(problem)
        scope.cancel()
        return
