"""plot_metrics and `instructpack plot`: a PNG from metrics.jsonl, clear errors otherwise."""

from __future__ import annotations

import json
import math

import pytest

from instructpack import cli
from instructpack.train.plot import plot_metrics

pytest.importorskip("matplotlib")
from matplotlib.image import imread  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_metrics(directory, steps_per_epoch=15, epochs=2):
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for epoch in range(epochs):
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i + 1
            lines.append(json.dumps(dict(epoch=epoch, step=step, loss=3.0 * math.exp(-step / 10) + 0.1 * (step % 3),
                                         lr=1e-5 * min(1.0, step / 5), tokens_per_s=2000.0 + step,
                                         trained_tokens_per_s=1200.0 + step)))
    (directory / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return directory


def test_plot_writes_a_png_next_to_the_metrics(tmp_path):
    run = write_metrics(tmp_path / "run")
    path = plot_metrics(run)
    assert path == run / "metrics.png"
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    height, width, channels = imread(path).shape
    assert (width, height) == (1000, 900) and channels in (3, 4)


def test_plot_to_a_chosen_output(tmp_path):
    run = write_metrics(tmp_path / "run", steps_per_epoch=4)  # too few points to smooth
    out = tmp_path / "plots" / "curves.png"
    assert plot_metrics(run / "metrics.jsonl", out) == out
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    assert not (run / "metrics.png").exists()


def test_cli_plot_prints_the_path_written(tmp_path, capsys):
    run = write_metrics(tmp_path / "run")
    assert cli.main(["plot", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "metrics.png")
    assert (run / "metrics.png").read_bytes()[:8] == PNG_SIGNATURE

    out = tmp_path / "o.png"
    assert cli.main(["plot", str(run), "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out) and out.exists()


@pytest.mark.parametrize("case", ["missing dir", "missing file", "empty file", "corrupt line"])
def test_cli_plot_errors_name_the_path_and_exit_2(tmp_path, capsys, case):
    run = tmp_path / "run"
    if case != "missing dir":
        run.mkdir()
    if case == "empty file":
        (run / "metrics.jsonl").write_text("")
    if case == "corrupt line":
        (run / "metrics.jsonl").write_text("{oops\n{}\n")
    assert cli.main(["plot", str(run)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("instructpack plot: error: ")
    # A path that is not a directory is taken as the metrics file itself.
    named = run if case == "missing dir" else run / "metrics.jsonl"
    assert f"error: {named}" in err
    assert {"missing dir": "no metrics file", "missing file": "no metrics file",
            "empty file": "no metrics records", "corrupt line": "metrics.jsonl:1:"}[case] in err
    assert not (run / "metrics.png").exists()


def test_the_validation_loss_is_drawn_beside_the_training_loss(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    run = write_metrics(tmp_path / "run")
    with (run / "metrics.jsonl").open("a") as f:  # validation lines, as training writes them
        for step in (10, 20, 30):
            f.write(json.dumps(dict(step=step, epoch=step // 16, val_loss=1.0 / step, val_tokens=50,
                                    val_samples=4)) + "\n")
    drawn = {}
    real = Axes.plot

    def plot(self, *args, **kwargs):
        drawn[kwargs.get("label")] = (list(args[0]), list(args[1]))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", plot)
    plot_metrics(run)
    assert drawn["validation loss"] == ([10, 20, 30], [0.1, 0.05, 1.0 / 30])
    assert len(drawn["loss"][0]) == 30  # every training step is still drawn
