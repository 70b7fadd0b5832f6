"""Every module of stroma and its interpreters can be the first one a program imports
(``from interpreters.simulate import simulate`` at the top of a test file, say)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import interpreters
import stroma

ROOT = Path(__file__).resolve().parents[2]
OPTIONAL = {"interpreters.ui.app"}  # needs the ui extra (starlette), like its package


def _modules() -> list[str]:
    names = []
    for package in (stroma, interpreters):
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            if info.name.split(".")[-1] != "__main__":
                names.append(info.name)
    return sorted(names)


def test_every_module_imports_first_in_a_fresh_interpreter() -> None:
    """Each module imported alone in a new process loads without an import cycle."""
    script = (  # every module in its own interpreter, a few at a time
        "import subprocess, sys\n"
        "from concurrent.futures import ThreadPoolExecutor\n"
        "def alone(name):\n"
        "    r = subprocess.run([sys.executable, '-c', f'import {name}'],\n"
        "                       capture_output=True, text=True)\n"
        "    return None if r.returncode == 0 else (name, r.stderr.strip().splitlines()[-1])\n"
        "with ThreadPoolExecutor(4) as pool:\n"
        "    print([f for f in pool.map(alone, sys.argv[1:]) if f is not None])\n"
    )
    names = [n for n in _modules() if n not in OPTIONAL]
    assert "interpreters.simulate" in names and "stroma.machine" in names
    out = subprocess.run([sys.executable, "-c", script, *names], capture_output=True,
                         text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
