"""InstructLab's module name for the training entry point: code that imports
`instructlab.training.main_ds.run_training` imports `instructpack.main_ds.run_training`.
The launcher itself is launch/run.py; nothing here imports torch."""

from .launch import run_training

__all__ = ["run_training"]
