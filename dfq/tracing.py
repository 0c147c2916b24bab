"""torch.fx helpers shared by generation and quantization: which modules an eval-mode forward runs.

Both sides need it (generation hooks the BatchNorm layers a forward actually runs, quantization finds
the units it reconstructs), and neither owns the other, so it lives at the bottom of the package.
"""

from __future__ import annotations

import weakref
from typing import Iterable

from torch import fx, nn

_EXECUTED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def executed_modules(model: nn.Module, leaves: Iterable[str] = ()) -> set[str] | None:
    """Qualified names of the modules an eval-mode forward pass calls, found by tracing the model with
    torch.fx (torch.nn layers and the modules named in ``leaves`` are called whole, others traced into).
    A registered module that eval mode never runs (Inception3's AuxLogits) is absent. None when torch.fx
    cannot trace the model (data-dependent control flow): callers then take every module as run.
    Cached per model while its modules stay the same (generation builds BN hooks for every batch, and
    tracing Inception3 takes about a second)."""
    key = (tuple(leaves), tuple(id(m) for m in model.modules()))
    hit = _EXECUTED.get(model)
    if hit is not None and hit[0] == key:
        return None if hit[1] is None else set(hit[1])
    leaf_ids = {id(model.get_submodule(n)) for n in leaves}

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return id(m) in leaf_ids or super().is_leaf_module(m, qualname)

    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        graph = Tracer().trace(model)
    except Exception:  # any error of a user's forward under symbolic tracing: fall back to all modules
        graph = None
    finally:
        for m, training in modes:
            m.training = training
    ran = None if graph is None else frozenset(n.target for n in graph.nodes if n.op == "call_module")
    _EXECUTED[model] = (key, ran)
    return None if ran is None else set(ran)


def bn_layers(model: nn.Module) -> list[nn.BatchNorm2d]:
    """The BatchNorm2d layers an eval-mode forward pass runs, in ``model.modules()`` order. Layers that
    are registered but never called in eval mode (Inception3's AuxLogits head) are left out, so every
    hooked layer is executed and DSG counts only real layers; a model torch.fx cannot trace keeps all."""
    ran = executed_modules(model)
    return [m for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and (ran is None or name in ran)]
