"""FileStore: typed round-trips, safe names, atomic writes, and damaged input read back safely."""

from __future__ import annotations

import enum
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from interpreters.stores import file as file_module
from interpreters.stores.file import FileStore, RunInfo
from stroma import effects as fx
from stroma.errors import LogCorrupted, StoreError, UnsafeSchemaRef
from stroma.failures import FailureClass
from stroma.log import EffectLog, LogHeader, Record, encode_header, encode_record
from stroma.trace import RunStatus, TraceEvent

pytestmark = pytest.mark.anyio

T0 = datetime(2026, 11, 23, 16, 0, tzinfo=UTC)
SLOW = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(params=["asyncio", "trio"], scope="module")
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """FileStore runs on both anyio backends (aiofiles serves asyncio, anyio threads trio)."""
    return str(request.param)


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Inner(BaseModel):
    when: datetime
    tags: list[str]


class Outer(BaseModel):
    name: str
    color: Color
    inner: Inner
    by_key: dict[str, Inner]
    maybe: int | None = None


class Step(BaseModel):
    v: int


def outer() -> Outer:
    inner = Inner(when=T0 + timedelta(microseconds=5), tags=["a", "é", ""])
    return Outer(name="n", color=Color.BLUE, inner=inner, by_key={"k": inner}, maybe=None)


# ---------------------------------------------------------------------------- log helpers


def sample_log(run_id: str = "r1", nodes: int = 3, finish: bool = True) -> EffectLog:
    """A log with calls, trace records, checkpoints, a parallel group and (maybe) a Finish."""
    header = LogHeader(
        run_id=run_id, plan="fp0", seed=7, version="0.2.0", started_at=T0.isoformat(),
        config={"initial": {"schema": "x:Step", "state": {"v": -1}}},
    )
    records: list[Record] = []
    for k in range(nodes):
        node = f"n{k}"
        records.append(
            (fx.CallNode(node, 1), fx.NodeReturned({"v": k}, T0, 5, input_tokens=3, model="m"))
        )
        records.append((fx.Commit(node, run_id, 1, T0, {"v": k - 1}, {"v": k}, 5, "x:Step",
                                  Step(v=k)), None))
    error = fx.ErrorInfo(("builtins.ValueError", "builtins.Exception"), "bad")
    group = fx.CallParallel("parallel(a, b)", 1, calls=(fx.CallNode("a", 1), fx.CallNode("b", 1)))
    outcomes = (fx.NodeReturned({"a": 1}, T0, 2), fx.NodeRaised(error, T0, 3))
    records.append((group, fx.ParallelReturned(T0, 4, outcomes=outcomes)))
    records.append(
        (fx.ClassifyFailure("b", 1, error), fx.FailureClassified((FailureClass.TERMINAL,)))
    )
    records.append(
        (
            fx.RecordAttempt.of(
                TraceEvent("b", run_id, 1, T0, {"v": 2}, None, 3, FailureClass.TERMINAL, "bad")
            ),
            None,
        )
    )
    if finish:
        records.append((fx.Finish(RunStatus.FAILED, Step(v=2), 9, 0.25, 19, "terminal"), None))
    return EffectLog(header, records)


async def write_log(store: FileStore, log: EffectLog) -> None:
    """Append a log the way an interpreter does: the header, then one commit per record."""
    run_id = log.header.run_id
    await store.append_log(run_id, [encode_header(log.header)])
    for i, rec in enumerate(log.records):
        effect = rec[0] if isinstance(rec, tuple) else None
        checkpoint = (
            (effect.node_id, Step.model_validate_json(effect.output_state))
            if isinstance(effect, fx.Commit) else None
        )
        await store.append_log(run_id, encode_record(i, rec), checkpoint)


def log_path(root: Path | str, run: str = "r1") -> Path:
    return Path(root) / "runs" / run / "log.jsonl"


def all_files(root: Path | str) -> Iterator[Path]:
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            yield Path(folder) / name


