"""FileStore after a full disk or a failing disk: a failed append is rolled back.

A run whose commit fails (ENOSPC on a really full tmpfs, or EIO from write or fsync) ends
with a StoreError; once space is back, the *same* FileStore instance resumes it to the right
result, and every later read of the log, by that instance or a fresh one, is whole: no line
of the failed commit is left behind to be appended after.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

import interpreters.stores.file as file_module
from interpreters.stores.file import FileStore
from stroma import NodeContract, parallel, stroma_node
from stroma.errors import StoreError
from stroma.runner import RunConfig, interpret

pytestmark = pytest.mark.anyio

PAD = "x" * 2500  # records of a few KiB, so a commit is likely torn across the last page


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """FileStore runs on asyncio and on trio."""
    return str(request.param)


class Doc(BaseModel):
    value: int
    pad: str = ""


class Left(BaseModel):
    left: int


class Right(BaseModel):
    right: int


class Both(BaseModel):
    left: int
    right: int


def nodes() -> list[Any]:
    """step0 -> step1 -> parallel(left, right) -> join -> step3 -> step4, padded states."""

    def node(node_id: str, inp: type[BaseModel], out: type[BaseModel], body: Any) -> Any:
        contract = NodeContract(node_id=node_id, input_schema=inp, output_schema=out)

        async def fn(state: Any) -> Any:
            return body(state)

        return stroma_node(node_id, contract)(fn)

    def inc(s: Doc) -> dict[str, Any]:
        return {"value": s.value + 1, "pad": PAD}

    return [
        node("step0", Doc, Doc, inc),
        node("step1", Doc, Doc, inc),
        parallel(node("left", Doc, Left, lambda s: {"left": s.value * 10}),
                 node("right", Doc, Right, lambda s: {"right": s.value})),
        node("join", Both, Doc, lambda s: {"value": s.left + s.right, "pad": PAD}),
        node("step3", Doc, Doc, inc),
        node("step4", Doc, Doc, inc),
    ]


FINAL = Doc(value=(2 * 10 + 2) + 2, pad=PAD)


def assert_store_error(exc: BaseException) -> None:
    """What a failed commit raises is a StoreError (inside a fan-out, only StoreErrors)."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            assert_store_error(inner)
        return
    assert isinstance(exc, StoreError), repr(exc)


async def assert_whole(root: Path, run_id: str, same: FileStore, status: str) -> None:
    """Every line of the log is whole JSON, and the log reads back finished with ``status``
    through the same instance and through a fresh one."""
    path = root / "runs" / run_id / "log.jsonl"
    for n, line in enumerate(path.read_bytes().split(b"\n")[:-1]):
        try:
            json.loads(line)
        except ValueError:
            pytest.fail(f"line {n + 1} of {path} is not JSON: {line[:80]!r}")
    for store in (same, FileStore(root)):
        log = await store.read_log(run_id)
        assert log is not None and log.finish is not None
        assert str(log.finish.status) == status


class CountingStore(FileStore):
    """A FileStore that runs ``before(n)`` before its n-th append (from 0)."""

    def __init__(self, path: Path, before: Any = None) -> None:
        super().__init__(path)
        self.appends = 0
        self.before = before

    async def append_log(self, *args: Any, **kwargs: Any) -> None:
        n, self.appends = self.appends, self.appends + 1
        if self.before is not None:
            self.before(n)
        await super().append_log(*args, **kwargs)


async def appends_of_a_run(tmp_path: Path) -> int:
    store = CountingStore(tmp_path / "count")
    result = await interpret(nodes(), Doc(value=0), store=store, config=RunConfig(run_id="c"))
    assert result.final_state == FINAL
    return store.appends


