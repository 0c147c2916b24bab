"""The choices the README makes from measured accuracy, remade on the validation split (issue 22).

Runs on the outputs of a pipeline run (``dvc repro`` of a profile in a scratch clone): models/fp32.pt,
data/prepared/ (test manifest, training manifest, real pool) and the calibration sets data/calib/<set>/.
Every cell is scored on the validation split (training images disjoint from the real pool, drawn as the data
stage draws them: ``dfq.fp32.datasets.split_indices``) and on the test set; a choice reads only the ``val_top1``
column, the test column is reported for what was chosen. One CSV row per cell, appended as it finishes (a
rerun skips the rows already there).

    # act_method per protocol, and the DSG recipe, on every set of data/calib (W4A4)
    python docs/studies/validation_choices.py act  RUN_DIR out.csv
    # fine-tuning lr x epochs probe (brecq protocol, W4A4, real images: 228 calibrate, 342 fine-tune)
    python docs/studies/validation_choices.py finetune RUN_DIR out.csv --seeds 0 --lrs 3e-5 1e-4 3e-4 1e-3 --epochs 5 10 20
    # the tables (markdown): mean ± std over seeds of val_top1 (what chooses) and top1 (what is reported)
    python docs/studies/validation_choices.py tables - out.csv
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dfq.fp32.datasets import InputSpec, ManifestDataset, folder_transform, open_eval_dataset, split_indices  # noqa: E402
from dfq.fp32.evaluate import evaluate, make_loader  # noqa: E402
from dfq.fp32.models import load_checkpoint  # noqa: E402
from dfq.io import load_torch  # noqa: E402
from dfq.quant.observers import make_observer  # noqa: E402
from dfq.quant.prepare import QuantSpec, calibrate, prepare  # noqa: E402

METHODS = ("minmax", "dsg", "percentile", "mse")
# the two protocols as the studies pin them: zeroq as the DSG study (min-max weights), brecq as the
# reconstruction study (MSE weight ranges); both with the codes' asymmetric weights and float biases
WEIGHT_RANGE = {"zeroq": "minmax", "brecq": "mse"}


def datasets(run: Path, val_images: int, real_pool: int, seed: int):
    meta = json.loads((run / "data/prepared/meta.json").read_text())
    spec = InputSpec.from_dict(meta["input_spec"])
    test = open_eval_dataset(run / "data/prepared/eval", spec)
    if (run / "data/prepared/val/manifest.json").is_file():
        val = open_eval_dataset(run / "data/prepared/val", spec)
    else:  # a run made before the data stage wrote val/: the same draw
        train = json.loads((run / "data/prepared/train/manifest.json").read_text())
        _, idx = split_indices(len(train["files"]), min(real_pool, len(train["files"])), val_images, seed)
        val = ManifestDataset({**train, "files": [train["files"][i] for i in idx]},
                              folder_transform(spec, train.get("resize")), spec.shape[0])
    return make_loader(val, 500), make_loader(test, 500)


def score(gm, loaders) -> dict:
    val, test = loaders
    return {"val_top1": evaluate(gm, val, desc="val")["top1"], "top1": evaluate(gm, test, desc="test")["top1"]}


def done_rows(out: Path) -> set[tuple]:
    if not out.is_file():
        return set()
    df = read_rows(out, numeric=False)
    return {tuple(r[k] for k in ("study", "set", "protocol", "method", "lr", "epochs")) for _, r in df.iterrows()}


FIELDS = ["study", "set", "protocol", "method", "lr", "epochs", "images", "kl_end", "seconds", "val_top1", "top1"]


def append(out: Path, row: dict) -> None:
    new = not out.is_file()
    with out.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, restval="")
        if new:
            w.writeheader()
        w.writerow(row)
    print(row, flush=True)


def read_rows(out: Path, numeric: bool = True):
    """The CSV as a DataFrame (rows without kl_end/seconds, as the first version of this script wrote them
    with a shorter header, are read by their field count)."""
    import pandas as pd

    short = [f for f in FIELDS if f not in ("kl_end", "seconds")]
    with out.open() as f:
        lines = list(csv.reader(f))
    rows = [dict(zip(FIELDS if len(r) == len(FIELDS) else short, r)) for r in lines[1:]]
    df = pd.DataFrame(rows)
    for c in ("val_top1", "top1", "lr", "epochs") if numeric else ():
        df[c] = pd.to_numeric(df[c])
    return df


def act_study(run: Path, out: Path, loaders, sources=None, methods=METHODS, bits=(4, 4)) -> None:
    done = done_rows(out)
    for set_dir in sorted(p for p in (run / "data/calib").iterdir() if p.is_dir()):
        if sources and set_dir.name.rsplit("-s", 1)[0] not in sources:
            continue
        batches = [load_torch(f) for f in sorted(set_dir.glob("batch_*.pt"))]
        for protocol in ("zeroq", "brecq"):
            for method in methods:
                key = ("act", set_dir.name, protocol, method, "", "")
                if key in done:
                    continue
                model, _ = load_checkpoint(run / "models/fp32.pt")
                gm = prepare(model, *bits, lambda m=method: make_observer(m), protocol, "asymmetric",
                             WEIGHT_RANGE[protocol])
                calibrate(gm, batches)
                append(out, {"study": "act", "set": set_dir.name, "protocol": protocol, "method": method, "lr": "",
                             "epochs": "", "images": sum(len(b) for b in batches), **score(gm, loaders)})


def finetune_study(run: Path, out: Path, loaders, seeds, lrs, epochs, calib_images=228, ft_images=342) -> None:
    from dfq.generation.sources import real_subset
    from dfq.quant.finetune import FinetuneConfig, finetune

    done = done_rows(out)
    pool = load_torch(run / "data/prepared/calib_real.pt")
    for seed in seeds:
        images = torch.cat([real_subset(pool, calib_images, seed),
                            real_subset(pool, ft_images - calib_images, seed, skip=calib_images)])
        model, _ = load_checkpoint(run / "models/fp32.pt")
        gm = prepare(model, 4, 4, lambda: make_observer("mse"), QuantSpec("brecq", "asymmetric", "mse"))
        calibrate(gm, [images[:calib_images]])
        state = {k: v.clone() for k, v in gm.state_dict().items()}
        key = ("finetune", f"real-s{seed}", "brecq", "mse", "0", "0")
        if key not in done:
            append(out, {"study": "finetune", "set": f"real-s{seed}", "protocol": "brecq", "method": "mse", "lr": 0,
                         "epochs": 0, "images": ft_images, **score(gm, loaders)})
        for lr in lrs:
            for ep in epochs:
                key = ("finetune", f"real-s{seed}", "brecq", "mse", str(lr), str(ep))
                if key in done:
                    continue
                gm.load_state_dict(state)
                teacher, _ = load_checkpoint(run / "models/fp32.pt")
                start = time.perf_counter()
                res = finetune(gm, teacher, images, FinetuneConfig(epochs=ep, batch_size=32, lr=lr), progress=False)
                append(out, {"study": "finetune", "set": f"real-s{seed}", "protocol": "brecq", "method": "mse", "lr": lr,
                             "epochs": ep, "images": ft_images, "kl_end": round(res["kl_end"], 4),
                             "seconds": round(time.perf_counter() - start, 1), **score(gm, loaders)})


def tables(out: Path) -> str:
    """Markdown: per protocol x act_method, and per source x protocol x act_method; per fine-tuning lr x
    epochs. Each cell: mean ± std over seeds of val_top1 | top1, and the number of sets."""
    import pandas as pd

    df = read_rows(out)
    df["source"] = df["set"].str.rsplit("-s", n=1).str[0]
    df["seed"] = df["set"].str.rsplit("-s", n=1).str[1].astype(int)
    parts = []

    def fmt(g):
        return pd.Series({"val_top1": f"{g.val_top1.mean():.2f} ± {g.val_top1.std():.2f}",
                          "top1": f"{g.top1.mean():.2f} ± {g.top1.std():.2f}", "sets": len(g)})

    act = df[df.study == "act"]
    if len(act):
        seeded = act[act.groupby("source").seed.transform("nunique") >= 3]
        parts += ["act_method per protocol (W4A4, sources with 3 seeds, every set):", "",
                  seeded.groupby(["protocol", "method"]).apply(fmt).to_markdown(), "",
                  "per source:", "", seeded.groupby(["source", "protocol", "method"]).apply(fmt).to_markdown(), ""]
    ft = df[df.study == "finetune"]
    if len(ft):
        parts += ["fine-tuning (lr, epochs; 0, 0: calibrated, not fine-tuned):", "",
                  ft.groupby(["lr", "epochs"]).apply(fmt).to_markdown(), ""]
    return "\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study", choices=("act", "finetune", "tables"))
    ap.add_argument("run", type=Path, help="a pipeline run's directory (models/, data/)")
    ap.add_argument("out", type=Path, help="CSV to append to")
    ap.add_argument("--val-images", type=int, default=2500)
    ap.add_argument("--real-pool", type=int, default=2048)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--sources", nargs="+", help="act: only these sources' sets (default: every set)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), help="act: these act_methods")
    ap.add_argument("--lrs", type=float, nargs="+", default=[3e-5, 1e-4, 3e-4, 1e-3])
    ap.add_argument("--epochs", type=int, nargs="+", default=[5, 10, 20])
    a = ap.parse_args()
    if a.study == "tables":
        print(tables(a.out))
        return
    torch.set_num_threads(1)
    loaders = datasets(a.run, a.val_images, a.real_pool, a.data_seed)
    if a.study == "act":
        act_study(a.run, a.out, loaders, a.sources, a.methods)
    else:
        finetune_study(a.run, a.out, loaders, a.seeds, a.lrs, a.epochs)


if __name__ == "__main__":
    main()
