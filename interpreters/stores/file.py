"""FileStore: checkpoints and effect logs in a folder, durable across crashes.

Layout under the store's folder ``path``::

    path/runs/<run>/log.jsonl                 the effect log (JSON lines, appended, fsync'd),
                                              with the checkpoints committed with it
    path/runs/<run>/checkpoints/<node>.json   checkpoints saved with ``save``:
                                              {"ns": ..., "schema": "mod:Qual", "node_id": ...,
                                               "data": ...}
    path/runs/<run>/inputs/<key>.json         inputs sent to the run while it waits
                                              (``put_input``): {"key": ..., "text": ...}
    path/runs/<run>/run.json                  {"run_id": ...}, only for hashed folder names
    path/leases/<run>.lock                    the run's lease (flock), naming its holder

**Names.** A run id, node id or input key (``approval``, ``approval@agent#3``,
``approval@fan[2]``) becomes a file name by percent-encoding (lower-case hex) every
UTF-8 byte outside ``[a-z0-9_.-]``, and a leading ``.``: ``extract`` stays ``extract``,
``../x`` becomes ``%2e.%2fx``, ``Run-A`` becomes ``%52un-%41``. The encoding is reversible,
never yields ``.``/``..``/a separator, and gives no upper-case letters, so two ids never
share a folder even on a case-insensitive file system (macOS, Windows). A name longer than
200 bytes is replaced by ``~`` and the SHA-256 of the id (the real id is kept in
``run.json`` / the checkpoint's ``node_id`` / the input's ``key``). Ids must be non-empty
str without NUL that encode as UTF-8; anything else is a ``StoreError`` saying what is
allowed. Run folders are also checked after resolving symlinks: nothing is ever read or
written outside ``path``.

**Durability.** ``save`` writes a checkpoint file atomically: a temp file ``~tmp.<random>``
in the same folder, written with one ``os.write`` (no user-space buffer, so nothing to
flush), fsync'd, ``os.replace``'d over the old file, then the folder is fsync'd.
``append_log`` is a run's commit: its lines (and, when given, the node's checkpoint as a
line ``{"ckpt":1,"ns":...,"schema":...,"node_id":...,"data":...}`` placed before the records
that say it was saved) are appended with one write and one fsync, so when it returns the
node's checkpoint and its log records are durable together, for the price of one fsync per
node. ``read_log`` skips checkpoint lines; ``load`` answers with the newer of the node's
checkpoint file and its last checkpoint line (``ns`` orders them). A crash can leave only a
torn last line, which ``read_log`` drops (the run's last whole record wins) and the next
``append_log`` cuts off before appending; or a stale ``~tmp.*`` file, which is removed the
next time this run is written.

**Inputs.** ``put_input`` writes the input's file atomically and durably (temp file in the
run's ``inputs`` folder, fsync, rename, folder fsync), so ``get_input`` reads the old text or
the new one, whole. Inputs are not part of the log: a put for a run another process is
running (``send_input`` while a worker holds the run) is allowed, touches only the
``inputs`` folder (never the log, the checkpoints or their temp files) and so never damages
the run. A temp file left by a put that crashed is removed by a later put once it is a
minute old (a put in progress is done long before that).

**Threads, aiofiles and trio.** Every blocking call (open, write, fsync, rename, read) runs
in a worker thread, one thread hop per store operation: a node's whole commit (temp file,
fsync, rename, folder fsync, log append, fsync) is a single hop, which keeps the per-node
cost to the system calls themselves. On asyncio the hop goes through aiofiles' executor
wrapper (``aiofiles.os.wrap``); aiofiles needs a running asyncio loop
(``asyncio.get_running_loop()``) and fails under trio with "no running event loop", so on
any other backend the hop is ``anyio.to_thread.run_sync``. Writes are shielded from
cancellation: a commit that has started finishes before the cancellation is delivered, so a
cancelled run never leaves a half-done commit racing the next one.

**Leases.** ``lease(run_id, holder)`` claims a run for one worker session, as the Redis and
PostgreSQL stores do (``interpret`` holds it while the run goes on): an exclusive ``flock``
on ``path/leases/<run>.lock``, a file that holds the holder's name. A second session of the
run, in this process or another one on the same machine, gets ``RunLocked`` naming the
holder. The kernel releases the lock when the holder's process dies (a crash, SIGKILL), so
a crashed run can be resumed at once, with no expiry to wait for; and the lock cannot lapse
while its holder lives (a paused holder keeps it). What is fenced is the lock file itself:
a write of a run leased by this instance is refused (``StoreError``, nothing written) if the
file was removed or replaced since, as another session could hold the run through a new
one. A lock file is removed with its run by ``delete``, unless a session holds it then (the
lease stays with its holder, as in the other stores). A claim checks, once it holds the
lock, that the file it locked is still the one at that path, so a removal racing a claim
never gives two sessions the run. A process that may only read the store's folder (someone
else's store) locks a lock file a writer made through a read-only descriptor, and where
there is none goes on without one: it cannot write the run, so it has nothing to exclude.

``flock`` is local to a machine: over a network file system (NFS, SMB) it may not exclude
a worker on another machine, and on Windows (no ``fcntl``) ``lease`` excludes nothing; give
each worker its own run ids there. A process that forks while it holds a lease shares the
lock with its child (the lock file is opened close-on-exec, so ``subprocess`` children do
not).

Apart from ``put_input`` (see Inputs), a run is written by the session holding its lease;
one FileStore instance per folder and process is the intended use.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import stat
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeVar, cast
from urllib.parse import unquote_to_bytes

import aiofiles.os
import anyio
import anyio.to_thread
from pydantic import BaseModel, ValidationError

from interpreters.stores._checks import checkpoint_json, require_model_type
from interpreters.stores._common import (
    DAMAGED,
    NO_LOG,
    RUNNING_OR_CRASHED,
    RunInfo,
    check_input_text,
    run_info,
)
from interpreters.stores._common import check_state as _check_state
from interpreters.stores._common import resolve as _resolve
from interpreters.stores._lease import locked, loop_gone, session_loop
from stroma.errors import (
    LogCorrupted,
    StoreError,
    StromaTypeError,
    StromaValueError,
)
from stroma.log import EffectLog
from stroma.schemas import _schema_ref, declare_schema, read_state

__all__ = (
    "CHECKPOINTS",
    "DAMAGED",
    "INPUTS",
    "LEASES",
    "LOG_NAME",
    "MAX_NAME_BYTES",
    "NO_LOG",
    "LogNotAFile",
    "RUNNING_OR_CRASHED",
    "RUN_INFO_NAME",
    "FileStore",
    "RunInfo",
)

_T = TypeVar("_T")
_log = logging.getLogger("stroma.stores")

MAX_NAME_BYTES = 200
LOG_NAME = "log.jsonl"
RUN_INFO_NAME = "run.json"
CHECKPOINTS = "checkpoints"
INPUTS = "inputs"
LEASES = "leases"
# A temp file in a run's inputs folder this old was left by a put that crashed.
_STALE_INPUT_TMP_SECONDS = 60.0
_TMP_PREFIX = "~tmp."
_TRASH_PREFIX = "~del."

_SAFE = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789_.-")
_TABLE = tuple(chr(b) if b in _SAFE else f"%{b:02x}" for b in range(256))
# Ids that are their own file name: the common case, checked without encoding.
_PLAIN = re.compile(rf"[a-z0-9_-][a-z0-9_.-]{{0,{MAX_NAME_BYTES - 1}}}")
_HASHED = re.compile(r"~[0-9a-f]{64}")
_HEADER_START = '{"stroma_log"'
# A checkpoint committed with the log is a line of log.jsonl that the effect log skips.
_CKPT_LINE = b'{"ckpt":1,'

_O_BINARY = getattr(os, "O_BINARY", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # a symlink planted in the store is refused
_WRITE_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BINARY | _O_CLOEXEC
_APPEND = os.O_WRONLY | os.O_APPEND | os.O_CREAT | _O_BINARY | _O_CLOEXEC | _O_NOFOLLOW
# (O_NONBLOCK: opening a FIFO planted in the store returns at once, to be refused as no
# regular file, instead of waiting for a writer for ever; it changes nothing for files.)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_READ = os.O_RDONLY | _O_BINARY | _O_CLOEXEC | _O_NOFOLLOW | _O_NONBLOCK
_LOCK_FILE = os.O_RDWR | os.O_CREAT | _O_BINARY | _O_CLOEXEC | _O_NOFOLLOW | _O_NONBLOCK
# What opening a file for writing in a folder this process may only read fails with.
_READ_ONLY = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


# ------------------------------------------------------------------------------ names


def _encode(kind: str, value: object, op: str) -> str:
    """The file name for a run or node id, or a StoreError saying what is wrong with it."""
    if type(value) is str and _PLAIN.fullmatch(value):
        return value
    allowed = (
        f"a {kind} must be a non-empty str without NUL characters that encodes as UTF-8; "
        "any such text is allowed (it is percent-encoded into a safe file name)"
    )
    if not isinstance(value, str):
        raise StoreError(f"{op}: the {kind} {value!r} is a {type(value).__name__}: {allowed}")
    if not value:
        raise StoreError(f"{op}: the {kind} is empty (''): {allowed}")
    if "\x00" in value:
        raise StoreError(f"{op}: the {kind} {value!r} contains a NUL character: {allowed}")
    try:
        raw = value.encode("utf-8")
    except UnicodeEncodeError:
        raise StoreError(
            f"{op}: the {kind} {value!r} has a lone surrogate and does not encode as UTF-8: "
            f"{allowed}"
        ) from None
    name = "".join(map(_TABLE.__getitem__, raw))
    if name.startswith("."):
        name = "%2e" + name[1:]
    if len(name) > MAX_NAME_BYTES:
        name = "~" + hashlib.sha256(raw).hexdigest()
    return name


def _decode(name: str) -> str | None:
    """The id an encoded (not hashed) name stands for; None for a name we did not write."""
    try:
        value = unquote_to_bytes(name).decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not value or "\x00" in value:
        return None
    try:
        again = _encode("id", value, "decode")
    except StoreError:
        return None
    return value if again == name else None


def _child(parent: str, name: str) -> str:
    """``parent/name`` for a name that cannot leave ``parent`` (checked, not assumed)."""
    if name in ("", ".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise StoreError(f"internal error: refusing the unsafe file name {name!r} in {parent}")
    return os.path.join(parent, name)


# ------------------------------------------------------------------------- blocking I/O

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: leases exclude nothing there
    fcntl = None  # type: ignore[assignment]

if sys.platform == "darwin":  # pragma: no cover - macOS only

    def _fsync(fd: int) -> None:
        # fsync on macOS does not flush the drive's cache; F_FULLFSYNC does.
        try:
            fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
        except OSError:
            os.fsync(fd)

else:
    _fsync = os.fsync


# The lock files this process holds, by path: (the descriptor, a weak reference to the
# holding session's asyncio event loop or None, the FileStore's list the descriptor is in).
_SESSIONS: dict[str, tuple[int, Any, list[int]]] = {}
_SESSIONS_LOCK = threading.Lock()


def _reclaim_abandoned(path: str) -> bool:
    """Let go of the lock file at ``path`` if a session of this process holds it whose
    event loop is closed: a KeyboardInterrupt (or SystemExit) raised in a node leaves
    asyncio's loop at once, and the session's task, never run again, cannot release its
    lease; nothing of that session runs any more, so nothing it could write needs the
    lock. True if the lock was let go (the claim then tries again)."""
    with _SESSIONS_LOCK:
        entry = _SESSIONS.get(path)
        if entry is None or entry[1] is None:
            return False
        fd, ref, held = entry
        if not loop_gone(ref):
            return False  # (its session may still be running)
        del _SESSIONS[path]
        if fd in held:
            held.remove(fd)
    with contextlib.suppress(OSError):
        os.close(fd)  # (releases the lock)
    _log.warning("FileStore: the lease of %s was held by a session of this process whose "
                 "event loop is closed (an interrupt cut it off); it is released", path)
    return True


def _flock_or_wait(fd: int, kind: int) -> None:
    """``flock(fd, kind)`` without blocking (BlockingIOError if another holds the file),
    except for a moment while the file names no holder: a lock taken by ``lease_holder``
    looking (shared, for microseconds) or by a claim that has not written its name yet."""
    for attempt in range(50):
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if attempt == 49 or os.pread(fd, 1, 0):  # a holder that says who it is
                raise
            time.sleep(0.002)


def _fsync_dir(path: str) -> None:
    """Make a folder's entries (a rename, a new file) durable."""
    if os.name == "nt":  # pragma: no cover - folders cannot be opened (or fsync'd) on Windows
        return
    fd = os.open(path, os.O_RDONLY | _O_CLOEXEC)
    try:
        _fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _write_atomic(folder: str, path: str, data: bytes) -> None:
    """Replace ``path`` by ``data`` so that a crash leaves the old or the new file, whole."""
    tmp = _child(folder, _TMP_PREFIX + secrets.token_hex(8))
    fd = os.open(tmp, _WRITE_NEW, 0o666)
    try:
        try:
            _write_all(fd, data)
            _fsync(fd)
        finally:
            os.close(fd)
        try:
            os.replace(tmp, path)
        except IsADirectoryError as e:  # (named by the file in the way, not the temp file)
            raise IsADirectoryError(e.errno, "a folder is where the store keeps a file: "
                                             "remove it", path) from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


