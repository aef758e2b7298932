"""Callbacks in a real 2-process run, defined in the user's own script (run as __main__, so
the workers cannot import the class): every hook is called on every rank as often as the
run's steps, micro-batches, epochs and checkpoints say, the instance keeps its constructor
state, the context carries the step's numbers, and a hook that raises is logged while
training goes on."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections import Counter

import pytest

from instructpack import ConfigError, TrainerCallback, run_training
from instructpack.train.metrics import read_metrics

from support.launching import small_args

pytestmark = pytest.mark.slow

USER_SCRIPT = textwrap.dedent('''
    import json, sys
    from collections import Counter
    from instructpack import TorchrunArgs, TrainerCallback, TrainingArgs, run_training

    class CountHooks(TrainerCallback):
        def __init__(self, tag):
            self.tag = tag
            self.calls = Counter()
            self.logged = []

        def _count(self, context):
            self.calls[context.hook_name] += 1

        on_train_begin = on_epoch_begin = on_step_begin = on_before_forward = on_after_backward = _count
        on_pre_optimizer_step = on_optimizer_step = on_evaluate = on_epoch_end = _count

        def on_save(self, context):
            self._count(context)
            self.logged.append(["save", context.step, context.checkpoint_path])

        def on_log(self, context):
            self._count(context)
            self.logged.append(["log", context.step, context.loss, context.total_samples])

        def on_step_end(self, context):
            self._count(context)
            raise ValueError("a broken callback")

        def on_train_end(self, context):
            self._count(context)
            name = f"{context.output_dir}/hooks-rank{int(not context.is_world_process_zero)}.json"
            with open(name, "w") as f:
                json.dump({"tag": self.tag, "calls": self.calls, "logged": self.logged,
                           "world_size": context.world_size, "main": context.is_world_process_zero}, f)

    args = TrainingArgs(**json.loads(sys.argv[1]), callbacks=[CountHooks("made-in-main")])
    run_training(TorchrunArgs(nproc_per_node=2), args)
''')


def test_callbacks_from_the_users_script_run_on_every_rank(tmp_path, model):
    args = small_args(tmp_path, model, num_epochs=2, save_samples=8, checkpoint_at_epoch=True,
                      max_batch_len=512, effective_batch_size=8)
    script = tmp_path / "my_training.py"
    script.write_text(USER_SCRIPT)
    settings = {k: v for k, v in args.model_dump().items() if k in (
        "model_path", "data_path", "ckpt_output_dir", "data_output_dir", "max_seq_len", "max_batch_len",
        "effective_batch_size", "learning_rate", "data_process_num_cpu_procs", "num_epochs", "save_samples",
        "checkpoint_at_epoch")}
    done = subprocess.run([sys.executable, str(script), json.dumps(settings)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]

    out = tmp_path / "ckpt"
    records = read_metrics(out)
    steps, epochs = len(records), 2
    micro_batches = sum(r["micro_batches"] for r in records)  # per rank: every rank runs as many
    saves = len(list((out / "hf_format").iterdir()))
    assert steps == 4 and saves >= 2
    expected = {"on_train_begin": 1, "on_epoch_begin": epochs, "on_step_begin": steps,
                "on_before_forward": micro_batches, "on_after_backward": micro_batches,
                "on_pre_optimizer_step": steps, "on_optimizer_step": steps, "on_log": steps, "on_save": saves,
                "on_step_end": steps, "on_epoch_end": epochs, "on_train_end": 1}
    for rank in (0, 1):
        seen = json.loads((out / f"hooks-rank{rank}.json").read_text())
        assert seen["tag"] == "made-in-main"  # the instance itself, not the class made anew
        assert seen["main"] is (rank == 0) and seen["world_size"] == 2
        assert Counter(seen["calls"]) == Counter(expected)
        logs = [entry for entry in seen["logged"] if entry[0] == "log"]
        assert [entry[1] for entry in logs] == [r["step"] for r in records]
        assert [entry[2] for entry in logs] == pytest.approx([r["loss"] for r in records])
        assert [entry[3] for entry in logs] == [r["total_samples"] for r in records]
    log = (out / "training.log").read_text()
    assert log.count("callback CountHooks.on_step_end raised at step 1") == 2  # once per rank, then counted
    assert "ValueError: a broken callback" in log
    assert "CountHooks.on_step_end raised 4 time(s)" in log


def test_callbacks_that_cannot_reach_the_workers_are_refused_before_launch(tmp_path, model):
    class HoldsAFile(TrainerCallback):
        def __init__(self):
            self.file = open(tmp_path / "log.txt", "w")  # noqa: SIM115

    with pytest.raises(ConfigError, match=r"callbacks\[0\].*HoldsAFile cannot be sent to the workers"):
        run_training(training_args=small_args(tmp_path, model, callbacks=[HoldsAFile()]))
    with pytest.raises(ConfigError, match=r"callbacks\[0\].*is a class; pass an instance"):
        run_training(training_args=small_args(tmp_path, model, callbacks=[TrainerCallback]))
    assert not (tmp_path / "data").exists()
