"""Bad input, atomic output, reuse, the dataset reader's checks, and the command line."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import msgspec
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

    def crash(write, manifest):
        raise KeyboardInterrupt  # as if the run were stopped just before the manifest

    monkeypatch.setattr(dp.DatasetWrite, "commit", crash)
    with pytest.raises(KeyboardInterrupt):
        dp.preprocess(_args(tmp_path, tokenizer_dirs["chatml"], data), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


def test_killed_run_leaves_no_dataset_and_its_temporary_is_cleaned(tmp_path, tokenizer_dirs):
    data = _write_lines(tmp_path / "in.jsonl", [json.dumps(GOOD).encode()] * 20)
    out = tmp_path / "out"  # what a write killed before its manifest leaves: its journal and shards
    out.mkdir()
    (out / ".instructpack-writing-deadbeef").write_text(json.dumps({"pid": 999999999, "host": socket.gethostname()}))
    (out / "shard-deadbeef-00000.bin").write_bytes(b"partial")
    (out / "shard-deadbeef-00001.bin.mask").write_bytes(b"partial")
    with pytest.raises(DatasetError, match="manifest.json: not found"):
        load_dataset(out)  # no manifest: not a dataset, never read
    result = data_process.main(_args(tmp_path, tokenizer_dirs["chatml"], data), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out"]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", result.manifest.shards[0].file]
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


def test_a_dataset_is_written_beside_other_files_and_never_touches_them(tmp_path, tokenizer_dirs):
    data = _write_lines(tmp_path / "in.jsonl", [json.dumps(GOOD).encode()] * 3)
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    (out / "notes").mkdir()
    (out / "notes" / "a.md").write_text("mine")
    inode = out.stat().st_ino
    first = data_process.main(_args(tmp_path, tokenizer_dirs["chatml"], data), progress=False)
    _write_lines(data, [json.dumps(GOOD).encode()] * 5)  # new input: the dataset is replaced, nothing else
    second = data_process.main(_args(tmp_path, tokenizer_dirs["chatml"], data), progress=False)
    assert load_dataset(out).manifest.counts.samples == 5
    assert sorted(p.name for p in out.iterdir()) == sorted(["precious.txt", "notes", "manifest.json",
                                                           *(s.file for s in second.manifest.shards)])
    assert not {s.file for s in first.manifest.shards} & {s.file for s in second.manifest.shards}
    assert (out / "precious.txt").read_text() == "keep me" and (out / "notes" / "a.md").read_text() == "mine"
    assert out.stat().st_ino == inode  # written into, never renamed: a mount point works too


def test_a_manifest_json_that_is_not_ours_is_never_replaced(tmp_path, tokenizer_dirs):
    data = _write_lines(tmp_path / "in.jsonl", [json.dumps(GOOD).encode()])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "manifest.json").write_text('{"name": "some other tool"}')
    with pytest.raises(FileExistsError, match="manifest.json that instructpack cannot read as its own"):
        data_process.main(_args(tmp_path, tokenizer_dirs["chatml"], data), progress=False)
    assert (tmp_path / "out" / "manifest.json").read_text() == '{"name": "some other tool"}'
    assert sorted(os.listdir(tmp_path / "out")) == ["manifest.json"]


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


def _first_shard(dataset) -> str:
    return json.loads((dataset / "manifest.json").read_text())["shards"][0]["file"]


def test_reader_refuses_a_truncated_shard(dataset):
    shard = dataset / _first_shard(dataset)
    shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.raises(DatasetError, match=f"{shard.name}: .*bytes, the manifest says"):
        load_dataset(dataset)


def test_reader_refuses_a_missing_shard_or_manifest(dataset, tmp_path):
    name = _first_shard(dataset)
    (dataset / name).unlink()
    with pytest.raises(DatasetError, match=f"{name}: shard listed in manifest.json is missing"):
        load_dataset(dataset)
    with pytest.raises(DatasetError, match="manifest.json: not found"):
        load_dataset(tmp_path)


def test_reader_verify_finds_flipped_token(dataset):
    shard = dataset / _first_shard(dataset)
    data = bytearray(shard.read_bytes())
    data[70] ^= 0x04
    shard.write_bytes(bytes(data))
    ds = load_dataset(dataset)  # O(1) checks pass
    with pytest.raises(ValueError, match=f"{shard.name}: corrupt shard \\(checksum mismatch\\)"):
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


# --- what careful users and adversaries found (each would lose data, or train on other data, quietly) ---------

MISREAD_LINES = [  # each once was accepted (or dropped as untrained) without a word
    (b'{"messages": [{"role": "user", "content": "a"}, {"role": "Assistant", "content": "b"}]}',
     "message 1 has role 'Assistant'; roles are lowercase: write 'assistant'"),
    (b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "content": "c"}]}',
     "the key 'content' appears twice in one object"),
    (b'{"messages": [{"role": "user", "content": "a"}], "messages": [{"role": "user", "content": "b"}]}',
     "the key 'messages' appears twice"),
    ('{"messages": [{"role": "user", "content": "a"}]}'.encode("utf-16-le"), "UTF-16 without a byte-order mark"),
]


@pytest.mark.parametrize("line, message", MISREAD_LINES)
def test_lines_that_would_be_misread_are_named(tmp_path, tokenizer_dirs, line, message):
    good = json.dumps(GOOD).encode()
    data = _write_lines(tmp_path / "in.jsonl", [good] * 3 + [line] + [good])
    with pytest.raises(InputError, match=f"in.jsonl:4: .*{re.escape(message)}"):
        data_process.main(_args(tmp_path, tokenizer_dirs["chatml"], data), progress=False)


def test_a_text_that_merely_contains_key_names_is_not_refused(tmp_path, tokenizer_dirs):
    text = 'quoting JSON: {"role": "x", "content": "y", "messages": []}'
    line = json.dumps({"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": text}]})
    data = _write_lines(tmp_path / "in.jsonl", [line.encode()])
    result = data_process.main(_args(tmp_path, tokenizer_dirs["chatml"], data), progress=False)
    assert result.manifest.counts.samples == 1


def test_an_empty_input_file_says_it_is_empty(tmp_path, tokenizer_dirs):
    data = tmp_path / "in.jsonl"
    for content in (b"", b"\n\n  \n"):
        data.write_bytes(content)
        with pytest.raises(InputError, match=f"{data}: the file is empty"):
            data_process.main(_args(tmp_path, tokenizer_dirs["chatml"], data), progress=False)


def test_a_directory_given_as_data_path_says_so(tmp_path, tokenizer_dirs):
    (tmp_path / "chats").mkdir()
    with pytest.raises(FileNotFoundError, match="data_path = .*chats.*is a directory; give a messages-format JSONL"):
        data_process.main(_args(tmp_path, tokenizer_dirs["chatml"], tmp_path / "chats"), progress=False)


def test_an_input_inside_the_output_directory_is_refused_and_kept(tmp_path, tokenizer_dirs):
    (tmp_path / "ds").mkdir()
    raw = _write_lines(tmp_path / "ds" / "my_raw.jsonl", [json.dumps(GOOD).encode()] * 3)
    for output in ("ds", "ds/.."):
        with pytest.raises(ValueError, match="data_path = .*my_raw.jsonl.*lies inside data_output_path"):
            data_process.main(_args(tmp_path, tokenizer_dirs["chatml"], raw,
                                    data_output_path=str(tmp_path / output)), progress=False)
    proc = _run_cli("--data-path", raw, "--data-output-path", tmp_path / "ds", "--model-path",
                    tokenizer_dirs["chatml"], "--max-seq-len", 512)
    assert proc.returncode == 2 and "lies inside data_output_path" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(os.listdir(tmp_path / "ds")) == ["my_raw.jsonl"] and len(raw.read_bytes().splitlines()) == 3


def test_a_line_far_longer_than_max_seq_len_is_dropped_unread(tmp_path, tokenizer_dirs, monkeypatch):
    from instructpack.data.chat import ChatRenderer

    rendered = []
    real = ChatRenderer.render_with_spans
    monkeypatch.setattr(ChatRenderer, "render_with_spans", lambda self, c: rendered.append(c) or real(self, c))
    huge = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ka lo " * 1_000_000}]}
    data = _write_lines(tmp_path / "in.jsonl", [json.dumps(GOOD).encode(), json.dumps(huge).encode()])
    result = data_process.main(_args(tmp_path, tokenizer_dirs["chatml"], data, num_cpu_procs=1), progress=False)
    assert result.manifest.counts.samples == 1 and result.manifest.counts.dropped["too_long"] == 1
    assert max(len(m.content) for c in rendered for m in c.messages) < 100  # never rendered nor tokenized


# --- chat templates: a broken template is the template's error, named with its line --------------------------

def _with_template(tmp_path, tokenizer_dirs, template: str):
    path = tmp_path / "broken.jinja"
    path.write_text(template)
    data = _write_lines(tmp_path / "in.jsonl", [json.dumps(GOOD).encode()] * 5)
    return _args(tmp_path, tokenizer_dirs["chatml"], data, chat_tmpl_path=str(path)), path


@pytest.mark.parametrize("template, line, problem", [
    ("{% for m in messages %}\n{{ m.role }\n{% endfor %}", 2, "unexpected '}'"),  # a syntax error
    ("{% for m in messages %}\n{{ m.role }}\n{{ m.content.strip(1, 2, 3) }}\n{% endfor %}", 3, "strip"),  # a bug
])
def test_a_broken_template_is_named_with_its_line_before_any_data(tmp_path, tokenizer_dirs, template, line,
                                                                    problem):
    from instructpack import ChatTemplateError

    args, path = _with_template(tmp_path, tokenizer_dirs, template)
    for skip in (False, True):
        with pytest.raises(ChatTemplateError, match=rf"chat template failed: .*{problem}.* \(at line {line} of "
                                                    rf"{path}\); it fails on a plain exchange"):
            data_process.main(msgspec.structs.replace(args, skip_invalid_lines=skip), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["broken.jinja", "in.jsonl"]


def test_a_template_that_rejects_every_line_is_the_templates_error(tmp_path, tokenizer_dirs):
    from instructpack import ChatTemplateError

    # Passes the plain exchange, fails on anything longer: here, every line of the data.
    template = ("{% if messages | length > 2 %}{{ raise_exception('only one exchange') }}{% endif %}"
                "{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>{% endfor %}")
    args, path = _with_template(tmp_path, tokenizer_dirs, template)
    long = {"messages": GOOD["messages"] * 2}
    args = msgspec.structs.replace(args, skip_invalid_lines=True)
    _write_lines(tmp_path / "in.jsonl", [json.dumps(long).encode()] * 5)
    with pytest.raises(ChatTemplateError, match=rf"{path} rejected every line of .*in.jsonl \(5 lines; the first: "
                                                r".*in.jsonl:1: chat template failed: only one exchange \(at line 1 "):
        data_process.main(args, progress=False)


# --- the command line ends quietly ------------------------------------------------------------------------------

def test_the_command_line_ends_quietly_on_a_closed_pipe(tmp_path, tokenizer_dirs):
    data = _write_lines(tmp_path / "in.jsonl", [json.dumps(GOOD).encode()] * 10)
    code = "import sys; from instructpack.cli import preprocess_main; sys.exit(preprocess_main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, "--data-path", str(data), "--data-output-path",
                             str(tmp_path / "out"), "--model-path", str(tokenizer_dirs["chatml"]), "--max-seq-len",
                             "512", "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # `instructpack-preprocess ... | head -0`: nobody reads the summary
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141 and b"Traceback" not in err and b"BrokenPipe" not in err


def test_the_command_line_ignores_a_ctrl_c_once_its_work_is_done(tmp_path, tokenizer_dirs):
    """After the dataset is complete, a Ctrl-C has nothing left to stop: the command ignores
    it rather than printing "Exception ignored" from the interpreter's exit."""
    data = _write_lines(tmp_path / "in.jsonl", [json.dumps(GOOD).encode()] * 10)
    code = ("import signal, sys; from instructpack.cli import preprocess_main\n"
            "assert signal.getsignal(signal.SIGINT) is signal.default_int_handler\n"
            "code = preprocess_main(sys.argv[1:])\n"
            "print('IGNORED' if signal.getsignal(signal.SIGINT) is signal.SIG_IGN else 'HANDLED', code)")
    out = subprocess.run([sys.executable, "-c", code, "--data-path", str(data), "--data-output-path",
                          str(tmp_path / "out"), "--model-path", str(tokenizer_dirs["chatml"]), "--max-seq-len",
                          "512", "--no-progress"], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "IGNORED 0", out.stdout + out.stderr
    assert (tmp_path / "out" / "manifest.json").is_file()


def test_the_command_line_ends_quietly_on_ctrl_c(tmp_path, tokenizer_dirs):
    """Ctrl-C while shards are written: exit 130, one word, nothing left behind. On a busy
    machine the signal can land only after the dataset is complete; that run must end
    quietly too (exit 0, a whole dataset), and the interruption is tried again."""
    import signal
    import time

    from instructpack.demo.example import generate_conversations, write_jsonl

    data = write_jsonl(tmp_path / "in.jsonl", generate_conversations(40_000, seed=0))
    for attempt in range(3):
        out_dir = tmp_path / f"out-{attempt}"
        proc = subprocess.Popen([sys.executable, "-m", "instructpack.cli", "preprocess", "--data-path", str(data),
                                 "--data-output-path", str(out_dir), "--model-path", str(tokenizer_dirs["chatml"]),
                                 "--max-seq-len", "4096", "--num-cpu-procs", "2", "--no-progress"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while not list(out_dir.glob(".instructpack-writing-*")) and time.monotonic() < deadline:
            time.sleep(0.05)  # until it is writing shards
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        if proc.returncode == 0:  # finished before the signal landed
            assert (out_dir / "manifest.json").is_file(), err.decode()[-2000:]
            assert b"Traceback" not in err and b"Exception ignored" not in err, err.decode()[-2000:]
            continue
        assert proc.returncode == 130, err.decode()[-2000:]
        assert b"Traceback" not in err and err.decode().strip().endswith("interrupted")
        left = sorted(p.name for p in out_dir.iterdir()) if out_dir.exists() else []
        assert not left  # what it had written is gone with it
        return
    pytest.fail("three preprocessings all finished before Ctrl-C reached them")


def test_two_preprocessings_into_one_directory_run_one_after_the_other(tmp_path, tokenizer_dirs):
    """Another node, another run: the second waits for the first, then reuses its dataset;
    nothing ever reads a half-written one."""
    from instructpack.demo.example import generate_conversations, write_jsonl

    data = write_jsonl(tmp_path / "in.jsonl", generate_conversations(6000, seed=2))
    command = [sys.executable, "-m", "instructpack.cli", "preprocess", "--data-path", str(data), "--data-output-path",
               str(tmp_path / "out"), "--model-path", str(tokenizer_dirs["chatml"]), "--max-seq-len", "4096",
               "--num-cpu-procs", "1", "--no-progress"]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    assert [code for _, _, code in results] == [0, 0], results
    said = sorted(out.split()[0] for out, _, _ in results)
    assert said == ["reused", "wrote"]
    second = next(i for i, (out, _, _) in enumerate(results) if out.startswith("reused"))
    waited = results[second][1]  # its stderr names the first (pid, host, start time) while it waits
    assert "waiting for preprocessing of" in waited and f"pid {procs[1 - second].pid}" in waited
    dataset = load_dataset(tmp_path / "out", verify=True)
    assert len(dataset) == 6000 - dataset.manifest.counts.dropped["too_long"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        ["manifest.json", *(s.file for s in dataset.manifest.shards)])  # one dataset, nothing else left
