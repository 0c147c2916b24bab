import json

import pandas as pd
import pytest

from dfq import report
from dfq.generators import parse_set, real_subset, set_name


def _write_cells(tmp_path, values):
    ev, cal = tmp_path / "eval", tmp_path / "calib"
    ev.mkdir(), cal.mkdir()
    for (s, k, b), top1 in values.items():
        (ev / f"{s}-s{k}-{b}.json").write_text(json.dumps({"top1": top1, "top5": 99.0, "protocol": "zeroq"}))
        (cal / f"{s}-s{k}-{b}.json").write_text(json.dumps({"seconds": 2.0 * (k + 1)}))
    return ev, cal


def test_seed_aggregation_on_made_up_metrics(tmp_path):
    values = {("zeroq", 0, "w4a4"): 70.0, ("zeroq", 1, "w4a4"): 72.0, ("zeroq", 2, "w4a4"): 74.0,
              ("dsg", 0, "w4a4"): 75.0, ("dsg", 1, "w4a4"): 75.0, ("dsg", 2, "w4a4"): 78.0,
              ("zeroq", 0, "w8a8"): 80.0, ("zeroq", 1, "w8a8"): 80.5, ("zeroq", 2, "w8a8"): 81.0,
              ("dsg", 0, "w8a8"): 81.0, ("dsg", 1, "w8a8"): 81.0, ("dsg", 2, "w8a8"): 81.0}
    ev, cal = _write_cells(tmp_path, values)
    cells = report.set_metrics(["zeroq", "dsg"], [0, 1, 2], ["w8a8", "w4a4"], ev, cal)
    assert len(cells) == 12 and set(cells["seed"]) == {0, 1, 2}
    agg = report.aggregate(cells).set_index(["source", "bits"])
    assert agg.loc[("zeroq", "w4a4"), "top1_mean"] == pytest.approx(72.0)
    assert agg.loc[("zeroq", "w4a4"), "top1_std"] == pytest.approx(2.0)  # sample std (ddof 1)
    assert agg.loc[("dsg", "w4a4"), "top1_mean"] == pytest.approx(76.0)
    assert agg.loc[("dsg", "w4a4"), "top1_std"] == pytest.approx(3 ** 0.5)
    assert agg.loc[("dsg", "w8a8"), "top1_std"] == 0.0
    assert agg.loc[("zeroq", "w8a8"), "calibration_seconds_mean"] == pytest.approx(4.0)
    assert (agg["seeds"] == 3).all()
    table = report.results_table({"top1": 81.03, "top5": 99.1}, report.aggregate(cells), ["zeroq", "dsg"],
                                 ["w8a8", "w4a4"])
    assert "| zeroq | 3 | 81.03 (99.10) | 80.50 ± 0.50 (99.00) | 72.00 ± 2.00 (99.00) |" in table
    assert "| dsg | 3 | 81.03 (99.10) | 81.00 ± 0.00 (99.00) | 76.00 ± 1.73 (99.00) |" in table
    per_seed = report.seeds_table(cells, ["w8a8", "w4a4"])
    assert "| dsg | 2 | 81.00 | 78.00 |" in per_seed


def test_one_seed_has_no_std_and_a_missing_cell_names_its_stage(tmp_path):
    ev, cal = _write_cells(tmp_path, {("real", 0, "w4a4"): 73.5})
    agg = report.aggregate(report.set_metrics(["real"], [0], ["w4a4"], ev, cal))
    assert pd.isna(agg.loc[0, "top1_std"])
    assert "| real | 1 | 81.00 (99.00) | 73.50 (99.00) |" in report.results_table(
        {"top1": 81.0, "top5": 99.0}, agg, ["real"], ["w4a4"])
    with pytest.raises(FileNotFoundError, match="evaluate@real-1-w4a4"):
        report.set_metrics(["real"], [1], ["w4a4"], ev, cal)


def test_accuracy_plot_and_diversity_means(tmp_path):
    ev, cal = _write_cells(tmp_path, {("zeroq", k, b): 70.0 + k for k in (0, 1) for b in ("w4a4", "w6a6")})
    agg = report.aggregate(report.set_metrics(["zeroq"], [0, 1], ["w4a4", "w6a6"], ev, cal))
    out = tmp_path / "acc.png"
    report.plot_accuracy_vs_bits({"top1": 81.0, "top5": 99.0}, agg, ["zeroq"], ["w4a4", "w6a6"], out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    div = report.mean_diversity({("zeroq", 0): {"bn_spread": [0.1, 0.3], "bn_spread_mean": 0.2, "feature_cosine": 0.9,
                                                "images": 64},
                                 ("zeroq", 1): {"bn_spread": [0.3, 0.5], "bn_spread_mean": 0.4, "feature_cosine": 0.7,
                                                "images": 64}})
    assert div["zeroq"]["bn_spread"] == pytest.approx([0.2, 0.4])
    assert div["zeroq"]["feature_cosine"] == pytest.approx(0.8) and div["zeroq"]["seeds"] == 2


def test_set_names_and_real_subsets_per_seed():
    import torch

    assert set_name("dsg_code", 2) == "dsg_code-s2" and parse_set("dsg_code-s2") == ("dsg_code", 2)
    assert parse_set("my-source-s10") == ("my-source", 10)
    with pytest.raises(ValueError, match="not a calibration set name"):
        parse_set("zeroq")
    pool = torch.arange(100.0).view(100, 1)
    a, b, a2 = real_subset(pool, 10, 0), real_subset(pool, 10, 1), real_subset(pool, 10, 0)
    assert torch.equal(a, a2) and not torch.equal(a, b) and len(a.unique()) == 10
    with pytest.raises(ValueError, match="data.real_pool"):
        real_subset(pool, 101, 0)
