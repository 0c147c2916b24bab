"""At least 30 distinct bad inputs, each rejected with a message naming the param and what is allowed."""

import copy
import re
from pathlib import Path

import pytest
import torch
import yaml

from dfq.fp32.models import build_model
from dfq.pipeline.checks import check_model
from dfq.pipeline.schema import ParamsError, check_paths, validate

ROOT = Path(__file__).resolve().parents[1]
GOOD = yaml.safe_load((ROOT / "params.yaml").read_text())


def with_change(key, value):
    p = copy.deepcopy(GOOD)
    node = p
    *path, last = key.split(".")
    for k in path:
        node = node[k]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return p


DELETE = object()

BAD = [
    ("data.bogus", 1, "data.bogus: Extra inputs"),
    ("data.dataset", "mnist", "data.dataset: Input should be 'fashion_mnist' or 'imagefolder'"),
    ("data.num_images", 0, "data.num_images: Input should be greater than 0"),
    ("data.num_images", -5, "data.num_images: Input should be greater than 0"),
    ("data.num_images", "many", "data.num_images: Input should be a valid integer"),
    ("data.seed", -1, "data.seed: Input should be greater than or equal to 0"),
    ("data.resize", -3, "data.resize: Input should be greater than or equal to 0"),
    ("data.download", "maybe", "data.download: Input should be a valid boolean"),
    ("data.dataset", "imagefolder", "imagefolder needs data.test_dir and data.train_dir"),
    ("data.num_images", DELETE, "data.num_images: Field required"),
    ("model.arch", "resnet9000", "model.arch: unknown arch 'resnet9000'; allowed:"),
    ("model.weights", 5, "model.weights: Input should be a valid string"),
    ("train.epochs", 0, "train.epochs: Input should be greater than 0"),
    ("train.batch_size", -1, "train.batch_size: Input should be greater than 0"),
    ("train.lr", 0, "train.lr: Input should be greater than 0"),
    ("train.max_images", 0, "train.max_images: Input should be greater than 0"),
    ("generate.batch_size", 0, "generate.batch_size: Input should be greater than 0"),
    ("generate.sources", [], "generate.sources: List should have at least 1 item"),
    ("generate.sources", ["zeroq", "nope"], "source 'nope' has no params group generate.nope"),
    ("generate.zeroq.iterations", 0, "generate.zeroq.iterations: Input should be greater than 0"),
    ("generate.zeroq.iterations", 1.5, "generate.zeroq.iterations: Input should be a valid integer"),
    ("generate.zeroq.lr", -0.5, "generate.zeroq.lr: Input should be greater than 0"),
    (
        "generate.zeroq.init",
        "normal",
        "generate.zeroq.init: unknown init 'normal'; allowed: gaussian, uniform, zeroq_uniform",
    ),
    ("generate.zeroq.extra", 1, "generate.zeroq.extra: Extra inputs"),
    ("generate.dsg.eps", 1.5, "generate.dsg.eps: Input should be less than or equal to 1"),
    ("generate.dsg.eps", -0.1, "generate.dsg.eps: Input should be greater than or equal to 0"),
    ("generate.dsg.batch_multiple", 2, "generate.dsg.batch_multiple: Extra inputs"),
    (
        "generate.dsg.margin_probe",
        "real",
        "generate.dsg.margin_probe: unknown margin_probe 'real'; allowed: gaussian, uniform, init",
    ),
    ("generate.dsg.lse_tied", 0, "generate.dsg.lse_tied: Input should be greater than 0"),
    ("generate.dsg.label_weight", -1, "generate.dsg.label_weight: Input should be greater than or equal to 0"),
    ("generate.dsg.jitter", -2, "generate.dsg.jitter: Input should be greater than or equal to 0"),
    ("generate.seeds", [], "generate.seeds: List should have at least 1 item"),
    ("generate.seeds", [0, 0], "generate.seeds: seeds must be distinct non-negative integers (got [0, 0])"),
    ("generate.seed", 0, "generate.seed is replaced by generate.seeds"),
    ("data.real_pool", 10, "data.num_images=256 is larger than data.real_pool=10"),
    ("generate.dsg.lse_weight", 0.5, "generate.dsg.lse_weight: Input should be greater than or equal to 1"),
    ("generate.dsg.sda", "yes please", "generate.dsg.sda: Input should be a valid boolean"),
    ("generate.dsg.method", "magic", "generate.dsg.method: unknown method 'magic'"),
    ("generate.gaussian", 3, "generate.gaussian: must be a mapping"),
    ("quantize.bits", ["w9a8"], "bits='w9a8' is invalid; expected 'w<B>a<B>' with B in 2..8"),
    ("quantize.bits", ["w1a1"], "bits='w1a1' is invalid"),
    ("quantize.bits", ["w8a8", "w8a8"], "quantize.bits: bit-widths repeat"),
    ("quantize.bits", [], "quantize.bits: List should have at least 1 item"),
    (
        "quantize.bits",
        ["w4a4", "mp4a4"],
        "quantize.bits: 'mp4a4' is a mixed-precision cell: list it in quantize.mixed.cells",
    ),
    ("quantize.mixed", DELETE, "quantize.mixed: Field required"),
    ("quantize.mixed.budget", 4, "quantize.mixed.budget: Extra inputs"),
    ("quantize.mixed.cells", ["mp9a4"], "quantize.mixed.cells: mixed cell 'mp9a4' is invalid; expected 'mp<B>a<A>'"),
    ("quantize.mixed.cells", ["mp4a9"], "quantize.mixed.cells: mixed cell 'mp4a9' is invalid"),
    ("quantize.mixed.cells", ["mp4.0a4"], "quantize.mixed.cells: mixed cell 'mp4.0a4' is invalid"),
    ("quantize.mixed.cells", ["w4a4"], "quantize.mixed.cells: mixed cell 'w4a4' is invalid"),
    ("quantize.mixed.cells", ["mp0mba4"], "quantize.mixed.cells: mixed cell 'mp0mba4' is invalid"),
    ("quantize.mixed.cells", ["mp0.10mba4"], "quantize.mixed.cells: mixed cell 'mp0.10mba4' is invalid"),
    ("quantize.mixed.cells", ["mp4a4", "mp3a4", "mp4a4"], "quantize.mixed.cells: 'mp4a4' repeated"),
    ("quantize.mixed.cells", "mp4a4", "quantize.mixed.cells: Input should be a valid list"),
    ("quantize.mixed.candidates", [], "quantize.mixed.candidates: List should have at least 1 item"),
    (
        "quantize.mixed.candidates",
        [1, 4],
        "quantize.mixed.candidates: candidate weight bit-widths must be distinct integers in 2..8 (got [1, 4])",
    ),
    ("quantize.mixed.candidates", [4, 9], "quantize.mixed.candidates: candidate weight bit-widths must be distinct"),
    ("quantize.mixed.candidates", [4, 4, 8], "quantize.mixed.candidates: candidate weight bit-widths must be distinct"),
    ("quantize.mixed.candidates", [2, 4.5], "quantize.mixed.candidates.1: Input should be a valid integer"),
    (
        "quantize.mixed.candidates",
        [6, 8],
        "quantize.mixed.cells: 'mp4a4' asks for 4 average weight bits, outside the "
        "range of quantize.mixed.candidates (6..8 bits)",
    ),
    (
        "quantize.act_method",
        "max",
        "quantize.act_method: unknown act_method 'max'; allowed: minmax, ema, dsg, percentile, mse",
    ),
    ("quantize.percentile", 120, "quantize.percentile: Input should be less than or equal to 100"),
    ("quantize.ema_momentum", 1.0, "quantize.ema_momentum: Input should be less than 1"),
    ("quantize.protocol", "tensorrt", "quantize.protocol: Input should be 'zeroq' or 'brecq'"),
    (
        "quantize.rounding",
        "stochastic",
        "quantize.rounding: Input should be 'nearest', 'adaround', 'brecq', 'qdrop' or 'genie'",
    ),
    ("quantize.rounding", "genie", "set quantize.reconstruction.genie.bit_rule false"),  # Genie's bit rule needs brecq
    ("quantize.weight_scheme", "pot", "quantize.weight_scheme: Input should be 'asymmetric' or 'symmetric'"),
    ("quantize.bias", "int8", "quantize.bias: Input should be 'int32' or 'float'"),
    ("quantize.reconstruction.iterations", 0, "quantize.reconstruction.iterations: Input should be greater than 0"),
    ("quantize.reconstruction.warmup", 1.0, "quantize.reconstruction.warmup: Input should be less than 1"),
    (
        "quantize.reconstruction.drop_prob",
        1.5,
        "quantize.reconstruction.drop_prob: Input should be less than or equal to 1",
    ),
    ("quantize.reconstruction.lambda", 0.01, "quantize.reconstruction.lambda: Extra inputs"),
    ("evaluate.batch_size", 0, "evaluate.batch_size: Input should be greater than 0"),
    ("track.experiment", "", "track.experiment: String should have at least 1 character"),
    ("track", DELETE, "track: Field required"),
    ("finetune", DELETE, "finetune: Field required"),
    ("finetune.sources", ["nope"], "finetune.sources: 'nope' not in generate.sources"),
    ("finetune.sources", ["zeroq", "zeroq"], "finetune.sources: 'zeroq' repeated"),
    ("finetune.num_images", 0, "finetune.num_images: Input should be greater than 0"),
    ("finetune.train.epochs", 0, "finetune.train.epochs: Input should be greater than 0"),
    ("finetune.train.lr", 0, "finetune.train.lr: Input should be greater than 0"),
    ("finetune.train.schedule", "step", "finetune.train.schedule: Input should be 'cosine' or 'constant'"),
    ("finetune.train.crop_padding", -1, "finetune.train.crop_padding: Input should be greater than or equal to 0"),
    ("finetune.train.momentum", 0.9, "finetune.train.momentum: Extra inputs"),
]


