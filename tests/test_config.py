"""Tests of instructpack.config: InstructLab-compatible defaults, building as pydantic does
(lax input, unknown fields ignored with a warning, the checks InstructLab makes at
construction), one test per validation rule at validate() (each checks that the message
names the field and the bad value), nested mappings, and strict YAML/JSON/TOML loading."""

import json
import math
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import yaml

from instructpack.config import (
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
)
from instructpack.config_files import config_from_dict, load_config

REQUIRED = dict(model_path="m", data_path="d.jsonl", ckpt_output_dir="ckpt",
                data_output_dir="out", max_seq_len=4096, max_batch_len=60000,
                effective_batch_size=128, learning_rate=2e-5)
DATA = dict(data_path="d.jsonl", data_output_path="out", model_path="m", max_seq_len=512)


def training(**kw):
    return TrainingArgs(**{**REQUIRED, **kw})


def checked(obj):
    """The object checked as run_training checks it (ranges are not checked at construction,
    as InstructLab's models do not check them either)."""
    obj.validate()
    return obj


def raises(fn, field, value):
    """Call fn, expect ConfigError whose message names the field and the bad value."""
    with pytest.raises(ConfigError) as info:
        fn()
    msg = str(info.value)
    assert field in msg, msg
    assert repr(value) in msg, msg
    assert info.value.field.endswith(field)
    return msg


# ---------------------------------------------------------------- InstructLab compatibility


def test_readme_example_constructs():
    # The InstructLab README example with only the import changed.
    training_args = TrainingArgs(
        model_path="ibm-granite/granite-7b-base",
        data_path="path/to/dataset.jsonl",
        ckpt_output_dir="data/saved_checkpoints",
        data_output_dir="data/outputs",
        max_seq_len=4096,
        max_batch_len=60000,
        num_epochs=10,
        effective_batch_size=3840,
        save_samples=250000,
        learning_rate=2e-6,
        warmup_steps=800,
        is_padding_free=True,
        random_seed=42,
        process_data=True,
        deepspeed_options=DeepSpeedOptions(cpu_offload_optimizer=True,
                                           cpu_offload_optimizer_ratio=1,
                                           cpu_offload_optimizer_pin_memory=False),
        lora=LoraOptions(rank=4, alpha=32, dropout=0.1),
    )
    torchrun_args = TorchrunArgs(nnodes=1, nproc_per_node=8, node_rank=0, rdzv_id=123,
                                 rdzv_endpoint="127.0.0.1:12345")
    data_process_args = DataProcessArgs(
        data_output_path=training_args.data_output_dir,
        model_path=training_args.model_path,
        data_path=training_args.data_path,
        max_seq_len=training_args.max_seq_len,
        chat_tmpl_path=training_args.chat_tmpl_path,
    )
    assert training_args.lora.rank == 4 and training_args.num_epochs == 10
    assert training_args.deepspeed_options.cpu_offload_optimizer_ratio == 1.0
    assert torchrun_args.nproc_per_node == 8 and torchrun_args.rdzv_id == 123
    assert data_process_args.num_cpu_procs == 16
    assert TorchrunArgs() == TorchrunArgs(nproc_per_node=1, nnodes=1, node_rank=0)


def test_training_defaults_match_instructlab():
    t = training()
    expected = dict(
        chat_tmpl_path=None, use_legacy_tmpl=False, num_epochs=1, save_samples=0,
        adamw_weight_decay=0.0, adamw_betas=(0.9, 0.95), adamw_eps=1e-8, warmup_steps=0,
        random_seed=42, use_dolomite=False, is_padding_free=False, checkpoint_at_epoch=True,
        accelerate_full_state_at_epoch=True, mock_data=False, mock_data_len=0,
        distributed_backend="fsdp", disable_flash_attn=False, lora=None, process_data=True,
        keep_last_checkpoint_only=False, data_process_num_cpu_procs=16, use_liger=False,
        log_level="INFO", logger_type="async", wandb_run_name=None, mlflow_run_name=None,
        mlflow_tracking_uri=None, mlflow_experiment_name=None, wandb_project=None,
        wandb_entity=None, tensorboard_log_dir=None,
        # our extras
        lr_scheduler="cosine", gradient_checkpointing=True,
    )
    for name, value in expected.items():
        assert getattr(t, name) == value, name
    assert t.distributed_backend is DistributedBackend.FSDP
    assert t.deepspeed_options == DeepSpeedOptions(
        cpu_offload_optimizer=False, cpu_offload_optimizer_ratio=1.0,
        cpu_offload_optimizer_pin_memory=False, save_samples=None)
    assert t.fsdp_options == FSDPOptions(cpu_offload_params=False,
                                         sharding_strategy="HYBRID_SHARD")
    # each default nested object is its own (mutable) instance
    assert t.fsdp_options is not training().fsdp_options


