"""bench/pipeline.py's stage timing from `dvc repro` output lines (hand-made lines, hand-computed times)."""

import pytest

from bench.pipeline import by_kind, stage_times

LINES = [
    (0.0, "Running stage 'data':"),
    (0.5, "> python -m stages.data"),
    (12.0, "Updating lock file 'dvc.lock'"),
    (12.1, ""),
    (12.2, "Running stage 'generate@zeroq-0':"),
    (40.0, "Updating lock file 'dvc.lock'"),
    (40.5, "Running stage 'generate@real-0':"),
    (41.0, "Running stage 'track':"),  # a stage that ends without a lock update (no outputs) ...
    (44.0, "Use `dvc push` to send your updates to remote storage."),  # ... runs to the last line
]


def test_each_stage_runs_from_its_start_line_to_the_lock_update_that_ends_it():
    times = stage_times(LINES)
    assert list(times) == ["data", "generate@zeroq-0", "generate@real-0", "track"]
    assert times["data"] == pytest.approx(12.0)
    assert times["generate@zeroq-0"] == pytest.approx(27.8)
    assert times["generate@real-0"] == pytest.approx(0.5)
    assert times["track"] == pytest.approx(3.0)


def test_kinds_add_up_the_stages_before_the_at_sign():
    kinds = by_kind(stage_times(LINES))
    assert kinds["generate"] == (2, pytest.approx(28.3)) and kinds["data"] == (1, pytest.approx(12.0))
    assert stage_times([]) == {}
