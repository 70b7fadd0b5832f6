"""A user's own store (save/load/delete, no log), as the README's "Stores" section defines
one: what stroma calls on it and what it makes of what the store does.

Each case runs on asyncio and on trio (the stores here are plain Python).
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import pytest
from pydantic import BaseModel

from stroma import (
    AsyncInMemoryStore,
    CheckpointManager,
    InMemoryStore,
    RunStatus,
    StromaRunner,
    await_input,
    map_each,
    parallel,
    send_input,
    seq,
)
from stroma.checkpoint import _resolve_schema, _schema_ref, is_async_store
from stroma.errors import StoreError, StromaWarning
from stroma.runner import RunConfig, interpret

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """The stores here are plain Python: asyncio and trio both."""
    return str(request.param)


class S(BaseModel):
    n: int


runner = StromaRunner.quick()


@runner.node("a", input=S, output=S)
async def a(s: S) -> S:
    return S(n=s.n + 1)


@runner.node("b", input=S, output=S)
async def b(s: S) -> S:
    return S(n=s.n + 10)


PLAN = seq(a, b)


def plain(fn: Any) -> Any:
    """A user's decorator that hides what it wraps (no functools.wraps)."""

    def wrapper(*args: Any) -> Any:
        return fn(*args)

    return wrapper


def wrapped(fn: Any) -> Any:
    """A user's decorator that keeps ``__wrapped__`` (functools.wraps), sync on the outside."""

    @functools.wraps(fn)
    def wrapper(*args: Any) -> Any:
        return fn(*args)

    return wrapper


class WrapsStore:
    """async save/load/delete under a functools.wraps decorator."""

    def __init__(self) -> None:
        self.d: dict[tuple[str, str], BaseModel] = {}

    @wrapped
    async def save(self, run_id: str, node_id: str, state: BaseModel) -> None:
        self.d[run_id, node_id] = state

    @wrapped
    async def load(self, run_id: str, node_id: str) -> BaseModel | None:
        return self.d.get((run_id, node_id))

    @wrapped
    async def delete(self, run_id: str) -> None:
        pass


class AsyncWriter:
    """A client object whose ``__call__`` is async: the store's ``save``."""

    def __init__(self) -> None:
        self.d: dict[tuple[str, str], BaseModel] = {}

    async def __call__(self, run_id: str, node_id: str, state: BaseModel) -> None:
        self.d[run_id, node_id] = state


class ClientStore:
    def __init__(self) -> None:
        self.save = AsyncWriter()
        self.d = self.save.d

    async def load(self, run_id: str, node_id: str) -> BaseModel | None:
        return self.d.get((run_id, node_id))

    async def delete(self, run_id: str) -> None:
        pass


class HiddenStore:
    """async save under a decorator that hides it: it looks synchronous."""

    def __init__(self) -> None:
        self.d: dict[tuple[str, str], BaseModel] = {}

    @plain
    async def save(self, run_id: str, node_id: str, state: BaseModel) -> None:
        self.d[run_id, node_id] = state

    def load(self, run_id: str, node_id: str) -> BaseModel | None:
        return self.d.get((run_id, node_id))

    def delete(self, run_id: str) -> None:
        pass


@pytest.mark.parametrize("make", [WrapsStore, ClientStore], ids=["wraps", "async-call"])
async def test_a_save_that_is_async_under_a_wrapper_or_a_call_is_awaited(
    anyio_backend: str, make: Any
) -> None:
    """A save that is an async def under functools.wraps, or an object with an async
    __call__, is taken as async: every checkpoint is saved, and resume_from finds them."""
    store = make()
    assert is_async_store(store) and CheckpointManager(store).is_async
    result = await interpret(PLAN, S(n=0), store=store, config=RunConfig(run_id="r"))
    assert result.status is RunStatus.COMPLETED
    assert store.d == {("r", "a"): S(n=1), ("r", "b"): S(n=11)}
    again = await interpret(PLAN, S(n=0), store=store,
                            config=RunConfig(run_id="r", resume_from="b"))
    assert again.status is RunStatus.RESUMED and again.final_state == S(n=11)


