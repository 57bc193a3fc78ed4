"""Forward + backward time of the Seesaw and ECM losses against plain cross-entropy.

Seesaw gets class logits (N, C) + objectness logits (N, 2) and runs in training mode (its count
update included); ECM and CE get logits (N, C + 1). Labels are random, ~25% foreground. All
cases run in this one process, interleaved repeat by repeat, after a warm-up; the table gives
the median time and its ratio to CE.

    python -m benchmarks.loss_speed [--device cuda] [--sizes 1024 4096 8192] [--repeats 20]
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from tabulate import tabulate

from seesaw_ecm.losses import ECMLoss, SeesawLoss


def make_cases(n, num_classes, device):
    """name -> a closure running one forward + backward on fresh-grad inputs of N RoIs."""
    g = torch.Generator(device="cpu").manual_seed(n)
    fg = torch.rand(n, generator=g) < 0.25
    labels = torch.where(fg, torch.randint(num_classes, (n,), generator=g), num_classes)
    labels = labels.to(device)
    logits = torch.randn(n, num_classes + 1, generator=g).to(device).requires_grad_()
    class_logits = torch.randn(n, num_classes, generator=g).to(device).requires_grad_()
    objectness = torch.randn(n, 2, generator=g).to(device).requires_grad_()
    counts = (1e5 / torch.arange(1, num_classes + 1, dtype=torch.float64)).floor()  # long tail
    seesaw = SeesawLoss(num_classes).to(device).train()
    seesaw.cum_samples.copy_(counts)
    ecm = ECMLoss(counts).to(device)

    def ce():
        F.cross_entropy(logits, labels).backward()

    def seesaw_case():
        sum(seesaw(class_logits, objectness, labels).values()).backward()

    def ecm_case():
        ecm(logits, labels)["loss_cls"].backward()

    return {"CE": ce, "Seesaw": seesaw_case, "ECM": ecm_case}, (logits, class_logits, objectness)


def measure(cases, inputs, device, warmup, repeats):
    """Median milliseconds per case; cases alternate within each repeat."""
    times = {name: [] for name in cases}
    for step in range(warmup + repeats):
        for name, fn in cases.items():
            for x in inputs:
                x.grad = None
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step >= warmup:
                times[name].append(1e3 * (time.perf_counter() - start))
    return {name: statistics.median(t) for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--num-classes", type=int, default=1203)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    device = torch.device(args.device)

    name = (torch.cuda.get_device_name() if device.type == "cuda"
            else f"cpu, {torch.get_num_threads()} threads")
    print(f"torch {torch.__version__}, {name}, C = {args.num_classes}, median of {args.repeats}")
    rows = []
    for n in args.sizes:
        cases, inputs = make_cases(n, args.num_classes, device)
        ms = measure(cases, inputs, device, args.warmup, args.repeats)
        rows.append([n, ms["CE"], ms["Seesaw"], ms["Seesaw"] / ms["CE"], ms["ECM"],
                     ms["ECM"] / ms["CE"]])
    print(tabulate(rows, headers=["N", "CE ms", "Seesaw ms", "x CE", "ECM ms", "x CE"],
                   floatfmt=".2f"))


if __name__ == "__main__":
    main()
