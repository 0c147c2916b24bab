"""Per-layer sensitivity and the exact mixed-precision allocation (dfq/quant/sensitivity.py)."""

import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dfq.io import load_torch, save_torch
from dfq.quant.fake_quant import fake_quantize, weight_qparams
from dfq.quant.observers import MinMaxObserver
from dfq.quant.prepare import (
    QuantSpec,
    calibrate,
    layer_bits,
    load_quantized,
    prepare,
    weight_quantized_layers,
    weight_size,
)
from dfq.quant.sensitivity import (
    allocate,
    allocate_cell,
    budget_bits,
    frontier_of,
    frontier_table,
    load_measurement,
    measure,
    pareto_frontier,
)

CANDIDATES = [2, 3, 4, 6, 8]


@pytest.fixture(scope="module")
def batches():
    torch.manual_seed(1)
    return [torch.randn(16, 1, 16, 16) for _ in range(2)]


@pytest.fixture(scope="module")
def zeroq_sens(batches):
    import conftest

    return measure(conftest._narrow_resnet(), batches, CANDIDATES, QuantSpec("zeroq", "asymmetric", "minmax"))


def test_8_bits_is_near_zero_and_sensitivity_grows_as_bits_fall(zeroq_sens):
    rows = zeroq_sens["layers"]
    assert len(rows) == 10 and all(r["fixed_bits"] is None for r in rows)  # zeroq: every layer allocatable
    for r in rows:
        kl = dict(zip(CANDIDATES, r["kl"]))
        # strictly monotone: fewer bits, a coarser grid, a larger KL (every layer of this model and input)
        assert kl[2] > kl[3] > kl[4] > kl[6] > kl[8] > 0, r
        # ~0 at 8 bits. For a small weight perturbation the KL is second order in it, so it scales with the
        # squared step: (3 / 255)^2 = 1.4e-4 of the 2-bit value if 2 bits were still "small"; they are not
        # (clipping, few levels), measured 2e-5..4e-4 here. 1e-3 leaves a margin; a layer left at a coarser
        # grid (e.g. 6 bits labelled 8: 16x the step, 256x the KL) fails it. Absolute: measured <= 1.8e-7.
        assert kl[8] < 1e-3 * kl[2] and kl[8] < 1e-6, r


def test_sensitivity_is_the_kl_of_that_layer_alone_on_the_pipeline_grid(batches, narrow_resnet):
    """One entry recomputed by hand: only that layer's weight replaced by its grid at b bits (symmetric,
    MSE-searched range: what calibrate would use), everything else FP32, KL averaged over the images."""
    model = narrow_resnet()
    sens = measure(model, batches[:1], [3, 8], QuantSpec("zeroq", "symmetric", "mse"))
    x = batches[0]
    with torch.no_grad():
        ref = F.log_softmax(model(x).double(), 1)
        for name in ("layers.1.conv1", "fc"):
            one = copy.deepcopy(model)
            layer = one.get_submodule(name)
            w = layer.weight.detach().clone()
            layer.weight.copy_(fake_quantize(w, *weight_qparams(w, 3, "symmetric", "mse"), 3, axis=0))
            q = F.log_softmax(one(x).double(), 1)
            want = (ref.exp() * (ref - q)).sum() / len(x)
            got = next(r for r in sens["layers"] if r["name"] == name)["kl"][0]
            assert got == pytest.approx(want.item(), rel=1e-6)


def test_brecq_fixes_first_and_last_layer(batches, narrow_resnet):
    sens = measure(narrow_resnet(), batches[:1], [4, 8], QuantSpec("brecq", "asymmetric", "minmax"))
    fixed = [r["name"] for r in sens["layers"] if r["fixed_bits"] == 8]
    assert fixed == ["stem.0", "fc"] and all(r["kl"] is None for r in sens["layers"] if r["fixed_bits"])
    assert all(len(r["kl"]) == 2 for r in sens["layers"] if r["fixed_bits"] is None)


def brute_force(costs, params, cands):
    """Every choice: (size, cost, bits)."""
    out = []
    for combo in itertools.product(range(len(cands)), repeat=len(params)):
        out.append(
            (
                sum(n * cands[j] for n, j in zip(params, combo)),
                sum(c[j] for c, j in zip(costs, combo)),
                [cands[j] for j in combo],
            )
        )
    return out


