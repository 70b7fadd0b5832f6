"""A run id that is mistyped, a prefix of one or another case of one is answered with the
run ids meant ("did you mean ..."), not the first few in alphabetical order; a Redis store
that shows no runs says which key prefix was looked under and how to name another."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from interpreters.stores.file import FileStore
from tests.cli.test_cli import cli
from tests.cli.test_errors import one_line_error
from tests.services import REDIS_URL, START_REDIS, drop_redis_prefix, require, unique
from tests.timeline import pipelines as P

IDS = ("alpha", "beta", "delta", "epsilon", "gamma", "waiting-1", "waiting-2", "zeta")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A FileStore with more runs than the hint used to list, two sharing a prefix."""
    path = tmp_path_factory.mktemp("finding")

    async def record() -> None:
        fs = FileStore(path)
        for run_id in IDS:
            await P.retries_run(fs, run_id)

    anyio.run(record)
    return path


@pytest.mark.parametrize(("typed", "meant"), [
    ("waiting", "did you mean 'waiting-1' or 'waiting-2'?"),  # a prefix of two
    ("Waiting-2", "did you mean 'waiting-2' or 'waiting-1'?"),  # another case first
    ("wating-1", "did you mean 'waiting-1' or 'waiting-2'?"),  # a letter missing
    ("epsilno", "did you mean 'epsilon'?"),                    # two letters swapped
])
def test_a_near_miss_is_answered_with_the_run_ids_meant(store: Path, typed: str,
                                                        meant: str) -> None:
    """The closest run ids are named, one line, and not the alphabetical first five."""
    err = one_line_error(cli("show", str(store), typed), f"no run {typed!r}", meant,
                         "python -m stroma runs")
    assert "alpha" not in err, err


def test_an_id_like_none_still_lists_some_runs(store: Path) -> None:
    """Nothing close: the runs there are listed, as before."""
    one_line_error(cli("show", str(store), "xyz"), "runs there: alpha, beta, delta",
                   "pass one of its run ids")


def test_no_runs_hint_names_the_default_key_prefix() -> None:
    """A Redis URL without ?key_prefix: the hint says the default prefix was looked under
    and how to name another (built without reaching any server)."""
    from interpreters.stores.redis import RedisStore
    from stroma.cli import _no_runs_hint

    url = "redis://127.0.0.1:1/0"
    hint = _no_runs_hint(RedisStore(url), url)
    assert "the default key prefix 'stroma'" in hint and "?key_prefix=NAME" in hint, hint
    assert _no_runs_hint(FileStore("."), ".") == ""


@pytest.fixture
def empty_prefix() -> Iterator[str]:
    """A Redis URL whose key prefix holds nothing."""
    url = require("Redis", REDIS_URL, 6379, START_REDIS)
    prefix = unique("stroma-empty")
    try:
        yield f"{url}?key_prefix={prefix}"
    finally:
        anyio.run(drop_redis_prefix, url, prefix, backend="asyncio")


@pytest.mark.redis
def test_a_redis_store_with_no_runs_names_the_key_prefix(empty_prefix: str) -> None:
    """`runs` (exit 0) and `show` (one-line error) on a Redis prefix with no runs say
    which key prefix they looked under and that ?key_prefix=NAME names another."""
    prefix = empty_prefix.rsplit("=", 1)[1]
    listed = cli("runs", empty_prefix)
    assert listed.returncode == 0 and listed.stderr == "", listed.stderr
    assert f"under key prefix {prefix!r}" in listed.stdout, listed.stdout
    assert "?key_prefix=NAME" in listed.stdout, listed.stdout
    one_line_error(cli("show", empty_prefix, "r"), "the store has no runs",
                   f"under key prefix {prefix!r}", "?key_prefix=NAME")
