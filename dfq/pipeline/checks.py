"""The checks of params.yaml that need the model: its class count against the dataset's (weights included when
given as a file), and BatchNorm layers for the BN-statistic sources. Run by ``python -m cli.validate`` (``make
repro`` runs it before ``dvc repro``); the stages themselves validate params.yaml with ``dfq.pipeline.schema``.
"""

from __future__ import annotations

from pathlib import Path

from dfq.fp32.models import build_model, check_classes, count_bn, input_spec, load_state_dict
from dfq.io import load_torch
from dfq.pipeline.schema import Params, ParamsError, resolve, weights_file


def dataset_classes(p: Params, roots: list[Path]) -> int:
    """Class count of the configured dataset (Fashion-MNIST: 10; ImageFolder: its class folders)."""
    if p.data.dataset == "fashion_mnist":
        return 10
    folder = resolve(p.data.test_dir, roots)
    return sum(1 for d in folder.iterdir() if d.is_dir()) if folder else 0


def check_model(p: Params, roots: list[Path] | None = None) -> None:
    """The model's class count matches the dataset's (weights included when given as a file), and a
    model without BatchNorm is not asked to feed BN-statistic sources (zeroq, dsg)."""
    roots = roots or [Path.cwd()]
    classes = dataset_classes(p, roots)
    where = f"the ImageFolder data.test_dir={p.data.test_dir}" if p.data.dataset == "imagefolder" else "the dataset"
    try:
        model = build_model(p.model.arch, classes or 10)
        weights = p.model.weights and p.model.weights != "torchvision" and resolve(p.model.weights, roots)
        if weights:
            load_state_dict(
                model,
                load_torch(weights_file(p.model.weights, weights)),
                f"model.weights={p.model.weights}",
                where if classes else "the model",
            )
        spec = input_spec(p.model.arch) or (
            input_spec("fmnist_resnet") if p.data.dataset == "fashion_mnist" else input_spec("resnet18")
        )
        if classes:
            check_classes(model, spec, classes, where)
    except (ValueError, RuntimeError) as exc:
        raise ParamsError(f"params.yaml: {exc}") from None
    bn_sources = [s for s in p.generate.sources if p.generate.method(s) in ("zeroq", "dsg")]
    if bn_sources and count_bn(model) == 0:
        raise ParamsError(
            f"params.yaml: model.arch={p.model.arch!r} has no BatchNorm layers, but generate.sources "
            f"asks for BN-statistic sources {bn_sources}: use gaussian or real only"
        )
