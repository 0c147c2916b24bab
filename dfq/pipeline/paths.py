"""The pipeline's files and stage names in one table: what each DVC stage writes and where the next one reads it.

Every path is relative to the repository root (DVC runs each stage there). dvc.yaml spells the same paths
for DVC; ``tests/test_pipeline_e2e.py`` checks both against a real ``dvc repro``. The library below the
pipeline layer never sees these names: stages pass it files and folders.
"""

from __future__ import annotations

from pathlib import Path

from dfq.cells import base_bits, is_finetuned, is_mixed

PARAMS = Path("params.yaml")
PREPARED = Path("data/prepared")  # data stage: train/, eval/, val/, calib_real.pt, meta.json
PREPARED_META = PREPARED / "meta.json"
REAL_POOL = PREPARED / "calib_real.pt"
FP32 = Path("models/fp32.pt")  # fp32 stage: the model every other stage starts from
FP32_METRICS = Path("metrics/fp32.json")
RESULTS = Path("reports/results.md")
CELLS_TABLE = Path("reports/cells.csv")  # report stage: one row per cell and per (source, bits) mean; `dvc plots`
PLOTS = {  # report stage
    "accuracy_vs_bits": Path("reports/accuracy_vs_bits.png"),
    "size_vs_top1": Path("reports/size_vs_top1.png"),
    "bn_spread": Path("reports/bn_spread.png"),
    "samples": Path("reports/samples.png"),
}
SCRATCH = Path(".dfq-scratch")  # resumable stages' unfinished work (generate, finetune); not a DVC output
EVAL_DIR = Path("metrics/eval")  # one file per cell, named as the cell (so are the folders below)
CALIBRATE_DIR = Path("metrics/calibrate")
FINETUNE_DIR = Path("metrics/finetune")
EXPORT_DIR = Path("metrics/export")
QUANT_MAP_DIR = Path("reports/quant_map")
SENSITIVITY_PLOT_DIR = Path("reports/sensitivity")


def calib_set(name: str) -> Path:
    """A calibration set ``<source>-s<seed>`` (generate stage): batch_*.pt, margins, meta.json."""
    return Path("data/calib", name)


def finetune_set(name: str) -> Path:
    """The extra fine-tuning batches of a set (generate_finetune stage)."""
    return Path("data/finetune", name)


def batches(folder: Path) -> list[Path]:
    """The batch files of a set folder, in batch order."""
    return sorted(Path(folder).glob("batch_*.pt"))


def quant_checkpoint(cell: str) -> Path:
    """A calibrated (or fine-tuned, ``<set>-<bits>-ft``) cell: calibrate, calibrate_mixed, finetune."""
    return Path("models/quant", f"{cell}.pt")


def onnx_model(cell: str) -> Path:
    return Path("models/export", f"{cell}.onnx")


def diversity_metrics(name: str) -> Path:
    return Path("metrics/diversity", f"{name}.json")


def sensitivity_metrics(name: str) -> Path:
    return Path("metrics/sensitivity", f"{name}.json")


def sensitivity_plot(name: str) -> Path:
    return SENSITIVITY_PLOT_DIR / f"{name}.png"


def calibrate_metrics(cell: str) -> Path:
    """Wall time, size and allocation of a calibrated cell; a fine-tuned cell's are under metrics/finetune."""
    return (FINETUNE_DIR if is_finetuned(cell) else CALIBRATE_DIR) / f"{cell}.json"


def eval_metrics(cell: str) -> Path:
    return EVAL_DIR / f"{cell}.json"


def export_metrics(cell: str) -> Path:
    return EXPORT_DIR / f"{cell}.json"


def quant_map(cell: str) -> Path:
    return QUANT_MAP_DIR / f"{cell}.md"


def calibrate_stage(source: str, seed: int, bits: str) -> str:
    """The dvc.yaml stage that wrote a cell's checkpoint: calibrate@<source>-<seed>-<bits> for uniform cells,
    calibrate_mixed@... for mixed cells, finetune@<source>-<seed>-<bits> for a fine-tuned cell <bits>-ft."""
    if is_finetuned(bits):
        return f"finetune@{source}-{seed}-{base_bits(bits)}"
    return f"{'calibrate_mixed' if is_mixed(bits) else 'calibrate'}@{source}-{seed}-{bits}"


def evaluate_stage(source: str, seed: int, bits: str) -> str:
    """The dvc.yaml stage that evaluates a cell (evaluate, evaluate_mixed or evaluate_finetune)."""
    kind = "evaluate_finetune" if is_finetuned(bits) else "evaluate_mixed" if is_mixed(bits) else "evaluate"
    return f"{kind}@{source}-{seed}-{base_bits(bits)}"


def generate_stage(source: str, seed: int) -> str:
    return f"generate@{source}-{seed}"
