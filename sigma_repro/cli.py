"""``sigma-repro <command>``: everything that is not a training run.

Commands: ``demo`` (plain vs σReparam on embedded digits), ``bench`` (performance measurements),
``analysis`` (the papers' analytical results), ``table`` (finished runs -> a paper table),
``compare`` (curves of chosen runs on shared axes), ``data`` (build a family's derived data into the cache),
``translate`` (decode text with a trained translation run).
Training and sweeps go through the Hydra app ``sigma-repro-train``.
"""

from __future__ import annotations

import argparse
import sys

from sigma_repro import analysis, bench, compare, demo, results, translate
from sigma_repro.data import commands as data
from sigma_repro.errors import ConfigError

COMMANDS = {"demo": demo, "bench": bench, "analysis": analysis, "table": results, "compare": compare, "data": data,
            "translate": translate}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sigma-repro", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        module.add_arguments(sub.add_parser(name, help=module.__doc__.strip().splitlines()[0]))
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command].run(args)
    except ConfigError as err:
        print(f"sigma-repro {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
