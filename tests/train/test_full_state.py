"""Full-state checkpoints in one process: what is saved comes back, writes are atomic,
failures leave the previous checkpoint intact, nothing in a checkpoint can run code, and a
run that differs from the one that saved is refused with what changed."""

from __future__ import annotations

import json
import os
import pickle
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch

from instructpack.config import TrainingArgs
from instructpack.data.manifest import Manifest, ShardEntry, TokenizerInfo
from instructpack.data.sampler import MultipackSampler
from instructpack.errors import CheckpointError, ResumeError
from instructpack.train.backends import Backend
from instructpack.train.checkpoints import full_state as state_module
from instructpack.train.checkpoints.full_state import resume, save_full_state
from instructpack.train.checkpoints.identity import COMPLETE, Progress, check_fingerprint, run_fingerprint
from instructpack.train.checkpoints.resumable import complete_checkpoints, latest_checkpoint, record_of
from instructpack.train.distributed import World
from instructpack.train.optim import build_optimizer, build_scheduler

WORLD = World(0, 0, 1, torch.device("cpu"))
LENGTHS = np.arange(10, 74)  # 64 samples: 8 steps of 8


def args(**overrides) -> TrainingArgs:
    values = dict(model_path="unused", data_path="unused", ckpt_output_dir="unused", data_output_dir="unused",
                  max_seq_len=128, max_batch_len=128, effective_batch_size=8, learning_rate=1e-2, warmup_steps=1)
    values.update(overrides)
    return TrainingArgs(**values)


class Run:
    """A tiny model with its optimizer, schedule and sampler, as the loop holds them."""

    def __init__(self, seed: int, width: int = 8):
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.Tanh(), torch.nn.Linear(width, 1))
        self.backend = Backend(self.model, build_optimizer(self.model, args()), WORLD)
        self.scheduler = build_scheduler(self.backend.optimizer, args(), total_steps=8)
        self.sampler = MultipackSampler(LENGTHS, effective_batch_size=8, max_batch_len=128)

    def step(self) -> None:
        x = torch.randn(16, 4)
        loss = torch.nn.functional.dropout(self.model(x), p=0.5).pow(2).mean()  # draws from the RNG
        self.backend.backward(loss)
        self.backend.step(1.0)
        self.scheduler.step()
        self.sampler.advance(self.sampler.epoch, self.sampler.step)

    def save(self, out: Path, step: int, fingerprint=None, keep_last: int = 2) -> Path:
        progress = Progress(step, step * 8, step * 300, 1.5)
        return save_full_state(out, self.backend, self.scheduler, self.sampler, progress,
                               fingerprint or {"run": "a"}, WORLD, keep_last=keep_last)


def test_everything_saved_comes_back(tmp_path):
    original = Run(seed=0)
    for _ in range(3):
        original.step()
    saved = original.save(tmp_path, 3)
    assert saved == tmp_path / "full_state" / "step_3" and (saved / COMPLETE).is_file()

    restored = Run(seed=1)  # other weights, no optimizer state, schedule at 0
    progress, checkpoint = resume(tmp_path, restored.backend, restored.scheduler, restored.sampler, {"run": "a"},
                                  WORLD)
    assert checkpoint == saved and progress == Progress(3, 24, 900, 1.5)
    for a, b in zip(original.model.parameters(), restored.model.parameters()):
        assert torch.equal(a, b)
    a_state, b_state = original.backend.optimizer.state_dict(), restored.backend.optimizer.state_dict()
    for key in a_state["state"]:
        for name, value in a_state["state"][key].items():
            assert torch.equal(value, b_state["state"][key][name]), name
    assert restored.scheduler.state_dict() == original.scheduler.state_dict()
    assert (restored.sampler.epoch, restored.sampler.step) == (0, 3)
    # Both take the next step alike (same weights, moments and learning rate), given the
    # same random stream: the two runs share this process's generators.
    rng = torch.get_rng_state()
    original.step()
    torch.set_rng_state(rng)
    restored.step()
    assert all(torch.equal(a, b) for a, b in zip(original.model.parameters(), restored.model.parameters()))


