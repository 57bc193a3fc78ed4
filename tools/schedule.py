"""Print the epoch schedule of a training json: images per epoch, MAX_ITER and STEPS.

    python -m tools.schedule --json datasets/lvis/lvis_v1_train.json --batch 16 --epochs 24 \\
        --steps 16 22 --sampler none stochastic ceil --threshold 1e-3 [--draw-epochs 5]

The same derivation as the trainer with SOLVER.EPOCHS (seesaw_ecm/epochs.py): images without
annotations are dropped as detectron2's loader drops them; "none" = TrainingSampler, "stochastic"
= detectron2's RepeatFactorTrainingSampler (its epoch size is random: the expectation is used;
--draw-epochs N also draws N epochs of it, seed 0, and prints their sizes), "ceil" =
mmdetection's ClassBalancedDataset (DATALOADER.REPEAT_ROUNDING "ceil").
"""
import argparse
import logging

import torch
from detectron2.data.build import filter_images_with_only_crowd_annotations
from detectron2.data.samplers import RepeatFactorTrainingSampler
from tabulate import tabulate

from seesaw_ecm.data.datasets import load_lvis_format_json
from seesaw_ecm.data.samplers import SAMPLINGS
from seesaw_ecm.epochs import derive_schedule


def stochastic_epoch_sizes(dicts, threshold, n, seed=0):
    """Sizes of the first n epochs of detectron2's RepeatFactorTrainingSampler (seed `seed`),
    drawn as its _infinite_indices draws them (rounding, then the shuffle, per epoch)."""
    factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(dicts, threshold)
    sampler = RepeatFactorTrainingSampler(factors, seed=seed)
    g = torch.Generator()
    g.manual_seed(seed)
    sizes = []
    for _ in range(n):
        # the sampler's private per-epoch draw: the public stream does not expose epoch sizes
        indices = sampler._get_epoch_indices(g)
        torch.randperm(len(indices), generator=g)
        sizes.append(len(indices))
    return sizes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", required=True, help="LVIS-format training annotations")
    parser.add_argument("--sampler", nargs="+", choices=SAMPLINGS, default=list(SAMPLINGS))
    parser.add_argument("--threshold", type=float, default=1e-3, help="repeat threshold t")
    parser.add_argument("--batch", type=int, default=16, help="SOLVER.IMS_PER_BATCH")
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--steps", type=int, nargs="*", default=[16, 22], help="epoch steps")
    parser.add_argument("--draw-epochs", type=int, default=0,
                        help="also draw this many stochastic epochs and print their sizes")
    args = parser.parse_args(argv)
    logging.getLogger("seesaw_ecm").setLevel(logging.WARNING)

    records = load_lvis_format_json(args.json, "")
    dicts = filter_images_with_only_crowd_annotations(records)
    print(f"{args.json}: {len(records):,} images, {len(dicts):,} with annotations; "
          f"threshold {args.threshold:g}, batch {args.batch}, {args.epochs} epochs, "
          f"steps at epochs {tuple(args.steps)}")
    rows = []
    for sampling in args.sampler:
        s = derive_schedule(dicts, sampling=sampling, threshold=args.threshold,
                            ims_per_batch=args.batch, epochs=args.epochs,
                            epoch_steps=args.steps)
        rows.append([sampling, f"{s.images:,.1f}", f"{s.iters_per_epoch:,}", f"{s.max_iter:,}",
                     f"{s.max_iter * args.batch:,}", str(s.steps)])
    print(tabulate(rows, headers=["sampler", "images/epoch", "iters/epoch", "MAX_ITER",
                                  "images seen", "STEPS"], disable_numparse=True,
                   colalign=("left", "right", "right", "right", "right", "left")))
    if args.draw_epochs:
        sizes = stochastic_epoch_sizes(dicts, args.threshold, args.draw_epochs)
        print(f"stochastic epochs drawn (seed 0): {', '.join(f'{n:,}' for n in sizes)}")


if __name__ == "__main__":
    main()
