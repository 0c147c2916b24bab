"""Stage data: the evaluation set, the training set (embedded model only) and the pool of real calibration images.

fashion_mnist: IDX files -> uint8 tensors (torchvision's reader). imagefolder: <dir>/<class>/<image>
folders (CIFAR-10 JPEGs in ../shared, an ImageNet validation layout): read in place through a manifest,
never copied. Outputs: data/prepared/{train,eval}/, calib_real.pt (data.real_pool normalised training
images; each seed of the real source draws data.num_images of them), val/ (the validation split:
data.val_images other training images, the same format as eval/; dfq.fp32.datasets.split_indices), meta.json.
"""

from dfq.pipeline import paths
from stages._common import read_params, resolve_path, setup_torch


def main() -> None:
    params = read_params()
    p = params.data
    setup_torch()
    from dfq.fp32 import datasets as ds
    from dfq.fp32.models import input_spec
    from dfq.io import atomic_dir, save_json, save_torch

    with atomic_dir(paths.PREPARED) as tmp:
        (tmp / "train").mkdir(), (tmp / "eval").mkdir(), (tmp / "val").mkdir()
        try:
            if p.dataset == "fashion_mnist":
                print(f"reading Fashion-MNIST from {p.root}", flush=True)
                got = ds.prepare_fashion_mnist(p.root, p.download, tmp, p.real_pool, p.val_images, p.seed)
            else:
                spec = ds.InputSpec.from_dict(input_spec(params.model.arch) or input_spec("resnet18"))
                test, train = resolve_path(p.test_dir, "data.test_dir"), resolve_path(p.train_dir, "data.train_dir")
                got = ds.prepare_image_folders(test, train, p.resize, spec, tmp, p.real_pool, p.val_images, p.seed)
        except FileNotFoundError as exc:
            raise SystemExit(str(exc)) from None
        except ValueError as exc:  # too few training images for the pool and the validation split
            raise SystemExit(f"data stage: {exc}") from None
        save_torch(got.pool.contiguous(), tmp / "calib_real.pt")
        meta = {
            "dataset": p.dataset,
            "num_classes": len(got.classes),
            "classes": got.classes,
            "input_spec": got.spec.to_dict(),
            "eval_images": got.eval_images,
            "calib_real": list(got.pool.shape),
            "val_images": got.val_images,
        }
        save_json(meta, tmp / "meta.json")
    print(
        f"{p.dataset}: {len(got.classes)} classes, {got.eval_images} evaluation images, real calibration pool "
        f"{tuple(got.pool.shape)} (normalised), {got.val_images} validation images -> {paths.PREPARED}/"
    )


if __name__ == "__main__":
    main()
