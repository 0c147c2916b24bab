"""Stage fp32: load model.weights (or train the embedded model) and measure its FP32 accuracy on the test set and
the validation split (metrics/fp32.json: top1, top5, val_top1, val_top5 and env, what decided them)."""

import json

from dfq.pipeline import paths
from stages._common import device, read_params, resolve_path, save_metrics, setup_torch, workers


def main() -> None:
    params = read_params()
    torch = setup_torch()
    from dfq.fp32 import models
    from dfq.fp32.datasets import InputSpec
    from dfq.fp32.evaluate import split_accuracy
    from dfq.fp32.train import train_classifier
    from dfq.io import load_torch

    meta = json.loads(paths.PREPARED_META.read_text())
    spec, num_classes, arch = InputSpec.from_dict(meta["input_spec"]), meta["num_classes"], params.model.arch
    weights, train_data = params.model.weights, paths.PREPARED / "train" / "train.pt"
    try:
        torch.manual_seed(params.train.seed)  # the weight init too, so training is reproducible
        model = models.build_model(arch, num_classes)
        if weights == "torchvision":
            print(f"loading torchvision's pretrained {arch} (torch hub cache, or a download when online)", flush=True)
            models.load_torchvision_weights(model, arch, "the dataset")
        elif weights:
            path = resolve_path(weights, "model.weights")
            print(f"loading FP32 weights from {path}", flush=True)
            models.load_state_dict(model, load_torch(path), f"model.weights={weights}", "the dataset")
        elif train_data.is_file():
            train = load_torch(train_data)
            print(f"training {arch} ({models.count_bn(model)} BN layers) for {params.train.epochs} epochs", flush=True)
            model = train_classifier(model, train["images"], train["labels"], spec, params.train)
        else:
            raise ValueError(
                f"model.weights is null but data.dataset={meta['dataset']!r} has no training tensors: "
                "give model.weights (a state-dict file, or 'torchvision')"
            )
        models.check_classes(model, spec.to_dict(), num_classes)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    try:
        b = params.evaluate.batch_size
        metrics = split_accuracy(model, spec, paths.PREPARED, b, device(), workers(), "evaluate fp32")
    except FileNotFoundError as exc:
        raise SystemExit(str(exc)) from None
    models.save_checkpoint(model.cpu(), arch, num_classes, spec.to_dict(), paths.FP32)
    save_metrics(metrics, paths.FP32_METRICS)
    val = f", validation top-1 {metrics['val_top1']:.2f}%" if "val_top1" in metrics else ""
    print(f"FP32 top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}% (test){val}")


if __name__ == "__main__":
    main()
