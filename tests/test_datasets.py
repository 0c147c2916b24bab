from pathlib import Path

import pytest
import torch

from dfq.datasets import FASHION_MNIST_SPEC, NormalizedTensorDataset, calibration_subset, load_fashion_mnist

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
    with pytest.raises(ValueError, match="data.num_images=2000"):
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
