"""Forward + backward time of every classification loss against plain cross-entropy.

Each loss of ``seesaw_ecm.losses`` gets the logits of its layout (C + 1 columns, C for EQL and
DropLoss, C + 1 + G for BaGS, C class + 2 objectness logits for Seesaw) and runs in training
mode (the statistics updates of their forward included: Seesaw's counts, EQLv2's gradient
sums); LOCE's mean-score update, which its ROI heads call apart, is a row of its own. Class
statistics are a long tail (class k seen 1e5 / (k + 1) times, in as many of 1e5 images);
labels are random, ~25% foreground. The baseline "F.cross_entropy" is
``torch.nn.functional.cross_entropy`` on the (N, C + 1) logits. All cases run in this one
process, interleaved repeat by repeat, after a warm-up; the table gives each case's median time
and its ratio to the baseline's median.

On the CPU, Seesaw computes its class term on the selected foreground rows (on an accelerator,
on every row: selecting would wait for the device). The last row, F.softplus of the (N, C + 1)
logits summed, forward + backward (one softplus pass and one softplus_backward pass), is the
least any sigmoid loss (ECM, EQL, DropLoss, EQLv2) must compute: its value is a weighted sum
of softplus over every entry, its gradient a weighted sigmoid of every entry. The row
``torch.rand(N, C)`` is the uniform draw per entry that DropLoss and GOL make at every call, as
the official ``rand_like`` (their reference tests replay it from the seed): part of their cost.

On the CPU with one thread the time is the thread's CPU time (``time.thread_time``: other
processes on the machine do not add to it; wall time with several threads), and glibc's
malloc keeps freed memory instead of returning each large buffer to the kernel (``mallopt``;
``--system-malloc`` keeps the defaults): with the defaults every (N, C) tensor is a fresh
``mmap`` whose page faults cost more than the arithmetic, by an amount that depends on the case
run before (F.cross_entropy at N = 4,096: 7.8 ms alone, 32 ms interleaved with ECM).

    python -m benchmarks.loss_speed [--device cuda] [--sizes 1024 4096 8192] [--repeats 20]
"""
import argparse
import ctypes
import ctypes.util
import statistics
import time

import torch
import torch.nn.functional as F
from tabulate import tabulate

from seesaw_ecm.losses import (BalancedGroupSoftmax, CrossEntropyLoss, DropLoss, ECMLoss,
                               EQLLoss, EQLv2Loss, EquilibriumLoss, FederatedLoss, GumbelLoss,
                               SeesawLoss)

BASELINE = "F.cross_entropy"


