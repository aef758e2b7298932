"""InstructLab's CLI (`ilab model train`, instructlab/instructlab) drives the library with
its own code: `map_train_to_library` builds both objects from the command's whole option
dict, sets the nested options afterwards, and its phased training passes
`train_args.model_copy(deep=True)`, mutated, to `run_training(train_args=, torch_args=)`.
That sequence runs here, for five of its configurations, with only the import changed; the
torchrun stand-in records what the workers would have been given."""

from __future__ import annotations

import pprint
import warnings
from pathlib import Path

import pytest

from instructpack import (
    DeepSpeedOptions,
    DistributedBackend,
    FSDPOptions,
    LoraOptions,
    QuantizeDataType,
    TorchrunArgs,
    TrainingArgs,
    run_training,
)
from instructpack.data.manifest import read_manifest
from instructpack.demo.example import generate_fact_conversations, write_jsonl

# The 59 parameters of `ilab model train` (click's ctx.params), with the values its default
# configuration gives them (configuration.py _train, defaults.py ADDITIONAL_ARGS_DEFAULTS).
# Paths are set per test. Of these keys, 15 are TrainingArgs fields and 5 TorchrunArgs fields.
CLI_DEFAULTS = {
    "data_path": None, "ckpt_output_dir": None, "data_output_dir": None, "input_dir": None,
    "gguf_model_path": None, "skip_preprocessing": False, "tokenizer_dir": None, "model_path": None,
    "model_id": None, "iters": 100, "local": False, "skip_quantize": False, "num_epochs": 10, "device": "cuda",
    "four_bit_quant": False, "max_seq_len": 4096, "max_batch_len": 5000, "effective_batch_size": 64,
    "save_samples": 250000, "learning_rate": 2e-5, "warmup_steps": 25, "deepspeed_cpu_offload_optimizer": False,
    "deepspeed_cpu_offload_optimizer_ratio": 1, "deepspeed_cpu_offload_optimizer_pin_memory": False,
    "fsdp_cpu_offload_optimizer": False, "distributed_backend": "fsdp", "lora_rank": 0, "lora_alpha": 32,
    "lora_dropout": 0.1, "lora_target_modules": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "lora_quantize_dtype": "nf4", "is_padding_free": False, "nproc_per_node": 1, "nnodes": 1, "node_rank": 0,
    "rdzv_id": 123, "rdzv_endpoint": "127.0.0.1:12222", "disable_flash_attn": False, "strategy": None,
    "phased_base_dir": None, "phased_phase1_data": None, "phased_phase1_num_epochs": 7,
    "phased_phase1_samples_per_save": 0, "phased_phase1_learning_rate": 2e-5,
    "phased_phase1_effective_batch_size": 128, "phased_phase2_data": None, "phased_phase2_num_epochs": 10,
    "phased_phase2_samples_per_save": 0, "phased_phase2_learning_rate": 6e-6,
    "phased_phase2_effective_batch_size": 3840, "phased_mt_bench_judge": None, "skip_user_confirm": False,
    "enable_serving_output": False, "checkpoint_at_epoch": True, "pipeline": "accelerated",
    "training_journal": None, "force_clear_phased_cache": False, "optimize_memory": False,
    "disable_accelerate_full_state_at_epoch": False,
}
TRAINING_ARGS_KEYS = {"data_path", "ckpt_output_dir", "data_output_dir", "model_path", "num_epochs", "max_seq_len",
                      "max_batch_len", "effective_batch_size", "save_samples", "learning_rate", "warmup_steps",
                      "is_padding_free", "disable_flash_attn", "checkpoint_at_epoch", "distributed_backend"}
TORCHRUN_KEYS = {"nproc_per_node", "nnodes", "node_rank", "rdzv_id", "rdzv_endpoint"}

CONFIGS = {
    "default": {},  # LoRA rank 0 with quantize "nf4", FSDP: a full fine-tune
    # profiles/nvidia/l40s/l40s_x8.yaml, with --distributed-backend deepspeed
    "8-gpu-deepspeed-offload": {"nproc_per_node": 8, "deepspeed_cpu_offload_optimizer": True,
                                "deepspeed_cpu_offload_optimizer_pin_memory": True, "effective_batch_size": 128,
                                "is_padding_free": True, "lora_quantize_dtype": None, "max_batch_len": 30000,
                                "num_epochs": 8, "save_samples": 1000, "distributed_backend": "deepspeed"},
    "deepspeed-full": {"distributed_backend": "deepspeed", "nproc_per_node": 2},
    "qlora-deepspeed": {"distributed_backend": "deepspeed", "lora_rank": 2, "lora_quantize_dtype": "nf4"},
    "lora-fsdp": {"distributed_backend": "fsdp", "lora_rank": 4, "lora_quantize_dtype": None, "nproc_per_node": 2},
}


