"""evaluate(): top-1 / top-5 on known logits, counted by hand."""

import pytest
import torch

from dfq.fp32.evaluate import evaluate, make_loader


class Logits(torch.nn.Module):
    """A 'model' that returns its input: the dataset's images are the logits."""

    def forward(self, x):
        return x.flatten(1)


def _logits_with_rank(rank: int, label: int, classes: int = 10) -> torch.Tensor:
    """Logits whose true class ``label`` is the ``rank``-th largest (0 = top-1)."""
    order = [c for c in range(classes) if c != label]
    order.insert(rank, label)
    out = torch.empty(classes)
    out[torch.tensor(order)] = torch.linspace(10.0, 1.0, classes)
    return out


def test_top1_and_top5_on_known_logits():
    ranks = [0, 0, 0, 1, 4, 5, 9, 0, 3, 7, 2]  # 4 at rank 0 -> top-1 4/11; 8 at ranks 0-4 -> top-5 8/11
    labels = [i % 10 for i in range(len(ranks))]
    x = torch.stack([_logits_with_rank(r, y) for r, y in zip(ranks, labels)])
    y = torch.tensor(labels)
    for batch in (1, 4, 11):  # hits are summed over batches of any size, the last one short
        m = evaluate(Logits(), make_loader(torch.utils.data.TensorDataset(x, y), batch))
        assert m["images"] == 11
        assert m["top1"] == pytest.approx(100 * 4 / 11) and m["top5"] == pytest.approx(100 * 8 / 11)


def test_fewer_than_five_classes_and_empty_set():
    x = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    y = torch.tensor([1, 2, 2])
    m = evaluate(Logits(), [(x, y)])
    assert m["top1"] == pytest.approx(200 / 3) and m["top5"] == 100.0  # top-5 of 3 classes: every class
    with pytest.raises(ValueError, match="empty"):
        evaluate(Logits(), [])


def _write_split(folder, n, seed):
    from dfq.io import save_torch

    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    save_torch({"images": images, "labels": labels}, folder)
    return images, labels


def _count(model, images, labels):
    """Top-1 / top-5 % counted here: Fashion-MNIST normalisation by hand, one batch, ranks by sorting."""
    x = ((images.float() / 255 - 0.2860) / 0.3530).unsqueeze(1)
    with torch.no_grad():
        logits = model(x)
    rank = (logits > logits.gather(1, labels.view(-1, 1))).sum(1)  # classes scoring above the label's
    return 100.0 * (rank == 0).sum().item() / len(labels), 100.0 * (rank < 5).sum().item() / len(labels)


def test_stage_accuracy_on_the_test_set_and_the_validation_split(tmp_path):
    """dfq.fp32.evaluate.split_accuracy (what the fp32 and evaluate stages write): top1/top5 on data/prepared/eval and
    val_top1/val_top5 on data/prepared/val, each equal to a count made here; no validation images, no val_ keys."""
    from dfq.fp32.datasets import FASHION_MNIST_SPEC
    from dfq.fp32.evaluate import split_accuracy

    prepared = tmp_path / "prepared"
    test = _write_split(prepared / "eval" / "test.pt", 53, 0)
    val = _write_split(prepared / "val" / "val.pt", 41, 1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)).eval()
    m = split_accuracy(model, FASHION_MNIST_SPEC, prepared, 8, desc="t")
    top1, top5 = _count(model, *test)
    val_top1, val_top5 = _count(model, *val)
    assert 0 < val_top1 < 100 and (val_top1, val_top5) != (top1, top5)  # the two sets are told apart
    assert m == pytest.approx({"top1": top1, "top5": top5, "val_top1": val_top1, "val_top5": val_top5})
    _write_split(prepared / "val" / "val.pt", 0, 1)  # data.val_images 0: an empty split
    assert split_accuracy(model, FASHION_MNIST_SPEC, prepared, 8, desc="t") == pytest.approx(
        {"top1": top1, "top5": top5}
    )
    (prepared / "val" / "val.pt").unlink()
    (prepared / "val").rmdir()
    with pytest.raises(FileNotFoundError, match="prepared/val: missing .* rerun the data stage"):
        split_accuracy(model, FASHION_MNIST_SPEC, prepared, 8, desc="t")
