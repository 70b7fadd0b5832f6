"""RedisStore and SyncRedisStore against a real Redis server: keys, TTLs, errors, leases."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import anyio
import pytest
import redis
import redis.asyncio as aioredis
from pydantic import BaseModel

import interpreters.stores._redis_base as redis_base
import interpreters.stores.redis as redis_module
from interpreters.stores.redis import RedisStore, SyncRedisStore
from stroma.errors import LogCorrupted, RunLocked, StoreError, UnsafeSchemaRef

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


class State(BaseModel):
    n: int
    at: datetime


STATE = State(n=1, at=datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC))
LINES = ['{"stroma_log":1}', '{"i":0}', '{"i":1}']  # raw lines: the store does not parse them


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A plain redis.asyncio client on the same server, to look behind the store's back."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


async def keys_of(raw: aioredis.Redis, store: RedisStore) -> set[bytes]:
    """Every key under the store's prefix."""
    return {k async for k in raw.scan_iter(match=store.key_prefix.encode() + b":*", count=1000)}


def run_keys(store: RedisStore, run_id: str) -> redis_module._Keys:
    return redis_module._Keys(store.key_prefix.encode(), run_id.encode())


# ------------------------------------------------------------------------ keys and TTL


async def test_ttl_covers_all_of_a_runs_keys(
    redis_url: str, raw: aioredis.Redis, unique_name: Callable[[str], str]
) -> None:
    """After checkpoints and a log are written, every key of the run expires within the TTL."""
    store = RedisStore(redis_url, ttl_seconds=120, key_prefix=unique_name("stroma-test"))
    try:
        await store.save("r", "a", STATE)
        await store.append_log("r", LINES, ("b", STATE))
        keys = await keys_of(raw, store)
        assert keys == set(run_keys(store, "r").data)
        for key in keys:
            assert 0 < await raw.ttl(key) <= 120, key
    finally:
        await raw.delete(*run_keys(store, "r").data)
        await store.close()


async def test_every_write_refreshes_the_ttl_of_all_keys(
    redis_store: RedisStore, raw: aioredis.Redis
) -> None:
    """A checkpoint save refreshes the log's TTL, and a log append refreshes the checkpoints'."""
    keys = run_keys(redis_store, "r")
    await redis_store.append_log("r", LINES, ("a", STATE))
    for key in keys.data:
        await raw.pexpire(key, 5000)
    await redis_store.save("r", "b", STATE)
    for key in keys.data:
        assert await raw.ttl(key) > 60, key
    for key in keys.data:
        await raw.pexpire(key, 5000)
    await redis_store.append_log("r", LINES[1:])
    for key in keys.data:
        assert await raw.ttl(key) > 60, key


async def test_ttl_none_means_keys_persist(
    redis_url: str, raw: aioredis.Redis, unique_name: Callable[[str], str]
) -> None:
    """With ttl_seconds=None the run's keys have no expiry."""
    store = RedisStore(redis_url, ttl_seconds=None, key_prefix=unique_name("stroma-test"))
    try:
        await store.append_log("r", LINES, ("a", STATE))
        for key in run_keys(store, "r").data:
            assert await raw.ttl(key) == -1
    finally:
        await raw.delete(*run_keys(store, "r").data)
        await store.close()


TRICKY_RUNS = ["a", "a:b", "ab", "a}:ckpt", "a}", "a*", "a\x00", "3:a", "{a}", "a:run:{1:a}"]


async def test_delete_removes_exactly_the_runs_keys(
    redis_store: RedisStore, raw: aioredis.Redis
) -> None:
    """delete removes the run's three keys and not one key of runs with look-alike ids."""
    for run in TRICKY_RUNS:
        await redis_store.append_log(run, LINES, ("n", STATE))
    before = await keys_of(raw, redis_store)
    assert len(before) == 3 * len(TRICKY_RUNS)
    await redis_store.delete("a")
    after = await keys_of(raw, redis_store)
    assert after == before - set(run_keys(redis_store, "a").data)
    for run in TRICKY_RUNS[1:]:
        assert await redis_store.load(run, "n") == STATE


async def test_run_ids_names_each_run_once(redis_store: RedisStore) -> None:
    """run_ids gives every run with data under the prefix, decoded exactly, and forgets deleted
    ones."""
    for run in TRICKY_RUNS:
        await redis_store.save(run, "n", STATE)
    await redis_store.append_log("only-log", LINES)
    assert await redis_store.run_ids() == sorted([*TRICKY_RUNS, "only-log"])
    await redis_store.delete("a:b")
    assert "a:b" not in await redis_store.run_ids()


