"""Turning an FP32 model into a fake-quant model (torch.ao style steps), under one of two protocols.

``prepare`` traces the model with torch.fx, one level at a time: the top-level graph keeps every
*unit* (a residual block or other custom sub-module with weights, see ``find_blocks``) as one call,
and each unit is traced into its own GraphModule. The model is wrapped, not rewritten, and each unit
can run on its own, which block reconstruction (reconstruction.py) needs. In every graph:

- protocol ``zeroq`` (ZeroQ/DSG): no BN folding; every Conv2d/Linear gets per-channel fake-quant
  weights at the target bits, first and last layer included; an activation fake-quant follows every
  ReLU/ReLU6, whether an ``nn.ReLU`` module, ``F.relu``/``torch.relu`` or a ``.relu()`` call.
- protocol ``brecq`` (BRECQ/QDrop): BatchNorm folded into the preceding conv; an activation fake-quant
  on the input of every Conv2d/Linear (one per distinct input tensor), and EVERY consumer of that
  tensor reads the quantized copy: a block's output is quantized once, and the next block's convs, its
  shortcut and its residual add all see the same quantized tensor (BRECQ; MobileNetV2's ``x + conv(x)``
  likewise). What stays FP32 is what an integer engine keeps at accumulator precision: conv/linear
  outputs (BN folded) until the next quantizer, so a residual add sums the last conv's FP32 output
  with the quantized (or conv-projected) shortcut. The first and the last weight layer, weights and
  input, at 8 bits; or, with ``QuantSpec.edges="genie"`` (Genie's rule, its official code), the first layer's
  weights at 8 bits and its input (the image) not quantized, the second layer's input at 8 bits, the last
  layer W8A8.

``calibrate`` runs calibration batches through the observers and freezes the activation ranges.
"""

from __future__ import annotations

import copy
from typing import Callable, Iterable, Literal

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, model_validator
from pydantic.dataclasses import dataclass
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from tqdm import tqdm

from dfq.cells import is_mixed, parse_bits, parse_mixed
from dfq.quant.fake_quant import ActFakeQuantize, QuantConv2d, QuantLinear
from dfq.quant.observers import MinMaxObserver
from dfq.tracing import executed_modules

PROTOCOLS = ("zeroq", "brecq")
RELU_MODULES = (nn.ReLU, nn.ReLU6)
RELU_FUNCTIONS = {F.relu, F.relu6, F.relu_, torch.relu, torch.relu_}
RELU_METHODS = {"relu", "relu_"}
WEIGHT_TYPES = (nn.Conv2d, nn.Linear)
QUANT_TYPES = (QuantConv2d, QuantLinear)


@dataclass(config=ConfigDict(extra="forbid"), frozen=True)
class QuantSpec:
    """How a model is quantized, apart from its bit-widths: the protocol (zeroq | brecq, see above), the
    per-channel weight grid (asymmetric | symmetric signed integers with zero point 0) and its range rule
    (minmax | mse), whether biases are put on the int32 grid s_x * s_w an integer engine adds them on, and, under
    the brecq protocol, which first/second/last-layer rule applies (``edges``: the protocol's own, or Genie's,
    see the module docstring). A checkpoint records these; ``of_checkpoint`` holds the defaults of checkpoints
    older than a field. ``edges`` is recorded only when it is not the default, so records made before it existed
    stay what they were."""

    protocol: Literal["zeroq", "brecq"] = "zeroq"
    weight_scheme: Literal["asymmetric", "symmetric"] = "asymmetric"
    weight_range: Literal["minmax", "mse"] = "minmax"
    bias: Literal["int32", "float"] = "float"
    edges: Literal["protocol", "genie"] = "protocol"

    @model_validator(mode="after")
    def _genie_edges_need_brecq(self):
        if self.edges == "genie" and self.protocol != "brecq":
            raise ValueError("edges='genie' (Genie's first/second/last-layer bits) needs protocol brecq")
        return self

    @classmethod
    def of_checkpoint(cls, ckpt: dict) -> "QuantSpec":
        """The spec a calibrated checkpoint was made with; fields it predates take the values of that time."""
        keys = ("protocol", "weight_scheme", "weight_range", "bias", "edges")
        return cls(**{k: ckpt[k] for k in keys if k in ckpt})

    def record(self) -> dict:
        """The fields as a checkpoint and a metrics file carry them (``edges`` only when not the default)."""
        return {
            "protocol": self.protocol,
            "weight_scheme": self.weight_scheme,
            "weight_range": self.weight_range,
            "bias": self.bias,
            **({"edges": self.edges} if self.edges != "protocol" else {}),
        }