def assert_inside(root: Path | str) -> None:
    real_root = os.path.realpath(root)
    for path in all_files(root):
        real = os.path.realpath(path)
        assert real.startswith(real_root + os.sep), f"{path} escaped {root}"
        assert len(path.name.encode()) <= 255


# ------------------------------------------------------------------------- round trips


async def test_nested_enum_datetime_models_come_back_typed(tmp_path: Path) -> None:
    """A saved model with nested models, an enum and aware datetimes loads back equal and typed."""
    store = FileStore(tmp_path)
    await store.save("run", "node", outer())
    loaded = await FileStore(tmp_path).load("run", "node")
    assert type(loaded) is Outer
    assert loaded == outer()
    assert isinstance(loaded.color, Color) and loaded.inner.when.tzinfo is not None


async def test_save_typed_and_load_typed_validate_with_the_given_schema(tmp_path: Path) -> None:
    """load_typed validates the stored data with the schema it is given."""
    store = FileStore(tmp_path)
    await store.save_typed("run", "node", outer(), Outer)
    assert await store.load_typed("run", "node", Outer) == outer()
    await store.save("run", "step", Step(v=3))
    assert await store.load_typed("run", "step", Step) == Step(v=3)


async def test_missing_checkpoint_run_and_log_are_none(tmp_path: Path) -> None:
    """Anything never saved loads as None, in a store folder that does not even exist yet."""
    store = FileStore(tmp_path / "not-yet")
    assert await store.load("nope", "node") is None
    assert await store.load_typed("nope", "node", Step) is None
    assert await store.read_log("nope") is None
    assert await store.run_ids() == []
    assert await store.list_runs() == []
    await store.save("run", "a", Step(v=1))
    assert await store.load("run", "b") is None


async def test_save_overwrites_the_previous_checkpoint(tmp_path: Path) -> None:
    """Saving a node twice keeps only the latest state."""
    store = FileStore(tmp_path)
    await store.save("run", "node", Step(v=1))
    await store.save("run", "node", Step(v=2))
    assert await store.load("run", "node") == Step(v=2)


async def test_delete_removes_one_run_and_nothing_else(tmp_path: Path) -> None:
    """delete(run) removes that run's checkpoints and log, leaves other runs whole."""
    store = FileStore(tmp_path)
    for run in ("a", "b"):
        await store.save(run, "node", Step(v=1))
        await write_log(store, sample_log(run))
    await store.delete("a")
    assert await store.load("a", "node") is None
    assert await store.read_log("a") is None
    assert await store.load("b", "node") == Step(v=1)
    assert await store.read_log("b") == sample_log("b")
    assert await store.run_ids() == ["b"]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["b"]
    await store.delete("never-existed")
    # The run id can be used again from scratch after a delete.
    await write_log(store, sample_log("a"))
    assert await store.read_log("a") == sample_log("a")


async def test_a_commit_that_started_completes_despite_cancellation(tmp_path: Path) -> None:
    """A save whose caller is cancelled still lands whole: writes are shielded."""
    store = FileStore(tmp_path)
    with anyio.CancelScope() as scope:
        scope.cancel()
        await store.save("run", "node", Step(v=5))
    assert await store.load("run", "node") == Step(v=5)


async def test_aiofiles_serves_asyncio_and_anyio_threads_serve_trio(anyio_backend: str) -> None:
    """The store picks aiofiles' executor only where an asyncio loop runs."""
    assert file_module._on_asyncio() is (anyio_backend == "asyncio")


# ----------------------------------------------------------------------------- ids


NASTY_IDS = [
    "../x",
    "/",
    "a/../../b",
    "..",
    ".",
    ".hidden",
    "a\\..\\b",
    "C:\\x",
    "~tmp.1234",
    "%2e%2e",
    "Run-A",
    "run-a",
    "ünï/cödé ☃ 🎉",
    "con",
    " ",
    "x" * 1000,
    "é" * 300,
    "line\nbreak",
]