def test_random_generators_of_every_kind_are_restored(tmp_path):
    run = Run(seed=0)
    run.step()
    run.save(tmp_path, 1)
    expected = (torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)])
    fresh = Run(seed=2)
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    resume(tmp_path, fresh.backend, fresh.scheduler, fresh.sampler, {"run": "a"}, WORLD)
    got = (torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)])
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_no_checkpoint_is_a_fresh_start(tmp_path):
    run = Run(seed=0)
    fresh = Progress(0, 0, 0, 0.0)
    assert resume(tmp_path, run.backend, run.scheduler, run.sampler, {"run": "a"}, WORLD) == (fresh, None)


def test_only_the_newest_complete_checkpoints_are_kept_and_incomplete_ones_are_ignored(tmp_path):
    run = Run(seed=0)
    saved = []
    for step in (1, 2, 3):
        run.step()
        saved.append(run.save(tmp_path, step))  # full_state_keep_last=2, the default
    assert complete_checkpoints(tmp_path) == saved[1:] and not saved[0].exists()
    run.step()
    second = run.save(tmp_path, 4, keep_last=1)
    assert complete_checkpoints(tmp_path) == [second]
    # A crash between the rename and the mark: the directory is there, unmarked.
    (second / COMPLETE).unlink()
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / "full_state" / ".step_5.tmp").mkdir()  # a crash while writing
    run.step()
    third = run.save(tmp_path, 3)
    assert sorted(p.name for p in (tmp_path / "full_state").iterdir()) == ["step_3"]  # both leftovers cleared
    assert latest_checkpoint(tmp_path) == third


def test_a_failure_before_the_mark_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    run = Run(seed=0)
    run.step()
    previous = run.save(tmp_path, 1)
    real = state_module.write_synced

    def failing(path, text):
        if path.name == COMPLETE:
            raise OSError(28, "No space left on device")
        real(path, text)

    monkeypatch.setattr(state_module, "write_synced", failing)
    run.step()
    with pytest.raises(CheckpointError) as info:
        run.save(tmp_path, 2)
    message = str(info.value)
    assert "No space left on device" in message and f"{previous}, is intact" in message and "Free space" in message
    assert latest_checkpoint(tmp_path) == previous and (previous / COMPLETE).is_file()
    assert sorted(p.name for p in (tmp_path / "full_state").iterdir()) == ["step_1"]  # the unmarked one is gone


DISK_FULL = textwrap.dedent("""
    import json, resource, signal, sys, torch
    sys.path.insert(0, {tests!r})
    from test_full_state import Run
    from instructpack.errors import CheckpointError
    run = Run(seed=0, width=256)  # its weights file is larger than the limit below
    run.step()
    run.save({out!r}, 1)
    # Files may not grow past 2 KiB from now on, as on a full disk: writes fail with EFBIG.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2048, resource.RLIM_INFINITY))
    run.step()
    try:
        run.save({out!r}, 2)
        print(json.dumps({{"error": None}}))
    except CheckpointError as e:
        print(json.dumps({{"error": str(e)}}))
""")


def test_a_full_disk_gives_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path):
    out = tmp_path / "out"
    code = DISK_FULL.format(tests=str(Path(__file__).parent), out=str(out))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    error = json.loads(result.stdout.strip().splitlines()[-1])["error"]
    assert error is not None, "the save should have failed"
    assert "step_2" in error and "step_1, is intact" in error and "Free space" in error
    assert [p.name for p in (out / "full_state").iterdir()] == ["step_1"]  # nothing half-written left
    run = Run(seed=1, width=256)
    progress, checkpoint = resume(out, run.backend, run.scheduler, run.sampler, {"run": "a"}, WORLD)
    assert checkpoint.name == "step_1" and progress.step == 1


def test_an_unwritable_output_directory_gives_a_clear_error(tmp_path):
    (tmp_path / "full_state").write_text("a file where the checkpoint directory belongs")
    run = Run(seed=0)
    run.step()
    with pytest.raises(CheckpointError, match="could not write .*step_1.*there is no earlier full state"):
        run.save(tmp_path, 1)


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path("/tmp/instructpack-test-state-marker")


