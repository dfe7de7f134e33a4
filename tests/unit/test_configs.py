"""Unit tests of the Triton configs fmplex writes (host, vFM ensemble) and of repository init."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from google.protobuf import text_format

from fmplex import registry as R
from fmplex.artifacts import ArtifactError, version_dir, write_manifest
from fmplex.families import encoder as encoder_family
from fmplex.families.encoder import host_config, vfm_config, write_vfm
from fmplex.families.encoder import init_hosts as init_repository
from fmplex.kinds import HOST_INPUTS, OUTPUT_SETS, outputs_of, slot_of_output
from fmplex.registry import TaskEntry

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")


def parse(text: str):
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def params(cfg) -> dict[str, str]:
    return {k: v.string_value for k, v in cfg.parameters.items()}


def tree_snapshot(root: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every path under root (root included) -> (mtime_ns, content for files)."""
    snap = {".": (root.stat().st_mtime_ns, None)}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            p = Path(dirpath) / d
            snap[str(p.relative_to(root))] = (p.stat().st_mtime_ns, None)
        for f in filenames:
            p = Path(dirpath) / f
            snap[str(p.relative_to(root))] = (p.stat().st_mtime_ns, p.read_bytes())
    return snap


# --- host config ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("slots", [1, 3, 256])
def test_host_config_parses_and_has_slot_outputs(slots):
    cfg = parse(host_config("minilm", slots))
    assert cfg.name == "fm.minilm"
    assert cfg.backend == "fmplex"
    assert cfg.max_batch_size == 0
    names = [o.name for o in cfg.output]
    assert len(names) == 3 * slots
    assert len(set(names)) == 3 * slots
    assert set(names) == {f"{p}_{k}" for k in range(slots) for p in ("OUT", "TXT", "TOK")}
    types = {o.name: o.data_type for o in cfg.output}
    dims = {o.name: list(o.dims) for o in cfg.output}
    for k in range(slots):
        assert types[f"OUT_{k}"] == model_config_pb2.TYPE_FP32
        assert types[f"TXT_{k}"] == model_config_pb2.TYPE_STRING
        assert types[f"TOK_{k}"] == model_config_pb2.TYPE_FP32 and dims[f"TOK_{k}"] == [-1, -1, -1]
    assert params(cfg)["slots"] == str(slots)


def test_host_config_inputs_all_optional():
    cfg = parse(host_config("minilm", 2))
    assert [i.name for i in cfg.input] == ["TEXT", "INPUT_IDS", "ATTENTION_MASK"]
    assert all(i.optional for i in cfg.input)
    dims = {i.name: list(i.dims) for i in cfg.input}
    assert dims == {"TEXT": [-1], "INPUT_IDS": [-1, -1], "ATTENTION_MASK": [-1, -1]}


def test_host_config_instances_and_threads():
    cfg = parse(host_config("minilm", 2, torch_threads=3, instances=2))
    assert len(cfg.instance_group) == 1
    assert cfg.instance_group[0].count == 2
    assert cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert params(cfg)["torch_threads"] == "3"


def test_host_config_unknown_backbone():
    with pytest.raises(KeyError, match="unknown backbone"):
        host_config("nosuch", 2)


# --- vFM config ------------------------------------------------------------------------------------------

def entry(name="sentiment", kind="classifier", slot=17, deployed_version=3, version=4, family="") -> TaskEntry:
    return TaskEntry(name=name, backbone="minilm", kind=kind, version=version,
                     deployed_version=deployed_version, slot=slot, family=family)


def step_of(cfg):
    assert len(cfg.ensemble_scheduling.step) == 1
    return cfg.ensemble_scheduling.step[0]


