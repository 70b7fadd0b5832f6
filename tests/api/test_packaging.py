"""Packaging as a new user meets it: ``make demo`` from a fresh checkout is quick and quiet,
installs only what the demo needs, and the metadata carries an SPDX license and the one
version.

These tests copy the checkout (its tracked and untracked, not ignored, files) into a
temporary folder and run make there, creating a venv from the package registry: slow, but
part of ``make test``.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

import stroma

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_uses_an_spdx_license_and_a_setuptools_that_reads_it() -> None:
    """``license`` is the SPDX string "MIT" (no deprecated table, so no setuptools banner)
    and the build requires setuptools>=77, the first that takes it."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert project["project"]["license"] == "MIT"
    assert project["build-system"]["requires"] == ["setuptools>=77"]


def _fresh_checkout(folder: Path) -> Path:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to copy (git ls-files)")
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
        capture_output=True,
    ).stdout.decode().split("\0")
    target = folder / "stroma-checkout"
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def _make(checkout: Path, target: str) -> subprocess.CompletedProcess[str]:
    # As from a user's shell: not a sub-make of the ``make test`` that runs this suite.
    env = {k: v for k, v in os.environ.items() if k not in {"MAKELEVEL", "MAKEFLAGS", "MFLAGS"}}
    return subprocess.run(
        ["make", target, f"PY={sys.executable}"], cwd=checkout, capture_output=True,
        text=True, timeout=600, env=env,
    )


@pytest.mark.slow
def test_make_demo_from_a_fresh_checkout_is_quiet_and_installs_only_the_demo(
    tmp_path: Path,
) -> None:
    """``make demo`` in a fresh checkout prints only the demo (no pip or setuptools output),
    ends with the command that shows the run, installs stroma without the dev tools, and
    runs again without installing anything."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    checkout = _fresh_checkout(tmp_path)

    first = _make(checkout, "demo")

    assert first.returncode == 0, first.stdout + first.stderr
    assert first.stderr == ""
    lines = first.stdout.splitlines()
    assert lines[0].split() == ["status:", "COMPLETED"]
    command = shlex.split(lines[-1])
    assert command[:5] == ["python", "-m", "stroma", "show", "runs"]
    for noise in ("pip", "WARNING", "eprecat", "license", "setuptools"):
        assert noise not in first.stdout, noise
    venv = checkout / ".venv" / "bin" / "python"
    installed = subprocess.run(
        [str(venv), "-c", "import importlib.metadata as m, importlib.util as u; "
         "print(m.version('stroma'), m.metadata('stroma')['License-Expression'], "
         "*(u.find_spec(n) is not None for n in ('pytest', 'mypy', 'hypothesis', 'trio')))"],
        capture_output=True, text=True, check=True,
    ).stdout.split()
    assert installed == [stroma.__version__, "MIT", "False", "False", "False", "False"]

    second = _make(checkout, "demo")
    assert second.returncode == 0 and second.stderr == ""
    again = shlex.split(second.stdout.splitlines()[-1])
    assert again[5] != command[5]  # a fresh run id; the first run stays
    shown = subprocess.run(
        [str(venv), "-m", "stroma", "show", "runs", command[5]], cwd=checkout,
        capture_output=True, text=True,
    )
    assert shown.returncode == 0 and f"run {command[5]}: COMPLETED" in shown.stdout


@pytest.mark.slow
def test_building_the_wheel_prints_no_setuptools_warning(tmp_path: Path) -> None:
    """A verbose wheel build of a fresh checkout shows no setuptools deprecation (the license
    banner included), and the wheel carries the SPDX license and stroma's one version."""
    checkout = _fresh_checkout(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "-v", "-w", str(tmp_path)],
        cwd=checkout, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    build_output = out.stdout + out.stderr
    assert "BuildBackendWarning" not in build_output
    assert "deprecated" not in build_output.lower()
    [wheel] = tmp_path.glob("stroma-*.whl")
    assert wheel.name == f"stroma-{stroma.__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read(f"stroma-{stroma.__version__}.dist-info/METADATA").decode()
    assert f"Version: {stroma.__version__}\n" in metadata
    assert "License-Expression: MIT\n" in metadata
