"""ImageNet-size speed check: a torchvision model at its own input size (resnet18: 224 px), no dataset.

    DFQ_DEVICE=cuda python -m bench.imagenet_size --batches 64 256     (writes reports/bench-cuda-resnet18.md)

Weights are torchvision's random initialisation unless --weights names a state dict (speed does not
depend on them). For each batch size: the ZeroQ and DSG generation loops (the real optimize_images with
hooks, loss, Adam and the plateau schedule) against forward + backward with frozen weights and with
weight gradients, paired as in bench/run.py; then FP32 and fake-quant (zeroq and brecq protocols, W4A4,
calibrated on one Gaussian batch) inference throughput on random images. Not part of the test suite.
"""

import argparse
import os
import platform

import torch

from bench import timing as B
from dfq.fp32.models import build_model, count_bn, input_spec, load_state_dict
from dfq.generation.generators import gaussian_batch
from dfq.io import load_torch, save_text
from dfq.quant.observers import MinMaxObserver
from dfq.quant.prepare import QuantSpec, calibrate, prepare


def generation_rows(model, shape, batch: int, iters: int, dev: str, fmt=torch.contiguous_format) -> list[tuple]:
    rows = []
    num_bn = count_bn(model)
    for method in ("zeroq", "dsg"):
        n = batch if method == "zeroq" else num_bn * max(1, round(batch / num_bn))  # DSG: whole multiples of L
        x = gaussian_batch((n, *shape), 0).contiguous(memory_format=fmt)
        kw = {"loss_fn": B.dsg_loss_fn(model, x, dev)} if method == "dsg" else {}  # params.yaml's defaults
        if dev.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        r = B.paired_generation_ratios(model, x, iters=iters, device=dev, **kw)
        rows.append((method, n, r, n / r["gen"], B.peak_memory_mb(dev)))
        print(
            f"{method} batch {n}: {r['gen'] * 1e3:.1f} ms/iter, {r['ratio_frozen']:.2f} of the frozen floor "
            f"({r['ratio_frozen_range'][0]:.2f}-{r['ratio_frozen_range'][1]:.2f}), {r['ratio_full']:.2f} of the "
            f"weight-grad floor",
            flush=True,
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--weights", default=None, help="a state dict file (default: random initialisation)")
    ap.add_argument("--batches", type=int, nargs="+", default=[64])
    ap.add_argument("--iters", type=int, default=20, help="timed iterations per measurement")
    ap.add_argument("--eval-batch", type=int, default=256)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--channels-last", action="store_true", help="model and images in channels_last (NHWC)")
    ap.add_argument("--out", default=None, help="default: reports/bench-<device>-<arch>[-channels-last].md")
    args = ap.parse_args()
    dev = os.environ.get("DFQ_DEVICE", "cpu")
    torch.backends.cudnn.benchmark = True
    spec = input_spec(args.arch)
    if spec is None:
        raise SystemExit(f"--arch {args.arch}: no known input size (use a registered torchvision arch)")
    shape = tuple(spec["shape"])
    model = build_model(args.arch, 1000).eval()
    if args.weights:
        load_state_dict(model, load_torch(args.weights), args.weights)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model.to(dev, memory_format=fmt)
    name = torch.cuda.get_device_name() if dev.startswith("cuda") else (platform.processor() or platform.machine())

    gen = [row for b in args.batches for row in generation_rows(model, shape, b, args.iters, dev, fmt)]

    batches = [
        torch.randn(args.eval_batch, *shape, generator=torch.Generator().manual_seed(i)).contiguous(memory_format=fmt)
        for i in range(args.eval_batches)
    ]
    n_eval = args.eval_batch * args.eval_batches
    evals = []
    for protocol in ("zeroq", "brecq"):
        gm = prepare(model.cpu(), 4, 4, MinMaxObserver, QuantSpec(protocol))
        calibrate(gm, [gaussian_batch((64, *shape), 1)], dev)
        model.to(dev, memory_format=fmt)
        gm.to(memory_format=fmt)
        ev = B.paired_eval_ratio(model, gm, batches, device=dev)
        evals.append((protocol, ev))
        print(
            f"eval {protocol} W4A4: {n_eval / ev['quantized']:.0f} img/s vs FP32 {n_eval / ev['fp32']:.0f} img/s, "
            f"ratio {ev['ratio']:.2f}",
            flush=True,
        )
        del gm

    layout = "channels_last" if args.channels_last else "NCHW"
    lines = [
        f"# ImageNet-size benchmark: `{args.arch}` at {shape[1]}x{shape[2]} on `{dev}`, {layout}",
        "",
        f"{name}; torch {torch.__version__}; weights: {args.weights or 'random initialisation'}; "
        f"`python -m bench.imagenet_size{'' if args.arch == 'resnet18' else ' --arch ' + args.arch} "
        f"--batches {' '.join(map(str, args.batches))}"
        f"{' --channels-last' if args.channels_last else ''}` (model, images and floors alike in {layout}).",
        "",
        "## Generation (one iteration: forward with BN-statistic hooks, loss, backward to the images, Adam)",
        "",
        "Ratios: median of 5 rounds, each timing the generation loop and both floors back to back (range).",
        "",
        "| method | batch | ms/iter | / fwd+bwd frozen weights (target <= 1.3) | / fwd+bwd with weight grads "
        "| images/s (1 iteration) | images/s (500 iterations) | peak memory MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, n, r, ips, mem in gen:
        lo, hi = r["ratio_frozen_range"]
        lines.append(
            f"| {method} | {n} | {r['gen'] * 1e3:.1f} | {r['ratio_frozen']:.2f} ({lo:.2f}-{hi:.2f}) | "
            f"{r['ratio_full']:.2f} | {ips:.0f} | {ips / 500:.2f} | {mem:.0f} |"
        )
    lines += [
        "",
        f"## Evaluation ({n_eval} random images in batches of {args.eval_batch}, W4A4 fake-quant)",
        "",
        "| model | images/s | ratio to FP32 time (target <= 1.5; median of 7 alternating rounds) |",
        "|---|---|---|",
    ]
    for protocol, ev in evals:
        if protocol == evals[0][0]:
            lines.append(f"| FP32 | {n_eval / ev['fp32']:.0f} | 1.00 |")
        lines.append(
            f"| fake-quant, {protocol} protocol | {n_eval / ev['quantized']:.0f} | {ev['ratio']:.2f} "
            f"({ev['ratio_range'][0]:.2f}-{ev['ratio_range'][1]:.2f}) |"
        )
    lines.append("")
    out = (
        args.out or f"reports/bench-{dev.split(':')[0]}-{args.arch}{'-channels-last' if args.channels_last else ''}.md"
    )
    save_text("\n".join(lines), out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
