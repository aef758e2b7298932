"""instructpack: fast, exact instruction tuning for Hugging Face causal LMs.

The public API follows the InstructLab Training library, so code written for it runs with
only the import line changed. Importing this package does not import torch.
"""

from . import data_process
from .config import (
    ConfigError,
    DataProcessArgs,
    DeepSpeedOptions,
    DistributedBackend,
    FSDPOptions,
    LoraOptions,
    QuantizeDataType,
    RunConfig,
    ShardingStrategies,
    TorchrunArgs,
    TrainingArgs,
    load_config,
)
from .data.shards import DatasetError, TokenDataset, load_dataset
from .train.launch import TrainingError, TrainingStopped, run_training

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DataProcessArgs",
    "DatasetError",
    "DeepSpeedOptions",
    "DistributedBackend",
    "FSDPOptions",
    "LoraOptions",
    "QuantizeDataType",
    "RunConfig",
    "ShardingStrategies",
    "TokenDataset",
    "TorchrunArgs",
    "TrainingArgs",
    "TrainingError",
    "TrainingStopped",
    "data_process",
    "load_config",
    "load_dataset",
    "run_training",
]
