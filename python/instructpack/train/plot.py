"""`instructpack plot`: a run's metrics.jsonl as a PNG of loss, throughput and learning rate."""

from __future__ import annotations

from pathlib import Path

from ..errors import MetricsFileError, MissingPackageError
from .metrics import metrics_file, read_metrics

__all__ = ["plot_metrics"]

# Below this many steps the raw loss is readable on its own.
_SMOOTH_FROM_POINTS = 20


def _import_matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MissingPackageError(f"plotting metrics needs matplotlib ({exc}); pip install matplotlib "
                          "(or pip install 'instructpack[plot]')") from exc
    return Figure, FigureCanvasAgg


def _last_record_per_step(records: list[dict], file: Path) -> list[dict]:
    # A resumed run appends the steps after its checkpoint again; the later lines are the ones
    # the final model came from. A step's validation line is kept beside its step line.
    by_step = {}
    for number, record in enumerate(records, start=1):
        step = record.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            raise MetricsFileError(f"{file}: record {number} has no integer 'step' field: {record}")
        by_step[step, "val_loss" in record] = record
    return [by_step[key] for key in sorted(by_step)]


def _series(records: list[dict], field: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[field]) for r in records
              if isinstance(r.get(field), (int, float)) and not isinstance(r.get(field), bool)]
    return [p[0] for p in points], [p[1] for p in points]


def _moving_average(steps: list[int], values: list[float]) -> tuple[list[int], list[float]]:
    window = max(2, min(50, len(values) // 10))
    averaged, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            averaged.append(total / window)
    return steps[window - 1:], averaged


def _epoch_boundaries(records: list[dict]) -> list[tuple[float, int]]:
    """(x between the last step of one epoch and the first of the next, the new epoch)."""
    return [((prev["step"] + cur["step"]) / 2, cur.get("epoch"))
            for prev, cur in zip(records, records[1:]) if cur.get("epoch") != prev.get("epoch")]


def plot_metrics(ckpt_output_dir: str | Path, output: str | Path | None = None) -> Path:
    """Renders ckpt_output_dir/metrics.jsonl (or the metrics file given) to a PNG, by default
    metrics.png next to it; returns the path written."""
    Figure, FigureCanvasAgg = _import_matplotlib()
    file = metrics_file(ckpt_output_dir)
    records = _last_record_per_step(read_metrics(file), file)
    if not records:
        raise MetricsFileError(f"{file}: no metrics records yet (the file is empty)")
    output = Path(output) if output is not None else file.parent / "metrics.png"

    # Figure + Agg canvas, not pyplot: no global backend or figure state for other users.
    fig = Figure(figsize=(10, 9), layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, speed_ax, lr_ax = fig.subplots(3, 1, sharex=True)
    fig.suptitle(str(file))

    steps, loss = _series(records, "loss")
    if len(loss) >= _SMOOTH_FROM_POINTS:
        loss_ax.plot(steps, loss, color="tab:blue", alpha=0.3, linewidth=1, label="loss")
        loss_ax.plot(*_moving_average(steps, loss), color="tab:blue", linewidth=2, label="moving average")
    else:
        loss_ax.plot(steps, loss, color="tab:blue", marker=".", label="loss")
    val_steps, val_loss = _series(records, "val_loss")
    if val_loss:
        loss_ax.plot(val_steps, val_loss, color="tab:orange", marker="o", linewidth=2, label="validation loss")
    loss_ax.set_ylabel("loss per trained token")

    for field, label in (("tokens_per_s", "tokens/s"), ("trained_tokens_per_s", "trained tokens/s")):
        speed_ax.plot(*_series(records, field), label=label)
    speed_ax.set_ylabel("tokens per second")
    speed_ax.set_ylim(bottom=0)  # a dip is judged against zero, not against the noise

    lr_ax.plot(*_series(records, "lr"), color="tab:green", label="learning rate")
    lr_ax.set_ylabel("learning rate")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    lr_ax.set_xlabel("optimizer step")

    for x, epoch in _epoch_boundaries(records):
        for ax in (loss_ax, speed_ax, lr_ax):
            ax.axvline(x, color="gray", linestyle="--", linewidth=1)
        loss_ax.text(x, 1.0, f" epoch={epoch}", transform=loss_ax.get_xaxis_transform(),
                     va="top", ha="left", fontsize=8, color="gray")
    for ax in (loss_ax, speed_ax, lr_ax):
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)

    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, format="png", dpi=100)
    return output
