"""FileStore tests run on both anyio backends: aiofiles serves asyncio, anyio threads serve trio."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["asyncio", "trio"], scope="module")
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Every async test in tests/file runs once on asyncio and once on trio."""
    return str(request.param)
