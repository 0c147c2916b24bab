"""Stage fp32: load model.weights (or train the embedded model) and measure its FP32 accuracy on the test set and
the validation split (metrics/fp32.json: top1, top5, val_top1, val_top5 and env, what decided them)."""
import json
from pathlib import Path

from stages._common import accuracy, load_params, resolve_path, save_metrics, setup_torch

DATA = "data/prepared"


def main() -> None:
    model_p, train_p, eval_p = load_params("model", "train", "evaluate")
    torch = setup_torch()
    from dfq.fp32 import models
    from dfq.fp32.datasets import InputSpec
    from dfq.io import load_torch
    from dfq.fp32.train import train_classifier

    meta = json.loads(Path(DATA, "meta.json").read_text())
    spec, num_classes, arch = InputSpec.from_dict(meta["input_spec"]), meta["num_classes"], model_p["arch"]
    try:
        torch.manual_seed(train_p["seed"])  # the weight init too, so training is reproducible
        model = models.build_model(arch, num_classes)
        weights = model_p.get("weights")
        if weights == "torchvision":
            print(f"loading torchvision's pretrained {arch} (torch hub cache, or a download when online)", flush=True)
            models.load_torchvision_weights(model, arch, "the dataset")
        elif weights:
            path = resolve_path(weights, "model.weights")
            print(f"loading FP32 weights from {path}", flush=True)
            models.load_state_dict(model, load_torch(path), f"model.weights={weights}", "the dataset")
        elif Path(DATA, "train", "train.pt").is_file():
            train = load_torch(Path(DATA, "train", "train.pt"))
            n = train_p.get("max_images") or len(train["labels"])
            print(f"training {arch} ({models.count_bn(model)} BN layers) for {train_p['epochs']} epochs", flush=True)
            model = train_classifier(model, train["images"][:n], train["labels"][:n], spec, epochs=train_p["epochs"],
                                     batch_size=train_p["batch_size"], lr=train_p["lr"],
                                     weight_decay=train_p["weight_decay"], seed=train_p["seed"])
        else:
            raise ValueError(f"model.weights is null but data.dataset={meta['dataset']!r} has no training tensors: "
                             "give model.weights (a state-dict file, or 'torchvision')")
        models.check_classes(model, spec.to_dict(), num_classes)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    metrics = accuracy(model, spec, eval_p["batch_size"], "evaluate fp32", DATA)
    models.save_checkpoint(model.cpu(), arch, num_classes, spec.to_dict(), "models/fp32.pt")
    save_metrics(metrics, "metrics/fp32.json")
    val = f", validation top-1 {metrics['val_top1']:.2f}%" if "val_top1" in metrics else ""
    print(f"FP32 top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}% (test){val}")


if __name__ == "__main__":
    main()
