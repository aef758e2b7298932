"""The launcher runs in the user's process and never imports torch: the whole of
`run_training` up to and around torchrun (the checks, preprocessing or mock data, the resume
check, the job file, supervising the command and reading how it ended), in a fresh
interpreter where torchrun is replaced by a command that does nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from instructpack.demo.example import generate_fact_conversations, write_jsonl

LAUNCH = textwrap.dedent("""
    import json, sys
    import instructpack.launch.run as launcher
    from instructpack import TorchrunArgs, TrainingArgs, run_training

    # The workers' stand-in: a command that does nothing and succeeds.
    launcher.torchrun_command = lambda torchrun_args, job, status: [sys.executable, "-c", "pass"]
    run_training(TorchrunArgs(nproc_per_node=2), TrainingArgs(**json.loads(sys.argv[1])))
    # transformers itself is allowed: preprocessing renders through its light chat-template module.
    print(json.dumps(sorted(m for m in ("torch", "peft", "deepspeed", "bitsandbytes") if m in sys.modules)))
""")


@pytest.mark.parametrize("data", ["preprocessed", "mock"])
def test_run_training_in_the_users_process_imports_no_torch(valid_model, tmp_path, data):
    samples = write_jsonl(tmp_path / "chat.jsonl", generate_fact_conversations(40, seed=0))
    args = dict(model_path=str(valid_model), data_path=str(samples), ckpt_output_dir=str(tmp_path / "out"),
                data_output_dir=str(tmp_path / "data"), max_seq_len=512, max_batch_len=1024,
                effective_batch_size=8, learning_rate=1e-3, data_process_num_cpu_procs=1,
                mock_data=data == "mock")
    done = subprocess.run([sys.executable, "-c", LAUNCH, json.dumps(args)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
    assert (tmp_path / "out" / "job.json").is_file()  # it got as far as launching
    dataset = tmp_path / "data" if data == "preprocessed" else next((tmp_path / "data").glob("mock-*"))
    assert (dataset / "manifest.json").is_file()
