import json

import pandas as pd
import pytest

from dfq.cells import parse_set, set_name
from dfq.generation.sources import real_subset
from dfq.pipeline import plots, report


def _write_cells(tmp_path, values):
    ev, cal = tmp_path / "eval", tmp_path / "calib"
    ev.mkdir(), cal.mkdir()
    for (s, k, b), top1 in values.items():
        (ev / f"{s}-s{k}-{b}.json").write_text(json.dumps({"top1": top1, "top5": 99.0, "protocol": "zeroq"}))
        (cal / f"{s}-s{k}-{b}.json").write_text(json.dumps({"seconds": 2.0 * (k + 1)}))
    return ev, cal


def test_seed_aggregation_on_made_up_metrics(tmp_path):
    values = {
        ("zeroq", 0, "w4a4"): 70.0,
        ("zeroq", 1, "w4a4"): 72.0,
        ("zeroq", 2, "w4a4"): 74.0,
        ("dsg", 0, "w4a4"): 75.0,
        ("dsg", 1, "w4a4"): 75.0,
        ("dsg", 2, "w4a4"): 78.0,
        ("zeroq", 0, "w8a8"): 80.0,
        ("zeroq", 1, "w8a8"): 80.5,
        ("zeroq", 2, "w8a8"): 81.0,
        ("dsg", 0, "w8a8"): 81.0,
        ("dsg", 1, "w8a8"): 81.0,
        ("dsg", 2, "w8a8"): 81.0,
    }
    ev, cal = _write_cells(tmp_path, values)
    cells = report.set_metrics(["zeroq", "dsg"], [0, 1, 2], ["w8a8", "w4a4"], ev, cal)
    assert len(cells) == 12 and set(cells["seed"]) == {0, 1, 2}
    agg = report.aggregate(cells).set_index(["source", "bits"])
    assert agg.loc[("zeroq", "w4a4"), "top1_mean"] == pytest.approx(72.0)
    assert agg.loc[("zeroq", "w4a4"), "top1_std"] == pytest.approx(2.0)  # sample std (ddof 1)
    assert agg.loc[("dsg", "w4a4"), "top1_mean"] == pytest.approx(76.0)
    assert agg.loc[("dsg", "w4a4"), "top1_std"] == pytest.approx(3**0.5)
    assert agg.loc[("dsg", "w8a8"), "top1_std"] == 0.0
    assert agg.loc[("zeroq", "w8a8"), "calibration_seconds_mean"] == pytest.approx(4.0)
    assert (agg["seeds"] == 3).all()
    table = report.results_table(
        {"top1": 81.03, "top5": 99.1}, report.aggregate(cells), ["zeroq", "dsg"], ["w8a8", "w4a4"]
    )
    assert "| zeroq | 3 | 81.03 (99.10) | 80.50 ± 0.50 (99.00) | 72.00 ± 2.00 (99.00) |" in table
    assert "| dsg | 3 | 81.03 (99.10) | 81.00 ± 0.00 (99.00) | 76.00 ± 1.73 (99.00) |" in table
    assert "not a ranking" not in table  # 3 seeds: a mean a ranking may use
    per_seed = report.seeds_table(cells, ["w8a8", "w4a4"])
    assert "| dsg | 2 | 81.00 | 78.00 |" in per_seed