@pytest.mark.parametrize("victim", ["rng_rank00000.pt", "model/rank00000.pt"])
def test_a_checkpoint_file_cannot_run_code(tmp_path, victim):
    MARKER.unlink(missing_ok=True)
    run = Run(seed=0)
    run.step()
    saved = run.save(tmp_path, 1)
    with open(saved / victim, "wb") as f:
        pickle.dump({"torch": Payload()}, f)
    _rerecord_checksums(saved)  # an attacker who rewrites the checksums too: loading itself must refuse
    fresh = Run(seed=1)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        resume(tmp_path, fresh.backend, fresh.scheduler, fresh.sampler, {"run": "a"}, WORLD)
    assert not MARKER.exists()


def _rerecord_checksums(checkpoint: Path) -> None:
    (checkpoint / COMPLETE).write_text(json.dumps({"step": 1, "files": record_of(checkpoint, skip={COMPLETE})}))


def test_a_damaged_trainer_state_is_named(tmp_path):
    run = Run(seed=0)
    run.step()
    saved = run.save(tmp_path, 1)
    (saved / "trainer_state.json").write_text('{"format": "instructpack-full-st')
    with pytest.raises(ResumeError, match=r"step_1 is damaged: trainer_state.json holds .* bytes"):
        resume(tmp_path, run.backend, run.scheduler, run.sampler, {"run": "a"}, WORLD)
    _rerecord_checksums(saved)  # unreadable even so
    with pytest.raises(ResumeError, match=r"trainer_state.json: unreadable .*no earlier complete full state is kept"):
        resume(tmp_path, run.backend, run.scheduler, run.sampler, {"run": "a"}, WORLD)


@pytest.mark.parametrize("damage", ["model/rank00000.pt", "rng_rank00000.pt", "progress"])
def test_a_checkpoint_missing_a_part_is_named_as_damaged(tmp_path, damage):
    run = Run(seed=0)
    run.step()
    saved = run.save(tmp_path, 1)
    if damage == "progress":
        state = json.loads((saved / "trainer_state.json").read_text())
        del state["progress"]["samples"]
        (saved / "trainer_state.json").write_text(json.dumps(state))
    else:
        (saved / damage).unlink()
    fresh = Run(seed=1)
    with pytest.raises(ResumeError, match=r"step_1 is damaged.*no earlier complete full state is kept in .*full_state "
                                          r"to fall back to: start fresh by moving .*full_state away"):
        resume(tmp_path, fresh.backend, fresh.scheduler, fresh.sampler, {"run": "a"}, WORLD)


def test_flipped_bytes_in_a_weights_file_are_found_and_named(tmp_path):
    run = Run(seed=0)
    run.step()
    saved = run.save(tmp_path, 1)
    weights = saved / "model" / "rank00000.pt"
    data = bytearray(weights.read_bytes())
    at = len(data) // 2  # inside the tensor data: it would load, with wrong values
    data[at:at + 16] = bytes(b ^ 0xFF for b in data[at:at + 16])
    weights.write_bytes(bytes(data))
    with pytest.raises(ResumeError, match=r"step_1 is damaged: model/rank00000.pt changed since it was written "
                                          r"\(checksum \w+, \w+ when written\); no earlier complete full state"):
        resume(tmp_path, Run(seed=1).backend, run.scheduler, run.sampler, {"run": "a"}, WORLD)


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before_it(tmp_path, caplog):
    run = Run(seed=0)
    run.step()
    first = run.save(tmp_path, 1)
    expected = [p.detach().clone() for p in run.model.parameters()]
    run.step()
    second = run.save(tmp_path, 2)
    rng = second / "rng_rank00000.pt"
    rng.write_bytes(rng.read_bytes()[:-1] + bytes([rng.read_bytes()[-1] ^ 1]))
    fresh = Run(seed=1)
    with caplog.at_level("WARNING"):
        progress, checkpoint = resume(tmp_path, fresh.backend, fresh.scheduler, fresh.sampler, {"run": "a"}, WORLD)
    assert checkpoint == first and progress.step == 1
    assert all(torch.equal(a, b) for a, b in zip(fresh.model.parameters(), expected))
    assert "rng_rank00000.pt changed since it was written" in caplog.text and "step_2.damaged" in caplog.text
    assert (tmp_path / "full_state" / "step_2.damaged" / "rng_rank00000.pt").is_file()  # kept, never resumed
    assert complete_checkpoints(tmp_path) == [first]