@pytest.mark.parametrize("ident", NASTY_IDS)
async def test_nasty_ids_round_trip_inside_the_store(tmp_path: Path, ident: str) -> None:
    """Hostile run and node ids round-trip, and every file stays under the store's folder."""
    store = FileStore(tmp_path / "store")
    await store.save(ident, ident, Step(v=1))
    await write_log(store, sample_log(ident))
    fresh = FileStore(tmp_path / "store")
    assert await fresh.load(ident, ident) == Step(v=1)
    assert await fresh.read_log(ident) == sample_log(ident)
    assert await fresh.run_ids() == [ident]
    assert_inside(tmp_path / "store")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


@pytest.mark.parametrize(
    ("ident", "says"),
    [("", "empty"), ("a\x00b", "NUL"), ("\x00", "NUL"), ("\ud800", "surrogate"), (3, "int")],
)
async def test_unusable_ids_are_refused_with_a_store_error(
    tmp_path: Path, ident: str, says: str
) -> None:
    """Empty, NUL-bearing, non-UTF-8 and non-str ids are a StoreError saying what is allowed."""
    store = FileStore(tmp_path)
    calls = [
        store.save(ident, "n", Step(v=1)),
        store.save("r", ident, Step(v=1)),
        store.load(ident, "n"),
        store.load("r", ident),
        store.read_log(ident),
        store.delete(ident),
        store.append_log(ident, [encode_header(sample_log().header)]),
    ]
    for call in calls:
        with pytest.raises(StoreError) as info:
            await call
        assert says in str(info.value) and "non-empty str without NUL" in str(info.value)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


async def test_ids_differing_only_in_case_get_separate_folders(tmp_path: Path) -> None:
    """'Run' and 'run' never share a folder, even on a case-insensitive file system."""
    store = FileStore(tmp_path)
    await store.save("Run", "Node", Step(v=1))
    await store.save("run", "node", Step(v=2))
    names = [p.name for p in (tmp_path / "runs").iterdir()]
    assert len({n.lower() for n in names}) == 2
    assert await store.load("Run", "Node") == Step(v=1)
    assert await store.load("run", "node") == Step(v=2)
    assert await store.load("run", "Node") is None


async def test_a_very_long_run_id_gets_a_hashed_folder_that_remembers_it(tmp_path: Path) -> None:
    """A 1000-char run id is stored under a hashed name with run.json keeping the real id."""
    long_id = "r" * 1000
    store = FileStore(tmp_path)
    await store.save(long_id, "n" * 1000, Step(v=1))
    (folder,) = (tmp_path / "runs").iterdir()
    assert folder.name.startswith("~") and len(folder.name) == 65
    assert json.loads((folder / "run.json").read_text()) == {"run_id": long_id}
    assert await store.run_ids() == [long_id]
    assert await FileStore(tmp_path).load(long_id, "n" * 1000) == Step(v=1)


async def test_foreign_folders_in_runs_are_not_listed(tmp_path: Path) -> None:
    """Folders the store did not write (odd names, leftovers) are not reported as runs."""
    store = FileStore(tmp_path)
    await store.save("real", "n", Step(v=1))
    for name in ("UPPER", "%zz", "~del.abcd", "~" + "0" * 64, "%2E", "%2e"[:2]):
        (tmp_path / "runs" / name).mkdir()
    (tmp_path / "runs" / "a-file").write_text("x")
    assert await store.run_ids() == ["real"]