def _read(path: str) -> bytes | None:
    try:
        fd = os.open(path, _READ)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        _regular(fd, path)
    except BaseException:
        os.close(fd)
        raise
    with open(fd, "rb") as f:
        return f.read()


class _NotAFile(OSError):
    """Something that is no regular file where the store keeps one."""


class LogNotAFile(LogCorrupted, StoreError):
    """A run's log is a folder, FIFO or device: the run is damaged (``runs`` lists it so),
    and the store cannot read it (a StoreError, as every failure of a store)."""


def _regular(fd: int, path: str) -> None:
    """Refuse what is no regular file where the store keeps one (a folder, a FIFO or a
    device planted there): an OSError naming the path (a StoreError once reported; a run
    whose log is one reads as damaged)."""
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        raise _NotAFile(errno.EINVAL, "not a regular file (a folder, FIFO or device is "
                                      "where the store keeps a file: remove it)", path)


def _call(fn: Callable[..., _T], *args: Any) -> _T:
    return fn(*args)


_aiofiles_call = aiofiles.os.wrap(_call)


def _on_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


async def _in_thread(fn: Callable[..., _T], *args: Any) -> _T:
    """Run blocking ``fn(*args)`` in a worker thread: aiofiles' on asyncio, anyio's otherwise."""
    if _on_asyncio():
        return cast(_T, await _aiofiles_call(fn, *args))
    return await anyio.to_thread.run_sync(fn, *args)


