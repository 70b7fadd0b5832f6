"""Fixtures of the OpenTelemetry tests: a fresh SDK per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.otel.telemetry import Telemetry


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    """Providers of the SDK recording this test's spans and metrics in memory."""
    made = Telemetry()
    yield made
    made.shutdown()
