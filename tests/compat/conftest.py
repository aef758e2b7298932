"""Fixtures of the InstructLab compatibility tests."""

from __future__ import annotations

import sys

import pytest

import instructpack.launch.run as launcher
from instructpack.train.job import read_job


@pytest.fixture
def recorded_launch(monkeypatch):
    """torchrun replaced by a command that succeeds at once; returns what it was given."""
    launches = []

    def command(torchrun_args, job, status_dir):
        launches.append((torchrun_args, read_job(job)))
        return [sys.executable, "-c", "pass"]

    monkeypatch.setattr(launcher, "torchrun_command", command)
    return launches