async def _in_thread_shielded(fn: Callable[..., _T], *args: Any) -> _T:
    with anyio.CancelScope(shield=True):
        result = await _in_thread(fn, *args)
    return result


# -------------------------------------------------------------------------- checkpoints


def _encode_checkpoint(node_id: str, state: BaseModel, op: str, *, line: bool = False) -> bytes:
    """A checkpoint envelope: a file of its own, or (``line``) a line of the run's log.

    ``ns`` orders the two kinds: a load answers with the newer one. StateNotSerializable
    (before anything is written) if the state's JSON cannot be made.
    """
    data = checkpoint_json(state, node_id, op)
    cls = type(state)
    declare_schema(cls)
    return b"".join(
        (
            _CKPT_LINE if line else b"{",
            b'"ns":',
            str(time.time_ns()).encode(),
            b',"schema":',
            json.dumps(_schema_ref(cls)).encode(),
            b',"node_id":',
            json.dumps(node_id).encode(),
            b',"data":',
            data,
            b"}",
        )
    )


def _ns(raw: bytes) -> int:
    """When a checkpoint envelope was written (0 for envelopes older than the field)."""
    head = raw[:48]
    at = head.find(b'"ns":')
    if at < 0:
        return 0
    digits = head[at + 5 :].split(b",", 1)[0]
    return int(digits) if digits.isdigit() else 0


def _decode_checkpoint(
    raw: bytes, node_id: str, schema: type[BaseModel] | None, source: str
) -> BaseModel:
    shape = 'a JSON object {"schema": "module:QualName", "node_id": ..., "data": {...}}'
    fix = "delete the file (the node runs again) or restore it from a backup"
    try:
        envelope = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise LogCorrupted(
            source, f"the checkpoint is not JSON ({e}); expected {shape}: {fix}"
        ) from None
    if not isinstance(envelope, dict) or "schema" not in envelope or "data" not in envelope:
        found = type(envelope).__name__
        if isinstance(envelope, dict):
            found = f"an object with keys {sorted(envelope)}"
        raise LogCorrupted(source, f"expected {shape}, found {found}: {fix}")
    stored_node = envelope.get("node_id", node_id)
    if stored_node != node_id:
        raise LogCorrupted(
            source,
            f"the checkpoint holds node {stored_node!r}, not {node_id!r}: the file was "
            f"moved or altered; {fix}",
        )
    cls = schema if schema is not None else _resolve(envelope["schema"], source)
    try:
        return read_state(cls, json.dumps(envelope["data"]))
    except (ValidationError, ValueError, RecursionError) as e:
        raise LogCorrupted(
            source,
            f"the checkpoint's data does not validate as {_schema_ref(cls)} ({e}); the schema "
            f"changed since it was saved, or the file was altered: {fix}",
        ) from None


def _decode_input(raw: bytes, key: str, source: str) -> str:
    shape = 'a JSON object {"key": ..., "text": "..."}'
    fix = "delete the file (the run waits for the input again) or send the input again"
    try:
        envelope = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise LogCorrupted(
            source, f"the input is not JSON ({e}); expected {shape}: {fix}"
        ) from None
    if (
        not isinstance(envelope, dict)
        or not isinstance(envelope.get("key"), str)
        or not isinstance(envelope.get("text"), str)
    ):
        found = type(envelope).__name__
        if isinstance(envelope, dict):
            found = f"an object with keys {sorted(envelope)}"
        raise LogCorrupted(source, f"expected {shape}, found {found}: {fix}")
    if envelope["key"] != key:
        raise LogCorrupted(
            source,
            f"the file holds the input {envelope['key']!r}, not {key!r}: the file was moved "
            f"or altered; {fix}",
        )
    text: str = envelope["text"]
    return text


# --------------------------------------------------------------------------------- runs