def keep_freed_memory():
    """glibc: serve large tensors from the heap and do not trim it (no page faults per
    allocation). Returns whether it applied (False off glibc)."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30)
                and libc.mallopt(m_trim_threshold, 1 << 31))


def make_losses(num_classes):
    """name -> loss module in training mode, built on long-tailed statistics."""
    counts = (1e5 / torch.arange(1, num_classes + 1, dtype=torch.float64)).floor()
    frequency = counts / 1e5  # images with the class / images
    ecm32 = ECMLoss(counts, weight_dtype="float32")
    losses = {
        "CrossEntropyLoss (ce, cosine_ce)": CrossEntropyLoss(num_classes),
        "ce + objectness": SeesawLoss(num_classes, p=0.0, q=0.0),
        "Seesaw": SeesawLoss(num_classes),
        "ECM": ECMLoss(counts),
        "ECM (float32 weights)": ecm32,
        "Federated": FederatedLoss(counts),
        "EQL": EQLLoss(frequency),
        "DropLoss": DropLoss(frequency),
        "GOL": GumbelLoss(frequency),
        "EQLv2": EQLv2Loss(num_classes),
        "BaGS": BalancedGroupSoftmax(counts),
        "LOCE (equilibrium)": EquilibriumLoss(num_classes),
    }
    for name in ("ce + objectness", "Seesaw"):
        losses[name].cum_samples.copy_(counts)
    return {name: loss.train() for name, loss in losses.items()}


def make_cases(n, num_classes, device):
    """name -> a closure running one forward + backward (fresh gradients), and the inputs."""
    g = torch.Generator(device="cpu").manual_seed(n)
    fg = torch.rand(n, generator=g) < 0.25
    labels = torch.where(fg, torch.randint(num_classes, (n,), generator=g), num_classes)
    instance = torch.where(fg, torch.randint(n // 8, (n,), generator=g), -1)  # LOCE's entries
    labels, instance = labels.to(device), instance.to(device)
    widths = {num_classes, num_classes + 1, num_classes + 2}
    losses = {name: loss.to(device) for name, loss in make_losses(num_classes).items()}
    widths |= {getattr(loss, "num_logits", num_classes + 1) for loss in losses.values()}
    base = torch.randn(n, max(widths), generator=g).to(device)
    logits = {w: base[:, :w].contiguous().requires_grad_() for w in sorted(widths)}
    objectness = torch.randn(n, 2, generator=g).to(device).requires_grad_()

    def baseline():
        F.cross_entropy(logits[num_classes + 1], labels).backward()

    def run(loss):
        if loss.uses_objectness:
            def case():
                sum(loss(logits[num_classes], objectness, labels).values()).backward()
            return case
        z = logits[getattr(loss, "num_logits", num_classes + 1)]

        def case():
            loss(z, labels)["loss_cls"].backward()
        return case

    cases = {BASELINE: baseline, **{name: run(loss) for name, loss in losses.items()}}
    loce = losses["LOCE (equilibrium)"]
    # called by the LOCE ROI heads before every loss, apart from forward + backward
    cases["LOCE update_mean_score"] = lambda: loce.update_mean_score(
        logits[num_classes + 1].detach(), labels, instance)
    cases["F.softplus(x).sum(), forward + backward"] = lambda: (
        F.softplus(logits[num_classes + 1]).sum().backward())
    # DropLoss' and GOL's draw per (RoI, class), as the official rand_like: alone
    cases["torch.rand(N, C)"] = lambda: torch.rand(n, num_classes, device=device)
    return cases, [*logits.values(), objectness]


def measure(cases, inputs, device, warmup, repeats):
    """Median milliseconds per case; cases alternate within each repeat."""
    one_thread = device.type == "cpu" and torch.get_num_threads() == 1
    clock = time.thread_time if one_thread else time.perf_counter
    times = {name: [] for name in cases}
    for step in range(warmup + repeats):
        for name, fn in cases.items():
            for x in inputs:
                x.grad = None
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = clock()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step >= warmup:
                times[name].append(1e3 * (clock() - start))
    return {name: statistics.median(t) for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--num-classes", type=int, default=1203)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--system-malloc", action="store_true",
                        help="keep glibc's default malloc thresholds (CPU)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    device = torch.device(args.device)
    malloc = "default malloc"
    if device.type == "cpu" and not args.system_malloc and keep_freed_memory():
        malloc = "malloc keeps freed memory"

    clock = "thread CPU time" if torch.get_num_threads() == 1 else "wall time"
    name = (torch.cuda.get_device_name() if device.type == "cuda"
            else f"cpu, {torch.get_num_threads()} threads, {clock}, {malloc}")
    print(f"torch {torch.__version__}, {name}, C = {args.num_classes}, median of {args.repeats}")
    table = {}
    for n in args.sizes:
        cases, inputs = make_cases(n, args.num_classes, device)
        ms = measure(cases, inputs, device, args.warmup, args.repeats)
        for case, value in ms.items():
            table.setdefault(case, []).extend([value, value / ms[BASELINE]])
    headers = ["loss"] + [h for n in args.sizes for h in (f"N={n} ms", "x CE")]
    print(tabulate([[case, *values] for case, values in table.items()], headers=headers,
                   floatfmt=".2f"))


if __name__ == "__main__":
    main()