def test_option_defaults_match_instructlab():
    lora = LoraOptions()
    assert (lora.rank, lora.alpha, lora.dropout) == (4, 32, 0.1)
    assert lora.target_modules is None and lora.quantize_data_type is QuantizeDataType.NONE
    d = DataProcessArgs(**DATA)
    assert (d.chat_tmpl_path, d.num_cpu_procs) == (None, 16)
    assert (d.min_seq_len, d.skip_invalid_lines, d.overwrite) == (None, False, False)
    assert FSDPOptions().sharding_strategy is ShardingStrategies.HYBRID_SHARD
    t = TorchrunArgs()
    assert (t.rdzv_endpoint, t.master_addr, t.master_port) == (None, None, None)


def test_enums_accept_strings_and_members():
    for s in ("FULL_SHARD", "HYBRID_SHARD", "SHARD_GRAD_OP", "NO_SHARD"):
        assert FSDPOptions(sharding_strategy=s).sharding_strategy == s
        assert FSDPOptions(sharding_strategy=ShardingStrategies(s)).sharding_strategy is \
            ShardingStrategies(s)
    assert training(distributed_backend="deepspeed").distributed_backend is \
        DistributedBackend.DEEPSPEED
    assert training(distributed_backend=DistributedBackend.FSDP).distributed_backend == "fsdp"
    # InstructLab's LoraOptions keeps the value given (use_enum_values), the member by default.
    assert LoraOptions(quantize_data_type="nf4").quantize_data_type == "nf4"
    assert LoraOptions(quantize_data_type=QuantizeDataType.NF4).quantize_data_type == "nf4"
    assert LoraOptions(quantize_data_type=None).quantize_data_type is None
    assert LoraOptions(quantize_data_type="nf4").quantization is QuantizeDataType.NF4
    assert LoraOptions().quantization is None and LoraOptions(quantize_data_type=None).quantization is None
    assert TorchrunArgs(nproc_per_node="gpu").nproc_per_node == "gpu"


def test_conversions_keep_plain_types():
    t = training(learning_rate=1, adamw_betas=[0.8, 0.9], lora={"target_modules": ["q_proj"]})
    assert type(t.learning_rate) is float and t.adamw_betas == (0.8, 0.9)
    assert t.lora == LoraOptions(target_modules=["q_proj"])


def test_lora_rank_zero_means_no_lora():
    # InstructLab's CLI passes LoraOptions(rank=0) for a full fine-tune: it stays an object.
    assert training(lora=LoraOptions(rank=0)).lora == LoraOptions(rank=0)
    assert not checked(training(lora={"rank": 0})).lora.enabled and LoraOptions().enabled


# ---------------------------------------------------------------- TrainingArgs rules


@pytest.mark.parametrize("name,bad", [
    ("max_seq_len", 0), ("num_epochs", 0), ("effective_batch_size", 0),
    ("effective_batch_size", -8), ("warmup_steps", -1), ("random_seed", -1),
    ("mock_data_len", -1), ("data_process_num_cpu_procs", 0),
])
def test_training_integer_ranges(name, bad):
    kw = {name: bad}
    if name == "max_seq_len":
        kw["max_batch_len"] = 100
    training(**kw)  # built as given; refused when checked (run_training checks)
    raises(lambda: checked(training(**kw)), f"training_args.{name}", bad)