class NothingQuantizedError(RuntimeError):
    pass


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), RELU_MODULES)
    if node.op == "call_function":
        return node.target in RELU_FUNCTIONS
    if node.op == "call_method":
        return node.target in RELU_METHODS
    return False


def _swap_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def find_blocks(model: nn.Module) -> list[str]:
    """Names of the reconstruction units: walking down from the root through nn.Sequential and
    nn.ModuleList containers, the first module of any other class that holds a Conv2d/Linear
    (a torchvision BasicBlock/Bottleneck/InvertedResidual, a CIFAR ResNet block, a user's block), if
    an eval-mode forward pass calls it."""
    blocks: list[str] = []

    def walk(mod: nn.Module, prefix: str) -> None:
        for name, child in mod.named_children():
            full = f"{prefix}{name}"
            if isinstance(child, (nn.Sequential, nn.ModuleList)):
                walk(child, full + ".")
            elif not isinstance(child, WEIGHT_TYPES) and any(isinstance(m, WEIGHT_TYPES) for m in child.modules()):
                blocks.append(full)

    walk(model, "")
    ran = executed_modules(model, blocks)  # a block eval mode never calls (Inception3's AuxLogits) is no unit
    return [b for b in blocks if ran is None or b in ran]


class _UnitTracer(fx.Tracer):
    def __init__(self, leaves: set[int]):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return id(m) in self.leaves or super().is_leaf_module(m, qualname)


def _trace(module: nn.Module, leaves: set[int] = frozenset()) -> fx.GraphModule:
    tracer = _UnitTracer(set(leaves))
    return fx.GraphModule(module, tracer.trace(module), module.__class__.__name__)


def _fold_bn(gm: fx.GraphModule) -> int:
    """Fold every BatchNorm2d that directly and solely consumes a Conv2d's output into that conv."""
    modules = dict(gm.named_modules())
    n = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0]
        if not (
            isinstance(src, fx.Node)
            and src.op == "call_module"
            and len(src.users) == 1
            and type(modules.get(src.target)) is nn.Conv2d
        ):
            continue
        _swap_module(gm, src.target, fuse_conv_bn_eval(modules[src.target].eval(), modules[node.target].eval()))
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        n += 1
    gm.delete_all_unused_submodules()
    return n


def _insert_act(
    gm: fx.GraphModule, after: fx.Node, users: list[fx.Node], bits: int, observer: nn.Module, index: int
) -> str:
    name = f"act_fq_{index}"
    gm.add_submodule(name, ActFakeQuantize(bits, observer))
    if after.op == "placeholder":  # after all inputs, before the first computation (and every user)
        where = gm.graph.inserting_before(next(n for n in gm.graph.nodes if n.op != "placeholder"))
    else:
        where = gm.graph.inserting_after(after)
    with where:
        fq = gm.graph.call_module(name, (after,))
    for user in users:
        user.replace_input_with(after, fq)
    return name


def _weight_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    modules = dict(gm.named_modules())
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(modules.get(n.target), WEIGHT_TYPES)]


def _units(model: nn.Module, protocol: str) -> tuple[fx.GraphModule, list[tuple[str, fx.GraphModule]]]:
    """The top-level graph with every unit traced into its own graph: (top, [(prefix, graph), ...]); under the
    brecq protocol BatchNorm is folded into the preceding conv in each."""
    blocks = find_blocks(model)
    gm = _trace(model, {id(model.get_submodule(b)) for b in blocks})
    graphs = [("", gm)]
    for b in blocks:
        sub = _trace(gm.get_submodule(b))
        _swap_module(gm, b, sub)
        graphs.append((b, sub))
    if protocol == "brecq":
        for _, g in graphs:
            _fold_bn(g)
    return gm, graphs


