"""Backbone families behind one interface: the catalog, each family's declarations, one repository for all."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format

from fmplex import registry as R
from fmplex.backbones import FAMILY_OF, family_of_backbone
from fmplex.control import workflows
from fmplex.families import FAMILIES, BackboneFamily, all_backbones, all_kinds, check_catalog, family_for

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")


def test_one_catalog_maps_every_backbone_to_its_family() -> None:
    check_catalog()
    assert {b: FAMILY_OF[b] for b in ("minilm", "smollm2", "llava-tiny", "mllama-tiny")} == {
        "minilm": "encoder", "smollm2": "generative", "llava-tiny": "multimodal", "mllama-tiny": "multimodal",
    }  # fmt: skip
    assert sorted(all_backbones()) == sorted(FAMILY_OF)
    assert family_for("smollm2").name == "generative"
    with pytest.raises(KeyError, match="unknown backbone 'nosuch' \\(known: .*minilm"):
        family_of_backbone("nosuch")


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_declares_what_the_cli_needs(name: str) -> None:
    fam = FAMILIES[name]
    assert isinstance(fam, BackboneFamily) and fam.name == name and fam.summary
    assert fam.backbones() and fam.kinds() and fam.default_slots >= 1
    for backbone in fam.backbones():
        hosts = fam.host_models(backbone)
        assert hosts and all(h.startswith(f"fm.{backbone}") for h in hosts)
    for which, common in (("init_options", {"repo", "backbones", "slots"}),
                          ("create_options", {"name", "backbone", "kind", "source", "train_csv", "weight", "queue_limit",
                                              "deadline_ms", "description", "repo"})):  # fmt: skip
        options = getattr(fam, which)()
        assert all(o.default is None or isinstance(o.default, (str, int, float)) for o in options), "explicit defaults"
        names = [o.name for o in options]
        assert len(names) == len(set(names)) and not set(names) & common, (which, names)
    assert len(all_kinds()) == len(set(all_kinds()))


def test_family_options_are_not_shared_between_families() -> None:
    """An option belongs to one family: the CLI refuses it for another family's backbone."""
    for which in ("init_options", "create_options"):
        seen: dict[str, str] = {}
        for fam in FAMILIES.values():
            for opt in getattr(fam, which)():
                assert opt.name not in seen, (which, opt.name, seen.get(opt.name), fam.name)
                seen[opt.name] = fam.name


def test_one_repository_holds_every_family(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    lines: list[str] = []
    reg = workflows.init_repository(repo, ["minilm", "smollm2", "llava-tiny"], slots=None, echo=lines.append)
    assert {k: (h.model, h.slots) for k, h in reg.hosts.items()} == {
        "minilm": ("fm.minilm", R.DEFAULT_SLOTS),
        "smollm2": ("fm.smollm2", R.DEFAULT_SLOTS),
        "llava-tiny": ("fm.llava-tiny.lm", 64),
        "llava-tiny.encode": ("fm.llava-tiny.encode", 0),
    }
    assert "host fm.smollm2.stream: streaming twin of fm.smollm2 (same slots)" in lines
    for model in ("fm.minilm", "fm.smollm2", "fm.smollm2.stream", "fm.llava-tiny.lm", "fm.llava-tiny.encode"):
        cfg = text_format.Parse((repo / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        assert cfg.name == model
    assert "fm.smollm2.stream" in workflows.watched_models(reg) and "fm.minilm" in workflows.watched_models(reg)
    assert workflows.start_up_models(repo) == ["fm.smollm2.stream"]  # no generative task deployed yet

    workflows.create_task(repo, "cap", "llava-tiny", options={"prompt": "USER: "})
    workflows.create_task(repo, "vec", "minilm", "embedding")
    deployed = workflows.deploy(repo, ["cap", "vec"])
    steps = {}
    for entry in deployed:
        cfg = text_format.Parse((repo / entry.name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        assert cfg.platform == "ensemble" and list(cfg.version_policy.specific.versions) == [1]
        steps[entry.name] = cfg.ensemble_scheduling.step[0].model_name
    assert steps == {"cap": "fm.llava-tiny.lm", "vec": "fm.minilm"}
    shown = dict(workflows.show_task(repo, "cap"))
    assert shown["backbone"] == "llava-tiny (multimodal)" and shown["deployed"].startswith("v1 on slot")
    workflows.undeploy(repo, "cap")
    assert not (repo / "cap" / "config.pbtxt").exists() and not R.load(repo).tasks["cap"].deployed
