"""run_training end to end on CPU: torchrun with 1 and 2 processes (gloo), a tiny Llama
learning a fact table, checkpoints that transformers loads, metrics, loss invariance
across process and micro-batch layouts, checkpoint policies and failures."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from instructpack import ConfigError, TorchrunArgs, TrainingArgs, TrainingError, run_training
from instructpack.demo.example import FACTS, build_tiny_model, fact_question, generate_fact_conversations, write_jsonl
from instructpack.demo.run import greedy_answer
from instructpack.errors import MissingSinkError
from instructpack.launch.torchrun import torchrun_command
from instructpack.train.metrics import RECORD_FIELDS, read_metrics

from support.faults import inject

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tokenizer_dirs):
    root = tmp_path_factory.mktemp("train")
    model = build_tiny_model(root / "model", tokenizer_dirs["chatml"])
    data = write_jsonl(root / "facts.jsonl", generate_fact_conversations(200, seed=0))
    small = write_jsonl(root / "small.jsonl", generate_fact_conversations(24, seed=5))
    return {"root": root, "model": model, "data": data, "small": small}


def training_args(ws, out: str, **overrides) -> TrainingArgs:
    args = dict(model_path=str(ws["model"]), data_path=str(ws["data"]), ckpt_output_dir=str(ws["root"] / out),
                data_output_dir=str(ws["root"] / "processed"), max_seq_len=512, max_batch_len=1024,
                effective_batch_size=8, learning_rate=5e-3, warmup_steps=3, num_epochs=10, save_samples=0,
                checkpoint_at_epoch=False, gradient_checkpointing=False)
    args.update(overrides)
    return TrainingArgs(**args)


def checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "hf_format").iterdir())


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


@pytest.mark.parametrize("nproc", [1, 2])
def test_learns_the_facts_and_saves_a_loadable_checkpoint(workspace, nproc):
    args = training_args(workspace, f"e2e-{nproc}")
    run_training(TorchrunArgs(nproc_per_node=nproc), args)
    out = Path(args.ckpt_output_dir)

    records = read_metrics(out)
    steps_per_epoch = math.ceil(200 / 8)
    assert [r["step"] for r in records] == list(range(1, 10 * steps_per_epoch + 1))
    assert all(list(r) == list(RECORD_FIELDS) for r in records)
    assert [r["epoch"] for r in records] == [s // steps_per_epoch for s in range(10 * steps_per_epoch)]
    assert records[-1]["total_samples"] == 10 * 200 and sum(r["samples"] for r in records) == 2000
    assert all(r["trained_tokens"] < r["tokens"] and r["micro_batches"] >= 1 and r["peak_memory_mib"] > 0
               and r["step_time_s"] > 0 and math.isfinite(r["grad_norm"]) for r in records)
    start, end = records[0]["loss"], records[-1]["loss"]
    assert start > 5.0  # about ln(vocab) for an untrained model
    assert end < start / 2 and end < 0.1

    assert checkpoints(out) == ["samples_2000"]
    final = out / "hf_format" / "samples_2000"
    assert json.loads((final / "config.json").read_text())["use_cache"] is True  # trained without, generates with
    for city, answer in FACTS.items():
        assert greedy_answer(final, fact_question(city)) == answer
    log = (out / "training.log").read_text()
    assert "step 250/250" in log and "saved checkpoint" in log


def test_same_global_batch_same_loss_and_weights(workspace):
    """One process with one micro-batch per step, one process with several, two processes:
    the same steps give the same losses and the same weights (fp32)."""
    # (processes, max_batch_len, gradient checkpointing): recomputing activations must not
    # change the result either.
    runs = {"one": (1, 1024, False), "split": (1, 256, True), "two": (2, 1024, True)}
    results = {}
    for name, (nproc, max_batch_len, checkpointing) in runs.items():
        args = training_args(workspace, f"inv-{name}", data_path=str(workspace["small"]),
                             data_output_dir=str(workspace["root"] / "processed-small"), num_epochs=1,
                             max_batch_len=max_batch_len, max_seq_len=256, gradient_checkpointing=checkpointing)
        run_training(TorchrunArgs(nproc_per_node=nproc), args)
        out = Path(args.ckpt_output_dir)
        results[name] = (read_metrics(out), weights(out / "hf_format" / "samples_24"))
    (base_metrics, base_weights) = results["one"]
    assert [r["micro_batches"] for r in base_metrics] == [1, 1, 1]
    assert max(r["micro_batches"] for r in results["split"][0]) > 1
    for name in ("split", "two"):
        metrics, w = results[name]
        assert [r["samples"] for r in metrics] == [r["samples"] for r in base_metrics]
        for a, b in zip(metrics, base_metrics):
            assert a["trained_tokens"] == b["trained_tokens"]
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        for key in base_weights:
            torch.testing.assert_close(w[key], base_weights[key], rtol=0, atol=1e-5, msg=f"{name}: {key}")


def test_checkpoint_policies(workspace):
    """24 samples, 8 per step: 3 steps per epoch, 2 epochs. save_samples=12 rounds to every
    2 steps (16 samples, never skipped); epoch ends at 24 and 48; the end at 48."""
    common = dict(data_path=str(workspace["small"]), data_output_dir=str(workspace["root"] / "processed-small"),
                  max_seq_len=256, num_epochs=2, save_samples=12, checkpoint_at_epoch=True)
    every = training_args(workspace, "ckpt-every", **common)
    run_training(training_args=every)
    out = Path(every.ckpt_output_dir)
    assert checkpoints(out) == ["samples_16", "samples_24", "samples_32", "samples_48"]

    last = training_args(workspace, "ckpt-last", keep_last_checkpoint_only=True, **common)
    run_training(train_args=last)  # InstructLab's other spelling
    last_out = Path(last.ckpt_output_dir)
    assert checkpoints(last_out) == ["last_epoch"]  # overwritten in place, no temporaries left
    final, kept = weights(out / "hf_format" / "samples_48"), weights(last_out / "hf_format" / "last_epoch")
    assert final.keys() == kept.keys() and all(torch.equal(final[k], kept[k]) for k in final)

    only_end = training_args(workspace, "ckpt-end", **{**common, "save_samples": 0, "checkpoint_at_epoch": False})
    run_training(torch_args=TorchrunArgs(), training_args=only_end)
    assert checkpoints(Path(only_end.ckpt_output_dir)) == ["samples_48"]


def test_mock_data_trains_on_random_tokens(workspace):
    args = training_args(workspace, "mock", mock_data=True, mock_data_len=32, data_path="", num_epochs=1,
                         data_output_dir=str(workspace["root"] / "mock-data"))
    run_training(training_args=args)
    records = read_metrics(args.ckpt_output_dir)
    assert len(records) == 8  # MOCK_STEPS steps of effective_batch_size samples
    # Every token is trained; a shifted loss cannot score each sample's first token.
    assert all(r["tokens"] == 8 * 32 and r["trained_tokens"] == 8 * 31 for r in records)


def test_worker_failure_names_rank_and_reason_fast(workspace, tmp_path):
    """Weights that pass the launcher's checks but are damaged: every worker fails loading
    the model, and the launcher says which rank and why, without hanging."""
    import shutil

    broken = tmp_path / "broken-model"
    shutil.copytree(workspace["model"], broken)
    (broken / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    args = training_args(workspace, "fail", model_path=str(broken), num_epochs=1)
    start = time.monotonic()
    with pytest.raises(TrainingError) as info:
        run_training(TorchrunArgs(nproc_per_node=2), args)
    elapsed = time.monotonic() - start
    err = info.value
    assert err.rank in (0, 1) and err.exit_code == 1
    assert "safetensors" in err.reason.lower() or "header" in err.reason.lower()
    assert f"rank {err.rank}" in str(err) and str(Path(args.ckpt_output_dir) / "training.log") in str(err)
    assert err.log_tail and elapsed < 60
    assert not list(Path(args.ckpt_output_dir).glob(".run-*"))


def test_a_rank_killed_mid_step_is_named_and_the_others_stop(workspace, tmp_path, monkeypatch):
    """Rank 1 dies by SIGKILL (what the out-of-memory killer sends) as step 3 begins, while
    rank 0 is inside that step waiting for it: the launcher names rank 1 and the signal
    rather than rank 0's consequent error, and returns instead of waiting forever."""
    inject(monkeypatch, tmp_path, "os.kill(os.getpid(), signal.SIGKILL)", step=3)
    args = training_args(workspace, "killed-mid", num_epochs=1)
    start = time.monotonic()
    with pytest.raises(TrainingError) as info:
        run_training(TorchrunArgs(nproc_per_node=2), args)
    assert info.value.rank == 1 and info.value.exit_code == -9
    assert "killed by signal SIGKILL" in info.value.reason and "out of memory" in info.value.reason
    assert time.monotonic() - start < 90
    assert len(read_metrics(args.ckpt_output_dir)) == 2
    assert processes_mentioning(str(Path(args.ckpt_output_dir) / "job.json")) == []