def test_max_batch_len_below_max_seq_len():
    msg = raises(lambda: checked(training(max_seq_len=4096, max_batch_len=4095)),
                 "training_args.max_batch_len", 4095)
    assert "max_seq_len" in msg and "4096" in msg


@pytest.mark.parametrize("bad", [0.0, -1e-5, math.inf])
def test_learning_rate_must_be_positive(bad):
    raises(lambda: checked(training(learning_rate=bad)), "training_args.learning_rate", bad)


def test_learning_rate_nan():
    with pytest.raises(ConfigError, match="learning_rate = nan"):
        checked(training(learning_rate=math.nan))


def test_adamw_rules():
    raises(lambda: checked(training(adamw_eps=0.0)), "training_args.adamw_eps", 0.0)
    raises(lambda: checked(training(adamw_weight_decay=-0.1)), "training_args.adamw_weight_decay", -0.1)
    raises(lambda: checked(training(adamw_betas=(0.9, 1.0))), "training_args.adamw_betas", (0.9, 1.0))
    raises(lambda: training(adamw_betas=(0.9,)), "training_args.adamw_betas", (0.9,))  # not a pair: its type


@pytest.mark.parametrize("name", ["model_path", "data_path", "ckpt_output_dir",
                                  "data_output_dir"])
def test_training_paths_non_empty(name):
    raises(lambda: checked(training(**{name: ""})), f"training_args.{name}", "")


def test_mock_data_needs_no_data_path():
    assert checked(training(mock_data=True, data_path="")).mock_data


@pytest.mark.parametrize("name,bad,allowed", [
    ("distributed_backend", "megatron", "'fsdp', 'deepspeed', 'ddp'"),
    ("lr_scheduler", "step", "'cosine', 'linear', 'constant'"),
    ("log_level", "VERBOSE", "'DEBUG'"),
    ("logger_type", "async,csv", "tensorboard"),
])
def test_training_choices(name, bad, allowed):
    msg = raises(lambda: checked(training(**{name: bad})), f"training_args.{name}", bad)
    assert allowed in msg


@pytest.mark.parametrize("name,given,read", [  # what pydantic's lax mode reads, read the same
    ("max_seq_len", "4096", 4096), ("max_seq_len", 4096.0, 4096), ("learning_rate", "2e-5", 2e-5),
    ("checkpoint_at_epoch", 1, True), ("checkpoint_at_epoch", "true", True), ("checkpoint_at_epoch", "no", False),
    ("num_epochs", True, 1), ("adamw_betas", [0.8, 0.9], (0.8, 0.9)), ("mock_data", None, None),
    ("process_data", None, None), ("disable_flash_attn", None, None), ("keep_last_checkpoint_only", None, None),
])
def test_lax_input_as_pydantic_reads_it(name, given, read):
    value = getattr(checked(training(**{name: given})), name)
    assert value == read and type(value) is type(read)


@pytest.mark.parametrize("name,bad,expected", [
    ("max_seq_len", "long", "integer"), ("max_seq_len", 4096.5, "integer"),
    ("checkpoint_at_epoch", 2, "true or false"), ("model_path", None, "string"),
    ("adamw_betas", "0.9", "list of 2"), ("deepspeed_options", 5, "DeepSpeedOptions"),
    ("lora", "yes", "LoraOptions"),
])
def test_wrong_types(name, bad, expected):
    msg = raises(lambda: training(**{name: bad}), f"training_args.{name}", bad)
    assert expected in msg


def test_unknown_field_is_ignored_with_a_warning_that_suggests_a_close_name():
    with pytest.warns(UserWarning, match="TrainingArgs: ignoring 1 unknown field.*'max_seq_length' "
                                         r"\(did you mean 'max_seq_len'\?\)"):
        t = training(max_seq_length=1024)
    assert t == training() and not hasattr(t, "max_seq_length")


def test_unknown_fields_without_close_names_list_what_is_allowed_in_one_warning():
    with pytest.warns(UserWarning) as seen:
        training(zzz=1, input_dir=None, iters=100)
    assert len(seen) == 1 and "ignoring 3 unknown field(s)" in str(seen[0].message)
    assert "allowed:" in str(seen[0].message) and "learning_rate" in str(seen[0].message)