@pytest.mark.parametrize("seed", range(5))
def test_allocation_meets_the_budget_and_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    cands = [2, 3, 4, 8]
    params = [int(n) for n in rng.integers(5, 500, 5)]
    costs = (np.sort(rng.random((5, 4)), axis=1)[:, ::-1] * rng.random((5, 1)) * 10).tolist()
    every = brute_force(costs, params, cands)
    # the frontier is exactly the brute-force set of non-dominated (size, cost) pairs
    pareto, best = [], np.inf
    for size, cost, _ in sorted(every, key=lambda t: (t[0], t[1])):
        if cost < best:
            pareto.append((size, cost))
            best = cost
    f = pareto_frontier(costs, params, cands)
    assert f.sizes.tolist() == [s for s, _ in pareto]
    assert f.costs == pytest.approx([c for _, c in pareto], rel=1e-12)
    for i in range(len(f.sizes)):  # each point's allocation has that point's size and cost
        bits = f.allocation(i)
        assert sum(n * b for n, b in zip(params, bits)) == f.sizes[i]
        assert sum(c[cands.index(b)] for c, b in zip(costs, bits)) == pytest.approx(f.costs[i], rel=1e-12)
    for avg in (2, 2.5, 3, 3.7, 4, 5.5, 8):
        budget = budget_bits(avg, params)
        bits, size, cost = allocate(costs, params, cands, budget)
        assert size == sum(n * b for n, b in zip(params, bits)) <= budget
        assert cost == pytest.approx(min(c for s, c, _ in every if s <= budget), rel=1e-12)


def test_budget_is_exact_and_an_impossible_budget_is_named():
    assert budget_bits(3.5, [3, 4]) == 24 and budget_bits(4.1, [10]) == 41  # no float rounding down to 40
    with pytest.raises(ValueError, match="no allocation fits 19 bits: the smallest .2 bits everywhere. takes 20"):
        allocate([[1.0, 0.0], [1.0, 0.0]], [4, 6], [2, 8], 19)


def test_mixed_model_has_the_allocated_bits_and_round_trips(zeroq_sens, batches, narrow_resnet, tmp_path):
    model = narrow_resnet()
    per_layer, alloc = allocate_cell(zeroq_sens, 3.5)
    assert len(set(per_layer.values())) > 1 and alloc["avg_bits"] <= 3.5  # really mixed, within the budget
    n = alloc["allocatable_params"]
    assert sum(r["params"] * r["bits"] for r in alloc["layers"]) <= 3.5 * n
    gm = prepare(model, 8, 4, MinMaxObserver, layer_bits=per_layer)
    assert layer_bits(gm) == per_layer
    for (name, bits), layer in zip(layer_bits(gm).items(), weight_quantized_layers(gm)):
        # every quantized weight lies on its own b-bit per-channel grid: integers in [0, 2^b - 1] ...
        q = layer.quantized_weight().flatten(1) / layer.weight_scale[:, None] + layer.weight_zero_point[:, None]
        assert torch.allclose(q, q.round(), atol=1e-3) and q.min() >= -1e-3 and q.max() <= 2**bits - 1 + 1e-3
        # ... whose step is the b-bit one of that channel's range (a wider or narrower grid has another step)
        scale, _ = weight_qparams(layer.weight, bits, "asymmetric", "minmax")
        assert torch.allclose(layer.weight_scale, scale), name
    assert weight_size(gm)["weight_mb"] == pytest.approx(sum(r["params"] * r["bits"] for r in alloc["layers"]) / 8e6)
    calibrate(gm, batches)
    path = tmp_path / "mp.pt"
    save_torch(
        {
            "bits": "mp3.5a4",
            "protocol": "zeroq",
            "weight_scheme": "asymmetric",
            "weight_range": "minmax",
            "layer_bits": per_layer,
            "state_dict": gm.state_dict(),
        },
        path,
    )
    again = load_quantized(narrow_resnet(), load_torch(path))
    assert layer_bits(again) == per_layer
    with torch.no_grad():
        assert torch.equal(again(batches[0]), gm(batches[0]))
    with pytest.raises(ValueError, match="names the weight layers"):
        load_quantized(narrow_resnet(), {**load_torch(path), "layer_bits": {"fc": 4}})


def test_prepare_rejects_unknown_layers_and_fixed_layers(narrow_resnet):
    with pytest.raises(ValueError, match=r"layer_bits names \['nope'\], not weight layers"):
        prepare(narrow_resnet(), 8, 8, MinMaxObserver, layer_bits={"nope": 4})
    with pytest.raises(ValueError, match=r"\['fc'\] are fixed at 8 bits by the brecq protocol"):
        prepare(narrow_resnet(), 8, 8, MinMaxObserver, QuantSpec("brecq"), layer_bits={"fc": 4})
    gm = prepare(narrow_resnet(), 4, 8, MinMaxObserver, QuantSpec("brecq"), layer_bits={"fc": 8, "layers.0.conv1": 2})
    assert gm.fixed_weight_layers == ["fc", "stem.0"]
    assert layer_bits(gm)["layers.0.conv1"] == 2 and layer_bits(gm)["fc"] == layer_bits(gm)["stem.0"] == 8
    assert layer_bits(gm)["layers.0.conv2"] == 4