@pytest.mark.parametrize(
    ("run_id", "problem"),
    [("", "empty"), ("x" * 2000, "bytes long"), (42, "must be a str"), ("\ud800", "surrogate")],
)
async def test_bad_run_ids_are_refused(redis_store: RedisStore, run_id: Any, problem: str) -> None:
    """Empty, absurdly long, non-text and non-Unicode run ids raise a StoreError saying why."""
    with pytest.raises(StoreError, match=problem) as info:
        await redis_store.save(run_id, "n", STATE)
    assert "RedisStore.save" in str(info.value) and "run id" in str(info.value)


async def test_lines_with_newlines_are_refused(redis_store: RedisStore) -> None:
    """A log line holding a line break is refused before anything is written."""
    with pytest.raises(StoreError, match="line 1 contains a line break"):
        await redis_store.append_log("r", ["{}", "{}\n{}"])
    assert await redis_store.read_log("r") is None


# ------------------------------------------------------------------- what comes back


@pytest.mark.parametrize("ref", ["os:system", "this:Anything", "subprocess:Popen", "os:path.join"])
async def test_tampered_schema_ref_is_refused(
    redis_store: RedisStore, raw: aioredis.Redis, monkeypatch: pytest.MonkeyPatch, ref: str
) -> None:
    """A schema ref written into Redis by someone else is refused and nothing is imported or
    called."""
    calls: list[object] = []
    monkeypatch.setattr(os, "system", lambda *a: calls.append(a))
    monkeypatch.delitem(sys.modules, "this", raising=False)
    payload = json.dumps({"schema": ref, "data": "echo pwned"})
    await raw.hset(run_keys(redis_store, "r").ckpt, b"n", payload.encode())
    with pytest.raises(UnsafeSchemaRef, match="refusing to load schema"):
        await redis_store.load("r", "n")
    assert calls == []
    assert "this" not in sys.modules


async def test_corrupt_checkpoint_is_log_corrupted(
    redis_store: RedisStore, raw: aioredis.Redis
) -> None:
    """A checkpoint that is not JSON, or does not validate, is LogCorrupted naming run and node."""
    await redis_store.save("r", "n", STATE)  # declares State
    key = run_keys(redis_store, "r").ckpt
    await raw.hset(key, b"bad-json", b"{not json")
    ref = f"{State.__module__}:{State.__qualname__}"
    await raw.hset(key, b"bad-data", json.dumps({"schema": ref, "data": {"n": "x"}}).encode())
    with pytest.raises(LogCorrupted, match=r"'r'.*'bad-json'.*not JSON"):
        await redis_store.load("r", "bad-json")
    with pytest.raises(LogCorrupted, match="does not validate"):
        await redis_store.load("r", "bad-data")


async def test_load_typed_validates_against_the_given_schema(redis_store: RedisStore) -> None:
    """load_typed returns the schema the caller names, whatever class wrote the checkpoint."""

    class Narrow(BaseModel):
        n: int

    await redis_store.save_typed("r", "n", STATE, State)
    loaded = await redis_store.load_typed("r", "n", Narrow)
    assert type(loaded) is Narrow and loaded.n == 1


# -------------------------------------------------------------------------- errors


async def test_dropped_connection_is_retried(
    redis_url: str, proxy_factory: Any, unique_name: Callable[[str], str]
) -> None:
    """A connection the network drops is retried on a new one, and the operation succeeds."""
    async with proxy_factory(redis_url, 6379, drop=1) as proxy:
        store = RedisStore(proxy.url(redis_url), key_prefix=unique_name("stroma-test"))
        try:
            await store.save("r", "n", STATE)
            assert await store.load("r", "n") == STATE
            assert proxy.connections >= 2
            await store.delete("r")
        finally:
            await store.close()


