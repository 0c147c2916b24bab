"""Reconstruction speed: one optimisation step of every unit against its floor, and a whole cell's wall time.

    python -m bench.reconstruction [--method qdrop] [--bits w4a4] [--iters 40] [--rounds 5] [--cell 2000]

The model is the shared CIFAR-10 ResNet-20 (../shared/models/resnet20-12fca82f.th, or --weights; random weights
of its architecture when absent: the time does not depend on them), prepared as the reconstruction study does
(brecq protocol, MSE weight and activation ranges, asymmetric weights, float biases); the calibration set is
--images Gaussian images (228, the study's) or the batch files of --data (a data/calib/<set> folder). Per unit:
a reconstruction step (``optimize_unit``: minibatch, fake-quant forward, rounding and step-size gradients,
regulariser, Adam) against the floor, forward + backward of the same unit in FP32 with weight gradients on the same
number of rows, measured back to back in each round (bench/timing.py); medians. ``--cell N`` then times
``reconstruct`` end to end with N iterations per unit (what the calibrate stage runs). Threads: torch's default,
or DFQ_THREADS. Run it with nothing else on the machine; not a test.
"""

import argparse
import copy
import os
import time
from pathlib import Path

import torch

from bench import timing as B
from dfq.cells import parse_bits
from dfq.fp32.models import build_model, input_spec, load_state_dict
from dfq.io import load_torch
from dfq.quant.genie_m import genie_spec
from dfq.quant.observers import ObserverConfig
from dfq.quant.prepare import QuantSpec, calibrate, prepare, set_quant_state
from dfq.quant.reconstruction import ReconConfig, capture, recon_units, reconstruct
from dfq.threads import keep_freed_memory

SHARED_RESNET20 = Path(__file__).resolve().parents[2] / "shared" / "models" / "resnet20-12fca82f.th"


def setup(method: str, bits: str, weights: Path | None, data_dir: Path | None, images: int, cfg: ReconConfig):
    """(prepared model in the quant state reconstruct() optimises the units in, FP32 copy, calibration images)."""
    model = build_model("cifar_resnet20", 10)
    if weights is not None and weights.exists():
        model = load_state_dict(model, load_torch(weights), str(weights))
    if data_dir is not None:
        data = torch.cat([load_torch(f) for f in sorted(data_dir.glob("*.pt"))])
    else:
        data = torch.randn(images, *input_spec("cifar_resnet20")["shape"], generator=torch.Generator().manual_seed(0))
    spec = genie_spec(QuantSpec(protocol="brecq", weight_range="mse", bias="float"), method, cfg.genie)
    gm = prepare(model, *parse_bits(bits), ObserverConfig(act_method="mse").make, spec).eval()
    for p in gm.parameters():
        p.requires_grad_(False)
    fp32 = copy.deepcopy(gm)
    set_quant_state(fp32, weights=False, acts=False)
    joint = method in ("qdrop", "genie")
    if joint:
        calibrate(gm, data.split(128), desc="calibrate")
    set_quant_state(gm, weights=True, acts=joint)
    return gm, fp32, data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="qdrop", choices=["adaround", "brecq", "qdrop", "genie"])
    ap.add_argument("--bits", default="w4a4")
    ap.add_argument("--weights", type=Path, default=SHARED_RESNET20)
    ap.add_argument("--data", type=Path, default=None, help="a folder of calibration batch files (*.pt)")
    ap.add_argument("--images", type=int, default=228)
    ap.add_argument("--iters", type=int, default=40, help="timed steps per measurement")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cell", type=int, default=0, help="then time reconstruct() with this many iterations per unit")
    args = ap.parse_args()
    keep_freed_memory()  # as the calibrate stage does (stages._common.setup_torch)
    if os.environ.get("DFQ_THREADS"):
        torch.set_num_threads(int(os.environ["DFQ_THREADS"]))
    cfg = ReconConfig()
    gm, fp32, data = setup(args.method, args.bits, args.weights, args.data, args.images, cfg)
    genie = cfg.genie if args.method == "genie" else None
    acts = args.method in ("qdrop", "genie")
    print(
        f"cifar_resnet20 {args.bits} {args.method}, {len(data)} images, batch {cfg.batch_size}, "
        f"{torch.get_num_threads()} threads; medians of {args.rounds} paired rounds of {args.iters} steps\n"
    )
    print("| unit | ms per step | ms floor (FP32 fwd+bwd) | step / floor |\n|---|---|---|---|")
    total_step = total_floor = 0.0
    for name in recon_units(gm, layerwise=args.method == "adaround"):
        x = capture(gm, name, data, output=False)
        y = capture(fp32, name, data, output=True)
        x_fp = capture(fp32, name, data, output=False) if genie is not None and genie.input_prob < 1 else None
        kw = dict(learn_weights=True, learn_acts=acts, drop_prob=cfg.drop_prob if acts else 0.0, x_fp=x_fp, genie=genie)
        r = B.paired_recon_ratios(
            gm.get_submodule(name), fp32.get_submodule(name), x, y, cfg, args.iters, args.rounds, **kw
        )
        total_step, total_floor = total_step + r["step"], total_floor + r["floor"]
        lo, hi = r["ratio_range"]
        print(f"| {name} | {r['step'] * 1e3:.2f} | {r['floor'] * 1e3:.2f} | {r['ratio']:.2f} ({lo:.2f}-{hi:.2f}) |")
    print(f"| all units | {total_step * 1e3:.1f} | {total_floor * 1e3:.1f} | {total_step / total_floor:.2f} |")
    if args.cell:
        t = time.perf_counter()
        out = reconstruct(gm, data, args.method, ReconConfig(iterations=args.cell))
        print(
            f"\nreconstruct() with {args.cell} iterations per unit: {time.perf_counter() - t:.1f} s "
            f"(rounding phase {out['seconds_weights']:.1f} s; steps alone would take {total_step * args.cell:.0f} s)"
        )


if __name__ == "__main__":
    main()
