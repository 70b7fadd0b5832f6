"""``import stroma`` stays cheap: it loads no event loop library, no server client and no
web framework (each is imported where it is first needed), so a CLI command or a script
that only builds plans pays for none of them (benchmarks/imports.py measures the time)."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("asyncio", "trio", "ssl", "redis", "asyncpg", "starlette", "uvicorn",
         "opentelemetry", "aiofiles")


def test_import_stroma_loads_none_of_the_heavy_modules() -> None:
    code = ("import sys, stroma; print(' '.join(m for m in " + repr(HEAVY)
            + " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.split() == []