def _whole_end(data: bytes, records: int) -> int:
    """Where the last whole record of a parsed log ends in ``data``.

    The reader keeps every line whose record it could read and drops what follows: a torn
    tail, an unreadable last line, a parallel group cut short. Every record line carries its
    index ``i``, and the dropped lines belong to index ``records`` or are not JSON, so the
    end is found by stepping back over those lines from the last newline.
    """
    end = data.rfind(b"\n") + 1
    while end > 0:
        start = data.rfind(b"\n", 0, end - 1) + 1
        if start == 0:  # the header line
            break
        try:
            obj = json.loads(data[start:end])
        except (ValueError, RecursionError):
            obj = None
        index = obj.get("i") if isinstance(obj, dict) else None
        if isinstance(obj, dict) and "ckpt" in obj:
            break  # a whole checkpoint line (saved with the log, or alone)
        if isinstance(index, int | float) and (
            index < records or (index == records and "partial" in obj)
        ):
            break  # a whole record, or a finished child of the fan-out in flight
        end = start
    return end


class _Run:
    __slots__ = ("dir", "hashed", "run_id")

    def __init__(self, run_id: str, folder: str) -> None:
        self.run_id = run_id
        self.dir = folder
        self.hashed = os.path.basename(folder).startswith("~")


class FileStore:
    """Checkpoints and effect logs in a folder: one sub-folder per run, crash-safe writes.

    Implements the async checkpoint store protocol (``save``, ``load``, ``delete``,
    ``save_typed``, ``load_typed``) and ``LogStore`` (``append_log``, ``read_log``), keeps
    the inputs sent to waiting runs (``put_input``, ``get_input``), and lists its runs
    (``run_ids``, ``list_runs``). Works on asyncio and trio.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        try:
            root = os.fspath(path)
        except TypeError:
            raise StromaTypeError(
                f"FileStore(path): path must be a str or os.PathLike naming a folder, got "
                f"{path!r} (a {type(path).__name__})"
            ) from None
        if not isinstance(root, str) or not root or "\x00" in root:
            raise StromaValueError(
                f"FileStore(path): path must be a non-empty folder path without NUL, "
                f"got {path!r}"
            )
        self.path = os.path.abspath(root)
        self._runs = os.path.join(self.path, "runs")
        self._real_runs: str | None = None
        self._ready: set[str] = set()  # runs whose folder this instance has set up
        self._log_ok: set[str] = set()  # runs whose log is known to end on a whole record
        self._valid: dict[str, tuple[int, int]] = {}  # run -> (log size, whole-record bytes)
        # run -> the size its log must be cut back to: an append failed (a full disk, an I/O
        # error) and its rollback did too; the log is read as if cut, and cut before the
        # next append.
        self._cut: dict[str, int] = {}
        self._locks: dict[str, threading.Lock] = {}
        # run folder -> the lock files' descriptors of this instance's sessions holding it
        self._held: dict[str, list[int]] = {}

    def __repr__(self) -> str:
        return f"FileStore({self.path!r})"

    # -------------------------------------------------------------------- locations

    def _run(self, run_id: object, op: str) -> _Run:
        name = _encode("run id", run_id, op)
        return _Run(cast(str, run_id), _child(self._runs, name))

    def _checkpoint_path(self, run: _Run, node_id: object, op: str) -> str:
        name = _encode("node id", node_id, op)
        return _child(os.path.join(run.dir, CHECKPOINTS), name + ".json")

    def _input_path(self, run: _Run, key: object, op: str) -> str:
        name = _encode("input key", key, op)
        return _child(os.path.join(run.dir, INPUTS), name + ".json")

    def _lease_path(self, run: _Run) -> str:
        return _child(os.path.join(self.path, LEASES), os.path.basename(run.dir) + ".lock")

    def _lock(self, run: _Run) -> threading.Lock:
        lock = self._locks.get(run.dir)
        if lock is None:
            lock = self._locks.setdefault(run.dir, threading.Lock())
        return lock

    def _fail(
        self, op: str, run_id: str | None, e: OSError, key: str | None = None
    ) -> StoreError:
        what = f"FileStore.{op}" + ("" if run_id is None else f" for run {run_id!r}")
        if key is not None:
            what += f", input {key!r},"
        return StoreError(
            f"{what} in {self.path}: {e.strerror or e} "
            f"({e.filename if isinstance(e.filename, str) else self.path}); check "
            "that the folder exists, is readable and writable, and has free space"
        )

    # ---------------------------------------------------------------- sync internals

    def _check_inside(self, run: _Run, sub: str = CHECKPOINTS) -> None:
        """Refuse a run folder that symlinks lead out of the store (files are O_NOFOLLOW)."""
        if self._real_runs is None:
            self._real_runs = os.path.join(os.path.realpath(self.path), "runs")
        folder = os.path.join(run.dir, sub)
        expected = os.path.join(self._real_runs, os.path.basename(run.dir), sub)
        real = os.path.realpath(folder)
        if real != expected:
            raise StoreError(
                f"FileStore: the run folder {folder} resolves to {real}, not {expected}: a "
                f"symlink was planted in the store's folder {self.path}. Remove it."
            )

    def _prepare(self, run: _Run) -> None:
        """Create the run's folder (durably) the first time this instance writes to it."""
        if run.dir in self._ready:
            return
        checkpoints = os.path.join(run.dir, CHECKPOINTS)
        self._check_inside(run)  # before creating anything, and again once it exists
        if not os.path.isdir(checkpoints):
            created_root = not os.path.isdir(self._runs)
            os.makedirs(checkpoints, exist_ok=True)
            if created_root:
                _fsync_dir(os.path.dirname(self.path))
                _fsync_dir(self.path)
            _fsync_dir(self._runs)
            _fsync_dir(run.dir)
        self._check_inside(run)
        if run.hashed:
            self._own_folder(run, "FileStore")
        for name in os.listdir(checkpoints):  # temp files of a process that crashed
            if name.startswith(_TMP_PREFIX):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(checkpoints, name))
        self._ready.add(run.dir)

    def _own_folder(self, run: _Run, op: str) -> None:
        """A hashed run id's folder says whose it is: claimed for ``run`` if new, and a
        folder another run claimed (a hash collision, an altered file) refused."""
        info_path = os.path.join(run.dir, RUN_INFO_NAME)
        raw = _read(info_path)
        if raw is None:
            _write_atomic(run.dir, info_path, json.dumps({"run_id": run.run_id}).encode())
        elif self._stored_run_id(raw) != run.run_id:
            raise StoreError(
                f"{op}: the folder {run.dir} belongs to run {self._stored_run_id(raw)!r}, "
                f"not {run.run_id!r} (a hash collision, or an altered {RUN_INFO_NAME}); use "
                "another run id or fix the file"
            )

    @staticmethod
    def _stored_run_id(raw: bytes) -> str | None:
        try:
            obj = json.loads(raw)
        except (ValueError, RecursionError):
            return None
        value = obj.get("run_id") if isinstance(obj, dict) else None
        return value if isinstance(value, str) else None

    def _parse_log(self, run: _Run, data: bytes) -> tuple[EffectLog | None, int]:
        """The log in ``data`` (None if no line of it is whole) and its whole-record bytes."""
        if b"\n" not in data:  # the first append was cut short: nothing of it is durable
            return None, 0
        source = os.path.join(run.dir, LOG_NAME)
        text = data
        kept: list[int] | None = None  # the file's line number of each line read
        if _CKPT_LINE in data:  # the checkpoints committed with it are not effect records
            parts = data.split(b"\n")
            tail = parts.pop()  # after the last newline: b"", or a torn line
            kept = [i + 1 for i, x in enumerate(parts) if not x.startswith(_CKPT_LINE)]
            text = b"".join(parts[i - 1] + b"\n" for i in kept)
            if not tail.startswith(_CKPT_LINE):
                text += tail
                kept.append(len(parts) + 1)
        try:
            log = EffectLog.from_jsonl(text, source=source)
        except LogCorrupted as e:
            if kept is None:
                raise
            # Lines named as the file numbers them (its checkpoint lines counted).
            def number(m: re.Match[str]) -> str:
                n = int(m.group(1))
                return f"line {kept[n - 1] if 0 < n <= len(kept) else n}"

            raise LogCorrupted(e.source, re.sub(r"\bline (\d+)", number, e.problem)) from None
        if log.header.run_id != run.run_id:
            raise LogCorrupted(
                source,
                f"the header names run {log.header.run_id!r}, but this is the folder of run "
                f"{run.run_id!r}: the file was moved or copied from another run; move it back "
                "or delete it",
            )
        return log, _whole_end(data, len(log.records))

    def _save_sync(self, run: _Run, folder: str, path: str, data: bytes) -> None:
        with self._lock(run):
            self._fence(run, "save")
            self._prepare(run)
            _write_atomic(folder, path, data)

    def _load_sync(self, run: _Run, path: str, node_id: str) -> tuple[bytes | None, bytes | None]:
        """The checkpoint file's bytes and the last checkpoint line of the log for the node."""
        if run.dir not in self._ready:
            self._check_inside(run)
        line = None
        log = self._read_log_bytes(run)
        if log is not None and _CKPT_LINE in log:
            whole = log[: self._parse_log(run, log)[1]]  # not from a torn tail
            key = b'"node_id":' + json.dumps(node_id).encode() + b',"data":'
            for candidate in reversed(whole.split(b"\n")):
                if candidate.startswith(_CKPT_LINE) and key in candidate:
                    line = candidate
                    break
        return _read(path), line

    def _read_log_bytes(self, run: _Run) -> bytes | None:
        """The log file's bytes, without those of a failed append not yet cut off."""
        data = _read(os.path.join(run.dir, LOG_NAME))
        cut = self._cut.get(run.dir)
        if data is not None and cut is not None:
            try:
                self._cut_back(run)
            except OSError:
                pass  # read as if cut; the next append cuts it (or fails saying why)
            data = data[:cut]
        return data

    def _cut_back(self, run: _Run, fd: int | None = None) -> None:
        """Cut the log back to the size before a failed append (``_cut``), durably."""
        size = self._cut[run.dir]
        if fd is None:
            fd = os.open(os.path.join(run.dir, LOG_NAME), os.O_WRONLY | _O_CLOEXEC | _O_NOFOLLOW)
            try:
                self._cut_back(run, fd)
            finally:
                os.close(fd)
            return
        if os.fstat(fd).st_size > size:
            os.ftruncate(fd, size)
        _fsync(fd)
        del self._cut[run.dir]

    def _append_sync(
        self, run: _Run, data: bytes, header: bool, checkpoint: tuple[str, bytes] | None
    ) -> None:
        with self._lock(run):
            self._fence(run, "append_log")
            self._prepare(run)
            if not data:
                if checkpoint is not None:
                    _write_atomic(os.path.dirname(checkpoint[0]), checkpoint[0], checkpoint[1])
                return
            log_path = os.path.join(run.dir, LOG_NAME)
            fd = os.open(log_path, _APPEND, 0o666)
            try:
                if run.dir in self._cut:
                    self._cut_back(run, fd)  # raises (nothing appended) if it still cannot
                size = os.fstat(fd).st_size
                if run.dir not in self._log_ok and size > 0:
                    size = self._repair(run, fd, log_path, size)
                if header and size > 0:
                    raise StoreError(
                        f"FileStore.append_log: run {run.run_id!r} already has a log "
                        f"({log_path}) and a new one was started (the lines begin with a "
                        "header): resume the run, delete it first, or use a new run id"
                    )
                if size == 0 and not header:
                    raise StoreError(
                        f"FileStore.append_log: run {run.run_id!r} has no log yet, and the "
                        "first lines appended must start with the log's header line "
                        f"(found {data[:60]!r})"
                    )
                # The checkpoint first: a log that records it saved never points at nothing.
                if checkpoint is not None:
                    _write_atomic(os.path.dirname(checkpoint[0]), checkpoint[0], checkpoint[1])
                self._log_ok.discard(run.dir)  # until this append is whole and durable
                try:
                    _write_all(fd, data)
                    _fsync(fd)
                    if size == 0:
                        _fsync_dir(run.dir)  # the log file may be new
                except BaseException:
                    # Whatever failed (ENOSPC, EIO, ...), the caller is told the append did
                    # not happen: make that true before the error leaves.
                    self._roll_back(run, fd, size)
                    raise
            finally:
                os.close(fd)
            self._log_ok.add(run.dir)

    def _roll_back(self, run: _Run, fd: int, size: int) -> None:
        """Undo a failed append: cut the log back to ``size`` (its last whole record) and
        fsync, so the run's log ends where it did before; if that fails too, remember to."""
        self._valid.pop(run.dir, None)
        self._cut[run.dir] = size
        try:
            self._cut_back(run, fd)
        except OSError:
            pass  # kept in _cut: read as if cut, cut before the next append

    def _repair(self, run: _Run, fd: int, log_path: str, size: int) -> int:
        """Cut a torn tail (left by a crash) off the log; its size after that."""
        cached = self._valid.pop(run.dir, None)
        if cached is not None and cached[0] == size:
            valid = cached[1]
        else:
            raw = _read(log_path) or b""
            _, valid = self._parse_log(run, raw)
            size = len(raw)
        if valid < size:
            os.ftruncate(fd, valid)
            _fsync(fd)
        return valid

    def _read_log_sync(self, run: _Run) -> EffectLog | None:
        with self._lock(run):
            if run.dir not in self._ready:
                self._check_inside(run)
            data = self._read_log_bytes(run)
            if data is None:
                return None
            log, valid = self._parse_log(run, data)
            if run.dir in self._cut:
                pass  # the next append cuts the log back first
            elif valid < len(data):  # a torn tail: the next append cuts it off
                self._valid[run.dir] = (len(data), valid)
                self._log_ok.discard(run.dir)
            elif log is not None:  # the log ends on a whole record: append right after it
                self._log_ok.add(run.dir)
            return log

    def _put_input_sync(self, run: _Run, path: str, data: bytes) -> None:
        """Write an input's file atomically, creating (durably) only what the put needs.

        Unlike ``_prepare`` it never removes the temp files of the run's checkpoints: another
        process may be running the run and writing one right now.
        """
        with self._lock(run):
            folder = os.path.dirname(path)
            self._check_inside(run, INPUTS)  # before creating anything, and again after
            if not os.path.isdir(folder):
                created_root = not os.path.isdir(self._runs)
                created_run = not os.path.isdir(run.dir)
                os.makedirs(folder, exist_ok=True)
                if created_root:
                    _fsync_dir(os.path.dirname(self.path))
                    _fsync_dir(self.path)
                if created_run:
                    _fsync_dir(self._runs)
                _fsync_dir(run.dir)
                self._check_inside(run, INPUTS)
            if run.hashed:
                self._own_folder(run, "FileStore.put_input")
            _write_atomic(folder, path, data)
            self._remove_stale_input_temps(folder)

    @staticmethod
    def _remove_stale_input_temps(folder: str) -> None:
        """Remove the temp files of puts that crashed (old enough not to be in progress)."""
        before = time.time() - _STALE_INPUT_TMP_SECONDS
        with contextlib.suppress(OSError), os.scandir(folder) as entries:
            for entry in entries:
                if not entry.name.startswith(_TMP_PREFIX):
                    continue
                with contextlib.suppress(OSError):
                    if entry.stat(follow_symlinks=False).st_mtime < before:
                        os.unlink(entry.path)

    def _get_input_sync(self, run: _Run, path: str) -> bytes | None:
        self._check_inside(run, INPUTS)  # (_prepare, which _ready stands for, never checks it)
        return _read(path)

    # ------------------------------------------------------------------- leases

    def _check_leases_folder(self) -> str:
        folder = os.path.join(self.path, LEASES)
        expected = os.path.join(os.path.realpath(self.path), LEASES)
        real = os.path.realpath(folder)
        if real != expected:
            raise StoreError(
                f"FileStore: the leases folder {folder} resolves to {real}, not {expected}: "
                f"a symlink was planted in the store's folder {self.path}. Remove it."
            )
        return folder

    def _claim_sync(self, run: _Run, holder: str, loop: Any = None) -> int:
        """The lock file's descriptor, locked for ``holder``; RunLocked if another holds it
        (a session of this process whose event loop is gone, cut off by an interrupt that
        left its asyncio loop before the session could end, does not: see
        ``_reclaim_abandoned``). ``loop``: the claiming session's event loop (a weak
        reference to it), or None.

        -1 when this process cannot make the lock file (a read-only store folder): it cannot
        write the run either, so there is nothing to exclude; it can still read it.
        """
        folder = self._check_leases_folder()
        if not os.path.isdir(folder):
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError as e:
                if e.errno in _READ_ONLY:
                    return -1
                raise
            self._check_leases_folder()
        path = self._lease_path(run)
        while True:
            try:
                fd = os.open(path, _LOCK_FILE, 0o644)
            except OSError as e:
                if e.errno not in _READ_ONLY:
                    raise
                try:  # a lock file made by a writer: a read-only descriptor locks it too
                    fd = os.open(path, _READ)
                except FileNotFoundError:
                    return -1
            try:
                _regular(fd, path)
                try:
                    _flock_or_wait(fd, fcntl.LOCK_EX)
                except BlockingIOError:
                    if _reclaim_abandoned(os.path.realpath(path)):
                        os.close(fd)  # an abandoned session of this process let it go
                        continue
                    other = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
                    raise locked(run.run_id, other or "another session") from None
                mine = os.fstat(fd)
                try:
                    now = os.stat(path, follow_symlinks=False)
                except FileNotFoundError:
                    now = None
                if now is None or (now.st_ino, now.st_dev) != (mine.st_ino, mine.st_dev):
                    os.close(fd)  # removed (or replaced) since it was opened: claim anew
                    continue
                with contextlib.suppress(OSError):  # (the name is for messages only)
                    os.ftruncate(fd, 0)
                    _write_all(fd, holder.encode("utf-8", "replace"))
            except BaseException:
                with contextlib.suppress(OSError):
                    os.close(fd)
                raise
            held = self._held.setdefault(run.dir, [])
            held.append(fd)
            with _SESSIONS_LOCK:
                _SESSIONS[os.path.realpath(path)] = (fd, loop, held)
            return fd

    def _fence(self, run: _Run, op: str) -> None:
        """A write of a run this instance holds the lease of: refused if the lock file was
        removed or replaced since (another session could hold the run through a new one)."""
        held = self._held.get(run.dir)
        if not held:
            return  # (writes of a run not leased here are not fenced, as in the other stores)
        mine = os.fstat(held[-1])
        try:
            now = os.stat(self._lease_path(run), follow_symlinks=False)
        except FileNotFoundError:
            now = None
        if now is None or (now.st_ino, now.st_dev) != (mine.st_ino, mine.st_dev):
            raise StoreError(
                f"FileStore.{op} for run {run.run_id!r} was refused: its lease file "
                f"{self._lease_path(run)} was removed or replaced while this session held "
                "the run (by hand, or by a program cleaning the store's folder), so another "
                "worker may be running it now; nothing was written. Let that worker finish, "
                "or resume the run with the same run id once no other worker runs it."
            )

    def _release_sync(self, run: _Run, fd: int) -> None:
        if fd < 0:
            return
        path = os.path.realpath(self._lease_path(run))
        with _SESSIONS_LOCK:
            if _SESSIONS.get(path, (None,))[0] == fd:
                del _SESSIONS[path]
        held = self._held.get(run.dir, [])
        if fd not in held:
            return  # let go already (_reclaim_abandoned): the number may be another file's
        held.remove(fd)
        if not held:
            self._held.pop(run.dir, None)
        try:
            with contextlib.suppress(OSError):  # (a read-only descriptor)
                os.ftruncate(fd, 0)  # no holder named any more
        finally:
            os.close(fd)  # (releases the lock)

    def _holder_sync(self, run: _Run) -> str | None:
        try:
            fd = os.open(self._lease_path(run), _READ)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            _regular(fd, self._lease_path(run))
            try:
                _flock_or_wait(fd, fcntl.LOCK_SH)
            except BlockingIOError:  # held (exclusively): by whom, the file says
                return os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or None
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    async def lease_holder(self, run_id: str) -> str | None:
        """The holder of run ``run_id``'s lease (a session running it now, in this process
        or another one), or None: nobody holds it (the run ended, waits, was never run, or
        its process died)."""
        run = self._run(run_id, "FileStore.lease_holder")
        if fcntl is None:  # pragma: no cover - Windows
            return None
        try:
            return await _in_thread(self._holder_sync, run)
        except OSError as e:
            raise self._fail("lease_holder", run_id, e) from e

    @contextlib.asynccontextmanager
    async def lease(self, run_id: str, holder: str) -> AsyncIterator[None]:
        """Hold run ``run_id`` for one session (``holder`` names it): ``RunLocked`` if another
        session, in this process or another one, holds it. Released on the way out; the
        kernel releases it if the process dies."""
        run = self._run(run_id, "FileStore.lease")
        if not isinstance(holder, str):
            raise StromaTypeError(
                f"FileStore.lease(run_id, holder): holder must be a str naming the worker "
                f"session, got {holder!r:.80} (a {type(holder).__name__})"
            )
        if fcntl is None:  # pragma: no cover - Windows
            yield
            return
        try:
            fd = await _in_thread_shielded(self._claim_sync, run, holder, session_loop())
        except OSError as e:
            raise self._fail("lease", run_id, e) from e
        try:
            yield
        finally:
            try:
                await _in_thread_shielded(self._release_sync, run, fd)
            except OSError as e:
                _log.warning("FileStore.lease: releasing run %r failed: %s (the lock is "
                             "released with the descriptor)", run_id, e)

    def _remove_lease_file(self, run: _Run) -> None:
        """Remove the run's lock file unless a session (of any process) holds it."""
        if fcntl is None or self._held.get(run.dir):
            return
        path = self._lease_path(run)
        try:
            fd = os.open(path, os.O_RDWR | _O_BINARY | _O_CLOEXEC | _O_NOFOLLOW)
        except FileNotFoundError:
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # held: the lease stays with its holder
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # (a claim that opened it finds it gone and claims anew)
        finally:
            os.close(fd)

    def _delete_sync(self, run: _Run) -> None:
        self._remove_lease_file(run)
        with self._lock(run):
            self._ready.discard(run.dir)
            self._log_ok.discard(run.dir)
            self._valid.pop(run.dir, None)
            self._cut.pop(run.dir, None)
            if not os.path.lexists(run.dir):
                return
            # Rename first, so a crash mid-way never leaves a half-deleted run behind.
            trash = _child(self._runs, _TRASH_PREFIX + secrets.token_hex(8))
            os.rename(run.dir, trash)
            _fsync_dir(self._runs)
            shutil.rmtree(trash)

    def _run_ids_sync(self) -> list[str]:
        try:
            entries = list(os.scandir(self._runs))
        except (FileNotFoundError, NotADirectoryError):
            return []
        found: list[str] = []
        for entry in entries:
            if not entry.is_dir(follow_symlinks=False):
                continue
            value: str | None
            if _HASHED.fullmatch(entry.name):
                raw = _read(os.path.join(entry.path, RUN_INFO_NAME))
                value = None if raw is None else self._stored_run_id(raw)
                if value is not None and _encode("run id", value, "run_ids") != entry.name:
                    value = None
            else:
                value = None if entry.name.startswith("~") else _decode(entry.name)
            if value is not None:
                found.append(value)
        return sorted(found)

    def _summary(self, run_id: str) -> RunInfo:
        run = self._run(run_id, "list_runs")
        log: EffectLog | LogCorrupted | None
        try:
            log = self._read_log_sync(run)
        except LogCorrupted as e:
            log = e
        done = 0
        if log is None:
            try:
                names = os.listdir(os.path.join(run.dir, CHECKPOINTS))
            except (FileNotFoundError, NotADirectoryError):
                names = []
            done = sum(1 for n in names if not n.startswith(_TMP_PREFIX))
        return run_info(run_id, log, done, os.path.join(run.dir, LOG_NAME))

    def _list_sync(self) -> list[RunInfo]:
        return [self._summary(run_id) for run_id in self._run_ids_sync()]

    # ----------------------------------------------------------------- checkpoints

    async def save(self, run_id: str, node_id: str, state: BaseModel) -> None:
        """Write ``state`` as the checkpoint of ``node_id``, atomically and durably."""
        run = self._run(run_id, "FileStore.save")
        path = self._checkpoint_path(run, node_id, "FileStore.save")
        data = _encode_checkpoint(
            node_id, _check_state(state, node_id, "FileStore.save"), "FileStore.save")
        try:
            await _in_thread_shielded(self._save_sync, run, os.path.dirname(path), path, data)
        except OSError as e:
            raise self._fail("save", run_id, e) from e

    async def save_typed(
        self, run_id: str, node_id: str, state: BaseModel, schema: type[BaseModel]
    ) -> None:
        """``save``, declaring ``schema`` too (so ``load`` may answer with it)."""
        require_model_type("FileStore.save_typed", schema)
        declare_schema(schema)
        await self.save(run_id, node_id, state)

    async def _load(
        self, run_id: str, node_id: str, schema: type[BaseModel] | None, op: str
    ) -> BaseModel | None:
        run = self._run(run_id, f"FileStore.{op}")
        path = self._checkpoint_path(run, node_id, f"FileStore.{op}")
        try:
            raw, line = await _in_thread(self._load_sync, run, path, node_id)
        except OSError as e:
            raise self._fail(op, run_id, e) from e
        if raw is not None and line is not None:
            raw = raw if _ns(raw) > _ns(line) else line  # the newer save wins
        elif raw is None:
            raw, path = line, os.path.join(run.dir, LOG_NAME)
        if raw is None:
            return None
        return _decode_checkpoint(raw, node_id, schema, path)

    async def load(self, run_id: str, node_id: str) -> BaseModel | None:
        """The checkpoint of ``node_id``, or None. Its schema must be a declared one."""
        return await self._load(run_id, node_id, None, "load")

    async def load_typed(
        self, run_id: str, node_id: str, schema: type[BaseModel]
    ) -> BaseModel | None:
        """The checkpoint of ``node_id`` validated as ``schema`` (the stored ref is ignored)."""
        require_model_type("FileStore.load_typed", schema)
        declare_schema(schema)
        return await self._load(run_id, node_id, schema, "load_typed")

    async def delete(self, run_id: str) -> None:
        """Remove the run's folder (checkpoints, log and inputs); other runs are untouched."""
        run = self._run(run_id, "FileStore.delete")
        try:
            await _in_thread_shielded(self._delete_sync, run)
        except OSError as e:
            raise self._fail("delete", run_id, e) from e

    # ---------------------------------------------------------------------- inputs

    async def put_input(self, run_id: str, key: str, text: str) -> None:
        """Keep ``text`` (the input's JSON text) as the input ``key`` of run ``run_id``,
        atomically and durably; a later put of the same key replaces it (the latest wins).

        Inputs are not part of the run's log, so a put is allowed while a worker (this
        process or another) runs the run and holds its lease: it writes only the run's
        ``inputs`` folder and never touches the log or the checkpoints, which it therefore
        never damages. ``send_input`` is the checked way to send one.
        """
        op = "FileStore.put_input"
        run = self._run(run_id, op)
        path = self._input_path(run, key, op)
        text = check_input_text(text, run_id, key, op)
        data = json.dumps({"key": key, "text": text}, ensure_ascii=False).encode("utf-8")
        try:
            await _in_thread_shielded(self._put_input_sync, run, path, data)
        except OSError as e:
            raise self._fail("put_input", run_id, e, key) from e

    async def get_input(self, run_id: str, key: str) -> str | None:
        """The text last put as the input ``key`` of run ``run_id``, or None."""
        op = "FileStore.get_input"
        run = self._run(run_id, op)
        path = self._input_path(run, key, op)
        try:
            raw = await _in_thread(self._get_input_sync, run, path)
        except OSError as e:
            raise self._fail("get_input", run_id, e, key) from e
        if raw is None:
            return None
        return _decode_input(raw, key, path)

    # ------------------------------------------------------------------ effect log

    async def append_log(
        self, run_id: str, lines: Sequence[str], checkpoint: tuple[str, BaseModel] | None = None
    ) -> None:
        """Append JSON lines to the run's log, saving ``checkpoint`` first; both durable on return.

        The first call for a run must start with the log's header line. A torn tail left
        by a crash is cut off before appending.
        """
        op = "FileStore.append_log"
        run = self._run(run_id, op)
        if isinstance(lines, str | bytes):
            raise StromaTypeError(f"{op}: lines must be a sequence of str (one JSON line each), "
                                  f"got a {type(lines).__name__}")
        lines = list(lines)
        data = b""
        if lines:
            bad = next((n for n, x in enumerate(lines) if not isinstance(x, str)), None)
            if bad is not None:
                raise StromaTypeError(f"{op}: line {bad} must be a str (one JSON line), got "
                                      f"{type(lines[bad]).__name__}")
            try:
                data = ("\n".join(lines) + "\n").encode("utf-8")
            except UnicodeEncodeError as e:
                raise StoreError(f"{op}: a line does not encode as UTF-8 ({e})") from None
            if data.count(b"\n") != len(lines):
                raise StoreError(
                    f"{op}: a line contains a line break; each item must be one JSON line "
                    "without its trailing newline"
                )
        header = bool(lines) and lines[0].startswith(_HEADER_START)
        item: tuple[str, bytes] | None = None
        if checkpoint is not None:
            node_id, state = checkpoint
            self._checkpoint_path(run, node_id, op)  # the node id must be a safe name
            ckpt = _encode_checkpoint(node_id, _check_state(state, node_id, op), op, line=True)
            # One write, one fsync: the checkpoint is a line of the log, before the records
            # that say it was saved (after the header of a new log).
            if header:
                cut = data.index(b"\n") + 1
                data = data[:cut] + ckpt + b"\n" + data[cut:]
            else:
                data = ckpt + b"\n" + data
        if not data:
            return
        try:
            await _in_thread_shielded(self._append_sync, run, data, header, item)
        except OSError as e:
            raise self._fail("append_log", run_id, e) from e

    async def read_log(self, run_id: str) -> EffectLog | None:
        """The run's effect log, or None if it has none.

        A torn last line (a crash mid-append) is dropped; any other damage is a
        ``LogCorrupted`` naming the file and the problem.
        """
        run = self._run(run_id, "FileStore.read_log")
        try:
            return await _in_thread(self._read_log_sync, run)
        except _NotAFile as e:  # the run's log is not there to read: the run is damaged
            raise LogNotAFile(str(e.filename), f"{e.strerror}") from None
        except OSError as e:
            raise self._fail("read_log", run_id, e) from e

    # ------------------------------------------------------------------------ runs

    async def run_ids(self) -> list[str]:
        """The ids of the runs in the store, sorted."""
        try:
            return await _in_thread(self._run_ids_sync)
        except OSError as e:
            raise self._fail("run_ids", None, e) from e

    async def list_runs(self) -> list[RunInfo]:
        """A summary of every run in the store (sorted by run id); see ``RunInfo``."""
        try:
            return await _in_thread(self._list_sync)
        except OSError as e:
            raise self._fail("list_runs", None, e) from e
