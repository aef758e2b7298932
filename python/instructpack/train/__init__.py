"""What runs under torchrun, in each training process (`python -m instructpack.train.worker`).

- worker.py: one process from start to end; job.py: what it gets from the launcher and
  tells it back (the only files the two sides exchange).
- loop.py: the training loop; step.py: one optimizer step, the training math.
- precision.py: the dtypes of the run, decided once; optim.py: AdamW, clipping, schedule.
- model/: loading the model and tokenizer, packed-row attention, LoRA and QLoRA setup.
- backends/: how the model is spread over processes (DDP, FSDP2, DeepSpeed ZeRO).
- checkpoints/: Hugging Face exports, full training states, when each is due.
- distributed.py: the process group; preemption.py: stopping on request.
- metrics.py, plot.py: the per-step metrics file and sinks, and its plot (torch-free).
"""
