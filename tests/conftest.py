"""Fixtures shared by the test suite: real processor emulators and real `rinha serve` instances."""

from __future__ import annotations

from uuid import uuid4

import pytest

from rinha.metrics import Metrics
from tests.processes import Emulator, Instance


@pytest.fixture
def processors():
    """A default (5 % fee) and a fallback (15 % fee) processor emulator, fresh per test."""
    default, fallback = Emulator(0.05), Emulator(0.15)
    yield default, fallback
    default.stop()
    fallback.stop()


@pytest.fixture
def start_instance(processors):
    """Start `rinha serve` instances against `processors`; all are stopped at teardown."""
    started: list[Instance] = []

    def start(**env: str) -> Instance:
        instance = Instance(*processors, **env)
        started.append(instance)
        return instance.wait_ready()

    yield start
    for instance in started:
        instance.stop()


@pytest.fixture
def metrics_segment():
    """A fresh shared-memory metrics block (what an instance's processes count into)."""
    name = f"/rinha-test-metrics-{uuid4().hex[:10]}"
    segment = Metrics.create_or_open(name)
    yield segment
    segment.close()
    Metrics.unlink(name)
