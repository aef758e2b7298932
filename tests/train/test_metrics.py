"""MetricsLogger (JSONL file and extra sinks), read_metrics, ProgressBar and peak_memory_mib."""

from __future__ import annotations

import json
import sys
import types

import pytest

from instructpack import TrainingArgs
from instructpack.errors import MetricsFileError, MissingSinkError
from instructpack.train.metrics import (
    RECORD_FIELDS,
    MetricsLogger,
    ProgressBar,
    peak_memory_mib,
    read_metrics,
)


def training_args(tmp_path, **kw) -> TrainingArgs:
    return TrainingArgs(model_path="m", data_path="d.jsonl", ckpt_output_dir=str(tmp_path),
                        data_output_dir=str(tmp_path / "data"), max_seq_len=128, max_batch_len=256,
                        effective_batch_size=8, learning_rate=1e-5, **kw)


def record(step: int, epoch: int = 0, loss: float = 2.5) -> dict:
    values = dict(epoch=epoch, step=step, loss=loss, lr=1e-5 * step, grad_norm=0.75, samples=8,
                  total_samples=8 * step, tokens=1000, trained_tokens=600, tokens_per_s=2000.0,
                  trained_tokens_per_s=1200.0, samples_per_s=16.0, step_time_s=0.5, micro_batches=2,
                  peak_memory_mib=512.0, elapsed_s=0.5 * step, router_aux_loss=None, max_expert_load=None,
                  peak_reserved_mib=None)
    assert tuple(values) == RECORD_FIELDS
    return values


def test_each_line_is_on_disk_as_soon_as_it_is_logged(tmp_path):
    logger = MetricsLogger(tmp_path, training_args(tmp_path))
    logger.log(record(1))
    # Read while the logger is still open: a crash now must not lose the line.
    assert (tmp_path / "metrics.jsonl").read_text().endswith("\n")
    assert read_metrics(tmp_path) == [record(1)]
    logger.log(record(2, loss=1.25))
    assert read_metrics(tmp_path / "metrics.jsonl") == [record(1), record(2, loss=1.25)]
    logger.close()


def test_fresh_run_truncates_and_resume_appends(tmp_path):
    args = training_args(tmp_path)
    with MetricsLogger(tmp_path, args) as logger:
        logger.log(record(1))
        logger.log(record(2))
    with MetricsLogger(tmp_path, args, resume_after_step=2) as logger:
        logger.log(record(3))
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    with MetricsLogger(tmp_path, args) as logger:
        logger.log(record(1, loss=9.0))
    assert read_metrics(tmp_path) == [record(1, loss=9.0)]


def test_resume_drops_a_line_cut_short_by_a_crash(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(record(1)) + "\n" + json.dumps(record(2))[:40])
    assert read_metrics(tmp_path) == [record(1)]  # the unfinished last line is not an error
    with MetricsLogger(tmp_path, training_args(tmp_path), resume_after_step=1) as logger:
        logger.log(record(2))
    assert read_metrics(tmp_path) == [record(1), record(2)]


