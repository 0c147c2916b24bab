"""Datasets: Fashion-MNIST (the embedded default) read with torchvision's own reader.

The Debian package ``dataset-fashion-mnist`` ships the four gzipped IDX files under
``/usr/share/datasets/fashion-mnist``. torchvision's ``FashionMNIST`` reads them once they sit in its
``<root>/FashionMNIST/raw`` layout, so we unpack them there (a cache folder) and let torchvision parse
them. When the files are absent and ``download`` is allowed, torchvision downloads them (online users).
"""

from __future__ import annotations

import gzip
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from dfq.io import load_torch, save_json, save_torch

FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
FASHION_MNIST_TRAIN_IMAGES = 60000  # the training set: the real pool and the validation split are drawn from it
# Mean and std of the Fashion-MNIST training images in [0, 1].
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

NO_DATA_HELP = (
    "Fashion-MNIST not found. Provide it in one of these ways: "
    "(1) `apt-get install dataset-fashion-mnist` (Debian/Ubuntu) which installs the IDX files under "
    "/usr/share/datasets/fashion-mnist; (2) put the four files {files} (gzipped or not) in a folder and "
    "set data.root to it; (3) set data.download: true on a machine with internet access."
)


@dataclass(frozen=True)
class InputSpec:
    """What the model expects: shape of one image, the normalisation that maps [0, 1] to it and, for
    pretrained ImageNet models, the shorter side to resize to before the center crop (None: the
    256/224 rule of ``default_resize``)."""

    shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: int | None = None

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W) / (N, C, H, W) or float [0, 1] images -> normalised float (N, C, H, W)."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if x.dim() == 3:
            x = x.unsqueeze(1)
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return (x - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return x * std + mean

    def to_dict(self) -> dict:
        d = {"shape": list(self.shape), "mean": list(self.mean), "std": list(self.std)}
        return d if self.resize is None else {**d, "resize": self.resize}

    @classmethod
    def from_dict(cls, d: dict) -> "InputSpec":
        return cls(tuple(d["shape"]), tuple(d["mean"]), tuple(d["std"]), d.get("resize"))


FASHION_MNIST_SPEC = InputSpec((1, 28, 28), FASHION_MNIST_MEAN, FASHION_MNIST_STD)


def _stage_raw_files(src: Path, cache: Path) -> bool:
    """Copy/unpack the IDX files from ``src`` into torchvision's layout under ``cache``."""
    raw = cache / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in FASHION_MNIST_FILES:
        target = raw / name
        if target.exists():
            continue
        if (src / name).is_file():
            shutil.copyfile(src / name, target)
        elif (src / f"{name}.gz").is_file():
            tmp = target.with_suffix(".part")
            with gzip.open(src / f"{name}.gz", "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout)
            tmp.rename(target)
        else:
            return False
    return True


def load_fashion_mnist(root: str | Path, cache: str | Path, download: bool = False):
    """Return (train, test) as uint8 image tensors (N, 28, 28) and int64 label tensors.

    ``root`` holds the IDX files (gzipped or not); ``cache`` is a scratch folder for torchvision.
    """
    from torchvision.datasets import FashionMNIST

    root, cache = Path(root), Path(cache)
    if not _stage_raw_files(root, cache) and not download:
        raise FileNotFoundError(f"data.root={root}: " + NO_DATA_HELP.format(files=", ".join(FASHION_MNIST_FILES)))
    try:
        train = FashionMNIST(str(cache), train=True, download=download)
        test = FashionMNIST(str(cache), train=False, download=download)
    except RuntimeError as exc:  # torchvision: "Dataset not found" or a failed download
        raise FileNotFoundError(
            f"data.root={root}: {exc}. " + NO_DATA_HELP.format(files=", ".join(FASHION_MNIST_FILES))
        ) from exc
    return (train.data.clone(), train.targets.clone()), (test.data.clone(), test.targets.clone())


def split_indices(
    n: int, pool: int, val: int, seed: int, pool_param: str = "data.real_pool", val_param: str = "data.val_images"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (sorted) of the real calibration pool and of the validation split among ``n`` training images.

    One seeded permutation ``randperm(n, Generator().manual_seed(seed))``: the pool is its first ``pool``
    indices (what the data stage always drew, so the pool does not depend on ``val``), the validation
    split the next ``val``. Disjoint by construction, so no real calibration or fine-tuning draw (they
    come from the pool) ever sees a validation image. Too few images: a ValueError naming the param.

    Args:
        n: number of training images; indices are drawn from 0 .. n - 1.
        pool: size of the real calibration pool: the first ``pool`` indices of the permutation (at most ``n``).
        val: size of the validation split: the next ``val`` indices (0: an empty split); pool + val <= n.
        seed: seed of the one permutation (``torch.Generator().manual_seed(seed)``).
        pool_param: the params key the too-few-images error names for ``pool``.
        val_param: the params key the too-few-images error names for ``val``.
    """
    if pool > n:
        raise ValueError(f"{pool_param}={pool} exceeds the {n} training images")
    if pool + val > n:
        raise ValueError(
            f"{val_param}={val}: the validation split and the real pool ({pool} images, {pool_param}) "
            f"need {pool + val} distinct training images, only {n} exist: lower {val_param} (0: no "
            "validation split)"
        )
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    return perm[:pool].sort().values, perm[pool : pool + val].sort().values


def calibration_subset(images: torch.Tensor, num_images: int, seed: int, param: str = "data.real_pool") -> torch.Tensor:
    """Seeded random choice of ``num_images`` distinct training images (no labels: calibration only):
    the pool of ``split_indices``."""
    return images[split_indices(len(images), num_images, 0, seed, pool_param=param)[0]]


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".webp")


def folder_manifest(root: str | Path, param: str) -> dict:
    """The files of an ImageFolder (<root>/<class>/<image>) as a manifest: classes, (path, label) pairs
    and a fingerprint of names and sizes, so that DVC sees when the folder changes."""
    import hashlib

    from torchvision.datasets.folder import find_classes, make_dataset

    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{param}={root}: not a folder")
    try:
        classes, class_to_idx = find_classes(str(root))
        samples = make_dataset(str(root), class_to_idx, extensions=IMAGE_EXTENSIONS)
    except (FileNotFoundError, RuntimeError) as exc:
        raise FileNotFoundError(f"{param}={root}: not an ImageFolder (<dir>/<class>/<image>): {exc}") from exc
    files = [[str(Path(p).relative_to(root)), label] for p, label in samples]
    h = hashlib.sha256()
    for (rel, label), (p, _) in zip(files, samples):
        h.update(f"{rel}:{label}:{Path(p).stat().st_size}\n".encode())
    return {"root": str(root), "classes": classes, "files": files, "fingerprint": h.hexdigest()}


def folder_transform(spec: InputSpec, resize: int | None = None):
    """Resize the shorter side to ``resize`` (None: the model's default, 0: no resize), center-crop to
    the model's input size, to tensor, normalise."""
    from torchvision import transforms as T

    if resize is None:
        resize = default_resize(spec)
    steps = [T.Resize(resize)] if resize else []
    return T.Compose([*steps, T.CenterCrop(spec.shape[1:]), T.ToTensor(), T.Normalize(spec.mean, spec.std)])


class ManifestDataset(torch.utils.data.Dataset):
    """Images listed in a folder manifest, read with PIL and transformed like torchvision's ImageFolder."""

    def __init__(self, manifest: dict, transform, channels: int = 3):
        self.root, self.files, self.transform = Path(manifest["root"]), manifest["files"], transform
        self.mode = "RGB" if channels == 3 else "L"

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        rel, label = self.files[i]
        with Image.open(self.root / rel) as img:
            return self.transform(img.convert(self.mode)), label


def default_resize(spec: InputSpec) -> int:
    """The spec's own resize (a pretrained torchvision model's preprocessing), else for ImageNet-size
    models 256/224 of the crop (256 for 224, 342 for 299); small models: none."""
    if spec.resize is not None:
        return spec.resize
    size = spec.shape[1]
    return 0 if size <= 64 else int(round(size * 256 / 224))


def open_eval_dataset(eval_dir: str | Path, spec: InputSpec):
    """An evaluation set written by the data stage (the test set data/prepared/eval, the validation split
    data/prepared/val): uint8 tensors (test.pt, val.pt) or a folder manifest."""
    import json

    eval_dir = Path(eval_dir)
    for name in ("test.pt", "val.pt"):  # data/prepared/eval/test.pt, data/prepared/val/val.pt
        if (eval_dir / name).is_file():
            test = load_torch(eval_dir / name)
            return NormalizedTensorDataset(test["images"], test["labels"], spec)
    manifest = json.loads((eval_dir / "manifest.json").read_text())
    return ManifestDataset(manifest, folder_transform(spec, manifest.get("resize")), spec.shape[0])


class NormalizedTensorDataset(torch.utils.data.Dataset):
    """uint8 images + labels served as normalised float images (for DataLoader with workers)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, spec: InputSpec):
        self.images, self.labels, self.spec = images, labels, spec

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.spec.normalize(self.images[i : i + 1])[0], self.labels[i]

    def __getitems__(self, idx):  # batched fetch: one normalisation per batch, not per image
        idx = torch.as_tensor(idx)
        x = self.spec.normalize(self.images[idx])
        return list(zip(x, self.labels[idx]))


@dataclass
class Prepared:
    """What the data stage prepared: the input spec, class names, the real pool (normalised), eval/val counts."""

    spec: InputSpec
    classes: list[str]
    pool: torch.Tensor
    eval_images: int
    val_images: int


def prepare_fashion_mnist(root: Path, download: bool, out: Path, pool: int, val: int, seed: int) -> Prepared:
    """Fashion-MNIST's IDX files as uint8 tensors in ``out``/{train,eval,val}: the training and test sets, and the
    validation split (``val`` training images disjoint from the real pool of ``pool``, ``split_indices``).

    Args:
        root: the IDX files' folder (Debian's dataset-fashion-mnist).
        download: download with torchvision when the files are missing.
        out: the output folder, with train/, eval/ and val/ subfolders.
        pool: data.real_pool: training images kept for the real calibration source.
        val: data.val_images: the validation split's size (0: none).
        seed: data.seed: the permutation both are drawn from.
    """
    import tempfile

    with tempfile.TemporaryDirectory(prefix="dfq-fmnist-") as cache:
        (xtr, ytr), (xte, yte) = load_fashion_mnist(Path(root).expanduser(), cache, download)
    save_torch({"images": xtr, "labels": ytr}, out / "train" / "train.pt")
    save_torch({"images": xte, "labels": yte}, out / "eval" / "test.pt")
    pick, keep = split_indices(len(xtr), pool, val, seed)
    calib = FASHION_MNIST_SPEC.normalize(xtr[pick])  # = calibration_subset(xtr, pool, seed), as before
    save_torch({"images": xtr[keep], "labels": ytr[keep]}, out / "val" / "val.pt")
    return Prepared(FASHION_MNIST_SPEC, list(FASHION_MNIST_CLASSES), calib, len(xte), len(keep))


def prepare_image_folders(
    test_dir: Path, train_dir: Path, resize: int | None, spec: InputSpec, out: Path, pool: int, val: int, seed: int
) -> Prepared:
    """<dir>/<class>/<image> folders read in place through manifests in ``out``/{train,eval,val}; the real pool
    (at most the whole training folder) decoded and normalised, the validation split as a manifest.

    Args:
        test_dir: the evaluation images (data.test_dir).
        train_dir: the images the real pool and the validation split are drawn from (data.train_dir).
        resize: shorter side before the center crop (None: per model; 0: none).
        spec: the model's input spec.
        out: the output folder, with train/, eval/ and val/ subfolders.
        pool: data.real_pool (capped to the folder's size).
        val: data.val_images.
        seed: data.seed.
    """
    test, train = folder_manifest(test_dir, "data.test_dir"), folder_manifest(train_dir, "data.train_dir")
    save_json({**test, "resize": resize}, out / "eval" / "manifest.json")
    save_json({**train, "resize": resize}, out / "train" / "manifest.json")
    n = min(pool, len(train["files"]))  # a small folder: all of it
    param = "data.real_pool" if n == pool else f"data.real_pool={pool} capped to the folder"
    pick, keep = split_indices(len(train["files"]), n, val, seed, param)
    save_json({**train, "files": [train["files"][i] for i in keep], "resize": resize}, out / "val" / "manifest.json")
    folder = ManifestDataset(train, folder_transform(spec, resize), spec.shape[0])
    calib = torch.stack([folder[int(i)][0] for i in pick])
    return Prepared(spec, test["classes"], calib, len(test["files"]), len(keep))