def test_one_rank_failing_mid_training_is_named_and_nothing_hangs(workspace, tmp_path, monkeypatch):
    """Rank 1 raises in its third step while rank 0 waits for it in a collective: the error
    names rank 1 and its reason, and the launcher returns instead of waiting forever."""
    inject(monkeypatch, tmp_path, "raise MemoryError('injected: out of memory in step 3')", step=3)
    args = training_args(workspace, "fail-mid", num_epochs=1)
    start = time.monotonic()
    with pytest.raises(TrainingError) as info:
        run_training(TorchrunArgs(nproc_per_node=2), args)
    assert info.value.rank == 1 and "injected: out of memory in step 3" in info.value.reason
    assert time.monotonic() - start < 90
    assert len(read_metrics(args.ckpt_output_dir)) == 2  # the steps before the failure were logged


def test_ctrl_c_stops_the_workers(workspace, tmp_path):
    args = training_args(workspace, "interrupt", num_epochs=1000)
    script = tmp_path / "run.py"
    script.write_text("import msgspec, sys\nfrom instructpack import TrainingArgs, TorchrunArgs, run_training\n"
                      f"args = msgspec.json.decode({msgspec_json(args)!r}, type=TrainingArgs)\n"
                      "run_training(TorchrunArgs(nproc_per_node=2), args)\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    seen = []
    for line in proc.stdout:  # wait until training runs
        seen.append(line)
        if "step 3/" in line:
            break
    job = str(Path(args.ckpt_output_dir) / "job.json")
    assert len(processes_mentioning(job)) >= 3  # torchrun and its two workers are found while running
    proc.send_signal(signal.SIGINT)
    try:
        rest, _ = proc.communicate(timeout=45)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("run_training did not stop within 45 s of Ctrl-C:\n" + "".join(seen[-20:]))
    assert proc.returncode != 0 and "KeyboardInterrupt" in rest
    time.sleep(1)  # the launcher has returned; give the kernel a moment to reap
    assert processes_mentioning(job) == [], "workers still running"


def processes_mentioning(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text.encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue  # gone meanwhile
    return found


def msgspec_json(args: TrainingArgs) -> str:
    import msgspec

    return msgspec.json.encode(args).decode()


def test_torchrun_command_for_each_rendezvous(tmp_path):
    job = tmp_path / "job.json"
    single = torchrun_command(TorchrunArgs(), job)
    assert single[:3] == [sys.executable, "-m", "torch.distributed.run"] and "--standalone" in single
    assert single[-3:] == ["-m", "instructpack.train.worker", str(job)]
    assert "--nproc-per-node=1" in single and "--nnodes=1" in single

    rdzv = torchrun_command(TorchrunArgs(nnodes=2, node_rank=1, nproc_per_node=8, rdzv_id=123,
                                         rdzv_endpoint="node0:29400"), job)
    assert {"--nnodes=2", "--node-rank=1", "--nproc-per-node=8", "--rdzv-backend=c10d",
            "--rdzv-endpoint=node0:29400", "--rdzv-id=123"} <= set(rdzv) and "--standalone" not in rdzv

    static = torchrun_command(TorchrunArgs(nnodes=2, master_addr="10.0.0.1", master_port=1234), job)
    assert {"--master-addr=10.0.0.1", "--master-port=1234"} <= set(static)


def test_settings_refused_before_launch(workspace, monkeypatch):
    args = training_args(workspace, "refused")
    with pytest.raises(ConfigError, match="rdzv_endpoint"):
        run_training(TorchrunArgs(nnodes=2), args)
    with pytest.raises(ConfigError, match="effective_batch_size"):
        run_training(TorchrunArgs(nproc_per_node=16), args)
    qlora = {"rank": 8, "quantize_data_type": "nf4"}  # 4-bit weights: replicated or ZeRO-2, never sharded
    with pytest.raises(ConfigError, match="distributed_backend = 'fsdp'.*'deepspeed' \\(zero_stage 2\\) or 'ddp'"):
        run_training(TorchrunArgs(), training_args(workspace, "refused", lora=qlora))
    with pytest.raises(ConfigError, match="deepspeed_options.zero_stage = 3.*ZeRO-3"):
        run_training(TorchrunArgs(), training_args(workspace, "refused", lora=qlora, distributed_backend="deepspeed",
                                                   deepspeed_options={"zero_stage": 3}))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="nproc_per_node"):
            run_training(TorchrunArgs(nproc_per_node="gpu"), args)
    with pytest.raises(MissingSinkError, match="pip install"):
        monkeypatch.setitem(sys.modules, "wandb", None)  # None: "not installed", even where it is
        run_training(TorchrunArgs(), training_args(workspace, "refused", logger_type="async,wandb"))
    with pytest.raises(TypeError, match="both"):
        run_training(training_args=args, train_args=args)
    with pytest.raises(TypeError, match="training_args"):
        run_training(TorchrunArgs())
    assert not (workspace["root"] / "refused").exists()


def test_bad_model_or_data_is_refused_before_any_worker_starts(workspace, tokenizer_dirs, tmp_path):
    """Each refusal names the path and the fix, and comes before a worker (or preprocessing
    of the data) starts: nothing is written to the output directory's log."""
    import shutil

    from instructpack import DatasetError
    from instructpack.data.shards import load_dataset

    out = "refused-early"
    with pytest.raises(ConfigError, match="does not exist.*does not download"):
        run_training(TorchrunArgs(), training_args(workspace, out, model_path=str(tmp_path / "no-such-model")))
    with pytest.raises(ConfigError, match="config.json"):  # a tokenizer directory is not a model
        run_training(TorchrunArgs(), training_args(workspace, out, model_path=str(tokenizer_dirs["chatml"])))

    plain = tmp_path / "no-template"  # the model with its chat template removed
    shutil.copytree(workspace["model"], plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no chat template; give one with chat_tmpl_path"):
        run_training(TorchrunArgs(), training_args(workspace, out, model_path=str(plain),
                                                   data_output_dir=str(tmp_path / "processed-plain")))

    # Data preprocessed with another tokenizer, given as it is (process_data=False).
    other = training_args(workspace, out, model_path=str(tokenizer_dirs["llama3"]),
                          data_output_dir=str(tmp_path / "processed-llama3"))
    from instructpack import DataProcessArgs, data_process
    made = data_process.main(DataProcessArgs(data_path=other.data_path, data_output_path=other.data_output_dir,
                                             model_path=other.model_path, max_seq_len=512), progress=False)
    assert len(load_dataset(made.output_path)) > 0
    with pytest.raises(DatasetError, match="tokenized with the tokenizer of .*llama3.*re-run preprocessing"):
        run_training(TorchrunArgs(), training_args(workspace, out, process_data=False,
                                                   data_output_dir=str(made.output_path)))
    assert not (workspace["root"] / out / "training.log").exists()


def test_command_line_train_from_a_config_file(workspace, capsys):
    from instructpack.cli import main

    out = workspace["root"] / "cli"
    config = workspace["root"] / "run.yaml"
    config.write_text(f"""
torchrun_args: {{nproc_per_node: 1}}
training_args:
  model_path: {workspace['model']}
  data_path: ""
  mock_data: true
  mock_data_len: 16
  data_output_dir: {workspace['root'] / 'mock-cli'}
  ckpt_output_dir: {out}
  max_seq_len: 16
  max_batch_len: 64
  effective_batch_size: 4
  learning_rate: 1e-3
""")
    assert main(["train", str(config)]) == 0
    assert len(read_metrics(out)) == 8 and checkpoints(out) == ["samples_32"]

    config.write_text(config.read_text().replace("learning_rate: 1e-3", "learning_rate: -1"))
    assert main(["train", str(config)]) == 2
    assert "training_args.learning_rate" in capsys.readouterr().err
