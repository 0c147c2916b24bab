import pytest
import torch

from dfq.generation.bn_stats import BNInputStats
from dfq.generation.generators import (
    ZeroQConfig,
    batch_seed,
    batch_sizes,
    gaussian_batch,
    init_images,
    optimize_images,
    zeroq_batch,
)
from dfq.generation.losses import zeroq_loss


def test_batch_seed_depends_on_seed_and_index_only():
    assert batch_seed(0, 3) == batch_seed(0, 3)
    assert len({batch_seed(s, i) for s in range(3) for i in range(50)}) == 150
    assert 0 <= batch_seed(123, 7) < 2**63


def test_batch_sizes():
    assert batch_sizes(130, 64) == [64, 64, 2]
    assert batch_sizes(128, 64) == [64, 64]


def test_gaussian_batch_seeded():
    assert torch.equal(gaussian_batch((2, 1, 4, 4), 5), gaussian_batch((2, 1, 4, 4), 5))
    assert not torch.equal(gaussian_batch((2, 1, 4, 4), 5), gaussian_batch((2, 1, 4, 4), 6))


def test_zeroq_uniform_init_scale():
    x = init_images("zeroq_uniform", (64, 3, 8, 8), torch.Generator().manual_seed(0))
    assert 0.01 < x.std().item() < 0.02 and x.abs().max() < 0.03
    with pytest.raises(ValueError, match="init='bogus'"):
        init_images("bogus", (1,), torch.Generator())


def test_zeroq_lowers_the_loss_deterministically_and_freezes_nothing(tiny_bn):
    x, info = zeroq_batch(tiny_bn, (4, 1, 8, 8), 11, ZeroQConfig(iterations=60, lr=0.1))
    x2, _ = zeroq_batch(tiny_bn, (4, 1, 8, 8), 11, ZeroQConfig(iterations=60, lr=0.1))
    assert torch.equal(x, x2)
    assert info["loss_end"] < 0.5 * info["loss_start"]
    assert all(p.requires_grad for p in tiny_bn.parameters())  # weights unfrozen again afterwards
    assert not any(p.grad is not None for p in tiny_bn.parameters())  # and never got gradients


def test_non_finite_loss_names_the_iteration(tiny_bn):
    def bad(x, stats: BNInputStats, logits=None):
        return zeroq_loss(x, stats) * float("nan")

    with pytest.raises(FloatingPointError, match="batch 3.*iteration 0"):
        optimize_images(
            tiny_bn, torch.randn(2, 1, 8, 8), bad, iterations=5, lr=0.1, patience=1, min_lr=0, desc="batch 3"
        )


def test_real_subset_continued_is_disjoint_and_leaves_the_set_unchanged():
    from dfq.generation.sources import real_subset

    pool = torch.arange(100, dtype=torch.float32).view(100, 1)
    first = real_subset(pool, 20, seed=3)
    more = real_subset(pool, 30, seed=3, skip=20)
    assert torch.equal(first, real_subset(pool, 20, seed=3))
    assert len(set(first.flatten().tolist()) | set(more.flatten().tolist())) == 50  # disjoint draws
    with pytest.raises(ValueError, match="raise data.real_pool"):
        real_subset(pool, 90, seed=3, skip=20)