async def test_a_symlinked_run_folder_is_refused(tmp_path: Path) -> None:
    """A symlink planted in the store never leads a read or a write outside it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "store" / "runs").mkdir(parents=True)
    (tmp_path / "store" / "runs" / "evil").symlink_to(outside, target_is_directory=True)
    store = FileStore(tmp_path / "store")
    with pytest.raises(StoreError, match="symlink"):
        await store.save("evil", "n", Step(v=1))
    with pytest.raises(StoreError, match="symlink"):
        await store.load("evil", "n")
    with pytest.raises(StoreError, match="symlink"):
        await store.read_log("evil")
    (outside / "checkpoints").mkdir()  # also when the folder it would write to exists
    with pytest.raises(StoreError, match="symlink"):
        await store.append_log("evil", [encode_header(sample_log("evil").header)])
    assert list(all_files(outside)) == [outside / "checkpoints"]


@SLOW
@given(
    ident=st.text(st.characters(codec=None), max_size=300)
    | st.text("./\\\x00~%aAé ", max_size=12)
)
async def test_any_text_id_round_trips_or_is_refused_and_stays_inside(ident: str) -> None:
    """For any text, a run/node id round-trips or is a StoreError; no file leaves the root."""
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "store")
        store = FileStore(root)
        try:
            await store.save(ident, ident, Step(v=1))
        except StoreError:
            assert ident == "" or "\x00" in ident or any(0xD800 <= ord(c) < 0xE000 for c in ident)
            assert not os.path.exists(os.path.join(root, "runs")) or not os.listdir(
                os.path.join(root, "runs")
            )
        else:
            assert await FileStore(root).load(ident, ident) == Step(v=1)
            assert await store.run_ids() == [ident]
        assert_inside(root)
        assert os.listdir(tmp) in ([], ["store"])


# ----------------------------------------------------------------------- atomic writes


async def test_atomic_writes_leave_no_temp_files(tmp_path: Path) -> None:
    """After saves and log appends the store holds only the expected files, no temp files
    (checkpoints committed with the log are lines of log.jsonl, not files)."""
    store = FileStore(tmp_path)
    for k in range(3):
        await store.save("run", "node", Step(v=k))
    await write_log(store, sample_log("run"))
    files = sorted(str(p.relative_to(tmp_path)) for p in all_files(tmp_path))
    assert files == [
        "runs",
        "runs/run",
        "runs/run/checkpoints",
        "runs/run/checkpoints/node.json",
        "runs/run/log.jsonl",
    ]


async def test_a_failed_rename_keeps_the_old_checkpoint_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the write fails before the rename, the previous checkpoint is intact and whole."""
    store = FileStore(tmp_path)
    await store.save("run", "node", Step(v=1))

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device", dst)

    monkeypatch.setattr(file_module.os, "replace", broken_replace)
    with pytest.raises(StoreError, match="No space left on device"):
        await store.save("run", "node", Step(v=2))
    monkeypatch.undo()
    assert await FileStore(tmp_path).load("run", "node") == Step(v=1)
    assert [p.name for p in (tmp_path / "runs" / "run" / "checkpoints").iterdir()] == [
        "node.json"
    ]


async def test_stale_temp_files_of_a_crashed_writer_are_removed(tmp_path: Path) -> None:
    """A temp file left by a killed process is cleaned up the next time the run is written."""
    store = FileStore(tmp_path)
    await store.save("run", "node", Step(v=1))
    stale = tmp_path / "runs" / "run" / "checkpoints" / "~tmp.0123456789abcdef"
    stale.write_bytes(b'{"schema": "torn')
    await FileStore(tmp_path).save("run", "other", Step(v=2))
    assert not stale.exists()


async def test_append_log_with_a_checkpoint_makes_both_readable(tmp_path: Path) -> None:
    """After append_log returns, a fresh store reads the lines and the checkpoint."""
    store = FileStore(tmp_path)
    log = sample_log()
    await store.append_log("r1", [encode_header(log.header), *encode_record(0, log.records[0])])
    await store.append_log("r1", encode_record(1, log.records[1]), ("n0", Step(v=0)))
    fresh = FileStore(tmp_path)
    assert await fresh.load("r1", "n0") == Step(v=0)
    got = await fresh.read_log("r1")
    assert got is not None and got.records == log.records[:2]
    await store.append_log("r1", [], None)  # nothing to do is fine
    await store.append_log("r1", [], ("n1", Step(v=1)))  # a checkpoint alone is fine
    assert await fresh.load("r1", "n1") == Step(v=1)


