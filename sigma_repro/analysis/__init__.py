"""`sigma-repro analysis <name>`: the papers' analytical results, reproduced.

Each analysis is a module with ``add_arguments(parser)`` and ``run(args) -> int`` that writes a
table (Markdown + CSV) and a PNG under ``results/analysis/``, with the command, git sha and
machine (``report.write_report``), and states the paper's claim beside what we measured.
"""

from __future__ import annotations

import argparse

from sigma_repro.analysis import entropy_bound, output_change, rank_collapse, training_collapse

ANALYSES = {"entropy-bound": entropy_bound, "output-change": output_change, "rank-collapse": rank_collapse,
            "training-collapse": training_collapse}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    subparsers = parser.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    for name, module in ANALYSES.items():
        help_line = module.__doc__.strip().splitlines()[0]
        module.add_arguments(subparsers.add_parser(name, help=help_line, description=module.__doc__))


def run(args: argparse.Namespace) -> int:
    return ANALYSES[args.analysis].run(args)