# ----------------------------------------------------------------- a really full disk


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs mounted for this test (skips where mounting is not allowed)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root; the injected-error tests below cover "
                    "the same commits")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); the injected-error "
                    "tests below cover the same commits")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(path: Path) -> None:
    """Write ``path`` until the file system is full (ENOSPC), to the last byte."""
    with open(path, "ab", buffering=0) as f:
        for size in (1 << 16, 1 << 12, 1 << 9, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e


async def test_a_commit_failing_on_a_full_disk_is_rolled_back_at_every_append(
    small_disk: Path, tmp_path: Path
) -> None:
    """The disk fills up right before each append of a run in turn: the run fails with a
    StoreError, space is freed, the same instance resumes it to the right result, and the
    log is whole for that instance and a fresh one."""
    total = await appends_of_a_run(tmp_path)
    assert total >= 8
    filler = small_disk / "filler"
    failed = 0
    for k in range(total):
        run_id = f"full-{k}"
        store = CountingStore(small_disk, lambda n, k=k: fill(filler) if n == k else None)
        try:
            first = await interpret(nodes(), Doc(value=0), store=store,
                                    config=RunConfig(run_id=run_id))
        except BaseException as exc:
            assert_store_error(exc)
            assert "free space" in str(exc) or isinstance(exc, BaseExceptionGroup)
            failed += 1
        else:  # the commit fitted in the last page the log file already had
            assert first.final_state == FINAL
        filler.unlink()
        store.before = None
        result = await interpret(nodes(), Doc(value=0), store=store,
                                 config=RunConfig(run_id=run_id))
        assert result.final_state == FINAL
        await assert_whole(small_disk, run_id, store, str(result.status))
        await store.delete(run_id)
    assert failed >= total - 2, f"only {failed} of {total} commits met the full disk"


# -------------------------------------------------------------- injected disk errors


def fail_once(monkeypatch: pytest.MonkeyPatch, name: str, k: int, error: int,
              partial: bool = False, rollback_fails: bool = False) -> list[int]:
    """Make the k-th call of ``file_module.<name>`` fail with ``error`` (writing half of
    its data first if ``partial``; and the rollback's ftruncate too if ``rollback_fails``)."""
    original = getattr(file_module, name)
    calls: list[int] = []
    real_ftruncate = os.ftruncate

    def failing_ftruncate(fd: int, size: int) -> None:
        monkeypatch.setattr(file_module.os, "ftruncate", real_ftruncate)
        raise OSError(errno.EIO, "injected: the rollback failed too")

    def patched(fd: int, *args: Any) -> Any:
        calls.append(1)
        if len(calls) - 1 != k:
            return original(fd, *args)
        if partial and args:
            os.write(fd, args[0][: len(args[0]) // 2])
        if rollback_fails:
            monkeypatch.setattr(file_module.os, "ftruncate", failing_ftruncate)
        raise OSError(error, f"injected: {os.strerror(error)}")

    monkeypatch.setattr(file_module, name, patched)
    return calls


@pytest.mark.parametrize(
    ("name", "error", "partial", "rollback_fails"),
    [
        ("_write_all", errno.ENOSPC, True, False),
        ("_write_all", errno.EIO, True, True),
        ("_fsync", errno.EIO, False, False),
        ("_fsync", errno.EIO, False, True),
    ],
    ids=["torn-write", "torn-write-rollback-fails", "fsync-fails", "fsync-and-rollback-fail"],
)
async def test_an_append_failing_in_write_or_fsync_is_rolled_back_at_every_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, error: int, partial: bool,
    rollback_fails: bool,
) -> None:
    """Each os.write or fsync of a run fails in turn (half the bytes written first, the
    rollback failing too in some cases): the same instance resumes the run, and the log is
    whole and finished for it and for a fresh instance."""
    k = 0
    while True:
        run_id = f"inject-{k}"
        store = FileStore(tmp_path / "store")
        calls = fail_once(monkeypatch, name, k, error, partial, rollback_fails)
        try:
            first = await interpret(nodes(), Doc(value=0), store=store,
                                    config=RunConfig(run_id=run_id))
        except BaseException as exc:
            assert_store_error(exc)
            failed = True
        else:
            failed = False
            assert first.final_state == FINAL
        monkeypatch.undo()
        if len(calls) <= k:  # k is past the run's last call: every call has failed once
            assert not failed
            break
        result = await interpret(nodes(), Doc(value=0), store=store,
                                 config=RunConfig(run_id=run_id))
        assert result.final_state == FINAL
        await assert_whole(tmp_path / "store", run_id, store, str(result.status))
        k += 1
    assert k >= 8
