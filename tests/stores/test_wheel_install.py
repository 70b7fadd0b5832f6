"""A fresh install works: the built wheel, installed with one extra into a clean venv (no
sniffio, no dev tools), runs a store round trip and a tiny run against the real server.

Slow (it builds a wheel and installs its dependencies from the package registry), but part
of ``make test``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.services import unique

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]

ROUND_TRIP = """
import sys
import anyio
from pydantic import BaseModel

import stroma
from stroma import NodeContract, stroma_node
from stroma.runner import RunConfig, interpret


class S(BaseModel):
    v: int


async def inc(s: S) -> dict:
    return {"v": s.v + 1}


node = stroma_node("inc", NodeContract(node_id="inc", input_schema=S, output_schema=S))(inc)


async def main(kind: str, target: str, name: str) -> None:
    if kind == "redis":
        store = stroma.RedisStore(target, key_prefix=name)
    else:
        store = stroma.PostgresStore(target, table_prefix=name)
    async with store:
        await store.save("r", "n", S(v=7))
        assert await store.load("r", "n") == S(v=7)
        result = await interpret([node], S(v=1), store=store, config=RunConfig(run_id="run"))
        assert str(result.status) == "COMPLETED" and result.final_state == S(v=2), result
        assert (await store.read_log("run")).finish is not None
        await store.delete("r")
        await store.delete("run")
    try:
        import sniffio  # noqa: F401
    except ImportError:
        print("OK without sniffio")
    else:
        print("sniffio is installed: the venv is not clean")


anyio.run(main, *sys.argv[1:4])
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from a copy of the checkout (so the build leaves nothing in it)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("stroma", "interpreters"):
        shutil.copytree(ROOT / package, source / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "--disable-pip-version-check",
         "-w", str(out), str(source)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    (built,) = out.glob("stroma-*.whl")
    return built


@pytest.mark.parametrize("extra", [pytest.param("redis", marks=pytest.mark.redis),
                                   pytest.param("postgres", marks=pytest.mark.postgres)])
def test_the_wheel_with_one_extra_runs_a_store_round_trip_in_a_clean_venv(
    wheel: Path, tmp_path: Path, extra: str, request: pytest.FixtureRequest
) -> None:
    """``pip install 'stroma[<extra>]'`` from the wheel into a new venv, then save, load and
    a one-node interpret run on that store against the real server: all work, and sniffio
    (not a dependency) is not there."""
    target = request.getfixturevalue("redis_url" if extra == "redis" else "postgres_dsn")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
         f"stroma[{extra}] @ {wheel.as_uri()}"],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    name = unique("wheel")
    script = tmp_path / "round_trip.py"
    script.write_text(textwrap.dedent(ROUND_TRIP), encoding="utf-8")
    try:
        run = subprocess.run(
            [str(python), str(script), extra, target, name],
            capture_output=True, text=True, timeout=300, cwd=tmp_path,
            env={"PATH": "/usr/bin:/bin"},
        )
    finally:
        _clean(extra, target, name)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "OK without sniffio", run.stdout


def _clean(extra: str, target: str, name: str) -> None:
    import anyio

    from tests.services import drop_postgres_tables, drop_redis_prefix

    if extra == "redis":
        anyio.run(drop_redis_prefix, target, name)
    else:
        from interpreters.stores.postgres import PostgresStore

        anyio.run(drop_postgres_tables, target, PostgresStore(target, table_prefix=name).tables)

