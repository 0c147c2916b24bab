"""The cell grammar (dfq.cells): bit-widths, mixed cells, set and cell names, each against hand-written values."""

import pytest

from dfq.cells import (
    base_bits,
    cell_name,
    check_bits,
    finetuned,
    is_finetuned,
    is_mixed,
    mixed_budget,
    parse_bits,
    parse_cell,
    parse_mixed,
    set_name,
)


@pytest.mark.parametrize("spec,expected", [("w8a8", (8, 8)), ("w4a8", (4, 8)), ("w2a2", (2, 2))])
def test_parse_bits(spec, expected):
    assert parse_bits(spec) == expected


@pytest.mark.parametrize("spec", ["w9a8", "w1a1", "8", "w4", "a4w4"])
def test_parse_bits_rejects(spec):
    with pytest.raises(ValueError, match="2..8"):
        parse_bits(spec)


@pytest.mark.parametrize(
    "spec,expected",
    [("mp4a4", (4.0, 4)), ("mp3.5a8", (3.5, 8)), ("mp2a2", (2.0, 2)), ("mp8a8", (8.0, 8)), ("mp2.25a4", (2.25, 4))],
)
def test_parse_mixed(spec, expected):
    assert parse_mixed(spec) == expected and is_mixed(spec) and not is_mixed("w4a4")


def test_mixed_budget_in_bits_or_megabytes():
    assert mixed_budget("mp3.5a8") == ("bits", 3.5, 8)
    assert mixed_budget("mp0.03mba4") == ("mb", 0.03, 4) and mixed_budget("mp12mba8") == ("mb", 12.0, 8)


@pytest.mark.parametrize(
    "spec",
    [
        "mp9a4",
        "mp8.5a4",
        "mp1a4",
        "mp4a9",
        "mp4.0a4",
        "mp4",
        "w4a4",
        "mp.5a4",
        "mp0mba4",
        "mp0.10mba4",
        "mp1mba9",
        "mp1mb",
    ],
)
def test_parse_mixed_rejects(spec):

    with pytest.raises(ValueError, match="expected 'mp<B>a<A>'"):
        parse_mixed(spec)


@pytest.mark.parametrize(
    "cell,expected",
    [
        ("zeroq-s0-w8a8", ("zeroq", 0, "w8a8")),
        ("dsg_code-s12-mp3.5a4", ("dsg_code", 12, "mp3.5a4")),
        ("real-s2-mp0.03mba4-ft", ("real", 2, "mp0.03mba4-ft")),
        ("my_src-s1-w4a4-ft", ("my_src", 1, "w4a4-ft")),
    ],
)
def test_parse_cell(cell, expected):
    assert parse_cell(cell) == expected
    source, seed, bits = expected
    assert cell_name(source, bits, seed) == cell and cell_name(set_name(source, seed), bits) == cell


@pytest.mark.parametrize(
    "cell",
    ["zeroq-w8a8", "zeroq-s0-w9a8", "zeroq-s0-mp9a4", "zeroq-sx-w4a4", "zeroq-s0-w4a4-tf", "-s0-w4a4", "zeroq-s0"],
)
def test_parse_cell_rejects(cell):
    with pytest.raises(ValueError, match="is not <source>-s<seed>-<bits>|invalid"):
        parse_cell(cell)


def test_finetuned_cells():
    assert finetuned("w4a4") == "w4a4-ft" and is_finetuned("mp4a4-ft") and not is_finetuned("w4a4")
    assert base_bits("mp4a4-ft") == "mp4a4" and base_bits("w8a8") == "w8a8"
    assert check_bits("mp3.5a8-ft") == "mp3.5a8-ft"
    with pytest.raises(ValueError):
        check_bits("w4a4-ft-ft")
