"""Peak memory and time of one CARAFE upsampling to P2 of a 1333 x 800 image (P3 input
(1, 256, 100, 168) -> (1, 256, 200, 336)), in one piece vs in row chunks (MODEL.CARAFE.CHUNK_MB),
for inference (no grad) and training (forward + backward). Each case runs in its own process
(peak RSS cannot be reset); the table gives ratios against the one-piece case.

    OMP_NUM_THREADS=1 nice -n 10 python -m benchmarks.carafe_memory [--chunk-mb 64] [--device cpu]
"""
import argparse
import multiprocessing as mp
import resource
import time

from tabulate import tabulate


def _case(chunk_mb, train, device, queue):
    import torch

    from seesaw_ecm.modeling.carafe import CARAFEPack

    torch.manual_seed(0)
    pack = CARAFEPack(256, chunk_bytes=chunk_mb * 2 ** 20 if chunk_mb else None).to(device)
    x = torch.randn(1, 256, 100, 168, device=device, requires_grad=train)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    start = time.perf_counter()
    with torch.set_grad_enabled(train):
        out = pack(x)
        if train:
            out.square().mean().backward()
    sync()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() - base_cuda if device.startswith("cuda")
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) * 1024)
    queue.put((tuple(out.shape), peak / 2 ** 20, seconds))


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunk-mb", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    rows = []
    for train in (False, True):
        base = None
        for chunk in (0, args.chunk_mb):
            queue = ctx.Queue()
            proc = ctx.Process(target=_case, args=(chunk, train, args.device, queue))
            proc.start()
            shape, mib, seconds = queue.get()
            proc.join()
            base = base or (mib, seconds)
            name = ("train " if train else "infer ") + (
                f"chunks {chunk} MB" if chunk else "one piece")
            rows.append([name, mib, mib / base[0], seconds, seconds / base[1]])
    print(tabulate(rows, headers=["case", "peak MiB", "x one piece", "s", "x one piece"],
                   floatfmt=("", ".0f", ".2f", ".2f", ".2f")))
    print(f"output shape {shape}, device {args.device}")


if __name__ == "__main__":
    main()