def test_missing_required_field():
    kw = dict(REQUIRED)
    del kw["learning_rate"]
    with pytest.raises(ConfigError, match=r"training_args\.learning_rate: missing required"):
        TrainingArgs(**kw)


def test_positional_arguments_rejected():
    with pytest.raises(ConfigError, match="keyword arguments only"):
        LoraOptions(4)


def test_one_exception_type_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# ---------------------------------------------------------------- nested options


def test_nested_dicts_accepted():
    t = training(deepspeed_options={"cpu_offload_optimizer": True,
                                    "cpu_offload_optimizer_ratio": 0.5},
                 fsdp_options={"sharding_strategy": "SHARD_GRAD_OP"},
                 lora={"rank": 8, "quantize_data_type": "nf4"})
    assert t.deepspeed_options == DeepSpeedOptions(cpu_offload_optimizer=True,
                                                   cpu_offload_optimizer_ratio=0.5)
    assert t.fsdp_options.sharding_strategy is ShardingStrategies.SHARD_GRAD_OP
    assert t.lora == LoraOptions(rank=8, quantize_data_type="nf4")


@pytest.mark.parametrize("bad", [1.5, -0.1])
def test_cpu_offload_ratio_range_nested_path(bad):
    msg = raises(lambda: checked(training(deepspeed_options={"cpu_offload_optimizer_ratio": bad})),
                 "training_args.deepspeed_options.cpu_offload_optimizer_ratio", bad)
    assert "between 0 and 1" in msg


def test_cpu_offload_ratio_range_standalone():
    raises(lambda: checked(DeepSpeedOptions(cpu_offload_optimizer_ratio=2)),
           "deepspeed_options.cpu_offload_optimizer_ratio", 2.0)


def test_deepspeed_save_samples():
    raises(lambda: checked(DeepSpeedOptions(save_samples=0)), "deepspeed_options.save_samples", 0)


def test_sharding_strategy_invalid():
    msg = raises(lambda: training(fsdp_options={"sharding_strategy": "ZERO3"}),
                 "training_args.fsdp_options.sharding_strategy", "ZERO3")
    assert "FULL_SHARD" in msg and "NO_SHARD" in msg


def test_nested_unknown_field_is_ignored_with_a_warning_that_suggests():
    with pytest.warns(UserWarning, match=r"LoraOptions: ignoring 1 unknown field.*'rnak' \(did you mean 'rank'"):
        assert training(lora={"rnak": 8}).lora == LoraOptions()


def test_nested_non_string_keys():
    with pytest.raises(ConfigError, match="training_args.lora"):
        training(lora={1: 2})


# ---------------------------------------------------------------- LoraOptions rules


def test_lora_rank_negative():
    raises(lambda: checked(LoraOptions(rank=-1)), "lora.rank", -1)


def test_lora_alpha():
    raises(lambda: checked(LoraOptions(alpha=0)), "lora.alpha", 0)


@pytest.mark.parametrize("bad", [1.0, -0.1])
def test_lora_dropout(bad):
    raises(lambda: checked(training(lora={"dropout": bad})), "training_args.lora.dropout", bad)


@pytest.mark.parametrize("bad", [[], ["q_proj", ""]])
def test_lora_target_modules(bad):
    raises(lambda: checked(LoraOptions(target_modules=bad)), "lora.target_modules", bad)


def test_lora_quantize_data_type():
    msg = raises(lambda: LoraOptions(quantize_data_type="fp8"), "lora.quantize_data_type",
                 "fp8")
    assert "'nf4' or None" in msg


def test_lora_quantize_data_type_assigned_as_a_string_after_construction():
    # InstructLab's CLI does `lora.quantize_data_type = "nf4"` on a built object.
    lora = LoraOptions(rank=2)
    lora.quantize_data_type = "nf4"
    assert checked(lora).quantization is QuantizeDataType.NF4
    lora.quantize_data_type = "int3"
    raises(lambda: checked(lora), "lora.quantize_data_type", "int3")


