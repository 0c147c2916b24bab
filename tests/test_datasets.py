from pathlib import Path

import pytest
import torch

from dfq.datasets import FASHION_MNIST_SPEC, InputSpec, NormalizedTensorDataset, calibration_subset, load_fashion_mnist

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
    from dfq.models import INPUT_SPECS, input_spec

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

    from dfq.datasets import default_resize, folder_manifest, open_eval_dataset
    from dfq.models import input_spec

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
    crop = resized[top:top + 224, left:left + 224]
    expected = (torch.from_numpy(crop).permute(2, 0, 1) - torch.tensor(spec.mean).view(3, 1, 1)) / torch.tensor(
        spec.std).view(3, 1, 1)
    assert label == 0 and x.shape == (3, 224, 224)
    assert torch.allclose(x, expected, atol=1e-5)
