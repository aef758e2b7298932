"""Training metrics: one JSON line per optimizer step in ckpt_output_dir/metrics.jsonl, the
same numbers forwarded to TensorBoard / Weights & Biases / MLflow when `logger_type` asks for
them, and a console progress bar. Importing this module does not import torch."""

from __future__ import annotations

import contextlib
import importlib
import json
import resource
import sys
from pathlib import Path
from typing import Any

import msgspec
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..config import TrainingArgs
from ..errors import MetricsFileError, MissingSinkError, PathNotFoundError
from ..fileio import replace_file

__all__ = [
    "METRICS_FILENAME", "RECORD_FIELDS", "MetricsLogger", "ProgressBar", "StepRecord", "ValidationRecord",
    "metrics_file",
    "fragmentation_advice", "peak_memory_mib", "peak_reserved_mib", "read_metrics",
]

METRICS_FILENAME = "metrics.jsonl"


class StepRecord(msgspec.Struct, kw_only=True):
    """One optimizer step, one line of metrics.jsonl, written by rank 0. "All ranks" values
    are summed over every process; "per rank" ones are what one process did."""
    epoch: int  # 0-based epoch index
    step: int  # global optimizer step, 1-based
    loss: float  # mean loss per trained (unmasked) token over the whole step
    lr: float  # learning rate used for this step
    grad_norm: float  # total gradient L2 norm before clipping
    samples: int  # samples in this step, all ranks
    total_samples: int  # samples seen since training started, this step included
    tokens: int  # tokens in this step, all ranks
    trained_tokens: int  # tokens that carry loss in this step, all ranks
    tokens_per_s: float  # tokens / step_time_s
    trained_tokens_per_s: float  # trained_tokens / step_time_s
    samples_per_s: float  # samples / step_time_s
    step_time_s: float  # wall time of this step, seconds
    micro_batches: int  # forward/backward passes per rank in this step
    peak_memory_mib: float  # peak memory, max over ranks (MiB = 2**20 bytes); CUDA: allocated by tensors
    elapsed_s: float  # wall time since training started, seconds
    # Mixture-of-experts models only (None otherwise): the router's load-balancing loss as
    # added to the step's loss (the model's coefficient times its mean over micro-batches),
    # and the busiest expert's share of routed tokens over an even share (1.0: balanced).
    router_aux_loss: float | None = None
    max_expert_load: float | None = None
    # CUDA only (None elsewhere): the peak the caching allocator reserved, max over ranks. Far
    # above peak_memory_mib means fragmentation (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True).
    peak_reserved_mib: float | None = None


RECORD_FIELDS = StepRecord.__struct_fields__  # the fields of a record, in file order


class ValidationRecord(msgspec.Struct, kw_only=True):
    """The validation loss after a step (validation_frequency), a line of its own in
    metrics.jsonl; the sinks chart it under "validation/"."""
    step: int  # the optimizer step after which it was measured
    epoch: int
    val_loss: float  # mean loss per target token over the whole validation set, all ranks
    val_tokens: int  # target tokens in the validation set
    val_samples: int


def _as_dict(record: StepRecord | dict) -> dict:
    return msgspec.structs.asdict(record) if isinstance(record, msgspec.Struct) else record

_TAG_PREFIX = "train/"