def test_results_markdown_two_sources_two_seeds(tmp_path):
    """The whole results.md on hand-computed numbers: zeroq W4A4 70, 74 -> 72.00 ± 2.83 (sample std sqrt(8));
    W8A8 80, 81 -> 80.50 ± 0.71; calibration 2 s and 4 s -> 3.0; sections in order, the optional ones only when
    they have something to show."""
    values = {
        ("zeroq", 0, "w8a8"): 80.0,
        ("zeroq", 1, "w8a8"): 81.0,
        ("zeroq", 0, "w4a4"): 70.0,
        ("zeroq", 1, "w4a4"): 74.0,
        ("real", 0, "w8a8"): 82.0,
        ("real", 1, "w8a8"): 82.0,
        ("real", 0, "w4a4"): 75.0,
        ("real", 1, "w4a4"): 76.0,
    }
    cells = report.set_metrics(["zeroq", "real"], [0, 1], ["w8a8", "w4a4"], *_write_cells(tmp_path, values))
    fp32 = {"top1": 81.03, "top5": 99.1}
    diversity = {
        "zeroq": {"bn_spread": [0.1], "bn_spread_mean": 0.2, "feature_cosine": 0.8, "images": 64},
        "real": {"bn_spread": [0.5], "bn_spread_mean": 0.5, "feature_cosine": 0.25, "images": 64},
    }
    layers = [{"name": "fc", "params": 30, "bits": 3, "kl": 0.25, "fixed": False}]
    allocs = {"zeroq-s0 MP3A4": {"avg_bits": 3.0, "layers": layers}}
    md = report.results_markdown(fp32, cells, ["zeroq", "real"], [0, 1], ["w8a8", "w4a4"], {}, diversity)
    assert md.startswith("# Results\n\nTop-1 % on the test set per calibration source and bit-width")
    assert "mean ± std over 2 seeds (each seed its own calibration set; top-5 mean in brackets).\n\n" in md
    assert "\n| source | seeds | FP32 | W8A8 | W4A4 |\n|---|---|---|---|---|\n" in md
    assert "\n| zeroq | 2 | 81.03 (99.10) | 80.50 ± 0.71 (99.00) | 72.00 ± 2.83 (99.00) |\n" in md
    assert "\n| real | 2 | 81.03 (99.10) | 82.00 ± 0.00 (99.00) | 75.50 ± 0.71 (99.00) |\n" in md
    assert "**2 seeds per cell: not a ranking.**" in md
    assert "\n| source | seed | W8A8 | W4A4 |\n" in md and "\n| real | 1 | 82.00 | 76.00 |\n" in md
    assert "\n| zeroq | n/a | n/a |\n" in md  # no weight_mb in these metrics
    assert "Protocol `zeroq`" in md and "\n| real | 3.0 | 3.0 |\n" in md  # (2 s + 4 s) / 2
    assert "\n| real | 0.500 | 0.250 | 64 |\n" in md
    assert md.endswith("\n![BN-statistic spread](bn_spread.png)\n\n![samples](samples.png)\n")
    heads = [line for line in md.splitlines() if line.startswith("## ")]
    assert heads == ["## Every seed", "## Model size", "## Quantizer", "## Diversity of the calibration sets"]
    with_alloc = report.results_markdown(
        fp32, cells, ["zeroq", "real"], [0, 1], ["w8a8", "w4a4"], allocs, diversity, (["zeroq"], []), 0
    )
    assert "\n## Mixed-precision allocations\n" in with_alloc and "\n| fc | 30 | 3 |\n" in with_alloc
    assert "## Data-free fine-tuning" not in with_alloc  # fine-tuning sources without bits: nothing tuned
    assert with_alloc.index("## Model size") < with_alloc.index("## Mixed-precision") < with_alloc.index("## Quant")


def test_one_seed_has_no_std_and_a_missing_cell_names_its_stage(tmp_path):
    ev, cal = _write_cells(tmp_path, {("real", 0, "w4a4"): 73.5})
    agg = report.aggregate(report.set_metrics(["real"], [0], ["w4a4"], ev, cal))
    assert pd.isna(agg.loc[0, "top1_std"])
    table = report.results_table({"top1": 81.0, "top5": 99.0}, agg, ["real"], ["w4a4"])
    assert "| real | 1 | 81.00 (99.00) | 73.50 (99.00) |" in table
    assert "**1 seed per cell: not a ranking.**" in table  # the table says what one seed cannot show
    with pytest.raises(FileNotFoundError, match="evaluate@real-1-w4a4"):
        report.set_metrics(["real"], [1], ["w4a4"], ev, cal)


