"""Bad input, atomic output, reuse, the dataset reader's checks, and the command line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from instructpack import DataProcessArgs, DatasetError, data_process, load_dataset
from instructpack.errors import InputError

GOOD = {"messages": [{"role": "user", "content": "ka lo"}, {"role": "assistant", "content": "mi ne"}]}


def _args(tmp_path, model, data, **kw):
    a = dict(data_path=str(data), data_output_path=str(tmp_path / "out"), model_path=str(model), max_seq_len=512,
             num_cpu_procs=2)
    a.update(kw)
    return DataProcessArgs(**a)


def _write_lines(path, lines: list[bytes]):
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


BAD_LINES = [
    (b'{"messages": [{"role": "user", "content": "x"}', "malformed JSON"),
    (b'{"msgs": []}', "missing required field `messages`"),
    (b'{"messages": [{"role": "user", "content": 3}]}', "Expected `str`, got `int` - at `\\$.messages\\[0\\].content`"),
    (b'{"messages": []}', '"messages" is empty'),
    (b'{"messages": [{"role": "wizard", "content": "x"}]}', "chat template failed: Unknown role: wizard"),
    (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', "not valid UTF-8"),
]


@pytest.mark.parametrize("line, message", BAD_LINES)
def test_bad_line_fails_with_file_line_and_reason_and_writes_nothing(tmp_path, tokenizer_dirs, line, message):
    good = json.dumps(GOOD).encode()
    data = _write_lines(tmp_path / "in.jsonl", [good] * 300 + [line] + [good] * 5)
    with pytest.raises(InputError, match=f"in.jsonl:301: .*{message}.*skip_invalid_lines") as e:
        data_process.main(_args(tmp_path, tokenizer_dirs["chatml"], data), progress=False)
    assert e.value.line == 301
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]  # no output, no temporary left behind


def test_skip_invalid_lines_reports_how_many_and_why(tmp_path, tokenizer_dirs):
    good = json.dumps(GOOD).encode()
    lines = [good]
    for line, _ in BAD_LINES:
        lines += [line, good]
    data = _write_lines(tmp_path / "in.jsonl", lines + [b"", b"   "])  # blank lines are not samples
    result = data_process.main(_args(tmp_path, tokenizer_dirs["chatml"], data, skip_invalid_lines=True),
                               progress=False)
    counts = result.manifest.counts
    assert counts.samples == 7 and counts.invalid_lines == 6
    assert counts.invalid_reasons == {"malformed_json": 1, "invalid_sample": 3, "chat_template": 1,
                                         "not_utf8": 1}
    assert result.invalid_examples[0].startswith(f"{data}:2: malformed JSON")
    assert load_dataset(result.output_path).source_lines.tolist() == [1, 3, 5, 7, 9, 11, 13]


def test_crash_mid_write_leaves_no_dataset(tmp_path, tokenizer_dirs, monkeypatch):
    data = _write_lines(tmp_path / "in.jsonl", [json.dumps(GOOD).encode()] * 50)
    import instructpack.data.preprocess as dp

    def crash(directory, manifest):
        raise KeyboardInterrupt  # as if the run were stopped just before the manifest

    monkeypatch.setattr(dp, "write_manifest", crash)
    with pytest.raises(KeyboardInterrupt):
        dp.preprocess(_args(tmp_path, tokenizer_dirs["chatml"], data), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


def test_killed_run_leaves_no_dataset_and_its_temporary_is_cleaned(tmp_path, tokenizer_dirs):
    data = _write_lines(tmp_path / "in.jsonl", [json.dumps(GOOD).encode()] * 20)
    stale = tmp_path / ".out.tmp-999999999-deadbeef"  # a pid that cannot exist
    stale.mkdir()
    (stale / "shard-00000.bin").write_bytes(b"partial")
    result = data_process.main(_args(tmp_path, tokenizer_dirs["chatml"], data), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out"]
    assert load_dataset(result.output_path).manifest.counts.samples == 20


def test_second_run_reuses_output_unless_input_settings_or_overwrite_change(tmp_path, tokenizer_dirs):
    data = _write_lines(tmp_path / "in.jsonl", [json.dumps(GOOD).encode()] * 10)
    model = tokenizer_dirs["chatml"]
    first = data_process.main(_args(tmp_path, model, data), progress=False)
    assert not first.reused
    again = data_process.main(_args(tmp_path, model, data), progress=False)
    assert again.reused and again.manifest == first.manifest
    assert not data_process.main(_args(tmp_path, model, data, overwrite=True), progress=False).reused
    assert not data_process.main(_args(tmp_path, model, data, max_seq_len=256), progress=False).reused
    assert not data_process.main(_args(tmp_path, tokenizer_dirs["granite"], data), progress=False).reused
    _write_lines(data, [json.dumps(GOOD).encode()] * 11)
    changed = data_process.main(_args(tmp_path, model, data), progress=False)
    assert not changed.reused and changed.manifest.counts.samples == 11
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out"]


def test_refuses_to_replace_a_directory_that_is_not_a_dataset(tmp_path, tokenizer_dirs):
    data = _write_lines(tmp_path / "in.jsonl", [json.dumps(GOOD).encode()])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an instructpack dataset"):
        data_process.main(_args(tmp_path, tokenizer_dirs["chatml"], data), progress=False)
    assert (tmp_path / "out" / "precious.txt").read_text() == "keep me"


def test_missing_inputs_are_named(tmp_path, tokenizer_dirs):
    data = _write_lines(tmp_path / "in.jsonl", [json.dumps(GOOD).encode()])
    with pytest.raises(FileNotFoundError, match="data_path .*nope.jsonl"):
        data_process.main(_args(tmp_path, tokenizer_dirs["chatml"], tmp_path / "nope.jsonl"), progress=False)
    with pytest.raises(FileNotFoundError, match="model_path .*no-model"):
        data_process.main(_args(tmp_path, tmp_path / "no-model", data), progress=False)
    with pytest.raises(FileNotFoundError, match="chat_tmpl_path"):
        data_process.main(_args(tmp_path, tokenizer_dirs["chatml"], data, chat_tmpl_path=str(tmp_path / "t.jinja")),
                          progress=False)


def test_tokenizer_without_template_needs_chat_tmpl_path(tmp_path, tokenizer_dirs):
    import shutil

    model = tmp_path / "no-template"
    shutil.copytree(tokenizer_dirs["chatml"], model)
    (model / "chat_template.jinja").unlink()
    data = _write_lines(tmp_path / "in.jsonl", [json.dumps(GOOD).encode()])
    with pytest.raises(ValueError, match="no chat template; give one with chat_tmpl_path"):
        data_process.main(_args(tmp_path, model, data), progress=False)
    template = tmp_path / "granite.jinja"
    template.write_text((tokenizer_dirs["granite"] / "chat_template.jinja").read_text())
    result = data_process.main(_args(tmp_path, model, data, chat_tmpl_path=str(template)), progress=False)
    assert result.manifest.chat_template.path == str(template)


def test_no_sample_kept_is_an_error(tmp_path, tokenizer_dirs):
    data = _write_lines(tmp_path / "in.jsonl", [json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode()])
    with pytest.raises(ValueError, match="no sample was kept.*no_trained_tokens"):
        data_process.main(_args(tmp_path, tokenizer_dirs["chatml"], data), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


@pytest.fixture
def dataset(tmp_path, tokenizer_dirs):
    data = _write_lines(tmp_path / "in.jsonl", [json.dumps(GOOD).encode()] * 30)
    return data_process.main(_args(tmp_path, tokenizer_dirs["chatml"], data), progress=False).output_path


def test_reader_refuses_a_truncated_shard(dataset):
    shard = dataset / "shard-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.raises(DatasetError, match="shard-00000.bin: .*bytes, the manifest says"):
        load_dataset(dataset)


def test_reader_refuses_a_missing_shard_or_manifest(dataset, tmp_path):
    (dataset / "shard-00000.bin").unlink()
    with pytest.raises(DatasetError, match="shard-00000.bin: shard listed in manifest.json is missing"):
        load_dataset(dataset)
    with pytest.raises(DatasetError, match="manifest.json: not found"):
        load_dataset(tmp_path)


def test_reader_verify_finds_flipped_token(dataset):
    shard = dataset / "shard-00000.bin"
    data = bytearray(shard.read_bytes())
    data[70] ^= 0x04
    shard.write_bytes(bytes(data))
    ds = load_dataset(dataset)  # O(1) checks pass
    with pytest.raises(ValueError, match="shard-00000.bin: corrupt shard \\(checksum mismatch\\)"):
        ds.verify()


def test_reader_refuses_corrupt_manifest(dataset):
    (dataset / "manifest.json").write_text("{not json")
    with pytest.raises(DatasetError, match="corrupt manifest"):
        load_dataset(dataset)


def _run_cli(*args, cwd=None):
    code = ("import sys; from instructpack.cli import preprocess_main; rc = preprocess_main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_command_line_preprocesses_without_importing_torch(tmp_path, tokenizer_dirs):
    data = _write_lines(tmp_path / "in.jsonl", [json.dumps(GOOD).encode()] * 10)
    out = tmp_path / "out"
    proc = _run_cli("--data-path", data, "--data-output-path", out, "--model-path", tokenizer_dirs["chatml"],
                    "--max-seq-len", 512)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout
    assert re.search(r"samples kept +10\n", proc.stdout)
    assert load_dataset(out).manifest.counts.samples == 10
    proc = _run_cli("--data-path", data, "--data-output-path", out, "--model-path", tokenizer_dirs["chatml"],
                    "--max-seq-len", 512)
    assert proc.returncode == 0 and f"reused {out}" in proc.stdout


def test_command_line_reports_bad_input_and_bad_settings(tmp_path, tokenizer_dirs):
    data = _write_lines(tmp_path / "in.jsonl", [b"{oops"])
    proc = _run_cli("--data-path", data, "--data-output-path", tmp_path / "o", "--model-path",
                    tokenizer_dirs["chatml"], "--max-seq-len", 512)
    assert proc.returncode == 2 and f"{data}:1: malformed JSON" in proc.stderr
    proc = _run_cli("--data-path", data, "--data-output-path", tmp_path / "o", "--model-path",
                    tokenizer_dirs["chatml"], "--max-seq-len", 0)
    assert proc.returncode == 2 and "max_seq_len" in proc.stderr
