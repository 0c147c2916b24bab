"""The calibration sources: which method a source's params group runs, its typed config, and one batch of it.

A source is a named params group (generate.<name>) whose ``method`` (default: its name) is gaussian (N(0, 1)
noise in the normalised input space), real (a seeded draw from the real pool), zeroq or dsg
(``generators``), genie or genie_dsg (``genie``). Several groups may run one method with other settings
(the DSG ablations do).
"""

from __future__ import annotations

from typing import Literal, Optional, Union

import torch
from pydantic import ConfigDict
from pydantic.dataclasses import dataclass
from torch import nn

from dfq.generation.generators import DSGConfig, ZeroQConfig, batch_seed, dsg_batch, gaussian_batch, zeroq_batch
from dfq.generation.genie import GenieConfig, GenieDSGConfig, genie_batch

SOURCES = ("gaussian", "zeroq", "dsg", "genie", "genie_dsg", "real")


@dataclass(config=ConfigDict(extra="forbid"), frozen=True)
class PlainConfig:
    """gaussian (N(0, 1) noise) and real (a seeded draw from the real pool): nothing to tune."""

    method: Optional[Literal["gaussian", "real"]] = None


SourceConfig = Union[PlainConfig, ZeroQConfig, DSGConfig, GenieConfig, GenieDSGConfig]
CONFIGS = {
    "gaussian": PlainConfig,
    "real": PlainConfig,
    "zeroq": ZeroQConfig,
    "dsg": DSGConfig,
    "genie": GenieConfig,
    "genie_dsg": GenieDSGConfig,
}


def method_of(source: str, group: dict) -> str:
    """A source's generation method: its params group's ``method`` key, else its own name."""
    method = group.get("method", source)
    if method not in SOURCES:
        raise ValueError(f"generate.{source}.method={method!r} is unknown; allowed: {', '.join(SOURCES)}")
    return method


def source_config(source: str, group: dict) -> SourceConfig:
    """The typed config of a source's params group (its method's config class; pydantic's ValidationError
    names the offending key)."""
    return CONFIGS[method_of(source, group)](**group)


def config_method(source: str, cfg: SourceConfig) -> str:
    """The method a typed source config runs: its ``method`` field, else the source's own name."""
    return cfg.method or source


def real_subset(pool: torch.Tensor, num_images: int, seed: int, skip: int = 0) -> torch.Tensor:
    """``num_images`` images drawn without replacement from the data stage's pool of real training
    images, by ``seed`` (each seed of the real source is its own calibration set); ``skip``: the draw
    continued after the first ``skip`` images (fine-tuning's extra images, disjoint from the set's)."""
    if skip + num_images > len(pool):
        raise ValueError(
            f"{skip + num_images} real images (data.num_images, or finetune.num_images) are more than "
            f"the real image pool ({len(pool)} images, data.real_pool): raise data.real_pool"
        )
    pick = torch.randperm(len(pool), generator=torch.Generator().manual_seed(batch_seed(seed, -1)))[
        skip : skip + num_images
    ]
    return pool[pick.sort().values]


def generate_batch(
    source: str, model: nn.Module, shape: tuple[int, ...], seed: int, cfg: SourceConfig, device="cpu", desc: str = ""
) -> tuple[torch.Tensor, dict, dict | None]:
    """One batch of a synthetic source: (images, info, extras to save beside it or None).

    Args:
        source: the source's name; its method when ``cfg.method`` is None.
        model: the FP32 model the images are optimised against (unused by gaussian).
        shape: (B, C, H, W) of the batch.
        seed: the batch's seed (``batch_seed(set seed, batch index)``).
        cfg: the source's typed config (PlainConfig, ZeroQConfig, DSGConfig, GenieConfig or GenieDSGConfig); its
            method must be gaussian, zeroq, dsg, genie or genie_dsg, else ValueError (real batches are drawn, not
            made here).
        device: where the optimising methods run; the images come back on the CPU.
        desc: progress-bar label.
    """
    method = config_method(source, cfg)
    if method == "gaussian":
        return gaussian_batch(shape, seed), {}, None
    if method == "zeroq":
        x, info = zeroq_batch(model, shape, seed, cfg, device=device, desc=desc)
        return x, info, None
    if method == "dsg":
        return dsg_batch(model, shape, seed, cfg, device=device, desc=desc)
    if method in ("genie", "genie_dsg"):
        return genie_batch(model, shape, seed, cfg, device=device, desc=desc)
    raise ValueError(f"generate source {source!r}: method {method!r} makes no synthetic batches here")
