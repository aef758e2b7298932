"""process_data=False over a data_output_dir that InstructLab preprocessed: its data.jsonl
(input_ids, labels with -100 for untrained tokens, len) is trained as it is, converted into
shards beside it once, and never modified."""

from __future__ import annotations

import json
import re

import pytest

from instructpack import InputError, load_dataset, run_training
from instructpack.data.manifest import read_manifest

from support.launching import small_args
from support.samples import preprocess, tricky_conversations


def _instructlab_rows(tmp_path, model) -> list[dict]:
    """Samples in InstructLab's data.jsonl layout, with labels unlike any instructpack would
    make (trained stretches chosen at random), so that they can only come from the file."""
    ds = load_dataset(preprocess(tmp_path, model, tricky_conversations(40, seed=5), name="made").output_path)
    rows = []
    for i in range(len(ds)):
        ids = ds[i]["input_ids"].tolist()
        labels = [t if (k // 7 + i) % 3 == 0 else -100 for k, t in enumerate(ids)]
        rows.append({"labels": labels, "input_ids": ids, "len": len(ids)})
    return rows


def _write(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_instructlab_data_jsonl_is_trained_as_it_is(tmp_path, model, recorded_launch, capsys):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    rows = _instructlab_rows(tmp_path, model)
    _write(data_dir / "data.jsonl", rows)
    (data_dir / "notes.txt").write_text("kept\n")
    before = (data_dir / "data.jsonl").read_bytes()
    args = small_args(tmp_path, model, process_data=False, data_output_dir=str(data_dir))

    run_training(training_args=args)
    assert f"converted from {data_dir / 'data.jsonl'}" in capsys.readouterr().out
    (_, job), = recorded_launch
    ds = load_dataset(job.dataset_path)
    assert len(ds) == len(rows)
    for i, row in enumerate(rows):
        assert ds[i]["input_ids"].tolist() == row["input_ids"]
        assert ds[i]["labels"].tolist() == row["labels"]
    assert (data_dir / "data.jsonl").read_bytes() == before and (data_dir / "notes.txt").read_text() == "kept\n"
    first = read_manifest(data_dir)
    assert first.imported is not None and first.counts.trained_tokens == sum(
        sum(label != -100 for label in r["labels"]) for r in rows)

    run_training(training_args=args)  # converted once: the second run reuses the shards
    assert "reused" in capsys.readouterr().out
    assert read_manifest(data_dir).shards == first.shards

    _write(data_dir / "data.jsonl", rows[:10])  # InstructLab preprocessed again: converted again
    run_training(training_args=args)
    assert len(load_dataset(data_dir)) == 10
    assert not any(p.name in {s.file for s in first.shards} for p in data_dir.iterdir())  # old shards gone


@pytest.mark.parametrize("change, problem", [
    (lambda r: r.update(labels=r["labels"][:-1]), "labels for"),
    (lambda r: r["labels"].__setitem__(0, r["input_ids"][0] + 1), "neither -100 nor the token"),
    (lambda r: r["input_ids"].__setitem__(0, 10**6), "is not one of the model's"),
    (lambda r: r.update(len=1), "len is 1"),
], ids=["short-labels", "shifted-label", "foreign-id", "wrong-len"])
def test_a_damaged_data_jsonl_is_refused_naming_the_line(change, problem, tmp_path, model, recorded_launch):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    rows = _instructlab_rows(tmp_path, model)
    change(rows[2])
    _write(data_dir / "data.jsonl", rows)
    with pytest.raises(InputError, match=re.escape(f"{data_dir / 'data.jsonl'}:3")) as e:
        run_training(training_args=small_args(tmp_path, model, process_data=False, data_output_dir=str(data_dir)))
    assert problem in str(e.value)
    assert sorted(p.name for p in data_dir.iterdir()) == ["data.jsonl"]  # nothing half-written left
    assert not recorded_launch
