"""bench/reconstruction.py: every unit timed against its floor, and the step time net of the fixed costs."""

import re
import sys

import pytest
import torch

from bench import reconstruction, timing


def test_every_unit_gets_a_row_with_positive_times(monkeypatch, capsys, tmp_path):
    argv = ["bench.reconstruction", "--weights", str(tmp_path / "absent.th"), "--images", "16"]
    monkeypatch.setattr(sys, "argv", argv + ["--iters", "4", "--rounds", "1"])
    reconstruction.main()
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| ") and not r.startswith("| unit")]
    names = [r.split(" | ")[0][2:] for r in rows]
    assert names == ["conv1"] + [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)] + ["linear", "all units"]
    for r in rows:  # a tiny unit's step, a difference of two short runs, can come out negative on a loaded machine
        step, floor, ratio = (float(re.match(r"-?[\d.]+", c).group()) for c in r.split(" | ")[1:4])
        assert floor > 0 and ratio == pytest.approx(step / floor, rel=0.05, abs=0.05)  # 2-decimal rounding
    assert step > 0  # all units together: a step of a whole network costs something


def test_step_time_excludes_the_fixed_costs(monkeypatch):
    """optimize_unit made to cost 0.05 s a call plus 0.01 s a step: the step time is 0.01, not (0.05 + 0.01 n) / n."""
    import dfq.quant.reconstruction as recon

    clock = {"t": 0.0}
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock["t"])

    def fake(unit, x, y, cfg, **kw):
        clock["t"] += 0.05 + 0.01 * cfg.iterations

    monkeypatch.setattr(recon, "optimize_unit", fake)
    cfg = recon.ReconConfig()
    unit, x = torch.nn.Linear(2, 2), torch.zeros(4, 2)
    assert timing.recon_step_time(unit, x, x, cfg, 10) == pytest.approx(0.01)


def test_paired_rounds_alternate_the_measures_and_summarise_per_round_ratios():
    """Three rounds of two measures run a, b, a, b, a, b; the ratio summary is the median of the per-round ratios
    (2/1, 9/3, 4/2 -> 2, 2, 3: median 2, range 2-3), not the ratio of the medians (4/2)."""
    calls, a, b = [], iter([2.0, 9.0, 4.0]), iter([1.0, 3.0, 2.0])
    got = timing.paired_rounds(3, lambda: calls.append("a") or next(a), lambda: calls.append("b") or next(b))
    assert calls == ["a", "b"] * 3 and got == [[2.0, 9.0, 4.0], [1.0, 3.0, 2.0]]
    assert timing.ratio_summary(*got) == (2.0, (2.0, 3.0))
