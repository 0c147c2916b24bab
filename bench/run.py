"""Benchmark: accuracy and speed side by side for one params profile -> reports/bench.md.

    python -m bench.run                       # default pipeline (dvc repro), then the timings
    python -m bench.run --profile cifar10-resnet20
    python -m bench.run --skip-pipeline       # time the workspace's current results only

Ratios printed: generation time per iteration / forward+backward with frozen weights (target <= 1.2)
and / forward+backward with weight gradients (the official code's cost); fake-quant eval time / FP32
eval time (target <= 1.3). Reconstruction: python -m bench.reconstruction. Not part of the test suite.
"""

import argparse
import json
import os
import platform
import subprocess
from pathlib import Path

import torch
import yaml

from bench import timing as B
from dfq.fp32.datasets import InputSpec, open_eval_dataset
from dfq.fp32.models import load_checkpoint
from dfq.generation.generators import batch_sizes, gaussian_batch
from dfq.io import load_torch, save_text
from dfq.pipeline.report import aggregate, results_table, set_metrics
from dfq.quant.prepare import load_quantized
from dfq.threads import keep_freed_memory


def run_pipeline(profile: str) -> None:
    cmd = ["dvc", "repro"] if profile == "default" else ["python", "-m", "cli.profile", profile]
    print("running:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="default")
    ap.add_argument("--skip-pipeline", action="store_true")
    ap.add_argument("--iters", type=int, default=20, help="timed iterations per measurement")
    ap.add_argument(
        "--rounds", type=int, default=9, help="generation rounds (each: the loop and both floors back to back)"
    )
    ap.add_argument("--out", default=None, help="default: reports/bench.md, reports/bench-<profile>.md")
    args = ap.parse_args()
    keep_freed_memory()  # as every stage does (stages._common.setup_torch)
    args.out = args.out or ("reports/bench.md" if args.profile == "default" else f"reports/bench-{args.profile}.md")
    dev = os.environ.get("DFQ_DEVICE", "cpu")
    if not args.skip_pipeline:
        run_pipeline(args.profile)
    params = yaml.safe_load(Path("params.yaml").read_text())
    sources, bits = params["generate"]["sources"], params["quantize"]["bits"]
    fp32 = json.loads(Path("metrics/fp32.json").read_text())
    agg = aggregate(set_metrics(sources, params["generate"]["seeds"], bits))

    model, meta = load_checkpoint("models/fp32.pt")
    spec = InputSpec.from_dict(meta["input_spec"])
    rows = []
    for method in ("zeroq", "dsg"):
        cfg = params["generate"].get(method, {})
        sizes = batch_sizes(params["data"]["num_images"], params["generate"]["batch_size"])
        x = gaussian_batch((sizes[0], *spec.shape), 0)
        kw = {}
        if method == "dsg":
            kw["loss_fn"] = B.dsg_loss_fn(
                model, x, dev, cfg.get("eps", 0.9), cfg.get("per_channel", False), cfg.get("lse_weight", 2.0)
            )
        r = B.paired_generation_ratios(model, x, **kw, iters=args.iters, rounds=args.rounds, device=dev)
        rows.append((method, len(x), r, len(x) / (r["gen"] * cfg.get("iterations", 500))))

    loader = torch.utils.data.DataLoader(open_eval_dataset("data/prepared/eval", spec), batch_size=500)
    batches = [xb for _, (xb, _) in zip(range(4), loader)]
    qs, qb = sources[0], bits[-1]
    gm = load_quantized(model, load_torch(f"models/quant/{qs}-s{params['generate']['seeds'][0]}-{qb}.pt"))
    ev = B.paired_eval_ratio(model, gm, batches, device=dev)
    n_eval = sum(len(b) for b in batches)

    lines = [
        f"# Benchmark: profile `{args.profile}`",
        "",
        f"Model `{meta['arch']}`, device `{dev}` ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads), torch {torch.__version__}.",
        "",
        "## Accuracy (top-1 %, top-5 in brackets)",
        "",
        results_table(fp32, agg, sources, bits),
        "## Generation speed",
        "",
        f"Each ratio is the median over {args.rounds} rounds, each round timing the generation loop and both floors "
        "back to back (range over the rounds in brackets).",
        "",
        "| method | batch | s/iter | / fwd+bwd frozen weights (target <= 1.2) | / fwd+bwd with weight grads | images/s |",  # noqa: E501
        "|---|---|---|---|---|---|",
    ]
    for method, n, r, ips in rows:
        lo, hi = r["ratio_frozen_range"]
        lines.append(
            f"| {method} | {n} | {r['gen']:.4f} | {r['ratio_frozen']:.2f} ({lo:.2f}-{hi:.2f}) | "
            f"{r['ratio_full']:.2f} | {ips:.2f} |"
        )
    lines += [
        "",
        "## Evaluation speed",
        "",
        "Ratio: the median of 7 alternating rounds, each timing the fastest of 3 passes of either model.",
        "",
        f"| model | s per {n_eval} images | ratio to FP32 (target <= 1.3) |",
        "|---|---|---|",
        f"| FP32 | {ev['fp32']:.3f} | 1.00 |",
        f"| fake-quant {qs}-{qb} | {ev['quantized']:.3f} | {ev['ratio']:.2f} "
        f"({ev['ratio_range'][0]:.2f}-{ev['ratio_range'][1]:.2f}) |",
        "",
        f"Peak memory of this process: {B.peak_memory_mb(dev):.0f} MiB "
        f"({'CUDA allocated' if dev.startswith('cuda') else 'resident set size'}).",
        "",
    ]
    save_text("\n".join(lines), args.out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