def test_a_model_of_another_shape_is_refused(tmp_path):
    run = Run(seed=0)
    run.step()
    run.save(tmp_path, 1)
    other = Run(seed=0)
    other.model[2] = torch.nn.Linear(8, 2)
    other.backend = Backend(other.model, build_optimizer(other.model, args()), WORLD)
    with pytest.raises(ValueError, match=r"model\.2\.weight: saved \(1, 8\), this run holds \(2, 8\)"):
        other.backend.load_weights_and_optimizer(latest_checkpoint(tmp_path) / "model")


def test_fingerprint_names_what_changed_and_ignores_what_may_change(tmp_path):
    entry = ShardEntry(file="shard-00000.bin", samples=4, tokens=40, bytes=1000, checksum="ab")
    manifest = Manifest(shards=[entry], tokenizer=TokenizerInfo(vocab_size=600))
    base = run_fingerprint(args(), manifest, world_size=2)
    # Memory and bookkeeping settings may change between the run that saved and the next.
    assert run_fingerprint(args(max_batch_len=256, save_samples=64, full_state_every_steps=5,
                                ckpt_output_dir="elsewhere", logger_type="tensorboard"), manifest, 2) == base
    changes = {
        "effective_batch_size": run_fingerprint(args(effective_batch_size=16), manifest, 2),
        "optimizer": run_fingerprint(args(learning_rate=2e-2), manifest, 2),
        "world_size": run_fingerprint(args(), manifest, 4),
        "dataset": run_fingerprint(args(), msgspec.structs.replace(
            manifest, shards=[msgspec.structs.replace(entry, checksum="cd")]), 2),
        "lora": run_fingerprint(args(lora={"rank": 8}), manifest, 2),
        "distributed_backend": run_fingerprint(args(distributed_backend="deepspeed"), manifest, 2),
    }
    checkpoint = tmp_path / "full_state" / "step_7"
    for field, other in changes.items():
        assert [k for k in base if base[k] != other[k]] == [field]
        with pytest.raises(ResumeError) as info:
            check_fingerprint(base, other, checkpoint)
        assert f"{field}: the checkpoint has" in str(info.value)
        assert f"move {checkpoint.parent} away" in str(info.value)
    check_fingerprint(base, dict(base), checkpoint)  # the same run resumes


def _check_shared_in_rank(rank: int, store: str, directories: list[str], results: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(store, 2), rank=rank, world_size=2)
    try:
        state_module.check_shared(directories[rank], World(rank, rank, 2, torch.device("cpu")))
        outcome = "ok"
    except ResumeError as e:
        outcome = str(e)
    finally:
        dist.destroy_process_group()
    Path(results, f"rank{rank}").write_text(outcome)


@pytest.mark.parametrize("shared", [True, False])
def test_ranks_that_do_not_share_the_output_directory_are_told_so(tmp_path, shared):
    """Two processes, as two machines would be: with one ckpt_output_dir both go on; with a
    directory of its own each (a machine's local disk), both stop with the reason."""
    import multiprocessing

    directories = [str(tmp_path / "shared")] * 2 if shared else [str(tmp_path / "node0"), str(tmp_path / "node1")]
    spawn = multiprocessing.get_context("spawn")
    procs = [spawn.Process(target=_check_shared_in_rank, args=(r, str(tmp_path / "store"), directories, str(tmp_path)))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    outcomes = [(tmp_path / f"rank{r}").read_text() for r in range(2)]
    if shared:
        assert outcomes == ["ok", "ok"]
        assert list((tmp_path / "shared" / "full_state").iterdir()) == []  # the probe is cleaned up
    else:
        assert all("is not the same directory on every machine" in o and "share" in o for o in outcomes)
        assert "(another rank cannot see" in outcomes[0] and "(rank 1 cannot see the files rank 0" in outcomes[1]