def test_defaults_are_valid():
    validate(GOOD)


BAD_IDS = [f"{k}={'<deleted>' if v is DELETE else repr(v)}"[:40] for k, v, _ in BAD]  # the same in every process


@pytest.mark.parametrize("key,value,message", BAD, ids=BAD_IDS)
def test_bad_input_is_named(key, value, message):
    with pytest.raises(ParamsError) as err:
        validate(with_change(key, value))
    assert message in str(err.value)
    assert str(err.value).startswith("params.yaml: ")


def test_at_least_30_bad_inputs():
    """At least 30 distinct bad inputs; each, applied alone to the good params file, raises ParamsError
    whose message names the offending key; the good file itself passes and parses to its values."""
    good = validate(copy.deepcopy(GOOD))
    assert good.quantize.bits == GOOD["quantize"]["bits"] and good.data.num_images == GOOD["data"]["num_images"]
    assert good.generate.sources == GOOD["generate"]["sources"] and good.track.experiment == GOOD["track"]["experiment"]
    assert len({(key, repr(value)) for key, value, _ in BAD}) >= 30
    accepted, unnamed = [], []
    for key, value, _ in BAD:
        try:
            validate(with_change(key, value))
        except ParamsError as err:
            if key not in str(err):
                unnamed.append((key, str(err)))
        else:
            accepted.append((key, value))
    assert not accepted, f"bad inputs accepted: {accepted}"
    assert not unnamed, f"errors that do not name their key: {unnamed}"


