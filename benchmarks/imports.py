"""How long ``import stroma`` takes in a fresh interpreter, against ``import pydantic``
(with one model defined: what any pydantic user pays) and against stroma's own runtime
dependencies (pydantic, attrs and anyio imported, one model defined).

Each figure is the median of several rounds of fresh ``python -c`` processes (each
program once per round), timed inside the process (``perf_counter`` around the import),
so interpreter start-up is left out; a ratio is the median of the rounds' ratios.
stroma's bytecode is compiled first, as an installed package's is (pip compiles it on
install, and pydantic's is compiled too): with ``PYTHONDONTWRITEBYTECODE`` set, an
editable checkout would otherwise compile every module from source on every import.
Target: ``import stroma`` <= 1.5x ``import pydantic``.
"""

from __future__ import annotations

import compileall
import statistics
import subprocess
import sys
from pathlib import Path

import interpreters
import stroma

_TIMED = "import time; t0 = time.perf_counter(); {body}; print(time.perf_counter() - t0)"

PROGRAMS = {
    "import stroma": "import stroma",
    "import pydantic + one model": (
        "import pydantic; exec('class M(pydantic.BaseModel):\\n    x: int')"
    ),
    "its dependencies + one model": (
        "import pydantic, attrs, anyio; exec('class M(pydantic.BaseModel):\\n    x: int')"
    ),
}


def time_import(body: str) -> float:
    """Milliseconds to run ``body`` first thing in a fresh interpreter."""
    out = subprocess.run(
        [sys.executable, "-c", _TIMED.format(body=body)], capture_output=True,
        text=True, check=True,
    ).stdout
    return float(out) * 1000


def compile_bytecode() -> None:
    """Write the bytecode of stroma's packages, as installing them does."""
    for package in (stroma, interpreters):
        compileall.compile_dir(Path(package.__file__).parent, quiet=1)


def main(argv: list[str] | None = None) -> dict[str, float]:
    repeats = int(argv[0]) if argv else 11
    compile_bytecode()
    # Round by round (each program once per round), so that a machine that speeds up or
    # slows down over the seconds this takes moves every program alike; each ratio is the
    # median of the rounds' ratios.
    rounds = [{name: time_import(body) for name, body in PROGRAMS.items()}
              for _ in range(repeats)]
    ms = {name: statistics.median(r[name] for r in rounds) for name in PROGRAMS}

    def ratio(what: str, to: str) -> float:
        return statistics.median(r[what] / r[to] for r in rounds)

    base = "import pydantic + one model"
    print(f"{'what':<30} {'ms':>8} {'ratio':>6}   (medians of {repeats} rounds)")
    for name, value in ms.items():
        print(f"{name:<30} {value:>8.1f} {ratio(name, base):>6.2f}")
    print(f"import stroma / its dependencies: "
          f"{ratio('import stroma', 'its dependencies + one model'):.2f}")
    print(f"import stroma / import pydantic: {ratio('import stroma', base):.2f} "
          "(target <= 1.5)")
    return ms


if __name__ == "__main__":
    main(sys.argv[1:])