def test_resume_drops_the_steps_after_the_checkpoint(tmp_path):
    """Killed after step 4 with the checkpoint at step 2: steps 3 and 4 run again, and the
    file must hold each step once, the new records replacing the old."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(record(s, loss=float(s))) + "\n" for s in range(1, 5)) + '{"ste')
    with MetricsLogger(tmp_path, training_args(tmp_path), resume_after_step=2) as logger:
        logger.log(record(3, loss=30.0))
    assert read_metrics(tmp_path) == [record(1, loss=1.0), record(2, loss=2.0), record(3, loss=30.0)]
    assert not list(tmp_path.glob("*.tmp"))


def test_close_is_idempotent_and_log_after_close_fails(tmp_path):
    logger = MetricsLogger(tmp_path, training_args(tmp_path))
    logger.close()
    logger.close()
    with pytest.raises(ValueError, match="closed"):
        logger.log(record(1))


def test_corrupt_line_is_reported_with_file_and_line_number(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(record(1)) + "\n" + "{not json\n" + json.dumps(record(3)) + "\n")
    with pytest.raises(MetricsFileError, match=rf"{path}:2: not valid JSON"):
        read_metrics(tmp_path)
    path.write_text(json.dumps(record(1)) + "\n[1, 2]\n")
    with pytest.raises(MetricsFileError, match=rf"{path}:2: expected a JSON object, got list"):
        read_metrics(path)


def test_missing_metrics_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "metrics.jsonl")):
        read_metrics(tmp_path)


@pytest.mark.parametrize("sink, module", [("wandb", "wandb"), ("mlflow", "mlflow"),
                                          ("tensorboard", "torch.utils.tensorboard")])
def test_missing_sink_package_is_a_clear_error_before_anything_is_written(tmp_path, monkeypatch, sink, module):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    args = training_args(tmp_path, logger_type=f"async,{sink}")
    with pytest.raises(MissingSinkError) as info:
        MetricsLogger(tmp_path / "run", args)
    message = str(info.value)
    assert "training_args.logger_type = " in message
    assert f"pip install {sink}" in message
    assert f"remove {sink!r} from logger_type" in message
    assert not (tmp_path / "run").exists()


class FakeWandb(types.ModuleType):
    def __init__(self):
        super().__init__("wandb")
        self.calls = []

    def init(self, **kw):
        self.calls.append(("init", kw))

    def log(self, data, step=None):
        self.calls.append(("log", data, step))

    def finish(self):
        self.calls.append(("finish",))


def test_wandb_sink_gets_init_numeric_metrics_per_step_and_finish(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    args = training_args(tmp_path, logger_type="async,wandb", wandb_project="proj", wandb_entity="team",
                         wandb_run_name="run-1")
    with MetricsLogger(tmp_path, args, run_config={"lr": 1e-5}) as logger:
        logger.log(record(7, epoch=1, loss=1.5))
        logger.log({**record(8), "note": "text is not a metric", "flag": True})
    assert fake.calls[0] == ("init", dict(project="proj", entity="team", name="run-1", config={"lr": 1e-5}))
    kind, data, step = fake.calls[1]
    assert (kind, step) == ("log", 7)
    assert data["train/loss"] == 1.5 and data["train/epoch"] == 1 and data["train/lr"] == record(7)["lr"]
    # Every number but the step (the x axis); the mixture-of-experts fields are None here.
    assert set(data) == {f"train/{f}" for f in RECORD_FIELDS if f != "step" and record(7)[f] is not None}
    assert fake.calls[2][2] == 8 and "train/note" not in fake.calls[2][1] and "train/flag" not in fake.calls[2][1]
    assert fake.calls[3:] == [("finish",)]
    assert len(read_metrics(tmp_path)) == 2  # the JSONL file is written as well


def test_tensorboard_sink_gets_scalars_tagged_at_the_step(tmp_path, monkeypatch):
    writers = []

    class SummaryWriter:
        def __init__(self, log_dir=None):
            self.log_dir, self.scalars, self.closed = log_dir, [], 0
            writers.append(self)

        def add_scalar(self, tag, scalar_value, global_step=None):
            self.scalars.append((tag, scalar_value, global_step))

        def close(self):
            self.closed += 1

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = SummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)

    logger = MetricsLogger(tmp_path, training_args(tmp_path, logger_type="tensorboard"))
    logger.log(record(3, loss=0.5))
    logger.close()
    logger.close()
    (writer,) = writers
    assert writer.log_dir == str(tmp_path / "tensorboard")
    assert ("train/loss", 0.5, 3) in writer.scalars
    assert ("train/tokens_per_s", 2000.0, 3) in writer.scalars
    assert len(writer.scalars) == len([v for v in record(3).values() if v is not None]) - 1
    assert {step for _, _, step in writer.scalars} == {3}
    assert writer.closed == 1

    MetricsLogger(tmp_path, training_args(tmp_path, logger_type="tensorboard",
                                          tensorboard_log_dir=str(tmp_path / "tb"))).close()
    assert writers[1].log_dir == str(tmp_path / "tb")


def test_mlflow_sink_sets_up_the_run_and_logs_metrics(tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("mlflow")
    for name in ("set_tracking_uri", "set_experiment", "end_run"):
        setattr(fake, name, lambda *a, _name=name, **kw: calls.append((_name, a, kw)))
    fake.start_run = lambda **kw: calls.append(("start_run", (), kw))
    fake.log_metrics = lambda metrics, step=None: calls.append(("log_metrics", metrics["train/loss"], step))
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    args = training_args(tmp_path, logger_type="mlflow", mlflow_tracking_uri="file:///tmp/x",
                         mlflow_experiment_name="exp", mlflow_run_name="r")
    with MetricsLogger(tmp_path, args) as logger:
        logger.log(record(4, loss=0.25))
    assert calls == [("set_tracking_uri", ("file:///tmp/x",), {}), ("set_experiment", ("exp",), {}),
                     ("start_run", (), {"run_name": "r"}), ("log_metrics", 0.25, 4), ("end_run", (), {})]


def test_progress_bar_disabled_prints_nothing(capsys):
    bar = ProgressBar(total_steps=3, enabled=False)
    for step in (1, 2, 3):
        bar.update(record(step))
    bar.close()
    assert capsys.readouterr() == ("", "")


def test_progress_bar_shows_loss_and_tokens_per_second_on_stderr(capsys):
    bar = ProgressBar(total_steps=5, enabled=True, initial=2)
    bar.update(record(3, loss=1.234567))
    bar.close()
    out, err = capsys.readouterr()
    assert out == ""
    assert "3/5" in err and "loss=1.235" in err and "tok/s=2000" in err


def test_peak_memory_on_cpu_is_the_process_peak_rss():
    import numpy as np

    block = np.ones(256 * 2**20 // 8)  # 256 MiB, every page touched
    with open("/proc/self/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    peak = peak_memory_mib("cpu")
    del block
    assert rss > 256 and rss <= peak < rss + 2**14  # at least what is resident now, not a parent's figure


def test_reserved_memory_is_cuda_only_and_a_fragmented_peak_gets_the_allocator_hint():
    from instructpack.train.metrics import fragmentation_advice, peak_reserved_mib

    assert peak_reserved_mib("cpu") is None
    assert fragmentation_advice(40_000, None, "") is None  # not CUDA
    hint = fragmentation_advice(40_000, 60_000, "")
    assert "60,000 MiB" in hint and "40,000 MiB" in hint and "expandable_segments:True" in hint
    assert fragmentation_advice(40_000, 60_000, "expandable_segments:True") is None  # already on
    assert fragmentation_advice(40_000, 60_000, "max_split_size_mb:512, expandable_segments : true") is None
    assert fragmentation_advice(40_000, 49_000, "") is None  # under a quarter more
    assert fragmentation_advice(1_000, 1_900, "") is None  # under 1 GiB more