# Every weight of a loss term or regulariser, with its least allowed value: the DSG terms (LSE's tied-layer
# weight counts at least once), AdaRound's rounding regulariser, the weight decays of training and fine-tuning.
LOSS_WEIGHTS = [
    ("generate.dsg.tv_weight", 0),
    ("generate.dsg.l2_weight", 0),
    ("generate.dsg.label_weight", 0),
    ("generate.dsg.lse_weight", 1),
    ("generate.dsg_code.tv_weight", 0),
    ("generate.dsg_code.l2_weight", 0),
    ("generate.dsg_code.label_weight", 0),
    ("generate.dsg_code.lse_weight", 1),
    ("quantize.reconstruction.reg_weight", 0),
    ("train.weight_decay", 0),
    ("finetune.train.weight_decay", 0),
]


@pytest.mark.parametrize("key,least", LOSS_WEIGHTS, ids=[k for k, _ in LOSS_WEIGHTS])
@pytest.mark.parametrize("value", [-0.01, -2])
def test_negative_loss_weights_are_one_error_naming_the_key(key, least, value):
    with pytest.raises(ParamsError) as err:
        validate(with_change(key, value))
    assert str(err.value) == f"params.yaml: {key}: Input should be greater than or equal to {least} (got {value})"
    validate(with_change(key, least))  # the least value itself is allowed


def test_not_a_mapping():
    with pytest.raises(ParamsError, match="expected a mapping"):
        validate(["data"])


def test_missing_paths_are_named(tmp_path):
    p = with_change("model.weights", "nowhere/w.pt")
    with pytest.raises(ParamsError, match="model.weights=nowhere/w.pt: not found"):
        check_paths(validate(p), [tmp_path])
    p = with_change("data.dataset", "imagefolder")
    p["data"].update(
        test_dir="missing/test",
        train_dir="missing/train",
    )
    p["model"]["weights"] = "torchvision"
    with pytest.raises(ParamsError, match="data.test_dir=missing/test: not found"):
        check_paths(validate(p), [tmp_path])


