"""Stage data: the evaluation set, the training set (embedded model only) and the pool of real calibration images.

fashion_mnist: IDX files -> uint8 tensors (torchvision's reader). imagefolder: <dir>/<class>/<image>
folders (CIFAR-10 JPEGs in ../shared, an ImageNet validation layout): read in place through a manifest,
never copied. Outputs: data/prepared/{train,eval}/, calib_real.pt (data.real_pool normalised training
images; each seed of the real source draws data.num_images of them), val/ (the validation split:
data.val_images other training images, the same format as eval/; dfq.fp32.datasets.split_indices), meta.json.
"""
from dfq.pipeline.paths import PREPARED as OUT
from stages._common import read_params, resolve_path, setup_torch


def main() -> None:
    params = read_params()
    p, arch = params.data, params.model.arch
    torch = setup_torch()
    import tempfile
    from pathlib import Path

    from dfq.fp32 import datasets as ds
    from dfq.io import atomic_dir, save_json, save_torch
    from dfq.fp32.models import input_spec

    with atomic_dir(OUT) as tmp:
        (tmp / "train").mkdir(), (tmp / "eval").mkdir(), (tmp / "val").mkdir()
        n_val = p.val_images
        if p.dataset == "fashion_mnist":
            spec, classes = ds.FASHION_MNIST_SPEC, list(ds.FASHION_MNIST_CLASSES)
            with tempfile.TemporaryDirectory(prefix="dfq-fmnist-") as cache:
                print(f"reading Fashion-MNIST from {p.root}", flush=True)
                try:
                    (xtr, ytr), (xte, yte) = ds.load_fashion_mnist(Path(p.root).expanduser(), cache, p.download)
                except FileNotFoundError as exc:
                    raise SystemExit(str(exc)) from None
            save_torch({"images": xtr, "labels": ytr}, tmp / "train" / "train.pt")
            save_torch({"images": xte, "labels": yte}, tmp / "eval" / "test.pt")
            pick, val = split(len(xtr), p.real_pool, n_val, p.seed)
            calib = spec.normalize(xtr[pick])  # = ds.calibration_subset(xtr, real_pool, seed), as before
            save_torch({"images": xtr[val], "labels": ytr[val]}, tmp / "val" / "val.pt")
        elif p.dataset == "imagefolder":
            spec = ds.InputSpec.from_dict(input_spec(arch) or input_spec("resnet18"))
            try:
                test = ds.folder_manifest(resolve_path(p.test_dir, "data.test_dir"), "data.test_dir")
                train = ds.folder_manifest(resolve_path(p.train_dir, "data.train_dir"), "data.train_dir")
            except FileNotFoundError as exc:
                raise SystemExit(str(exc)) from None
            classes = test["classes"]
            save_json({**test, "resize": p.resize}, tmp / "eval" / "manifest.json")
            save_json({**train, "resize": p.resize}, tmp / "train" / "manifest.json")
            pool = min(p.real_pool, len(train["files"]))  # a small folder: all of it
            pick, val = split(len(train["files"]), pool, n_val, p.seed, "data.real_pool" if pool == p.real_pool
                              else f"data.real_pool={p.real_pool} capped to the folder")
            save_json({**train, "files": [train["files"][i] for i in val], "resize": p.resize},
                      tmp / "val" / "manifest.json")
            folder = ds.ManifestDataset(train, ds.folder_transform(spec, p.resize), spec.shape[0])
            calib = torch.stack([folder[int(i)][0] for i in pick])
            xte = test["files"]
        else:
            raise SystemExit(f"data.dataset={p.dataset!r} is unknown; allowed: fashion_mnist, imagefolder")
        save_torch(calib.contiguous(), tmp / "calib_real.pt")
        save_json({"dataset": p.dataset, "num_classes": len(classes), "classes": classes, "input_spec": spec.to_dict(),
                   "eval_images": len(xte), "calib_real": list(calib.shape), "val_images": len(val)}, tmp / "meta.json")
    print(f"{p.dataset}: {len(classes)} classes, {len(xte)} evaluation images, real calibration pool "
          f"{tuple(calib.shape)} (normalised), {len(val)} validation images -> {OUT}/")


def split(n: int, pool: int, val: int, seed: int, pool_param: str = "data.real_pool"):
    """Pool and validation indices (dfq.fp32.datasets.split_indices); too few training images stop the stage.

    Args:
        n: number of training images.
        pool: size of the real calibration pool (data.real_pool, or capped to a small folder).
        val: size of the validation split (data.val_images; 0: none).
        seed: data.seed: the seed of the permutation both are drawn from.
        pool_param: how the error names ``pool``.
    """
    from dfq.fp32.datasets import split_indices

    try:
        return split_indices(n, pool, val, seed, pool_param)
    except ValueError as exc:
        raise SystemExit(f"data stage: {exc}") from None


if __name__ == "__main__":
    main()
