"""Processes that end with the process that started them, however it ends (the OOM killer,
kill -9): the kernel sends SIGKILL to a child whose parent is gone (Linux's
PR_SET_PDEATHSIG). The launcher starts torchrun this way, and every worker asks for it at
start, so no worker outlives its launcher to write checkpoints nobody watches. Elsewhere
than Linux, nothing is set up (torchrun still stops its workers when it ends normally).
"""

from __future__ import annotations

import os
import signal
import sys

LAUNCHER_PID = "INSTRUCTPACK_LAUNCHER_PID"  # in the workers' environment

# `python -c WRAPPER PARENT_PID ARGS...`: asks for SIGKILL when its parent dies, checks that
# the parent has not died already, then replaces itself with `python ARGS...`.
WRAPPER = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit('its launcher is gone')\n"
    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])\n"
)


def dies_with_this_process(cmd: list[str]) -> list[str]:
    """`cmd`, a command of this Python (`[sys.executable, ...]`), run so that it is killed
    when this process dies."""
    if not sys.platform.startswith("linux"):
        return cmd
    return [sys.executable, "-c", WRAPPER, str(os.getpid()), *cmd[1:]]


def die_with_parent() -> None:
    """This process ends when its parent does; and at once if the launcher that started the
    job (LAUNCHER_PID, on this machine) is already gone."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    launcher = os.environ.get(LAUNCHER_PID)
    if launcher:
        try:
            os.kill(int(launcher), 0)
        except ProcessLookupError:
            sys.exit("its launcher is gone")
        except (PermissionError, ValueError):
            pass
