"""Stop requests in one process: a real signal, or the launcher's stop file, is noticed and
named; the multi-process agreement is exercised end to end in test_resume.py."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from instructpack.train.distributed import World
from instructpack.train.preemption import StopRequest

WORLD = World(0, 0, 1, torch.device("cpu"))


@pytest.fixture
def restore_handlers():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_is_a_stop_request_and_is_named(restore_handlers, sig):
    stop = StopRequest().install()
    assert not stop.requested() and not stop.agreed(WORLD)
    os.kill(os.getpid(), sig)  # the process goes on: only a flag is set
    assert stop.requested() and stop.agreed(WORLD)
    assert stop.reason() == f"{sig.name} to rank 0"


def test_the_launchers_stop_file_is_a_stop_request(tmp_path):
    stop = StopRequest(tmp_path)  # the status directory, where the launcher writes STOP
    assert not stop.agreed(WORLD)
    (tmp_path / "STOP").write_text("SIGTERM to the launcher\n")
    assert stop.agreed(WORLD) and stop.reason() == "SIGTERM to the launcher"
