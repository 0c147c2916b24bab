"""Where a generation iteration spends its time beyond the bare forward + backward (torch.profiler).

    DFQ_DEVICE=cuda python -m bench.profile_generation --arch resnet18 --batch 64

Prints, for the frozen-weight floor and for a ZeroQ generation iteration (hooks, loss, Adam), the
operators by self time on the host and on the device, and how many operators each runs.
"""

import argparse
import os

import torch
from torch.profiler import ProfilerActivity, profile

from dfq.fp32.models import build_model, input_spec
from dfq.generation.generators import gaussian_batch, optimize_images
from dfq.generation.losses import zeroq_loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--rows", type=int, default=20)
    args = ap.parse_args()
    dev = os.environ.get("DFQ_DEVICE", "cpu")
    cuda = dev.startswith("cuda")
    torch.backends.cudnn.benchmark = True
    model = build_model(args.arch, 1000).eval().to(dev)
    x = gaussian_batch((args.batch, *input_spec(args.arch)["shape"]), 0).to(dev)
    for p in model.parameters():
        p.requires_grad_(False)
    xf = x.clone().requires_grad_(True)

    def floor():
        for _ in range(args.iters):
            xf.grad = None
            model(xf).sum().backward()

    def generation():
        optimize_images(model, x, zeroq_loss, iterations=args.iters, lr=0.5, patience=100, min_lr=1e-4)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for name, fn in (("floor: forward + backward, frozen weights", floor), ("zeroq generation", generation)):
        fn()  # warm-up (cuDNN autotuning, allocator)
        with profile(activities=activities) as prof:
            fn()
            if cuda:
                torch.cuda.synchronize()
        events = prof.key_averages()
        ops = sum(e.count for e in events if e.key.startswith("aten::")) / args.iters
        kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA) / args.iters
        print(
            f"\n=== {name}: {ops:.0f} aten operators per iteration"
            + (f", {kernels:.0f} device kernels" if cuda else "")
            + " ==="
        )
        print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
        if cuda:
            print(events.table(sort_by="self_cuda_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