async def test_a_sync_looking_save_returning_a_coroutine_is_a_store_error(
    anyio_backend: str,
) -> None:
    """A save that looks synchronous and returns a coroutine: never silently dropped, but
    a StoreError naming the store, the method, the run, the node and the fix; the
    coroutine is closed (no "never awaited" warning under -W error)."""
    store = HiddenStore()
    assert not is_async_store(store)
    with pytest.raises(StoreError) as caught:
        await interpret(PLAN, S(n=0), store=store, config=RunConfig(run_id="r"))
    message = str(caught.value)
    assert "HiddenStore.save()" in message and "'r'" in message and "'a'" in message
    assert "async def" in message and "functools.wraps" in message
    assert store.d == {}


async def test_a_coroutine_from_a_sync_save_in_a_fan_out_child_is_a_store_error(
    anyio_backend: str,
) -> None:
    """The same inside a sub-plan child of a map_each, whose commits go through the
    performer's async commit: a StoreError too, not a checkpoint lost."""
    class Items(BaseModel):
        items: list[S]

    plan = map_each(seq(a, b), over="items", into="outs", input=Items)
    with pytest.raises(StoreError, match=r"HiddenStore\.save\(\).*returned an awaitable"):
        await interpret(plan, Items(items=[S(n=1)]), store=HiddenStore(),
                        config=RunConfig(run_id="m"))


class MirroredStore(InMemoryStore):
    """Mirrors every checkpoint somewhere durable (here a list) by overriding save."""

    def __init__(self) -> None:
        super().__init__()
        self.mirrored: list[tuple[str, str]] = []

    def save(self, run_id: str, node_id: str, state: BaseModel) -> None:
        self.mirrored.append((run_id, node_id))
        super().save(run_id, node_id, state)


