"""FileStore leases: an exclusive flock per run, released with its holder's process."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydantic import BaseModel

from interpreters.stores.file import LEASES, FileStore
from stroma.errors import RunLocked, StoreError, StromaTypeError

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]


class Num(BaseModel):
    value: int


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """FileStore runs on both backends (its blocking calls in a worker thread)."""
    return str(request.param)


def lock_files(path: Path) -> list[str]:
    folder = path / LEASES
    return sorted(os.listdir(folder)) if folder.exists() else []


@pytest.mark.parametrize("same_instance", [True, False], ids=["same store", "other store"])
async def test_a_second_session_gets_run_locked_naming_the_holder(
    anyio_backend: str, tmp_path: Path, same_instance: bool
) -> None:
    """While one session holds a run, another (of the same FileStore or another one on the
    folder) gets RunLocked naming the run and the holder; other runs are not locked."""
    store = FileStore(tmp_path)
    other = store if same_instance else FileStore(tmp_path)
    async with store.lease("r", "worker-a"):
        with pytest.raises(RunLocked) as caught:
            async with other.lease("r", "worker-b"):
                raise AssertionError("two sessions hold run 'r'")
        assert caught.value.run_id == "r" and caught.value.holder == "worker-a"
        assert "'r'" in str(caught.value) and "worker-a" in str(caught.value)
        async with other.lease("s", "worker-b"):
            pass


async def test_a_released_lease_can_be_taken_again(anyio_backend: str, tmp_path: Path) -> None:
    """Once a session ends its lease, the next claim gets the run; the lock file no longer
    names the old holder."""
    store = FileStore(tmp_path)
    async with store.lease("r", "worker-a"):
        (name,) = lock_files(tmp_path)
        assert (tmp_path / LEASES / name).read_text() == "worker-a"
    assert (tmp_path / LEASES / name).read_text() == ""
    async with FileStore(tmp_path).lease("r", "worker-b"):
        assert (tmp_path / LEASES / name).read_text() == "worker-b"


async def test_an_error_or_a_cancellation_in_the_body_releases_the_lease(
    anyio_backend: str, tmp_path: Path
) -> None:
    """The body's exception goes through unchanged and a cancellation from outside is
    honoured; both release the run."""
    store = FileStore(tmp_path)
    with pytest.raises(ZeroDivisionError):
        async with store.lease("r", "worker-a"):
            1 / 0  # noqa: B018
    with anyio.move_on_after(0.05) as scope:
        async with store.lease("r", "worker-b"):
            await anyio.sleep(30)
    assert scope.cancelled_caught
    async with store.lease("r", "worker-c"):
        pass


async def test_delete_leaves_a_live_lease_to_its_holder_and_removes_an_idle_one(
    anyio_backend: str, tmp_path: Path
) -> None:
    """Deleting a run's data while a session holds its lease does not hand the run to
    another session; deleting a run nobody holds removes its lock file too."""
    store = FileStore(tmp_path)
    async with store.lease("r", "worker-a"):
        await store.save("r", "n", Num(value=1))
        await FileStore(tmp_path).delete("r")
        with pytest.raises(RunLocked):
            async with FileStore(tmp_path).lease("r", "worker-b"):
                pass
        assert await store.load("r", "n") is None
    assert lock_files(tmp_path) != []
    await store.delete("r")
    assert lock_files(tmp_path) == []
    async with FileStore(tmp_path).lease("r", "worker-b"):
        pass


async def test_a_holder_that_is_not_a_string_is_refused(anyio_backend: str, tmp_path: Path) -> None:
    with pytest.raises(StromaTypeError, match="holder must be a str"):
        async with FileStore(tmp_path).lease("r", 7):  # type: ignore[arg-type]
            pass
    assert lock_files(tmp_path) == []


HOLDER = textwrap.dedent("""
    import sys, time, anyio
    from interpreters.stores.file import FileStore

    async def main() -> None:
        async with FileStore(sys.argv[1]).lease("r", "process-holder"):
            print("HELD", flush=True)
            time.sleep(120)

    anyio.run(main)
