"""`python -m benchmarks <name> [options]`: one subcommand per benchmark."""

from __future__ import annotations

import argparse

from . import gpu, load, loss, pack, preprocess, resume, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    preprocess.add_parser(sub)
    pack.add_parser(sub)
    load.add_parser(sub)
    loss.add_parser(sub)
    train.add_parser(sub)
    resume.add_parser(sub)
    gpu.add_parser(sub)
    ns = parser.parse_args(argv)
    return ns.run(ns)


if __name__ == "__main__":
    raise SystemExit(main())
