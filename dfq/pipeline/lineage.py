"""A run's data lineage as MLflow dataset inputs: the calibration set it was calibrated on and the FP32 model it
started from, each named and digested as DVC knows it, so the MLflow UI's Dataset column says which cached set a
run used (two runs on the same set show the same digest) and ``dvc pull`` fetches exactly that set.

An input is a plain dict (``tracking.log_cells`` turns it into MLflow's entities): name, digest (the DVC md5 of
the output in dvc.lock, without DVC's ``.dir`` suffix), source (the DVC path, the stage that wrote it and the
default DVC remote when one is configured), profile (what the set or model is) and context.
"""

from __future__ import annotations

import configparser
import json
from pathlib import Path

from dfq.cells import set_name
from dfq.pipeline import paths

SOURCE_TYPE = "dvc"


def lock_md5(lock: dict, stage: str, path: str) -> str:
    """The md5 dvc.lock records for the output ``path`` of ``stage`` ('unknown' when absent)."""
    for out in lock.get("stages", {}).get(stage, {}).get("outs", []):
        if out["path"] == path:
            return out["md5"]
    return "unknown"


def dvc_remote(repo_root: str | Path = ".") -> dict | None:
    """The default DVC remote (``core.remote`` in .dvc/config, overridden by .dvc/config.local): {name, url}, or
    None when none is configured."""
    config = configparser.ConfigParser(interpolation=None)
    config.read([Path(repo_root, ".dvc", "config"), Path(repo_root, ".dvc", "config.local")])
    name = config.get("core", "remote", fallback=None)
    if not name:
        return None
    for section in config.sections():
        if section.strip("'\"").replace('"', "") == f"remote {name}":
            return {"name": name, "url": config.get(section, "url", fallback="")}
    return {"name": name, "url": ""}


def _digest(md5: str) -> str:
    return md5.removesuffix(".dir")


def set_input(source: str, seed: int, raw: dict, lock: dict, remote: dict | None, shape=None) -> dict:
    """The calibration set ``<source>-s<seed>`` as a dataset input: its DVC md5, path and remote; its profile:
    images, batch size, the source's method and generator params as written in params.yaml, image shape.

    Args:
        source: the source's name (a generate.<name> params group).
        seed: the set's seed.
        raw: params.yaml as written (``Params.raw``).
        lock: dvc.lock, read for the set's md5.
        remote: the default DVC remote (``dvc_remote``) or None.
        shape: one image's shape (C, H, W), when known.
    """
    name, group = set_name(source, seed), raw["generate"][source]
    path, stage = str(paths.calib_set(name)), paths.generate_stage(source, seed)
    profile = {
        "images": raw["data"]["num_images"],
        "batch_size": raw["generate"]["batch_size"],
        "method": group.get("method", source),
        "params": group,
        **({"shape": list(shape)} if shape else {}),
    }
    return {
        "name": name,
        "digest": _digest(lock_md5(lock, stage, path)),
        "context": "calibration",
        "source": {"dvc_path": path, "dvc_stage": stage, **({"dvc_remote": remote} if remote else {})},
        "profile": profile,
    }


def model_input(raw: dict, lock: dict, remote: dict | None, meta: dict | None = None) -> dict:
    """The FP32 model (models/fp32.pt) as a dataset input: its DVC md5, path and remote; its profile: the
    architecture, where its weights came from (a file, torchvision, or trained here) and its input spec."""
    path = str(paths.FP32)
    weights = raw["model"].get("weights") or "trained by the fp32 stage"
    profile = {
        "arch": raw["model"]["arch"],
        "weights": weights,
        **({"input_spec": meta["input_spec"], "classes": meta["num_classes"]} if meta else {}),
    }
    return {
        "name": "fp32",
        "digest": _digest(lock_md5(lock, "fp32", path)),
        "context": "model",
        "source": {"dvc_path": path, "dvc_stage": "fp32", **({"dvc_remote": remote} if remote else {})},
        "profile": profile,
    }


def entities(inputs: list[dict]):
    """MLflow's DatasetInput entities of ``inputs`` (imports mlflow: call it where a run is logged)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    return [
        DatasetInput(
            Dataset(
                name=d["name"],
                digest=d["digest"],
                source_type=SOURCE_TYPE,
                source=json.dumps(d["source"], sort_keys=True),
                profile=json.dumps(d["profile"], sort_keys=True),
            ),
            [InputTag("mlflow.data.context", d["context"])],
        )
        for d in inputs
    ]
