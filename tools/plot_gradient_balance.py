"""Plot the positive/negative gradient ratio per class, sorted by training frequency, for one
or more runs trained with MODEL.LONG_TAIL.GRADIENT_BALANCE.ENABLED True.

    python -m tools.plot_gradient_balance output/ce output/seesaw --labels CE Seesaw \\
        --output gradient_balance.png

Each RUN is a run folder (its gradient_balance.json), a gradient_balance.json or a checkpoint,
as seesaw_ecm.gradient_balance's training hook saves them.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

from seesaw_ecm.errors import SeesawEcmError
from seesaw_ecm.fileio import write_figure
from seesaw_ecm.gradient_balance import CHECKPOINT_KEY, JSON_NAME


def load_run(path):
    """A saved gradient balance as a dict like GradientBalanceHook.to_json().

    `path`: a gradient_balance.json, a run folder holding one, or a checkpoint (.pth) with the
    "gradient_balance" entry (then class counts are those the hook stored, if any)."""
    if os.path.isdir(path):
        path = os.path.join(path, JSON_NAME)
    if not os.path.isfile(path):
        raise SeesawEcmError(
            f"{path}: no such file. Give a {JSON_NAME}, a run folder with one (training with "
            "MODEL.LONG_TAIL.GRADIENT_BALANCE.ENABLED True writes it) or a checkpoint.")
    if path.endswith(".json"):
        with open(path) as f:
            return json.load(f)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if CHECKPOINT_KEY not in ckpt:
        raise SeesawEcmError(
            f"{path} holds no '{CHECKPOINT_KEY}' entry: it was not trained with "
            "MODEL.LONG_TAIL.GRADIENT_BALANCE.ENABLED True.")
    state = ckpt[CHECKPOINT_KEY]
    num_stages, num_classes = state["positive"].shape
    run = {k: state[k].tolist() for k in ("positive", "negative", "samples")}
    run.update(iterations=int(state["iterations"]), num_classes=num_classes,
               num_stages=num_stages, class_names=[str(i) for i in range(num_classes)])
    meta = os.path.join(os.path.dirname(path), JSON_NAME)  # class counts of the same run
    if os.path.isfile(meta):
        with open(meta) as f:
            saved = json.load(f)
        run.update({k: saved[k] for k in ("class_names", "class_counts", "class_frequency")})
    return run


def plot_ratios(runs, out_png, labels=None, stages=None):
    """Positive/negative ratio per class, classes sorted by training count (most frequent
    left), one series per run (and per stage for cascades), log y; written to `out_png`.

    Args:
        runs: dicts as :func:`load_run` returns.
        labels: one name per run (default "run 0", ...).
        stages: stage indices to draw (default: every stage).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or [f"run {i}" for i in range(len(runs))]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for run, label in zip(runs, labels):
        pos, neg = np.asarray(run["positive"]), np.asarray(run["negative"])
        counts = np.asarray(run.get("class_counts") or np.zeros(pos.shape[1]))
        order = np.argsort(-counts, kind="stable")
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(neg > 0, pos / neg, np.nan)
        for stage in stages if stages is not None else range(len(pos)):
            name = label if len(pos) == 1 else f"{label} stage {stage}"
            ax.plot(np.arange(len(order)), ratio[stage, order], marker=".", lw=1, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("class, sorted by training instance count (most frequent left)")
    ax.set_ylabel("accumulated |positive| / |negative| gradient")
    ax.set_title("Gradient balance of the classifier logits")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    write_figure(fig, out_png)
    return out_png


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
