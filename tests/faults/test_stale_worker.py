"""A worker paused past its lease cannot write: real processes, SIGSTOP/SIGCONT, both servers.

Worker A runs a 10-node run with a 1 s lease; while A is inside a node it is stopped
(SIGSTOP) for longer than the lease; worker B takes the run over and finishes it (RESUMED,
the right value); then A is continued (SIGCONT) and its pending commit of the node is
refused by the fence (or its renewal finds the lease gone first). Either way B's log stays
intact: it reads back, a fresh ``interpret`` returns B's result without running anything.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from stroma.runner import RunConfig, interpret
from tests.faults.worker import Acc, N, build, make_store

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
TRIALS = 3
LEASE_MS = 1000


def _start(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.faults.worker", *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").split() if path.exists() else []


async def test_a_worker_paused_past_its_lease_cannot_write_into_the_run_taken_over(
    server: tuple[str, str, str], repo_env: dict[str, str], tmp_path: Path
) -> None:
    """After A is paused past its lease and B finished the run, A's late commit is refused
    (A ends with a lease error, never DONE), and B's log reads back whole: finished
    RESUMED with the right value, and interpreting it again runs nothing."""
    kind, target, name = server
    for trial in range(TRIALS):
        run_id = f"stale-{trial}"
        effects_a, effects_b = tmp_path / f"a{trial}", tmp_path / f"b{trial}"
        block_at = f"step{3 + 2 * trial:02d}"
        a = _start(repo_env, kind, target, name, run_id, str(LEASE_MS), str(effects_a),
                   block_at, "once")
        try:
            deadline = time.monotonic() + 60
            while block_at not in _lines(effects_a):  # A is inside the blocking node
                assert a.poll() is None, a.communicate()
                assert time.monotonic() < deadline, "worker A made no progress"
                await anyio.sleep(0.005)
            a.send_signal(signal.SIGSTOP)
            stopped_at = time.monotonic()
            b = _start(repo_env, kind, target, name, run_id, str(LEASE_MS), str(effects_b),
                       "-", "wait")
            out_b, err_b = b.communicate(timeout=90)
            assert out_b.split()[:3] == ["DONE", "RESUMED", str(N)], (out_b, err_b)
            await anyio.sleep(max(0.0, 1.6 - (time.monotonic() - stopped_at)))
            a.send_signal(signal.SIGCONT)
            out_a, err_a = a.communicate(timeout=60)
        finally:
            if a.poll() is None:
                os.kill(a.pid, signal.SIGCONT)
                a.kill()
                a.communicate()
        assert out_a.startswith("ERROR "), (out_a, err_a)
        assert out_a.split()[1] in {"LeaseLost", "RunLocked", "StoreError"}, out_a
        # B did not run again what A had committed before it stopped.
        done_by_a = _lines(effects_a)[:-1]  # the last one was in flight
        assert not set(done_by_a) & set(_lines(effects_b)), (done_by_a, _lines(effects_b))
        await _intact(kind, target, name, run_id, tmp_path / f"c{trial}")


async def _intact(kind: str, target: str, name: str, run_id: str, effects: Path) -> None:
    store: Any = make_store(kind, target, name, LEASE_MS)
    try:
        log = await store.read_log(run_id)  # LogCorrupted if A's write had landed
        assert log is not None and log.finish is not None
        assert str(log.finish.status) == "RESUMED"
        again = await interpret(build(str(effects), "-"), Acc(value=0), store=store,
                                config=RunConfig(run_id=run_id))
        assert str(again.status) == "RESUMED" and again.final_state == Acc(value=N)
        assert not effects.exists()  # nothing ran
    finally:
        await store.close()
