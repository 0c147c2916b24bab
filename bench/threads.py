"""Generation speed when processes share the cores: one process alone, then N at once under each thread rule.

    python -m bench.threads [--procs 2] [--iters 60]

Every process times ZeroQ iterations on one batch of 64 images of the embedded model's shape (random weights; the
speed does not depend on them). Rules: ``torch``: torch's default threads in every process (what the stages did
before dfq/threads.py); ``one``: DFQ_THREADS=1; ``registry``: the stages' default (stages._common.setup_torch: the
cores divided among the live dfq processes, a fresh registry per measurement). Prints ms per iteration of every
process and its slowdown against the process alone. Run it with nothing else on the machine; not a test.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time


def worker(rule: str, iters: int) -> None:
    if rule == "torch":
        import torch
    else:
        from stages._common import setup_torch

        torch = setup_torch()
    from dfq.fp32.models import build_model
    from dfq.generation import generators

    torch.manual_seed(0)
    model = build_model("fmnist_resnet", 10).eval()
    x0 = generators.init_images("gaussian", (64, 1, 28, 28), torch.Generator().manual_seed(0))
    t = time.perf_counter()
    generators.optimize_images(model, x0, generators.zeroq_loss, iterations=iters, lr=0.5, patience=100, min_lr=1e-4)
    print(f"{torch.get_num_threads()} {1000 * (time.perf_counter() - t) / iters:.1f}", flush=True)


def measure(rule: str, procs: int, iters: int) -> list[tuple[int, float]]:
    """(threads, ms per iteration) of ``procs`` processes started at once under ``rule``."""
    with tempfile.TemporaryDirectory() as registry:
        env = {**os.environ, "DFQ_PROC_DIR": registry, "TQDM_DISABLE": "1"}
        env.pop("DFQ_THREADS", None)
        if rule == "one":
            env["DFQ_THREADS"] = "1"
        cmd = [sys.executable, "-m", "bench.threads", "--worker", rule, "--iters", str(iters)]
        running = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) for _ in range(procs)]
        out = [p.communicate()[0].split() for p in running]
    return [(int(t), float(ms)) for t, ms in out]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--worker", choices=("torch", "one", "registry"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.iters)
    [(threads, alone)] = measure("torch", 1, args.iters)
    print("| processes | rule | threads | ms per iteration | x alone |\n|---|---|---|---|---|")
    print(f"| 1 | torch | {threads} | {alone:.1f} | 1.00 |")
    for rule in ("torch", "one", "registry"):
        got = measure(rule, args.procs, args.iters)
        threads, ms = " + ".join(str(t) for t, _ in got), ", ".join(f"{m:.1f}" for _, m in got)
        ratio = ", ".join(f"{m / alone:.2f}" for _, m in got)
        print(f"| {args.procs} at once | {rule} | {threads} | {ms} | {ratio} |")


if __name__ == "__main__":
    main()