def test_imagefolder_without_weights_cannot_train(tmp_path):
    (tmp_path / "t").mkdir()
    p = with_change("data.dataset", "imagefolder")
    p["data"].update(test_dir="t", train_dir="t")
    with pytest.raises(ParamsError, match="model.weights is null"):
        check_paths(validate(p), [tmp_path])


def ten_to_three():
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 3),
    )


def test_class_count_mismatch_before_repro(tmp_path):
    p = with_change("model.arch", "tests.test_schema:ten_to_three")
    with pytest.raises(ParamsError, match="model predicts 3 classes but the dataset has 10"):
        check_model(validate(p), [tmp_path])
    # weights of a 1000-class head for a 10-class dataset
    w = tmp_path / "w.pt"
    torch.save({"state_dict": build_model("cifar_resnet20", 1000).state_dict()}, w)
    p = with_change("model.arch", "cifar_resnet20")
    p["model"]["weights"] = "w.pt"
    with pytest.raises(ParamsError, match="model.weights=w.pt: weights do not match"):
        check_model(validate(p), [tmp_path])


def no_bn_model():
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(10))


def test_model_without_bn_for_bn_sources():
    p = with_change("model.arch", "tests.test_schema:no_bn_model")
    with pytest.raises(ParamsError, match="has no BatchNorm layers.*gaussian or real"):
        check_model(validate(p))
    p["generate"]["sources"] = ["gaussian", "real"]
    p["export"]["cells"] = ["real-s0-w8a8"]
    check_model(validate(p))


def test_weight_range_is_minmax_or_mse():
    assert validate(GOOD).quantize.spec.weight_range == "minmax"
    assert validate(with_change("quantize.weight_range", "mse")).quantize.spec.weight_range == "mse"
    with pytest.raises(ParamsError, match="quantize.weight_range: Input should be 'minmax' or 'mse'"):
        validate(with_change("quantize.weight_range", "l2.4"))


def test_weights_folder_is_named(tmp_path):
    (tmp_path / "weights").mkdir()
    p = with_change("model.weights", "weights")
    for check in (check_paths, check_model):
        with pytest.raises(ParamsError, match="model.weights=weights: .* is a folder, not a weights file"):
            check(validate(p), [tmp_path])


def test_arch_whose_call_fails_is_named():
    p = with_change("model.arch", "os:system")
    with pytest.raises(ParamsError, match=r"model.arch='os:system': calling it failed: TypeError: .*system\(\)"):
        check_model(validate(p))


def _image_folder(root: Path, classes=("cat", "dog", "emu"), per_class=2) -> None:
    """A real ImageFolder: <root>/{test,train}/<class>/<n>.png, tiny RGB images written with PIL."""
    from PIL import Image

    for split in ("test", "train"):
        for i, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for n in range(per_class):
                Image.new("RGB", (8, 8), (60 * i, 30 * n, 100)).save(root / split / name / f"{n}.png")


def ten_outputs():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 10),
    )


def test_dataset_and_weights_class_counts_are_named(tmp_path):
    """A 3-class ImageFolder (real PNG files) with 10-output weights saved by torch.save: the message names the
    weights file, the folder's param, its 3 classes and the weights' 10 outputs, not state-dict shapes."""
    from torchvision.datasets import ImageFolder

    _image_folder(tmp_path)
    assert len(ImageFolder(str(tmp_path / "test")).classes) == 3  # torchvision reads it as 3 classes
    torch.save(build_model("cifar_resnet20", 10).state_dict(), tmp_path / "w10.pt")
    torch.save({"state_dict": build_model("cifar_resnet20", 3).state_dict()}, tmp_path / "w3.pt")
    p = with_change("data.dataset", "imagefolder")
    p["data"].update(test_dir="test", train_dir="train")
    p["model"].update(arch="cifar_resnet20", weights="w10.pt")
    check_paths(validate(p), [tmp_path])
    with pytest.raises(ParamsError) as err:
        check_model(validate(p), [tmp_path])
    assert str(err.value).startswith(
        "params.yaml: model.weights=w10.pt: weights do not match: the ImageFolder data.test_dir=test has 3 classes and "
        "the weights 10 (linear.weight has 10 outputs)"
    ), str(err.value)
    assert "size mismatch" not in str(err.value)
    p["model"]["weights"] = "w3.pt"  # weights for the folder's 3 classes pass
    check_model(validate(p), [tmp_path])
    # a user model with a 10-class head and no weights: the same folder, named
    p["model"].update(arch="tests.test_schema:ten_outputs", weights=None)
    with pytest.raises(
        ParamsError, match=re.escape("the model predicts 10 classes but the ImageFolder data.test_dir=test has 3")
    ):
        check_model(validate(p), [tmp_path])


