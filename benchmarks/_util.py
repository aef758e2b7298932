"""Helpers shared by the benchmarks: cache paths, measurements in fresh subprocesses,
peak memory, number formatting."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUTPUT = REPO / "bench-output"  # git-ignored cache of generated inputs and outputs
_RESULT = "BENCH-RESULT "


def cache_key(params: dict, *sources: Path) -> str:
    """A short hash of the parameters and of the code that generates from them, so a
    cached input is regenerated when either changes."""
    h = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    for source in sources:
        h.update(Path(source).read_bytes())
    return h.hexdigest()[:10]


def run_child(target: str, payload: dict, env: dict | None = None) -> dict:
    """Calls `module:function(payload)` in a fresh Python process and returns its dict.

    A fresh process per measurement keeps runs independent: no imports, allocator state
    or Rust thread pool from one run (or from this process, which trained the tokenizer)
    carries into the next, and its peak RSS is its own."""
    module, function = target.split(":")
    code = (f"import json, sys\nfrom {module} import {function} as f\n"
            f"print({_RESULT!r} + json.dumps(f(json.loads(sys.argv[1]))), flush=True)")
    env = dict(os.environ, **(env or {}))
    # Both sides run with the library defaults (the floor uses the Rust thread pool).
    env.pop("TOKENIZERS_PARALLELISM", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(payload)], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, text=True)
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith(_RESULT):
            result = json.loads(line[len(_RESULT):])
        else:
            print(line, file=sys.stderr)  # whatever else the child printed stays visible
    if proc.returncode != 0 or result is None:
        raise RuntimeError(f"benchmark subprocess {target} failed (exit code {proc.returncode})")
    return result


def peak_rss_mib() -> dict:
    """Peak resident memory of this process and of its largest waited-for child, in MiB.
    (Forked children count the pages they share with the parent: the sum is an upper bound.)"""
    per_mib = (1 << 20) if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    main = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / per_mib
    try:
        # Linux carries ru_maxrss across exec: a fresh subprocess would report its parent's
        # peak if larger. VmHWM is the peak of this process's own address space.
        with open("/proc/self/status") as f:
            main = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        pass
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / per_mib
    return {"rss_main_mib": round(main, 1), "rss_child_mib": round(child, 1)}


def median(values) -> float:
    return statistics.median(values)


def fmt(x: float, digits: int = 0) -> str:
    return f"{x:,.{digits}f}"


def llama_config(*, layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int,
                 max_positions: int, **extra):
    """The benchmarks' model: a Llama of this shape built from its config, output layer untied
    (as in most models of this size and up, so the output layer's cost is counted)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=max_positions, tie_word_embeddings=False, **extra)