def _weight_order(gm: fx.GraphModule, blocks: list[str]) -> list[str]:
    """The weight layers' names in execution order (the units ``blocks`` expanded in place)."""
    order: list[str] = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in blocks:
            order += [f"{node.target}.{n.target}" for n in _weight_nodes(gm.get_submodule(node.target))]
        elif node.op == "call_module" and isinstance(gm.get_submodule(node.target), WEIGHT_TYPES):
            order.append(node.target)
    if not order:
        raise NothingQuantizedError("nothing to quantize: the model has no Conv2d/Linear layers")
    return order


def _insert_acts(graphs, protocol: str, abits: int, edge: set[str], make_observer, raw: set[str] = frozenset()) -> int:
    """Insert the activation quantizers of the protocol into every graph; how many. brecq: the inputs of the
    layers in ``edge`` at 8 bits, those of the layers in ``raw`` not quantized."""
    n_acts = 0
    for prefix, g in graphs:
        modules = dict(g.named_modules())
        if protocol == "zeroq":
            for node in [n for n in g.graph.nodes if _is_relu(n, modules)]:
                _insert_act(g, node, list(node.users), abits, make_observer(), n_acts)
                n_acts += 1
        else:
            consumers: dict[fx.Node, list[fx.Node]] = {}
            for node in _weight_nodes(g):
                consumers.setdefault(node.args[0], []).append(node)
            for src, users in consumers.items():
                full = {f"{prefix}.{u.target}" if prefix else u.target for u in users}
                if full & raw:
                    continue
                # every user (shortcut, residual add, ...) reads the quantized tensor, not only the weight layers
                _insert_act(g, src, list(src.users), 8 if full & edge else abits, make_observer(), n_acts)
                n_acts += 1
        g.graph.lint()
        g.recompile()
    return n_acts


def prepare(
    model: nn.Module,
    wbits: int,
    abits: int,
    make_observer: Callable[[], nn.Module],
    spec: QuantSpec = QuantSpec(),
    layer_bits: dict[str, int] | None = None,
) -> fx.GraphModule:
    """A traced copy of ``model`` with fake-quant weights and observing activation quantizers.

    Args:
        model: the FP32 model (copied, never changed).
        wbits: weight bits of every weight layer not fixed by the protocol or named in ``layer_bits``.
        abits: activation bits (the protocol's 8-bit edge layers' inputs excepted).
        make_observer: a fresh calibration observer per activation quantizer (``ObserverConfig.make``).
        spec: protocol, weight scheme and weight range (``bias`` is applied after calibration: ``round_biases``).
        layer_bits: mixed precision: some weight layers, by their name in the prepared model (see ``layer_bits``),
            get their own bit-width instead of ``wbits``; the layers the protocol fixes at 8 bits
            (``gm.fixed_weight_layers``) cannot be given another.
    """
    protocol = spec.protocol
    gm, graphs = _units(copy.deepcopy(model).eval(), protocol)
    order = _weight_order(gm, [prefix for prefix, _ in graphs[1:]])
    edge = {order[0], order[-1]} if protocol == "brecq" else set()  # 8-bit weights
    genie = spec.edges == "genie"  # Genie: first layer's input raw, second layer's and last layer's input 8-bit
    raw, edge_inputs = ({order[0]}, {order[1 % len(order)], order[-1]}) if genie else (set(), edge)
    layer_bits = dict(layer_bits or {})
    unknown = sorted(set(layer_bits) - set(order))
    if unknown:
        raise ValueError(f"layer_bits names {unknown}, not weight layers of the model; they are: {order}")
    fixed = sorted(n for n in edge if layer_bits.get(n, 8) != 8)
    if fixed:
        raise ValueError(f"layer_bits: {fixed} are fixed at 8 bits by the {protocol} protocol (first and last layer)")
    n_acts = _insert_acts(graphs, protocol, abits, edge_inputs, make_observer, raw)
    n_weights = 0
    for name, mod in list(gm.named_modules()):
        if type(mod) in WEIGHT_TYPES:
            cls = QuantConv2d if isinstance(mod, nn.Conv2d) else QuantLinear
            _swap_module(
                gm,
                name,
                cls(mod, 8 if name in edge else layer_bits.get(name, wbits), spec.weight_scheme, spec.weight_range),
            )
            n_weights += 1
    if n_acts == 0:
        raise NothingQuantizedError(
            f"nothing to quantize: found {n_weights} Conv2d/Linear layers and no activations to quantize "
            "(protocol zeroq quantizes activations after ReLU/ReLU6; protocol brecq the input of every conv/linear)"
        )
    gm.fixed_weight_layers = sorted(edge)  # weight layers the protocol keeps at 8 bits (not allocatable)
    gm.edges = spec.edges
    return gm


