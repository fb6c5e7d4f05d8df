"""python -m slerpviz.bench speed|fidelity|frontier|retrieval|locate|groups|patch [--model NAME | --shape ...] [...]

The one command module. Each benchmark's module holds its run, its parser and its main (speed, fidelity, frontier,
retrieval, locate, groups, patch), on the options they share (.options); this module only assembles them as the
subcommands of `python -m slerpviz.bench`, beside `snapshot` (a report as a picture), and dispatches to the one
asked for.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..settings import Parser
from . import fidelity, frontier, groups, locate, patched, report, retrieval, speed
from .machine import commit_at_start
from .options import DESCRIPTION, PROG

# The benchmarks, in the order --help lists them: each module's parser(add_parser) and main(argv, args).
BENCHMARKS = (speed, fidelity, frontier, retrieval, locate, groups, patched)


def snapshot_parser(add_parser) -> argparse.ArgumentParser:
    p = add_parser("snapshot", help="a report as a picture, through Debian's chromium",
                   description="Draw an HTML report as a PNG picture, through Debian's chromium.")
    p.add_argument("report", type=Path, help="an .html report written by a benchmark")
    p.add_argument("picture", type=Path, help="the .png to write")
    p.set_defaults(run=snapshot_main)
    return p


def snapshot_main(argv: list[str], args: argparse.Namespace) -> int:
    report.write_png(args.report, args.picture)
    return 0


def parser() -> argparse.ArgumentParser:
    """`python -m slerpviz.bench SUBCOMMAND [...]`; `python -m slerpviz.bench SUBCOMMAND --help` lists its options."""
    p = Parser(prog=PROG, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="benchmark", required=True)
    for benchmark in BENCHMARKS:
        benchmark.parser(commands.add_parser).set_defaults(run=benchmark.main)
    snapshot_parser(commands.add_parser)
    return p


def main(argv: list[str] | None = None) -> int:
    commit_at_start()  # the code this run is: read now, before an hour of work
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    return args.run(argv[1:], args)  # the words after the subcommand's name, and what they parsed to
