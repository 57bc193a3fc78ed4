#!/usr/bin/env python
"""Convert an official mmdetection Seesaw / ECM checkpoint into a model-zoo folder of this
project: weights (.pth + .safetensors named by their sha256), the resolved config and a metrics
JSON naming the source file, its sha256 and the published AP. Every checkpoint key is used or
deliberately dropped; a key without a place, or a model key without a source, is an error.

    python -m tools.convert_mmdet \\
        mask_rcnn_r50_fpn_sample1e-3_seesaw_loss_normed_mask_mstrain_2x_lvis_v1-cd0f6a12.pth \\
        --config configs/LVISv1/mmdet/mask_rcnn_r50_fpn_sample1e-3_seesaw_loss_normed_mask_mstrain_2x_lvis_v1.yaml \\
        --output output/model_zoo
    python -m tools.convert_mmdet epoch_12.pth --config configs/LVISv1/mmdet/r50_ecm_1x_lvis_v1.yaml \\
        --output output/model_zoo --name r50_ecm_1x_lvis_v1

The models, their configs and published AP: docs/MODEL_ZOO.md; the mapping:
seesaw_ecm/convert_mmdet.py.
"""  # noqa: E501 (file names)
import argparse
import json
import sys

from detectron2.utils.logger import setup_logger

from seesaw_ecm.convert_mmdet import convert_checkpoint
from seesaw_ecm.errors import SeesawEcmError


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="the mmdetection .pth file (2.x or 3.x)")
    parser.add_argument("--config", required=True, help="this project's config of the model "
                        "(configs/LVISv1/mmdet/)")
    parser.add_argument("--output", required=True, help="model-zoo folder to write into")
    parser.add_argument("--name", help="model name (default: the official name in the file "
                        "name, else its stem); an official name also gives the published AP")
    parser.add_argument("--trust-pickle", action="store_true", help="read the file with "
                        "torch.load(weights_only=False): only for files you trust (mmdetection "
                        "3.x training checkpoints need it)")
    parser.add_argument("opts", nargs="*", help="config overrides: KEY VALUE ...")
    args = parser.parse_intermixed_args(argv)
    setup_logger(name="seesaw_ecm")
    try:
        info = convert_checkpoint(args.checkpoint, args.config, args.output, name=args.name,
                                  opts=args.opts, trust_pickle=args.trust_pickle)
    except SeesawEcmError as e:
        print(f"ERROR: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(json.dumps({k: info[k] for k in ("name", "files", "metrics", "converted_from")},
                     indent=1))


if __name__ == "__main__":
    main()