async def test_transient_error_is_retried_once_then_succeeds(
    redis_store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ConnectionError from the client is retried, and the second attempt's answer is used."""
    await redis_store.save("r", "n", STATE)
    client = redis_store._redis()
    original = client.hget
    calls: list[int] = []

    async def flaky(*args: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise redis.exceptions.ConnectionError("Connection reset by peer")
        return await original(*args)

    monkeypatch.setattr(client, "hget", flaky)
    assert await redis_store.load("r", "n") == STATE
    assert len(calls) == 2


async def test_append_retried_after_a_lost_reply_is_applied_once(
    redis_store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the write script commits but its reply is lost, the retry notices and the lines
    appear once."""
    client = redis_store._redis()
    original = client.evalsha
    calls: list[int] = []

    async def commit_then_fail(*args: Any) -> Any:
        result = await original(*args)
        calls.append(1)
        if len(calls) == 1:
            raise redis.exceptions.ConnectionError("reply lost")
        return result

    monkeypatch.setattr(client, "evalsha", commit_then_fail)
    await redis_store.append_log("r", LINES, ("n", STATE))
    monkeypatch.undo()
    assert len(calls) == 2
    raw = await redis_store._redis().lrange(run_keys(redis_store, "r").log, 0, -1)
    assert [line.decode() for line in raw] == LINES
    assert await redis_store.load("r", "n") == STATE


async def test_unreachable_server_is_a_store_error_after_bounded_attempts(
    closed_port: int,
) -> None:
    """Connection refused is retried a bounded number of times, then names op, run and server."""
    url = f"redis://127.0.0.1:{closed_port}/0"
    store = RedisStore(url, max_attempts=2)
    try:
        with pytest.raises(StoreError) as info:
            await store.save("run-1", "n", STATE)
    finally:
        await store.close()
    message = str(info.value)
    assert "RedisStore.save" in message and "'run-1'" in message
    assert url in message and "after 2 attempts" in message


async def test_permanent_error_is_a_store_error_at_once(
    redis_store: RedisStore, raw: aioredis.Redis
) -> None:
    """A command the server rejects (WRONGTYPE) is not retried and names op, run and server."""
    await raw.set(run_keys(redis_store, "r").ckpt, b"not a hash")
    with pytest.raises(StoreError, match="permanent") as info:
        await redis_store.save("r", "n", STATE)
    message = str(info.value)
    assert "RedisStore.save" in message and "'r'" in message and "WRONGTYPE" in message
    assert redis_store.redis_url.split("//")[1] in message


def test_password_is_not_in_error_messages() -> None:
    """The server named in messages has its password masked."""
    store = RedisStore("redis://user:s3cret@localhost:6379/0")
    assert "s3cret" not in repr(store)
    assert "user:***@localhost:6379" in repr(store)


def test_missing_redis_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the redis extra, constructing a store raises ImportError with the pip command."""
    monkeypatch.setattr(redis_base, "_redis", None)
    with pytest.raises(ImportError, match=r"pip install 'stroma\[redis\]'"):
        RedisStore()
    with pytest.raises(ImportError, match=r"pip install 'stroma\[redis\]'"):
        SyncRedisStore()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ttl_seconds": 0}, "ttl_seconds"),
        ({"key_prefix": "a{b"}, "key_prefix"),
        ({"lease_ms": 0}, "lease_ms"),
        ({"max_attempts": 0}, "max_attempts"),
    ],
)
def test_bad_configuration_is_refused(kwargs: dict[str, Any], match: str) -> None:
    """Nonsense settings fail at construction with the setting's name."""
    with pytest.raises(ValueError, match=match):
        RedisStore("redis://localhost:6379", **kwargs)


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_trio_gets_a_clear_error(redis_url: str) -> None:
    """Under trio, the store says it needs asyncio instead of failing obscurely."""
    store = RedisStore(redis_url)
    with pytest.raises(StoreError, match="needs the asyncio backend"):
        await store.save("r", "n", STATE)


# -------------------------------------------------------------------------- leases


async def test_second_holder_gets_run_locked(redis_store: RedisStore) -> None:
    """While one worker holds a run, another gets RunLocked naming the run and the holder."""
    async with redis_store.lease("run-7", "worker-a"):
        with pytest.raises(RunLocked) as info:
            async with redis_store.lease("run-7", "worker-b"):
                pytest.fail("two holders at once")
    assert info.value.run_id == "run-7" and info.value.holder == "worker-a"
    assert "'run-7'" in str(info.value) and "'worker-a'" in str(info.value)


async def test_a_lease_held_by_a_process_that_exited_says_so(redis_store: RedisStore) -> None:
    """A holder naming a process of this host that is gone (killed while the server was
    unreachable, so it never let go): RunLocked says it exited and the lease will expire,
    not that another process is executing the run."""
    import socket
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    holder = f"{socket.gethostname()}:{gone.stdout.strip()}:0000abcd/0000beef"
    async with redis_store.lease("run-dead", holder):
        with pytest.raises(RunLocked) as info:
            async with redis_store.lease("run-dead", "worker-b"):
                pytest.fail("two holders at once")
    assert "has exited without letting go" in str(info.value)
    assert "another process is executing" not in str(info.value)
    assert info.value.holder == holder and "when it expires" in str(info.value)


async def test_released_lease_can_be_taken_again(
    redis_store: RedisStore, raw: aioredis.Redis
) -> None:
    """Leaving the context releases the lease at once, so another worker can claim the run."""
    async with redis_store.lease("r", "worker-a"):
        pass
    assert await raw.exists(run_keys(redis_store, "r").lease) == 0
    async with redis_store.lease("r", "worker-b"):
        pass


async def test_lease_is_renewed_while_held(redis_store: RedisStore) -> None:
    """A lease held longer than lease_ms is renewed in the background and stays exclusive."""
    async with redis_store.lease("r", "worker-a"):
        start = anyio.current_time()
        while anyio.current_time() - start < 2 * redis_store.lease_ms / 1000:
            with pytest.raises(RunLocked):
                async with redis_store.lease("r", "worker-b"):
                    pass
            await anyio.sleep(0.05)


async def test_body_exception_propagates_and_releases(redis_store: RedisStore) -> None:
    """An exception in the body comes out unchanged (no ExceptionGroup) and frees the run."""
    with pytest.raises(ValueError, match="boom"):
        async with redis_store.lease("r", "worker-a"):
            raise ValueError("boom")
    async with redis_store.lease("r", "worker-b"):
        pass


async def test_outer_cancellation_is_honoured_and_releases(redis_store: RedisStore) -> None:
    """A timeout around the lease cancels the body as usual and the run is free afterwards."""
    with anyio.move_on_after(0.1) as scope:
        async with redis_store.lease("r", "worker-a"):
            await anyio.sleep_forever()
    assert scope.cancelled_caught
    async with redis_store.lease("r", "worker-b"):
        pass


async def test_lost_lease_cancels_the_body(redis_store: RedisStore, raw: aioredis.Redis) -> None:
    """If another worker takes the lease, the body is cancelled and RunLocked names the taker."""
    reached_end = False
    with pytest.raises(RunLocked) as info:
        async with redis_store.lease("r", "worker-a"):
            await raw.set(run_keys(redis_store, "r").lease, b"intruder", px=60_000)
            with anyio.fail_after(10):
                await anyio.sleep_forever()
            reached_end = True
    assert info.value.holder == "intruder" and not reached_end


@pytest.mark.slow
async def test_dead_holders_lease_expires(
    redis_url: str, redis_store: RedisStore, lease_holder: Any
) -> None:
    """A worker process killed with SIGKILL keeps the run until its lease expires, then loses
    it."""
    async with lease_holder("redis", redis_url, redis_store.key_prefix, "r", "child") as child:
        with pytest.raises(RunLocked) as info:
            async with redis_store.lease("r", "parent"):
                pass
        assert info.value.holder == "child"
        child.kill()
        await child.wait()
        with anyio.fail_after(15):
            while True:
                try:
                    async with redis_store.lease("r", "parent"):
                        break
                except RunLocked as exc:
                    assert exc.holder == "child"
                    await anyio.sleep(0.05)


# ------------------------------------------------------------------------ sync store


def test_sync_store_round_trips_and_deletes(
    redis_url: str, unique_name: Callable[[str], str]
) -> None:
    """SyncRedisStore saves, loads, logs, lists and deletes like the async store."""
    from stroma.log import EffectLog, LogHeader

    store = SyncRedisStore(redis_url, key_prefix=unique_name("stroma-test"))
    log = EffectLog(LogHeader(run_id="r", plan="p", seed=1, version="0",
                                started_at="2026-01-01T00:00:00+00:00"))
    try:
        store.save("r", "n", STATE)
        assert store.load("r", "n") == STATE and type(store.load("r", "n")) is State
        assert store.load("r", "missing") is None
        store.append_log("r", log.lines(), ("m", STATE))
        read = store.read_log("r")
        assert read is not None and read.to_jsonl() == log.to_jsonl()
        assert store.run_ids() == ["r"]
        store.delete("r")
        assert store.load("r", "n") is None and store.read_log("r") is None
        assert store.run_ids() == []
    finally:
        store.delete("r")
        store.close()


async def test_a_damaged_last_log_item_is_log_corrupted_and_nothing_is_written_after_it(
    redis_store: RedisStore, raw: aioredis.Redis
) -> None:
    """Redis appends a batch of lines whole, so a damaged last item is no torn tail of a
    crash: reading the log says it is damaged, and a resume refuses before writing (were it
    dropped, the resumed run would append after it and the log could not be read again)."""
    from stroma.runner import RunConfig, interpret
    from tests.stores.chain import N, chain

    nodes = chain()
    await interpret(nodes, N(v=0), store=redis_store, config=RunConfig(run_id="r"))
    key = run_keys(redis_store, "r").log
    await raw.rpop(key)
    await raw.rpush(key, b'{"i":5,"effect":{"t":"Comm')
    items = await raw.llen(key)
    with pytest.raises(LogCorrupted, match="not JSON"):
        await redis_store.read_log("r")
    with pytest.raises(LogCorrupted, match="not JSON"):
        await interpret(nodes, N(v=0), store=redis_store, config=RunConfig(run_id="r"))
    assert await raw.llen(key) == items  # nothing appended after the damage
