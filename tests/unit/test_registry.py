"""Unit tests of fmplex.registry: names, atomic save/load, slots, the host's cached view."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fmplex import registry as R
from fmplex.registry import HostEntry, Registry, RegistryError, RegistryView, TaskEntry


def make_registry(slots: int = 4) -> Registry:
    return Registry(
        hosts={"minilm": HostEntry(backbone="minilm", model="fm.minilm", slots=slots)},
        tasks={},
    )


def deployed(name: str, slot: int, backbone: str = "minilm", version: int = 1) -> TaskEntry:
    return TaskEntry(name=name, backbone=backbone, kind="classifier", version=version,
                     deployed_version=version, slot=slot)


def repo_files(repo: Path) -> list[str]:
    return sorted(p.name for p in repo.iterdir())


# --- task names ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["sentiment", "a_b-2", "A", "9lives", "x" * 63])
def test_check_task_name_accepts_plain_identifiers(name):
    assert R.check_task_name(name) == name


@pytest.mark.parametrize("name", ["..", "a/b", ".hidden", "a b", "fm.minilm", "", "x" * 64, "x" * 200,
                                  "caf\u00e9", "\u00e9t\u00e9", "\u4efb\u52a1", "-lead", "_lead", "a\\b"])
def test_check_task_name_refuses_unsafe_names(name):
    with pytest.raises(RegistryError, match="invalid task name"):
        R.check_task_name(name)


def test_check_task_name_refuses_none():
    with pytest.raises(RegistryError):
        R.check_task_name(None)  # type: ignore[arg-type]


def test_check_task_name_refuses_trailing_newline():
    with pytest.raises(RegistryError):
        R.check_task_name("abc\n")


# --- save / load ----------------------------------------------------------------------------------

def test_save_load_round_trip_and_generation(tmp_path):
    reg = make_registry()
    reg.tasks["sentiment"] = TaskEntry(name="sentiment", backbone="minilm", kind="classifier", version=3,
                                       weight=2.5, queue_limit=17, deadline_ms=40.0, deployed_version=2,
                                       slot=1, description="movie reviews")
    reg.tasks["emb"] = TaskEntry(name="emb", backbone="minilm", kind="embedding", version=1)
    assert reg.generation == 0
    R.save(tmp_path, reg)
    assert reg.generation == 1
    back = R.load(tmp_path)
    assert back == reg
    assert back.tasks["sentiment"].deployed and not back.tasks["emb"].deployed

    R.save(tmp_path, back)
    R.save(tmp_path, back)
    assert back.generation == 3
    assert R.load(tmp_path).generation == 3

    data = json.loads(R.registry_path(tmp_path).read_text(encoding="utf-8"))
    assert data["format"] == R.FORMAT
    assert data["generation"] == 3


def test_save_leaves_no_temp_files(tmp_path):
    reg = make_registry()
    for _ in range(5):
        R.save(tmp_path, reg)
    assert repo_files(tmp_path) == [R.REGISTRY_FILE]


def test_failing_dump_keeps_old_file_and_removes_temp(tmp_path):
    reg = make_registry()
    R.save(tmp_path, reg)
    before = R.registry_path(tmp_path).read_bytes()

    bad = R.load(tmp_path)
    bad.tasks["t"] = TaskEntry(name="t", backbone="minilm", kind="classifier", version=1,
                               description=object())  # type: ignore[arg-type]  # not JSON-serialisable
    with pytest.raises(TypeError):
        R.save(tmp_path, bad)
    assert R.registry_path(tmp_path).read_bytes() == before
    assert repo_files(tmp_path) == [R.REGISTRY_FILE]
    assert R.load(tmp_path).generation == 1


def test_load_missing_file_is_helpful(tmp_path):
    with pytest.raises(RegistryError, match="not an fmplex repository.*fmplex init"):
        R.load(tmp_path)


def test_load_invalid_json(tmp_path):
    R.registry_path(tmp_path).write_text("{ not json", encoding="utf-8")
    with pytest.raises(RegistryError, match="not valid JSON"):
        R.load(tmp_path)


@pytest.mark.parametrize("doc", [{"hello": "world"}, {"format": "fmplex-registry/0", "hosts": {}}])
def test_load_non_registry_json(tmp_path, doc):
    R.registry_path(tmp_path).write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(RegistryError, match="not an fmplex registry"):
        R.load(tmp_path)


@pytest.mark.parametrize("text", ["[]", "42", '"fmplex-registry/1"', "null"])
def test_load_json_that_is_not_an_object(tmp_path, text):
    R.registry_path(tmp_path).write_text(text, encoding="utf-8")
    with pytest.raises(RegistryError):
        R.load(tmp_path)


# --- editing() ---------------------------------------------------------------------------------------

def test_editing_saves_when_block_succeeds(tmp_path):
    R.save(tmp_path, make_registry())
    with R.editing(tmp_path) as reg:
        reg.tasks["t"] = TaskEntry(name="t", backbone="minilm", kind="embedding", version=1)
    back = R.load(tmp_path)
    assert "t" in back.tasks
    assert back.generation == 2


def test_editing_does_not_save_when_block_raises(tmp_path):
    R.save(tmp_path, make_registry())
    before = R.registry_path(tmp_path).read_bytes()
    with pytest.raises(RuntimeError, match="boom"):
        with R.editing(tmp_path) as reg:
            reg.tasks["t"] = TaskEntry(name="t", backbone="minilm", kind="embedding", version=1)
            raise RuntimeError("boom")
    assert R.registry_path(tmp_path).read_bytes() == before
    assert "t" not in R.load(tmp_path).tasks


def test_editing_without_registry_raises(tmp_path):
    with pytest.raises(RegistryError):
        with R.editing(tmp_path):
            pass  # pragma: no cover
    assert not R.registry_path(tmp_path).exists()


# --- slots --------------------------------------------------------------------------------------------

def test_allocate_slot_round_robin_and_wraps():
    reg = make_registry(slots=3)
    got = []
    for name in ("a", "b", "c"):
        slot = reg.allocate_slot("minilm")
        reg.tasks[name] = deployed(name, slot)
        got.append(slot)
    assert got == [0, 1, 2]

    # free slot 1: the next allocation wraps around and finds it (0 and 2 are taken)
    del reg.tasks["b"]
    assert reg.allocate_slot("minilm") == 1


def test_freed_slot_not_reused_at_once():
    reg = make_registry(slots=4)
    s0 = reg.allocate_slot("minilm")
    reg.tasks["a"] = deployed("a", s0)
    del reg.tasks["a"]  # undeploy: slot 0 is free again
    s1 = reg.allocate_slot("minilm")
    assert s1 != s0
    assert s1 == 1


def test_allocate_slot_cursor_wraps_to_start():
    reg = make_registry(slots=3)
    reg.hosts["minilm"].next_slot = 2
    assert reg.allocate_slot("minilm") == 2
    assert reg.allocate_slot("minilm") == 0  # nothing deployed: the cursor wraps
    assert reg.hosts["minilm"].next_slot == 1


def test_allocate_slot_full_names_host():
    reg = make_registry(slots=2)
    reg.tasks["a"] = deployed("a", 0)
    reg.tasks["b"] = deployed("b", 1)
    with pytest.raises(RegistryError, match="fm.minilm"):
        reg.allocate_slot("minilm")


def test_allocate_slot_unknown_backbone():
    reg = make_registry()
    with pytest.raises(RegistryError, match="nosuch"):
        reg.allocate_slot("nosuch")


def test_slot_map_only_deployed_tasks_of_backbone():
    reg = make_registry()
    reg.hosts["other"] = HostEntry(backbone="other", model="fm.other", slots=4)
    reg.tasks["a"] = deployed("a", 0)
    reg.tasks["b"] = deployed("b", 2)
    reg.tasks["built"] = TaskEntry(name="built", backbone="minilm", kind="classifier", version=1)  # never deployed
    reg.tasks["half"] = TaskEntry(name="half", backbone="minilm", kind="classifier", version=1, slot=3)  # no version
    reg.tasks["o"] = deployed("o", 1, backbone="other")
    m = reg.slot_map("minilm")
    assert {k: v.name for k, v in m.items()} == {0: "a", 2: "b"}
    assert {k: v.name for k, v in reg.slot_map("other").items()} == {1: "o"}
    assert reg.slot_map("nosuch") == {}


def test_task_lookup():
    reg = make_registry()
    reg.tasks["a"] = deployed("a", 0)
    assert reg.task("a").slot == 0
    with pytest.raises(RegistryError, match="no task named 'zzz'"):
        reg.task("zzz")


# --- RegistryView -------------------------------------------------------------------------------------

def test_view_without_file_is_empty(tmp_path):
    view = RegistryView(tmp_path)
    assert view.current().tasks == {}
    assert view.reloads == 0


def test_view_reloads_only_on_change(tmp_path):
    reg = make_registry()
    reg.tasks["a"] = deployed("a", 0)
    R.save(tmp_path, reg)
    view = RegistryView(tmp_path)
    assert view.current().tasks["a"].weight == 1.0
    assert view.reloads == 1
    for _ in range(5):
        view.current()
    assert view.reloads == 1

    reg.tasks["a"].weight = 7.0
    R.save(tmp_path, reg)
    assert view.current().tasks["a"].weight == 7.0
    assert view.reloads == 2
    view.current()
    assert view.reloads == 2


def test_view_keeps_last_good_on_invalid_json(tmp_path):
    reg = make_registry()
    reg.tasks["a"] = deployed("a", 0)
    R.save(tmp_path, reg)
    view = RegistryView(tmp_path)
    good = view.current()
    assert good.generation == 1

    R.registry_path(tmp_path).write_text("{ half a fi", encoding="utf-8")
    again = view.current()
    assert again is good
    assert again.tasks["a"].slot == 0
    assert view.reloads == 1

    # a valid file afterwards is picked up
    reg.tasks["a"].weight = 3.0
    R.save(tmp_path, reg)
    assert view.current().tasks["a"].weight == 3.0
    assert view.reloads == 2


def test_view_keeps_last_good_when_file_removed(tmp_path):
    R.save(tmp_path, make_registry())
    view = RegistryView(tmp_path)
    good = view.current()
    os.unlink(R.registry_path(tmp_path))
    assert view.current() is good
