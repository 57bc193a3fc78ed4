"""RoIAlign's backward on CPU: torchvision's kernel against seesaw_ecm/roi_align.py's, timed
alternately in one process on the demo's pooler shapes, with the largest difference.

    python -m benchmarks.roi_align_backward [--rounds 20] [--threads 1]

Cases (batch 4, 64 channels, 96 px images; RoIs of 4-60 px, random): the box pooler (7 x 7,
128 RoIs) and the mask pooler (14 x 14, 32 RoIs) on the stride-4 map (24 x 24), and the box
pooler on the stride-8 map (12 x 12); sampling ratio 0 and aligned, as configs/Demo. Prints
the median ms of each and the ratio (vectorized / torchvision); asserts nothing
(docs/BENCHMARKS.md "Where a CPU iteration's time goes" records the output).
"""
import argparse
import statistics
import time

import torch
from tabulate import tabulate
from torchvision.ops import roi_align

from seesaw_ecm.roi_align import roi_align_backward

# name, feature map side, spatial scale, RoIs, output side
CASES = (("box pooler, stride 4", 24, 0.25, 128, 7),
         ("mask pooler, stride 4", 24, 0.25, 32, 14),
         ("box pooler, stride 8", 12, 0.125, 128, 7))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    print(f"torch threads: {args.threads}; median of {args.rounds} rounds after 3 warm-up")
    rows = []
    for name, side, scale, n, out in CASES:
        x = torch.randn(4, 64, side, side, generator=gen, requires_grad=True)
        xy = torch.rand(n, 2, generator=gen) * 80
        wh = torch.rand(n, 2, generator=gen) * 56 + 4
        rois = torch.cat([torch.randint(0, 4, (n, 1), generator=gen).sort(0).values.float(),
                          xy, (xy + wh).clamp(max=96)], 1)
        grad = torch.randn(n, 64, out, out, generator=gen)
        times = {"torchvision": [], "vectorized": []}
        for i in range(args.rounds + 3):
            x.grad = None
            y = roi_align(x, rois, out, scale, 0, True)
            t0 = time.perf_counter()
            y.backward(grad)
            t1 = time.perf_counter()
            mine = roi_align_backward(grad, rois, x.shape, scale, 0, True)
            t2 = time.perf_counter()
            if i >= 3:
                times["torchvision"].append(t1 - t0)
                times["vectorized"].append(t2 - t1)
        tv, vec = (statistics.median(times[k]) * 1e3 for k in ("torchvision", "vectorized"))
        diff = ((mine - x.grad).abs().max() / x.grad.abs().max()).item()
        rows.append([f"{name}, {n} RoIs, {out}x{out}", tv, vec, vec / tv, diff])
    print(tabulate(rows, headers=["case", "torchvision (ms)", "vectorized (ms)", "ratio",
                                  "largest difference / largest gradient"],
                   tablefmt="github", floatfmt=("", ".2f", ".2f", ".3f", ".1e")))


if __name__ == "__main__":
    main()