def act_quantizers(gm: nn.Module) -> list[ActFakeQuantize]:
    return [m for m in gm.modules() if isinstance(m, ActFakeQuantize)]


def weight_quantized_layers(gm: nn.Module) -> list[nn.Module]:
    return [m for m in gm.modules() if isinstance(m, QUANT_TYPES)]


def layer_bits(gm: nn.Module) -> dict[str, int]:
    """Weight bits of every fake-quant weight layer, by its name in the prepared model (execution order
    within each graph is not guaranteed; module order is)."""
    return {name: m.weight_bits for name, m in gm.named_modules() if isinstance(m, QUANT_TYPES)}


def weight_size(gm: nn.Module) -> dict:
    """Storage of the quantized weights: every Conv2d/Linear weight at its own bit-width (fixed 8-bit
    layers included; biases, BatchNorm and per-channel scales left out). MB = 10^6 bytes."""
    layers = weight_quantized_layers(gm)
    total = sum(m.weight.numel() * m.weight_bits for m in layers)
    params = sum(m.weight.numel() for m in layers)
    return {"weight_mb": total / 8e6, "weight_params": params, "avg_weight_bits": total / max(params, 1)}


def set_quant_state(gm: nn.Module, weights: bool, acts: bool) -> None:
    """Switch weight and activation fake-quant on or off (off: full precision) in the whole model."""
    for m in weight_quantized_layers(gm):
        m.weight_quant = weights
    for fq in act_quantizers(gm):
        fq.enabled = acts


@torch.no_grad()
def calibrate(gm: nn.Module, batches: Iterable[torch.Tensor], device="cpu", desc: str = "calibrate") -> int:
    """Feed calibration batches through the observers, then freeze every activation range."""
    gm.eval().to(device)
    for fq in act_quantizers(gm):
        fq.enabled = fq.observing = True
    n = 0
    for x in tqdm(batches, desc=desc, leave=False):
        gm(x.to(device))
        n += len(x)
    if n == 0:
        raise NothingQuantizedError("calibration data is empty")
    for fq in act_quantizers(gm):
        fq.freeze()
    return n


def load_calibrated(gm: nn.Module, state: dict) -> nn.Module:
    """Load a calibrated state dict into a freshly prepared model and switch it to quantizing."""
    gm.load_state_dict(state, strict=True)
    quantizers = act_quantizers(gm)
    if not all(bool(fq.calibrated) for fq in quantizers):
        raise ValueError("the quantized checkpoint has uncalibrated activation quantizers")
    for fq in quantizers:
        fq.observing = False
    return gm.eval()


def load_quantized(model: nn.Module, ckpt: dict) -> nn.Module:
    """The fake-quant model saved by the calibrate stage: prepared with the checkpoint's own bits,
    protocol, weight scheme and weight range (older checkpoints: zeroq, asymmetric, minmax), then loaded.
    A mixed-precision checkpoint (bits ``mp<B>a<A>``) carries its per-layer weight bits (``layer_bits``)."""
    if is_mixed(ckpt["bits"]):
        wbits, abits, per_layer = 8, parse_mixed(ckpt["bits"])[1], ckpt["layer_bits"]
    else:
        (wbits, abits), per_layer = parse_bits(ckpt["bits"]), None
    gm = prepare(model, wbits, abits, MinMaxObserver, QuantSpec.of_checkpoint(ckpt), per_layer)
    if per_layer is not None and set(per_layer) != set(layer_bits(gm)):
        raise ValueError(
            f"the mixed-precision checkpoint names the weight layers {sorted(per_layer)}, "
            f"the model has {sorted(layer_bits(gm))}"
        )
    return load_calibrated(gm, ckpt["state_dict"])


def summary(gm: nn.Module) -> dict:
    layers = weight_quantized_layers(gm)
    return {
        "weight_layers": len(layers),
        "act_quantizers": len(act_quantizers(gm)),
        "weight_bits": sorted({m.weight_bits for m in layers}),
        "act_bits": sorted({fq.bits for fq in act_quantizers(gm)}),
    }
