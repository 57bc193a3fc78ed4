#!/usr/bin/env python
"""Plot the positive/negative gradient ratio per class, sorted by training frequency, for one
or more runs trained with MODEL.LONG_TAIL.GRADIENT_BALANCE.ENABLED True.

    python tools/plot_gradient_balance.py output/ce output/seesaw --labels CE Seesaw \\
        --output gradient_balance.png

Each RUN is a run folder (its gradient_balance.json), a gradient_balance.json or a checkpoint.
A thin wrapper over seesaw_ecm.gradient_balance.
"""
import argparse
import sys

from seesaw_ecm.errors import SeesawEcmError
from seesaw_ecm.gradient_balance import load_run, plot_ratios


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN")
    parser.add_argument("--labels", nargs="+", help="one name per run (default: the paths)")
    parser.add_argument("--stages", type=int, nargs="+",
                        help="cascade stages to draw (default: all)")
    parser.add_argument("--output", default="gradient_balance.png", help="PNG to write")
    args = parser.parse_args(argv)
    if args.labels and len(args.labels) != len(args.runs):
        parser.error("--labels needs one name per run")
    try:
        runs = [load_run(path) for path in args.runs]
        plot_ratios(runs, args.output, labels=args.labels or args.runs, stages=args.stages)
    except SeesawEcmError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    print(f"Wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