def test_vfm_classifier_maps_slot_outputs():
    cfg = parse(vfm_config(entry(kind="classifier", slot=17), "fm.minilm"))
    assert cfg.name == "sentiment"
    assert cfg.platform == "ensemble"
    assert cfg.max_batch_size == 0
    step = step_of(cfg)
    assert step.model_name == "fm.minilm"
    assert step.model_version == -1
    assert dict(step.output_map) == {"OUT_17": "LOGITS", "TXT_17": "LABEL"}
    assert sorted(o.name for o in cfg.output) == ["LABEL", "LOGITS"]
    types = {o.name: o.data_type for o in cfg.output}
    assert types == {"LOGITS": model_config_pb2.TYPE_FP32, "LABEL": model_config_pb2.TYPE_STRING}
    assert params(cfg) == {"fmplex_task": "sentiment", "fmplex_kind": "classifier"}


def test_vfm_embedding_maps_slot_output():
    cfg = parse(vfm_config(entry(name="emb", kind="embedding", slot=0), "fm.minilm"))
    step = step_of(cfg)
    assert dict(step.output_map) == {"OUT_0": "EMBEDDING"}
    assert [o.name for o in cfg.output] == ["EMBEDDING"]


@pytest.mark.parametrize("family", sorted(OUTPUT_SETS))
def test_vfm_inputs_and_input_map(family):
    cfg = parse(vfm_config(entry(kind="lora", slot=5, family=family), "fm.minilm"))
    assert [i.name for i in cfg.input] == [n for n, _, _ in HOST_INPUTS]
    assert all(i.optional for i in cfg.input)
    assert dict(step_of(cfg).input_map) == {n: n for n, _, _ in HOST_INPUTS}
    # every public output is produced by exactly one host output of the task's own slot
    om = dict(step_of(cfg).output_map)
    assert sorted(om.values()) == sorted(o.name for o in outputs_of(family))
    assert all(slot_of_output(k) == 5 for k in om)


def test_vfm_version_policy_is_deployed_version():
    cfg = parse(vfm_config(entry(deployed_version=3, version=4), "fm.minilm"))
    assert cfg.version_policy.WhichOneof("policy_choice") == "specific"
    assert list(cfg.version_policy.specific.versions) == [3]


def test_vfm_step_uses_given_host():
    cfg = parse(vfm_config(entry(), "fm.other"))
    assert step_of(cfg).model_name == "fm.other"


def test_vfm_token_family_maps_token_output():
    cfg = parse(vfm_config(entry(kind="fork", slot=9, family="token"), "fm.minilm"))
    assert dict(step_of(cfg).output_map) == {"TOK_9": "TOKEN_LOGITS"}
    assert [list(o.dims) for o in cfg.output] == [[-1, -1, -1]]


def test_vfm_config_unknown_family():
    with pytest.raises(KeyError, match="unknown output family"):
        vfm_config(entry(kind="lora", family="regressor"), "fm.minilm")


# --- repository init / write_vfm ------------------------------------------------------------------------

def test_init_repository_creates_layout(tmp_path):
    repo = tmp_path / "repo"
    reg = init_repository(repo, ["minilm"], slots=4)
    assert (repo / "fm.minilm" / "config.pbtxt").is_file()
    assert (repo / "fm.minilm" / "1").is_dir()
    assert R.registry_path(repo).is_file()
    cfg = parse((repo / "fm.minilm" / "config.pbtxt").read_text(encoding="utf-8"))
    assert len(cfg.output) == 12  # OUT_k, TXT_k, TOK_k for 4 slots
    assert reg.hosts["minilm"].model == "fm.minilm"
    assert reg.hosts["minilm"].slots == 4
    loaded = R.load(repo)
    assert loaded.hosts == reg.hosts
    # no temp files left at the root or in the host directory
    assert sorted(p.name for p in repo.iterdir()) == sorted([R.REGISTRY_FILE, "fm.minilm"])
    assert not [p for p in (repo / "fm.minilm").iterdir() if p.name.startswith(".cfg-")]


