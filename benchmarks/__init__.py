"""The instructpack benchmark suite: `python -m benchmarks <name>`. Generated inputs and
outputs are cached under bench-output/ in the repository root (git-ignored)."""