# ---------------------------------------------------------------- TorchrunArgs rules


@pytest.mark.parametrize("bad", [0, -1, "cpu"])
def test_nproc_per_node(bad):
    raises(lambda: checked(TorchrunArgs(nproc_per_node=bad)), "torchrun_args.nproc_per_node", bad)


def test_nnodes():
    raises(lambda: checked(TorchrunArgs(nnodes=0)), "torchrun_args.nnodes", 0)


@pytest.mark.parametrize("bad", [-1, 2, 3])
def test_node_rank_range(bad):
    msg = raises(lambda: checked(TorchrunArgs(nnodes=2, node_rank=bad)), "torchrun_args.node_rank", bad)
    assert "[0, 2)" in msg


@pytest.mark.parametrize("bad", [0, 70000])
def test_master_port(bad):
    raises(lambda: checked(TorchrunArgs(master_addr="h", master_port=bad)), "torchrun_args.master_port",
           bad)


def test_rendezvous_endpoint_or_master_not_both():
    # Checked at construction, as InstructLab's validator does.
    msg = raises(lambda: TorchrunArgs(rdzv_endpoint="h:1", master_addr="h", master_port=1),
                 "torchrun_args.master_addr", "h")
    assert "rdzv_endpoint" in msg
    raises(lambda: checked(TorchrunArgs(rdzv_endpoint="")), "torchrun_args.rdzv_endpoint", "")


def test_rdzv_id_str_or_int():
    assert TorchrunArgs(rdzv_id="job-7").rdzv_id == "job-7"
    raises(lambda: TorchrunArgs(rdzv_id=1.5), "torchrun_args.rdzv_id", 1.5)


# ---------------------------------------------------------------- DataProcessArgs rules


def data(**kw):
    return DataProcessArgs(**{**DATA, **kw})


def test_data_max_seq_len():
    raises(lambda: checked(data(max_seq_len=0)), "data_process_args.max_seq_len", 0)


@pytest.mark.parametrize("bad", [-1, 512, 600])
def test_data_min_seq_len(bad):
    raises(lambda: checked(data(min_seq_len=bad)), "data_process_args.min_seq_len", bad)


def test_data_num_cpu_procs():
    raises(lambda: checked(data(num_cpu_procs=0)), "data_process_args.num_cpu_procs", 0)


@pytest.mark.parametrize("name", ["data_path", "data_output_path", "model_path"])
def test_data_paths_non_empty(name):
    raises(lambda: checked(data(**{name: ""})), f"data_process_args.{name}", "")


def test_data_unknown_field():
    with pytest.warns(UserWarning, match=r"'num_procs' \(did you mean 'num_cpu_procs'"):
        assert data(num_procs=4) == data()


# ---------------------------------------------------------------- files


def _full_args():
    return training(num_epochs=3, lora={"rank": 16, "target_modules": ["q_proj", "v_proj"],
                                        "quantize_data_type": "nf4"},
                    fsdp_options={"sharding_strategy": "FULL_SHARD"},
                    deepspeed_options={"save_samples": 1000}, distributed_backend="deepspeed",
                    adamw_betas=(0.85, 0.99), learning_rate=2e-6, lr_scheduler="linear")


def _plain(obj):
    # JSON-shaped builtins: enums as values, tuples as lists
    return json.loads(msgspec.json.encode(obj))


