"""Stage data: the evaluation set, the training set (embedded model only) and the pool of real calibration images.

fashion_mnist: IDX files -> uint8 tensors (torchvision's reader). imagefolder: <dir>/<class>/<image>
folders (CIFAR-10 JPEGs in ../shared, an ImageNet validation layout): read in place through a manifest,
never copied. Outputs: data/prepared/{train,eval}/, calib_real.pt (data.real_pool normalised training
images; each seed of the real source draws data.num_images of them), meta.json.
"""
from stages._common import load_params, resolve_path, setup_torch

OUT = "data/prepared"


def main() -> None:
    p, model_p = load_params("data", "model")
    torch = setup_torch()
    import tempfile
    from pathlib import Path

    from dfq import datasets as ds
    from dfq.io import atomic_dir, save_json, save_torch
    from dfq.models import input_spec

    with atomic_dir(OUT) as tmp:
        (tmp / "train").mkdir(), (tmp / "eval").mkdir()
        if p["dataset"] == "fashion_mnist":
            spec, classes = ds.FASHION_MNIST_SPEC, list(ds.FASHION_MNIST_CLASSES)
            with tempfile.TemporaryDirectory(prefix="dfq-fmnist-") as cache:
                print(f"reading Fashion-MNIST from {p['root']}", flush=True)
                try:
                    (xtr, ytr), (xte, yte) = ds.load_fashion_mnist(Path(p["root"]).expanduser(), cache, p["download"])
                except FileNotFoundError as exc:
                    raise SystemExit(str(exc)) from None
            save_torch({"images": xtr, "labels": ytr}, tmp / "train" / "train.pt")
            save_torch({"images": xte, "labels": yte}, tmp / "eval" / "test.pt")
            try:
                calib = spec.normalize(ds.calibration_subset(xtr, p["real_pool"], p["seed"]))
            except ValueError as exc:
                raise SystemExit(str(exc)) from None
        elif p["dataset"] == "imagefolder":
            spec = ds.InputSpec.from_dict(input_spec(model_p["arch"]) or input_spec("resnet18"))
            try:
                test = ds.folder_manifest(resolve_path(p["test_dir"], "data.test_dir"), "data.test_dir")
                train = ds.folder_manifest(resolve_path(p["train_dir"], "data.train_dir"), "data.train_dir")
            except FileNotFoundError as exc:
                raise SystemExit(str(exc)) from None
            classes = test["classes"]
            save_json({**test, "resize": p.get("resize")}, tmp / "eval" / "manifest.json")
            save_json({**train, "resize": p.get("resize")}, tmp / "train" / "manifest.json")
            pool = min(p["real_pool"], len(train["files"]))  # a small folder: all of it
            pick = ds.calibration_subset(torch.arange(len(train["files"])), pool, p["seed"])
            folder = ds.ManifestDataset(train, ds.folder_transform(spec, p.get("resize")), spec.shape[0])
            calib = torch.stack([folder[int(i)][0] for i in pick])
            xte = test["files"]
        else:
            raise SystemExit(f"data.dataset={p['dataset']!r} is unknown; allowed: fashion_mnist, imagefolder")
        save_torch(calib.contiguous(), tmp / "calib_real.pt")
        save_json({"dataset": p["dataset"], "num_classes": len(classes), "classes": classes,
                   "input_spec": spec.to_dict(), "eval_images": len(xte), "calib_real": list(calib.shape)},
                  tmp / "meta.json")
    print(f"{p['dataset']}: {len(classes)} classes, {len(xte)} evaluation images, real calibration pool "
          f"{tuple(calib.shape)} (normalised) -> {OUT}/")


if __name__ == "__main__":
    main()
