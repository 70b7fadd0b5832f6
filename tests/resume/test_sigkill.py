"""Crash safety: SIGKILL a 30-node FileStore run at random moments, then resume it."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import anyio
import pytest

from interpreters.stores.file import FileStore
from tests.resume.worker import N

ROOT = Path(__file__).resolve().parents[2]
TRIALS = 8


def _start(store: Path, run_id: str, effects: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.resume.worker", str(store), run_id, str(effects)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _lines(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line]


async def _completed(store: Path, run_id: str) -> list[str]:
    log = await FileStore(store).read_log(run_id)
    return [] if log is None else log.completed_nodes()


async def _everything_reads_back(store: Path, run_id: str) -> None:
    fs = FileStore(store)
    log = await fs.read_log(run_id)
    assert log is not None
    from tests.resume.worker import Acc

    for i in range(N):
        state = await fs.load_typed(run_id, f"step{i:02d}", Acc)
        assert state is not None and state.value == i + 1


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume(tmp_path: Path) -> None:
    """Whenever the process dies, resuming completes with the uninterrupted final state,
    no node whose completion was durable runs again, and every stored file reads back."""
    rng = random.Random(20261123)
    # An uninterrupted run gives the reference result.
    ref = _start(tmp_path / "ref", "ref", tmp_path / "ref.effects")
    out, err = ref.communicate(timeout=120)
    assert ref.returncode == 0, err
    assert out.split() == ["COMPLETED", str(N)]

    kills_landed = 0
    for trial in range(TRIALS):
        store = tmp_path / f"store{trial}"
        effects = tmp_path / f"effects{trial}"
        run_id = f"crash-{trial}"
        target = rng.randrange(1, N)
        proc = _start(store, run_id, effects)
        deadline = time.monotonic() + 60
        while len(_lines(effects)) < target and proc.poll() is None:
            assert time.monotonic() < deadline, "the worker made no progress"
            time.sleep(0.001)
        time.sleep(rng.random() * 0.004)  # land somewhere inside a node or a write
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills_landed += 1
        proc.communicate(timeout=30)

        done_before = anyio.run(_completed, store, run_id)
        ran_before = Counter(_lines(effects))

        resumed = _start(store, run_id, effects)
        out, err = resumed.communicate(timeout=120)
        assert resumed.returncode == 0, err
        status, value = out.split()
        assert value == str(N)
        assert status in ("RESUMED", "COMPLETED")

        ran_after = Counter(_lines(effects)) - ran_before
        for node_id in done_before:
            assert ran_after[node_id] == 0, f"{node_id} completed before the kill but ran again"
        total = Counter(_lines(effects))
        assert set(total) == {f"step{i:02d}" for i in range(N)}
        assert all(count <= 2 for count in total.values())
        anyio.run(_everything_reads_back, store, run_id)
    assert kills_landed >= TRIALS // 2


def _start_nested(store: Path, run_id: str, effects: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.resume.nested_worker", str(store), run_id,
         str(effects)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


@pytest.mark.slow
def test_sigkill_inside_a_map_within_a_map_then_resume(tmp_path: Path) -> None:
    """Killed anywhere inside a map_each nested in another's item, a FileStore run resumes
    to the uninterrupted result in another process, and only the one call in flight at
    the kill runs again (every step is one at a time): the inner items that had committed
    are not called again, nor the outer items that had finished."""
    rng = random.Random(20261203)
    ref = _start_nested(tmp_path / "ref", "ref", tmp_path / "ref.effects")
    out, err = ref.communicate(timeout=120)
    assert ref.returncode == 0, err
    ref_status, ref_state = out.split(" ", 1)
    assert ref_status == "COMPLETED"
    calls = _lines(tmp_path / "ref.effects")
    assert len(calls) == len(set(calls))  # one line per logical call, keys unique

    kills_landed = 0
    for trial in range(6):
        store = tmp_path / f"store{trial}"
        effects = tmp_path / f"effects{trial}"
        run_id = f"nested-{trial}"
        target = rng.randrange(2, len(calls) - 1)
        proc = _start_nested(store, run_id, effects)
        deadline = time.monotonic() + 60
        while len(_lines(effects)) < target and proc.poll() is None:
            assert time.monotonic() < deadline, "the worker made no progress"
            time.sleep(0.001)
        time.sleep(rng.random() * 0.003)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills_landed += 1
        proc.communicate(timeout=30)

        resumed = _start_nested(store, run_id, effects)
        out, err = resumed.communicate(timeout=120)
        assert resumed.returncode == 0, err
        status, state = out.split(" ", 1)
        assert status in ("RESUMED", "COMPLETED") and state == ref_state
        ran = Counter(_lines(effects))
        assert len(ran) == len(calls)  # as many logical calls (keys hold the run id)
        again = sum(n - 1 for n in ran.values())
        assert again <= 1, f"{again} calls ran again: {[k for k, n in ran.items() if n > 1]}"
    assert kills_landed >= 3
