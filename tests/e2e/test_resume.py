"""Exact resume and stop requests, end to end: torchrun with 2 processes on the CPU.

A run is killed with SIGKILL (rank 1 kills itself as a step begins, so rank 0 is inside
that step when the job dies), then started again with the same settings. It must resume
from the newest complete full-state checkpoint and end with the same per-step losses and
the same final weights as a run that was never interrupted. Faults are injected through a
`sitecustomize.py` on the workers' PYTHONPATH (faults.py), so the library has no test hooks.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest
import torch
from safetensors.torch import load_file

from instructpack import TorchrunArgs, TrainingArgs, TrainingError, run_training
from instructpack.demo.example import build_tiny_model, generate_fact_conversations, write_jsonl
from instructpack.errors import DirectoryInUseError, ResumeError
from instructpack.train.checkpoints.resumable import complete_checkpoints, latest_checkpoint
from instructpack.train.metrics import read_metrics

from support.faults import inject

pytestmark = pytest.mark.slow

SAMPLES, BATCH, EPOCHS = 40, 8, 2
STEPS_PER_EPOCH = SAMPLES // BATCH  # 5
TOTAL_STEPS = STEPS_PER_EPOCH * EPOCHS
FINAL = f"samples_{SAMPLES * EPOCHS}"
TOL = 1e-6

@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tokenizer_dirs):
    root = tmp_path_factory.mktemp("resume")
    model = build_tiny_model(root / "model", tokenizer_dirs["chatml"])
    data = write_jsonl(root / "facts.jsonl", generate_fact_conversations(SAMPLES, seed=0))
    return {"root": root, "model": model, "data": data, "references": {}}


def training_args(ws, out: str, **overrides) -> TrainingArgs:
    args = dict(model_path=str(ws["model"]), data_path=str(ws["data"]), ckpt_output_dir=str(ws["root"] / out),
                data_output_dir=str(ws["root"] / "processed"), max_seq_len=512, max_batch_len=1024,
                effective_batch_size=BATCH, learning_rate=5e-3, warmup_steps=2, num_epochs=EPOCHS,
                checkpoint_at_epoch=False, gradient_checkpointing=False, full_state_every_steps=3)
    args.update(overrides)
    return TrainingArgs(**args)


def reference(ws, name: str, **overrides) -> Path:
    """An uninterrupted run with these settings (run once per module)."""
    if name not in ws["references"]:
        args = training_args(ws, f"reference-{name}", **overrides)
        run_training(TorchrunArgs(nproc_per_node=2), args)
        ws["references"][name] = Path(args.ckpt_output_dir)
    return ws["references"][name]


def final_weights(out: Path, file: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(out / "hf_format" / FINAL / file)


def assert_same_run(resumed: Path, expected: Path, files=("model.safetensors",)) -> None:
    got, want = read_metrics(resumed), read_metrics(expected)
    assert [r["step"] for r in got] == list(range(1, TOTAL_STEPS + 1))  # each step once: the file was cut back
    for g, w in zip(got, want):
        for key in ("loss", "grad_norm", "lr"):
            assert abs(g[key] - w[key]) <= TOL, (g["step"], key, g[key], w[key])
        assert (g["epoch"], g["samples"], g["total_samples"], g["tokens"]) == \
            (w["epoch"], w["samples"], w["total_samples"], w["tokens"])
    for file in files:
        a, b = final_weights(resumed, file), final_weights(expected, file)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.allclose(a[key], b[key], rtol=0, atol=TOL), key


def kill_and_resume(ws, tmp_path, monkeypatch, out: str, kills: list[tuple[int, int]], **overrides) -> Path:
    """Runs the job once per (kill_in_step, expected_checkpoint_step): rank 1 kills itself as
    that global step begins, and the newest complete full state must be the expected one;
    then a last run goes to the end. Returns the output directory."""
    args = training_args(ws, out, **overrides)
    out = Path(args.ckpt_output_dir)
    done = 0  # steps completed before this launch (its own step count starts after them)
    for kill_in_step, expected_step in kills:
        with monkeypatch.context() as m:
            inject(m, tmp_path / f"kill-{kill_in_step}", "os.kill(os.getpid(), signal.SIGKILL)",
                   step=kill_in_step - done)
            with pytest.raises(TrainingError) as info:
                run_training(TorchrunArgs(nproc_per_node=2), args)
        assert info.value.rank == 1 and "SIGKILL" in info.value.reason
        assert len(read_metrics(out)) == kill_in_step - 1  # logged by rank 0 before the job died
        checkpoint = latest_checkpoint(out)
        assert checkpoint.name == f"step_{expected_step}"
        done = expected_step
    run_training(TorchrunArgs(nproc_per_node=2), args)
    assert f"resumed from {checkpoint}" in (out / "training.log").read_text()
    return out


@pytest.mark.parametrize("backend", ["ddp", "fsdp"])
def test_killed_run_resumes_to_the_same_result(workspace, tmp_path, monkeypatch, backend):
    """The full state is saved every 3 steps and at epoch ends (steps 5 and 10). Killed in
    step 5, the run resumes after step 3, in the middle of epoch 0; that resumed run is
    killed in step 6 and resumes after step 5, the last step of epoch 0."""
    expected = reference(workspace, backend, distributed_backend=backend)
    out = kill_and_resume(workspace, tmp_path, monkeypatch, f"killed-{backend}", [(5, 3), (6, 5)],
                          distributed_backend=backend)
    assert_same_run(out, expected)


def test_lora_with_dropout_resumes_to_the_same_result(workspace, tmp_path, monkeypatch):
    """Adapter weights, their optimizer state, and the random state of each rank (dropout
    masks) all come back."""
    lora = {"rank": 4, "alpha": 8, "dropout": 0.1}
    expected = reference(workspace, "lora", distributed_backend="ddp", lora=lora)
    out = kill_and_resume(workspace, tmp_path, monkeypatch, "killed-lora", [(5, 3)], distributed_backend="ddp",
                          lora=lora)
    assert_same_run(out, expected, files=("model.safetensors", "adapter/adapter_model.safetensors"))


def test_a_changed_setting_or_dataset_is_refused_before_launch(workspace, tmp_path):
    done = reference(workspace, "ddp", distributed_backend="ddp")
    out = tmp_path / "changed"
    shutil.copytree(latest_checkpoint(done), out / "full_state" / latest_checkpoint(done).name)
    start = time.monotonic()
    with pytest.raises(ResumeError) as info:
        run_training(TorchrunArgs(nproc_per_node=2), training_args(
            workspace, "unused", ckpt_output_dir=str(out), distributed_backend="ddp", effective_batch_size=4))
    message = str(info.value)
    assert "effective_batch_size: the checkpoint has '8', this run '4'" in message
    assert "start fresh" in message and str(out / "full_state") in message
    assert time.monotonic() - start < 30  # refused by the launcher: no worker started
    assert not (out / "training.log").exists()

    other = write_jsonl(tmp_path / "other.jsonl", generate_fact_conversations(SAMPLES, seed=1))
    # Refused before preprocessing writes anything, and named in words, not by hashes.
    with pytest.raises(ResumeError, match=rf"it trained .*, made from .*facts.jsonl \(sha256 \w+\): {SAMPLES} samples, "
                                          rf".*; data_path {other} is not the file it was made from.*Nothing was "
                                          r"written"):
        run_training(TorchrunArgs(nproc_per_node=2), training_args(
            workspace, "unused", ckpt_output_dir=str(out), distributed_backend="ddp", data_path=str(other),
            data_output_dir=str(tmp_path / "other-processed")))
    assert not (tmp_path / "other-processed").exists()


def _rank_pid(job: Path, rank: int) -> int | None:
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or b"instructpack.train.worker" not in (proc / "cmdline").read_bytes() \
                    or str(job).encode() not in (proc / "cmdline").read_bytes():
                continue
            if f"RANK={rank}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                return int(proc.name)
        except OSError:
            continue
    return None


def start_slow_run(args: TrainingArgs, tmp_path: Path, until: str) -> tuple[subprocess.Popen, list[str]]:
    """run_training in a process of its own, its steps slowed (0.4 s each, the same math)
    so that a signal or a kill lands mid-run; returns once a line containing `until` is
    logged, with the lines so far. A run stopped on request prints STOPPED, its step and
    why, and exits 75."""
    script = tmp_path / "run.py"
    script.write_text("import msgspec, sys\n"
                      "from instructpack import TorchrunArgs, TrainingArgs, TrainingStopped, run_training\n"
                      f"args = msgspec.json.decode({msgspec.json.encode(args).decode()!r}, type=TrainingArgs)\n"
                      "try:\n"
                      "    run_training(TorchrunArgs(nproc_per_node=2), args)\n"
                      "except TrainingStopped as e:\n"
                      "    print('STOPPED', e.step, e.reason, flush=True)\n"
                      "    sys.exit(75)\n")
    with pytest.MonkeyPatch.context() as m:
        inject(m, tmp_path / "slow", "time.sleep(0.4)", ranks=("0", "1"))
        env = dict(os.environ)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if until in line:
            break
    return proc, seen


@pytest.mark.parametrize("target", ["launcher", "worker"])
def test_stop_signal_saves_the_state_and_the_run_resumes(workspace, tmp_path, target):
    """SIGTERM to the launcher, or SIGUSR1 to one worker: both ranks finish the step they
    are in, save the full state, exit cleanly, and the job then resumes exactly."""
    args = training_args(workspace, f"stopped-{target}", distributed_backend="ddp", full_state_every_steps=0,
                         accelerate_full_state_at_epoch=False)
    proc, seen = start_slow_run(args, tmp_path, until="step 2/")
    job = Path(args.ckpt_output_dir) / "job.json"
    if target == "launcher":
        proc.send_signal(signal.SIGTERM)
    else:
        pid = _rank_pid(job, 1)
        assert pid is not None, "rank 1 not found"
        os.kill(pid, signal.SIGUSR1)
    try:
        rest, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the run did not stop within 60 s:\n" + "".join(seen[-20:]))
    output = "".join(seen) + rest
    assert proc.returncode == 75, output[-3000:]
    step = int(output.split("STOPPED ")[1].split()[0])
    assert 2 <= step < TOTAL_STEPS
    assert ("SIGTERM to the launcher" if target == "launcher" else "SIGUSR1") in output
    out = Path(args.ckpt_output_dir)
    assert [c.name for c in complete_checkpoints(out)] == [f"step_{step}"]
    assert len(read_metrics(out)) == step
    assert _rank_pid(job, 0) is None and _rank_pid(job, 1) is None  # every worker exited

    run_training(TorchrunArgs(nproc_per_node=2), args)  # no stop now: runs to the end
    assert_same_run(out, reference(workspace, "ddp", distributed_backend="ddp"))


def _job_processes(launcher_pid: int) -> list[int]:
    """torchrun and the workers a launcher started (they carry its pid in their environment)."""
    mark = f"INSTRUCTPACK_LAUNCHER_PID={launcher_pid}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and mark in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def test_a_launcher_killed_alone_takes_its_job_with_it_and_a_rerun_resumes_exactly(workspace, tmp_path):
    """kill -9 of the user's process (the OOM killer does this) leaves no torchrun and no
    worker behind to train on unwatched; a second run into the same directory is refused
    while the first lives; the same call made again at once resumes exactly."""
    expected = reference(workspace, "ddp", distributed_backend="ddp")
    args = training_args(workspace, "launcher-killed", distributed_backend="ddp")
    launcher, seen = start_slow_run(args, tmp_path, until="step 4/")  # the full state of step 3 is saved
    assert len(_job_processes(launcher.pid)) >= 3, "".join(seen[-20:])  # torchrun and two workers

    with pytest.raises(DirectoryInUseError, match=rf"launcher-killed is in use by run_training \(host .*, pid "
                                                  rf"{launcher.pid}, started"):
        run_training(TorchrunArgs(nproc_per_node=2), args)

    launcher.kill()  # SIGKILL to the launcher alone
    launcher.wait()
    deadline = time.monotonic() + 15
    while _job_processes(launcher.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _job_processes(launcher.pid) == [], "processes of the job outlived their launcher"
    out = Path(args.ckpt_output_dir)
    assert latest_checkpoint(out).name in ("step_3", "step_5")  # nothing half-written looks complete

    run_training(TorchrunArgs(nproc_per_node=2), args)  # at once: no port, lock or worker is left in the way
    assert "resumed from" in (out / "training.log").read_text()
    assert_same_run(out, expected)


@pytest.mark.parametrize("request_by", ["trigger-file", "SIGUSR2"])
def test_on_demand_checkpoint_saves_stops_and_the_run_resumes(workspace, tmp_path, monkeypatch, request_by):
    """on_demand_checkpointing: InstructLab's trigger file in /dev/shm (one left over from
    before the run asks nothing), or a signal only this mode catches, makes every rank save
    the full state after the current step and exit; the job then resumes exactly."""
    trigger = Path("/dev/shm") / f"instructpack-test-{os.getpid()}-{request_by}"
    monkeypatch.setenv("CHECKPOINT_TRIGGER_FILENAME", trigger.name)
    trigger.write_text("left by an earlier run\n")
    os.utime(trigger, (time.time() - 3600, time.time() - 3600))
    args = training_args(workspace, f"on-demand-{request_by}", distributed_backend="ddp", full_state_every_steps=0,
                         accelerate_full_state_at_epoch=False, on_demand_checkpointing=True)
    try:
        proc, seen = start_slow_run(args, tmp_path, until="step 2/")
        if request_by == "trigger-file":
            trigger.write_text("1")  # what InstructLab's launcher (or the user's tooling) writes
        else:
            proc.send_signal(signal.SIGUSR2)
        rest, _ = proc.communicate(timeout=60)
        output = "".join(seen) + rest
        assert proc.returncode == 75, output[-3000:]
        step = int(output.split("STOPPED ")[1].split()[0])
        assert 2 <= step < TOTAL_STEPS
        assert (f"the checkpoint trigger {trigger}" if request_by == "trigger-file" else "SIGUSR2") in output
        assert trigger.exists() is (request_by != "trigger-file")  # a trigger is used up by its checkpoint
        out = Path(args.ckpt_output_dir)
        assert [c.name for c in complete_checkpoints(out)] == [f"step_{step}"]
    finally:
        trigger.unlink(missing_ok=True)
    run_training(TorchrunArgs(nproc_per_node=2), args)
    assert_same_run(out, reference(workspace, "ddp", distributed_backend="ddp"))
