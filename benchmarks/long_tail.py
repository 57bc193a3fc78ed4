"""Long-tail benchmark: train each selected loss and architecture with the same schedule and
seed(s), or collect finished runs, or pool earlier reports; write one JSON, print one table
(box / mask AP, AP50, APr, APc, APf, s/iter; mean ± std over seeds) and plot per-class AP
against training count.

    python -m benchmarks.long_tail --losses ce seesaw ecm --archs mask_rcnn --seeds 1 2 3 \\
        --output-dir output/benchmark [--opts SOLVER.MAX_ITER 600]
    python -m benchmarks.long_tail --dataset mine=/d/train.json:/d/img --dataset \\
        mine_val=/d/val.json:/d/img --train mine --test mine_val \\
        --opts MODEL.ROI_HEADS.NUM_CLASSES 37
    python -m benchmarks.long_tail --collect output/synthetic/* --output-dir output/benchmark
    python -m benchmarks.long_tail --pool vm1/long_tail_benchmark.json \\
        vm2/long_tail_benchmark.json --baseline ce --output-dir output/pooled
    python -m benchmarks.long_tail --config-dir configs/Demo --losses ce seesaw ecm \\
        --seeds 1 2 3 --baseline ce --output-dir output/demo_3seeds    # the main job's proof
    python -m benchmarks.long_tail --collect output/demo_3seeds/cascade_*/seed* --baseline ce \\
        --bootstrap 100 --output-dir output/demo_noise    # how much of the spread is the test set

Decoupled methods (bags, loce) also train their control, CE given the same second stage
(run folder <arch>_ce_ft_<method>; --no-controls skips it), and the table shows each method's
change against CE and against that control, side by side.

A thin command line over benchmarks.harness (docs/BENCHMARKS.md); run from the repository
root.
"""
import argparse
import logging
import os
import sys

from seesaw_ecm.errors import SeesawEcmError

from benchmarks import harness


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--losses", nargs="+", default=list(harness.LOSSES),
                        choices=harness.LOSSES)
    parser.add_argument("--archs", nargs="+", default=["mask_rcnn"], choices=harness.ARCHS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--dataset", action="append", default=[], metavar="NAME=JSON:ROOT",
                        help="LVIS-format dataset, passed to train_net.py --dataset (repeatable)")
    parser.add_argument("--train", nargs="+", default=[], metavar="NAME",
                        help="DATASETS.TRAIN (default: the configs' synthetic_lt_train)")
    parser.add_argument("--test", nargs="+", default=[], metavar="NAME",
                        help="DATASETS.TEST (default: synthetic_lt_val)")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides for every run, KEY VALUE ... (last option)")
    parser.add_argument("--config-dir", default=harness.CONFIG_DIR,
                        help="where <arch>_R18_FPN_<loss>.yaml are (configs/Demo: the main job)")
    parser.add_argument("--baseline", metavar="LOSS",
                        help="also show every metric's change against this loss (e.g. ce), "
                             "paired by seed, with how many seed standard deviations it is")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs trained side by side (CPU: each with cores / jobs threads)")
    parser.add_argument("--num-gpus", type=int, default=1)
    parser.add_argument("--force", action="store_true", help="retrain finished runs")
    parser.add_argument("--no-controls", action="store_true",
                        help="skip the controls of the decoupled methods (bags, loce): their "
                             "first-stage loss (ce) given the same second stage, run by default "
                             "and reported beside each method's change")
    parser.add_argument("--collect", nargs="+", metavar="RUN_DIR",
                        help="aggregate these finished train_net.py output folders; no training")
    parser.add_argument("--pool", nargs="+", metavar="REPORT_JSON",
                        help="aggregate the runs of these earlier long_tail_benchmark.json files "
                             "(the same configs run on other machines: each report's seeds "
                             "count as seeds of their own); no training")
    parser.add_argument("--no-per-class", action="store_true",
                        help="skip the per-class AP (an LVIS evaluation per run) and its plot")
    parser.add_argument("--bootstrap", type=int, default=0, metavar="N",
                        help="evaluation noise: also evaluate every run on N test sets drawn "
                             "from its own with replacement (the same draws for every run) and "
                             "show, beside each change's seed std, the std the test set's size "
                             "alone gives it (with --baseline; e.g. 100)")
    parser.add_argument("--output-dir", default="output/benchmark")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("lvis").setLevel(logging.ERROR)  # "Assuming user provided the results..."
    try:
        if args.bootstrap and args.no_per_class:  # refused before any training
            raise SeesawEcmError("--bootstrap needs the per-class evaluation; drop "
                                 "--no-per-class.")
        if args.pool:
            runs = harness.pool_reports(args.pool)
        else:
            folders = args.collect or harness.train_all(
                args.losses, args.archs, args.seeds, args.output_dir, force=args.force,
                datasets=args.dataset, train=args.train, test=args.test, opts=args.opts,
                num_gpus=args.num_gpus, config_dir=args.config_dir, jobs=args.jobs,
                controls=not args.no_controls)
            runs = [harness.read_run(f, per_class=not args.no_per_class,
                                     bootstrap=args.bootstrap) for f in folders]
        groups, table = harness.write_report(runs, args.output_dir, command=sys.argv,
                                             baseline=args.baseline)
    except SeesawEcmError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    print(table)
    print(f"Wrote {os.path.join(args.output_dir, 'long_tail_benchmark.json')}"
          + (" and long_tail_per_class_ap.png" if any(g.get("per_class_ap") for g in groups)
             else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
