from pathlib import Path

import pytest
import torch

from dfq.fp32.datasets import (
    FASHION_MNIST_SPEC,
    InputSpec,
    NormalizedTensorDataset,
    calibration_subset,
    load_fashion_mnist,
)

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def test_normalize_round_trip():
    x = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    n = FASHION_MNIST_SPEC.normalize(x)
    assert n.shape == (3, 1, 28, 28)
    assert torch.allclose(FASHION_MNIST_SPEC.denormalize(n) * 255, x.float().unsqueeze(1), atol=1e-3)


def test_calibration_subset_is_seeded_and_distinct():
    imgs = torch.arange(1000).view(1000, 1, 1)
    a, b = calibration_subset(imgs, 50, 3), calibration_subset(imgs, 50, 3)
    assert torch.equal(a, b) and len(torch.unique(a)) == 50
    assert not torch.equal(a, calibration_subset(imgs, 50, 4))
    with pytest.raises(ValueError, match="data.real_pool=2000"):
        calibration_subset(imgs, 2000, 0)


def test_tensor_dataset_batches_like_items():
    imgs = torch.randint(0, 256, (10, 28, 28), dtype=torch.uint8)
    ds = NormalizedTensorDataset(imgs, torch.arange(10), FASHION_MNIST_SPEC)
    x, y = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert torch.equal(x[2], ds[2][0]) and y.tolist() == [0, 1, 2, 3]


def test_missing_files_say_how_to_provide_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path / "empty", tmp_path / "cache")


@pytest.mark.skipif(not FMNIST.is_dir(), reason="Debian package dataset-fashion-mnist is not installed")
def test_reads_the_debian_package_with_torchvision(tmp_path):
    (xtr, ytr), (xte, yte) = load_fashion_mnist(FMNIST, tmp_path)
    assert xtr.shape == (60000, 28, 28) and xte.shape == (10000, 28, 28) and xtr.dtype == torch.uint8
    assert torch.bincount(yte).tolist() == [1000] * 10


def test_normalisation_uses_the_specs_mean_and_std():
    from dfq.fp32.models import INPUT_SPECS, input_spec

    x = torch.tensor([[[0, 73, 128, 255]]], dtype=torch.uint8)  # (1, 1, 4)
    expected = (x.float() / 255 - 0.2860) / 0.3530
    assert torch.allclose(FASHION_MNIST_SPEC.normalize(x), expected.unsqueeze(1), atol=1e-6)
    assert FASHION_MNIST_SPEC.to_dict() == {"shape": [1, 28, 28], "mean": [0.2860], "std": [0.3530]}
    assert input_spec("fmnist_resnet") == FASHION_MNIST_SPEC.to_dict()
    # ImageNet statistics per channel, in RGB order, for CIFAR and torchvision models
    for arch in ("cifar_resnet20", "resnet18"):
        spec = InputSpec.from_dict(input_spec(arch))
        assert spec.mean == pytest.approx((0.485, 0.456, 0.406)) and spec.std == pytest.approx((0.229, 0.224, 0.225))
    rgb = torch.tensor([0.2, 0.5, 0.9]).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    out = InputSpec.from_dict(INPUT_SPECS["imagenet"]).normalize(rgb)
    for c, (m, s) in enumerate(zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))):
        assert torch.allclose(out[:, c], torch.full((2, 2, 2), (rgb[0, c, 0, 0].item() - m) / s), atol=1e-6)


@pytest.mark.skipif(not FMNIST.is_dir(), reason="Debian package dataset-fashion-mnist is not installed")
def test_fashion_mnist_mean_and_std_are_the_training_sets(tmp_path):
    (xtr, _), _ = load_fashion_mnist(FMNIST, tmp_path)
    x = xtr.double() / 255
    assert x.mean().item() == pytest.approx(FASHION_MNIST_SPEC.mean[0], abs=5e-4)
    assert x.std().item() == pytest.approx(FASHION_MNIST_SPEC.std[0], abs=5e-4)