def _toml(data, table=""):
    """A minimal TOML writer for the tests (tomllib only reads)."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(v) if isinstance(v, str) else repr(v)
    lines = [f"[{table}]"] if table else []
    lines += [f"{k} = {value(v)}" for k, v in data.items()
              if v is not None and not isinstance(v, dict)]
    for k, v in data.items():
        if isinstance(v, dict):
            lines += ["", _toml(v, f"{table}.{k}" if table else k)]
    return "\n".join(lines)


def test_round_trip_json(tmp_path):
    args = _full_args()
    path = tmp_path / "train.json"
    path.write_bytes(msgspec.json.encode(args))
    assert load_config(path) == args


def test_round_trip_yaml(tmp_path):
    args = _full_args()
    for name in ("train.yaml", "train.YML"):
        path = tmp_path / name
        path.write_text(yaml.safe_dump(_plain(args)))
        assert load_config(path) == args


def test_round_trip_toml(tmp_path):
    args = _full_args()
    path = tmp_path / "train.toml"
    path.write_text(_toml(_plain(args)))
    assert load_config(path) == args


def test_run_config_from_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"training_args": {**REQUIRED, "lora": {"rank": 2}},
                                    "torchrun_args": {"nproc_per_node": 2}}))
    run = load_config(path)
    assert isinstance(run, RunConfig)
    assert run.training_args == training(lora=LoraOptions(rank=2))
    assert run.torchrun_args == TorchrunArgs(nproc_per_node=2)


def test_run_config_toml_default_torchrun(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(_toml({"training_args": REQUIRED}))
    assert load_config(path) == RunConfig(training_args=training())


def test_yaml_exponent_floats(tmp_path):
    # YAML 1.1 would read 2e-6 as a string; learning rates are written that way.
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump({**REQUIRED, "learning_rate": 1.0}).replace(
        "learning_rate: 1.0", "learning_rate: 2e-6"))
    assert load_config(path).learning_rate == 2e-6


def test_file_error_names_file_and_nested_field(tmp_path):
    path = tmp_path / "run.json"
    bad = {"training_args": {**REQUIRED,
                             "deepspeed_options": {"cpu_offload_optimizer_ratio": 1.5}}}
    path.write_text(json.dumps(bad))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert str(path) in msg and info.value.source == str(path)
    assert "training_args.deepspeed_options.cpu_offload_optimizer_ratio = 1.5" in msg


def test_file_unknown_key_is_config_error(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text(_toml({**REQUIRED, "learning_rte": 1e-5}))
    msg = raises(lambda: load_config(path), "training_args.learning_rte", 1e-5)
    assert str(path) in msg and "did you mean 'learning_rate'" in msg


def test_file_wrong_type(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump({**REQUIRED, "max_seq_len": "long"}))
    msg = raises(lambda: load_config(path), "training_args.max_seq_len", "long")
    assert str(path) in msg


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file") as info:
        load_config(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(info.value)


def test_unknown_extension(tmp_path):
    path = tmp_path / "t.ini"
    path.write_text("x=1")
    with pytest.raises(ConfigError, match=r"t\.ini.*unknown config file type '\.ini'.*\.yaml"):
        load_config(path)


@pytest.mark.parametrize("name,text,kind", [
    ("t.json", "{not json", "invalid JSON"), ("t.toml", "a = = 1", "invalid TOML"),
    ("t.yaml", "a: [1, 2", "invalid YAML"),
])
def test_syntax_errors(tmp_path, name, text, kind):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=kind) as info:
        load_config(path)
    assert name in str(info.value)


@pytest.mark.parametrize("text", ["", "- 1\n- 2\n"])
def test_top_level_must_be_mapping(tmp_path, text):
    path = tmp_path / "t.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path)


def test_load_into_data_process_args(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({**DATA, "min_seq_len": 8, "skip_invalid_lines": True}))
    assert load_config(path, into=DataProcessArgs) == data(min_seq_len=8,
                                                            skip_invalid_lines=True)


def test_config_from_dict():
    assert config_from_dict(dict(REQUIRED)) == training()
    with pytest.raises(ConfigError, match="training_args.max_seq_len = 0"):
        config_from_dict({"training_args": {**REQUIRED, "max_seq_len": 0}})


def test_import_is_light():
    # config.py (and errors.py, which it imports) must not pull in torch/transformers/numpy:
    # loaded without the package's __init__ on purpose, so whatever that imports does not count.
    package = Path(__file__).resolve().parents[1] / "python" / "instructpack"
    code = (
        "import importlib, sys, types\n"
        f"pkg = types.ModuleType('instructpack'); pkg.__path__ = [{str(package)!r}]\n"
        "sys.modules['instructpack'] = pkg\n"
        "importlib.import_module('instructpack.config')\n"
        "heavy = {'torch', 'transformers', 'numpy', 'yaml'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
