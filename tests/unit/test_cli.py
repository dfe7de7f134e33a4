"""The ``fmplex`` command line without a server: repository edits, help, errors.

Runs the installed console script as a user would, so exit codes and what
reaches stderr are the real ones.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

FMPLEX = str(Path(sys.executable).parent / "fmplex")

COMMANDS = [
    [], ["init"], ["task"], ["task", "create"], ["task", "list"], ["task", "show"], ["task", "set-weight"],
    ["task", "delete"], ["deploy"], ["undeploy"], ["serve"], ["status"],
]


def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([FMPLEX, *args], capture_output=True, text=True, timeout=300)
    if ok:
        assert out.returncode == 0, out.stderr
    return out


def one_line_error(out: subprocess.CompletedProcess[str], words: str) -> None:
    assert out.returncode != 0
    err = out.stderr.strip().splitlines()
    assert "Traceback" not in out.stderr
    assert len([ln for ln in err if ln.startswith("Error:")]) == 1, out.stderr
    assert words.lower() in out.stderr.lower(), out.stderr


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "fmplex")
def test_every_command_has_help(cmd: list[str]) -> None:
    out = run(*cmd, "--help")
    assert out.stdout.startswith("Usage: fmplex")
    assert len(out.stdout.splitlines()) > 3


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "repo"
    out = run("init", str(path))
    assert "host fm.minilm" in out.stdout
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "d.csv"
    rows = ["text,label"]
    rows += [f"what a lovely and wonderful day number {i},happy" for i in range(8)]
    rows += [f"this is a miserable and awful day number {i},sad" for i in range(8)]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_task_lifecycle_in_the_repository(repo: Path, data: Path) -> None:
    out = run("task", "create", "mood", "--repo", str(repo), "--train", str(data), "--weight", "3")
    assert "task mood v1 (classifier on minilm, classifier outputs" in out.stdout
    assert "training accuracy: 1.000" in out.stdout
    manifest = json.loads((repo / "mood" / "1" / "manifest.json").read_text())
    assert manifest["labels"] == ["happy", "sad"] and manifest["kind"] == "classifier"
    assert (repo / "mood" / "1" / "weights.safetensors").stat().st_size > 384 * 2 * 4

    listing = run("task", "list", "--repo", str(repo)).stdout
    assert any(ln.split()[:5] == ["mood", "classifier", "minilm", "1", "3"] for ln in listing.splitlines()), listing
    show = run("task", "show", "mood", "--repo", str(repo)).stdout
    assert "labels:      happy, sad" in show and "deployed:    no" in show

    assert "weight 3 -> 0.5" in run("task", "set-weight", "mood", "0.5", "--repo", str(repo), "--queue-limit", "7").stdout
    reg = json.loads((repo / "fmplex.registry.json").read_text())
    assert reg["tasks"]["mood"]["weight"] == 0.5 and reg["tasks"]["mood"]["queue_limit"] == 7

    assert "v2" in run("task", "create", "mood", "--repo", str(repo), "--train", str(data)).stdout
    assert (repo / "mood" / "2" / "manifest.json").exists()

    out = run("deploy", "mood", "--repo", str(repo), "--offline").stdout
    assert "slot 0" in out
    config = (repo / "mood" / "config.pbtxt").read_text()
    assert 'key: "OUT_0" value: "LOGITS"' in config and "versions: [ 2 ]" in config
    one_line_error(run("task", "delete", "mood", "--repo", str(repo), ok=False), "is deployed")
    run("undeploy", "mood", "--repo", str(repo), "--offline")
    assert not (repo / "mood" / "config.pbtxt").exists()
    assert json.loads((repo / "fmplex.registry.json").read_text())["tasks"]["mood"]["slot"] is None
    run("task", "delete", "mood", "--repo", str(repo))
    assert not (repo / "mood").exists()
    assert "no tasks" in run("task", "list", "--repo", str(repo)).stdout


def test_embedding_task_needs_no_data(repo: Path) -> None:
    out = run("task", "create", "vec", "--kind", "embedding", "--repo", str(repo))
    assert "embedding on minilm" in out.stdout
    assert json.loads((repo / "vec" / "1" / "manifest.json").read_text())["kind"] == "embedding"


@pytest.mark.parametrize(
    "args, words",
    [
        (["task", "create", "../evil", "--kind", "embedding"], "invalid task name"),
        (["task", "create", "a/b", "--kind", "embedding"], "invalid task name"),
        (["task", "show", "ghost"], "no task named 'ghost'"),
        (["task", "set-weight", "ghost", "2"], "no task named"),
        (["task", "create", "x1", "--train", "/nonexistent.csv"], "does not exist"),
        (["task", "create", "x2", "--train", "/"], "is a directory; text tasks train from a text,label CSV"),
        (["deploy", "vec", "--url", "127.0.0.1:1"], "no tritonserver answers"),
        (["undeploy", "vec"], "not deployed"),
    ],
)
def test_errors_are_one_clear_line(repo: Path, args: list[str], words: str) -> None:
    one_line_error(run(*args, "--repo", str(repo), ok=False), words)


def test_usage_errors(repo: Path, data: Path) -> None:
    out = run("task", "create", "c1", "--repo", str(repo), ok=False)
    assert out.returncode == 2 and "needs --train" in out.stderr
    out = run("task", "set-weight", "vec", "0", "--repo", str(repo), ok=False)
    assert out.returncode == 2 and "0.001" in out.stderr
    out = run("task", "create", "vec", "--kind", "classifier", "--train", str(data), "--repo", str(repo), ok=False)
    one_line_error(out, "exists as embedding")


def test_not_a_repository(tmp_path: Path) -> None:
    one_line_error(run("task", "list", "--repo", str(tmp_path), ok=False), "not an fmplex repository")


def test_task_create_help_lists_every_kind_of_every_family() -> None:
    from fmplex.families import FAMILIES

    out = run("task", "create", "--help").stdout
    listing = out.split("Options:")[0]
    kinds = {(fam.name, k.name) for fam in FAMILIES.values() for k in fam.kinds()}
    assert {"encoder", "generative", "multimodal"} <= {f for f, _ in kinds}
    assert {("encoder", "classifier"), ("generative", "generate"), ("multimodal", "multimodal")} <= kinds
    for fam in FAMILIES.values():
        after = listing.split(f"\n  {fam.name} (", 1)[1].split("):\n", 1)[1].splitlines()
        section = [ln.split()[0] for ln in after[: next((i for i, ln in enumerate(after) if not ln.startswith("    ")), len(after))]]
        assert section == [k.name for k in fam.kinds()], (fam.name, section)
    choice = out.split("--kind [", 1)[1].split("]", 1)[0].split("|")
    assert sorted(choice) == sorted({k for _, k in kinds})
    for backbone in ("minilm", "smollm2", "llava-tiny", "mllama-tiny"):
        assert backbone in out.split("--backbone [", 1)[1].split("]", 1)[0]


@pytest.fixture(scope="module")
def image_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli-images") / "repo"
    run("init", str(path), "--backbone", "efficientnet", "--backbone", "fracast", "--slots", "4")
    return path


def test_labelled_images_train_a_vision_classifier_with_train(image_repo: Path, tmp_path: Path) -> None:
    from fmplex.families.vision.demo_data import write_digits_folder

    folder = write_digits_folder(tmp_path / "digits", 20, classes=(0, 1))
    out = run("task", "create", "digits", "--backbone", "efficientnet", "--kind", "classifier", "--train", str(folder),
              "--repo", str(image_repo))  # fmt: skip
    assert "held-out accuracy" in out.stdout and "task digits v1 (classifier on efficientnet" in out.stdout
    assert json.loads((image_repo / "digits" / "1" / "manifest.json").read_text())["labels"] == ["0", "1"]


def test_a_folder_of_images_given_as_source_points_to_train(image_repo: Path) -> None:
    out = run("task", "create", "digits2", "--backbone", "efficientnet", "--kind", "classifier", "--source", ".",
              "--repo", str(image_repo), ok=False)  # fmt: skip
    one_line_error(out, "give it with --train")