def test_imagenet_evaluation_transform_resizes_to_256_and_crops_224(tmp_path):
    """An ImageNet-size model's evaluation images: shorter side resized to 256 (bilinear), then the
    central 224 x 224, to [0, 1], normalised; built here with PIL and numpy, without torchvision."""
    import json

    import numpy as np
    from PIL import Image

    from dfq.fp32.datasets import default_resize, folder_manifest, open_eval_dataset
    from dfq.fp32.models import input_spec

    spec = InputSpec.from_dict(input_spec("resnet18"))
    assert spec.shape == (3, 224, 224) and default_resize(spec) == 256
    assert default_resize(InputSpec.from_dict(input_spec("inception_v3"))) == 342
    assert default_resize(InputSpec.from_dict(input_spec("cifar_resnet20"))) == 0
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (320, 480, 3), dtype=np.uint8)  # H 320, W 480: shorter side 320
    (tmp_path / "val" / "n01").mkdir(parents=True)
    Image.fromarray(pixels).save(tmp_path / "val" / "n01" / "a.png")
    manifest = folder_manifest(tmp_path / "val", "data.test_dir")
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "manifest.json").write_text(json.dumps({**manifest, "resize": None}))
    x, label = open_eval_dataset(tmp_path / "eval", spec)[0]
    resized = np.asarray(Image.fromarray(pixels).resize((384, 256), Image.BILINEAR), dtype=np.float32) / 255
    top, left = (256 - 224) // 2, (384 - 224) // 2
    crop = resized[top : top + 224, left : left + 224]
    expected = (torch.from_numpy(crop).permute(2, 0, 1) - torch.tensor(spec.mean).view(3, 1, 1)) / torch.tensor(
        spec.std
    ).view(3, 1, 1)
    assert label == 0 and x.shape == (3, 224, 224)
    assert torch.allclose(x, expected, atol=1e-5)


def _old_pool(images, num_images, seed):
    """The real pool as the data stage drew it before the validation split existed (its formula, copied)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(images), generator=g)[:num_images]
    return images[idx.sort().values]


@pytest.mark.parametrize(
    "n, pool, val, seed", [(5000, 2048, 2500, 0), (60000, 2048, 5000, 0), (1000, 64, 200, 7), (100, 40, 60, 3)]
)
def test_validation_split_is_disjoint_from_the_pool_and_the_pool_is_unchanged(n, pool, val, seed):
    from dfq.fp32.datasets import split_indices

    pool_idx, val_idx = split_indices(n, pool, val, seed)
    images = torch.arange(n) * 3 + 1  # distinct "images": an image's value names its index
    assert torch.equal(images[pool_idx], _old_pool(images, pool, seed))  # the real pool did not move
    assert torch.equal(calibration_subset(images, pool, seed), _old_pool(images, pool, seed))
    assert len(val_idx) == val and len(set(val_idx.tolist())) == val and 0 <= val_idx.min() and val_idx.max() < n
    assert not set(val_idx.tolist()) & set(pool_idx.tolist())  # disjoint from every draw of the pool
    assert torch.equal(val_idx, val_idx.sort().values)
    # independently: the next ``val`` entries of the same seeded permutation
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    assert val_idx.tolist() == sorted(perm[pool : pool + val])
    assert torch.equal(split_indices(n, pool, 0, seed)[0], pool_idx)  # the pool does not depend on val
    assert len(split_indices(n, pool, 0, seed)[1]) == 0


def test_too_few_training_images_name_the_param():
    from dfq.fp32.datasets import split_indices

    with pytest.raises(
        ValueError, match=r"data.val_images=2953: .*real pool \(2048 images, data.real_pool\) need 5001 .*only 5000"
    ):
        split_indices(5000, 2048, 2953, 0)
    with pytest.raises(ValueError, match="data.real_pool=5001 exceeds the 5000 training images"):
        split_indices(5000, 5001, 0, 0)
    assert len(split_indices(5000, 2048, 2952, 0)[1]) == 2952  # exactly every image


def test_schema_bounds_the_fashion_mnist_validation_split():
    import copy

    import yaml

    from dfq.pipeline.schema import ParamsError, validate

    good = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    assert good["data"]["val_images"] == 5000

    def with_data(**kw):
        p = copy.deepcopy(good)
        p["data"].update(kw)
        return p

    assert validate(with_data(val_images=60000 - 2048)).data.val_images == 57952
    assert validate(with_data(val_images=0)).data.val_images == 0
    p = copy.deepcopy(good)
    del p["data"]["val_images"]
    assert validate(p).data.val_images == 0  # params from before the split: none
    with pytest.raises(ParamsError, match=r"data.val_images=57953: .*data.real_pool=2048.* 60000 Fashion-MNIST"):
        validate(with_data(val_images=57953))
    with pytest.raises(ParamsError, match="data.val_images: Input should be greater than or equal to 0"):
        validate(with_data(val_images=-1))
    # an image folder is counted by the data stage (test_data_stage_on_an_image_folder)
    assert validate(with_data(dataset="imagefolder", test_dir="t", train_dir="t", val_images=99999))


def _run_data_stage(tmp_path, data: dict, model: dict | None = None):
    import os
    import subprocess
    import sys

    import yaml

    root = Path(__file__).resolve().parents[1]
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"].update(data)
    params["model"].update(model or {})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "DFQ_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "stages.data"], cwd=tmp_path, env=env, capture_output=True, text=True)


@pytest.mark.skipif(not FMNIST.is_dir(), reason="Debian package dataset-fashion-mnist is not installed")
def test_data_stage_writes_the_validation_split(tmp_path):
    """data/prepared/val/val.pt: the training images and labels at the next val_images indices of the pool's
    permutation (recomputed here), readable like the test set; the pool is the old formula's; meta counts them."""
    import json

    from dfq.fp32.datasets import open_eval_dataset
    from dfq.io import load_torch

    r = _run_data_stage(tmp_path, {"real_pool": 300, "val_images": 500, "seed": 5})
    assert r.returncode == 0, r.stderr
    out = tmp_path / "data/prepared"
    (xtr, ytr), _ = load_fashion_mnist(FMNIST, tmp_path / "cache")
    perm = torch.randperm(60000, generator=torch.Generator().manual_seed(5)).tolist()
    pool, val = sorted(perm[:300]), sorted(perm[300:800])
    got = load_torch(out / "val/val.pt")
    assert (
        got["images"].dtype == torch.uint8
        and torch.equal(got["images"], xtr[val])
        and torch.equal(got["labels"], ytr[val])
    )
    assert torch.equal(load_torch(out / "calib_real.pt"), FASHION_MNIST_SPEC.normalize(_old_pool(xtr, 300, 5)))
    assert torch.equal(load_torch(out / "calib_real.pt"), FASHION_MNIST_SPEC.normalize(xtr[pool]))
    assert not set(pool) & set(val)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["val_images"] == 500 and meta["calib_real"] == [300, 1, 28, 28]
    ds = open_eval_dataset(out / "val", FASHION_MNIST_SPEC)
    assert len(ds) == 500 and torch.equal(ds[7][0], FASHION_MNIST_SPEC.normalize(xtr[val[7] : val[7] + 1])[0])
    assert len(open_eval_dataset(out / "eval", FASHION_MNIST_SPEC)) == 10000


