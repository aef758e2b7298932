"""Running torchrun: its command line, the workers' environment, their output (to the
console and to the log, line by line) and what stop signals to the launcher do.

SIGTERM or SIGUSR1 (a scheduler preempting the job) asks the workers to stop after the
current step with the full training state saved; a second one stops them at once. Ctrl-C
stops the workers (SIGINT, then SIGKILL after a grace period) and re-raises
KeyboardInterrupt."""

from __future__ import annotations

import codecs
import collections
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..config import TorchrunArgs
from ..errors import TrainingStopped
from ..lifetime import LAUNCHER_PID, dies_with_this_process
from ..train.job import STOP_SIGNALS, read_stopped, request_stop, stop_requested

TAIL_LINES = 30
STOP_GRACE_S = 30


def torchrun_command(t: TorchrunArgs, job_path: Path, status_dir: Path | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={t.nnodes}",
           f"--nproc-per-node={t.nproc_per_node}", f"--node-rank={t.node_rank}", "--max-restarts=0"]
    if t.rdzv_endpoint:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={t.rdzv_endpoint}", f"--rdzv-id={t.rdzv_id}"]
    elif t.master_addr:
        cmd += [f"--master-addr={t.master_addr}", f"--master-port={t.master_port or 29500}"]
    else:
        cmd += ["--standalone"]  # one machine: torchrun picks a free port itself
    return cmd + ["-m", "instructpack.train.worker", str(job_path)] + ([str(status_dir)] if status_dir else [])


def worker_env(t: TorchrunArgs) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env[LAUNCHER_PID] = str(os.getpid())  # a worker whose launcher is gone ends at once (lifetime.py)
    if "OMP_NUM_THREADS" not in env and isinstance(t.nproc_per_node, int):
        # torchrun would set 1 thread per process; on CPU the cores are better shared out.
        env["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // t.nproc_per_node))
    return env


def run_logged(cmd: list[str], env: dict[str, str], log_path: Path) -> tuple[int, list[str]]:
    """Runs cmd, copying its output to the console as it comes and to the log file line by
    line (a progress bar's carriage-return updates collapse to their last state). Returns
    the exit code and the last lines."""
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    console = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
        log.flush()
        # torchrun, and through it every worker, is killed when this process dies (lifetime.py).
        proc = subprocess.Popen(dies_with_this_process(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # our Ctrl-C handling decides how workers stop

        def log_line(raw: bytes) -> None:
            line = raw.rsplit(b"\r", 1)[-1].decode("utf-8", "replace")
            log.write(line + "\n")
            tail.append(line)

        pending = b""
        try:
            while chunk := proc.stdout.read1(1 << 16):
                sys.stdout.write(console.decode(chunk))
                sys.stdout.flush()
                *lines, pending = (pending + chunk).split(b"\n")
                for raw in lines:
                    log_line(raw)
                log.flush()
            if pending:
                log_line(pending)
            return proc.wait(), list(tail)
        except BaseException:  # KeyboardInterrupt above all: stop the workers, then re-raise
            _stop(proc)
            raise


def stopped(status_dir: Path) -> TrainingStopped | None:
    """What rank 0 recorded when a stop request ended the run, if one did."""
    record = read_stopped(status_dir)
    return None if record is None else TrainingStopped(record.reason, record.step, record.checkpoint)


class _StopNow(BaseException):
    """A second stop signal: stop the workers without waiting for the checkpoint."""


@contextlib.contextmanager
def stop_requests(status_dir: Path, signals: tuple[signal.Signals, ...] = STOP_SIGNALS):
    """While the workers run, the first of `signals` (SIGTERM/SIGUSR1; with on-demand
    checkpointing, job.ON_DEMAND_SIGNALS) makes a stop request (each worker checks for it
    after every step) and the second stops them at once. Signal handlers can
    only be set from the main thread; elsewhere the workers are still stopped by signals
    sent to them directly."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if stop_requested(status_dir) is not None:
            for sig in signals:  # stopping now: later signals must not cut that short
                signal.signal(sig, signal.SIG_IGN)
            raise _StopNow(f"a second {name}")
        request_stop(status_dir, f"{name} to the launcher")
        print(f"\n{name}: the workers stop after the current step and save the training state; send it again "
              "to stop them at once", file=sys.stderr, flush=True)

    previous = {sig: signal.signal(sig, on_signal) for sig in signals}
    try:
        yield
    except _StopNow as e:  # the workers may have saved before the second signal
        raise stopped(status_dir) or TrainingStopped(str(e)) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)  # torchrun passes it on to the workers
    try:
        proc.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
