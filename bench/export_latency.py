"""Latency of the exported INT8 model (not a test): ONNX Runtime INT8 (our QDQ export, W8A8 symmetric
per-channel weights) vs ONNX Runtime FP32 (the same model exported in float) vs PyTorch FP32 eager, batch 1
and 64, on this CPU, plus file sizes; writes reports/bench-export.md.

Models: the default fmnist_resnet (models/fp32.pt when present, else random weights), CIFAR ResNet-20
(../shared/models/resnet20-12fca82f.th) and torchvision ResNet-18 at 224 px (random weights). Calibration:
one batch of N(0, 1) noise (latency does not depend on the ranges). Each round times the three engines
back to back on the same batch (mean of --iters calls after warm-up); medians over --rounds of the times
and of the per-round ratios, so a slow spell of a shared machine hits all three alike.

    OMP_NUM_THREADS=1 python -m bench.export_latency --rounds 5 --threads 1
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch

from dfq.deploy.qdq import to_onnx
from dfq.deploy.runtime import integer_report, optimized_ops, run, session
from dfq.fp32.models import build_model, load_checkpoint, load_state_dict
from dfq.io import load_torch, save_text
from dfq.quant.observers import MinMaxObserver
from dfq.quant.prepare import QuantSpec, calibrate, prepare


def models() -> list[tuple[str, torch.nn.Module, tuple[int, int, int]]]:
    out = []
    if Path("models/fp32.pt").is_file():
        m, _ = load_checkpoint("models/fp32.pt")
        out.append(("fmnist_resnet (models/fp32.pt)", m, (1, 28, 28)))
    else:
        out.append(("fmnist_resnet (random weights)", build_model("fmnist_resnet"), (1, 28, 28)))
    w = Path("../shared/models/resnet20-12fca82f.th")
    if w.is_file():
        out.append(
            (
                "cifar_resnet20 (shared weights)",
                load_state_dict(build_model("cifar_resnet20"), load_torch(w), str(w)),
                (3, 32, 32),
            )
        )
    out.append(("resnet18 (random weights)", build_model("resnet18", 1000), (3, 224, 224)))
    return [(n, m.eval(), s) for n, m, s in out]


def float_onnx(model: torch.nn.Module, shape) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            torch.zeros(1, *shape),
            buf,
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    return buf.getvalue()


def mean_seconds(fn, iters: int) -> float:
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=0, help="calls per timing (default: 20 at batch 1, 1 at batch 64)")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op and torch threads")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--protocol", default="brecq", choices=["zeroq", "brecq"])
    ap.add_argument("--out", default="reports/bench-export.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    rows, sizes = [], []
    for name, model, shape in models():
        torch.manual_seed(0)
        gm = prepare(model, 8, 8, MinMaxObserver, QuantSpec(args.protocol, "symmetric"))
        calibrate(gm, [torch.randn(8, *shape)])
        int8, _ = to_onnx(gm, (1, *shape), args.protocol)
        fp32 = float_onnx(model, shape)
        rep = integer_report(optimized_ops(int8, args.threads))
        sizes.append(
            (
                name,
                len(fp32) / 1e6,
                len(int8) / 1e6,
                len(int8) / len(fp32),
                rep["integer_convs"],
                rep["float_convs"],
                ", ".join(f"{k} x{v}" for k, v in rep["float_ops"].items()) or "none",
            )
        )
        s_int8, s_fp32 = session(int8, args.threads), session(fp32, args.threads)
        for b in args.batches:
            x = torch.randn(b, *shape)
            iters = args.iters or (20 if b == 1 else 1)
            engines = {
                # each lambda is timed within this iteration, so late binding reads this iteration's values
                "ort_int8": lambda: run(s_int8, x),  # noqa: B023
                "ort_fp32": lambda: run(s_fp32, x),  # noqa: B023
                "torch_fp32": lambda: model(x),  # noqa: B023
            }
            with torch.inference_mode():
                for fn in engines.values():  # warm-up
                    fn()
                times = {k: [] for k in engines}
                for _ in range(args.rounds):
                    for k, fn in engines.items():
                        times[k].append(mean_seconds(fn, iters))
            med = {k: statistics.median(v) for k, v in times.items()}
            r_ort = statistics.median(a / f for a, f in zip(times["ort_int8"], times["ort_fp32"]))
            r_torch = statistics.median(a / f for a, f in zip(times["ort_int8"], times["torch_fp32"]))
            rows.append(
                (name, b, 1000 * med["ort_int8"], 1000 * med["ort_fp32"], 1000 * med["torch_fp32"], r_ort, r_torch)
            )
            print(
                f"{name} batch {b}: int8 {1000 * med['ort_int8']:.2f} ms, ORT fp32 {1000 * med['ort_fp32']:.2f} ms, "
                f"torch fp32 {1000 * med['torch_fp32']:.2f} ms; int8/ORT fp32 {r_ort:.2f}, int8/torch {r_torch:.2f}"
            )
    lines = [
        "# ONNX Runtime INT8 export latency",
        "",
        f"`python -m bench.export_latency --rounds {args.rounds} --threads {args.threads} --protocol {args.protocol}`; "
        f"{platform.processor() or platform.machine()}, {args.threads} thread(s), ONNX Runtime CPU provider, "
        "all graph optimizations. W8A8, symmetric per-channel weights, per-tensor uint8 activations; "
        f"milliseconds per batch, medians of {args.rounds} paired rounds; ratios are medians of per-round ratios.",
        f"1-minute load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
        f"({os.cpu_count()} cores).",
        "",
        "| model | batch | ORT INT8 ms | ORT FP32 ms | PyTorch FP32 ms | INT8 / ORT FP32 | INT8 / PyTorch |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {n} | {b} | {a:.2f} | {f:.2f} | {t:.2f} | {r1:.2f} | {r2:.2f} |" for n, b, a, f, t, r1, r2 in rows]
    lines += [
        "",
        "| model | FP32 ONNX MB | INT8 ONNX MB | size ratio | integer convs | float convs | float ops (optimized graph) |",  # noqa: E501 (a table row)
        "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {n} | {f:.2f} | {i:.2f} | {r:.2f} | {ic} | {fc} | {fo} |" for n, f, i, r, ic, fc, fo in sizes]
    save_text("\n".join(lines) + "\n", args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
