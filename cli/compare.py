"""Compare any metric across DVC experiments from MLflow (not a DVC stage: it reads the tracking store).

    python -m cli.compare [--metric top1] [--by source bits] [--across dvc_exp_name]
                             [--filter "tags.bits = 'w4a4'"] [--out reports/compare.md]

Rows: the ``--by`` run tags; columns: one per value of the ``--across`` tag (the DVC experiment name by
default); cells: mean ± std (seed count) over the per-seed runs. Choose settings with ``--metric val_top1``
(the validation split: training images disjoint from the real pool), report them with ``--metric top1``
(the test set).
"""

import argparse
import os
from pathlib import Path

from stages._common import read_params


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m cli.compare", description=__doc__.split("\n")[0])
    ap.add_argument(
        "--metric",
        default="top1",
        help="a run metric: top1 / top5 (test set), val_top1 / val_top5 "
        "(validation split: choose settings on it), top1_drop, weight_mb, onnx_top1, ...",
    )
    ap.add_argument("--by", nargs="+", default=["source", "bits"])
    ap.add_argument("--across", default="dvc_exp_name")
    ap.add_argument("--filter", default="", help="an MLflow search filter, e.g. \"tags.bits = 'w4a4'\"")
    ap.add_argument("--experiment", default=None, help="MLflow experiment (default: params.yaml track.experiment)")
    ap.add_argument("--out", default=None, help="also write the markdown table to this file")
    args = ap.parse_args(argv)
    from dfq.io import save_text
    from dfq.pipeline import tracking

    experiment = args.experiment or read_params().track.experiment
    uri = tracking.default_tracking_uri(Path(os.environ.get("DVC_ROOT", Path.cwd())).resolve())
    try:
        table = tracking.compare(uri, experiment, args.metric, args.by, args.across, args.filter)
    except tracking.TrackingError as exc:
        raise SystemExit(str(exc)) from None
    text = f"{args.metric} by {', '.join(args.by)} across {args.across} (MLflow {uri}, experiment {experiment})\n\n"
    text += tracking.compare_markdown(table)
    if args.out:
        save_text(text, Path(args.out))
    print(text)


if __name__ == "__main__":
    main()