async def test_starting_a_second_log_for_a_run_is_refused(tmp_path: Path) -> None:
    """A header appended to a run that already has a log is a StoreError, not a corrupt log."""
    store = FileStore(tmp_path)
    await write_log(store, sample_log())
    for s in (store, FileStore(tmp_path)):
        with pytest.raises(StoreError, match="already has a log"):
            await s.append_log("r1", [encode_header(sample_log().header)])
    assert await store.read_log("r1") == sample_log()


async def test_records_without_a_header_are_refused(tmp_path: Path) -> None:
    """The first append of a run must start with the header line."""
    store = FileStore(tmp_path)
    with pytest.raises(StoreError, match="header"):
        await store.append_log("r1", encode_record(0, sample_log().records[0]))
    with pytest.raises(StoreError, match="line break"):
        await store.append_log("r1", [encode_header(sample_log().header) + "\n{}"])
    with pytest.raises(TypeError, match="sequence of str"):
        await store.append_log("r1", encode_header(sample_log().header))


# ------------------------------------------------------------------------ list_runs


async def test_list_runs_sums_up_each_run(tmp_path: Path) -> None:
    """list_runs reports status, nodes done, start time and total duration of each run."""
    store = FileStore(tmp_path)
    await write_log(store, sample_log("done"))
    await write_log(store, sample_log("crashed", nodes=2, finish=False))
    await store.save("ckpt-only", "a", Step(v=1))
    await write_log(store, sample_log("broken"))
    path = log_path(tmp_path, "broken")
    path.write_bytes(path.read_bytes().replace(b'"i":1', b'"i":7', 1))
    runs = {r.run_id: r for r in await store.list_runs()}
    assert runs["done"] == RunInfo("done", "FAILED", 3, T0.isoformat(), 3 * 5 + 3)
    assert runs["crashed"] == RunInfo("crashed", "running/crashed", 2, T0.isoformat(), 2 * 5 + 3)
    assert runs["ckpt-only"] == RunInfo("ckpt-only", "no log", 1, None, None)
    assert runs["broken"].status == "damaged" and str(path) in (runs["broken"].problem or "")
    assert [r.run_id for r in await store.list_runs()] == await store.run_ids()


# ---------------------------------------------------------------------- damaged logs


async def test_a_log_round_trips_exactly(tmp_path: Path) -> None:
    """What append_log wrote reads back as an equal log, byte for byte."""
    store = FileStore(tmp_path)
    log = sample_log()
    await write_log(store, log)
    written = log_path(tmp_path).read_text().splitlines(keepends=True)
    assert "".join(x for x in written if not x.startswith('{"ckpt"')) == log.to_jsonl()
    got = await store.read_log("r1")
    assert got == log and got is not None and got.completed_nodes() == ["n0", "n1", "n2"]


async def test_the_log_file_read_as_text_is_the_log(tmp_path: Path) -> None:
    """log.jsonl holds the checkpoints committed with its records as lines of their own:
    EffectLog.from_jsonl of the file's text (as replay's hint says to read it) skips them
    and is the log the store reads, and damage is named by the file's own line."""
    log = sample_log()
    await write_log(FileStore(tmp_path), log)
    data = log_path(tmp_path).read_bytes()
    assert b'{"ckpt":1,' in data

    assert EffectLog.from_jsonl(data.decode()) == await FileStore(tmp_path).read_log("r1")
    lines = data.decode().splitlines(keepends=True)
    bad = max(k for k, x in enumerate(lines) if k and not x.startswith('{"ckpt"'))
    lines[bad] = lines[bad].replace('"i":', '"i":"x",', 1)
    with pytest.raises(LogCorrupted, match=rf"\bline {bad + 1}\b"):
        EffectLog.from_jsonl("".join(lines))


