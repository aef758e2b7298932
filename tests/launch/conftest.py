"""The launcher's tests run run_training with torchrun replaced by a stand-in (small settings
and data: support/launching.py)."""

from __future__ import annotations

import sys

import pytest

import instructpack.launch.run as launcher


@pytest.fixture
def stub_workers(monkeypatch):
    """torchrun replaced by a command that succeeds at once."""
    monkeypatch.setattr(launcher, "torchrun_command", lambda *a: [sys.executable, "-c", "pass"])


@pytest.fixture
def no_workers(monkeypatch):
    """torchrun replaced by a command that fails the run if it ever starts."""
    monkeypatch.setattr(launcher, "torchrun_command",
                        lambda *a: [sys.executable, "-c", "raise SystemExit('torchrun must not start')"])