def test_budget_at_a_uniform_width_never_loses_to_it(zeroq_sens):
    """The uniform choice is one of the allocations at its own budget, so the optimum is no worse."""
    for b in (3, 4, 6):
        _, alloc = allocate_cell(zeroq_sens, b)
        uniform = sum(r["kl"][CANDIDATES.index(b)] for r in zeroq_sens["layers"])
        assert alloc["kl_sum"] <= uniform + 1e-15 and alloc["avg_bits"] <= b


def test_frontier_table_and_saved_measurement(zeroq_sens, tmp_path):
    import json

    f = frontier_of(zeroq_sens)
    table = frontier_table(zeroq_sens, f)
    assert table.count("\n| ") == 1 + 13  # header + budgets 2, 2.5, ..., 8
    assert "| 8 | 8.000 |" in table and "| 2 | 2.000 |" in table
    path = tmp_path / "s.json"
    path.write_text(json.dumps(zeroq_sens))
    assert load_measurement(path, QuantSpec("zeroq", "asymmetric", "minmax")) == zeroq_sens
    with pytest.raises(ValueError, match="measured with {'protocol': 'zeroq'}.*rerun the sensitivity stage"):
        load_measurement(path, QuantSpec("brecq", "asymmetric", "minmax"))
    with pytest.raises(FileNotFoundError, match="run the sensitivity stage"):
        load_measurement(tmp_path / "none.json", QuantSpec("zeroq", "asymmetric", "minmax"))


@pytest.mark.parametrize("protocol", ["zeroq", "brecq"])
def test_a_size_budget_in_mb_fits_the_whole_model_and_is_optimal(batches, narrow_resnet, protocol):
    """mp<M>mba<A>: every quantized weight, the fixed 8-bit layers included, fits M MB (as weight_size counts
    it), and the summed KL is the brute-force minimum over the allocatable layers under that size."""
    sens = measure(narrow_resnet(), batches[:1], [2, 4, 8], QuantSpec(protocol, "symmetric", "minmax"))
    rows = [r for r in sens["layers"] if r["fixed_bits"] is None]
    fixed = sum(r["params"] * r["fixed_bits"] for r in sens["layers"] if r["fixed_bits"])
    total = sum(r["params"] for r in sens["layers"])
    mb = round((fixed + 4 * sum(r["params"] for r in rows)) / 8e6 * 0.97, 6)  # a little under uniform 4 bits
    per_layer, alloc = allocate_cell(sens, f"mp{mb:g}mba4")
    gm = prepare(narrow_resnet(), 8, 4, MinMaxObserver, QuantSpec(protocol, "symmetric"), layer_bits=per_layer)
    assert weight_size(gm)["weight_mb"] == pytest.approx(alloc["weight_mb"]) and alloc["weight_mb"] <= mb
    assert alloc["budget_mb"] == mb and weight_size(gm)["weight_params"] == total
    if len(rows) <= 10:  # 3^10 choices
        every = brute_force([r["kl"] for r in rows], [r["params"] for r in rows], [2, 4, 8])
        best = min(c for s, c, _ in every if s + fixed <= mb * 8e6)
        assert alloc["kl_sum"] == pytest.approx(best, rel=1e-12)
    with pytest.raises(ValueError, match=r"mixed cell 'mp0.0001mba4': the smallest model takes .* MB"):
        allocate_cell(sens, "mp0.0001mba4")


def test_a_mixed_cell_exports_with_its_own_bits_per_layer(zeroq_sens, batches, narrow_resnet):
    """ONNX Runtime runs a mixed model (each layer its own grid, stored in int8) with the fake-quant logits."""
    from dfq.deploy.qdq import to_onnx
    from dfq.deploy.runtime import run, session
    from dfq.quant.bias import round_biases

    per_layer, _ = allocate_cell(zeroq_sens, "mp3.5a8")
    gm = prepare(narrow_resnet(), 8, 8, MinMaxObserver, QuantSpec("zeroq", "symmetric"), layer_bits=per_layer)
    calibrate(gm, batches)
    round_biases(gm)
    data, records = to_onnx(gm, (1, 1, 16, 16), "zeroq")
    x = batches[1]
    with torch.no_grad():
        ref = gm(x)
    assert (run(session(data, threads=1), x) - ref).abs().max() < 1e-3
    assert len(set(per_layer.values())) > 1 and sum(not r["kernel"].startswith("float") for r in records) == 8
