"""The cell grammar: how calibration sets and quantized cells are named, parsed and checked, in one place.

- uniform bit-widths ``w<B>a<A>`` (weight and activation bits, each 2..8): w8a8, w4a4;
- mixed precision ``mp<B>a<A>`` (B average weight bits over the allocatable layers, 2..8, e.g. 3.5) or
  ``mp<M>mba<A>`` (a budget of M megabytes for every quantized weight, e.g. mp0.03mba4);
- a calibration set ``<source>-s<seed>`` (data/calib/<set>), a cell ``<set>-<bits>`` and a fine-tuned cell
  ``<set>-<bits>-ft`` (models/quant/<cell>.pt, metrics/*/<cell>.json).

Everything else asks this module rather than testing strings for "mp" or "-ft".
"""

from __future__ import annotations

import re

BITS_PATTERN = re.compile(r"^w([2-8])a([2-8])$")
# mixed precision: average weight bits B (an integer 2..8 or a decimal without trailing zeros, e.g. 3.5), or
# a size budget of M megabytes (10^6 bytes) for all quantized weights, e.g. mp0.03mba4
MIXED_PATTERN = re.compile(r"^mp([2-8](?:\.[0-9]*[1-9])?)a([2-8])$")
MIXED_MB_PATTERN = re.compile(r"^mp([0-9]+(?:\.[0-9]*[1-9])?)mba([2-8])$")


def parse_bits(spec: str) -> tuple[int, int]:
    """'w4a8' -> (4, 8); weight and activation bits must each be in 2..8."""
    m = BITS_PATTERN.match(str(spec))
    if not m:
        raise ValueError(f"bits={spec!r} is invalid; expected 'w<B>a<B>' with B in 2..8, e.g. w8a8, w4a4")
    return int(m.group(1)), int(m.group(2))


def is_mixed(spec: str) -> bool:
    return str(spec).startswith("mp")


def mixed_budget(spec: str) -> tuple[str, float, int]:
    """('bits', B, A) for 'mp<B>a<A>' (B average weight bits over the allocatable layers, at most 8), ('mb', M, A)
    for 'mp<M>mba<A>' (M megabytes for every quantized weight, fixed layers included); A activation bits."""
    m = MIXED_PATTERN.match(str(spec))
    if m and float(m.group(1)) <= 8:
        return "bits", float(m.group(1)), int(m.group(2))
    m = MIXED_MB_PATTERN.match(str(spec))
    if m and float(m.group(1)) > 0:
        return "mb", float(m.group(1)), int(m.group(2))
    raise ValueError(
        f"mixed cell {spec!r} is invalid; expected 'mp<B>a<A>' (B the average weight bits in 2..8, e.g. "
        "4 or 3.5, no trailing zeros) or 'mp<M>mba<A>' (M > 0 megabytes of quantized weights, e.g. 0.03), "
        "A the activation bits in 2..8, e.g. mp4a4, mp3.5a8, mp0.03mba4"
    )


def parse_mixed(spec: str) -> tuple[float, int]:
    """'mp4a4' -> (4.0, 4), 'mp3.5a8' -> (3.5, 8), 'mp0.03mba4' -> (0.03, 4): the budget (average weight bits,
    or megabytes) and the activation bits."""
    _, budget, abits = mixed_budget(spec)
    return budget, abits


FINETUNED = "-ft"


def is_finetuned(bits: str) -> bool:
    """A fine-tuned cell's bits ``<bits>-ft`` (e.g. w4a4-ft)."""
    return str(bits).endswith(FINETUNED)


def finetuned(bits: str) -> str:
    """The fine-tuned cell of ``bits``: w4a4 -> w4a4-ft."""
    return f"{bits}{FINETUNED}"


def base_bits(bits: str) -> str:
    """The calibrated cell a fine-tuned one starts from: w4a4-ft -> w4a4 (others unchanged)."""
    return str(bits).removesuffix(FINETUNED)


def check_bits(bits: str) -> str:
    """``bits`` when it is a uniform (w<B>a<A>), mixed (mp...) or fine-tuned (...-ft) cell, else a ValueError."""
    b = base_bits(bits)
    parse_mixed(b) if is_mixed(b) else parse_bits(b)
    return bits


def set_name(source: str, seed: int) -> str:
    """The name of one calibration set: ``<source>-s<seed>`` (data/calib/, models/quant/, metrics/)."""
    return f"{source}-s{seed}"


def parse_set(name: str) -> tuple[str, int]:
    """(source, seed) of a calibration set name made by ``set_name``."""
    source, sep, seed = name.rpartition("-s")
    if not sep or not source or not seed.isdigit():
        raise ValueError(f"{name!r} is not a calibration set name <source>-s<seed> (e.g. zeroq-s0)")
    return source, int(seed)


def cell_name(set_or_source: str, bits: str, seed: int | None = None) -> str:
    """``<set>-<bits>``; with ``seed``, the first argument is a source: ``<source>-s<seed>-<bits>``."""
    return f"{set_or_source if seed is None else set_name(set_or_source, seed)}-{bits}"


def parse_cell(cell: str) -> tuple[str, int, str]:
    """(source, seed, bits) of ``<source>-s<seed>-<bits>[-ft]``, bits checked; a ValueError otherwise."""
    m = CELL_PATTERN.match(str(cell))
    if not m:
        raise ValueError(f"cell {cell!r} is not <source>-s<seed>-<bits>[-ft] (e.g. zeroq-s0-w8a8, zeroq-s0-mp4a4)")
    check_bits(m.group(3))
    return m.group(1), int(m.group(2)), m.group(3)


CELL_PATTERN = re.compile(r"^([A-Za-z0-9_]+)-s(\d+)-((?:w[2-8]a[2-8]|mp[0-9.]+(?:mb)?a[2-8])(?:-ft)?)$")