class AsyncMirroredStore(AsyncInMemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.mirrored: list[tuple[str, str]] = []

    async def save(self, run_id: str, node_id: str, state: BaseModel) -> None:
        self.mirrored.append((run_id, node_id))
        await super().save(run_id, node_id, state)


@pytest.mark.parametrize("make", [MirroredStore, AsyncMirroredStore])
async def test_a_built_in_store_s_subclass_has_its_save_override_called(
    anyio_backend: str, make: Any
) -> None:
    """A subclass of InMemoryStore / AsyncInMemoryStore overriding save gets it called for
    every checkpoint a run commits (through interpret and through the runner), not the
    built-in shortcut that skips it; the checkpoints are there all the same."""
    store = make()
    result = await interpret(PLAN, S(n=0), store=store, config=RunConfig(run_id="r"))
    assert result.status is RunStatus.COMPLETED
    assert store.mirrored == [("r", "a"), ("r", "b")]
    other = StromaRunner(runner.registry, CheckpointManager(store), RunConfig(run_id="r2"))
    await other.run([a, b], S(n=0))
    assert store.mirrored[2:] == [("r2", "a"), ("r2", "b")]
    loaded = store.load("r", "b")
    assert (await loaded if make is AsyncMirroredStore else loaded) == S(n=11)


class ReadThroughStore(InMemoryStore):
    """Reads through to a durable copy (here a dict) by overriding load."""

    def __init__(self, durable: dict[tuple[str, str], BaseModel]) -> None:
        super().__init__()
        self.durable = durable
        self.loaded: list[str] = []

    def load(self, run_id: str, node_id: str) -> BaseModel | None:
        self.loaded.append(node_id)
        got = super().load(run_id, node_id)
        return got if got is not None else self.durable.get((run_id, node_id))


async def test_a_built_in_store_s_subclass_has_its_load_override_called(
    anyio_backend: str,
) -> None:
    """A subclass of InMemoryStore overriding load gets it called to resume (not the
    inherited load_typed, which reads only what this process saved): a checkpoint only
    its durable copy holds is found, and the run resumes from it."""
    store = ReadThroughStore({("old", "a"): S(n=41)})
    result = await interpret(PLAN, S(n=0), store=store,
                             config=RunConfig(run_id="old", resume_from="b"))
    assert store.loaded == ["a"]
    assert result.status is RunStatus.RESUMED and result.final_state == S(n=51)


async def test_a_subclass_that_overrides_only_the_shortcut_still_gets_it_called(
    anyio_backend: str,
) -> None:
    """A subclass that overrides save_state_json (and not save) keeps it being called:
    the shortcut stands for the built-in save, which it did not override."""
    seen: list[str] = []

    class Counting(InMemoryStore):
        def save_state_json(self, run_id: str, node_id: str, data: bytes,
                            schema: Any) -> None:
            seen.append(node_id)
            super().save_state_json(run_id, node_id, data, schema)

    store = Counting()
    await interpret(PLAN, S(n=0), store=store, config=RunConfig(run_id="r"))
    assert seen == ["a", "b"] and store.load("r", "b") == S(n=11)


class TwoTableStore:
    """A store whose typed pair keeps its data apart from the untyped pair."""

    def __init__(self) -> None:
        self.untyped: dict[tuple[str, str], Any] = {}
        self.typed: dict[tuple[str, str], tuple[str, type]] = {}
        self.calls: list[str] = []

    def save(self, run_id: str, node_id: str, state: BaseModel) -> None:
        self.calls.append("save")
        self.untyped[run_id, node_id] = state.model_dump()

    def load(self, run_id: str, node_id: str) -> Any:
        self.calls.append("load")
        return self.untyped.get((run_id, node_id))

    def save_typed(self, run_id: str, node_id: str, state: BaseModel, schema: type) -> None:
        self.calls.append("save_typed")
        self.typed[run_id, node_id] = (state.model_dump_json(), schema)

    def load_typed(self, run_id: str, node_id: str, schema: type[BaseModel]) -> Any:
        self.calls.append("load_typed")
        row = self.typed.get((run_id, node_id))
        return None if row is None else schema.model_validate_json(row[0])

    def delete(self, run_id: str) -> None:
        pass


class AsyncTwoTableStore(TwoTableStore):
    async def save_typed(  # type: ignore[override]
        self, run_id: str, node_id: str, state: BaseModel, schema: type
    ) -> None:
        super().save_typed(run_id, node_id, state, schema)


@pytest.mark.parametrize("make", [TwoTableStore, AsyncTwoTableStore])
async def test_a_store_with_save_typed_is_saved_to_with_it(
    anyio_backend: str, make: Any
) -> None:
    """A store with save_typed gets save_typed(run_id, node_id, state, schema) for each
    checkpoint (the state's own class as the schema), as it is loaded from with
    load_typed: resume_from finds what the run saved."""
    store = make()
    await interpret(PLAN, S(n=0), store=store, config=RunConfig(run_id="r"))
    assert store.calls == ["save_typed", "save_typed"]
    assert store.typed == {("r", "a"): ('{"n":1}', S), ("r", "b"): ('{"n":11}', S)}
    await CheckpointManager(store).checkpoint("r", "x", S(n=5))
    assert store.calls[-1] == "save_typed" and not store.untyped
    again = await interpret(PLAN, S(n=0), store=store,
                            config=RunConfig(run_id="r", resume_from="b"))
    assert again.status is RunStatus.RESUMED and again.final_state == S(n=11)
    assert store.calls[3] == "load_typed"


class SeedStyleStore:
    """The first seed's custom backend, in memory: JSON beside a ``module:qualname``
    reference, read back by ``_resolve_schema`` or by the seed's own importlib lookup."""

    def __init__(self, lookup: str) -> None:
        self.rows: dict[tuple[str, str], tuple[str, str]] = {}
        self.lookup = lookup

    def save(self, run_id: str, node_id: str, state: BaseModel) -> None:
        self.rows[run_id, node_id] = (state.model_dump_json(), _schema_ref(type(state)))

    def load(self, run_id: str, node_id: str) -> BaseModel | None:
        row = self.rows.get((run_id, node_id))
        if row is None:
            return None
        if self.lookup == "resolve":
            schema = _resolve_schema(row[1])
        else:
            module_name, qualname = row[1].split(":", 1)
            schema = getattr(importlib.import_module(module_name), qualname)
        return schema.model_validate_json(row[0])  # type: ignore[no-any-return]

    def delete(self, run_id: str) -> None:
        pass


class Urls(BaseModel):
    urls: list[str]


class Url(BaseModel):
    item: str


class Page(BaseModel):
    url: str
    words: int


class Left(BaseModel):
    left: int


class Right(BaseModel):
    right: int


@runner.node("fetch", input=Url, output=Page)
async def fetch(u: Url) -> Page:
    return Page(url=u.item, words=len(u.item))


@runner.node("left", input=S, output=Left)
async def left(s: S) -> Left:
    return Left(left=s.n + 1)


@runner.node("right", input=S, output=Right)
async def right(s: S) -> Right:
    return Right(right=s.n - 1)


@runner.node("both", input=Urls, output=Urls)
async def report(d: Urls) -> Urls:
    return d


class Sum(BaseModel):
    left: int
    right: int


@runner.node("sum", input=Sum, output=S)
async def total(s: Sum) -> S:
    return S(n=s.left + s.right)


@pytest.mark.parametrize("lookup", ["resolve", "importlib"])
@pytest.mark.parametrize("kind", ["map_each", "parallel"])
async def test_a_seed_style_store_loads_the_checkpoint_of_a_fan_out(
    anyio_backend: str, lookup: str, kind: str
) -> None:
    """The checkpoint of a map_each or parallel step is a model stroma made
    (``stroma.plan:<name>_<tag>``): a store written as the first seed says resolves its
    reference (with ``_resolve_schema`` and with ``importlib``), so resume_from the step
    after the group resumes from it."""
    store = SeedStyleStore(lookup)
    if kind == "map_each":
        group: Any = map_each(fetch, over="urls", into="pages", input=Urls)
        plan, state, after = seq(group, report), Urls(urls=["a", "bb"]), "both"
    else:
        group = parallel(left, right)
        plan, state, after = seq(group, total), S(n=5), "sum"
    first = await interpret(plan, state, store=store, config=RunConfig(run_id="m"))
    (group_id, (_, ref)), _ = store.rows.items()  # (the group's, then the last step's)
    assert group_id[1].startswith(kind) and ref.startswith("stroma.plan:")
    assert _resolve_schema(ref).__qualname__ == ref.split(":", 1)[1]
    again = await interpret(plan, state, store=store,
                            config=RunConfig(run_id="m", resume_from=after))
    assert again.status is RunStatus.RESUMED and again.final_state == first.final_state


class BackendDown(Exception):
    """A user's store's own error."""


class FailingStore:
    """A dict store whose methods fail as ``fail`` says: {method: exception to raise}."""

    def __init__(self, fail: dict[str, BaseException], fail_at: str = "b") -> None:
        self.d: dict[tuple[str, str], BaseModel] = {}
        self.fail = fail
        self.fail_at = fail_at

    def _maybe(self, method: str, node_id: str | None = None) -> None:
        exc = self.fail.get(method)
        if exc is not None and node_id in (None, self.fail_at):
            raise exc

    def save(self, run_id: str, node_id: str, state: BaseModel) -> None:
        self._maybe("save", node_id)
        self.d[run_id, node_id] = state

    def load(self, run_id: str, node_id: str) -> BaseModel | None:
        self._maybe("load")
        return self.d[run_id, node_id]  # (raises KeyError for a checkpoint it lacks)

    def delete(self, run_id: str) -> None:
        self._maybe("delete")


class AsyncFailingStore(FailingStore):
    async def save(self, run_id: str, node_id: str, state: BaseModel) -> None:  # type: ignore[override]
        super().save(run_id, node_id, state)

    async def load(self, run_id: str, node_id: str) -> BaseModel | None:  # type: ignore[override]
        return super().load(run_id, node_id)

    async def delete(self, run_id: str) -> None:  # type: ignore[override]
        super().delete(run_id)


@pytest.mark.parametrize("make", [FailingStore, AsyncFailingStore])
async def test_a_store_s_own_save_error_is_a_store_error_and_loses_nothing(
    anyio_backend: str, make: Any
) -> None:
    """A save raising the store's own error (OSError here) leaves interpret as a StoreError
    naming the store, the method, the run, the node and the error, chained from it; the
    checkpoints saved before are kept, and resume_from the failed node goes on from them."""
    store = make({"save": OSError(28, "No space left on device")})
    with pytest.raises(StoreError) as caught:
        await interpret(PLAN, S(n=0), store=store, config=RunConfig(run_id="r"))
    message = str(caught.value)
    assert f"{make.__name__}.save()" in message and "run 'r', node 'b'" in message
    assert "OSError: [Errno 28] No space left on device" in message
    assert isinstance(caught.value.__cause__, OSError)
    assert store.d == {("r", "a"): S(n=1)}
    store.fail = {}
    again = await interpret(PLAN, S(n=0), store=store,
                            config=RunConfig(run_id="r", resume_from="b"))
    assert again.status is RunStatus.RESUMED and again.final_state == S(n=11)
    assert store.d[("r", "b")] == S(n=11)


@pytest.mark.parametrize("make", [FailingStore, AsyncFailingStore])
async def test_a_store_s_own_load_and_delete_errors_are_store_errors(
    anyio_backend: str, make: Any
) -> None:
    """load and delete raising the store's own error: StoreErrors naming the store, the
    method, the run (and node), chained; a load's KeyError (the dict idiom) says to
    return None for a checkpoint the store lacks."""
    down = make({"load": BackendDown("connection refused"),
                 "delete": BackendDown("connection refused")})
    with pytest.raises(StoreError) as caught:
        await interpret(PLAN, S(n=0), store=down,
                        config=RunConfig(run_id="r", resume_from="b"))
    assert f"{make.__name__}.load() raised for run 'r', node 'a'" in str(caught.value)
    assert "BackendDown: connection refused" in str(caught.value)
    assert isinstance(caught.value.__cause__, BackendDown)
    with pytest.raises(StoreError, match=rf"{make.__name__}\.delete\(\) raised for run 'r'"):
        await CheckpointManager(down).clear("r")

    with pytest.raises(StoreError) as caught:
        await interpret(PLAN, S(n=0), store=make({}),
                        config=RunConfig(run_id="new", resume_from="b"))
    assert "KeyError" in str(caught.value) and "returns None" in str(caught.value)
    assert isinstance(caught.value.__cause__, KeyError)


async def test_a_save_with_the_wrong_signature_is_a_store_error_saying_how_it_is_called(
    anyio_backend: str,
) -> None:
    """A save that forgot node_id: a StoreError naming the store and how stroma calls
    save (not a bare TypeError from inside stroma)."""

    class WrongArity(FailingStore):
        def save(self, run_id: str, state: BaseModel) -> None:  # type: ignore[override]
            pass

    with pytest.raises(StoreError) as caught:
        await interpret(PLAN, S(n=0), store=WrongArity({}), config=RunConfig(run_id="r"))
    assert "WrongArity.save()" in str(caught.value)
    assert "save(run_id, node_id, state)" in str(caught.value)
    assert isinstance(caught.value.__cause__, TypeError)


class Interrupt(BaseException):
    """Stands for KeyboardInterrupt (a BaseException that is no Exception)."""


@pytest.mark.parametrize("exc", [Interrupt("stop"), KeyboardInterrupt()])
async def test_a_base_exception_from_a_store_passes_through_untouched(
    anyio_backend: str, exc: BaseException
) -> None:
    """A BaseException that is no Exception (the user's KeyboardInterrupt) raised by a
    store's save leaves interpret as it is, not as a StoreError."""
    store = FailingStore({"save": exc})
    with pytest.raises(type(exc)) as caught:
        await interpret(PLAN, S(n=0), store=store, config=RunConfig(run_id="r"))
    assert caught.value is exc
    assert store.d == {("r", "a"): S(n=1)}


@pytest.mark.parametrize("make", [FailingStore, AsyncFailingStore])
async def test_a_store_s_own_save_error_in_a_fan_out_child_is_one_store_error(
    anyio_backend: str, make: Any
) -> None:
    """The same inside the sub-plan children of a map_each (their commits go through the
    performer's async commit): one StoreError, chained from the store's error."""

    class Items(BaseModel):
        items: list[S]

    plan = map_each(seq(a, b), over="items", into="outs", input=Items)
    store = make({"save": BackendDown("disk gone")})
    with pytest.raises(StoreError) as caught:
        await interpret(plan, Items(items=[S(n=1), S(n=2)]), store=store,
                        config=RunConfig(run_id="m"))
    assert f"{make.__name__}.save() raised for run 'm', node 'b'" in str(caught.value)
    assert isinstance(caught.value.__cause__, BackendDown)


@pytest.mark.parametrize("text", [str, bytes])
async def test_a_load_returning_json_text_is_told_to_return_the_model(
    anyio_backend: str, text: Any
) -> None:
    """A load that returns the JSON text it saved (str or bytes): a StoreError saying load
    must return the model (or a dict), not text, naming the store, the run and the node;
    not one blaming another node's state or altered data."""

    class JsonTextStore:
        def __init__(self) -> None:
            self.d: dict[tuple[str, str], Any] = {}

        def save(self, run_id: str, node_id: str, state: BaseModel) -> None:
            dumped = state.model_dump_json()
            self.d[run_id, node_id] = dumped if text is str else dumped.encode()

        def load(self, run_id: str, node_id: str) -> Any:
            return self.d.get((run_id, node_id))

        def delete(self, run_id: str) -> None:
            pass

    store = JsonTextStore()
    await interpret(PLAN, S(n=0), store=store, config=RunConfig(run_id="r"))
    with pytest.raises(StoreError) as caught:
        await interpret(PLAN, S(n=0), store=store,
                        config=RunConfig(run_id="r", resume_from="b"))
    message = str(caught.value)
    assert "JsonTextStore.load(), run 'r', node 'a'" in message
    assert f"(a {text.__name__})" in message
    assert "must return the model" in message and "not its JSON" in message
    assert "another node's state" not in message


class Approval(BaseModel):
    ok: bool


class Task(BaseModel):
    n: int
    approval: Approval | None = None


@runner.node("prep", input=Task, output=Task)
async def prep(t: Task) -> Task:
    return t.model_copy(update={"n": t.n + 1})


@runner.node("ship", input=Task, output=Task)
async def ship(t: Task) -> Task:
    return t


WAITS = seq(prep, await_input("approval", Approval), ship)


class DictStore(FailingStore):
    def load(self, run_id: str, node_id: str) -> BaseModel | None:
        return self.d.get((run_id, node_id))


@pytest.mark.parametrize("run_id", ["task-1", None], ids=["explicit", "generated"])
async def test_a_run_that_ends_waiting_on_a_store_without_a_log_warns(
    anyio_backend: str, run_id: str | None
) -> None:
    """A run that ends WAITING on a user's store that keeps no log (save/load/delete only)
    cannot be continued by send_input: a StromaWarning says so, naming the store and the
    fix (a store that keeps logs; with this one, resume_from the wait with the input given
    to interpret), and that fix goes on from the wait, running nothing before it."""
    store = DictStore({})
    config = RunConfig() if run_id is None else RunConfig(run_id=run_id)
    with pytest.warns(StromaWarning) as caught:
        first = await interpret(WAITS, Task(n=0), store=store, config=config)
    assert first.status is RunStatus.WAITING
    (warning,) = caught
    message = str(warning.message)
    assert f"run {first.run_id!r} ended WAITING" in message and "DictStore" in message
    assert warning.filename == __file__  # shown at the user's interpret(...) call
    assert "keeps no run's log" in message and "send_input cannot reach the run" in message
    assert "FileStore" in message and "resume_from='await_input(approval)'" in message

    done = await interpret(WAITS, Task(n=0), store=store, inputs={"approval": {"ok": True}},
                           config=RunConfig(run_id=first.run_id,
                                            resume_from="await_input(approval)"))
    assert done.status is RunStatus.RESUMED
    assert done.final_state == Task(n=1, approval=Approval(ok=True))
    assert [e.node_id for e in done.trace] == ["await_input(approval)", "ship"]  # no prep


@pytest.mark.parametrize("make", [InMemoryStore, AsyncInMemoryStore])
async def test_a_run_that_ends_waiting_on_a_store_with_a_log_does_not_warn(
    anyio_backend: str, make: Any
) -> None:
    """The built-in stores keep the run's log: a run ending WAITING there warns of nothing
    (pytest runs with -W error), and send_input then goes on from the wait."""
    store = make()
    first = await interpret(WAITS, Task(n=0), store=store, config=RunConfig(run_id="t"))
    assert first.status is RunStatus.WAITING
    await send_input(store, "t", "approval", {"ok": True})
    done = await interpret(WAITS, Task(n=0), store=store, config=RunConfig(run_id="t"))
    assert done.status is RunStatus.RESUMED
