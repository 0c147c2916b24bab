"""Stage data: Fashion-MNIST IDX files -> uint8 train/test tensors and the real calibration subset."""
from stages._common import load_params, setup_torch

OUT = "data/prepared"


def main() -> None:
    p = load_params("data")
    setup_torch()
    import os
    import tempfile
    from pathlib import Path

    from dfq import datasets
    from dfq.io import atomic_dir, save_json, save_torch

    if p["dataset"] != "fashion_mnist":
        raise SystemExit(f"data.dataset={p['dataset']!r} is unknown; allowed: fashion_mnist")
    root = Path(os.path.expanduser(p["root"]))
    with tempfile.TemporaryDirectory(prefix="dfq-fmnist-") as cache:
        print(f"reading Fashion-MNIST from {root}", flush=True)
        try:
            (xtr, ytr), (xte, yte) = datasets.load_fashion_mnist(root, cache, download=p["download"])
        except FileNotFoundError as exc:
            raise SystemExit(str(exc)) from None
    spec = datasets.FASHION_MNIST_SPEC
    calib = spec.normalize(datasets.calibration_subset(xtr, p["num_images"], p["seed"]))
    with atomic_dir(OUT) as tmp:
        save_torch({"images": xtr, "labels": ytr}, tmp / "train.pt")
        save_torch({"images": xte, "labels": yte}, tmp / "test.pt")
        save_torch(calib, tmp / "calib_real.pt")
        save_json({"dataset": p["dataset"], "num_classes": 10, "classes": list(datasets.FASHION_MNIST_CLASSES),
                   "input_spec": spec.to_dict(), "train": len(ytr), "test": len(yte),
                   "calib_real": list(calib.shape)}, tmp / "meta.json")
    print(f"train {tuple(xtr.shape)}, test {tuple(xte.shape)}, real calibration subset {tuple(calib.shape)} "
          f"(normalised) -> {OUT}/")


if __name__ == "__main__":
    main()
