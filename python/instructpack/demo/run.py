"""`python -m instructpack.demo`: the whole path on the bundled example, on CPU.

Builds a tiny tokenizer (ChatML template) and a tiny Llama, writes generated chat data
mixed with a small fact table, then `run_training` preprocesses it and fine-tunes with
2 processes (gloo). Prints the loss curve and the checkpoint, draws the metrics plot,
and asks the checkpoint one of the facts with greedy decoding.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import time
from pathlib import Path

from .. import TorchrunArgs, TrainingArgs, run_training
from .example import (
    FACTS,
    build_tiny_model,
    build_tokenizer,
    fact_question,
    generate_conversations,
    generate_fact_conversations,
    write_jsonl,
)


def loss_summary(records: list[dict]) -> str:
    """Mean loss per epoch (single steps are noisy), first and last step, throughput."""
    epochs: dict[int, list[float]] = {}
    for r in records:
        epochs.setdefault(r["epoch"], []).append(r["loss"])
    means = "  ".join(f"epoch {e}: {sum(v) / len(v):.3f}" for e, v in epochs.items())
    tokens = sum(r["tokens"] for r in records) / sum(r["step_time_s"] for r in records)
    return (f"mean loss  {means}\nstep 1: {records[0]['loss']:.3f}, step {records[-1]['step']}: "
            f"{records[-1]['loss']:.3f}; {tokens:,.0f} tokens/s per step time")


def greedy_answer(checkpoint: Path, question: str) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=48, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m instructpack.demo")
    parser.add_argument("--output", default="demo-output", help="directory for the example and its outputs")
    parser.add_argument("--samples", type=int, default=800, help="conversations (half chat, half facts)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--nproc", type=int, default=2, help="training processes")
    ns = parser.parse_args(argv)
    root = Path(ns.output)
    start = time.perf_counter()
    import torch
    from transformers.utils import logging as hf_logging

    if not torch.cuda.is_available():  # transformers imports DeepSpeed, which warns when it must guess
        os.environ.setdefault("DS_ACCELERATOR", "cpu")

    hf_logging.disable_progress_bar()  # no per-file load/save bars in the demo's output

    tokenizer = build_tokenizer(root / "tokenizer", template="chatml", vocab_size=2000)
    model = build_tiny_model(root / "tiny-llama", tokenizer, hidden_size=128, layers=2)
    chat = generate_conversations(ns.samples // 2, seed=0, max_turns=2, median_words=25)
    facts = generate_fact_conversations(ns.samples - ns.samples // 2, seed=1)
    data = write_jsonl(root / "chat.jsonl", itertools.chain.from_iterable(zip(chat, facts)))
    print(f"example: {ns.samples} conversations in {data}; a tiny Llama in {model}", flush=True)

    args = TrainingArgs(model_path=str(model), data_path=str(data), data_output_dir=str(root / "data"),
                        ckpt_output_dir=str(root / "checkpoints"), max_seq_len=2048, max_batch_len=4096,
                        effective_batch_size=16, num_epochs=ns.epochs, learning_rate=3e-3, warmup_steps=10,
                        checkpoint_at_epoch=False, gradient_checkpointing=False, data_process_num_cpu_procs=2)
    # The demo trains from the start each time: a run in a directory that holds a full-state
    # checkpoint would resume from it (here: find the training finished).
    shutil.rmtree(args.ckpt_output_dir, ignore_errors=True)
    run_training(TorchrunArgs(nproc_per_node=ns.nproc), args)

    from ..train.checkpoints.schedule import HF_FORMAT
    from ..train.metrics import read_metrics
    from ..train.plot import plot_metrics

    out = Path(args.ckpt_output_dir)
    print("\n" + loss_summary(read_metrics(out)))
    checkpoint = max((out / HF_FORMAT).iterdir(), key=lambda p: p.stat().st_mtime)
    print(f"checkpoint: {checkpoint}")
    try:
        print(f"metrics plot: {plot_metrics(out)}")
    except ImportError as e:  # matplotlib is optional
        print(f"no metrics plot: {e}")
    city = sorted(FACTS)[0]
    question = fact_question(city)
    print(f"\nuser: {question}\nassistant (greedy, from the checkpoint): {greedy_answer(checkpoint, question)}\n"
          f"expected: {FACTS[city]}")
    print(f"demo took {time.perf_counter() - start:.0f} s")
