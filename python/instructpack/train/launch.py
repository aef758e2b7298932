"""`run_training(torchrun_args, training_args)`: prepare the data, then run the workers
under torchrun and report how they ended.

The workers' output goes to the console and to `ckpt_output_dir/training.log`. A failed run
raises `TrainingError` naming the rank that failed first, its exit code, its error and the
last lines of the log. SIGTERM or SIGUSR1 (a scheduler preempting the job) asks the workers
to stop after the current step with the full training state saved, and then raises
`TrainingStopped`; a second one stops them at once. Ctrl-C stops the workers (SIGINT, then
SIGKILL after a grace period) and re-raises KeyboardInterrupt. Importing this module does
not import torch.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..config import ConfigError, DataProcessArgs, DistributedBackend, TorchrunArgs, TrainingArgs, config_from_dict
from ..data.shards import read_manifest
from .job import STOP_FILE, STOP_SIGNALS, STOPPED_FILE, JobConfig, write_job
from .metrics import check_sinks
from .model_files import check_model_dir
from .state import check_resumable, run_fingerprint

LOG_FILE = "training.log"
JOB_FILE = "job.json"
TAIL_LINES = 30
STOP_GRACE_S = 30
MOCK_STEPS = 8  # mock_data: this many steps of effective_batch_size samples per epoch


class TrainingStopped(Exception):
    """The run stopped early on request (SIGTERM/SIGUSR1) after saving its full state;
    running the same job again resumes it."""

    def __init__(self, reason: str, step: int | None = None, checkpoint: str | None = None):
        self.reason, self.step, self.checkpoint = reason, step, checkpoint
        if checkpoint is None:
            super().__init__(f"training stopped by {reason} before the training state was saved")
        else:
            super().__init__(f"training stopped by {reason} after step {step}; its full state is in {checkpoint}: "
                             "run the same job again to resume")


class TrainingError(RuntimeError):
    """A worker failed. `rank` is the global rank that failed first (None if unknown)."""

    def __init__(self, rank: int | None, exit_code: int | None, reason: str, log_tail: list[str], log_path: Path):
        self.rank, self.exit_code, self.reason, self.log_tail, self.log_path = rank, exit_code, reason, log_tail, log_path
        where = f"rank {rank}" if rank is not None else "a worker"
        code = f" (exit code {exit_code})" if exit_code is not None else ""
        tail = "\n".join(f"  | {line}" for line in log_tail)
        super().__init__(f"training failed on {where}{code}: {reason}\nlast lines of {log_path}:\n{tail}")


def run_training(torchrun_args: TorchrunArgs | Mapping | None = None,
                 training_args: TrainingArgs | Mapping | None = None, *,
                 torch_args: TorchrunArgs | Mapping | None = None,
                 train_args: TrainingArgs | Mapping | None = None) -> None:
    """Fine-tunes `training_args.model_path`; `torch_args`/`train_args` are accepted as the
    InstructLab README also uses those names."""
    torchrun_args = _one_of(torchrun_args, torch_args, "torchrun_args", "torch_args", TorchrunArgs)
    training_args = _one_of(training_args, train_args, "training_args", "train_args", TrainingArgs)
    if training_args is None:
        raise TypeError("run_training() needs training_args (a TrainingArgs)")
    torchrun_args = torchrun_args or TorchrunArgs()
    _check_supported(torchrun_args, training_args)

    out = Path(training_args.ckpt_output_dir)
    out.mkdir(parents=True, exist_ok=True)
    world_size = _world_size(torchrun_args)
    dataset_path = prepare_dataset(training_args, world_size=world_size)
    if world_size is not None:  # else the workers check, once they know the world size
        # A run that cannot resume the newest full state is refused before any worker starts.
        check_resumable(out, run_fingerprint(training_args, read_manifest(dataset_path), world_size))
    status_dir = Path(tempfile.mkdtemp(prefix=".run-", dir=out))
    job = write_job(out / JOB_FILE, JobConfig(training_args=training_args, dataset_path=str(dataset_path),
                                              status_dir=str(status_dir), progress_bar=sys.stderr.isatty()))
    log_path = out / LOG_FILE
    try:
        with _stop_requests(status_dir / STOP_FILE):
            exit_code, tail = _run_logged(torchrun_command(torchrun_args, job), _worker_env(torchrun_args),
                                          log_path)
        if exit_code != 0:
            raise _failure(exit_code, status_dir, tail, log_path)
        stopped = _stopped(status_dir)
        if stopped is not None:
            raise stopped
    finally:
        shutil.rmtree(status_dir, ignore_errors=True)


def _one_of(value, alias, name: str, alias_name: str, cls: type):
    if value is not None and alias is not None:
        raise TypeError(f"run_training() got both {name} and {alias_name}; pass one")
    value = value if value is not None else alias
    if isinstance(value, Mapping):
        return config_from_dict(dict(value), into=cls)
    if value is not None and not isinstance(value, cls):
        raise TypeError(f"{name} must be a {cls.__name__} (or a mapping of its fields), got {type(value).__name__}")
    return value


def _world_size(t: TorchrunArgs) -> int | None:
    return t.nnodes * t.nproc_per_node if isinstance(t.nproc_per_node, int) else None


def _check_supported(t: TorchrunArgs, args: TrainingArgs) -> None:
    check_model_dir(args.model_path, trust_remote_code=args.trust_remote_code)  # names the file and the fix
    if args.lora is not None and args.lora.quantize_data_type is not None \
            and args.distributed_backend != DistributedBackend.DDP:
        raise ConfigError("training_args", ("distributed_backend",),
                          f"QLoRA (lora.quantize_data_type={args.lora.quantize_data_type.value!r}) keeps the base "
                          "weights in bitsandbytes 4-bit tensors, which FSDP2 and DeepSpeed cannot shard here; set "
                          "distributed_backend to 'ddp'", args.distributed_backend.value)
    world = _world_size(t)
    if world is not None and args.effective_batch_size < world:
        raise ConfigError("training_args", ("effective_batch_size",),
                          f"must be at least the number of processes ({world}): every process needs a sample "
                          "in every step", args.effective_batch_size)
    if t.nnodes > 1 and not (t.rdzv_endpoint or t.master_addr):
        raise ConfigError("torchrun_args", ("rdzv_endpoint",), "a job on several machines needs rdzv_endpoint "
                          "('host:port' of node 0) or master_addr/master_port", t.rdzv_endpoint)
    if t.nproc_per_node == "gpu":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("torchrun_args", ("nproc_per_node",), "'gpu' means one process per GPU, and "
                              "no CUDA GPU is visible; give a number of processes", t.nproc_per_node)
    check_sinks(args)  # a missing tensorboard/wandb/mlflow package fails now, not in every worker
    if not args.mock_data and not args.process_data and not Path(args.data_output_dir).is_dir():
        raise ConfigError("training_args", ("data_output_dir",), "process_data is false, so this must be an "
                          "already preprocessed dataset directory; it does not exist", args.data_output_dir)


def prepare_dataset(args: TrainingArgs, world_size: int | None = None) -> Path:
    """The dataset directory the workers read: mock data, freshly (or previously) processed
    data, or data_output_dir as it is. Checked here so that bad data fails before launch."""
    from ..data.compat import check_dataset_matches_model
    from ..data.sampler import MultipackSampler
    from ..data.shards import load_dataset

    # Every byte of a dataset that was on the disk before is checked against the manifest's
    # checksums (a damaged shard fails before launch, naming the file), and a dataset given
    # as it is, against the model's tokenizer. What preprocessing writes or reuses now was
    # made with this tokenizer and template (they are part of its reuse fingerprint), and
    # what it has just written was checksummed as it was written.
    just_written = False
    if args.mock_data:
        path = _mock_dataset(args)
    elif args.process_data:
        from .. import data_process

        result = data_process.main(DataProcessArgs(
            data_path=args.data_path, data_output_path=args.data_output_dir, model_path=args.model_path,
            chat_tmpl_path=args.chat_tmpl_path, max_seq_len=args.max_seq_len,
            num_cpu_procs=args.data_process_num_cpu_procs))
        print(result.summary(), flush=True)
        path, just_written = result.output_path, not result.reused
    else:
        path = Path(args.data_output_dir)
    dataset = load_dataset(path, verify=not just_written)  # DatasetError names the file and the fix
    if not args.process_data or args.mock_data:
        check_dataset_matches_model(path, args.model_path, args.chat_tmpl_path)
    # Planning settings are checked now (sample longer than max_batch_len, batch smaller
    # than the world...) rather than in every worker after the model has loaded.
    MultipackSampler(dataset.lengths, effective_batch_size=args.effective_batch_size,
                     max_batch_len=args.max_batch_len, world_size=world_size or 1)
    return path


def _mock_dataset(args: TrainingArgs) -> Path:
    from transformers import AutoConfig

    from ..data.synthetic import write_synthetic_dataset

    vocab = AutoConfig.from_pretrained(args.model_path, trust_remote_code=args.trust_remote_code).vocab_size
    length = args.mock_data_len or args.max_seq_len
    n = MOCK_STEPS * args.effective_batch_size
    path = Path(args.data_output_dir) / f"mock-{n}x{length}-vocab{vocab}-seed{args.random_seed}"
    if not (path / "manifest.json").is_file():
        write_synthetic_dataset(path, np.full(n, length), vocab, seed=args.random_seed)
    return path


def torchrun_command(t: TorchrunArgs, job_path: Path) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={t.nnodes}",
           f"--nproc-per-node={t.nproc_per_node}", f"--node-rank={t.node_rank}", "--max-restarts=0"]
    if t.rdzv_endpoint:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={t.rdzv_endpoint}", f"--rdzv-id={t.rdzv_id}"]
    elif t.master_addr:
        cmd += [f"--master-addr={t.master_addr}", f"--master-port={t.master_port or 29500}"]
    else:
        cmd += ["--standalone"]  # one machine: torchrun picks a free port itself
    return cmd + ["-m", "instructpack.train.worker", str(job_path)]


def _worker_env(t: TorchrunArgs) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if "OMP_NUM_THREADS" not in env and isinstance(t.nproc_per_node, int):
        # torchrun would set 1 thread per process; on CPU the cores are better shared out.
        env["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // t.nproc_per_node))
    return env


def _run_logged(cmd: list[str], env: dict[str, str], log_path: Path) -> tuple[int, list[str]]:
    """Runs cmd, copying its output to the console as it comes and to the log file line by
    line (a progress bar's carriage-return updates collapse to their last state)."""
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    console = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
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


def _stopped(status_dir: Path) -> TrainingStopped | None:
    """What rank 0 recorded when a stop request ended the run, if one did."""
    path = status_dir / STOPPED_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return TrainingStopped(record["reason"], record["step"], record["checkpoint"])


class _StopNow(BaseException):
    """A second stop signal: stop the workers without waiting for the checkpoint."""


@contextlib.contextmanager
def _stop_requests(stop_file: Path):
    """While the workers run, the first SIGTERM/SIGUSR1 creates `stop_file` (each worker
    checks it after every step) and the second stops them at once. Signal handlers can only
    be set from the main thread; elsewhere the workers are still stopped by signals sent to
    them directly."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if stop_file.exists():
            for sig in STOP_SIGNALS:  # stopping now: later signals must not cut that short
                signal.signal(sig, signal.SIG_IGN)
            raise _StopNow(f"a second {name}")
        stop_file.write_text(f"{name} to the launcher\n")
        print(f"\n{name}: the workers stop after the current step and save the training state; send it again "
              "to stop them at once", file=sys.stderr, flush=True)

    previous = {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS}
    try:
        yield
    except _StopNow as e:  # the workers may have saved before the second signal
        raise _stopped(stop_file.parent) or TrainingStopped(str(e)) from None
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


_TORCHRUN_RANK = re.compile(r"rank\s*:\s*(\d+)")
_TORCHRUN_EXIT = re.compile(r"exitcode\s*:\s*(-?\d+)")


def _failure(exit_code: int, status_dir: Path, tail: list[str], log_path: Path) -> TrainingError:
    """Which rank failed first and why. A worker that raised has recorded its error; one
    that died without a word (a signal: the kernel's out-of-memory killer sends SIGKILL)
    is named by torchrun's summary as the root cause, and comes first: the errors the
    others recorded (a peer gone from a collective) are its consequences."""
    records = {}
    for path in status_dir.glob("rank*.json"):
        try:
            record = json.loads(path.read_text())
            records[record["rank"]] = record
        except (OSError, ValueError, KeyError, TypeError):
            continue
    rank, code = _root_cause(tail)
    if rank is not None and rank not in records:
        return TrainingError(rank, code if code is not None else exit_code, _death(code), tail, log_path)
    if records:
        first = min(records.values(), key=lambda r: r["time"])
        code = code if first["rank"] == rank else None
        return TrainingError(first["rank"], code if code is not None else exit_code, first["error"], tail, log_path)
    return TrainingError(rank, code if code is not None else exit_code, _death(code), tail, log_path)


def _root_cause(lines: list[str]) -> tuple[int | None, int | None]:
    """Rank and exit code of the "Root Cause (first observed failure)" in torchrun's
    summary (else its last failure listed)."""
    start = next((i for i, line in enumerate(lines) if "Root Cause" in line), 0)
    section = lines[start:]
    rank = next((int(m.group(1)) for line in section if (m := _TORCHRUN_RANK.search(line))), None)
    code = next((int(m.group(1)) for line in section if (m := _TORCHRUN_EXIT.search(line))), None)
    return rank, code


def _death(code: int | None) -> str:
    if code is None or code >= 0:
        return "the worker exited without recording an error; see the log"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = str(-code)
    hint = " (out of memory? the kernel's OOM killer sends SIGKILL)" if -code == signal.SIGKILL else ""
    return f"killed by signal {name}{hint}"
