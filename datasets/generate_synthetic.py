#!/usr/bin/env python
"""Generate the built-in long-tailed synthetic dataset (LVIS v1 format); see datasets/README.md.

    python datasets/generate_synthetic.py                      # defaults, into the registered place
    python datasets/generate_synthetic.py --out /tmp/synth --seed 1 --force

The dataset registered as synthetic_lt_train / synthetic_lt_val is generated on first use at
$DETECTRON2_DATASETS/synthetic_lt with the default settings; this entry builds it ahead of time
or with other settings.
"""
import argparse
import json
import time

from seesaw_ecm.data.datasets import synthetic_root
from seesaw_ecm.data.synthetic_lt import DEFAULTS, RARE_SHARE, RARE_TARGETS, generate


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out",
        default=synthetic_root(),
        help="output folder (default: $DETECTRON2_DATASETS/synthetic_lt, or datasets/synthetic_lt)",
    )
    parser.add_argument("--num-classes", type=int, default=DEFAULTS["num_classes"])
    parser.add_argument("--train-images", type=int, default=DEFAULTS["train_images"])
    parser.add_argument("--val-images", type=int, default=DEFAULTS["val_images"])
    parser.add_argument("--image-size", type=int, default=DEFAULTS["image_size"], help="side, px")
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    parser.add_argument("--rare-share", type=float, default=RARE_SHARE,
                        help="share of the classes that are rare (default 0.2)")
    parser.add_argument("--rare-images", type=int, nargs=2, default=RARE_TARGETS,
                        metavar=("FIRST", "LAST"),
                        help="training images of the first and last rare class (default 10 1)")
    parser.add_argument("--force", action="store_true", help="regenerate even if up to date")
    args = parser.parse_args()

    start = time.perf_counter()
    paths = generate(
        args.out,
        num_classes=args.num_classes,
        train_images=args.train_images,
        val_images=args.val_images,
        image_size=args.image_size,
        seed=args.seed,
        force=args.force,
        rare_share=args.rare_share,
        rare_images=tuple(args.rare_images),
    )
    print(json.dumps(paths, indent=2))
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
