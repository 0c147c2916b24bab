"""One typed schema for params.yaml (pydantic). Stages validate the whole file before any work.

``validate(params)`` returns the parsed ``Params`` (stages read its attributes) or raises ``ParamsError`` whose
message names every offending key and says what is allowed. The schema composes the library's own config classes
(TrainConfig, the sources' configs, QuantSpec, ObserverConfig, ReconConfig with GenieMConfig, FinetuneConfig), each
declared once next to its code; only the pipeline's own shape is declared here: which sets, seeds and cells to run.
``check_paths`` (here) and ``dfq.pipeline.checks.check_model`` add the checks that need the file system or the
model. The library never reads params.yaml itself: callers pass the dict.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from dfq.cells import cell_name, finetuned, is_mixed, mixed_budget, parse_bits, parse_cell, parse_mixed
from dfq.fp32.datasets import FASHION_MNIST_TRAIN_IMAGES
from dfq.fp32.models import ARCHS
from dfq.fp32.train import TrainConfig
from dfq.generation.sources import SOURCES, SourceConfig, method_of, source_config
from dfq.quant.finetune import FinetuneConfig
from dfq.quant.genie_m import genie_spec
from dfq.quant.observers import ObserverConfig
from dfq.quant.prepare import QuantSpec
from dfq.quant.reconstruction import ReconConfig

PosInt = Field(gt=0)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)


class Data(Strict):
    dataset: Literal["fashion_mnist", "imagefolder"]
    root: str = "/usr/share/datasets/fashion-mnist"
    download: bool = False
    test_dir: Optional[str] = None
    train_dir: Optional[str] = None
    resize: Optional[int] = Field(default=None, ge=0)
    num_images: int = PosInt
    real_pool: int = PosInt
    val_images: int = Field(default=0, ge=0)  # validation split: training images disjoint from the real pool
    seed: int = Field(ge=0)

    @model_validator(mode="after")
    def folders_given(self):
        if self.dataset == "imagefolder" and not (self.test_dir and self.train_dir):
            raise ValueError("data.dataset=imagefolder needs data.test_dir and data.train_dir")
        if self.num_images > self.real_pool:
            raise ValueError(
                f"data.num_images={self.num_images} is larger than data.real_pool={self.real_pool}: "
                "every real calibration set is drawn from that pool"
            )
        n = FASHION_MNIST_TRAIN_IMAGES  # an image folder is counted by the data stage
        if self.dataset == "fashion_mnist" and self.real_pool + self.val_images > n:
            raise ValueError(
                f"data.val_images={self.val_images}: the validation split and the real pool "
                f"(data.real_pool={self.real_pool}) are disjoint sets of the {n} Fashion-MNIST training "
                f"images, so together at most {n}: lower data.val_images (0: no validation split)"
            )
        return self


class Model(Strict):
    arch: str
    weights: Optional[str] = None

    @field_validator("arch")
    @classmethod
    def known_arch(cls, v: str) -> str:
        if ":" not in v and v not in ARCHS:
            raise ValueError(f"unknown arch {v!r}; allowed: {', '.join(sorted(ARCHS))} or package.module:callable")
        return v


class Generate(BaseModel):
    model_config = ConfigDict(extra="allow")
    sources: list[str] = Field(min_length=1)
    seeds: list[int] = Field(min_length=1)
    batch_size: int = PosInt

    @field_validator("seeds")
    @classmethod
    def distinct_seeds(cls, v: list[int]) -> list[int]:
        if any(s < 0 for s in v) or len(set(v)) != len(v):
            raise ValueError(f"seeds must be distinct non-negative integers (got {v})")
        return v

    @field_validator("sources")
    @classmethod
    def distinct_sources(cls, v: list[str]) -> list[str]:
        repeated = sorted({s for s in v if v.count(s) > 1})
        if repeated:
            raise ValueError(
                f"{', '.join(map(repr, repeated))} repeated: list each source once (to run a method "
                "twice, add a params group under another name with method: <method>)"
            )
        return v

    @model_validator(mode="after")
    def source_groups(self):
        extra = self.model_extra or {}
        if "seed" in extra:
            raise ValueError("generate.seed is replaced by generate.seeds, a list (e.g. [0] or [0, 1, 2])")
        for name in self.sources:
            if name not in extra:
                raise ValueError(f"generate.sources: source {name!r} has no params group generate.{name}")
        for name, group in extra.items():
            if not isinstance(group, dict):
                raise ValueError(f"generate.{name}: must be a mapping (a source's params group)")
            method = group.get("method", name)
            if method not in SOURCES:
                raise ValueError(f"generate.{name}.method: unknown method {method!r}; allowed: {', '.join(SOURCES)}")
            try:
                source_config(name, group)
            except ValidationError as exc:
                raise ValueError(_format(exc, prefix=f"generate.{name}.")) from None
        return self

    def config(self, source: str) -> SourceConfig:
        """The typed config of a source's params group (``dfq.generation.sources.CONFIGS``)."""
        return source_config(source, self.group(source))

    def group(self, source: str) -> dict:
        """A source's params group as written (recorded beside its set, logged to MLflow)."""
        return (self.model_extra or {})[source]

    def method(self, source: str) -> str:
        return method_of(source, self.group(source))


