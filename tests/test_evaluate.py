"""evaluate(): top-1 / top-5 on known logits, counted by hand."""
import pytest
import torch

from dfq.evaluate import evaluate, make_loader


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