async def test_a_torn_last_line_recovers_to_the_last_whole_record(tmp_path: Path) -> None:
    """Cutting the log anywhere inside its last line reads back as the log without that record."""
    log = sample_log()
    await write_log(FileStore(tmp_path), log)
    data = log_path(tmp_path).read_bytes()
    start = data.rindex(b"\n", 0, len(data) - 1) + 1
    shorter = EffectLog(log.header, log.records[:-1])
    for cut in range(start, len(data)):
        log_path(tmp_path).write_bytes(data[:cut])
        assert await FileStore(tmp_path).read_log("r1") == shorter, cut


async def test_a_whole_last_line_that_does_not_read_is_damage_not_a_torn_tail(
        tmp_path: Path) -> None:
    """A crash cuts a line before its newline; a last line that has its newline and does
    not read was damaged after it was written: LogCorrupted naming the file's line, and
    nothing is cut off or written over (the records it holds were committed). A line of
    NUL bytes is what a power loss leaves of a write never made durable: dropped."""
    log = sample_log(finish=False)
    await write_log(FileStore(tmp_path), log)
    data = log_path(tmp_path).read_bytes()
    start = data.rindex(b"\n", 0, len(data) - 1) + 1
    damaged = data[:start] + data[start:].replace(b"}", b"]", 1)
    log_path(tmp_path).write_bytes(damaged)

    with pytest.raises(LogCorrupted, match=r"log\.jsonl: line \d+: not JSON"):
        await FileStore(tmp_path).read_log("r1")
    last = len(log.records) - 1
    with pytest.raises(LogCorrupted):
        await FileStore(tmp_path).append_log("r1", encode_record(last, log.records[last]))
    assert log_path(tmp_path).read_bytes() == damaged

    log_path(tmp_path).write_bytes(data[:start] + b"\x00" * (len(data) - start - 1) + b"\n")
    assert await FileStore(tmp_path).read_log("r1") == EffectLog(log.header, log.records[:-1])


async def test_a_torn_multibyte_character_is_a_torn_tail(tmp_path: Path) -> None:
    """A last line cut inside a UTF-8 character is dropped like any torn line."""
    log = sample_log(nodes=1, finish=False)
    log.records.append((fx.CallNode("é☃", 1), fx.NodeReturned({"s": "☃☃"}, T0, 1)))
    await write_log(FileStore(tmp_path), log)
    data = log_path(tmp_path).read_bytes()
    cut = data.rindex("☃".encode()) + 1
    log_path(tmp_path).write_bytes(data[:cut])
    assert await FileStore(tmp_path).read_log("r1") == EffectLog(log.header, log.records[:-1])


async def test_a_torn_parallel_group_is_dropped_whole(tmp_path: Path) -> None:
    """A parallel group cut between its child lines reads back without the group."""
    log = sample_log(finish=False)
    log.records[:] = log.records[: log.records.index(next(
        r for r in log.records if isinstance(r, tuple) and isinstance(r[0], fx.CallParallel)
    )) + 1]
    await write_log(FileStore(tmp_path), log)
    data = log_path(tmp_path).read_bytes()
    last_child = data.rindex(b"\n", 0, len(data) - 1) + 1
    log_path(tmp_path).write_bytes(data[:last_child])
    assert await FileStore(tmp_path).read_log("r1") == EffectLog(log.header, log.records[:-1])


@pytest.mark.parametrize("read_first", [True, False])
async def test_appending_after_a_torn_tail_cuts_it_off_first(
    tmp_path: Path, read_first: bool
) -> None:
    """A run resumed after a crash appends after its last whole record, not after torn bytes."""
    log = sample_log()
    await write_log(FileStore(tmp_path), log)
    data = log_path(tmp_path).read_bytes()
    start = data.rindex(b"\n", 0, len(data) - 1) + 1
    log_path(tmp_path).write_bytes(data[: start + 7])
    store = FileStore(tmp_path)
    if read_first:
        assert await store.read_log("r1") == EffectLog(log.header, log.records[:-1])
    last = len(log.records) - 1
    await store.append_log("r1", encode_record(last, log.records[last]))
    assert log_path(tmp_path).read_bytes() == data
    assert await FileStore(tmp_path).read_log("r1") == log


