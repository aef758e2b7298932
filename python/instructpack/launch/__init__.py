"""What runs in the user's process: `run_training` checks the configuration, the model and
the data, prepares the dataset, then starts torchrun and supervises the workers until they
end, and reports how. It never imports torch (tests/launch/test_no_torch.py proves it): the
caller's process stays light, holds no GPU, and forks nothing torch has started.

What it shares with the workers it shares through files (train/job.py) and through the
torch-free modules both sides read: the configuration, the dataset manifest and planner
checks (data/), and the identity of full-state checkpoints (train/checkpoints/identity.py).

- run.py: `run_training`, top to bottom.
- checks.py: the checks before any work (settings, model directory, metrics sinks).
- model_dir.py: what a model directory must hold to be loaded as configured.
- dataset.py: the dataset the workers read (preprocessed now, given, or mock data).
- torchrun.py: the torchrun command, its environment, its output and stop signals.
- diagnosis.py: which rank failed first, and why.
"""

from .run import run_training

__all__ = ["run_training"]
