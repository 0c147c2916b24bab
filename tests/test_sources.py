"""The non-optimising sources and the initialisation: `gaussian` and `real` calibration sets as the
generate stage writes them (sharding.make_batches + assemble), calibration on them, and ZeroQ's
uniform init. (BN-statistic sources are tested in test_generators.py / test_dsg.py.)"""

import json

import pytest
import torch

from dfq.generation import sharding
from dfq.generation.generators import batch_seed, init_images
from dfq.generation.sources import PlainConfig, generate_batch
from dfq.io import load_torch
from dfq.quant.observers import MinMaxObserver
from dfq.quant.prepare import calibrate, prepare

SHAPE = (1, 16, 16)


def test_zeroq_uniform_init_is_the_official_codes_grid():
    """Official ZeroQ code: (randint(0, 255) - 127.5) / 5418.75, i.e. 255 levels from -127.5 / 5418.75
    to 126.5 / 5418.75 (randint's upper bound is exclusive)."""
    x = init_images("zeroq_uniform", (64, 3, 8, 8), torch.Generator().manual_seed(0))
    k = x.double() * 5418.75 + 127.5
    assert torch.allclose(k, k.round(), atol=1e-3), "every value is (integer - 127.5) / 5418.75"
    levels = k.round().long()
    assert levels.min() == 0 and levels.max() == 254
    assert len(torch.unique(levels)) == 255  # 12,288 draws hit every level
    assert x.min().item() == pytest.approx(-127.5 / 5418.75, rel=1e-6)
    assert x.max().item() == pytest.approx(126.5 / 5418.75, rel=1e-6)
    with pytest.raises(ValueError, match="init='bogus'"):
        init_images("bogus", (1,), torch.Generator())


def _make_set(tmp_path, source, sizes, real=None, seed=7):
    """What the generate stage does for one source: batches into a scratch folder, then assembled."""
    scratch, out = tmp_path / f"scratch-{source}", tmp_path / "calib" / source
    sharding.make_batches(source, PlainConfig(), seed, sizes, SHAPE, None, real, scratch, list(range(len(sizes))))
    sharding.assemble(out, {"source": source, "method": source, "seed": seed}, len(sizes), scratch)
    return out


def test_gaussian_source_is_seeded_standard_normal_noise(tmp_path):
    sizes = [64, 64, 64, 16]
    out = _make_set(tmp_path, "gaussian", sizes, seed=7)
    files = sorted(out.glob("batch_*.pt"))
    assert [f.name for f in files] == [f"batch_{i:05d}.pt" for i in range(4)]
    batches = [load_torch(f) for f in files]
    for i, (x, n) in enumerate(zip(batches, sizes)):
        # batch i is N(0, 1) drawn from the seed of (seed, i) alone
        assert torch.equal(x, torch.randn((n, *SHAPE), generator=torch.Generator().manual_seed(batch_seed(7, i))))
    allx = torch.cat(batches)
    assert abs(allx.mean().item()) < 0.01 and abs(allx.std().item() - 1) < 0.01
    assert not torch.equal(batches[0], batches[1])
    meta = json.loads((out / "meta.json").read_text())
    assert meta["num_images"] == 208 and [b["shape"][0] for b in meta["batches"]] == sizes
    # the model plays no part: a batch is the same whatever model is passed
    x, info, extras = generate_batch("gaussian", torch.nn.Identity(), (5, *SHAPE), 3, PlainConfig())
    assert torch.equal(x, torch.randn((5, *SHAPE), generator=torch.Generator().manual_seed(3)))
    assert info == {} and extras is None


def test_real_source_is_the_real_subset_in_order(tmp_path):
    torch.manual_seed(0)
    real = torch.randn(10, *SHAPE)
    out = _make_set(tmp_path, "real", [4, 4, 2], real=real)
    batches = [load_torch(f) for f in sorted(out.glob("batch_*.pt"))]
    assert [len(b) for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat(batches), real)
    assert json.loads((out / "meta.json").read_text())["num_images"] == 10
    with pytest.raises(ValueError, match="real"):
        generate_batch("real", torch.nn.Identity(), (2, *SHAPE), 0, PlainConfig())


def test_calibration_on_gaussian_and_real_sets(tmp_path, narrow_resnet):
    """Calibrating on a source's files (as the calibrate stage reads them) sets each range from that
    source's images: the stem's ReLU output range over all of them, computed directly."""
    model = narrow_resnet()
    torch.manual_seed(1)
    real = torch.rand(24, *SHAPE) * 3 - 0.8  # a different distribution than N(0, 1)
    scales = {}
    for source, kw in (("gaussian", {}), ("real", {"real": real})):
        out = _make_set(tmp_path, source, [8, 8, 8], **kw)
        batches = [load_torch(f) for f in sorted(out.glob("batch_*.pt"))]
        gm = prepare(model, 8, 8, MinMaxObserver)
        assert calibrate(gm, iter(batches)) == 24
        with torch.no_grad():
            conv, bn, relu = (gm.get_submodule(f"stem.{i}") for i in range(3))  # fake-quant conv, BN, nn.ReLU
            stem = torch.cat([relu(bn(conv(x))) for x in batches])
        first = next(
            gm.get_submodule(n.target)
            for n in gm.graph.nodes  # the quantizer after stem.2 (nn.ReLU)
            if n.op == "call_module" and n.args and getattr(n.args[0], "target", None) == "stem.2"
        )
        assert first.scale.item() == pytest.approx(stem.max().item() / 255, rel=1e-6)
        assert int(first.zero_point) == 0
        scales[source] = first.scale.item()
        with torch.no_grad():
            ref = model(batches[0])
            assert ((gm(batches[0]) - ref).norm() / ref.norm()).item() < 0.02  # W8A8 on its own data
    assert scales["gaussian"] != pytest.approx(scales["real"], rel=0.05)