async def test_a_log_with_only_a_torn_header_reads_as_no_log(tmp_path: Path) -> None:
    """A crash during the very first append leaves no log: read None, and a new log can start."""
    log = sample_log()
    await write_log(FileStore(tmp_path), log)
    log_path(tmp_path).write_bytes(log.to_jsonl().encode()[:20])
    store = FileStore(tmp_path)
    assert await store.read_log("r1") is None
    await write_log(store, log)
    assert await FileStore(tmp_path).read_log("r1") == log


@pytest.mark.parametrize(
    ("garbage", "says"),
    [(b"\xff\xfe\x00garbage", "not UTF-8"), (b"{garbage", "line 3: not JSON")],
)
async def test_garbage_in_the_middle_names_the_file(
    tmp_path: Path, garbage: bytes, says: str
) -> None:
    """Garbage bytes inside the log (not at its tail) are a LogCorrupted naming the file."""
    await write_log(FileStore(tmp_path), sample_log())
    lines = log_path(tmp_path).read_bytes().split(b"\n")
    lines[2] = garbage + lines[2]
    log_path(tmp_path).write_bytes(b"\n".join(lines))
    with pytest.raises(LogCorrupted) as info:
        await FileStore(tmp_path).read_log("r1")
    assert str(log_path(tmp_path)) in str(info.value) and says in str(info.value)
    with pytest.raises(LogCorrupted):  # nothing is appended after damage
        await FileStore(tmp_path).append_log("r1", ["{}"])


async def test_a_header_of_another_format_version_names_the_file(tmp_path: Path) -> None:
    """A log written in another format version is refused, naming the file and the version."""
    await write_log(FileStore(tmp_path), sample_log())
    data = log_path(tmp_path).read_bytes().replace(b'"stroma_log":2', b'"stroma_log":3', 1)
    log_path(tmp_path).write_bytes(data)
    with pytest.raises(LogCorrupted) as info:
        await FileStore(tmp_path).read_log("r1")
    assert str(log_path(tmp_path)) in str(info.value) and "version 3" in str(info.value)


async def test_a_log_of_another_run_is_refused(tmp_path: Path) -> None:
    """A log file copied into another run's folder is a LogCorrupted, not that run's history."""
    await write_log(FileStore(tmp_path), sample_log("other"))
    (tmp_path / "runs" / "r1").mkdir()
    log_path(tmp_path).write_bytes(log_path(tmp_path, "other").read_bytes())
    with pytest.raises(LogCorrupted, match="names run 'other'"):
        await FileStore(tmp_path).read_log("r1")


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b'{"schema": "x:Step", "da', "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[" * 100_000, "not JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b'{"data": {}}', "keys ['data']"),
        (b'{"schema": "REF", "node_id": "node", "data": {"v": "x"}}', "does not validate"),
        (b'{"schema": "REF", "node_id": "other", "data": {"v": 1}}', "holds node 'other'"),
    ],
)
async def test_a_checkpoint_that_does_not_parse_names_the_file(
    tmp_path: Path, content: bytes, says: str
) -> None:
    """A damaged checkpoint is a LogCorrupted naming the file and the problem, never None."""
    store = FileStore(tmp_path)
    await store.save("run", "node", Step(v=1))
    path = tmp_path / "runs" / "run" / "checkpoints" / "node.json"
    path.write_bytes(content.replace(b"REF", f"{Step.__module__}:Step".encode()))
    for load in (store.load("run", "node"), store.load_typed("run", "node", Step)):
        with pytest.raises(LogCorrupted) as info:
            await load
        assert str(path) in str(info.value) and says in str(info.value)


# A valid log's lines, mutated by flips, inserts, deletes, truncation and line duplication.
_Mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.integers(1, 40)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("dupline"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("dropline"), st.integers(0, 10**6), st.just(0)),
)


