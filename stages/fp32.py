"""Stage fp32: train the embedded model (or load model.weights) and measure its FP32 accuracy."""
import json
from pathlib import Path

from stages._common import device, load_params, resolve_path, setup_torch, workers

DATA = "data/prepared"


def main() -> None:
    model_p, train_p, eval_p = load_params("model", "train", "evaluate")
    setup_torch()
    from dfq import models
    from dfq.datasets import InputSpec, NormalizedTensorDataset
    from dfq.evaluate import evaluate, make_loader
    from dfq.io import load_torch, save_json
    from dfq.train import train_classifier

    meta = json.loads(Path(DATA, "meta.json").read_text())
    spec, num_classes = InputSpec.from_dict(meta["input_spec"]), meta["num_classes"]
    try:
        model = models.build_model(model_p["arch"], num_classes)
        if model_p.get("weights"):
            path = resolve_path(model_p["weights"], "model.weights")
            print(f"loading FP32 weights from {path}", flush=True)
            models.load_state_dict(model, load_torch(path), str(path))
        else:
            train = load_torch(Path(DATA, "train.pt"))
            n = train_p.get("max_images") or len(train["labels"])
            print(f"training {model_p['arch']} ({models.count_bn(model)} BN layers) for {train_p['epochs']} epochs",
                  flush=True)
            model = train_classifier(model, train["images"][:n], train["labels"][:n], spec, epochs=train_p["epochs"],
                                     batch_size=train_p["batch_size"], lr=train_p["lr"],
                                     weight_decay=train_p["weight_decay"], seed=train_p["seed"])
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    test = load_torch(Path(DATA, "test.pt"))
    loader = make_loader(NormalizedTensorDataset(test["images"], test["labels"], spec), eval_p["batch_size"], workers())
    metrics = evaluate(model, loader, device(), desc="evaluate fp32")
    models.save_checkpoint(model.cpu(), model_p["arch"], num_classes, spec.to_dict(), "models/fp32.pt")
    save_json({"top1": metrics["top1"], "top5": metrics["top5"]}, "metrics/fp32.json")
    print(f"FP32 top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%")


if __name__ == "__main__":
    main()