class Mixed(Strict):
    """Mixed-precision cells mp<B>a<A> (B: average weight bits over the allocatable layers, A: activation bits) and
    the candidate weight bit-widths the sensitivity stage measures and the allocation picks from."""

    cells: list[str] = []
    candidates: list[int] = Field(min_length=1)

    @field_validator("cells")
    @classmethod
    def valid_cells(cls, v: list[str]) -> list[str]:
        for c in v:
            parse_mixed(c)
        repeated = sorted({c for c in v if v.count(c) > 1})
        if repeated:
            raise ValueError(f"{', '.join(map(repr, repeated))} repeated: list each mixed cell once")
        return v

    @field_validator("candidates")
    @classmethod
    def valid_candidates(cls, v: list[int]) -> list[int]:
        if any(not 2 <= b <= 8 for b in v) or len(set(v)) != len(v):
            raise ValueError(f"candidate weight bit-widths must be distinct integers in 2..8 (got {v})")
        return v

    @model_validator(mode="after")
    def budgets_reachable(self):
        lo, hi = min(self.candidates), max(self.candidates)
        for c in self.cells:
            kind, avg, _ = mixed_budget(c)
            if kind == "bits" and not lo <= avg <= hi:  # a size budget is checked against the model when allocated
                raise ValueError(
                    f"quantize.mixed.cells: {c!r} asks for {avg:g} average weight bits, outside the range "
                    f"of quantize.mixed.candidates ({lo}..{hi} bits)"
                )
        return self


# params.yaml keeps the quantize group flat; these keys belong to the library's QuantSpec and ObserverConfig
NESTED = {
    "spec": ("protocol", "weight_scheme", "weight_range", "bias"),
    "observer": ("act_method", "percentile", "ema_momentum"),
}