def metrics_file(path: str | Path) -> Path:
    """The metrics file itself, given either it or the directory holding it."""
    path = Path(path)
    return path / METRICS_FILENAME if path.is_dir() else path


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl file (or of the directory holding one), in file order."""
    file = metrics_file(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PathNotFoundError("", (), f"{file}: no metrics file here (training writes {METRICS_FILENAME} "
                                "into ckpt_output_dir)") from None
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):
                # No newline after it: a write cut short by a crash, or one still under way
                # while training runs. Every line before it is complete.
                break
            raise MetricsFileError(f"{file}:{number}: not valid JSON ({exc.msg}, column {exc.colno}); "
                                   "the file is corrupt: fix or delete that line") from None
        if not isinstance(record, dict):
            raise MetricsFileError(f"{file}:{number}: expected a JSON object, got "
                                   f"{type(record).__name__}; fix or delete that line")
        records.append(record)
    return records


def _numeric_fields(record: dict, prefix: str = _TAG_PREFIX) -> dict[str, float]:
    # Sinks chart numbers only; bool is an int subclass but not a metric. The step is the x axis.
    return {prefix + k: v for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class _TensorBoardSink:
    def __init__(self, module: Any, log_dir: Path):
        self._writer = module.SummaryWriter(log_dir=str(log_dir))

    def log(self, scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, global_step=step)

    def close(self) -> None:
        self._writer.close()


class _WandbSink:
    def __init__(self, module: Any, args: TrainingArgs, run_config: dict | None):
        self._wandb = module
        module.init(project=args.wandb_project, entity=args.wandb_entity, name=args.wandb_run_name,
                    config=run_config)

    def log(self, scalars: dict[str, float], step: int) -> None:
        self._wandb.log(scalars, step=step)

    def close(self) -> None:
        self._wandb.finish()


class _MlflowSink:
    def __init__(self, module: Any, args: TrainingArgs):
        self._mlflow = module
        if args.mlflow_tracking_uri:
            module.set_tracking_uri(args.mlflow_tracking_uri)
        if args.mlflow_experiment_name:
            module.set_experiment(args.mlflow_experiment_name)
        module.start_run(run_name=args.mlflow_run_name)

    def log(self, scalars: dict[str, float], step: int) -> None:
        self._mlflow.log_metrics(scalars, step=step)

    def close(self) -> None:
        self._mlflow.end_run()


# sink -> (module to import, pip package)
_SINK_MODULES = {
    "tensorboard": ("torch.utils.tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
}


def _chosen_sinks(logger_type: str) -> list[str]:
    names = [s.strip() for s in logger_type.split(",")]
    return [s for s in dict.fromkeys(names) if s in _SINK_MODULES]  # "async" is the JSONL file


def _import_sink(name: str, logger_type: str) -> Any:
    module, package = _SINK_MODULES[name]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingSinkError(
            f"training_args.logger_type = {logger_type!r}: the {name!r} metrics sink needs the "
            f"{package} package, which is not installed ({exc}); pip install {package}, or remove "
            f"{name!r} from logger_type") from exc


def check_sinks(args: TrainingArgs) -> None:
    """Raises MissingSinkError if a sink in args.logger_type cannot be imported: the launcher
    calls this so a missing package fails before any worker starts."""
    for name in _chosen_sinks(args.logger_type):
        _import_sink(name, args.logger_type)


def _keep_steps_up_to(file: Path, last_step: int) -> None:
    """Drops the records of steps after `last_step` (a resumed run logs them again) and a
    last line cut short by a crash (appending to it would corrupt the next record too)."""
    lines = file.read_bytes().split(b"\n")
    lines.pop()  # after the last newline: empty, or the unfinished line of a crash
    kept = []
    for line in lines:
        try:
            step = json.loads(line).get("step")
        except (ValueError, AttributeError):
            step = None  # not a record: read_metrics reports it where it stands
        if isinstance(step, int) and step > last_step:
            break
        kept.append(line + b"\n")
    replace_file(file, b"".join(kept))


class MetricsLogger:
    """Writes each step's record to output_dir/metrics.jsonl and to the sinks `args.logger_type`
    names. A fresh run truncates the file; a run resumed after step N keeps the records of
    steps 1..N and appends. Only rank 0 should create one."""

    def __init__(self, output_dir: str | Path, args: TrainingArgs, *, run_config: dict | None = None,
                 resume_after_step: int | None = None):
        output_dir = Path(output_dir)
        # Import every sink first, so a missing package fails before anything is created.
        modules = {name: _import_sink(name, args.logger_type) for name in _chosen_sinks(args.logger_type)}
        output_dir.mkdir(parents=True, exist_ok=True)
        self.path = output_dir / METRICS_FILENAME
        resume = resume_after_step is not None
        if resume and self.path.exists():
            _keep_steps_up_to(self.path, resume_after_step)
        self._file = self.path.open("a" if resume else "w", encoding="utf-8")
        self._sinks: list = []
        self._closed = False
        try:
            for name, module in modules.items():
                if name == "tensorboard":
                    self._sinks.append(_TensorBoardSink(module, Path(args.tensorboard_log_dir or
                                                                     output_dir / "tensorboard")))
                elif name == "wandb":
                    self._sinks.append(_WandbSink(module, args, run_config))
                else:
                    self._sinks.append(_MlflowSink(module, args))
        except BaseException:
            self.close()
            raise

    def log(self, record: StepRecord | ValidationRecord | dict) -> None:
        """Appends `record` as one line, flushed, and forwards its numbers."""
        if self._closed:
            raise ValueError(f"MetricsLogger for {self.path} is closed")
        record = _as_dict(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()  # a crash later still leaves every logged line complete
        if self._sinks:
            if "step" not in record:
                raise ValueError(f"metrics record has no 'step' field (needed by the "
                                 f"{len(self._sinks)} extra sinks): {record}")
            scalars = _numeric_fields(record, "validation/" if isinstance(record.get("val_loss"), float) else
                                      _TAG_PREFIX)
            for sink in self._sinks:
                sink.log(scalars, record["step"])

    def close(self) -> None:
        """Closes the file and every sink; closing again does nothing."""
        if self._closed:
            return
        self._closed = True
        first_error = None
        for closer in [self._file.close] + [sink.close for sink in self._sinks]:
            try:
                closer()
            except Exception as exc:  # close the others anyway, then report the first failure
                first_error = first_error or exc
        if first_error is not None:
            raise first_error

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _format_rate(value: float) -> str:
    return f"{value / 1000:.1f}k" if value >= 10_000 else f"{value:.0f}"


class ProgressBar:
    """A console bar over optimizer steps (stderr); shows loss and tokens/s. Disabled: silent."""

    def __init__(self, total_steps: int, enabled: bool, initial: int = 0):
        self._bar = tqdm(total=total_steps, initial=initial, disable=not enabled, file=sys.stderr,
                         dynamic_ncols=True, unit="step")
        # Log lines (checkpoint saved, next epoch...) print above the bar instead of through it.
        self._redirect = logging_redirect_tqdm() if enabled else contextlib.nullcontext()
        self._redirect.__enter__()

    def update(self, record: StepRecord | dict) -> None:
        """Advances one step; `record` is the step's metrics record."""
        record = _as_dict(record)
        postfix = {}
        if record.get("loss") is not None:
            postfix["loss"] = f"{record['loss']:.4g}"  # "nan"/"inf" show as such
        if record.get("tokens_per_s") is not None:
            postfix["tok/s"] = _format_rate(record["tokens_per_s"])
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None
        self._bar.close()


