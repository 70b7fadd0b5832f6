"""Shared test settings: both anyio backends, a hypothesis profile, no real sleeps."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "stroma",
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("ci", parent=settings.get_profile("stroma"), max_examples=100)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "stroma"))


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Runner tests run on asyncio and on trio."""
    return str(request.param)