def test_data_stage_on_an_image_folder(tmp_path):
    """An ImageFolder: the validation manifest lists val_images training files, none of them in the pool (the
    pool keeps its min(real_pool, files) rule); pool + val_images beyond the folder stops the stage with a message
    naming data.val_images and writes nothing."""
    import json

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, per_class in (("train", 6), ("test", 2)):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                    tmp_path / split / c / f"{i}.png"
                )
    (tmp_path / "w.th").write_bytes(b"not read by the data stage")
    folder = {
        "dataset": "imagefolder",
        "test_dir": str(tmp_path / "test"),
        "train_dir": str(tmp_path / "train"),
        "resize": 0,
        "num_images": 4,
    }
    model = {"arch": "cifar_resnet20", "weights": str(tmp_path / "w.th")}
    r = _run_data_stage(tmp_path, {**folder, "real_pool": 5, "val_images": 8}, model)
    assert r.returncode != 0 and "data.val_images=8" in r.stderr and "only 12 exist" in r.stderr, r.stderr
    assert not (tmp_path / "data/prepared").exists()
    r = _run_data_stage(tmp_path, {**folder, "real_pool": 5, "val_images": 7}, model)
    assert r.returncode == 0, r.stderr
    train = json.loads((tmp_path / "data/prepared/train/manifest.json").read_text())["files"]
    val = json.loads((tmp_path / "data/prepared/val/manifest.json").read_text())
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0)).tolist()
    assert val["files"] == [train[i] for i in sorted(perm[5:12])] and val["resize"] == 0
    pool = {tuple(train[i]) for i in perm[:5]}
    assert len(val["files"]) == 7 and not pool & {tuple(f) for f in val["files"]}
    # a folder smaller than data.real_pool: all of it is the pool (as before), no room for a validation split
    r = _run_data_stage(tmp_path, {**folder, "real_pool": 50, "val_images": 1}, model)
    assert (
        r.returncode != 0 and "data.val_images=1: " in r.stderr and "(12 images, data.real_pool=50 capped" in r.stderr
    )
    r = _run_data_stage(tmp_path, {**folder, "real_pool": 50, "val_images": 0}, model)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "data/prepared/meta.json").read_text())["calib_real"] == [12, 3, 32, 32]
    assert json.loads((tmp_path / "data/prepared/val/manifest.json").read_text())["files"] == []
