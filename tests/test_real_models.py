"""Real models and folders: the shared CIFAR-10 ResNet-20, ImageFolder manifests, class-count checks."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from dfq.fp32.datasets import InputSpec, ManifestDataset, folder_manifest, folder_transform, open_eval_dataset
from dfq.fp32.evaluate import evaluate, make_loader
from dfq.fp32.models import build_model, check_classes, count_bn, input_spec, load_state_dict
from dfq.io import load_torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
CKPT = SHARED / "models" / "resnet20-12fca82f.th"
CIFAR_TEST = SHARED / "data" / "cifar10-jpeg" / "test"
needs_shared = pytest.mark.skipif(
    not (CKPT.is_file() and CIFAR_TEST.is_dir()),
    reason="../shared (CIFAR-10 JPEGs + ResNet-20 checkpoint) is not beside the repo",
)


def make_folder(root: Path, classes=("cat", "dog", "emu"), per_class=2, size=(40, 30)):
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", size, color=(40 * c, 10 * i, 200)).save(root / name / f"{i}.png")
    return root


def test_imagefolder_manifest_and_dataset(tmp_path):
    root = make_folder(tmp_path / "imgs")
    m = folder_manifest(root, "data.test_dir")
    assert m["classes"] == ["cat", "dog", "emu"] and len(m["files"]) == 6
    assert [label for _, label in m["files"]] == [0, 0, 1, 1, 2, 2]
    spec = InputSpec((3, 24, 24), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    ds = ManifestDataset(m, folder_transform(spec, 28))
    x, y = ds[4]
    assert x.shape == (3, 24, 24) and y == 2
    # blue channel 200/255 normalised
    assert torch.allclose(x[2], torch.full((24, 24), (200 / 255 - 0.5) / 0.25), atol=1e-5)
    Image.new("RGB", (40, 30)).save(root / "emu" / "2.png")
    assert folder_manifest(root, "data.test_dir")["fingerprint"] != m["fingerprint"]


def test_not_a_folder_names_the_param(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.train_dir="):
        folder_manifest(tmp_path / "missing", "data.train_dir")


def test_class_count_mismatch_is_clear():
    model = build_model("cifar_resnet20", 10)
    with pytest.raises(ValueError, match="model predicts 10 classes but the dataset has 1000"):
        check_classes(model, input_spec("cifar_resnet20"), 1000)
    check_classes(model, input_spec("cifar_resnet20"), 10)


def test_input_specs_follow_the_model():
    assert input_spec("inception_v3")["shape"] == [3, 299, 299]
    assert input_spec("resnet18")["shape"] == [3, 224, 224]
    assert input_spec("cifar_resnet56")["shape"] == [3, 32, 32]


def test_user_model_from_module_callable():
    m = build_model("tests.conftest:TinyBN")
    assert count_bn(m) == 2
    with pytest.raises(ValueError, match="cannot import"):
        build_model("tests.conftest:Nope")


@needs_shared
def test_shared_resnet20_loads_strictly_and_scores_80(tmp_path):
    model = load_state_dict(build_model("cifar_resnet20"), load_torch(CKPT), str(CKPT))
    assert count_bn(model) == 19 and sum(p.numel() for p in model.parameters()) == 269_722
    manifest = folder_manifest(CIFAR_TEST, "data.test_dir")
    assert len(manifest["files"]) == 10_000
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    (eval_dir / "manifest.json").write_text(json.dumps({**manifest, "resize": 0}))
    spec = InputSpec.from_dict(input_spec("cifar_resnet20"))
    top = evaluate(model, make_loader(open_eval_dataset(eval_dir, spec), 500, workers=2))
    assert top["top1"] >= 80.0, top
