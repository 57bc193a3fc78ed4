"""Export a trained model into a model-zoo folder: weights alone (.pth + .safetensors, named
with their sha256), the resolved config, a metrics JSON and a row of docs/MODEL_ZOO.md;
optionally TorchScript. The export checks itself (predictions equal the training checkpoint's)
and changes nothing when a check fails; re-running it gives the same files and table row.

    python -m tools.export_model --name seesaw_R18_synthetic \\
        --output-dir output/synthetic/mask_rcnn_R18_FPN_seesaw
    python -m tools.export_model --name NAME --config-file cfg.yaml --weights model.pth --evaluate
    python -m tools.export_model --name NAME --output-dir ... --torchscript --zoo-dir /shared/zoo \\
        --table /shared/zoo/MODEL_ZOO.md [KEY VALUE ...config overrides]

See seesaw_ecm/model_zoo.py for the files and the loading API, seesaw_ecm/export.py for the export.
"""
import argparse
import json
import sys

from detectron2.utils.logger import setup_logger

from seesaw_ecm.errors import SeesawEcmError
from seesaw_ecm.export import DEFAULT_TABLE, export_model


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--name", required=True, help="model name (letters, digits, '.', '-', "
                        "'_')")
    parser.add_argument("--output-dir", help="train_net.py OUTPUT_DIR of the run to export "
                        "(its config.yaml, last checkpoint and metrics.json)")
    parser.add_argument("--config-file", help="config (default: OUTPUT_DIR/config.yaml)")
    parser.add_argument("--weights", help="checkpoint (default: OUTPUT_DIR's last checkpoint)")
    parser.add_argument("--zoo-dir", default="output/model_zoo", help="model-zoo folder "
                        "(default: %(default)s)")
    parser.add_argument("--table", default=DEFAULT_TABLE, help="Markdown table to add the "
                        "model's row to (default: %(default)s)")
    parser.add_argument("--evaluate", action="store_true", help="evaluate on DATASETS.TEST "
                        "instead of reading the run's metrics.json")
    parser.add_argument("--images", nargs="+", help="images for the parity check (default: the "
                        "first of DATASETS.TEST)")
    parser.add_argument("--num-images", type=int, default=3,
                        help="images of DATASETS.TEST for the checks (default: %(default)s)")
    parser.add_argument("--torchscript", action="store_true", help="also export TorchScript")
    parser.add_argument("--device", default="cpu", help="device of the checks and the trace")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = parser.parse_args(argv)

    setup_logger(name="seesaw_ecm")
    try:
        info = export_model(
            args.name, args.zoo_dir, output_dir=args.output_dir, config_file=args.config_file,
            weights=args.weights, opts=args.opts, table=args.table, evaluate=args.evaluate,
            images=args.images, num_images=args.num_images, torchscript=args.torchscript,
            device=args.device,
        )
    except SeesawEcmError as e:
        print(f"ERROR: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(json.dumps({k: info[k] for k in ("name", "files", "metrics", "schedule")}, indent=1))


if __name__ == "__main__":
    main()