def mutate(data: bytes, ops: list[tuple[str, int, object]]) -> bytes:
    for op, where, arg in ops:
        if not data:
            break
        at = where % len(data)
        if op == "flip":
            assert isinstance(arg, int)
            data = data[:at] + bytes([data[at] ^ arg]) + data[at + 1 :]
        elif op == "insert":
            assert isinstance(arg, bytes)
            data = data[:at] + arg + data[at:]
        elif op == "delete":
            assert isinstance(arg, int)
            data = data[:at] + data[at + arg :]
        elif op == "truncate":
            data = data[:at]
        else:
            lines = data.split(b"\n")
            k = where % len(lines)
            lines[k:k + 1] = [lines[k], lines[k]] if op == "dupline" else []
            data = b"\n".join(lines)
    return data


_VALID = sample_log().to_jsonl().encode()


@SLOW
@given(ops=st.lists(_Mutation, min_size=1, max_size=3), fresh=st.booleans())
async def test_mutated_logs_give_a_log_or_log_corrupted_only(
    ops: list[tuple[str, int, object]], fresh: bool
) -> None:
    """Whatever the damage, read_log returns a log (None if no line is whole) or LogCorrupted;
    and a log it could read takes the next record as a whole line after it."""
    data = mutate(_VALID, ops)
    with tempfile.TemporaryDirectory() as tmp:
        path = log_path(tmp)
        path.parent.mkdir(parents=True)
        path.write_bytes(data)
        store = FileStore(tmp)
        try:
            log = await store.read_log("r1")
        except LogCorrupted as e:
            assert str(path) in str(e)
            return
        if log is None:
            assert b"\n" not in data
            return
        assert isinstance(log, EffectLog)
        await store.list_runs()
        record = (fx.CallNode("next", 1), fx.NodeReturned({"v": 1}, T0, 1))
        appender = FileStore(tmp) if fresh else store  # with or without what read_log saw
        await appender.append_log("r1", encode_record(len(log.records), record))
        again = await FileStore(tmp).read_log("r1")
        assert again is not None and again.records[:-1] == log.records
        assert again.records[-1] == record


# ------------------------------------------------------------------------ schemas


@pytest.mark.parametrize("ref", ["os:system", "stroma_never_imported_module:Evil", "builtins:eval"])
async def test_a_tampered_schema_ref_is_refused_and_nothing_is_imported(
    tmp_path: Path, ref: str
) -> None:
    """A checkpoint naming an undeclared schema is UnsafeSchemaRef; sys.modules gains nothing."""
    store = FileStore(tmp_path)
    await store.save("run", "node", Step(v=1))
    path = tmp_path / "runs" / "run" / "checkpoints" / "node.json"
    envelope = json.loads(path.read_text())
    envelope["schema"] = ref
    path.write_text(json.dumps(envelope))
    before = set(sys.modules)
    with pytest.raises(UnsafeSchemaRef) as info:
        await FileStore(tmp_path).load("run", "node")
    assert set(sys.modules) == before
    assert ref in str(info.value) and str(path) in str(info.value)
    # The caller who names the schema itself still gets its data: the stored ref is not used.
    assert await FileStore(tmp_path).load_typed("run", "node", Step) == Step(v=1)


@pytest.mark.anyio
async def test_the_newer_of_file_and_log_checkpoint_wins(tmp_path: Path) -> None:
    """A checkpoint committed with the log and one saved as a file: load answers the newer."""
    store = FileStore(tmp_path)
    log = sample_log()
    await store.append_log("r1", [encode_header(log.header)], ("n0", Step(v=1)))
    assert await FileStore(tmp_path).load("r1", "n0") == Step(v=1)
    await store.save("r1", "n0", Step(v=2))
    assert await FileStore(tmp_path).load("r1", "n0") == Step(v=2)
    await store.append_log("r1", encode_record(0, log.records[0]), ("n0", Step(v=3)))
    assert await FileStore(tmp_path).load("r1", "n0") == Step(v=3)
    got = await FileStore(tmp_path).read_log("r1")
    assert got is not None and got.records == log.records[:1]
