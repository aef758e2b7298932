"""The README's example of a job on two machines sharing storage, on one machine: two
launchers (node_rank 0 and 1, one process each) started together with the same settings,
the same ckpt_output_dir and the same data_output_dir. Both preprocess into that directory
at the same time: one writes, the other waits and reuses it; node 1 waits for node 0 to
own ckpt_output_dir; they train as one job of 2 processes."""

from __future__ import annotations

import socket
import subprocess
import sys

import msgspec
import pytest

from instructpack import TrainingArgs, load_dataset
from instructpack.demo.example import build_tiny_model, generate_fact_conversations, write_jsonl
from instructpack.train.metrics import read_metrics

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_sharing_storage_preprocess_once_and_train_as_one_job(tmp_path, tokenizer_dirs):
    model = build_tiny_model(tmp_path / "model", tokenizer_dirs["chatml"])
    data = write_jsonl(tmp_path / "facts.jsonl", generate_fact_conversations(32, seed=0))
    args = TrainingArgs(model_path=str(model), data_path=str(data), ckpt_output_dir=str(tmp_path / "shared/ckpt"),
                        data_output_dir=str(tmp_path / "shared/data"), max_seq_len=512, max_batch_len=1024,
                        effective_batch_size=8, learning_rate=5e-3, num_epochs=1, distributed_backend="ddp",
                        gradient_checkpointing=False, data_process_num_cpu_procs=1)
    port = _free_port()
    script = ("import sys, msgspec\n"
              "from instructpack import TorchrunArgs, TrainingArgs, run_training\n"
              "args = msgspec.json.decode(sys.argv[2], type=TrainingArgs)\n"
              f"run_training(TorchrunArgs(nnodes=2, node_rank=int(sys.argv[1]), nproc_per_node=1, rdzv_id='job-1',"
              f" rdzv_endpoint='127.0.0.1:{port}'), args)\n")
    encoded = msgspec.json.encode(args).decode()
    nodes = [subprocess.Popen([sys.executable, "-c", script, str(rank), encoded], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n\n".join(o[-3000:] for o in outputs)

    said = sorted(next(line.split()[0] for line in o.splitlines() if line.startswith(("wrote", "reused")))
                  for o in outputs)
    assert said == ["reused", "wrote"]  # one preprocessing; the other waited and reused it
    dataset = load_dataset(tmp_path / "shared/data", verify=True)
    assert len(dataset) == 32
    ckpt = tmp_path / "shared/ckpt"
    records = read_metrics(ckpt)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["samples"] == 8 for r in records)  # 8 samples per step over the two processes
    assert "2 processes (DDP)" in (ckpt / "training.log").read_text()
    assert (ckpt / "job.json").is_file() and (ckpt / "job-node1.json").is_file()
    assert (ckpt / "training-node1.log").is_file()