def reset_peak_memory(device: Any) -> None:
    """Starts a new peak for peak_memory_mib, so each step reports its own (loading the
    model can need more than training does)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: resets VmHWM to the current resident set
    except OSError:
        pass  # elsewhere the peak stays that of the whole process


def peak_reserved_mib(device: Any) -> float | None:
    """CUDA: the peak memory torch's caching allocator held from the driver, in MiB (what
    the GPU really had to give, fragmentation included); None on other devices."""
    import torch

    device = torch.device(device)
    return torch.cuda.max_memory_reserved(device) / 2**20 if device.type == "cuda" else None


def fragmentation_advice(allocated_mib: float, reserved_mib: float | None, alloc_conf: str) -> str | None:
    """A hint when the allocator reserved far more than tensors ever used (a quarter more,
    and at least 1 GiB) and expandable segments are not on: packed micro-batches change
    shape every time, which fragments fixed-size segments."""
    if reserved_mib is None or "expandable_segments:true" in alloc_conf.replace(" ", "").lower():
        return None
    if reserved_mib <= 1.25 * allocated_mib or reserved_mib - allocated_mib < 1024:
        return None
    return (f"the CUDA allocator reserved {reserved_mib:,.0f} MiB at the peak for {allocated_mib:,.0f} MiB of tensors "
            "(fragmentation: every packed micro-batch has another shape); set "
            "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True before starting to give that memory back to training")


def peak_memory_mib(device: Any) -> float:
    """Peak memory of this process in MiB: CUDA memory allocated by torch on a CUDA device,
    otherwise the peak resident set size of the process."""
    import torch  # only the training worker asks, and it has torch loaded already

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        # Linux: VmHWM is the peak of this process's own memory; ru_maxrss carries the
        # parent's peak across exec (a torchrun agent that imported torch).
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # macOS: bytes; else KiB