class Quantize(Strict):
    bits: list[str] = Field(min_length=1)
    mixed: Mixed
    spec: QuantSpec = QuantSpec()
    observer: ObserverConfig = ObserverConfig()
    rounding: Literal["nearest", "adaround", "brecq", "qdrop", "genie"] = "nearest"
    reconstruction: ReconConfig = ReconConfig()

    @model_validator(mode="before")
    @classmethod
    def nest(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            return v
        v = dict(v)
        for group, keys in NESTED.items():
            v[group] = {k: v.pop(k) for k in keys if k in v}
        return v

    @model_validator(mode="after")
    def genie_edges(self):
        """rounding genie: the spec every stage prepares with carries Genie's bit rule (``genie_spec``)."""
        try:
            self.spec = genie_spec(self.spec, self.rounding, self.reconstruction.genie)
        except ValueError as exc:
            raise ValueError(f"quantize.rounding={self.rounding}: {exc}") from None
        return self

    @property
    def cells(self) -> list[str]:
        """Every calibrated cell's bits: the uniform ones, then the mixed ones."""
        return self.bits + self.mixed.cells

    @field_validator("bits")
    @classmethod
    def valid_bits(cls, v: list[str]) -> list[str]:
        for b in v:
            if is_mixed(b):
                raise ValueError(f"{b!r} is a mixed-precision cell: list it in quantize.mixed.cells")
            parse_bits(b)
        if len(set(v)) != len(v):
            raise ValueError("bit-widths repeat")
        return v


class Evaluate(Strict):
    batch_size: int = PosInt


class Track(Strict):
    experiment: str = Field(min_length=1)


class Export(Strict):
    cells: list[str] = []  # <source>-s<seed>-<bits>, e.g. zeroq-s0-w8a8
    batch_size: int = Field(default=64, gt=0)
    # export.register: register each exported cell's MLflow model as <experiment>-<source>-<bits> (docs/deploy.md);
    # the attribute is register_ as pydantic's BaseModel (an ABC) has a classmethod register
    register_: bool = Field(default=False, alias="register")

    @field_validator("cells")
    @classmethod
    def valid_cells(cls, v: list[str]) -> list[str]:
        for c in v:
            parse_cell(str(c))
        return v


class Finetune(Strict):
    """Data-free fine-tuning of the cells finetune.sources x generate.seeds x finetune.bits (dfq.quant.finetune)."""

    sources: list[str] = []
    bits: list[str] = []
    num_images: int = PosInt
    train: FinetuneConfig = FinetuneConfig()

    @field_validator("sources", "bits")
    @classmethod
    def distinct(cls, v: list[str]) -> list[str]:
        repeated = sorted({x for x in v if v.count(x) > 1})
        if repeated:
            raise ValueError(f"{', '.join(map(repr, repeated))} repeated")
        return v


class Params(Strict):
    data: Data
    model: Model
    train: TrainConfig = TrainConfig()
    generate: Generate
    quantize: Quantize
    evaluate: Evaluate
    track: Track
    export: Export = Export()
    finetune: Finetune
    _raw: dict = PrivateAttr(default_factory=dict)

    @property
    def raw(self) -> dict:
        """params.yaml as written: what stages record (beside a set, in MLflow), never what they compute with."""
        return self._raw

    @model_validator(mode="after")
    def finetune_cells_are_calibrated(self):
        f = self.finetune
        if not f.sources:
            return self
        bad = [s for s in f.sources if s not in self.generate.sources]
        if bad:
            raise ValueError(f"finetune.sources: {', '.join(map(repr, bad))} not in generate.sources")
        bad = [b for b in f.bits if b not in self.quantize.cells]
        if not f.bits or bad:
            raise ValueError(
                f"finetune.bits: {', '.join(map(repr, bad)) or '[]'}: list calibrated cells (from "
                "quantize.bits or quantize.mixed.cells) to fine-tune, or use finetune.sources: []"
            )
        if f.num_images < self.data.num_images:
            n = f"finetune.num_images={f.num_images} is below data.num_images={self.data.num_images}"
            raise ValueError(f"{n}: fine-tuning uses the calibration set and more")
        if f.num_images > self.data.real_pool and any(self.generate.method(s) == "real" for s in f.sources):
            raise ValueError(
                f"finetune.num_images={f.num_images} is larger than data.real_pool={self.data.real_pool}: "
                "raise data.real_pool for a real source"
            )
        return self

    @model_validator(mode="after")
    def export_cells_are_calibrated(self):
        missing = [c for c in self.export.cells if c not in self.cells()]
        if missing:
            raise ValueError(
                f"export.cells: {', '.join(map(repr, missing))} not calibrated by this pipeline "
                "(cells are <source>-s<seed>-<bits> from generate.sources x generate.seeds x "
                "quantize.bits or quantize.mixed.cells); list calibrated cells or use export.cells: []"
            )
        return self

    def cells(self) -> list[str]:
        """Every cell the pipeline calibrates (sources x seeds x uniform and mixed bits), then the fine-tuned ones."""
        g, f = self.generate, self.finetune
        tuned = [cell_name(s, finetuned(b), k) for s in f.sources for k in g.seeds for b in f.bits]
        return [cell_name(s, b, k) for s in g.sources for k in g.seeds for b in self.quantize.cells] + tuned


class ParamsError(ValueError):
    pass


def _format(exc: ValidationError, prefix: str = "") -> str:
    msgs = []
    for e in exc.errors():
        loc = prefix + ".".join(
            str(p)
            for p in e["loc"]
            if not str(p).startswith("function-")
            and not (len(e["loc"]) > 2 and e["loc"][0] == "quantize" and p in NESTED)
        )
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "unexpected_keyword_argument":  # a config dataclass's word for an extra key
            msg = "Extra inputs are not permitted"
        got = "" if e["type"] in ("missing", "value_error") else f" (got {e.get('input')!r})"
        if not loc or msg.startswith(loc + "."):  # a cross-group or nested group's message names its key
            msgs.append(msg)
        else:
            msgs.append(f"{loc}: {msg}{got}")
    return "; ".join(msgs)


def validate(params: dict, source: str = "params.yaml") -> Params:
    """Parse and check the whole params dict; one ParamsError naming every offending key."""
    if not isinstance(params, dict):
        raise ParamsError(f"{source}: expected a mapping of parameter groups")
    try:
        parsed = Params.model_validate(params)
        parsed._raw = params
        return parsed
    except ValidationError as exc:
        raise ParamsError(f"{source}: {_format(exc)}") from None
    except ValueError as exc:  # parse_bits inside a validator
        raise ParamsError(f"{source}: {exc}") from None


def resolve(path: str, roots: list[Path]) -> Path | None:
    p = Path(os.path.expandvars(path)).expanduser()
    for c in [p] if p.is_absolute() else [r / p for r in roots]:
        if c.exists():
            return c
    return None


def check_paths(p: Params, roots: list[Path]) -> None:
    """Every input path given in params exists and is readable (relative paths against ``roots``)."""
    todo = []
    if p.data.dataset == "imagefolder":
        todo += [("data.test_dir", p.data.test_dir), ("data.train_dir", p.data.train_dir)]
    if p.model.weights and p.model.weights != "torchvision":
        todo.append(("model.weights", p.model.weights))
    for key, value in todo:
        found = resolve(value, roots)
        if found is None:
            raise ParamsError(
                f"params.yaml: {key}={value}: not found (looked relative to {', '.join(map(str, roots))})"
            )
        if not os.access(found, os.R_OK):
            raise ParamsError(f"params.yaml: {key}={value}: not readable")
        if key == "model.weights":
            weights_file(value, found)
    if p.model.weights is None and p.data.dataset != "fashion_mnist":
        raise ParamsError(
            "params.yaml: model.weights is null, but training is only built in for data.dataset="
            "fashion_mnist: give model.weights (a file, or 'torchvision')"
        )


def weights_file(value: str, found: Path) -> Path:
    if not found.is_file():
        raise ParamsError(
            f"params.yaml: model.weights={value}: {found} is a folder, not a weights file "
            "(give a state-dict file saved with torch.save, or 'torchvision')"
        )
    return found