def test_init_repository_twice_keeps_host_dir(tmp_path):
    repo = tmp_path / "repo"
    init_repository(repo, ["minilm"], slots=4)
    host_dir = repo / "fm.minilm"
    before = tree_snapshot(host_dir)
    gen = R.load(repo).generation

    reg = init_repository(repo, ["minilm"], slots=8)  # even another slot count must not rewrite the host
    assert tree_snapshot(host_dir) == before
    assert reg.hosts["minilm"].slots == 4
    assert R.load(repo).generation >= gen


def test_init_repository_keeps_existing_tasks(tmp_path):
    repo = tmp_path / "repo"
    init_repository(repo, ["minilm"], slots=4)
    with R.editing(repo) as reg:
        reg.tasks["t"] = entry(name="t", slot=1)
    init_repository(repo, ["minilm"], slots=4)
    assert R.load(repo).tasks["t"].slot == 1


def test_init_repository_unknown_backbone(tmp_path):
    with pytest.raises(KeyError):
        init_repository(tmp_path / "repo", ["nosuch"])


def test_write_vfm_refuses_missing_manifest(tmp_path):
    repo = tmp_path / "repo"
    reg = init_repository(repo, ["minilm"], slots=4)
    e = entry(name="sentiment", slot=0, deployed_version=1, version=1)
    version_dir(repo, "sentiment", 1).mkdir(parents=True)  # an artifact directory without manifest.json
    with pytest.raises(ArtifactError, match="manifest.json"):
        write_vfm(repo, e, reg)
    assert not (repo / "sentiment" / "config.pbtxt").exists()


def test_write_vfm_refuses_missing_artifact_dir(tmp_path):
    repo = tmp_path / "repo"
    reg = init_repository(repo, ["minilm"], slots=4)
    with pytest.raises(ArtifactError):
        write_vfm(repo, entry(name="ghost", slot=0, deployed_version=2), reg)
    assert not (repo / "ghost" / "config.pbtxt").exists()


def test_write_vfm_unknown_host(tmp_path):
    repo = tmp_path / "repo"
    reg = init_repository(repo, ["minilm"], slots=4)
    e = TaskEntry(name="x", backbone="other", kind="embedding", version=1, deployed_version=1, slot=0)
    with pytest.raises(R.RegistryError, match="other"):
        write_vfm(repo, e, reg)


def test_write_and_remove_vfm_leave_host_dir_alone(tmp_path):
    repo = tmp_path / "repo"
    reg = init_repository(repo, ["minilm"], slots=4)
    host_before = tree_snapshot(repo / "fm.minilm")
    write_manifest(version_dir(repo, "sentiment", 1), {"kind": "classifier", "backbone": "minilm"})
    e = entry(name="sentiment", slot=2, deployed_version=1, version=1)
    path = write_vfm(repo, e, reg)
    assert path == repo / "sentiment" / "config.pbtxt"
    cfg = parse(path.read_text(encoding="utf-8"))
    assert dict(step_of(cfg).output_map) == {"OUT_2": "LOGITS", "TXT_2": "LABEL"}
    assert not [p for p in (repo / "sentiment").iterdir() if p.name.startswith(".cfg-")]
    encoder_family.EncoderFamily().remove_task_models(repo, "sentiment")
    assert not path.exists()
    assert (repo / "sentiment" / "1" / "manifest.json").exists()
    assert tree_snapshot(repo / "fm.minilm") == host_before


# --- slot_of_output -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name,slot", [("OUT_17", 17), ("TXT_3", 3), ("OUT_0", 0), ("TXT_255", 255)])
def test_slot_of_output_parses(name, slot):
    assert slot_of_output(name) == slot


@pytest.mark.parametrize("name", ["LOGITS", "LABEL", "EMBEDDING", "OUT_", "TXT_", "OUT_x", "OUT_-1",
                                  "OUT_1a", "out_1", "XOUT_1", "OUT_1.5", ""])
def test_slot_of_output_none_for_others(name):
    assert slot_of_output(name) is None


def test_slot_of_output_superscript_digit():
    assert slot_of_output("OUT_\u00b2") is None