def map_train_to_library(params: dict, use_legacy_tmpl: bool = False) -> tuple[TrainingArgs, TorchrunArgs]:
    """instructlab/instructlab configuration.py `map_train_to_library`, statement for
    statement (the click context and --model-id lookup left out)."""
    train_args = TrainingArgs(**params)
    torch_args = TorchrunArgs(**params)
    ds_args = DeepSpeedOptions(
        cpu_offload_optimizer=params["deepspeed_cpu_offload_optimizer"],
        cpu_offload_optimizer_ratio=params["deepspeed_cpu_offload_optimizer_ratio"],
        cpu_offload_optimizer_pin_memory=params["deepspeed_cpu_offload_optimizer_pin_memory"],
    )
    fsdp_args = FSDPOptions(cpu_offload_params=params["fsdp_cpu_offload_optimizer"])
    lora_args = LoraOptions(rank=0)
    if params["lora_rank"]:
        lora_args.rank = params["lora_rank"]
    if params["lora_alpha"] is not None:
        lora_args.alpha = params["lora_alpha"]
    if params["lora_dropout"] is not None:
        lora_args.dropout = params["lora_dropout"]
    if params["lora_target_modules"] is not None:
        lora_args.target_modules = params["lora_target_modules"]
    if params["lora_quantize_dtype"] is not None:
        lora_args.quantize_data_type = params["lora_quantize_dtype"]
    train_args.deepspeed_options = ds_args
    train_args.fsdp_options = fsdp_args
    train_args.distributed_backend = DistributedBackend(params["distributed_backend"])
    train_args.lora = lora_args
    if params["pipeline"] == "full":
        train_args.disable_flash_attn = True
    if use_legacy_tmpl:
        train_args.use_legacy_tmpl = True
    return train_args, torch_args


@pytest.fixture
def cli_home(tmp_path, valid_model):
    """The CLI's directories: datasets/, checkpoints/, and internal/ (data_output_dir), which
    holds the CLI's own files."""
    home = tmp_path / "instructlab"
    (home / "internal").mkdir(parents=True)
    (home / "internal" / "train_messages.jsonl").write_text("the CLI's own file\n")
    data = write_jsonl(home / "datasets" / "knowledge_train_msgs.jsonl", generate_fact_conversations(16, seed=0))
    return {"data_path": str(data), "ckpt_output_dir": str(home / "checkpoints"),
            "data_output_dir": str(home / "internal"), "model_path": str(valid_model)}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_cli_training_code_runs_unchanged(name, cli_home, recorded_launch):
    params = {**CLI_DEFAULTS, **cli_home, **CONFIGS[name]}
    assert len(params) == 59
    assert TRAINING_ARGS_KEYS == set(params) & set(TrainingArgs.model_fields)
    assert TORCHRUN_KEYS == set(params) & set(TorchrunArgs.model_fields)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_args, torch_args = map_train_to_library(params)
    ignored = [str(w.message) for w in caught if "unknown field" in str(w.message)]
    assert len(ignored) == 2  # one warning per object, each naming what it ignored
    assert ignored[0].startswith(f"TrainingArgs: ignoring {59 - 15} unknown field(s)") and "'lora_rank'" in ignored[0]
    assert ignored[1].startswith(f"TorchrunArgs: ignoring {59 - 5} unknown field(s)")
    train_args.accelerate_full_state_at_epoch = not params["disable_accelerate_full_state_at_epoch"]

    # accelerated_train._run_phase / _training_phase
    phase_args = train_args.model_copy(deep=True)
    assert phase_args == train_args and phase_args.lora is not train_args.lora
    phase_args.data_path = str(params["data_path"])
    phase_args.num_epochs = 2
    phase_args.effective_batch_size = max(8, torch_args.nproc_per_node)
    pprint.pformat(phase_args)
    before = (train_args.model_dump(), phase_args.model_dump(), torch_args.model_dump())

    run_training(train_args=phase_args, torch_args=torch_args)

    assert (train_args.model_dump(), phase_args.model_dump(), torch_args.model_dump()) == before  # left as given
    (launched_torchrun, job), = recorded_launch
    assert launched_torchrun.nproc_per_node == params["nproc_per_node"]
    assert launched_torchrun.rdzv_endpoint == "127.0.0.1:12222"
    given = job.training_args
    lora_rank = params["lora_rank"]
    assert (given.lora.rank if given.lora else 0) == lora_rank  # rank 0: no LoRA, whatever else it says
    if lora_rank:
        assert QuantizeDataType(given.lora.quantize_data_type) == QuantizeDataType(params["lora_quantize_dtype"])
        assert given.lora.target_modules == list(params["lora_target_modules"])
    assert given.distributed_backend == DistributedBackend(params["distributed_backend"])
    assert given.deepspeed_options.cpu_offload_optimizer is params["deepspeed_cpu_offload_optimizer"]
    # Preprocessed beside the CLI's own file, which is untouched.
    internal = Path(params["data_output_dir"])
    assert (internal / "train_messages.jsonl").read_text() == "the CLI's own file\n"
    manifest = read_manifest(job.dataset_path)
    assert Path(job.dataset_path) == internal and manifest.counts.samples == 16
    assert manifest.settings.min_seq_len is None  # InstructLab's length rule
