"""Every name user code imports from instructlab.training 0.16.2 exists in instructpack under
the same name, with the same fields, members and signatures (written down here from the
reference; the side-by-side test compares the objects themselves when it can install it)."""

from __future__ import annotations

import importlib
import inspect

import pytest

import instructpack

# instructlab.training.__all__ (0.16.2)
PUBLIC = ["DataProcessArgs", "DeepSpeedOffloadStrategy", "DeepSpeedOptions", "LoraOptions", "QuantizeDataType",
          "TorchrunArgs", "TrainerCallback", "TrainingArgs", "TrainingContext", "run_training", "FSDPOptions",
          "ShardingStrategies", "DistributedBackend", "PretrainingConfig"]
FIELDS = {
    "TrainingArgs": [
        "model_path", "chat_tmpl_path", "use_legacy_tmpl", "data_path", "ckpt_output_dir", "data_output_dir",
        "max_seq_len", "max_batch_len", "num_epochs", "effective_batch_size", "save_samples", "learning_rate",
        "adamw_weight_decay", "adamw_betas", "adamw_eps", "warmup_steps", "random_seed", "use_dolomite",
        "is_padding_free", "checkpoint_at_epoch", "accelerate_full_state_at_epoch", "mock_data", "mock_data_len",
        "deepspeed_options", "fsdp_options", "distributed_backend", "disable_flash_attn", "lora", "process_data",
        "keep_last_checkpoint_only", "pretraining_config", "data_process_num_cpu_procs", "use_liger",
        "trust_remote_code", "log_level", "mlflow_tracking_uri", "mlflow_experiment_name", "mlflow_run_name",
        "wandb_project", "wandb_entity", "wandb_run_name", "tensorboard_log_dir", "validation_split",
        "validation_frequency", "on_demand_checkpointing", "callbacks"],
    "TorchrunArgs": ["nproc_per_node", "nnodes", "node_rank", "rdzv_id", "rdzv_endpoint", "master_addr",
                     "master_port"],
    "DataProcessArgs": ["data_path", "data_output_path", "max_seq_len", "model_path", "chat_tmpl_path",
                        "num_cpu_procs"],
    "LoraOptions": ["rank", "alpha", "dropout", "target_modules", "quantize_data_type"],
    "DeepSpeedOptions": ["cpu_offload_optimizer", "cpu_offload_optimizer_ratio", "cpu_offload_optimizer_pin_memory",
                         "save_samples"],
    "FSDPOptions": ["cpu_offload_params", "sharding_strategy"],
    "PretrainingConfig": ["block_size", "document_column_name"],
}
MEMBERS = {
    "QuantizeDataType": [("NF4", "nf4"), ("NONE", None)],
    "DeepSpeedOffloadStrategy": [("CPU", "cpu"), ("NONE", None)],
    "ShardingStrategies": [(s, s) for s in ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD")],
}


def test_every_public_name_is_there():
    assert set(PUBLIC) <= set(instructpack.__all__)
    for name in PUBLIC:
        assert getattr(instructpack, name) is not None


@pytest.mark.parametrize("name", list(FIELDS))
def test_config_classes_have_instructlabs_fields(name):
    # All of them (instructpack groups its fields by topic: the order of keys differs).
    assert set(FIELDS[name]) <= set(getattr(instructpack, name).model_fields)


def test_enums_have_instructlabs_members():
    for name, members in MEMBERS.items():
        assert [(m.name, m.value) for m in getattr(instructpack, name)] == members
    # InstructLab's two backends, and instructpack's plain DDP beside them.
    backends = {(m.name, m.value) for m in instructpack.DistributedBackend}
    assert {("FSDP", "fsdp"), ("DEEPSPEED", "deepspeed")} <= backends


def test_modules_user_code_imports():
    from instructpack import data_process, main_ds

    assert main_ds.run_training is instructpack.run_training
    assert list(inspect.signature(data_process.process_data).parameters) == [
        "data_path", "data_output_path", "max_seq_len", "model_path", "num_cpu_procs", "chat_tmpl_path"]
    assert list(inspect.signature(instructpack.run_training).parameters)[:2] == ["torchrun_args", "training_args"]
    for module in ("ibm_generic_tmpl", "ibm_legacy_tmpl", "mistral_tmpl"):
        template = importlib.import_module(f"instructpack.chat_templates.{module}")
        assert isinstance(template.CHAT_TEMPLATE, str) and template.SPECIAL_TOKENS.eos.token


def test_callbacks_are_subclassable_as_in_instructlab():
    class Stop(instructpack.TrainerCallback):
        def on_step_end(self, context):
            return None

    assert isinstance(Stop(), instructpack.TrainerCallback)
