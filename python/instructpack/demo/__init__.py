"""The built-in example: `python -m instructpack.demo` (run.py) builds a tiny tokenizer and
model and generated chat data (example.py, also used by the tests and the benchmarks, so
nothing is ever downloaded) and trains on them with 2 CPU processes."""
