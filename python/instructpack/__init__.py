"""instructpack: fast, exact instruction tuning for Hugging Face causal LMs.

The public API follows the InstructLab Training library, so code written for it runs with
only the import line changed. Importing this package does not import torch.
"""

__version__ = "0.1.0"

from . import data_process
from .callbacks import TrainerCallback, TrainingContext
from .config import (
    DataProcessArgs,
    DeepSpeedOffloadStrategy,
    DeepSpeedOptions,
    DistributedBackend,
    FSDPOptions,
    LoraOptions,
    PretrainingConfig,
    QuantizeDataType,
    RunConfig,
    ShardingStrategies,
    TorchrunArgs,
    TrainingArgs,
)
from .config_files import load_config
from .data.shards import TokenDataset, load_dataset
from .errors import (
    ChatTemplateError,
    CheckpointError,
    ConfigError,
    DatasetError,
    DirectoryInUseError,
    InputError,
    InstructPackError,
    MetricsFileError,
    MissingPackageError,
    MissingSinkError,
    PathExistsError,
    PathNotFoundError,
    PlanError,
    ResumeError,
    SampleError,
    TemplateError,
    TrainingError,
    TrainingStopped,
    UnsafeTemplateError,
    WriteError,
)
from .launch import run_training

__all__ = [
    "ChatTemplateError",
    "CheckpointError",
    "ConfigError",
    "DataProcessArgs",
    "DatasetError",
    "DeepSpeedOffloadStrategy",
    "DeepSpeedOptions",
    "DirectoryInUseError",
    "DistributedBackend",
    "FSDPOptions",
    "InputError",
    "InstructPackError",
    "LoraOptions",
    "MetricsFileError",
    "MissingPackageError",
    "MissingSinkError",
    "PathExistsError",
    "PathNotFoundError",
    "PlanError",
    "PretrainingConfig",
    "QuantizeDataType",
    "ResumeError",
    "RunConfig",
    "SampleError",
    "ShardingStrategies",
    "TemplateError",
    "TokenDataset",
    "TorchrunArgs",
    "TrainerCallback",
    "TrainingArgs",
    "TrainingContext",
    "TrainingError",
    "TrainingStopped",
    "UnsafeTemplateError",
    "WriteError",
    "__version__",
    "data_process",
    "load_config",
    "load_dataset",
    "run_training",
]