def test_accuracy_plot_and_diversity_means(tmp_path):
    ev, cal = _write_cells(tmp_path, {("zeroq", k, b): 70.0 + k for k in (0, 1) for b in ("w4a4", "w6a6")})
    agg = report.aggregate(report.set_metrics(["zeroq"], [0, 1], ["w4a4", "w6a6"], ev, cal))
    out = tmp_path / "acc.png"
    plots.plot_accuracy_vs_bits({"top1": 81.0, "top5": 99.0}, agg, ["zeroq"], ["w4a4", "w6a6"], out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    div = report.mean_diversity(
        {
            ("zeroq", 0): {"bn_spread": [0.1, 0.3], "bn_spread_mean": 0.2, "feature_cosine": 0.9, "images": 64},
            ("zeroq", 1): {"bn_spread": [0.3, 0.5], "bn_spread_mean": 0.4, "feature_cosine": 0.7, "images": 64},
        }
    )
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


def test_mixed_cells_sizes_allocations_and_the_size_plot(tmp_path):
    """Mixed cells are columns like the uniform ones; the size table, the allocation table and the
    top-1-vs-size plot read weight_mb from the evaluation metrics."""
    ev, cal = tmp_path / "eval", tmp_path / "calib"
    ev.mkdir(), cal.mkdir()
    sizes = {"w8a8": 0.08, "w4a4": 0.04, "mp4a4": 0.0399}
    for k in (0, 1):
        for b, mb in sizes.items():
            top1 = {"w8a8": 91.0, "w4a4": 85.0 + k, "mp4a4": 88.0 + 2 * k}[b]
            (ev / f"zeroq-s{k}-{b}.json").write_text(json.dumps({"top1": top1, "top5": 99.0, "weight_mb": mb}))
            (cal / f"zeroq-s{k}-{b}.json").write_text(json.dumps({"seconds": 1.0}))
    bits = list(sizes)
    agg = report.aggregate(report.set_metrics(["zeroq"], [0, 1], bits, ev, cal))
    table = report.results_table({"top1": 92.0, "top5": 99.5}, agg, ["zeroq"], bits)
    assert table.splitlines()[0].endswith("| W8A8 | W4A4 | MP4A4 |")
    assert "| 85.50 ± 0.71 (99.00) | 89.00 ± 1.41 (99.00) |" in table
    assert "| zeroq | 0.0800 | 0.0400 | 0.0399 |" in report.size_table(agg, ["zeroq"], bits)
    layers = [
        {"name": "stem.0", "params": 10, "bits": 8, "kl": None, "fixed": True},
        {"name": "fc", "params": 30, "bits": 3, "kl": 0.25, "fixed": False},
    ]
    alloc = {"budget_avg_bits": 3.5, "avg_bits": 3.0, "kl_sum": 0.25, "allocatable_params": 30, "layers": layers}
    other = {**alloc, "avg_bits": 3.5, "layers": [layers[0], {**layers[1], "bits": 4}]}
    both = report.allocations_table({"zeroq-s0 MP3.5A4": alloc, "dsg-s0 MP3.5A4": other})
    assert (
        "| stem.0 | 10 | 8* | 8* |" in both
        and "| fc | 30 | 3 | 4 |" in both
        and "| average | | 3.000 | 3.500 |" in both
    )
    md = report.allocation_markdown(alloc)
    assert "| stem.0 | 10 | 8 | fixed by the protocol |" in md and "| fc | 30 | 3 | 0.25 |" in md
    with pytest.raises(FileNotFoundError, match="run the evaluate_mixed@zeroq-2-mp4a4 stage"):
        report.set_metrics(["zeroq"], [2], ["mp4a4"], ev, cal)
    out = tmp_path / "size.png"
    plots.plot_size_vs_top1({"top1": 92.0, "top5": 99.5}, agg, ["zeroq", "real"], bits, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_finetuned_cells_join_the_table_with_their_gain_and_time(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for d in ("metrics/eval", "metrics/calibrate", "metrics/finetune"):
        (tmp_path / d).mkdir(parents=True)
    for s, k, b, top1 in [
        ("zeroq", 0, "w4a4", 70.0),
        ("zeroq", 1, "w4a4", 72.0),
        ("real", 0, "w4a4", 74.0),
        ("real", 1, "w4a4", 74.0),
        ("zeroq", 0, "w4a4-ft", 75.0),
        ("zeroq", 1, "w4a4-ft", 79.0),
    ]:
        (tmp_path / f"metrics/eval/{s}-s{k}-{b}.json").write_text(json.dumps({"top1": top1, "top5": 99.0}))
        kind = "finetune" if b.endswith("-ft") else "calibrate"
        (tmp_path / f"metrics/{kind}/{s}-s{k}-{b}.json").write_text(json.dumps({"seconds": 100.0 + k}))
    ft = {"sources": ["zeroq"], "bits": ["w4a4"]}
    cells = report.pipeline_cells(["zeroq", "real"], [0, 1], ["w4a4"], ft["sources"], ft["bits"])
    assert len(cells) == 6 and list(cells["bits"]).count("w4a4-ft") == 2
    assert len(report.pipeline_cells(["zeroq", "real"], [0, 1], ["w4a4"], [], ["w4a4"])) == 4
    agg = report.aggregate(cells)
    assert "| zeroq | W4A4 | 71.00 ± 1.41 | 77.00 ± 2.83 | +6.00 | 100 | 2 |" in report.finetune_table(
        agg, ["zeroq"], ["w4a4"]
    )
    table = report.results_table({"top1": 81.0, "top5": 99.0}, agg, ["zeroq", "real"], ["w4a4", "w4a4-ft"])
    assert "| real | 2 | 81.00 (99.00) | 74.00 ± 0.00 (99.00) | n/a |" in table  # real is not fine-tuned
    assert "| real | 0 | 74.00 | n/a |" in report.seeds_table(cells, ["w4a4", "w4a4-ft"])
    with pytest.raises(FileNotFoundError, match="evaluate_finetune@real-0-w4a4"):
        report.pipeline_cells(["zeroq", "real"], [0, 1], ["w4a4"], ["real"], ["w4a4"])


def test_validation_split_beside_the_test_set_and_env_is_one_column(tmp_path):
    """Cells measured on the validation split get a second table (val_top1 mean ± std, val_top5 in brackets) and
    a per-seed table; a metrics file's nested ``env`` neither breaks the tables nor adds columns; without
    val_top1 there is no section."""
    ev, cal = tmp_path / "eval", tmp_path / "calib"
    ev.mkdir(), cal.mkdir()
    env = {"torch": "2.x", "cpu": "some CPU", "isa": "AVX2", "threads": 1, "device": "cpu"}
    vals = {
        ("zeroq", 0): (70.0, 71.0),
        ("zeroq", 1): (72.0, 75.0),
        ("real", 0): (74.0, 80.0),
        ("real", 1): (74.0, 82.0),
    }
    for (s, k), (top1, val1) in vals.items():
        (ev / f"{s}-s{k}-w4a4.json").write_text(
            json.dumps({"top1": top1, "top5": 99.0, "val_top1": val1, "val_top5": 98.0, "env": env})
        )
        (cal / f"{s}-s{k}-w4a4.json").write_text(json.dumps({"seconds": 1.0, "env": env}))
    cells = report.set_metrics(["zeroq", "real"], [0, 1], ["w4a4"], ev, cal)
    assert [c for c in cells.columns if "env" in c] == ["env"] and cells["env"].iloc[0] == env
    agg = report.aggregate(cells)
    assert not [c for c in agg.columns if "env" in c]
    fp32 = {"top1": 81.0, "top5": 99.0, "val_top1": 85.0, "val_top5": 99.5, "env": env}
    test = report.results_table(fp32, agg, ["zeroq", "real"], ["w4a4"])
    assert "| zeroq | 2 | 81.00 (99.00) | 71.00 ± 1.41 (99.00) |" in test
    section = report.validation_section(fp32, agg, cells, ["zeroq", "real"], ["w4a4"], 5000)
    assert "## Validation split" in section and "5000 validation images" in section
    assert "| zeroq | 2 | 85.00 (99.50) | 73.00 ± 2.83 (98.00) |" in section
    assert "| real | 2 | 85.00 (99.50) | 81.00 ± 1.41 (98.00) |" in section
    assert "| real | 1 | 82.00 |" in section  # every seed's validation top-1
    (tmp_path / "old").mkdir()
    plain = report.set_metrics(["zeroq"], [0], ["w4a4"], *_write_cells(tmp_path / "old", {("zeroq", 0, "w4a4"): 70.0}))
    assert report.validation_section(fp32, report.aggregate(plain), plain, ["zeroq"], ["w4a4"]) == ""
    # a cell without validation metrics (measured before the split) is n/a in the validation table
    mixed = pd.concat([cells, plain.assign(bits="w8a8")], ignore_index=True)
    table = report.results_table(fp32, report.aggregate(mixed), ["zeroq"], ["w4a4", "w8a8"], "val_")
    assert "| zeroq | 2 | 85.00 (99.50) | 73.00 ± 2.83 (98.00) | n/a |" in table


def test_cells_csv_on_hand_written_rows(tmp_path):
    """reports/cells.csv on two sources x two seeds x (w4a4, mp4a4), every number worked out by hand: zeroq W4A4 70, 74
    -> 72, sample std sqrt(8) = 2.8284; zeroq MP4A4 71, 72 -> 71.5, 0.7071; dsg W4A4 75, 76 -> 75.5, 0.7071; dsg MP4A4
    77, 77 -> 77, 0. Rows sorted (source, bits, seed, the mean last); the same cells in any order, same bytes."""
    top1 = {
        ("zeroq", "w4a4"): (70, 74),
        ("zeroq", "mp4a4"): (71, 72),
        ("dsg", "w4a4"): (75, 76),
        ("dsg", "mp4a4"): (77, 77),
    }
    rows = [
        {
            "source": s,
            "seed": k,
            "bits": b,
            "top1": float(t[k]),
            "top5": 99.5,
            "val_top1": t[k] + 1.25,
            "val_top5": 100.0,
        }
        for (s, b), t in top1.items()
        for k in (0, 1)
    ]
    expected = """source,seed,bits,kind,weight_bits,act_bits,top1,top5,val_top1,val_top5,top1_mean,top1_std,seeds
dsg,0,mp4a4,mixed,4,4,77.0000,99.5000,78.2500,100.0000,,,
dsg,1,mp4a4,mixed,4,4,77.0000,99.5000,78.2500,100.0000,,,
dsg,mean,mp4a4,mixed,4,4,,,,,77.0000,0.0000,2
dsg,0,w4a4,uniform,4,4,75.0000,99.5000,76.2500,100.0000,,,
dsg,1,w4a4,uniform,4,4,76.0000,99.5000,77.2500,100.0000,,,
dsg,mean,w4a4,uniform,4,4,,,,,75.5000,0.7071,2
zeroq,0,mp4a4,mixed,4,4,71.0000,99.5000,72.2500,100.0000,,,
zeroq,1,mp4a4,mixed,4,4,72.0000,99.5000,73.2500,100.0000,,,
zeroq,mean,mp4a4,mixed,4,4,,,,,71.5000,0.7071,2
zeroq,0,w4a4,uniform,4,4,70.0000,99.5000,71.2500,100.0000,,,
zeroq,1,w4a4,uniform,4,4,74.0000,99.5000,75.2500,100.0000,,,
zeroq,mean,w4a4,uniform,4,4,,,,,72.0000,2.8284,2
"""
    text = report.cells_csv(pd.DataFrame(rows))
    assert text == expected
    assert report.cells_csv(pd.DataFrame(rows[::-1])) == expected  # sorted, not in the order the cells came
    report.write_text(text, tmp_path / "reports" / "cells.csv")
    assert (tmp_path / "reports" / "cells.csv").read_bytes() == expected.encode()
    assert [p.name for p in (tmp_path / "reports").iterdir()] == ["cells.csv"]  # atomic: no temp file left


def test_cells_csv_one_seed_budgets_and_finetuned_cells():
    """One seed: no std (empty, not 0); no validation split: empty columns; mixed cells at their budget (an MB budget
    has no weight bits); a fine-tuned cell keeps the bits it started from."""
    rows = [
        {"source": "real", "seed": 3, "bits": b, "top1": 80.123456, "top5": 99.0} for b in ("mp3.5a8", "mp0.03mba4")
    ]
    lines = report.cells_csv(pd.DataFrame(rows + [{**rows[0], "bits": "w4a4-ft"}])).splitlines()
    assert lines[1:] == [
        "real,3,mp0.03mba4,mixed,,4,80.1235,99.0000,,,,,",
        "real,mean,mp0.03mba4,mixed,,4,,,,,80.1235,,1",
        "real,3,mp3.5a8,mixed,3.5,8,80.1235,99.0000,,,,,",
        "real,mean,mp3.5a8,mixed,3.5,8,,,,,80.1235,,1",
        "real,3,w4a4-ft,finetuned,4,4,80.1235,99.0000,,,,,",
        "real,mean,w4a4-ft,finetuned,4,4,,,,,80.1235,,1",
    ]
    assert report.cell_bits("w4a8") == ("uniform", 4, 8)
    with pytest.raises(ValueError, match="invalid"):
        report.cell_bits("w9a9")
