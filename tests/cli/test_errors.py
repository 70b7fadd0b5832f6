"""Every command-line error is one line, `stroma: error: ...`, naming the problem and the
fix, with exit status 2 and never a traceback (a divergent replay: DIVERGED, exit 1)."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import anyio
import pytest

from interpreters.stores.file import FileStore
from tests.cli.test_cli import ROOT, cli
from tests.timeline import pipelines as P


def one_line_error(out: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    assert out.stderr.startswith("stroma: error: "), out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
    for needle in needles:
        assert needle in out.stderr, (needle, out.stderr)
    return out.stderr


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A FileStore with a retries run, and a run whose log is then damaged."""
    path = tmp_path_factory.mktemp("errors")

    async def record() -> None:
        fs = FileStore(path)
        await P.retries_run(fs)
        await P.retries_run(fs, "damaged")

    anyio.run(record)
    log = path / "runs" / "damaged" / "log.jsonl"
    lines = log.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[3] = '{"i": 2, "effect": not json at all\n'  # a line in the middle, not the tail
    log.write_text("".join(lines), encoding="utf-8")
    return path


@pytest.fixture
def closed_port() -> int:
    """A local TCP port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_missing_store_folder(tmp_path: Path) -> None:
    """A folder that does not exist: one line saying what STORE may be."""
    one_line_error(cli("runs", str(tmp_path / "nope")), "no FileStore at",
                   "does not exist", "redis://", "postgresql://")


def test_store_that_is_a_file(tmp_path: Path) -> None:
    """A file where a folder was expected: one line saying so."""
    (tmp_path / "f").write_text("x")
    one_line_error(cli("show", str(tmp_path / "f"), "r"), "is a file, not a folder")


def test_unknown_store_scheme() -> None:
    """A URL of a kind stroma does not read: one line listing the kinds it does."""
    one_line_error(cli("runs", "mysql://localhost/db"), "scheme 'mysql'", "redis://")


def test_unknown_run(store: Path) -> None:
    """An unknown run id: one line naming the runs there and how to list them."""
    one_line_error(cli("show", str(store), "no-such-run"), "no run 'no-such-run'",
                   "runs there: damaged, retries", "python -m stroma runs")


def test_damaged_log_on_show_and_replay(store: Path) -> None:
    """A damaged log: one line naming the file and the damage, for show and replay."""
    for args in (("show", str(store), "damaged"),
                 ("replay", str(store), "damaged", "--plan",
                  "tests.timeline.pipelines:RETRIES_PLAN")):
        one_line_error(cli(*args), "log.jsonl", "not JSON", "log is damaged")


def test_damaged_run_is_listed_with_its_problem(store: Path) -> None:
    """`runs` still lists a store with a damaged run: that run is 'damaged', named."""
    out = cli("runs", str(store))
    assert out.returncode == 0, out.stderr
    assert any(line.startswith("damaged ") and "damaged" in line.split()[1]
               for line in out.stdout.splitlines())


@pytest.mark.parametrize(("plan", "needle"), [
    ("no.such.module:plan", "does not import"),
    ("not-a-reference", "expected 'package.module:attribute'"),
    ("tests.timeline.pipelines:NO_SUCH_PLAN", "has no attribute 'NO_SUCH_PLAN'"),
    ("tests.timeline.pipelines:CRASH_ITEMS", "not a plan"),
])
def test_plan_that_does_not_import(store: Path, plan: str, needle: str) -> None:
    """A --plan that does not import, has no such attribute or is not a plan: one line."""
    one_line_error(cli("replay", str(store), "retries", "--plan", plan), needle)


@pytest.mark.parametrize(("plan", "needles"), [
    ("stroma.demo:build", ["returns a tuple (StromaRunner, list), not a plan",
                           "--plan needs a Plan, a list of nodes, or a function of no "
                           "arguments returning one", "returning that item alone"]),
    ("stroma.demo:RUNS_FOLDER", ["is a str, not a plan", "--plan needs a Plan"]),
])
def test_plan_that_is_another_object_says_what_plan_needs(
    store: Path, plan: str, needles: list[str]
) -> None:
    """A --plan naming a tuple (a (runner, pipeline) factory) or another object: one line
    saying what --plan needs, not blaming the runner for being put in a pipeline."""
    err = one_line_error(cli("replay", str(store), "retries", "--plan", plan), *needles)
    assert "StromaRunner object" not in err, err  # (was: the runner, "not a stroma node")


def test_plan_module_that_raises_on_import(store: Path, tmp_path: Path) -> None:
    """A --plan module whose import raises: one line naming the module and the error."""
    (tmp_path / "broken_plan.py").write_text("raise RuntimeError('no API key set')\n")
    env = {"PYTHONPATH": f"{ROOT}:{tmp_path}", "PATH": "/usr/bin:/bin"}
    one_line_error(cli("replay", str(store), "retries", "--plan", "broken_plan:plan",
                       env=env), "importing 'broken_plan' raised RuntimeError: no API key")


@pytest.mark.parametrize(("source", "call"), [
    ("import sys\nsys.exit(3)\n", "sys.exit(3)"),
    ("import sys\ndef plan():\n    sys.exit()\n", "sys.exit()"),
])
def test_plan_file_that_exits(store: Path, tmp_path: Path, source: str, call: str) -> None:
    """A --plan file that calls sys.exit on import, or a factory that does: one line naming
    the plan file and the call, exit status 2 (was: the file's status, no message)."""
    (tmp_path / "exits_plan.py").write_text(source)
    plan = f"{tmp_path / 'exits_plan.py'}:plan"
    one_line_error(cli("replay", str(store), "retries", "--plan", plan),
                   f"--plan {plan!r}", f"called {call}", "not exit")


def test_plan_that_does_not_match_is_one_diverged_line(store: Path) -> None:
    """A plan that does not match the log: DIVERGED on one line, exit status 1."""
    out = cli("replay", str(store), "retries", "--plan", "tests.timeline.pipelines:MAP_PLAN")
    assert out.returncode == 1, out.stderr
    assert out.stdout.startswith("DIVERGED: ") and len(out.stdout.strip().splitlines()) == 1
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("scheme", ["redis", "postgresql"])
def test_server_that_is_down(closed_port: int, scheme: str) -> None:
    """A Redis or PostgreSQL server that does not answer: one line asking whether it runs."""
    spec = (f"redis://127.0.0.1:{closed_port}/0" if scheme == "redis"
            else f"postgresql://postgres@127.0.0.1:{closed_port}/test")
    server = "Redis" if scheme == "redis" else "PostgreSQL"
    for args in (("runs", spec), ("show", spec, "r")):
        one_line_error(cli(*args), f"Is the {server} server running and reachable?")


@pytest.mark.postgres
def test_postgres_database_that_does_not_exist() -> None:
    """A PostgreSQL server that answers but has no such database: one line saying so and
    how to create it, not asking whether the server runs."""
    from tests.services import POSTGRES_DSN, START_POSTGRES, require, unique

    dsn = require("PostgreSQL", POSTGRES_DSN, 5432, START_POSTGRES)
    name = unique("nodb")
    spec = urlunsplit(urlsplit(dsn)._replace(path=f"/{name}"))
    for args in (("runs", spec), ("show", spec, "r")):
        err = one_line_error(cli(*args), f"has no database {name!r}", f"createdb {name}")
        assert "Is the PostgreSQL server running" not in err, err


@pytest.mark.parametrize(("spec", "typo", "meant", "listed"), [
    ("redis://127.0.0.1:{port}/0?key_prefx=h4", "key_prefx", "key_prefix", "socket_timeout"),
    ("redis://127.0.0.1:{port}?socket_timout=3", "socket_timout", "socket_timeout", "db"),
    ("postgresql://postgres@127.0.0.1:{port}/test?table_prefx=h4", "table_prefx",
     "table_prefix", "sslmode"),
    ("postgresql://postgres@127.0.0.1:{port}/test?schemma=x", "schemma", "schema", "sslmode"),
])
def test_a_mistyped_store_url_parameter_names_the_one_meant(
    closed_port: int, spec: str, typo: str, meant: str, listed: str
) -> None:
    """A store URL query parameter that neither stroma nor the driver takes: one line
    naming it, the close one and the accepted ones, before any connection (the server
    here does not even run), not the driver's TypeError or a server error."""
    url = spec.format(port=closed_port)
    for args in (("runs", url), ("show", url, "r")):
        err = one_line_error(cli(*args), f"unknown parameter {typo!r} in the store URL",
                             f"did you mean {meant}?", listed)
        assert "TypeError" not in err and "reachable" not in err, err


@pytest.mark.postgres
def test_a_postgres_url_parameter_no_one_knows_is_named() -> None:
    """A DSN parameter close to no known one goes to PostgreSQL as a setting (asyncpg's
    way: ?application_name=... is one); one the server does not know is one line naming
    it as an unknown parameter of the store URL, not the server's UndefinedObjectError."""
    from tests.services import POSTGRES_DSN, START_POSTGRES, require

    dsn = require("PostgreSQL", POSTGRES_DSN, 5432, START_POSTGRES)
    spec = urlunsplit(urlsplit(dsn)._replace(query="tablename=h4"))
    err = one_line_error(cli("runs", spec), "unknown parameter 'tablename' in the store URL",
                         "table_prefix and schema", "sslmode")
    assert "UndefinedObjectError" not in err and "reachable" not in err, err
    fine = urlunsplit(urlsplit(dsn)._replace(query="application_name=x&table_prefix=nope"))
    one_line_error(cli("runs", fine), "no stroma tables")


@pytest.mark.postgres
def test_a_postgres_user_the_server_refuses_is_not_called_unreachable() -> None:
    """A role the server does not have: one line saying the server answered and the URL's
    user (or password) is the problem, not asking whether the server runs."""
    from tests.services import POSTGRES_DSN, START_POSTGRES, require, unique

    dsn = require("PostgreSQL", POSTGRES_DSN, 5432, START_POSTGRES)
    parts = urlsplit(dsn)
    user = unique("nouser")
    spec = urlunsplit(parts._replace(netloc=f"{user}@{parts.hostname}:{parts.port or 5432}"))
    err = one_line_error(cli("runs", spec), "the server answers, and refuses the user "
                         f"{user!r}", "does not exist", "check the user and password in the URL")
    assert "reachable" not in err, err


def test_a_wrong_postgres_password_is_not_called_unreachable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The server refusing the password (asyncpg's InvalidPasswordError): one line naming
    the user, the server's words and the fix; the password is not shown."""
    import asyncpg

    from stroma import cli as stroma_cli

    async def refuse(*args: object, **kwargs: object) -> None:
        raise asyncpg.InvalidPasswordError('password authentication failed for user "ann"')

    monkeypatch.setattr(asyncpg, "connect", refuse)
    assert stroma_cli.main(["runs", "postgresql://ann:s3cret@127.0.0.1:5432/test"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stroma: error: cannot read postgresql://ann:***@127.0.0.1:5432/test:")
    assert "refuses the user 'ann' (password authentication failed" in err
    assert "check the user and password in the URL" in err
    assert "s3cret" not in err and "reachable" not in err and len(err.splitlines()) == 1


def test_usage_errors_are_one_line() -> None:
    """A missing argument or an unknown command: one line pointing at --help."""
    one_line_error(cli("show"), "the following arguments are required", "--help")
    one_line_error(cli("frobnicate"), "invalid choice", "--help")


def test_a_mistyped_flag_points_at_the_subcommand_help(store: Path) -> None:
    """An option the subcommand does not take: one line naming it, the option likely meant
    and the subcommand's --help (as a missing argument does), not the top-level one."""
    one_line_error(cli("runs", str(store), "--jsn"), "unrecognized arguments: --jsn; did "
                   "you mean --json? (see python -m stroma runs --help)")
    one_line_error(cli("send-input", str(store), "r", "approval", "{}", "--replce"),
                   "did you mean --replace? (see python -m stroma send-input --help)")
    err = one_line_error(cli("show", str(store), "retries", "surplus"),
                         "unrecognized arguments: surplus (see python -m stroma show --help)")
    assert "did you mean" not in err


def test_ui_without_the_extra_says_how_to_install_it(store: Path, tmp_path: Path) -> None:
    """`ui` where starlette does not import: one line saying pip install 'stroma[ui]'."""
    shim = tmp_path / "shim" / "starlette"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('No module named starlette')\n")
    env = {"PYTHONPATH": f"{tmp_path / 'shim'}:{ROOT}", "PATH": "/usr/bin:/bin"}
    one_line_error(cli("ui", str(store), "--port", "0", env=env),
                   "pip install 'stroma[ui]'")


def test_ui_on_a_port_in_use(store: Path) -> None:
    """`ui --port N` where N is taken: one line naming --port N, saying the port is in use
    and to pass another --port (or 0), without the raw "[Errno 98]"."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        err = one_line_error(cli("ui", str(store), "--port", str(port)),
                             f"stroma: error: --port {port}: port {port} on 127.0.0.1 is in use",
                             "pass another --port N", "--port 0")
        assert "Errno" not in err, err