def test_repeated_sources_are_rejected():
    with pytest.raises(ParamsError, match="generate.sources: 'dsg' repeated: list each source once"):
        validate(with_change("generate.sources", ["dsg", "zeroq", "dsg"]))


def test_export_cells_are_named_cells():
    assert validate(GOOD).export.cells == [
        "gaussian-s0-w8a8",
        "zeroq-s0-w8a8",
        "dsg-s0-w8a8",
        "dsg_code-s0-w8a8",
        "real-s0-w8a8",
    ]
    assert validate(with_change("export.cells", [])).export.cells == []
    assert validate(with_change("export", DELETE)).export.cells == []  # profiles without the group export nothing
    with pytest.raises(ParamsError, match=r"export.cells: cell 'zeroq-w8a8' is not <source>-s<seed>-<bits>\[-ft\]"):
        validate(with_change("export.cells", ["zeroq-w8a8"]))
    assert validate(with_change("export.cells", ["dsg-s0-mp4a4"])).export.cells == ["dsg-s0-mp4a4"]  # mixed cells too
    with pytest.raises(ParamsError, match="export.batch_size"):
        validate(with_change("export.batch_size", 0))


@pytest.mark.parametrize("cell", ["zeroq-s1-w8a8", "zeroq-s0-w3a3", "noise-s0-w8a8"])
def test_export_cells_must_be_calibrated_cells(cell):
    """A profile that drops w8a8 (or a seed, or a source) must also drop its export cells, or DVC would stop
    on a missing model file."""
    with pytest.raises(ParamsError, match=rf"export.cells: '{cell}' not calibrated by this pipeline"):
        validate(with_change("export.cells", ["zeroq-s0-w8a8", cell]))


@pytest.mark.parametrize("profile", sorted(p.stem for p in (ROOT / "profiles").glob("*.yaml")))
def test_every_profile_is_valid(profile):
    """`make exp PROFILE=...` applies a profile's dotted keys over params.yaml: the result must validate."""
    p = copy.deepcopy(GOOD)
    for key, value in (yaml.safe_load((ROOT / "profiles" / f"{profile}.yaml").read_text()) or {}).items():
        node = p
        *path, last = key.split(".")
        for k in path:
            node = node.setdefault(k, {})
        node[last] = value
    validate(p)


def test_mixed_cells_and_candidates():
    mixed = validate(GOOD).quantize.mixed
    assert mixed.cells == ["mp4a4"] and mixed.candidates == [2, 3, 4, 6, 8]
    p = with_change("quantize.mixed", {"cells": ["mp3.5a8", "mp2a4", "mp8a8"], "candidates": [8, 2, 4]})
    assert validate(p).quantize.mixed.cells == ["mp3.5a8", "mp2a4", "mp8a8"]  # budgets from 2 to 8 average bits
    assert validate(with_change("quantize.mixed.cells", [])).quantize.mixed.cells == []  # no mixed cell: no mixed stage
    with pytest.raises(ParamsError, match=r"'mp3a4' asks for 3 average weight bits, outside .*\(4..8 bits\)"):
        validate(with_change("quantize.mixed", {"cells": ["mp3a4"], "candidates": [4, 8]}))


def test_finetune_cells_must_be_calibrated_and_have_their_images():
    p = with_change("finetune.sources", ["zeroq", "real"])
    assert validate(p).finetune.bits == ["w4a4"]
    p["export"]["cells"] = ["zeroq-s0-w4a4-ft"]  # a fine-tuned cell exports like any other
    validate(p)
    for key, value, message in [
        ("finetune.bits", ["w3a3"], "finetune.bits: 'w3a3': list calibrated cells"),
        ("finetune.bits", [], "finetune.bits: []: list calibrated cells"),
        ("finetune.num_images", 100, "finetune.num_images=100 is below data.num_images=256"),
        ("finetune.num_images", 4096, "finetune.num_images=4096 is larger than data.real_pool=2048"),
    ]:
        bad = copy.deepcopy(p)
        bad["finetune"][key.split(".")[1]] = value
        with pytest.raises(ParamsError, match=re.escape(message)):
            validate(bad)
    p["finetune"]["bits"] = ["mp4a4"]  # a mixed cell fine-tunes too
    p["export"]["cells"] = []
    validate(p)
    with pytest.raises(ParamsError, match="export.cells: 'gaussian-s0-w4a4-ft' not calibrated"):
        validate(with_change("export.cells", ["gaussian-s0-w4a4-ft"]))
