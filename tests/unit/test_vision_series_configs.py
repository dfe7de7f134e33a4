"""The vision and time-series families' Triton configs: hosts with slot outputs, vFMs through the one writer.

Parsed with Triton's own protobuf schema, so a config Triton would refuse to
parse fails here; the shapes and types are what the hosts read and answer.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from google.protobuf import text_format

from fmplex import registry
from fmplex.control import workflows
from fmplex.control.server import FAMILY_SHIMS
from fmplex.families import FAMILIES, family_for
from fmplex.registry import TaskEntry
from fmplex.runtime.settings import HostSettings, SchedulerSettings, read_settings

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")


def parse(path: Path):  # noqa: ANN201
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def io(tensors) -> dict[str, tuple[int, list[int], bool]]:  # noqa: ANN001
    return {t.name: (t.data_type, list(t.dims), bool(getattr(t, "optional", False))) for t in tensors}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    lines: list[str] = []
    workflows.init_repository(root, ["efficientnet", "fracast"], slots=4, echo=lines.append)
    assert lines == ["host fm.efficientnet: backbone efficientnet, 4 slots", "host fm.fracast: backbone fracast, 4 slots"]
    return root


def test_hosts_run_their_own_backends(repo: Path) -> None:
    pb = model_config_pb2
    vision = parse(repo / "fm.efficientnet" / "config.pbtxt")
    assert vision.backend == "fmplex_vision" and vision.backend in FAMILY_SHIMS
    assert io(vision.input) == {"IMAGE": (pb.TYPE_STRING, [-1], True), "PIXELS": (pb.TYPE_FP32, [-1, 3, 224, 224], True)}
    assert io(vision.output) == {
        **{f"OUT_{k}": (pb.TYPE_FP32, [-1, -1], False) for k in range(4)},
        **{f"TXT_{k}": (pb.TYPE_STRING, [-1], False) for k in range(4)},
    }
    series = parse(repo / "fm.fracast" / "config.pbtxt")
    assert series.backend == "fmplex_series" and series.backend in FAMILY_SHIMS
    assert io(series.input) == {
        "SERIES": (pb.TYPE_FP32, [-1, -1], False), "LENGTHS": (pb.TYPE_INT64, [-1], True), "HORIZON": (pb.TYPE_INT64, [1], True),
    }  # fmt: skip
    assert {o.name for o in series.output} == {f"{p}_{k}" for p in ("OUT", "QNT", "TXT") for k in range(4)}
    assert series.parameters["slots"].string_value == "4"
    reg = registry.load(repo)
    assert {b: h.model for b, h in reg.hosts.items()} == {"efficientnet": "fm.efficientnet", "fracast": "fm.fracast"}


@pytest.mark.parametrize("host, rows", [("fm.efficientnet", 16), ("fm.fracast", 64)])
def test_hosts_write_every_scheduler_setting_with_growth_off(repo: Path, host: str, rows: int) -> None:
    """The names the encoder host reads (batch growth included) are in each config, read the same way."""
    params = parse(repo / host / "config.pbtxt").parameters
    names = {f.name for f in dataclasses.fields(SchedulerSettings)} - {f.name for f in dataclasses.fields(HostSettings)}
    assert names <= set(params), sorted(names - set(params))
    st = read_settings({"parameters": {k: {"string_value": v.string_value} for k, v in params.items()}}, SchedulerSettings)
    assert st.max_batch_rows == rows and st.saturated_batch_rows <= st.max_batch_rows  # growth off
    assert st.make_scheduler(1, 1 << 30).budget.limits(rows_in_system=10_000, light_waiting=False)[0] == rows


@pytest.mark.parametrize(
    ("backbone", "family", "outputs"),
    [
        ("efficientnet", "classifier", {"LOGITS": "OUT_2", "LABEL": "TXT_2"}),
        ("efficientnet", "embedding", {"EMBEDDING": "OUT_2"}),
        ("fracast", "forecast", {"FORECAST": "OUT_2", "QUANTILES": "QNT_2"}),
        ("fracast", "classifier", {"LOGITS": "OUT_2", "LABEL": "TXT_2"}),
        ("fracast", "embedding", {"EMBEDDING": "OUT_2"}),
    ],
)
def test_a_vfm_maps_its_slot_to_its_family_outputs(repo: Path, backbone: str, family: str, outputs: dict[str, str]) -> None:
    fam = family_for(backbone)
    entry = TaskEntry("t", backbone, "x", 1, deployed_version=1, slot=2, family=family)
    assert fam.write_task_models(repo, entry, registry.load(repo)) == ["t"]
    cfg = parse(repo / "t" / "config.pbtxt")
    host = parse(repo / f"fm.{backbone}" / "config.pbtxt")
    assert cfg.platform == "ensemble" and list(cfg.version_policy.specific.versions) == [1]
    assert io(cfg.input) == io(host.input)  # inputs pass through, optional ones too
    (step,) = cfg.ensemble_scheduling.step
    assert step.model_name == f"fm.{backbone}"
    assert {v: k for k, v in step.output_map.items()} == outputs
    host_out = io(host.output)
    assert {o.name: (o.data_type, list(o.dims)) for o in cfg.output} == {n: host_out[h][:2] for n, h in outputs.items()}


def test_kinds_and_options_are_the_family_objects() -> None:
    assert [k.name for k in FAMILIES["vision"].kinds()] == ["embedding", "classifier", "fork", "onnx", "lora"]
    assert [k.name for k in FAMILIES["timeseries"].kinds()] == ["forecast", "fork", "classifier", "embedding"]
    opts = FAMILIES["timeseries"].family_options("forecast", {"horizon": 5, "quantiles": "0.1,0.9", "missing": None})
    assert opts == {"horizon": 5, "quantiles": [0.1, 0.9]}
    assert FAMILIES["vision"].family_options("fork", {"image_labels": "a, b"})["labels"] == ["a", "b"]


@pytest.mark.parametrize(
    ("backbone", "kind", "options", "words"),
    [
        # labelled data is --train (train_csv) in every family; --source imports an existing fine-tune
        ("efficientnet", "classifier", {"source": Path("imgs")}, "give it with --train (DIR/<label>/*.png|jpg"),
        ("fracast", "classifier", {"source": Path("s.csv")}, "give it with --train"),
        ("efficientnet", "fork", {"train_csv": Path("imgs")}, "give the fine-tune with --source"),
        ("fracast", "fork", {"train_csv": Path("s.csv")}, "give the fine-tune with --source"),
        ("fracast", "forecast", {"train_csv": Path("s.csv")}, "takes no data"),
        ("efficientnet", "embedding", {"source": Path("h.onnx")}, "--source is not used"),
    ],
)
def test_train_and_source_mean_the_same_in_every_family(backbone: str, kind: str, options: dict, words: str) -> None:
    from fmplex.families.base import OptionError

    fam = family_for(backbone)
    with pytest.raises(OptionError, match=re.escape(words)) as err:
        fam.data_of(kind, {"source": None, "train_csv": None, **options})
    assert "\n" not in str(err.value)
    assert fam.data_of(kind, {"source": None, "train_csv": None}) is None


def test_each_kind_names_the_option_its_data_comes_with() -> None:
    assert family_for("efficientnet").data_of("classifier", {"train_csv": Path("d"), "source": None}) == Path("d")
    assert family_for("fracast").data_of("fork", {"source": Path("f"), "train_csv": None}) == Path("f")


@pytest.mark.parametrize("device", ["cuda", "cuda:3", "tpu", "nonsense"])
def test_a_device_that_is_not_here_is_one_line_when_the_backbone_loads(device: str) -> None:
    import torch

    from fmplex.families.family_spec import DeviceError
    from fmplex.families.timeseries.family import SeriesFamily
    from fmplex.families.vision.family import VisionFamily

    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 3:
        pytest.skip("this machine has the CUDA device")
    for fam in (VisionFamily(device), SeriesFamily(device)):
        with pytest.raises(DeviceError) as err:
            fam.executor  # noqa: B018 - what the host does in initialize()
        assert repr(device) in str(err.value) and "\n" not in str(err.value)


def test_the_backbone_loads_once_per_family_object() -> None:
    from fmplex.families.timeseries.family import SeriesFamily
    from fmplex.families.vision.family import VisionFamily

    for fam in (VisionFamily(), SeriesFamily()):
        assert fam.executor is fam.executor


@pytest.mark.parametrize("backbone, package", [("efficientnet", "vision"), ("fracast", "timeseries")])
def test_a_user_error_while_building_is_the_family_objects_own(backbone: str, package: str) -> None:
    import importlib  # noqa: PLC0415

    family = family_for(backbone)
    errors = (importlib.import_module(f"fmplex.families.{package}.importers").SourceError,
              importlib.import_module(f"fmplex.families.{package}.train").TrainError)
    assert family.user_errors() == errors
    assert type(family.family_object()) is family.object_class() and family.object_class().__module__ == f"fmplex.families.{package}.family"
