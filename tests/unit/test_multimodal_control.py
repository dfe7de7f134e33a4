"""The multimodal family: stage host configs, init, tasks, vFMs, placement, and the common CLI on it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from google.protobuf import text_format

from fmplex import registry as R
from fmplex.artifacts import read_manifest, version_dir
from fmplex.control import workflows
from fmplex.control.cli import main
from fmplex.families import multimodal as control
from fmplex.multimodal.interface import LM_INPUTS, SLOT_OUTPUTS, slot_of
from fmplex.multimodal.models import STAGE_FILE, read_stage
from fmplex.multimodal.placement import PlacementError, format_cpus, parse_cpus, resolve_device
from fmplex.artifacts import ArtifactError
from fmplex.registry import RegistryError

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")


def parse(text: str):  # noqa: ANN201
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def params(cfg) -> dict[str, str]:  # noqa: ANN001
    return {k: v.string_value for k, v in cfg.parameters.items()}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mmrepo")
    control.init_multimodal(root, "llava-tiny", {"encode": control.StagePlacement("cpu", "0"), "lm": control.StagePlacement("cpu", "1")})
    return root


def test_encode_config_batches_images_with_triton(repo: Path) -> None:
    cfg = parse((repo / "fm.llava-tiny.encode" / "config.pbtxt").read_text())
    assert cfg.name == "fm.llava-tiny.encode" and cfg.backend == "fmplex_mm_encode"
    assert cfg.max_batch_size == 16 and cfg.dynamic_batching.max_queue_delay_microseconds == 500
    assert list(cfg.input[0].dims) == [3, 32, 32] and list(cfg.output[0].dims) == [16, 64]
    assert params(cfg)["cpus"] == "0" and params(cfg)["device"] == "cpu"
    mcfg = parse(control.encode_config("mllama-tiny", control.StagePlacement()))
    assert list(mcfg.output[0].dims) == [17, 64]  # one tile of 16 patches + CLS


def test_lm_config_has_a_slot_pool_and_names_its_encoder(repo: Path) -> None:
    cfg = parse((repo / "fm.llava-tiny.lm" / "config.pbtxt").read_text())
    assert cfg.backend == "fmplex_mm_lm" and cfg.max_batch_size == 0
    assert [i.name for i in cfg.input] == [n for n, *_ in LM_INPUTS]
    assert [i.optional for i in cfg.input] == [o for *_, o in LM_INPUTS]
    assert len(cfg.output) == control.DEFAULT_SLOTS * len(SLOT_OUTPUTS)
    assert {slot_of(o.name) for o in cfg.output} == set(range(control.DEFAULT_SLOTS))
    p = params(cfg)
    assert p["encode_model"] == "fm.llava-tiny.encode" and p["cpus"] == "1" and p["encode_concurrency"] == "16"


def test_init_writes_split_weights_once_and_registers_both_stages(repo: Path) -> None:
    reg = R.load(repo)
    assert reg.hosts["llava-tiny"].model == "fm.llava-tiny.lm" and reg.hosts["llava-tiny"].slots == control.DEFAULT_SLOTS
    assert reg.hosts["llava-tiny.encode"].model == "fm.llava-tiny.encode"
    enc = read_stage(repo / "fm.llava-tiny.encode" / "1", "encode")
    lm = read_stage(repo / "fm.llava-tiny.lm" / "1", "lm")
    assert enc.meta["model_fingerprint"] == lm.meta["model_fingerprint"]
    assert all("vision_tower" in k or "multi_modal_projector" in k for k in enc.state)
    assert all("language_model" in k or k.startswith("lm_head") for k in lm.state)
    stamp = {p: p.stat().st_mtime_ns for p in repo.rglob("*") if p.is_file() and "fm.llava-tiny" in str(p)}
    _, fp = control.init_multimodal(repo, "llava-tiny", control.placements("shared"))  # again: nothing under the stages changes
    assert fp == lm.meta["model_fingerprint"]
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp


def test_half_written_stages_are_refused(tmp_path: Path) -> None:
    control.init_multimodal(tmp_path, "mllama-tiny")
    (tmp_path / "fm.mllama-tiny.encode" / "1" / STAGE_FILE).unlink()
    with pytest.raises(RegistryError, match="only the lm stage of 'mllama-tiny' exists"):
        control.init_multimodal(tmp_path, "mllama-tiny")


def create(repo: Path, task: str, backbone: str, **options: object) -> R.TaskEntry:
    return workflows.create_task(repo, task, backbone, options=options)


def test_task_and_vfm(repo: Path) -> None:
    entry = create(repo, "caption", "llava-tiny", prompt="USER: ", max_new_tokens=12)
    assert entry.kind == "multimodal"
    manifest = read_manifest(version_dir(repo, "caption", entry.version))
    assert manifest["kind"] == "multimodal" and manifest["prompt"] == "USER: " and manifest["max_new_tokens"] == 12
    (dep,) = workflows.deploy(repo, ["caption"])
    assert dep.slot is not None and R.load(repo).tasks["caption"].slot == dep.slot
    cfg = parse((repo / "caption" / "config.pbtxt").read_text())
    assert cfg.platform == "ensemble" and cfg.ensemble_scheduling.step[0].model_name == "fm.llava-tiny.lm"
    step = cfg.ensemble_scheduling.step[0]
    assert dict(step.output_map) == {f"{p}{dep.slot}": pub for p, pub in SLOT_OUTPUTS.items()}
    assert {o.name for o in cfg.output} == set(SLOT_OUTPUTS.values())
    again = create(repo, "caption", "llava-tiny", prompt="Hi ")
    assert again.version == entry.version + 1


def test_deploy_refuses_foreign_tasks_and_weights(repo: Path) -> None:
    foreign = version_dir(repo, "plain", 1)
    from fmplex.artifacts import write_manifest

    write_manifest(foreign, {"kind": "classifier", "backbone": "llava-tiny"})
    with pytest.raises(ArtifactError, match="does not run on a multimodal backbone"):
        control.check_artifact(foreign, "llava-tiny")
    entry = create(repo, "stale", "llava-tiny")
    mpath = version_dir(repo, "stale", entry.version) / "manifest.json"
    data = json.loads(mpath.read_text())
    data["backbone_fingerprint"] = "sha256:0000000000000000"
    mpath.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="made for other 'llava-tiny' weights"):
        workflows.deploy(repo, ["stale"])
    assert not R.load(repo).tasks["stale"].deployed and not (repo / "stale" / "config.pbtxt").exists()
    with pytest.raises(RegistryError, match="has no host for 'mllama-tiny'"):
        create(repo, "x", "mllama-tiny")


def test_cpu_lists_and_placements() -> None:
    assert parse_cpus("0-2,5") == {0, 1, 2, 5} and parse_cpus("") is None and parse_cpus("all") is None
    assert format_cpus({3, 1}) == "1,3" and format_cpus(None) == "all"
    for bad in ("x", "3-1", "-1", "1,,2"):
        with pytest.raises(PlacementError, match="invalid CPU list"):
            parse_cpus(bad)
    shared = control.placements("shared")
    assert shared["encode"].cpus == shared["lm"].cpus == ""
    if len(os.sched_getaffinity(0)) >= 2:
        split = control.placements("split")
        enc, lm = parse_cpus(split["encode"].cpus), parse_cpus(split["lm"].cpus)
        assert enc and lm and not enc & lm and enc | lm == os.sched_getaffinity(0)
    with pytest.raises(PlacementError, match="unknown device"):
        resolve_device("tpu")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(PlacementError, match="torch sees no CUDA device"):
            resolve_device("cuda:0")


def test_cli(tmp_path: Path) -> None:
    runner = CliRunner()
    repo = str(tmp_path / "r")
    res = runner.invoke(main, ["init", repo, "--backbone", "mllama-tiny", "--encode-cpus", "0", "--lm-cpus", "0"])
    assert res.exit_code == 0, res.output
    assert "host fm.mllama-tiny.lm: backbone mllama-tiny, 64 slots" in res.output and "host fm.mllama-tiny.encode" in res.output
    assert params(parse((Path(repo) / "fm.mllama-tiny.encode" / "config.pbtxt").read_text()))["cpus"] == "0"
    res = runner.invoke(main, ["task", "create", "look", "--backbone", "mllama-tiny", "--prompt", "See ", "--repo", repo])
    assert res.exit_code == 0 and "task look v1 (multimodal on mllama-tiny," in res.output, res.output
    assert read_manifest(version_dir(Path(repo), "look", 1))["prompt"] == "See "
    res = runner.invoke(main, ["deploy", "look", "--offline", "--repo", repo])
    assert res.exit_code == 0 and "look v1 on fm.mllama-tiny.lm slot 0: written" in res.output, res.output
    res = runner.invoke(main, ["init", repo, "--backbone", "llava-tiny", "--lm-cpus", "0-x"])
    assert res.exit_code == 1 and "invalid CPU list '0-x'" in res.output
    res = runner.invoke(main, ["task", "create", "bad", "--backbone", "mllama-tiny", "--labels", "a,b", "--repo", repo])
    assert res.exit_code == 2 and "--labels is an option of encoder backbones" in res.output
    res = runner.invoke(main, ["init", repo, "--placement", "split"])
    assert res.exit_code == 2 and "--placement is an option of multimodal backbones" in res.output
    res = runner.invoke(main, ["task", "show", "look", "--repo", repo])
    assert res.exit_code == 0 and "backbone:    mllama-tiny (multimodal)" in res.output and 'prompt:      "See "' in res.output
    res = runner.invoke(main, ["task", "list", "--repo", repo])
    assert res.exit_code == 0 and "look" in res.output and "multimodal" in res.output