""")


def test_a_lease_held_by_a_killed_process_is_free_at_once(tmp_path: Path) -> None:
    """Another process holding the run: RunLocked naming it (and ``lease_holder`` says
    who). Once that process is killed
    (SIGKILL, so nothing of its own releases anything), the kernel has released the lock:
    the next claim gets the run at once, with no expiry to wait for."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)], cwd=ROOT, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "HELD"

        async def claim() -> None:
            async with FileStore(tmp_path).lease("r", "this-process"):
                pass

        with pytest.raises(RunLocked) as caught:
            anyio.run(claim)
        assert caught.value.holder == "process-holder"
        assert anyio.run(FileStore(tmp_path).lease_holder, "r") == "process-holder"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    # (the killed process's name is still in the file; nobody holds the lock)
    assert anyio.run(FileStore(tmp_path).lease_holder, "r") is None
    anyio.run(claim)


def read_only_leases(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Opening for writing, or making, anything under the store's leases folder fails as on
    a folder this process may only read (root ignores file modes, so it is simulated)."""
    real_open, real_makedirs = os.open, os.makedirs
    leases = str(tmp_path / LEASES)

    def open_(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if str(path).startswith(leases) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    def makedirs(path: Any, *args: Any, **kwargs: Any) -> None:
        if str(path).startswith(leases):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        real_makedirs(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "makedirs", makedirs)


@pytest.mark.parametrize("lock_file_made", [False, True], ids=["no lock file", "lock file"])
async def test_a_store_folder_this_process_may_only_read(
    anyio_backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lock_file_made: bool
) -> None:
    """A process that cannot write the leases folder (a reader of someone else's store) can
    still claim a run to read it: with no lock file there is none to take (it cannot write
    the run either); a lock file a writer made is locked through a read-only descriptor,
    so a writer holding the run still excludes it."""
    if lock_file_made:
        async with FileStore(tmp_path).lease("r", "writer"):
            pass
    read_only_leases(monkeypatch, tmp_path)
    async with FileStore(tmp_path).lease("r", "reader"):
        pass
    if lock_file_made:
        monkeypatch.undo()
        async with FileStore(tmp_path).lease("r", "writer"):
            read_only_leases(monkeypatch, tmp_path)
            with pytest.raises(RunLocked) as caught:
                async with FileStore(tmp_path).lease("r", "reader"):
                    pass
            assert caught.value.holder == "writer"
    else:
        assert lock_files(tmp_path) == []


@pytest.mark.parametrize("how", ["removed", "replaced"])
async def test_a_write_after_the_lock_file_was_removed_is_refused(
    anyio_backend: str, tmp_path: Path, how: str
) -> None:
    """The lock file of a held run removed (or replaced) from outside: another session could
    now claim the run through a new file, so the holder's next commit and save are refused
    with a StoreError saying why, and the log keeps only what was written before."""
    store = FileStore(tmp_path)
    header, line = await _log_lines("r")
    async with store.lease("r", "worker-a"):
        await store.append_log("r", [header, line])
        (name,) = lock_files(tmp_path)
        lock = tmp_path / LEASES / name
        lock.unlink()
        if how == "replaced":
            lock.write_text("someone else")
        async with FileStore(tmp_path).lease("r", "worker-b"):  # now possible
            for write in (store.append_log("r", [line], ("n", Num(value=2))),
                          store.save("r", "n", Num(value=3))):
                with pytest.raises(StoreError) as caught:
                    await write
                assert "lease file" in str(caught.value) and "'r'" in str(caught.value)
    log = await FileStore(tmp_path).read_log("r")
    assert log is not None and len(log.records) == 1
    assert await FileStore(tmp_path).load("r", "n") is None


async def _log_lines(run_id: str) -> tuple[str, str]:
    """A log's header line and one record line (a real run's, on an in-memory store)."""
    from stroma import InMemoryStore, StromaRunner

    runner = StromaRunner.quick(store=InMemoryStore(), run_id=run_id)

    @runner.node("n", input=Num, output=Num)
    async def node(state: Num) -> dict[str, int]:
        return {"value": state.value + 1}

    result = await runner.run([node], Num(value=0))
    header, first, *_ = result.log.lines()  # type: ignore[union-attr]
    return header, first


async def test_lease_holder_names_the_session_holding_a_run(
    anyio_backend: str, tmp_path: Path
) -> None:
    """``lease_holder`` of a run nobody ever ran, of one held, and of one released; looking
    never keeps a claim out (a claim waits out the moment a look holds the file)."""
    store = FileStore(tmp_path)
    assert await store.lease_holder("r") is None
    async with store.lease("r", "worker-a"):
        assert await FileStore(tmp_path).lease_holder("r") == "worker-a"
    assert await store.lease_holder("r") is None

    async def look() -> None:
        for _ in range(200):
            await store.lease_holder("r")

    async with anyio.create_task_group() as tg:
        tg.start_soon(look)
        for _ in range(50):
            async with FileStore(tmp_path).lease("r", "worker-b"):
                await anyio.sleep(0)


async def test_a_fifo_where_a_lock_file_goes_is_a_store_error_not_a_hang(
    anyio_backend: str, tmp_path: Path
) -> None:
    """A FIFO planted where a run's lock file goes: asking who holds the run, or claiming
    it, is a StoreError naming the path (opening a FIFO would wait for a writer for ever)."""
    store = FileStore(tmp_path)
    async with store.lease("other", "worker-a"):
        pass  # (the leases folder exists)
    os.mkfifo(tmp_path / LEASES / "r.lock")
    with anyio.fail_after(10), pytest.raises(StoreError, match="not a regular file") as caught:
        await store.lease_holder("r")
    assert str(tmp_path / LEASES / "r.lock") in str(caught.value)
    with anyio.fail_after(10), pytest.raises(StoreError, match="not a regular file"):
        async with store.lease("r", "worker-b"):
            pass


async def test_a_folder_where_the_log_goes_is_named_by_its_path(
    anyio_backend: str, tmp_path: Path
) -> None:
    store = FileStore(tmp_path)
    await store.save("r", "n", BaseModelState(v=1))
    log = next((tmp_path / "runs").iterdir()) / "log.jsonl"
    log.mkdir()
    with pytest.raises(StoreError) as caught:
        await store.read_log("r")
    assert str(log) in str(caught.value)


async def test_a_folder_where_a_checkpoint_goes_is_named_by_its_path(
    anyio_backend: str, tmp_path: Path
) -> None:
    store = FileStore(tmp_path)
    await store.save("r", "n", BaseModelState(v=1))
    [checkpoint] = (next((tmp_path / "runs").iterdir()) / "checkpoints").iterdir()
    checkpoint.unlink()
    checkpoint.mkdir()
    with pytest.raises(StoreError) as caught:
        await store.save("r", "n", BaseModelState(v=2))
    assert str(checkpoint) in str(caught.value) and "~tmp" not in str(caught.value)


class BaseModelState(BaseModel):
    v: int


_INTERRUPTED = textwrap.dedent("""
    import sys
    import anyio
    from pydantic import BaseModel
    from stroma import FileStore, NodeContract, RunConfig, interpret, parallel, seq, stroma_node

    class S(BaseModel):
        n: int = 0

    calls = {"n": 0}

    def node(name):
        async def call(s: S) -> S:
            calls["n"] += 1
            if calls["n"] == 3 and sys.argv[2] == "interrupt":
                await anyio.sleep(0.03)
                raise KeyboardInterrupt
            await anyio.sleep(0.002)
            return s.model_copy(update={"n": s.n + 1})
        return stroma_node(name, NodeContract(node_id=name, input_schema=S, output_schema=S))(call)

    plan = seq(node("a"), parallel(seq(node("b1"), node("b2")),
                                   seq(parallel(node("c"), node("d"), node("e")))))
    run = lambda store: anyio.run(lambda: interpret(plan, S(), store=store,
                                                    config=RunConfig(run_id="r")))
    try:
        run(FileStore(sys.argv[1]))
    except KeyboardInterrupt:
        print("interrupted")
    sys.argv[2] = "go on"
    print(run(FileStore(sys.argv[1])).status.value)
""")


def test_a_session_an_interrupt_cut_off_in_this_process_lets_the_run_go(
    tmp_path: Path,
) -> None:
    """A KeyboardInterrupt raised inside a nested group leaves asyncio's loop before the
    session can release its lease; running the run again in the same process (a notebook,
    a REPL) resumes it instead of finding it locked until the process exits."""
    out = subprocess.run([sys.executable, "-c", _INTERRUPTED, str(tmp_path), "interrupt"],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["interrupted", "RESUMED"], out.stderr[-2000:]


async def test_run_locked_says_when_the_holder_is_this_process(
    anyio_backend: str, tmp_path: Path
) -> None:
    from interpreters.stores._lease import new_holder

    store = FileStore(tmp_path)
    async with store.lease("r", new_holder()):
        with pytest.raises(RunLocked, match="a session of this very process"):
            async with FileStore(tmp_path).lease("r", new_holder()):
                pass
